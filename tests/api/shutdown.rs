//! Graceful shutdown, against the real binary and a real SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{id_of, report, TestApp};

struct Process {
    child: Child,
    app: TestApp,
    /// Every log line the process writes after the `listening on` line.
    log: mpsc::Receiver<String>,
}

/// Starts `offload` on port 0 and reads the bound address from its log.
fn start(args: &[&str]) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["--bind", "127.0.0.1:0", "--pdf-workers", "1"])
        .args(args)
        .env("OFFLOAD_STATIC_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/static"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start offload");
    let (tx, log) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = loop {
        let line =
            log.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("no `listening on` log line");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.chars().take_while(|c| !c.is_whitespace()).collect::<String>();
        }
    };
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
    Process { child, app: TestApp { address: format!("http://{addr}"), client }, log }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

async fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("offload did not exit within {within:?}");
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn sigterm_drains_running_jobs_refuses_new_ones_and_exits_zero() {
    let mut p = start(&["--shutdown-grace", "20s"]);
    let app = &p.app;
    let mut spec = report(600);
    spec["test_hook"] = json!({"slow_pages": {"millis": 60}});
    let running = app.submit_pdf(&spec).await;
    let id = id_of(&running).to_string();
    app.wait_for(&id, Duration::from_secs(10), |j| j["status"] == "running").await;

    sigterm(&p.child);
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
    let status = wait_exit(&mut p.child, Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    let log: Vec<String> = p.log.try_iter().collect();
    let finished = log.iter().find(|l| l.contains("job finished") && l.contains(&id));
    let finished = finished.unwrap_or_else(|| panic!("no `job finished` line for {id} in {log:#?}"));
    assert!(finished.contains("succeeded"), "{finished}");
}

#[actix_web::test]
async fn after_the_grace_period_unfinished_jobs_are_stopped_and_the_process_exits_zero() {
    let mut p = start(&["--shutdown-grace", "300ms"]);
    let stuck = p.app.submit_pdf(&json!({"title": "never ends", "test_hook": "hang"})).await;
    p.app.wait_for(id_of(&stuck), Duration::from_secs(10), |j| j["status"] == "running").await;
    let started = Instant::now();
    sigterm(&p.child);
    let status = wait_exit(&mut p.child, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() >= Duration::from_millis(300), "exited before the grace period");
}
