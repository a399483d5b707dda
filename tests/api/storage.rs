//! Storage limits of the embedded store, against the real binary: a disk that fills up (and
//! empties again) under a running service, the process's memory while thousands of results are
//! stored on disk, and the database's size while finished jobs keep expiring.
//!
//! Every test runs the binary with its own temporary `--data-dir` and waits for events by
//! polling with deadlines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{id_of, report, wait_ready, Reply, TestApp};
use crate::tmpfs::{fill_disk, is_root, Tmpfs};

const MIB: u64 = 1 << 20;

fn is_finished(job: &Value) -> bool {
    matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

/// Waits (one deadline for all) until every job has ended, and asserts each succeeded.
async fn assert_all_succeed(app: &TestApp, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    for id in ids {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let job = app.wait_for(id, left, is_finished).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
}

/// `GET /jobs`: the counts of every job held, by status.
async fn counts(app: &TestApp) -> Value {
    let list = app.get("/jobs?limit=1").await;
    assert_eq!(list.status.as_u16(), 200, "{}", String::from_utf8_lossy(&list.body));
    list.json()["counts"].clone()
}

fn count(counts: &Value, status: &str) -> u64 {
    counts[status].as_u64().unwrap_or_else(|| panic!("no count `{status}`: {counts}"))
}

fn total(counts: &Value) -> u64 {
    counts.as_object().expect("counts").values().map(|n| n.as_u64().expect("a count")).sum()
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The database's logical size (`page_count` × `page_size`, what the WAL holds included) and
/// the bytes of its free pages, read through a short-lived read-only connection of our own.
fn db_pages(path: &Path) -> (u64, u64) {
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
    let pragma = |name: &str| -> u64 {
        let n: i64 =
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0)).unwrap_or_else(|e| panic!("{name}: {e}"));
        n as u64
    };
    let page = pragma("page_size");
    (pragma("page_count") * page, pragma("freelist_count") * page)
}

fn body_text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// A disk that fills up while the service runs: submissions get `503 storage_unavailable`
/// with `Retry-After` and `/readyz` says so, nothing accepted before is lost or unreadable, and
/// once there is room again the service recovers by itself (no restart): it is ready again, takes
/// new jobs, and every job it ever accepted succeeds.
///
/// Needs root, for the tmpfs (`mount -t tmpfs -o size=6m`) that stands in for a small disk (CI
/// runs as root). Without root the test says so and returns; the `fail-writes` test hook test in
/// durability.rs
/// (`while_store_writes_fail_submissions_and_readiness_get_503_and_both_recover_when_writes_work_again`)
/// covers the same logic without a real full disk.
#[actix_web::test]
async fn a_full_disk_gives_503_storage_unavailable_loses_nothing_and_recovers_without_a_restart() {
    if !is_root() {
        eprintln!("skipped: this test needs root to mount a tmpfs as a small disk (the fail-writes hook test covers the logic)");
        return;
    }
    let started = Instant::now();
    // Declared before the process: the process is dropped (killed) first, then the tmpfs unmounted.
    let Some(disk) = Tmpfs::mount("6m") else { return };
    let p = crate::process::start(disk.path(), &["--pdf-workers", "1"]);
    let app = &p.app;

    let mut before = Vec::new();
    for n in 0..5 {
        before.push(id_of(&app.submit_pdf(&report(5 + n * 10)).await).to_string());
    }
    assert_all_succeed(app, &before, Duration::from_secs(30)).await;

    // In flight when the disk fills (one worker): one job running, one queued behind it. Their
    // claim and final writes meet the full disk and are retried.
    let slow = json!({"title": "running at the fill", "test_hook": {"slow_pages": {"millis": 300}}});
    let in_flight =
        [id_of(&app.submit_pdf(&slow).await).to_string(), id_of(&app.submit_pdf(&report(40)).await).to_string()];
    app.wait_for(&in_flight[0], Duration::from_secs(10), |j| j["status"] == "running").await;

    let filler = disk.path().join("filler");
    let filled = fill_disk(&filler);
    let left = disk.available();
    assert_eq!(left, 0, "the disk still has {left} bytes free after the filler");
    eprintln!(
        "disk full: filler {filled} bytes; offload.db {} bytes, offload.db-wal {} bytes",
        file_size(&disk.path().join("offload.db")),
        file_size(&disk.path().join("offload.db-wal"))
    );

    // Submissions until the store's writes hit the full disk. The WAL may have room left inside
    // it, so some may still be accepted; each one (a 300-row report, its result bigger) needs more.
    let mut during = Vec::new();
    let most = 500;
    let filling = Instant::now();
    let refused = loop {
        assert!(
            during.len() < most && filling.elapsed() < Duration::from_secs(60),
            "the disk is full, yet {} submissions were accepted in {:?} without a 503",
            during.len(),
            filling.elapsed()
        );
        let reply = app.post_json("/generate-pdf", &report(300)).await;
        match reply.status.as_u16() {
            202 => during.push(id_of(&reply.json()).to_string()),
            503 => break reply,
            other => panic!("answer {other} to a submission on a full disk: {}", body_text(&reply)),
        }
    };
    refused.expect_error(503, "storage_unavailable", "a submission on a full disk");
    let retry_after = refused.header("retry-after").expect("503 without Retry-After");
    assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After: {retry_after}");
    eprintln!("first 503 after {} accepted submissions on the full disk", during.len());

    let ready = wait_ready(app, 503, Duration::from_secs(10)).await;
    ready.expect_error(503, "storage_unavailable", "/readyz on a full disk");
    app.post_json("/generate-pdf", &report(3)).await.expect_error(
        503,
        "storage_unavailable",
        "a second submission on a full disk",
    );

    // Nothing accepted is lost or unreadable while the disk is full.
    for id in &before {
        let job = app.job(id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let result = app.get(&format!("/jobs/{id}/result")).await;
        assert_eq!(result.status.as_u16(), 200, "{}", body_text(&result));
        assert!(result.body.starts_with(b"%PDF-"), "result of {id} is not a PDF");
    }
    for id in in_flight.iter().chain(&during) {
        app.job(id).await;
    }
    // Give the running job the time to end on the full disk (its final write fails and is
    // retried); if the write got in after all, the test goes on without it.
    let end_refused = "cannot record the job's end";
    let waited = Instant::now();
    while !p.output().contains(end_refused) && waited.elapsed() < Duration::from_secs(5) {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let retried = p.output().contains(end_refused);
    eprintln!("the running job's end met the full disk: {retried}");
    let still = app.job(&in_flight[0]).await;
    assert!(!is_finished(&still) || still["status"] == "succeeded", "{still}");

    std::fs::remove_file(&filler).expect("remove the filler file");
    // The store probes with a write every second while it is unhealthy.
    wait_ready(app, 200, Duration::from_secs(15)).await;
    let mut after = Vec::new();
    for n in 0..5 {
        after.push(id_of(&app.submit_pdf(&report(10 + n)).await).to_string());
    }
    let all: Vec<String> = before.iter().chain(&in_flight).chain(&during).chain(&after).cloned().collect();
    assert_all_succeed(app, &all, Duration::from_secs(60)).await;
    let held = counts(app).await;
    assert_eq!(total(&held), all.len() as u64, "the refused submissions created no job: {held}");
    let output = p.output();
    assert!(!output.contains("panicked"), "the service panicked:\n{output}");
    eprintln!(
        "full disk: {} jobs before, {} in flight, {} accepted while filling, {} after; {:?}",
        before.len(),
        in_flight.len(),
        during.len(),
        after.len(),
        started.elapsed()
    );
}

async fn stored_result_bytes(app: &TestApp) -> u64 {
    app.metrics().await.value("offload_store_result_bytes", &[]) as u64
}

/// Submits `n` more copies of `spec` with at most `window` jobs submitted and not yet succeeded
/// (at most 32 submissions in flight at once), and returns once all of them (and every earlier
/// one in `ids`) succeeded. A job failing or cancelled fails the test.
async fn submit_windowed(
    app: &TestApp,
    spec: &Value,
    n: usize,
    window: usize,
    ids: &mut Vec<String>,
    within: Duration,
) {
    let target = ids.len() + n;
    let deadline = Instant::now() + within;
    loop {
        let held = counts(app).await;
        assert_eq!((count(&held, "failed"), count(&held, "cancelled")), (0, 0), "{held}");
        let done = count(&held, "succeeded") as usize;
        if done >= target {
            assert_eq!(done, target, "more jobs succeeded than were submitted: {held}");
            return;
        }
        assert!(Instant::now() < deadline, "{target} jobs not all succeeded within {within:?}: {held}");
        let room = window.saturating_sub(ids.len() - done).min(target - ids.len()).min(32);
        if room == 0 {
            actix_rt::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let jobs = futures::future::join_all((0..room).map(|_| app.submit_pdf(spec))).await;
        ids.extend(jobs.iter().map(|j| id_of(j).to_string()));
    }
}

/// Results live on disk, not in the process: storing thousands more of them (tens of MiB)
/// barely moves the resident set size. The backlog is kept short (a window of jobs in flight),
/// so that what is measured is the stored results, not queued work; a warm-up fills the
/// store's page caches (bounded by configuration) before the first measurement.
#[actix_web::test]
async fn rss_stays_flat_while_thousands_of_results_are_stored() {
    const ROWS: usize = 300; // a result of about 16 KB
    const WARM_UP: usize = 400;
    const MORE: usize = 2400;
    const WINDOW: usize = 64;
    const MOST_GROWTH: u64 = 8 * MIB;
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temporary data dir");
    let p = crate::process::start(dir.path(), &["--pdf-workers", "2", "--max-pending", "10000"]);
    let app = &p.app;
    let spec = report(ROWS);

    let mut ids = Vec::new();
    submit_windowed(app, &spec, WARM_UP, WINDOW, &mut ids, Duration::from_secs(60)).await;
    let rss_before = p.memory("VmRSS");
    let stored_before = stored_result_bytes(app).await;
    let warmed = started.elapsed();

    submit_windowed(app, &spec, MORE / 2, WINDOW, &mut ids, Duration::from_secs(120)).await;
    let rss_half = p.memory("VmRSS");
    submit_windowed(app, &spec, MORE - MORE / 2, WINDOW, &mut ids, Duration::from_secs(120)).await;
    let rss_after = p.memory("VmRSS");
    let stored_after = stored_result_bytes(app).await;
    let db = file_size(&dir.path().join("offload.db"));
    let wal = file_size(&dir.path().join("offload.db-wal"));
    let added = stored_after.saturating_sub(stored_before);
    let growth = rss_after as i64 - rss_before as i64;
    eprintln!(
        "RSS {:.1} MiB after {WARM_UP} jobs ({warmed:?}), {:.1} MiB after {}, {:.1} MiB after {} ({:?}): {:+.1} MiB \
         while stored results grew by {:.1} MiB (to {:.1} MiB); offload.db {:.1} MiB, offload.db-wal {:.1} MiB",
        rss_before as f64 / MIB as f64,
        rss_half as f64 / MIB as f64,
        WARM_UP + MORE / 2,
        rss_after as f64 / MIB as f64,
        WARM_UP + MORE,
        started.elapsed(),
        growth as f64 / MIB as f64,
        added as f64 / MIB as f64,
        stored_after as f64 / MIB as f64,
        db as f64 / MIB as f64,
        wal as f64 / MIB as f64,
    );
    assert!(
        added >= 4 * MOST_GROWTH,
        "the test stores too little to tell: {added} result bytes added, want at least {}",
        4 * MOST_GROWTH
    );
    assert!(
        growth < MOST_GROWTH as i64,
        "RSS grew by {:.1} MiB ({rss_before} → {rss_after} bytes) while {:.1} MiB of results were stored",
        growth as f64 / MIB as f64,
        added as f64 / MIB as f64
    );
    assert!(db + wal >= added, "the database files ({db} + {wal} bytes) are smaller than the results added ({added})");
    // Under a steady stream of writes the WAL is restarted by the store, not left to grow.
    assert!(wal <= 64 * MIB, "offload.db-wal is {:.1} MiB under sustained writes", wal as f64 / MIB as f64);

    // The results are really kept: every job is there, and the earliest ones can be downloaded.
    let held = counts(app).await;
    assert_eq!(count(&held, "succeeded"), ids.len() as u64, "{held}");
    assert_eq!(total(&held), ids.len() as u64, "{held}");
    for id in &ids[..3] {
        let job = app.job(id).await;
        let result = app.get(&format!("/jobs/{id}/result")).await;
        assert_eq!(result.status.as_u16(), 200, "{}", body_text(&result));
        assert!(result.body.starts_with(b"%PDF-"), "result of {id} is not a PDF");
        assert_eq!(Some(result.body.len() as u64), job["result"]["bytes"].as_u64(), "{job}");
    }
}

/// With a short `--result-ttl`, jobs keep arriving and expiring; the database reuses the space
/// of expired jobs instead of growing, and the WAL stays within its limit (64 MiB).
///
/// The expiry sweep runs every ttl/4 (clamped to 50 ms..10 s): with `--result-ttl 1s`, a job is
/// gone about 1.25 s after it finished at the latest.
#[actix_web::test]
async fn the_database_stays_the_same_size_under_ttl_churn() {
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 300;
    const WAL_LIMIT: u64 = 64 * MIB;
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temporary data dir");
    let p = crate::process::start(dir.path(), &["--pdf-workers", "2", "--result-ttl", "1s"]);
    let app = &p.app;
    let (db_path, wal_path): (PathBuf, PathBuf) = (dir.path().join("offload.db"), dir.path().join("offload.db-wal"));
    let wal_peak = std::cell::Cell::new(0u64);
    let sample_wal = || wal_peak.set(wal_peak.get().max(file_size(&wal_path)));
    let spec = report(20);
    let mut baseline = None;
    let mut sizes = Vec::new();

    for round in 0..ROUNDS {
        let round_start = Instant::now();
        let mut ids = Vec::with_capacity(PER_ROUND);
        while ids.len() < PER_ROUND {
            let n = (PER_ROUND - ids.len()).min(32);
            let jobs = futures::future::join_all((0..n).map(|_| app.submit_pdf(&spec))).await;
            ids.extend(jobs.iter().map(|j| id_of(j).to_string()));
            sample_wal();
        }
        // Counted from the metrics: a job may expire before a poll of its own sees it succeeded.
        let want = (PER_ROUND * (round + 1)) as f64;
        let pdf = |status| [("kind", "pdf"), ("status", status)];
        let m = app
            .wait_metrics(Duration::from_secs(60), |m| {
                sample_wal();
                let ended = ["succeeded", "failed", "cancelled"]
                    .iter()
                    .map(|s| m.value("offload_jobs_finished_total", &pdf(s)))
                    .sum::<f64>();
                ended >= want
            })
            .await;
        assert_eq!(m.value("offload_jobs_finished_total", &pdf("succeeded")), want, "round {round}:\n{}", m.dump());
        let ran = round_start.elapsed();
        // Then every job of the round expires.
        let deadline = Instant::now() + Duration::from_secs(20);
        for id in &ids {
            loop {
                sample_wal();
                let reply = app.get(&format!("/jobs/{id}")).await;
                match reply.status.as_u16() {
                    404 => break,
                    200 => {
                        let job = reply.json();
                        assert_eq!(job["status"], "succeeded", "round {round}: {job}");
                        assert!(Instant::now() < deadline, "round {round}: not expired within 20 s: {job}");
                        actix_rt::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("round {round}: GET /jobs/{id} answered {other}: {}", body_text(&reply)),
                }
            }
        }
        let (db, wal) = (file_size(&db_path), file_size(&wal_path));
        let (pages, free) = db_pages(&db_path);
        sample_wal();
        eprintln!(
            "round {round}: ran {ran:?}, expired {:?}; offload.db {db} bytes ({pages} in pages, {free} of them free), \
             offload.db-wal {wal} bytes (peak {})",
            round_start.elapsed() - ran,
            wal_peak.get()
        );
        sizes.push((db, pages));
        if round == 2 {
            baseline = Some((db, pages));
        }
    }

    let held = counts(app).await;
    assert_eq!(total(&held), 0, "every job expired: {held}");
    let (baseline, baseline_pages) = baseline.expect("three rounds ran");
    let (end, end_pages) = (file_size(&db_path), db_pages(&db_path).0);
    let allowed = |base: u64| (base + base / 4).max(base + 256 * 1024);
    eprintln!(
        "TTL churn: {} jobs in {:?}; offload.db {baseline} bytes ({baseline_pages} in pages) after round 3, {end} \
         ({end_pages} in pages) at the end (allowed {}); WAL peak {} bytes",
        ROUNDS * PER_ROUND,
        started.elapsed(),
        allowed(baseline),
        wal_peak.get()
    );
    assert!(
        end <= allowed(baseline),
        "offload.db grew from {baseline} to {end} bytes under TTL churn (file, pages per round: {sizes:?})"
    );
    assert!(
        end_pages <= allowed(baseline_pages),
        "the database grew from {baseline_pages} to {end_pages} bytes of pages under TTL churn (file, pages per round: \
         {sizes:?})"
    );
    assert!(wal_peak.get() <= WAL_LIMIT, "offload.db-wal reached {} bytes, over {WAL_LIMIT}", wal_peak.get());
}
