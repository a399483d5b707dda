//! Durability of the embedded store, against the real binary: `kill -9` and restarts on the same
//! data directory, SIGTERM with a long queue, a job that crashes the process, idempotency keys,
//! webhooks pending at a crash, a second process on the same directory, and failing writes.
//!
//! Every test runs the binary with its own temporary `--data-dir`.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};

use crate::helpers::{id_of, multipart, poll_until, report, Behaviour, Part, Receiver, Reply, TestApp, BOUNDARY};
use crate::process::{Outcome, Process, Spawned};

/// One service: a fresh data directory and the flags every start of it uses.
struct Service {
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Service {
    /// A service with two PDF workers unless `args` says otherwise.
    fn new(args: &[&str]) -> Service {
        let mut all: Vec<String> = Vec::new();
        if !args.contains(&"--pdf-workers") {
            all.extend(["--pdf-workers".to_string(), "2".to_string()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        Service { dir: tempfile::tempdir().expect("temporary data dir"), args: all }
    }

    fn args(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }

    /// Starts the binary on this data directory and waits until it listens.
    fn start(&self) -> Process {
        crate::process::start(self.dir.path(), &self.args())
    }

    /// Starts the binary on this data directory without waiting.
    fn spawn(&self) -> Spawned {
        crate::process::spawn(self.dir.path(), &self.args())
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A one-page document whose page takes `millis` to build.
fn slow(title: &str, millis: u64) -> Value {
    json!({"title": title, "test_hook": {"slow_pages": {"millis": millis}}})
}

async fn submit(app: &TestApp, spec: &Value) -> String {
    id_of(&app.submit_pdf(spec).await).to_string()
}

/// How many jobs the service holds, all statuses together.
async fn job_count(app: &TestApp) -> u64 {
    let list = app.get("/jobs").await;
    assert_eq!(list.status.as_u16(), 200, "{}", String::from_utf8_lossy(&list.body));
    let counts = list.json()["counts"].clone();
    counts.as_object().expect("counts").values().map(|n| n.as_u64().expect("a count")).sum()
}

fn is_finished(job: &Value) -> bool {
    matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

/// Waits (one deadline for all) until every job has ended, and asserts each succeeded.
async fn assert_all_succeed(app: &TestApp, ids: &[String], within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut jobs = Vec::with_capacity(ids.len());
    for id in ids {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let job = app.wait_for(id, left, is_finished).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        jobs.push(job);
    }
    jobs
}

fn attempts(job: &Value) -> u64 {
    job["attempts"].as_u64().unwrap_or_else(|| panic!("no integer `attempts`: {job}"))
}

/// A result as downloaded, with the job's `finished_at` at that time.
struct Downloaded {
    id: String,
    finished_at: Value,
    content_type: Option<String>,
    bytes: bytes::Bytes,
}

async fn download(app: &TestApp, id: &str) -> Downloaded {
    let job = app.job(id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["finished_at"].is_string(), "{job}");
    let result = app.get(&format!("/jobs/{id}/result")).await;
    assert_eq!(result.status.as_u16(), 200, "{}", String::from_utf8_lossy(&result.body));
    assert!(!result.body.is_empty());
    Downloaded {
        id: id.to_string(),
        finished_at: job["finished_at"].clone(),
        content_type: result.header("content-type"),
        bytes: result.body,
    }
}

/// The job still says it finished when it did, and its result is the same bytes.
async fn assert_same_result(app: &TestApp, before: &Downloaded) {
    let job = app.job(&before.id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["finished_at"], before.finished_at, "finished_at changed: {job}");
    let result = app.get(&format!("/jobs/{}/result", before.id)).await;
    assert_eq!(result.status.as_u16(), 200, "{}", String::from_utf8_lossy(&result.body));
    assert_eq!(result.header("content-type"), before.content_type);
    let (now, was) = (result.body.len(), before.bytes.len());
    assert!(result.body == before.bytes, "the result of {} changed ({now} bytes, was {was})", before.id);
}

#[actix_web::test]
async fn every_job_accepted_before_kill_9_exists_after_restart_and_succeeds() {
    let service = Service::new(&[]);
    let mut p = service.start();
    // Both workers busy for a while, and a queue behind them.
    let running = vec![
        submit(&p.app, &slow("running at the kill", 1500)).await,
        submit(&p.app, &slow("also running at the kill", 1500)).await,
    ];
    let mut queued = Vec::new();
    for n in 0..20 {
        queued.push(submit(&p.app, &report(1 + n % 5 * 10)).await);
    }
    for id in &running {
        let job = p.app.wait_for(id, Duration::from_secs(10), |j| j["status"] != "queued").await;
        assert_eq!(job["status"], "running", "the slow job must still run at the kill: {job}");
        assert_eq!(attempts(&job), 1, "{job}");
    }
    p.kill9();

    let p = service.start();
    for id in running.iter().chain(&queued) {
        p.app.job(id).await; // 200: it exists
    }
    let all: Vec<String> = running.iter().chain(&queued).cloned().collect();
    let jobs = assert_all_succeed(&p.app, &all, Duration::from_secs(30)).await;
    for job in &jobs[..2] {
        assert_eq!(attempts(job), 2, "a job running at the kill is started again: {job}");
    }
    for job in &jobs[2..] {
        // None of these had reached a worker (both were busy): being handed to a pool is not a start.
        assert_eq!(attempts(job), 1, "a job still queued at the kill is started once: {job}");
    }
    assert_eq!(job_count(&p.app).await, all.len() as u64);
}

#[actix_web::test]
async fn a_result_downloaded_before_kill_9_is_byte_identical_after_restart_with_the_same_finished_at() {
    let service = Service::new(&[]);
    let mut p = service.start();
    let pdf = submit(&p.app, &report(80)).await;
    let image = p.app.submit_images(&[Part::file("a.png", "image/png", crate::images::png(64, 48))]).await;
    let image = id_of(&image[0]).to_string();
    assert_all_succeed(&p.app, &[pdf.clone(), image.clone()], Duration::from_secs(30)).await;
    let before = [download(&p.app, &pdf).await, download(&p.app, &image).await];
    assert!(before[0].bytes.starts_with(b"%PDF-"));
    let jobs_before = [p.app.job(&pdf).await, p.app.job(&image).await];
    p.kill9();

    let p = service.start();
    for (d, job_before) in before.iter().zip(&jobs_before) {
        assert_same_result(&p.app, d).await;
        let job = p.app.job(&d.id).await;
        assert_eq!(job["result"], job_before["result"], "the result's description is unchanged");
        assert_eq!(job["attempts"], job_before["attempts"], "a finished job is not run again");
    }
}

#[actix_web::test]
async fn sigterm_with_a_long_queue_keeps_unfinished_jobs_queued_exits_zero_and_they_succeed_after_restart() {
    let service = Service::new(&["--shutdown-grace", "3s"]);
    let mut p = service.start();
    // 40 jobs of 300 ms on 2 workers: 6 s of work, twice the grace period.
    let mut ids = Vec::new();
    for n in 0..40 {
        ids.push(submit(&p.app, &slow(&format!("job {n}"), 300)).await);
    }
    let newest = ids.last().unwrap().clone();
    let running: Vec<String> = poll_until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        || p.app.get("/jobs?status=running"),
        |r| r.json()["jobs"].as_array().unwrap().len() == 2,
        |r| format!("running jobs {}", r.json()),
    )
    .await
    .json()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| id_of(j).to_string())
        .collect();

    p.sigterm();
    let waiting = p.app.job(&newest).await;
    assert_eq!(waiting["status"], "queued", "while draining, the queue waits: {waiting}");
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}\n{}", p.output_after_exit());
    drop(p);
    // A clean exit leaves the WAL copied back and empty.
    let wal = std::fs::metadata(service.dir.path().join("offload.db-wal")).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "offload.db-wal after a clean exit");

    let p = service.start();
    // Right after the restart nothing has failed and the newest job still waits its turn.
    let list = p.app.get("/jobs").await.json();
    assert_eq!(list["counts"]["failed"], 0, "{list}");
    assert_eq!(list["counts"]["cancelled"], 0, "{list}");
    let waiting = p.app.job(&newest).await;
    assert_eq!(waiting["status"], "queued", "unfinished jobs stay queued across a SIGTERM: {waiting}");
    assert_eq!(attempts(&waiting), 0, "never started: {waiting}");
    // The jobs running at the signal got the grace period and finished in the first process.
    for id in &running {
        let job = p.app.job(id).await;
        assert_eq!(job["status"], "succeeded", "a running job finishes within the grace: {job}");
        assert_eq!(attempts(&job), 1, "{job}");
    }
    assert_all_succeed(&p.app, &ids, Duration::from_secs(30)).await;
}

/// Waits for a process that is expected to crash, whether or not it got to listen first.
async fn expect_crash(spawned: Spawned) {
    let (status, output) = match spawned.wait_listening(Duration::from_secs(20)) {
        Outcome::Listening(mut p) => {
            let status = p.wait_exit(Duration::from_secs(20)).await;
            (status, p.output_after_exit())
        }
        Outcome::Exited { status, output } => (status, output),
    };
    assert!(!status.success(), "the poison job should have crashed the process, which exited {status}:\n{output}");
}

#[actix_web::test]
async fn a_job_that_crashes_the_process_fails_with_worker_lost_after_max_attempts_and_the_service_keeps_serving() {
    // One worker, and a slow job ahead of the poison so that its 202 arrives before the crash.
    let service = Service::new(&["--max-attempts", "2", "--pdf-workers", "1"]);
    let mut p = service.start();
    let ahead = submit(&p.app, &slow("ahead of the poison", 300)).await;
    let poison = submit(&p.app, &json!({"title": "x", "test_hook": "abort"})).await;
    // Start 1: the process dies while the job runs.
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the poison job should have crashed the process, which exited {status}");
    drop(p);
    // Start 2, after the restart: it runs again and crashes the process again.
    expect_crash(service.spawn()).await;
    // Attempts are used up: the third process fails the job instead of running it.
    let p = service.start();
    let job = p.app.wait_for(&poison, Duration::from_secs(10), is_finished).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "worker_lost", "{job}");
    assert_eq!(attempts(&job), 2, "{job}");
    // The job ahead exists (whether its end was committed before the first crash is not ours to say).
    p.app.job(&ahead).await;
    let normal = submit(&p.app, &report(3)).await;
    assert_all_succeed(&p.app, &[normal], Duration::from_secs(20)).await;
    let ready = p.app.get("/readyz").await;
    assert_eq!(ready.status.as_u16(), 200, "{}", String::from_utf8_lossy(&ready.body));
}

#[actix_web::test]
async fn a_job_running_beside_a_poison_job_is_rerun_alone_and_succeeds() {
    // Two workers: an innocent slow job runs while the poison aborts the process. After the
    // restart both were cut off; each reruns alone, so the innocent one succeeds and only the
    // poison uses up its attempts.
    let service = Service::new(&["--max-attempts", "2", "--pdf-workers", "2"]);
    let mut p = service.start();
    let innocent = submit(&p.app, &slow("beside the poison", 400)).await;
    p.app.wait_for(&innocent, Duration::from_secs(10), |j| j["status"] == "running").await;
    // The poison may take the process down before its 202 is on the wire (a free worker starts
    // it at once): whatever the answer, it was committed first; its id is read after the restart.
    let url = p.app.url("/generate-pdf");
    let _ = p.app.client.post(url).send_json(&json!({"title": "x", "test_hook": "abort"})).await;
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the poison job should have crashed the process, which exited {status}");
    drop(p);
    // Start 2: the innocent job (older) runs alone and succeeds; then the poison, alone, crashes.
    expect_crash(service.spawn()).await;
    let p = service.start();
    let listed = p.app.get("/jobs").await.json();
    let others: Vec<String> =
        listed["jobs"].as_array().unwrap().iter().map(|j| id_of(j).to_string()).filter(|id| *id != innocent).collect();
    assert_eq!(others.len(), 1, "the innocent job and the poison: {listed}");
    let poison = others[0].clone();
    let job = p.app.wait_for(&poison, Duration::from_secs(10), is_finished).await;
    assert_eq!((job["status"].as_str(), job["error"]["code"].as_str()), (Some("failed"), Some("worker_lost")), "{job}");
    let innocent = p.app.wait_for(&innocent, Duration::from_secs(10), is_finished).await;
    assert_eq!(innocent["status"], "succeeded", "{innocent}");
    assert_eq!(attempts(&innocent), 2, "cut off once by the poison, then run alone: {innocent}");
}

const JSON: (&str, &[u8]) = ("content-type", b"application/json");

async fn post_pdf_with_key(app: &TestApp, key: &[u8], spec: &Value) -> Reply {
    let headers = [JSON, ("idempotency-key", key)];
    app.request_with_headers("POST", "/generate-pdf", &headers, serde_json::to_vec(spec).unwrap()).await
}

async fn post_images_with_key(app: &TestApp, key: &[u8], parts: &[Part]) -> Reply {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let headers = [("content-type", ct.as_bytes()), ("idempotency-key", key)];
    app.request_with_headers("POST", "/images", &headers, multipart(parts)).await
}

/// The job ids of a 202 to `POST /generate-pdf` (one job) or `POST /images` (`jobs`).
fn accepted_ids(reply: &Reply) -> Vec<String> {
    assert_eq!(reply.status.as_u16(), 202, "{}", String::from_utf8_lossy(&reply.body));
    let body = reply.json();
    match body.get("jobs") {
        Some(jobs) => jobs.as_array().unwrap().iter().map(|j| id_of(j).to_string()).collect(),
        None => vec![id_of(&body).to_string()],
    }
}

fn replayed(reply: &Reply) -> bool {
    reply.header("idempotent-replayed").as_deref() == Some("true")
}

fn two_images() -> Vec<Part> {
    vec![
        Part::file("a.png", "image/png", crate::images::png(32, 24)),
        Part::file("b.png", "image/png", crate::images::png(16, 16)),
    ]
}

#[actix_web::test]
async fn repeating_a_request_with_the_same_idempotency_key_replays_the_first_answer_without_a_new_job() {
    let service = Service::new(&[]);
    let p = service.start();
    let app = &p.app;

    let first = post_pdf_with_key(app, b"pdf-key-1", &report(3)).await;
    let id = accepted_ids(&first);
    assert!(!replayed(&first), "the first request is not a replay");
    let count = job_count(app).await;
    let again = post_pdf_with_key(app, b"pdf-key-1", &report(3)).await;
    assert_eq!(accepted_ids(&again), id);
    assert!(replayed(&again), "header Idempotent-Replayed: true");
    assert_eq!(job_count(app).await, count, "no new job");

    let first = post_images_with_key(app, b"images-key-1", &two_images()).await;
    let ids = accepted_ids(&first);
    assert_eq!(ids.len(), 2);
    assert!(!replayed(&first));
    let count = job_count(app).await;
    let again = post_images_with_key(app, b"images-key-1", &two_images()).await;
    assert_eq!(accepted_ids(&again), ids);
    assert!(replayed(&again), "header Idempotent-Replayed: true");
    assert_eq!(job_count(app).await, count, "no new jobs");

    // Without a key the same body is a new job.
    submit(app, &report(3)).await;
    assert_eq!(job_count(app).await, count + 1);
}

#[actix_web::test]
async fn an_idempotency_key_reused_with_a_different_body_is_refused_with_422() {
    let service = Service::new(&[]);
    let p = service.start();
    let app = &p.app;

    let first = accepted_ids(&post_pdf_with_key(app, b"reused-pdf", &report(3)).await);
    let other = post_pdf_with_key(app, b"reused-pdf", &report(4)).await;
    other.assert_error(422, "idempotency_key_reused");
    assert!(!replayed(&other));
    let images = accepted_ids(&post_images_with_key(app, b"reused-images", &two_images()).await);
    let other_images = [Part::file("c.png", "image/png", crate::images::png(24, 32))];
    let other = post_images_with_key(app, b"reused-images", &other_images).await;
    other.assert_error(422, "idempotency_key_reused");
    assert_eq!(job_count(app).await, 3, "one PDF and two images, nothing from the refused requests");

    // The key still replays its own request.
    assert_eq!(accepted_ids(&post_pdf_with_key(app, b"reused-pdf", &report(3)).await), first);
    assert_eq!(accepted_ids(&post_images_with_key(app, b"reused-images", &two_images()).await), images);
}

#[actix_web::test]
async fn idempotency_keys_must_be_1_to_255_visible_ascii_characters() {
    let service = Service::new(&[]);
    let p = service.start();
    let app = &p.app;
    let longest = "k".repeat(255);
    let too_long = "k".repeat(256);
    let cases: [(&str, &[u8], u16); 8] = [
        ("empty", b"", 400),
        ("256 characters", too_long.as_bytes(), 400),
        ("a space", b"with space", 400),
        ("a control character (tab)", b"tab\there", 400),
        ("non-ASCII", "cl\u{e9}".as_bytes(), 400),
        ("255 characters", longest.as_bytes(), 202),
        ("every visible punctuation", br##"!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~"##, 202),
        ("one character", b"x", 202),
    ];
    let mut accepted = 0;
    for (what, key, status) in cases {
        let reply = post_pdf_with_key(app, key, &json!({"title": "t"})).await;
        if status == 202 {
            assert_eq!(reply.status.as_u16(), 202, "{what}: {}", String::from_utf8_lossy(&reply.body));
            accepted += 1;
        } else {
            reply.expect_error(400, "invalid_header", what);
        }
    }
    let reply = post_images_with_key(app, b"with space", &two_images()).await;
    reply.expect_error(400, "invalid_header", "image upload with a space in the key");
    assert_eq!(job_count(app).await, accepted, "refused requests create no job");
}

#[actix_web::test]
async fn concurrent_requests_with_one_idempotency_key_create_one_job() {
    let service = Service::new(&[]);
    let p = service.start();
    let app = &p.app;
    let rounds = 5;
    for round in 0..rounds {
        let key = format!("race-{round}");
        let spec = report(round + 1);
        let replies = futures::future::join_all((0..4).map(|_| post_pdf_with_key(app, key.as_bytes(), &spec))).await;
        let ids: Vec<Vec<String>> = replies.iter().map(accepted_ids).collect();
        assert!(ids.iter().all(|i| *i == ids[0]), "round {round}: every answer names the one job: {ids:?}");
        let originals = replies.iter().filter(|r| !replayed(r)).count();
        assert_eq!(originals, 1, "round {round}: exactly one answer created the job, the others are replays");
    }
    assert_eq!(job_count(app).await, rounds as u64);
}

#[actix_web::test]
async fn an_idempotency_key_replays_the_same_job_after_kill_9_and_restart() {
    let service = Service::new(&[]);
    let mut p = service.start();
    let id = accepted_ids(&post_pdf_with_key(&p.app, b"across-restarts", &report(2)).await);
    p.kill9();

    let p = service.start();
    let again = post_pdf_with_key(&p.app, b"across-restarts", &report(2)).await;
    assert_eq!(accepted_ids(&again), id);
    assert!(replayed(&again), "header Idempotent-Replayed: true");
    post_pdf_with_key(&p.app, b"across-restarts", &report(5)).await.assert_error(422, "idempotency_key_reused");
    assert_eq!(job_count(&p.app).await, 1);
    assert_all_succeed(&p.app, &id, Duration::from_secs(20)).await;
}

#[actix_web::test]
async fn a_webhook_not_yet_delivered_at_kill_9_is_delivered_after_restart() {
    let receiver = Receiver::start(Behaviour { always_fail: true, fail_status: 503, ..Default::default() }).await;
    let service = Service::new(&["--allow-private-webhooks"]);
    let mut p = service.start();
    let mut spec = report(2);
    spec["callback_url"] = json!(format!("{}/hooks/offload", receiver.url));
    let id = submit(&p.app, &spec).await;
    // The first attempt is answered 503; the retry is due about a second later. Kill before it.
    receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await;
    p.kill9();
    let before = receiver.requests();
    assert_eq!(before.len(), 1, "the retry came before the kill; the test cannot tell anything");
    receiver.set_behaviour(Behaviour::default());

    let p = service.start();
    let requests = receiver.wait_until(Duration::from_secs(20), |r| r.iter().any(|x| x.status == 200)).await;
    let delivered = requests.iter().find(|r| r.status == 200).unwrap();
    let body = delivered.json();
    assert_eq!(body["id"], id.as_str(), "{body}");
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(delivered.header("x-offload-job-id").as_deref(), Some(id.as_str()));
    assert_eq!(body, p.app.job(&id).await, "the body is the job's final object");
}

#[actix_web::test]
async fn a_second_process_on_a_data_directory_in_use_exits_non_zero_and_the_first_keeps_serving() {
    let service = Service::new(&[]);
    let p = service.start();
    let before = submit(&p.app, &report(2)).await;

    let started = Instant::now();
    match service.spawn().wait_listening(Duration::from_secs(15)) {
        Outcome::Listening(_) => panic!("a second process started on a data directory in use"),
        Outcome::Exited { status, output } => {
            assert!(!status.success(), "exit status {status}:\n{output}");
            assert!(
                output.to_lowercase().contains("in use"),
                "the output should say the directory is in use:\n{output}"
            );
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10), "the second process took {:?} to give up", started.elapsed());

    let after = submit(&p.app, &report(2)).await;
    assert_all_succeed(&p.app, &[before, after], Duration::from_secs(20)).await;
    let ready = p.app.get("/readyz").await;
    assert_eq!(ready.status.as_u16(), 200, "{}", String::from_utf8_lossy(&ready.body));
}

#[actix_web::test]
async fn while_store_writes_fail_submissions_and_readiness_get_503_and_both_recover_when_writes_work_again() {
    let service = Service::new(&[]);
    let p = service.start();
    let app = &p.app;
    let done = submit(app, &report(2)).await;
    let done_job = assert_all_succeed(app, std::slice::from_ref(&done), Duration::from_secs(20)).await.remove(0);
    // Both workers busy and one job queued behind them when the writes start failing.
    let in_flight = [submit(app, &slow("running", 500)).await, submit(app, &slow("running too", 500)).await];
    let queued = submit(app, &report(3)).await;
    for id in &in_flight {
        app.wait_for(id, Duration::from_secs(10), |j| j["status"] == "running").await;
    }

    std::fs::write(service.file("fail-writes"), b"").unwrap();
    let refused = app.post_json("/generate-pdf", &json!({"title": "refused"})).await;
    refused.assert_error(503, "storage_unavailable");
    assert!(refused.header("retry-after").is_some(), "503 without Retry-After");
    let ready = poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || app.get("/readyz"),
        |r| r.status.as_u16() == 503,
        |r| format!("/readyz {} {}", r.status, String::from_utf8_lossy(&r.body)),
    )
    .await;
    ready.assert_error(503, "storage_unavailable");
    // Jobs accepted before keep their state and can be read.
    let still = app.job(&done).await;
    assert_eq!(still["status"], "succeeded", "{still}");
    assert_eq!(still["finished_at"], done_job["finished_at"]);
    let result = app.get(&format!("/jobs/{done}/result")).await;
    assert_eq!(result.status.as_u16(), 200);
    for id in in_flight.iter().chain([&queued]) {
        app.job(id).await;
    }
    // Let the running jobs end while the writes fail (bounded: however the service shows them
    // meanwhile, they must succeed once the writes work again).
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && app.job(&in_flight[1]).await["status"] == "running" {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    app.post_json("/generate-pdf", &json!({"title": "refused too"})).await.assert_error(503, "storage_unavailable");

    std::fs::remove_file(service.file("fail-writes")).unwrap();
    poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || app.get("/readyz"),
        |r| r.status.as_u16() == 200,
        |r| format!("/readyz {} {}", r.status, String::from_utf8_lossy(&r.body)),
    )
    .await;
    let after = submit(app, &report(2)).await;
    let all = [done, in_flight[0].clone(), in_flight[1].clone(), queued, after];
    assert_all_succeed(app, &all, Duration::from_secs(30)).await;
    assert_eq!(job_count(app).await, all.len() as u64, "the refused submissions created no job");
}

/// Submits small PDFs in a loop until `stop`, recording the id of every 202 and the status of
/// every other answer.
async fn submit_loop(
    base: String,
    client_no: usize,
    stop: Rc<Cell<bool>>,
    accepted: Rc<RefCell<Vec<String>>>,
) -> Vec<u16> {
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
    let url = format!("{base}/generate-pdf");
    let mut others = Vec::new();
    let mut n = 0;
    while !stop.get() {
        n += 1;
        let mut spec = report(1 + n % 7);
        spec["title"] = json!(format!("client {client_no} job {n}"));
        // An error is a request cut by the kill: it was not acknowledged, so it is not counted.
        if let Ok(mut res) = client.post(&url).send_json(&spec).await {
            let status = res.status().as_u16();
            match res.json::<Value>().await {
                Ok(job) if status == 202 => accepted.borrow_mut().push(id_of(&job).to_string()),
                Ok(_) => others.push(status),
                Err(_) => {} // the body was cut by the kill
            }
        }
    }
    others
}

#[actix_web::test]
async fn every_job_accepted_across_kill_9s_at_random_moments_succeeds_after_the_last_restart() {
    // A bounded queue keeps the backlog (and the test's time) small; 503s are fine.
    let service = Service::new(&["--max-pending", "256"]);
    let accepted = Rc::new(RefCell::new(Vec::<String>::new()));
    let mut downloads: Vec<Downloaded> = Vec::new();
    let kill_after: Vec<Duration> =
        (0..3).map(|_| Duration::from_millis(rand::rng().random_range(300..1500))).collect();
    for (cycle, after) in kill_after.iter().enumerate() {
        let mut p = service.start();
        let cycle_start = Instant::now();
        for d in &downloads {
            assert_same_result(&p.app, d).await;
        }
        let stop = Rc::new(Cell::new(false));
        let clients: Vec<_> = (0..4)
            .map(|c| actix_rt::spawn(submit_loop(p.app.address.clone(), c, stop.clone(), accepted.clone())))
            .collect();
        // One succeeded result of this cycle, to compare after the next restart.
        let newest_done = poll_until(
            Duration::from_secs(15),
            Duration::from_millis(10),
            || p.app.get("/jobs?status=succeeded&limit=1"),
            |r| r.status.as_u16() == 200 && !r.json()["jobs"].as_array().unwrap().is_empty(),
            |r| format!("cycle {cycle}: no succeeded job: {}", String::from_utf8_lossy(&r.body)),
        )
        .await;
        let id = id_of(&newest_done.json()["jobs"][0]).to_string();
        downloads.push(download(&p.app, &id).await);
        // The kill comes at the random instant (or now, if the download took longer).
        actix_rt::time::sleep((cycle_start + *after).saturating_duration_since(Instant::now())).await;
        p.kill9();
        stop.set(true);
        for c in clients {
            let others = c.await.unwrap();
            assert!(others.iter().all(|s| [429, 503].contains(s)), "cycle {cycle}: unexpected answers {others:?}");
        }
    }

    let p = service.start();
    for d in &downloads {
        assert_same_result(&p.app, d).await;
    }
    let ids = accepted.borrow().clone();
    assert!(!ids.is_empty(), "no submission was accepted");
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an id was handed out twice");
    let jobs = assert_all_succeed(&p.app, &ids, Duration::from_secs(60)).await;
    for job in &jobs {
        assert!(attempts(job) >= 1, "{job}");
    }
}
