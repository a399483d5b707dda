//! Graceful shutdown, against the real binary and a real SIGTERM.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{id_of, report};
use crate::process::{start, Process};

/// Starts `offload` with one PDF worker and its own data directory (kept alive by the caller).
fn start_in(dir: &tempfile::TempDir, args: &[&str]) -> Process {
    let mut all = vec!["--pdf-workers", "1"];
    all.extend_from_slice(args);
    start(dir.path(), &all)
}

#[actix_web::test]
async fn sigterm_drains_running_jobs_refuses_new_ones_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start_in(&dir, &["--shutdown-grace", "20s"]);
    let app = &p.app;
    let mut spec = report(600);
    spec["test_hook"] = json!({"slow_pages": {"millis": 60}});
    let running = app.submit_pdf(&spec).await;
    let id = id_of(&running).to_string();
    app.wait_for(&id, Duration::from_secs(10), |j| j["status"] == "running").await;

    p.sigterm();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = app.get("/readyz").await;
        if ready.status.as_u16() == 503 {
            ready.assert_error(503, "draining");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = app.post_json("/generate-pdf", &json!({"title": "too late"})).await;
    refused.assert_error(503, "shutting_down");
    assert!(refused.header("retry-after").is_some());

    // The running job can still be followed while draining...
    let still = app.job(&id).await;
    assert_eq!(still["status"], "running", "{still}");
    // ...and it runs to the end before the process exits 0.
    let status = p.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    p.output_after_exit();
    let log = p.take_log();
    let finished = log.iter().find(|l| l.contains("job finished") && l.contains(&id));
    let finished = finished.unwrap_or_else(|| panic!("no `job finished` line for {id} in {log:#?}"));
    assert!(finished.contains("succeeded"), "{finished}");
}

#[actix_web::test]
async fn after_the_grace_period_unfinished_jobs_are_stopped_and_the_process_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start_in(&dir, &["--shutdown-grace", "300ms"]);
    let stuck = p.app.submit_pdf(&json!({"title": "never ends", "test_hook": "hang"})).await;
    p.app.wait_for(id_of(&stuck), Duration::from_secs(10), |j| j["status"] == "running").await;
    let started = Instant::now();
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() >= Duration::from_millis(300), "exited before the grace period");
}
