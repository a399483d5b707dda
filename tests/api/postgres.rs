//! The PostgreSQL store, against a real server (the store itself is being built: issue 12).

use std::time::Duration;

use offload::configuration::StoreKind;
use offload::store::postgres::schema::{migrate, version, SCHEMA_VERSION};
use serde_json::json;

use crate::helpers::{duration, id_of, report, settings, spawn_app_with, TestApp};
use crate::pg::Postgres;

#[actix_web::test]
async fn instances_starting_together_migrate_the_schema_once() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(pg.connect(&url).await);
    }
    // Three migrations at once, as three instances starting together would run them.
    let runs = clients.into_iter().map(|mut c| async move { migrate(&mut c).await.map(|()| c) });
    let done = futures::future::join_all(runs).await;
    let clients: Vec<_> = done.into_iter().map(|r| r.expect("every migration succeeds")).collect();
    assert_eq!(version(&clients[0]).await.unwrap(), SCHEMA_VERSION);
    let tables: i64 = clients[0]
        .query_one("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'offload_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 6, "jobs, payloads, results, webhooks, idempotency, schema");
    let rows: i64 = clients[0].query_one("SELECT count(*) FROM offload_schema", &[]).await.unwrap().get(0);
    assert_eq!(rows, 1, "one version row");
    // Migrating again changes nothing.
    let mut again = pg.connect(&url).await;
    migrate(&mut again).await.unwrap();
    assert_eq!(version(&again).await.unwrap(), SCHEMA_VERSION);
}

#[actix_web::test]
async fn a_database_from_a_newer_release_is_refused() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let mut client = pg.connect(&url).await;
    migrate(&mut client).await.unwrap();
    client.execute("UPDATE offload_schema SET version = $1", &[&(SCHEMA_VERSION + 1)]).await.unwrap();
    let err = migrate(&mut client).await.unwrap_err();
    assert!(err.contains("newer than this binary"), "{err}");
    assert_eq!(version(&client).await.unwrap(), SCHEMA_VERSION + 1, "left as it was");
}

/// Test settings on the PostgreSQL database at `url`.
fn pg_settings(url: &str) -> offload::configuration::Settings {
    let mut s = settings();
    s.store.store = StoreKind::Postgres;
    s.store.database_url = Some(url.parse().unwrap());
    s
}

/// An in-process instance on `url`.
async fn instance(url: &str, lease: Duration) -> TestApp {
    let mut s = pg_settings(url);
    s.store.lease = duration(lease);
    spawn_app_with(s).await
}

fn slow(title: &str, millis: u64) -> serde_json::Value {
    json!({"title": title, "paragraphs": ["p\n".repeat(150)], "test_hook": {"slow_pages": {"millis": millis}}})
}

async fn post_with_key(app: &TestApp, key: &[u8]) -> crate::helpers::Reply {
    let headers: [(&str, &[u8]); 2] = [("content-type", b"application/json"), ("idempotency-key", key)];
    app.request_with_headers("POST", "/generate-pdf", &headers, br#"{"title": "once"}"#.to_vec()).await
}

async fn in_flight(app: &TestApp) -> f64 {
    app.metrics().await.value("offload_pool_in_flight_jobs", &[("pool", "pdf")])
}

async fn succeeded_here(app: &TestApp) -> f64 {
    app.metrics().await.value("offload_jobs_finished_total", &[("kind", "pdf"), ("status", "succeeded")])
}

#[actix_web::test]
async fn a_job_on_postgres_runs_and_its_result_downloads_and_lists() {
    let pg = Postgres::get();
    let app = instance(&pg.fresh_database().await, Duration::from_secs(30)).await;
    let job = app.submit_pdf(&report(40)).await;
    let done = app.wait_finished(id_of(&job)).await;
    assert_eq!((done["status"].as_str(), done["attempts"].as_u64()), (Some("succeeded"), Some(1)), "{done}");
    let pdf = app.get(&format!("/jobs/{}/result", id_of(&job))).await;
    assert_eq!(pdf.status, 200);
    assert!(pdf.body.starts_with(b"%PDF-"));
    let listed = app.get("/jobs").await.json();
    assert_eq!(listed["jobs"][0]["id"], job["id"]);
    crate::helpers::poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async { app.get("/jobs?limit=1").await.json() },
        |l| l["counts"]["succeeded"] == 1,
        |l| l.to_string(),
    )
    .await;
    // A cancel of a queued job, and of one that ended.
    let hung = app.submit_pdf(&json!({"title": "hang", "test_hook": "hang"})).await;
    let cancelled = app.delete(&format!("/jobs/{}", id_of(&hung))).await;
    assert_eq!(cancelled.json()["status"], "cancelled");
    app.delete(&format!("/jobs/{}", id_of(&job))).await.assert_error(409, "job_finished");
}

#[actix_web::test]
async fn two_instances_are_one_service_and_share_the_work() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let (a, b) = (instance(&url, Duration::from_secs(30)).await, instance(&url, Duration::from_secs(30)).await);
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(id_of(&a.submit_pdf(&slow(&format!("job {i}"), 150)).await).to_string());
    }
    for id in &ids {
        // Read on the other instance.
        let done = b.wait_for(id, Duration::from_secs(60), |j| j["status"] == "succeeded").await;
        assert_eq!(done["attempts"], 1, "{done}");
    }
    // Counted when the ending instance has the end's answer, a moment after readers see it.
    let (on_a, on_b) = crate::helpers::poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async { (succeeded_here(&a).await, succeeded_here(&b).await) },
        |(on_a, on_b)| on_a + on_b >= 12.0,
        |counts| format!("ended on (A, B): {counts:?}"),
    )
    .await;
    assert_eq!(on_a + on_b, 12.0, "every job ended once");
    assert!(on_b >= 1.0, "B took some of A's queue: A {on_a}, B {on_b}");
    // The same bytes from either instance.
    let (from_a, from_b) =
        (a.get(&format!("/jobs/{}/result", ids[0])).await.body, b.get(&format!("/jobs/{}/result", ids[0])).await.body);
    assert_eq!(from_a, from_b);
    // A key used on one instance replays on the other.
    let first = post_with_key(&a, b"shared-1").await;
    let again = post_with_key(&b, b"shared-1").await;
    assert_eq!((first.status.as_u16(), again.status.as_u16()), (202, 202));
    assert_eq!(id_of(&first.json()), id_of(&again.json()));
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
}

/// Submits `n` slow jobs on `app`; their ids.
async fn submit_slow(app: &TestApp, n: usize, millis: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(id_of(&app.submit_pdf(&slow(&format!("slow {i}"), millis)).await).to_string());
    }
    ids
}

#[actix_web::test]
async fn a_killed_instances_jobs_run_on_another_once_its_lease_ends() {
    use crate::helpers::{Behaviour, Receiver};
    use futures::SinkExt;
    let receiver = Receiver::start(Behaviour::default()).await;
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let args = [
        "--store",
        "postgres",
        "--database-url",
        &url,
        "--lease",
        "2s",
        "--pdf-workers",
        "2",
        "--allow-private-webhooks",
    ];
    let mut a = crate::process::start(&crate::helpers::fresh_data_dir(), &args);
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut spec = slow(&format!("slow {i}"), 300);
        spec["callback_url"] = json!(format!("{}/hooks", receiver.url));
        ids.push(id_of(&a.app.submit_pdf(&spec).await).to_string());
    }
    // Killed while it runs two of them (whichever its workers took first); one it may already
    // have finished does not run again.
    let statuses = crate::helpers::poll_until(
        Duration::from_secs(20),
        Duration::from_millis(10),
        || async {
            let mut statuses = Vec::new();
            for id in &ids {
                statuses.push(a.app.job(id).await["status"].as_str().unwrap().to_string());
            }
            statuses
        },
        |s| s.iter().filter(|s| *s == "running").count() == 2,
        |s| format!("{s:?}"),
    )
    .await;
    a.kill9();
    let done_before = statuses.iter().filter(|s| *s == "succeeded").count();
    let killed_at = std::time::Instant::now();
    let b = crate::process::start(&crate::helpers::fresh_data_dir(), &args);
    // Followed on B over WebSocket: one ending per job.
    let (_, mut socket) = b.app.client.ws(b.app.url("/ws")).connect().await.expect("WebSocket on B");
    let subscribe = json!({ "subscribe": ids }).to_string();
    socket.send(awc::ws::Message::Text(subscribe.into())).await.unwrap();
    let mut endings: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    while endings.len() < ids.len() {
        let job = next_job_frame(&mut socket).await;
        if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap()) {
            *endings.entry(job["id"].as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    // Frames come in order: anything sent before the answer to this arrives before it.
    let probe = "0".repeat(32);
    socket.send(awc::ws::Message::Text(json!({"subscribe": [&probe]}).to_string().into())).await.unwrap();
    loop {
        let frame = next_frame(&mut socket).await;
        if frame["type"] == "job"
            && ["succeeded", "failed", "cancelled"].contains(&frame["job"]["status"].as_str().unwrap())
        {
            *endings.entry(frame["job"]["id"].as_str().unwrap().to_string()).or_default() += 1;
        }
        if frame["type"] == "error" {
            break;
        }
    }
    assert!(endings.values().all(|n| *n == 1), "one ending per job on the WebSocket: {endings:?}");
    let hooks = receiver.wait_until(Duration::from_secs(20), |r| r.len() >= ids.len()).await;
    let mut hooked: Vec<String> = hooks.iter().map(|r| r.json()["id"].as_str().unwrap().to_string()).collect();
    hooked.sort();
    hooked.dedup();
    assert_eq!((hooks.len(), hooked.len()), (ids.len(), ids.len()), "one webhook per job");
    for id in &ids {
        let done = b.app.wait_for(id, Duration::from_secs(60), |j| j["status"] == "succeeded").await;
        assert!(done["attempts"].as_u64().unwrap() <= 2, "{done}");
    }
    let rerun = {
        let mut n = 0;
        for id in &ids {
            n += usize::from(b.app.job(id).await["attempts"] == 2);
        }
        n
    };
    assert!((2..=4 - done_before).contains(&rerun), "the jobs A held ran again: {rerun}");
    assert!(killed_at.elapsed() < Duration::from_secs(30), "{:?}", killed_at.elapsed());
    let finished =
        b.app.metrics().await.value("offload_jobs_finished_total", &[("kind", "pdf"), ("status", "succeeded")]);
    assert_eq!(finished, (4 - done_before) as f64, "every job A had not ended ended once, on B");
}

#[actix_web::test]
async fn an_instance_without_workers_takes_jobs_that_another_runs() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let mut s = pg_settings(&url);
    (s.workers.pdf_workers, s.workers.image_workers) = (Some(0), Some(0));
    let front = spawn_app_with(s).await;
    let job = front.submit_pdf(&json!({"title": "run elsewhere"})).await;
    let id = id_of(&job).to_string();
    // Nobody runs it yet: it waits, accepted.
    assert_eq!(front.job(&id).await["status"], "queued");
    let worker = instance(&url, Duration::from_secs(30)).await;
    let done = front.wait_finished(&id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(succeeded_here(&worker).await, 1.0);
    let pdf = front.get(&format!("/jobs/{id}/result")).await;
    assert!(pdf.body.starts_with(b"%PDF-"));
    // On a store of its own some pool must run the jobs: 0 is read as 1 there.
    let mut alone = settings();
    alone.workers.pdf_workers = Some(0);
    assert!(alone.pdf_workers() >= 1, "0 workers only with a shared store");
}

#[actix_web::test]
async fn stored_results_are_bounded_by_the_result_budget_across_the_database() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let mut s = pg_settings(&url);
    s.workers.pdf_workers = Some(1);
    s.store.result_disk = "8KiB".parse().unwrap();
    let app = spawn_app_with(s.clone()).await;
    // Ended first, with no result: the budget has nothing to take from it.
    let cancelled = id_of(&app.submit_pdf(&slow("cancelled", 200)).await).to_string();
    assert_eq!(app.delete(&format!("/jobs/{cancelled}")).await.json()["status"], "cancelled");
    let mut jobs = Vec::new();
    for n in 0..12 {
        let job = app.submit_pdf(&json!({"title": format!("doc {n}")})).await;
        assert_eq!(app.wait_finished(id_of(&job)).await["status"], "succeeded");
        jobs.push(id_of(&job).to_string());
    }
    let kept = crate::helpers::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let mut kept = 0;
            for id in &jobs {
                let reply = app.get(&format!("/jobs/{id}/result")).await;
                if reply.status.as_u16() == 200 {
                    kept += reply.body.len();
                }
            }
            kept
        },
        |kept| *kept <= 8 * 1024,
        |kept| format!("{kept} result bytes kept"),
    )
    .await;
    assert!(kept > 0);
    assert_eq!(app.get(&format!("/jobs/{}/result", jobs[11])).await.status.as_u16(), 200, "the newest is kept");
    assert_eq!(app.get(&format!("/jobs/{}", jobs[0])).await.status.as_u16(), 404, "the oldest was forgotten");
    assert_eq!(app.get(&format!("/jobs/{cancelled}")).await.status.as_u16(), 200, "a job without a result stays");

    s.store.result_disk = "100B".parse().unwrap();
    s.store.database_url = Some(pg.fresh_database().await.parse().unwrap());
    let app = spawn_app_with(s).await;
    let failed = app.wait_finished(id_of(&app.submit_pdf(&json!({"title": "too big to keep"})).await)).await;
    assert_eq!(
        (failed["status"].as_str(), failed["error"]["code"].as_str()),
        (Some("failed"), Some("result_too_large"))
    );
}

#[actix_web::test]
async fn a_webhook_owed_by_a_killed_instance_is_delivered_by_one_still_running() {
    use crate::helpers::{Behaviour, Receiver};
    let receiver = Receiver::start(Behaviour { always_fail: true, fail_status: 503, ..Default::default() }).await;
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let args = ["--store", "postgres", "--database-url", &url, "--lease", "2s", "--allow-private-webhooks"];
    // Both run before the job ends, so neither takes the webhook at its own start.
    let mut a = crate::process::start(&crate::helpers::fresh_data_dir(), &args);
    let mut b = crate::process::start(&crate::helpers::fresh_data_dir(), &args);
    let mut spec = report(2);
    spec["callback_url"] = json!(format!("{}/hooks/offload", receiver.url));
    let id = id_of(&a.app.submit_pdf(&spec).await).to_string();
    // The first attempt is answered 503; the retry is due about a second later. Kill the
    // instance delivering it before then.
    receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await;
    let ran_on_a = succeeded_here(&a.app).await == 1.0;
    let (dead, alive) = if ran_on_a { (&mut a, &b) } else { (&mut b, &a) };
    dead.kill9();
    let killed_at = std::time::Instant::now();
    assert_eq!(receiver.requests().len(), 1, "the retry came before the kill; the test cannot tell anything");
    receiver.set_behaviour(Behaviour::default());
    let requests = receiver.wait_until(Duration::from_secs(20), |r| r.iter().any(|x| x.status == 200)).await;
    let delivered: Vec<_> = requests.iter().filter(|r| r.status == 200).collect();
    assert_eq!(delivered.len(), 1, "delivered once");
    assert_eq!(delivered[0].json(), alive.app.job(&id).await, "the body is the job's final object");
    // The lease (2 s) ran out and the next rescue (every third of it) took it.
    assert!(killed_at.elapsed() < Duration::from_secs(6), "{:?}", killed_at.elapsed());
}

#[actix_web::test]
async fn an_instance_frozen_past_its_lease_cannot_overwrite_the_rerun() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let args = ["--store", "postgres", "--database-url", &url, "--lease", "1s", "--pdf-workers", "1"];
    let a = crate::process::start(&crate::helpers::fresh_data_dir(), &args);
    let id = submit_slow(&a.app, 1, 400).await.remove(0);
    a.app.wait_for(&id, Duration::from_secs(20), |j| j["status"] == "running").await;
    a.sigstop();
    let b = crate::process::start(&crate::helpers::fresh_data_dir(), &args);
    let rerun = b.app.wait_for(&id, Duration::from_secs(60), |j| j["status"] == "succeeded").await;
    assert_eq!(rerun["attempts"], 2, "{rerun}");
    let result = b.app.get(&format!("/jobs/{id}/result")).await.body;
    a.sigcont();
    // A's worker wakes up, finishes its (stale) run and reports it: wait until it has.
    crate::helpers::poll_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let m = a.app.metrics().await;
            assert!(m.has("offload_pool_in_flight_jobs"), "{}", m.dump());
            m.value("offload_pool_in_flight_jobs", &[("pool", "pdf")])
        },
        |n| *n == 0.0,
        |n| format!("{n} in flight on A"),
    )
    .await;
    let after = b.app.job(&id).await;
    assert_eq!(
        (after["attempts"].clone(), after["finished_at"].clone()),
        (rerun["attempts"].clone(), rerun["finished_at"].clone())
    );
    assert_eq!(b.app.get(&format!("/jobs/{id}/result")).await.body, result, "the result is the rerun's");
    let on_a = a.app.metrics().await.value("offload_jobs_finished_total", &[("kind", "pdf"), ("status", "succeeded")]);
    assert_eq!(on_a, 0.0, "A's late completion was refused");
}

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

async fn next_job_frame(socket: &mut Socket) -> serde_json::Value {
    let v = next_frame(socket).await;
    assert_eq!(v["type"], "job", "{v}");
    v["job"].clone()
}

/// The next text frame (pings answered on the way).
async fn next_frame(socket: &mut Socket) -> serde_json::Value {
    use futures::{SinkExt, StreamExt};
    loop {
        let frame = actix_rt::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("frame");
        match frame {
            awc::ws::Frame::Text(bytes) => return serde_json::from_slice(&bytes).unwrap(),
            awc::ws::Frame::Ping(p) => socket.send(awc::ws::Message::Pong(p)).await.unwrap(),
            _ => {}
        }
    }
}

#[actix_web::test]
async fn followers_and_cancels_reach_across_instances() {
    use futures::SinkExt;
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let (a, b) = (instance(&url, Duration::from_secs(30)).await, instance(&url, Duration::from_secs(30)).await);
    // A job followed from the instance that does not run it: its progress and its end arrive.
    let pages =
        json!({"title": "followed", "paragraphs": ["p\n".repeat(400)], "test_hook": {"slow_pages": {"millis": 150}}});
    let id = id_of(&a.submit_pdf(&pages).await).to_string();
    a.wait_for(&id, Duration::from_secs(20), |j| j["status"] == "running").await;
    let follower = if in_flight(&a).await > 0.0 { &b } else { &a };
    let (_, mut socket) = follower.client.ws(follower.url("/ws")).connect().await.expect("WebSocket");
    let subscribe = json!({"subscribe": [&id]}).to_string();
    socket.send(awc::ws::Message::Text(subscribe.into())).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let frame = next_job_frame(&mut socket).await;
        seen.push((frame["status"].as_str().unwrap().to_string(), frame["progress"].as_f64().unwrap()));
        if frame["status"] == "succeeded" {
            break;
        }
    }
    let moving: Vec<f64> = seen.iter().filter(|(s, p)| s == "running" && *p > 0.0 && *p < 1.0).map(|s| s.1).collect();
    assert!(moving.len() >= 2, "progress of a run elsewhere, as it moves: {seen:?}");
    assert!(moving.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(succeeded_here(follower).await, 0.0, "the follower did not run it");

    // A job hanging on one instance, cancelled on the other: the run stops within about a second.
    let hung = a.submit_pdf(&json!({"title": "hang", "test_hook": "hang"})).await;
    let running = b.wait_for(id_of(&hung), Duration::from_secs(20), |j| j["status"] == "running").await;
    let (runner, other) = if a.metrics().await.value("offload_pool_in_flight_jobs", &[("pool", "pdf")]) > 0.0 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let asked = std::time::Instant::now();
    assert_eq!(other.delete(&format!("/jobs/{}", id_of(&running))).await.json()["status"], "cancelled");
    crate::helpers::poll_until(
        Duration::from_secs(2),
        Duration::from_millis(20),
        || async { runner.metrics().await.value("offload_pool_in_flight_jobs", &[("pool", "pdf")]) },
        |n| *n == 0.0,
        |n| format!("{n} still in flight on the instance running it"),
    )
    .await;
    assert!(asked.elapsed() < Duration::from_millis(1500), "stopped after {:?}", asked.elapsed());
    assert_eq!(runner.job(id_of(&hung)).await["status"], "cancelled");
}

#[actix_web::test]
async fn while_the_database_is_down_submissions_get_503_and_the_service_recovers_by_itself() {
    let pg = Postgres::own();
    let url = pg.fresh_database().await;
    let app = instance(&url, Duration::from_secs(30)).await;
    let before = app.submit_pdf(&json!({"title": "before"})).await;
    assert_eq!(app.wait_finished(id_of(&before)).await["status"], "succeeded");
    pg.stop();
    let down = crate::helpers::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { app.post_json("/generate-pdf", &json!({"title": "while down"})).await },
        |r| r.status == 503,
        |r| format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
    )
    .await;
    down.assert_error(503, "storage_unavailable");
    assert!(down.header("retry-after").is_some());
    crate::helpers::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { app.get("/readyz").await.status.as_u16() },
        |s| *s == 503,
        |s| s.to_string(),
    )
    .await;
    pg.start_again();
    let after = crate::helpers::poll_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { app.post_json("/generate-pdf", &json!({"title": "after"})).await },
        |r| r.status == 202,
        |r| format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
    )
    .await;
    assert_eq!(app.wait_finished(id_of(&after.json())).await["status"], "succeeded");
    assert_eq!(app.get("/readyz").await.status, 200);
    assert_eq!(app.job(id_of(&before)).await["status"], "succeeded", "nothing accepted was lost");
}

#[actix_web::test]
async fn three_instances_started_at_once_come_up_on_one_new_database() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let args = ["--store", "postgres", "--database-url", &url];
    // All three spawned before any is waited for: they migrate the empty database together.
    let spawned: Vec<_> = (0..3).map(|_| crate::process::spawn(&crate::helpers::fresh_data_dir(), &args)).collect();
    let mut up = Vec::new();
    for s in spawned {
        match s.wait_listening(Duration::from_secs(30)) {
            crate::process::Outcome::Listening(p) => up.push(p),
            crate::process::Outcome::Exited { status, output } => panic!("an instance exited ({status}):\n{output}"),
        }
    }
    let job = up[0].app.submit_pdf(&json!({"title": "seen by all"})).await;
    for p in &up {
        p.app.wait_for(id_of(&job), Duration::from_secs(30), |j| j["status"] == "succeeded").await;
    }
}

/// Queued plus running jobs as an instance last counted them (the refresh that also counts each
/// key's jobs).
async fn live_counted(app: &TestApp) -> f64 {
    let m = app.metrics().await;
    m.value("offload_jobs", &[("status", "queued")]) + m.value("offload_jobs", &[("status", "running")])
}

#[actix_web::test]
async fn the_per_key_limit_counts_a_keys_jobs_on_every_instance() {
    use crate::keys::{as_key, KEY_A, KEY_B};
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let keyed = || {
        let mut s = pg_settings(&url);
        s.access.api_keys = Some(format!("{KEY_A},{KEY_B}").parse().unwrap());
        s.admission.max_pending_per_key = Some(2);
        s
    };
    let (one, two) = (spawn_app_with(keyed()).await, spawn_app_with(keyed()).await);
    let (a1, a2, b2) = (as_key(&one, KEY_A), as_key(&two, KEY_A), as_key(&two, KEY_B));
    let hang = |title: &str| json!({"title": title, "test_hook": "hang"});
    let held =
        [id_of(&a1.submit_pdf(&hang("a1")).await).to_string(), id_of(&a1.submit_pdf(&hang("a2")).await).to_string()];
    let counted = |n: f64| {
        let two = &b2;
        async move {
            crate::helpers::poll_until(
                Duration::from_secs(5),
                Duration::from_millis(20),
                || live_counted(two),
                |c| *c == n,
                |c| format!("instance two counts {c} live jobs, not {n}"),
            )
            .await
        }
    };
    counted(2.0).await;
    // A's jobs were submitted on the other instance: they still count here.
    let refused = a2.post_json("/generate-pdf", &json!({"title": "a3"})).await;
    let message = refused.assert_error(503, "overloaded");
    assert!(message.contains("this API key has 2 jobs pending; its limit is 2"), "{message}");
    let theirs = b2.submit_pdf(&hang("b1")).await;
    for id in &held {
        assert_eq!(a1.delete(&format!("/jobs/{id}")).await.json()["status"], "cancelled");
    }
    counted(1.0).await;
    let again = a2.post_json("/generate-pdf", &json!({"title": "a4"})).await;
    assert_eq!(again.status, 202, "{}", String::from_utf8_lossy(&again.body));
    b2.delete(&format!("/jobs/{}", id_of(&theirs))).await;
}

/// How long a test allows a request that must not wait on the database (a read of a job no one
/// locked, a submission, `/readyz`).
const FAST: Duration = Duration::from_secs(1);

/// `request`, and how long it took.
async fn timed<T>(request: impl std::future::Future<Output = T>) -> (T, Duration) {
    let sent = std::time::Instant::now();
    let reply = request.await;
    (reply, sent.elapsed())
}

#[actix_web::test]
async fn rows_locked_by_another_session_hold_up_no_request_and_their_jobs_end_once_the_lock_goes() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let mut s = pg_settings(&url);
    s.workers.pdf_workers = Some(2);
    let app = spawn_app_with(s).await;
    let before = id_of(&app.submit_pdf(&json!({"title": "ended before"})).await).to_string();
    assert_eq!(app.wait_finished(&before).await["status"], "succeeded");
    // Two runs on the two workers, and one queued behind them.
    let submitted = submit_slow(&app, 3, 1000).await;
    crate::helpers::poll_until(
        Duration::from_secs(20),
        Duration::from_millis(10),
        || async {
            let mut running = 0;
            for id in &submitted {
                running += usize::from(app.job(id).await["status"] == "running");
            }
            running
        },
        |n| *n == 2,
        |n| format!("{n} running"),
    )
    .await;
    // Another client locks their rows, as a report or a repair by hand would.
    let other = pg.connect(&url).await;
    other.batch_execute("BEGIN").await.unwrap();
    let rows = other.query("SELECT id FROM offload_jobs WHERE status IN (0, 1) FOR UPDATE", &[]).await.unwrap();
    let locked: Vec<String> = rows.iter().map(|r| hex::encode(r.get::<_, Vec<u8>>(0))).collect();
    assert!(locked.len() >= 2, "the two runs are locked: {locked:?}");
    let locked_at = std::time::Instant::now();
    // Meanwhile reads, submissions and readiness answer at once, and a new job runs and ends;
    // the lock is held past the lock timeout (3 s) and until both runs are over.
    let (posted, took) = timed(app.post_json("/generate-pdf", &json!({"title": "while locked"}))).await;
    assert_eq!(posted.status, 202, "{}", String::from_utf8_lossy(&posted.body));
    assert!(took < FAST, "a submission took {took:?}");
    let new = id_of(&posted.json()).to_string();
    let mut slowest = Duration::ZERO;
    loop {
        let (read, took) = timed(app.get(&format!("/jobs/{before}"))).await;
        assert_eq!(read.status, 200);
        slowest = slowest.max(took);
        let (ready, took) = timed(app.get("/readyz")).await;
        assert_eq!(ready.status, 200, "{}", String::from_utf8_lossy(&ready.body));
        slowest = slowest.max(took);
        let (job, took) = timed(app.job(&new)).await;
        slowest = slowest.max(took);
        assert!(slowest < FAST, "a request took {slowest:?} while rows were locked");
        if job["status"] == "succeeded" && in_flight(&app).await == 0.0 && locked_at.elapsed() > Duration::from_secs(4)
        {
            break;
        }
        assert!(locked_at.elapsed() < Duration::from_secs(30), "the runs did not end");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("slowest request while rows were locked: {slowest:?} (held {:?})", locked_at.elapsed());
    // The runs are over (the third job too, if a worker had it claimed before the lock), but
    // their ends wait for the rows: none ended yet, to readers still running (or queued).
    let mut statuses = Vec::new();
    for id in &locked {
        statuses.push(app.job(id).await["status"].as_str().unwrap().to_string());
    }
    let running = statuses.iter().filter(|s| *s == "running").count();
    assert!(
        running >= 2 && statuses.iter().all(|s| s == "running" || s == "queued"),
        "the ends of the locked runs were written while the rows were locked: {statuses:?}"
    );
    other.batch_execute("COMMIT").await.unwrap();
    for id in &locked {
        let done = app.wait_for(id, Duration::from_secs(20), |j| j["status"] == "succeeded").await;
        assert_eq!(done["attempts"], 1, "ended once, by its first run: {done}");
    }
    assert_eq!(succeeded_here(&app).await, 5.0, "every job ended once");
}

/// A cluster of the test's own and an instance on it that has run one job (its connections
/// are up); the job's id.
async fn own_cluster_with_one_job_done() -> (Postgres, TestApp, String) {
    let pg = Postgres::own();
    let url = pg.fresh_database().await;
    let app = instance(&url, Duration::from_secs(30)).await;
    let before = id_of(&app.submit_pdf(&json!({"title": "before"})).await).to_string();
    assert_eq!(app.wait_finished(&before).await["status"], "succeeded");
    (pg, app, before)
}

#[actix_web::test]
async fn a_frozen_database_turns_readyz_503_and_no_request_waits_past_its_bound() {
    let (pg, app, before) = own_cluster_with_one_job_done().await;
    let frozen = pg.freeze();
    let frozen_at = std::time::Instant::now();
    // Readiness answers at once, and turns 503 once the database has not answered for 5 s.
    loop {
        let (ready, took) = timed(app.get("/readyz")).await;
        assert!(took < FAST, "/readyz took {took:?}");
        if ready.status == 503 {
            ready.assert_error(503, "storage_unavailable");
            eprintln!("/readyz 503 {:?} after the freeze", frozen_at.elapsed());
            break;
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(10),
            "/readyz still {} after {:?}",
            ready.status,
            frozen_at.elapsed()
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    // A read gives up after its bound (5 s); a submission is refused at once.
    let (read, took) = timed(app.get(&format!("/jobs/{before}"))).await;
    read.assert_error(503, "storage_unavailable");
    assert!(read.header("retry-after").is_some());
    assert!(took < Duration::from_secs(7), "a read took {took:?}");
    eprintln!("a read while frozen answered 503 after {took:?}");
    let (posted, took) = timed(app.post_json("/generate-pdf", &json!({"title": "while frozen"}))).await;
    posted.assert_error(503, "storage_unavailable");
    assert!(took < FAST, "a submission took {took:?}");
    drop(frozen);
    crate::helpers::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { app.get("/readyz").await.status.as_u16() },
        |s| *s == 200,
        |s| s.to_string(),
    )
    .await;
    let after = app.submit_pdf(&json!({"title": "after"})).await;
    assert_eq!(app.wait_finished(id_of(&after)).await["status"], "succeeded");
    assert_eq!(app.job(&before).await["status"], "succeeded", "nothing accepted was lost");
}

/// Puts an ended job straight into the database (as if ended long ago): `finished_at` by an
/// instance's clock, `db_finished_at` by the database's (NULL: a job ended before that column),
/// both as microseconds before the database's now. Its id.
async fn ended_long_ago(db: &tokio_postgres::Client, finished_ago: i64, db_finished_ago: Option<i64>) -> String {
    let id: u128 = rand::random();
    let id_bytes = id.to_be_bytes();
    let id_ref: &[u8] = &id_bytes;
    // Without the column when it is NULL: so this runs on the schema from before it, too.
    let (columns, value) = match db_finished_ago {
        Some(_) => (", db_finished_at", ", n - $3"),
        None => ("", ""),
    };
    let sql = format!(
        "INSERT INTO offload_jobs (id, kind, status, attempts, progress, stage, created_at, finished_at, weight{columns}) \
         SELECT $1, 0, 4, 0, 0, 'cancelled', n - $2 - 1000000, n - $2, 0{value} \
         FROM (SELECT (extract(epoch FROM now()) * 1000000)::int8 AS n) t"
    );
    let ago = db_finished_ago.unwrap_or(0);
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match db_finished_ago {
        Some(_) => vec![&id_ref, &finished_ago, &ago],
        None => vec![&id_ref, &finished_ago],
    };
    db.execute(&sql, &params).await.unwrap();
    format!("{id:032x}")
}

#[actix_web::test]
async fn retention_goes_by_the_databases_clock_not_by_an_instance_two_hours_ahead() {
    const HOUR: i64 = 3_600_000_000;
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let args = ["--store", "postgres", "--database-url", &url, "--result-ttl", "1h"];
    let a = crate::process::start(&crate::helpers::fresh_data_dir(), &args);
    // B's clock is two hours ahead; it runs nothing and sweeps every 100 ms.
    let b_args: Vec<&str> = args.iter().copied().chain(["--pdf-workers", "0", "--image-workers", "0"]).collect();
    let b = crate::process::start_with_env(
        &crate::helpers::fresh_data_dir(),
        &b_args,
        &[("OFFLOAD_TEST_CLOCK_OFFSET", "2h"), ("OFFLOAD_TEST_SWEEP_EVERY", "100ms")],
    );
    let mut ended = Vec::new();
    for i in 0..3 {
        let id = id_of(&a.app.submit_pdf(&json!({"title": format!("kept {i}")})).await).to_string();
        assert_eq!(a.app.wait_finished(&id).await["status"], "succeeded");
        ended.push(id);
    }
    let db = pg.connect(&url).await;
    // Jobs ended two hours ago go; each one gone is a sweep that ran after the jobs above
    // ended. These two have only `finished_at` (as jobs ended before `db_finished_at` existed).
    for _ in 0..2 {
        let old = ended_long_ago(&db, 2 * HOUR, None).await;
        gone(&b.app, &old).await;
    }
    for id in &ended {
        let kept = b.app.get(&format!("/jobs/{id}")).await;
        assert_eq!(kept.status, 200, "a job ended a moment ago was forgotten by the instance two hours ahead");
        assert_eq!(b.app.get(&format!("/jobs/{id}/result")).await.status, 200);
    }
    // The database's clock wins over the instance's: ended two hours ago by the database while
    // the instance dated it now, it goes; ended half an hour ago by the database while the
    // instance dated it two hours ago, it stays (past one more sweep).
    let old = ended_long_ago(&db, 0, Some(2 * HOUR)).await;
    gone(&b.app, &old).await;
    let recent = ended_long_ago(&db, 2 * HOUR, Some(HOUR / 2)).await;
    gone(&b.app, &ended_long_ago(&db, 2 * HOUR, None).await).await;
    assert_eq!(b.app.get(&format!("/jobs/{recent}")).await.status, 200, "db_finished_at wins over finished_at");
    for id in &ended {
        assert_eq!(a.app.get(&format!("/jobs/{id}")).await.status, 200);
    }
}

/// Waits until the job `id` is forgotten.
async fn gone(app: &TestApp, id: &str) {
    crate::helpers::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { app.get(&format!("/jobs/{id}")).await.status.as_u16() },
        |s| *s == 404,
        |s| format!("job {id}, past the TTL by the database's clock, is still there: {s}"),
    )
    .await;
}

#[actix_web::test]
async fn a_submission_whose_answer_is_lost_with_the_database_says_the_job_may_exist() {
    let (pg, app, _) = own_cluster_with_one_job_done().await;
    let frozen = pg.freeze();
    // The submission's statement goes out to a frozen server; its backend is then killed, so the
    // answer never comes (the server restarts every connection once thawed).
    let lost = json!({"title": "sent, never answered"});
    let post = app.post_json("/generate-pdf", &lost);
    let crash = async {
        // Time for the statement to reach the socket: a frozen server shows nothing to poll.
        actix_rt::time::sleep(Duration::from_millis(500)).await;
        pg.kill_backends(&frozen);
        drop(frozen);
    };
    let (reply, ()) = futures::future::join(post, crash).await;
    let message = reply.assert_error(503, "storage_unavailable");
    assert!(reply.header("retry-after").is_some());
    // Before: "cannot write right now", as if nothing was created.
    assert!(message.contains("may exist") && message.contains("Idempotency-Key"), "{message}");
    crate::helpers::poll_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async { app.get("/readyz").await.status.as_u16() },
        |s| *s == 200,
        |s| s.to_string(),
    )
    .await;
    let after = id_of(&app.submit_pdf(&json!({"title": "after"})).await).to_string();
    assert_eq!(app.wait_finished(&after).await["status"], "succeeded");
}

#[actix_web::test]
async fn a_database_written_by_the_release_before_kinds_had_names_opens_and_serves_its_jobs() {
    use offload::store::postgres::schema::MIGRATIONS;
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let old = pg.connect(&url).await;
    // Schema 1, as the release before kinds by name wrote it: kinds 0 (pdf) and 1 (image), an
    // image's size in two columns.
    old.batch_execute(MIGRATIONS[0]).await.unwrap();
    old.batch_execute("CREATE TABLE offload_schema (version INTEGER NOT NULL); INSERT INTO offload_schema VALUES (1)")
        .await
        .unwrap();
    let (image, queued) = (offload::job::JobId::random(), offload::job::JobId::random());
    old.execute(
        "INSERT INTO offload_jobs (id, kind, status, attempts, progress, created_at, finished_at, result_type, \
         result_bytes, result_name, result_width, result_height, weight) \
         VALUES ($1, 1, 2, 1, 1, 1000000, 2000000, 'image/png', 3, 'a.png', 40, 30, 5)",
        &[&image.to_bytes().as_slice()],
    )
    .await
    .unwrap();
    old.execute(
        "INSERT INTO offload_results (seq, bytes) SELECT seq, '\\x010203'::bytea FROM offload_jobs WHERE id = $1",
        &[&image.to_bytes().as_slice()],
    )
    .await
    .unwrap();
    let spec =
        br#"{"title":"queued before the upgrade","subtitle":null,"paragraphs":[],"table":null,"page_size":"a4"}"#;
    old.execute(
        "WITH j AS (INSERT INTO offload_jobs (id, kind, status, attempts, progress, created_at, weight) \
         VALUES ($1, 0, 0, 0, 0, 1000000, 100) RETURNING seq) INSERT INTO offload_payloads (seq, spec) SELECT seq, $2 FROM j",
        &[&queued.to_bytes().as_slice(), &spec.as_slice()],
    )
    .await
    .unwrap();
    let app = instance(&url, Duration::from_secs(30)).await;
    assert_eq!(version(&old).await.unwrap(), SCHEMA_VERSION);
    let done = app.job(&image.to_string()).await;
    assert_eq!((done["kind"].as_str(), done["status"].as_str()), (Some("image"), Some("succeeded")), "{done}");
    assert_eq!((done["result"]["width"].as_u64(), done["result"]["height"].as_u64()), (Some(40), Some(30)), "{done}");
    assert_eq!(&app.get(&format!("/jobs/{image}/result")).await.body[..], [1, 2, 3]);
    let ran = app.wait_finished(&queued.to_string()).await;
    assert_eq!((ran["kind"].as_str(), ran["status"].as_str()), (Some("pdf"), Some("succeeded")), "{ran}");
    let listed = app.get("/jobs?kind=image").await.json();
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(1), "{listed}");
}
