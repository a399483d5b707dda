//! Backpressure, panic isolation, timeouts, cancellation and expiry.

use std::time::Duration;

use offload::configuration::StoreKind;
use serde_json::json;

use offload::configuration::WorkerSched;

use crate::helpers::{duration, id_of, settings, spawn_app_with, Part};

fn one_worker() -> offload::configuration::Settings {
    let mut s = settings();
    s.workers.pdf_workers = Some(1);
    s
}

#[actix_web::test]
async fn beyond_the_pending_limit_submissions_get_503_and_nothing_accepted_is_lost() {
    let mut s = one_worker();
    s.admission.max_pending = 3;
    let app = spawn_app_with(s).await;
    let blocker = app.submit_pdf(&json!({"title": "blocker", "test_hook": "hang"})).await;
    app.wait_for(id_of(&blocker), Duration::from_secs(10), |j| j["status"] == "running").await;
    let queued = [app.submit_pdf(&json!({"title": "q1"})).await, app.submit_pdf(&json!({"title": "q2"})).await];

    for _ in 0..5 {
        let reply = app.post_json("/generate-pdf", &json!({"title": "one too many"})).await;
        reply.assert_error(503, "overloaded");
        let retry: u64 = reply.header("retry-after").expect("Retry-After").parse().expect("whole seconds");
        assert!(retry >= 1);
    }

    app.delete(&format!("/jobs/{}", id_of(&blocker))).await;
    for job in &queued {
        assert_eq!(app.wait_finished(id_of(job)).await["status"], "succeeded");
    }
    // Room again once the backlog is gone.
    let after = app.submit_pdf(&json!({"title": "after"})).await;
    assert_eq!(app.wait_finished(id_of(&after)).await["status"], "succeeded");
}

#[actix_web::test]
async fn the_queued_bytes_budget_is_enforced() {
    let mut s = one_worker();
    s.admission.max_queued_bytes = "4KiB".parse().unwrap();
    let app = spawn_app_with(s).await;
    let blocker = app.submit_pdf(&json!({"title": "blocker", "test_hook": "hang"})).await;
    app.wait_for(id_of(&blocker), Duration::from_secs(10), |j| j["status"] == "running").await;
    let big = json!({"title": "big", "paragraphs": ["x".repeat(3000)]});
    let first = app.submit_pdf(&big).await;
    app.post_json("/generate-pdf", &big).await.assert_error(503, "overloaded");
    app.delete(&format!("/jobs/{}", id_of(&blocker))).await;
    assert_eq!(app.wait_finished(id_of(&first)).await["status"], "succeeded");
}

#[actix_web::test]
async fn a_request_larger_than_the_limits_allow_at_all_is_413_not_a_retry_later() {
    let mut s = one_worker();
    s.admission.max_queued_bytes = "4KiB".parse().unwrap();
    s.admission.max_pending = 2;
    let app = spawn_app_with(s).await;
    // Nothing else is queued: these can never fit, so "retry later" would be a lie.
    let huge = json!({"title": "huge", "paragraphs": ["x".repeat(5000)]});
    let message = app.post_json("/generate-pdf", &huge).await.assert_error(413, "payload_too_large");
    assert!(message.contains("never"), "{message}");
    let png = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(4, 4).write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let three: Vec<Part> = (0..3).map(|i| Part::file(&format!("{i}.png"), "image/png", png.clone())).collect();
    app.upload(&three).await.assert_error(413, "payload_too_large");
    // What fits still goes in.
    let two: Vec<Part> = (0..2).map(|i| Part::file(&format!("{i}.png"), "image/png", png.clone())).collect();
    assert_eq!(app.upload(&two).await.status.as_u16(), 202);
}

#[actix_web::test]
async fn a_panicking_job_fails_alone_and_the_pool_keeps_its_strength() {
    let app = spawn_app_with(one_worker()).await;
    for _ in 0..3 {
        let bad = app.submit_pdf(&json!({"title": "boom", "test_hook": "panic"})).await;
        let failed = app.wait_finished(id_of(&bad)).await;
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["error"]["code"], "worker_panic");
        assert!(failed.get("result").is_none());
    }
    // The single worker thread survived all three panics.
    let good = app.submit_pdf(&json!({"title": "fine"})).await;
    assert_eq!(app.wait_finished(id_of(&good)).await["status"], "succeeded");
    assert_eq!(app.get("/readyz").await.status.as_u16(), 200);
}

#[actix_web::test]
async fn a_job_past_its_deadline_fails_with_timeout_and_frees_its_worker() {
    let mut s = one_worker();
    s.workers.job_timeout = duration(Duration::from_millis(300));
    let app = spawn_app_with(s).await;
    let stuck = app.submit_pdf(&json!({"title": "stuck", "test_hook": "hang"})).await;
    let failed = app.wait_finished(id_of(&stuck)).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "timeout");
    let next = app.submit_pdf(&json!({"title": "next"})).await;
    assert_eq!(app.wait_finished(id_of(&next)).await["status"], "succeeded");
}

#[actix_web::test]
async fn a_cancelled_queued_job_never_starts() {
    let app = spawn_app_with(one_worker()).await;
    let blocker = app.submit_pdf(&json!({"title": "blocker", "test_hook": "hang"})).await;
    app.wait_for(id_of(&blocker), Duration::from_secs(10), |j| j["status"] == "running").await;
    let waiting = app.submit_pdf(&json!({"title": "waiting"})).await;
    let cancelled = app.delete(&format!("/jobs/{}", id_of(&waiting))).await;
    assert_eq!(cancelled.status.as_u16(), 200);
    assert_eq!(cancelled.json()["status"], "cancelled");

    app.delete(&format!("/jobs/{}", id_of(&blocker))).await;
    let later = app.submit_pdf(&json!({"title": "later"})).await;
    assert_eq!(app.wait_finished(id_of(&later)).await["status"], "succeeded");
    // The worker ran `later` after the blocker stopped; `waiting` was skipped, never started.
    let waiting = app.job(id_of(&waiting)).await;
    assert_eq!(waiting["status"], "cancelled");
    assert!(waiting["started_at"].is_null(), "{waiting}");
    app.delete(&format!("/jobs/{}", id_of(&waiting))).await.assert_error(409, "job_finished");
}

#[actix_web::test]
async fn a_cancelled_running_job_stops_at_its_next_page() {
    let app = spawn_app_with(one_worker()).await;
    // About 100 pages at 100 ms each: ten seconds if it were not stopped.
    let mut spec = crate::helpers::report(4000);
    spec["test_hook"] = json!({"slow_pages": {"millis": 100}});
    let long = app.submit_pdf(&spec).await;
    app.wait_for(id_of(&long), Duration::from_secs(10), |j| j["progress"].as_f64().unwrap() > 0.05).await;
    let reply = app.delete(&format!("/jobs/{}", id_of(&long))).await;
    assert_eq!(reply.json()["status"], "cancelled");
    let progress_at_cancel = reply.json()["progress"].as_f64().unwrap();
    assert!(progress_at_cancel > 0.0 && progress_at_cancel < 1.0);
    // With one worker, this only runs once the cancelled job has let go of it.
    let next = app.submit_pdf(&json!({"title": "next"})).await;
    app.wait_for(id_of(&next), Duration::from_secs(3), |j| j["status"] == "succeeded").await;
    let long = app.job(id_of(&long)).await;
    assert_eq!(long["status"], "cancelled");
    assert_eq!(long["progress"].as_f64().unwrap(), progress_at_cancel, "a cancelled job keeps its last progress");
}

#[actix_web::test]
async fn finished_jobs_expire_after_the_ttl() {
    let mut s = settings();
    s.store.result_ttl = duration(Duration::from_millis(300));
    let app = spawn_app_with(s).await;
    let job = app.submit_pdf(&json!({"title": "short-lived"})).await;
    assert_eq!(app.wait_finished(id_of(&job)).await["status"], "succeeded");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reply = app.get(&format!("/jobs/{}", id_of(&job))).await;
        if reply.status.as_u16() == 404 {
            reply.assert_error(404, "job_not_found");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "job still there after its TTL");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    app.get(&format!("/jobs/{}/result", id_of(&job))).await.assert_error(404, "job_not_found");
}

/// The result budget of each store: `--result-memory` in memory, `--result-disk` on disk.
fn with_result_budget(store: StoreKind, budget: &str) -> offload::configuration::Settings {
    let mut s = one_worker();
    s.store.store = store;
    match store {
        StoreKind::Memory => s.store.result_memory = budget.parse().unwrap(),
        StoreKind::Sqlite | StoreKind::Postgres => s.store.result_disk = budget.parse().unwrap(),
    }
    s
}

#[actix_web::test]
async fn stored_results_are_bounded_by_evicting_the_oldest_in_either_store() {
    for store in [StoreKind::Memory, StoreKind::Sqlite] {
        let app = spawn_app_with(with_result_budget(store, "8KiB")).await;
        let mut jobs = Vec::new();
        for n in 0..12 {
            let job = app.submit_pdf(&json!({"title": format!("doc {n}")})).await;
            let done = app.wait_finished(id_of(&job)).await;
            assert_eq!(done["status"], "succeeded", "{store:?}: {done}");
            jobs.push(id_of(&job).to_string());
        }
        let mut kept = 0;
        for id in &jobs {
            let reply = app.get(&format!("/jobs/{id}/result")).await;
            if reply.status.as_u16() == 200 {
                kept += reply.body.len();
            }
        }
        assert!(kept <= 8 * 1024, "{store:?}: {kept} result bytes kept");
        let newest = app.get(&format!("/jobs/{}/result", jobs[11])).await;
        assert_eq!(newest.status.as_u16(), 200, "{store:?}: the newest result is kept");
        let oldest = app.get(&format!("/jobs/{}", jobs[0])).await;
        assert_eq!(oldest.status.as_u16(), 404, "{store:?}: the oldest was evicted");

        let app = spawn_app_with(with_result_budget(store, "100B")).await;
        let job = app.submit_pdf(&json!({"title": "too big to keep"})).await;
        let failed = app.wait_finished(id_of(&job)).await;
        assert_eq!(failed["status"], "failed", "{store:?}");
        assert_eq!(failed["error"]["code"], "result_too_large", "{store:?}");
    }
}

/// (nice value, scheduling policy) of each of this process's threads (the test and the app
/// share the process).
fn thread_priorities() -> Vec<(i64, i64)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces) start after the last ')',
            // with field 3 of proc_pid_stat(5): field 19 is nice, field 41 the policy.
            let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
            Some((fields.get(19 - 3)?.parse().ok()?, fields.get(41 - 3)?.parse().ok()?))
        })
        .collect()
}

#[actix_rt::test]
async fn worker_threads_run_at_a_lower_priority() {
    const SCHED_OTHER: i64 = 0;
    const SCHED_IDLE: i64 = 5;
    for (sched, policy) in [(WorkerSched::Normal, SCHED_OTHER), (WorkerSched::Idle, SCHED_IDLE)] {
        let mut s = crate::helpers::settings();
        s.workers.worker_nice = 7;
        s.workers.worker_sched = sched;
        s.workers.pdf_workers = Some(2);
        s.workers.image_workers = Some(1);
        let app = crate::helpers::spawn_app_with(s).await;
        let job = app.submit_pdf(&crate::helpers::report(1)).await;
        app.wait_finished(crate::helpers::id_of(&job)).await;
        // Pool threads start on their own; give them a moment, then expect exactly three. Each
        // case's app is dropped before the next starts, but its threads may linger: count only
        // threads at this case's (nice, policy).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let lowered = loop {
            let lowered = thread_priorities().iter().filter(|&&p| p == (7, policy)).count();
            if lowered >= 3 || std::time::Instant::now() > deadline {
                break lowered;
            }
            actix_rt::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(lowered, 3, "{sched:?}: two PDF and one image worker threads at nice 7, policy {policy}");
    }
}
