//! What a stop does to the embedded store, against the real binary: a deploy (SIGTERM) is not a
//! crash, recovery counts a cut-off run once even when it is itself cut off, a full disk at start
//! serves reads and recovers by itself, a failed commit's 503 says the job may exist, and a
//! deleted data directory is noticed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{id_of, report, wait_ready, Reply, TestApp};
use crate::process::{self, Outcome, Process};
use crate::tmpfs::{fill_disk, is_root, Tmpfs};

/// A job that runs until it is stopped (cancel, timeout or shutdown).
fn hanging(title: &str) -> Value {
    json!({"title": title, "test_hook": "hang"})
}

fn attempts(job: &Value) -> u64 {
    job["attempts"].as_u64().unwrap_or_else(|| panic!("no attempts: {job}"))
}

fn text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

async fn wait_running(app: &TestApp, id: &str) -> Value {
    app.wait_for(id, Duration::from_secs(10), |j| j["status"] == "running").await
}

/// Starts the binary on `dir` with `args`, waiting until it listens.
fn start(dir: &Path, args: &[&str]) -> Process {
    process::start(dir, args)
}

#[actix_web::test]
async fn a_deploy_is_not_a_crash_a_job_cut_off_by_sigterm_keeps_one_attempt_per_start() {
    // (--max-attempts, deploys): before, one deploy ended the job `worker_lost` at 2, two at 3.
    for (max_attempts, deploys) in [(2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let max = max_attempts.to_string();
        let args = ["--pdf-workers", "1", "--max-attempts", &max, "--shutdown-grace", "200ms"];
        let case = format!("--max-attempts {max_attempts}, {deploys} deploys");
        let mut p = start(dir.path(), &args);
        let id = id_of(&p.app.submit_pdf(&hanging("long")).await).to_string();
        for deploy in 1..=deploys {
            let job = wait_running(&p.app, &id).await;
            assert_eq!(attempts(&job), deploy, "{case}: start {deploy}: {job}");
            p.sigterm();
            let status = p.wait_exit(Duration::from_secs(20)).await;
            assert_eq!(status.code(), Some(0), "{case}: exit status {status}\n{}", p.output_after_exit());
            drop(p);
            p = start(dir.path(), &args);
            let listed = p.app.get("/jobs").await.json();
            assert_eq!(listed["counts"]["failed"], 0, "{case}: after deploy {deploy}: {listed}");
        }
        // The start after the last deploy runs it again, as one more attempt, not a suspect's.
        let job = wait_running(&p.app, &id).await;
        assert_eq!(attempts(&job), deploys + 1, "{case}: {job}");
        assert!(job["error"].is_null(), "{case}: {job}");
        let cancelled = p.app.delete(&format!("/jobs/{id}")).await;
        assert_eq!(cancelled.status.as_u16(), 200, "{case}: {}", text(&cancelled));
    }
}

#[actix_web::test]
async fn a_kill_during_recovery_does_not_count_the_cut_off_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--pdf-workers", "1", "--max-attempts", "3"];
    let mut p = start(dir.path(), &args);
    let id = id_of(&p.app.submit_pdf(&hanging("cut off")).await).to_string();
    wait_running(&p.app, &id).await;
    p.kill9();
    drop(p);
    // Twice: each start commits its recovery and is killed before it clears the start log.
    for n in 1..=2 {
        let hooked = process::spawn_with_env(dir.path(), &args, &[("OFFLOAD_TEST_KILL_AFTER_RECOVERY", "1")]);
        match hooked.wait_listening(Duration::from_secs(20)) {
            Outcome::Exited { status, .. } => {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(libc::SIGKILL), "start {n}: {status}");
            }
            Outcome::Listening(p) => panic!("start {n}: the test hook did not kill the process:\n{}", p.output()),
        }
    }
    let p = start(dir.path(), &args);
    // Started once, cut off once: its second run is attempt 2 (before: the two recoveries counted
    // it twice more, and at 3 it ended `worker_lost`).
    let job = wait_running(&p.app, &id).await;
    assert_eq!(attempts(&job), 2, "{job}");
    p.app.delete(&format!("/jobs/{id}")).await;
}

#[actix_web::test]
async fn a_full_disk_after_a_crash_serves_reads_refuses_writes_and_recovers_when_space_returns() {
    if !is_root() {
        eprintln!("skipped: this test needs root to mount a tmpfs as a small disk");
        return;
    }
    let Some(fs) = Tmpfs::mount("24m") else { return };
    let data = fs.path().join("data");
    let args = ["--pdf-workers", "1"];
    let mut p = start(&data, &args);
    let done = id_of(&p.app.submit_pdf(&report(2)).await).to_string();
    let done_job = p.app.wait_finished(&done).await;
    assert_eq!(done_job["status"], "succeeded", "{done_job}");
    let cut = id_of(&p.app.submit_pdf(&hanging("running at the crash")).await).to_string();
    wait_running(&p.app, &cut).await;
    p.kill9();
    drop(p);

    let filler = fs.path().join("filler");
    fill_disk(&filler);
    // Before: "cannot start: recovery failed: database or disk is full", exit 1.
    let p = match process::spawn(&data, &args).wait_listening(Duration::from_secs(20)) {
        Outcome::Listening(p) => p,
        Outcome::Exited { status, output } => panic!("a full disk stopped the start ({status}):\n{output}"),
    };
    let app = &p.app;
    // Reads are served.
    let job = app.job(&done).await;
    assert_eq!((job["status"].as_str(), &job["finished_at"]), (Some("succeeded"), &done_job["finished_at"]));
    let result = app.get(&format!("/jobs/{done}/result")).await;
    assert_eq!(result.status.as_u16(), 200, "{}", text(&result));
    assert!(result.body.starts_with(b"%PDF-"));
    assert_eq!(app.job(&cut).await["status"], "queued");
    // Writes are refused, saying nothing was created, and the service is not ready.
    let refused = app.post_json("/generate-pdf", &json!({"title": "refused"})).await;
    let message = refused.assert_error(503, "storage_unavailable");
    assert!(message.contains("nothing was created"), "{message}");
    assert!(refused.header("retry-after").is_some(), "503 without Retry-After");
    wait_ready(app, 503, Duration::from_secs(5)).await.assert_error(503, "storage_unavailable");

    std::fs::remove_file(filler).unwrap();
    wait_ready(app, 200, Duration::from_secs(10)).await;
    // Recovery finished by itself: the cut-off run counted once, the job runs again.
    let job = wait_running(app, &cut).await;
    assert_eq!(attempts(&job), 2, "{job}");
    app.delete(&format!("/jobs/{cut}")).await;
    let after = id_of(&app.submit_pdf(&report(2)).await).to_string();
    assert_eq!(app.wait_finished(&after).await["status"], "succeeded");
    let counts = app.get("/jobs").await.json()["counts"].clone();
    assert_eq!(counts, json!({"queued": 0, "running": 0, "succeeded": 2, "failed": 0, "cancelled": 1}));
}

/// POSTs one small document, with `key` as its Idempotency-Key.
async fn post(app: &TestApp, key: Option<&str>) -> Reply {
    let mut headers: Vec<(&str, &[u8])> = vec![("content-type", b"application/json")];
    if let Some(k) = key {
        headers.push(("idempotency-key", k.as_bytes()));
    }
    let body = serde_json::to_vec(&json!({"title": "committed, or not"})).unwrap();
    app.request_with_headers("POST", "/generate-pdf", &headers, body).await
}

/// Builds a shared library that makes `fsync` and `fdatasync` fail with EIO while the file named
/// by `OFFLOAD_TEST_FAIL_FSYNC` exists (the writes before them land in the page cache, as when a
/// disk reports an error only at the flush).
fn fsync_shim(dir: &Path) -> PathBuf {
    let source = dir.join("fail_fsync.c");
    std::fs::write(
        &source,
        r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
static int failing(void) {
    const char *flag = getenv("OFFLOAD_TEST_FAIL_FSYNC");
    return flag && access(flag, F_OK) == 0;
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}
"#,
    )
    .unwrap();
    let lib = dir.join("libfailfsync.so");
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("run cc");
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    lib
}

#[actix_web::test]
async fn a_commit_whose_fsync_fails_answers_that_the_job_may_exist_and_a_retry_with_its_key_is_safe() {
    let tools = tempfile::tempdir().unwrap();
    let shim = fsync_shim(tools.path());
    let flag = tools.path().join("fail-fsync");
    let dir = tempfile::tempdir().unwrap();
    let args = ["--pdf-workers", "1", "--sync", "full"];
    let env = [("LD_PRELOAD", shim.to_str().unwrap()), ("OFFLOAD_TEST_FAIL_FSYNC", flag.to_str().unwrap())];
    // (Idempotency-Key): one uncertain commit per process (the next commit would overwrite its
    // frames, and then a restart finds nothing).
    for key in [Some("order-42"), None] {
        let mut p = match process::spawn_with_env(dir.path(), &args, &env).wait_listening(Duration::from_secs(20)) {
            Outcome::Listening(p) => p,
            Outcome::Exited { status, output } => panic!("offload with the shim exited ({status}):\n{output}"),
        };
        std::fs::write(&flag, b"").unwrap();
        let reply = post(&p.app, key).await;
        let message = reply.assert_error(503, "storage_unavailable");
        assert!(reply.header("retry-after").is_some(), "503 without Retry-After");
        assert!(message.contains("may exist") && message.contains("Idempotency-Key"), "{message}");
        // The message names the job that may exist.
        let named: String = message
            .split(" may exist")
            .next()
            .and_then(|before| before.split_whitespace().last())
            .unwrap_or_else(|| panic!("no job id in: {message}"))
            .to_string();
        // Killed before any later commit: a restart replays the commit the fsync failed for.
        p.kill9();
        drop(p);
        std::fs::remove_file(&flag).unwrap();
        let p = start(dir.path(), &args);
        let job = p.app.get(&format!("/jobs/{named}")).await;
        assert_eq!(job.status.as_u16(), 200, "the job the 503 named ({key:?}): {}", text(&job));
        if let Some(key) = key {
            let again = post(&p.app, Some(key)).await;
            assert_eq!(again.status.as_u16(), 202, "{}", text(&again));
            assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
            assert_eq!(id_of(&again.json()), named, "the retry with the key is the job the 503 named");
        }
        assert_eq!(p.app.wait_finished(&named).await["status"], "succeeded");
    }
}

#[actix_web::test]
async fn a_deleted_data_directory_is_noticed_readiness_fails_and_writes_are_refused() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("data");
    let p = start(&data, &["--pdf-workers", "1"]);
    let app = &p.app;
    let before = id_of(&app.submit_pdf(&report(1)).await).to_string();
    assert_eq!(app.wait_finished(&before).await["status"], "succeeded");
    std::fs::remove_dir_all(&data).unwrap();
    // Before: 202s into unlinked files, /readyz 200.
    wait_ready(app, 503, Duration::from_secs(5)).await.assert_error(503, "storage_unavailable");
    let refused = app.post_json("/generate-pdf", &json!({"title": "into the void"})).await;
    refused.assert_error(503, "storage_unavailable");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !p.output().contains("was deleted") {
        assert!(std::time::Instant::now() < deadline, "no log line names the deleted directory:\n{}", p.output());
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    // It stays refused: recreating the path does not bring the unlinked files back.
    std::fs::create_dir_all(&data).unwrap();
    app.post_json("/generate-pdf", &json!({"title": "still refused"})).await.assert_error(503, "storage_unavailable");
}
