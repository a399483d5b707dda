//! API keys: every API route needs one, and a key sees only the jobs it submitted (HTTP,
//! WebSocket, the durable store across a restart).

use std::time::Duration;

use awc::ws::{Frame, Message};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};

use crate::helpers::{fresh_data_dir, id_of, settings, spawn_app_with, Part, TestApp};
use crate::process::{self, Outcome};

pub const KEY_A: &str = "alpha-key-0123456789abcdef";
pub const KEY_B: &str = "bravo-key-0123456789abcdef";

async fn keyed_app() -> TestApp {
    let mut s = settings();
    s.access.api_keys = Some(format!("{KEY_A},{KEY_B}").parse().unwrap());
    spawn_app_with(s).await
}

/// A client of `app` that sends `key` on every request.
pub fn as_key(app: &TestApp, key: &str) -> TestApp {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .add_default_header(("authorization", format!("Bearer {key}")))
        .finish();
    TestApp { address: app.address.clone(), client }
}

fn tiny_png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10])).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[actix_web::test]
async fn every_api_route_answers_401_without_a_valid_key_and_health_and_the_page_stay_open() {
    let app = keyed_app().await;
    let some_id = "0123456789abcdef0123456789abcdef";
    let pdf = br#"{"title": "t"}"#.to_vec();
    let bad_json = b"{not json".to_vec();
    // (method, path, content type, body)
    let protected: Vec<(&str, String, Option<&str>, Vec<u8>)> = vec![
        ("POST", "/generate-pdf".into(), Some("application/json"), pdf.clone()),
        // Refused before the body is parsed: a 401, not a 400.
        ("POST", "/generate-pdf".into(), Some("application/json"), bad_json.clone()),
        ("POST", "/images".into(), Some("multipart/form-data; boundary=x"), b"--x--\r\n".to_vec()),
        ("GET", "/jobs".into(), None, vec![]),
        ("GET", "/jobs?status=bogus".into(), None, vec![]),
        ("GET", format!("/jobs/{some_id}"), None, vec![]),
        ("GET", "/jobs/not-an-id".into(), None, vec![]),
        ("DELETE", format!("/jobs/{some_id}"), None, vec![]),
        ("GET", format!("/jobs/{some_id}/result"), None, vec![]),
        ("GET", "/ws".into(), None, vec![]),
        ("GET", "/webhook-secret".into(), None, vec![]),
        ("POST", "/analytics/events".into(), Some("application/json"), br#"{"name": "x"}"#.to_vec()),
        ("GET", "/analytics/summary".into(), None, vec![]),
        ("GET", "/metrics".into(), None, vec![]),
        ("GET", "/openapi.json".into(), None, vec![]),
        // The router decodes %6F to `o`: the same route, the same guard.
        ("GET", "/j%6Fbs".into(), None, vec![]),
    ];
    let wrong_key = format!("Bearer {}", KEY_A.replace('a', "b"));
    let basic = format!("Basic {KEY_A}");
    let credentials: [(&str, Option<&str>); 4] =
        [("none", None), ("a wrong key", Some(&wrong_key)), ("Basic", Some(&basic)), ("empty", Some("Bearer "))];
    for (method, path, content_type, body) in &protected {
        for (what, auth) in credentials {
            let mut headers: Vec<(&str, &[u8])> = Vec::new();
            if let Some(ct) = content_type {
                headers.push(("content-type", ct.as_bytes()));
            }
            if let Some(auth) = auth {
                headers.push(("authorization", auth.as_bytes()));
            }
            let reply = app.request_with_headers(method, path, &headers, body.clone()).await;
            let context = format!("{method} {path} with {what}");
            reply.expect_error(401, "unauthorized", &context);
            let challenge = reply.header("www-authenticate").unwrap_or_default();
            assert!(challenge.starts_with("Bearer"), "{context}: WWW-Authenticate {challenge:?}");
        }
    }
    for path in ["/healthz", "/readyz", "/", "/app.js", "/style.css"] {
        assert_eq!(app.get(path).await.status, 200, "{path} is open without a key");
    }
    // With a key, the same routes answer as usual.
    let a = as_key(&app, KEY_A);
    assert_eq!(a.get("/jobs").await.status, 200);
    assert_eq!(a.get("/metrics").await.status, 200);
    a.post_json("/generate-pdf", &json!({"title": 5})).await.assert_error(422, "invalid_field");
}

#[actix_web::test]
async fn a_job_exists_only_for_the_key_that_submitted_it() {
    let app = keyed_app().await;
    let (a, b) = (as_key(&app, KEY_A), as_key(&app, KEY_B));
    let pdf = a.submit_pdf(&json!({"title": "mine"})).await;
    let reply = a.upload(&[Part::file("a.png", "image/png", tiny_png()), Part::text("ops", "[]")]).await;
    assert_eq!(reply.status, 202, "{}", String::from_utf8_lossy(&reply.body));
    let image = reply.json()["jobs"][0].clone();
    for job in [&pdf, &image] {
        let id = id_of(job);
        assert_eq!(a.wait_finished(id).await["status"], "succeeded");
        b.get(&format!("/jobs/{id}")).await.assert_error(404, "job_not_found");
        b.get(&format!("/jobs/{id}/result")).await.assert_error(404, "job_not_found");
        b.delete(&format!("/jobs/{id}")).await.assert_error(404, "job_not_found");
        let own = a.get(&format!("/jobs/{id}/result")).await;
        assert_eq!(own.status, 200, "the owner downloads its result");
        assert!(!own.body.is_empty());
    }
    // B's cancel of A's unfinished job does nothing; A's own cancel works.
    let slow = a.submit_pdf(&json!({"title": "slow", "test_hook": "hang"})).await;
    let slow_url = format!("/jobs/{}", id_of(&slow));
    b.delete(&slow_url).await.assert_error(404, "job_not_found");
    assert!(matches!(a.job(id_of(&slow)).await["status"].as_str(), Some("queued" | "running")));
    assert_eq!(a.delete(&slow_url).await.json()["status"], "cancelled");

    let theirs = b.submit_pdf(&json!({"title": "theirs"})).await;
    b.wait_finished(id_of(&theirs)).await;
    let listed = |reply: &Value| -> Vec<String> {
        reply["jobs"].as_array().unwrap().iter().map(|j| id_of(j).to_string()).collect()
    };
    let mine = a.get("/jobs").await.json();
    let mut want = vec![id_of(&slow).to_string(), id_of(&image).to_string(), id_of(&pdf).to_string()];
    assert_eq!(listed(&mine), want, "A lists its own jobs, newest first");
    assert_eq!(
        (mine["counts"]["succeeded"].as_u64(), mine["counts"]["cancelled"].as_u64()),
        (Some(2), Some(1)),
        "counts are A's own: {mine}"
    );
    let by_status = a.get("/jobs?status=succeeded&kind=pdf").await.json();
    want.retain(|id| id == id_of(&pdf));
    assert_eq!(listed(&by_status), want);
    let others = b.get("/jobs").await.json();
    assert_eq!(listed(&others), vec![id_of(&theirs).to_string()]);
    assert_eq!(others["counts"]["succeeded"], 1, "{others}");
}

#[actix_web::test]
async fn an_idempotency_key_is_scoped_to_the_api_key() {
    let app = keyed_app().await;
    let (a, b) = (as_key(&app, KEY_A), as_key(&app, KEY_B));
    let post = |client: TestApp| async move {
        let body = br#"{"title": "once"}"#.to_vec();
        let headers: [(&str, &[u8]); 2] = [("content-type", b"application/json"), ("idempotency-key", b"order-42")];
        client.request_with_headers("POST", "/generate-pdf", &headers, body).await
    };
    let first = post(as_key(&app, KEY_A)).await;
    let again = post(as_key(&app, KEY_A)).await;
    let other = post(as_key(&app, KEY_B)).await;
    assert_eq!((first.status.as_u16(), again.status.as_u16(), other.status.as_u16()), (202, 202, 202));
    assert_eq!(id_of(&first.json()), id_of(&again.json()), "A's repeat is a replay");
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_ne!(id_of(&first.json()), id_of(&other.json()), "B's key of the same name is B's own");
    assert!(other.header("idempotent-replayed").is_none());
    b.job(id_of(&other.json())).await;
    a.job(id_of(&first.json())).await;
}

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        let frame = actix_rt::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("no frame in time")
            .expect("socket closed")
            .expect("frame");
        match frame {
            Frame::Text(bytes) => return serde_json::from_slice(&bytes).unwrap(),
            Frame::Ping(p) => socket.send(Message::Pong(p)).await.unwrap(),
            _ => {}
        }
    }
}

#[actix_web::test]
async fn the_websocket_takes_the_key_as_a_header_or_access_token_and_follows_only_own_jobs() {
    let app = keyed_app().await;
    let a = as_key(&app, KEY_A);
    let job = a.submit_pdf(&json!({"title": "followed", "test_hook": {"slow_pages": {"millis": 200}}})).await;
    let id = id_of(&job).to_string();

    // No key, or a wrong one: the handshake is refused with 401.
    for url in [app.url("/ws"), app.url("/ws?access_token=not-a-valid-key-at-all")] {
        match app.client.ws(url.clone()).connect().await {
            Err(awc::error::WsClientError::InvalidResponseStatus(status)) => assert_eq!(status, 401, "{url}"),
            Err(e) => panic!("{url}: unexpected error {e}"),
            Ok(_) => panic!("{url}: connected without a valid key"),
        }
    }
    // B follows A's job: unknown, as if it did not exist.
    let (_, mut theirs) = app.client.ws(app.url(&format!("/ws?access_token={KEY_B}"))).connect().await.expect("B");
    theirs.send(Message::Text(json!({"subscribe": [id]}).to_string().into())).await.unwrap();
    let refused = next_frame(&mut theirs).await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("unknown_job")), "{refused}");
    assert_eq!(refused["id"], id.as_str());

    // A, by query and by header, follows it to the end.
    let by_query = app.client.ws(app.url(&format!("/ws?access_token={KEY_A}"))).connect().await;
    let by_header = a.client.ws(a.url("/ws")).connect().await;
    for (how, socket) in [("access_token", by_query), ("Authorization", by_header)] {
        let (_, mut socket) = socket.unwrap_or_else(|e| panic!("{how}: {e}"));
        socket.send(Message::Text(json!({"subscribe": [id]}).to_string().into())).await.unwrap();
        loop {
            let frame = next_frame(&mut socket).await;
            assert_eq!(frame["type"], "job", "{how}: {frame}");
            if frame["job"]["status"] == "succeeded" {
                break;
            }
        }
    }
    // Nothing of A's job ever reached B's socket.
    let quiet = actix_rt::time::timeout(Duration::from_millis(100), next_frame(&mut theirs)).await;
    assert!(quiet.is_err(), "B's socket got {quiet:?}");
}

#[actix_web::test]
async fn ownership_survives_a_restart_and_keys_never_reach_the_log() {
    let dir = fresh_data_dir();
    let keys = format!("--api-keys={KEY_A},{KEY_B}");
    let mut first = process::start(&dir, &[&keys]);
    let a = as_key(&first.app, KEY_A);
    let job = a.submit_pdf(&json!({"title": "kept"})).await;
    let id = id_of(&job).to_string();
    a.wait_finished(&id).await;
    // Keys in request lines: a refused WebSocket with a token, a query naming a key.
    let refused = first.app.client.ws(first.app.url(&format!("/ws?access_token={KEY_B}x"))).connect().await;
    assert!(refused.is_err());
    assert_eq!(a.get(&format!("/jobs?access_token={KEY_B}")).await.status, 200);
    first.kill9();
    let log = first.take_log().join("\n");
    assert!(log.contains("GET /ws 401") && log.contains("GET /jobs 200"), "the access log has the requests: {log}");
    assert!(!log.contains(KEY_A) && !log.contains(KEY_B), "a key was logged:\n{log}");

    let second = process::start(&dir, &[&keys]);
    let (a, b) = (as_key(&second.app, KEY_A), as_key(&second.app, KEY_B));
    assert_eq!(a.job(&id).await["status"], "succeeded");
    b.get(&format!("/jobs/{id}")).await.assert_error(404, "job_not_found");
    let listed = b.get("/jobs").await.json();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 0, "{listed}");
    assert_eq!(a.get("/jobs").await.json()["jobs"].as_array().unwrap().len(), 1);
}

#[actix_web::test]
async fn a_key_that_is_too_short_stops_the_service_at_start_with_a_clear_message() {
    let dir = fresh_data_dir();
    match process::spawn(&dir, &["--api-keys", "short"]).wait_listening(Duration::from_secs(20)) {
        Outcome::Exited { status, output } => {
            assert!(!status.success(), "{status}");
            assert!(output.contains("16 to 256 characters"), "{output}");
            assert!(!output.contains("short,"), "{output}");
        }
        Outcome::Listening(_) => panic!("started with a 5-character key"),
    }
}

/// A hanging PDF job: it holds a worker (and counts as pending) until cancelled.
fn hang(title: &str) -> Value {
    json!({"title": title, "test_hook": "hang"})
}

/// `n` small PNG files for one `POST /images`.
fn pngs(n: usize) -> Vec<Part> {
    (0..n).map(|i| Part::file(&format!("{i}.png"), "image/png", tiny_png())).collect()
}

/// What one submission of a key got.
enum Want {
    Accepted,
    /// 503 `overloaded` naming the key's own count and limit, with `Retry-After`.
    KeyFull {
        pending: usize,
    },
    /// 413: more jobs in one request than the key may ever have pending.
    NeverFits,
}

#[actix_web::test]
async fn one_key_at_its_pending_limit_is_refused_while_another_key_still_gets_in() {
    let mut s = settings();
    s.access.api_keys = Some(format!("{KEY_A},{KEY_B}").parse().unwrap());
    s.admission.max_pending_per_key = Some(2);
    let app = spawn_app_with(s).await;
    let (a, b) = (as_key(&app, KEY_A), as_key(&app, KEY_B));
    enum What {
        Pdf(Value),
        Images(usize),
    }
    // In order: (who, what, outcome). Hanging jobs stay pending; images end quickly, so an
    // accepted image upload is the last of a key's rows.
    let steps: Vec<(&str, &TestApp, What, Want)> = vec![
        ("A", &a, What::Pdf(hang("a1")), Want::Accepted),
        ("A", &a, What::Pdf(hang("a2")), Want::Accepted),
        ("A", &a, What::Pdf(json!({"title": "a3"})), Want::KeyFull { pending: 2 }),
        // Every pool counts towards the key's limit.
        ("A", &a, What::Images(1), Want::KeyFull { pending: 2 }),
        // The other key is not held back by A's jobs.
        ("B", &b, What::Pdf(hang("b1")), Want::Accepted),
        // Each file of an upload is a job: two do not fit beside B's one.
        ("B", &b, What::Images(2), Want::KeyFull { pending: 1 }),
        ("B", &b, What::Images(3), Want::NeverFits),
        ("B", &b, What::Images(1), Want::Accepted),
    ];
    let mut held = Vec::new();
    for (i, (who, client, what, want)) in steps.into_iter().enumerate() {
        let reply = match &what {
            What::Pdf(spec) => client.post_json("/generate-pdf", spec).await,
            What::Images(n) => client.upload(&pngs(*n)).await,
        };
        let context = format!("step {i} ({who})");
        match want {
            Want::Accepted => {
                assert_eq!(reply.status, 202, "{context}: {}", String::from_utf8_lossy(&reply.body));
                if let What::Pdf(_) = what {
                    held.push((client, reply.json()["id"].as_str().unwrap().to_string()));
                }
            }
            Want::KeyFull { pending } => {
                let message = reply.expect_error(503, "overloaded", &context);
                let own = format!("this API key has {pending} jobs pending; its limit is 2");
                assert!(message.contains(&own), "{context}: {message}");
                assert!(
                    !message.contains("the limit is"),
                    "{context}: not the service-wide limit's message: {message}"
                );
                let retry = reply.header("retry-after").unwrap_or_default();
                assert!(retry.parse::<u64>().is_ok_and(|s| s >= 1), "{context}: Retry-After {retry:?}");
            }
            Want::NeverFits => {
                let message = reply.expect_error(413, "payload_too_large", &context);
                assert!(message.contains("this API key"), "{context}: {message}");
            }
        }
    }
    // A's jobs end: A is admitted again at once (and B's one is still held).
    for (client, id) in held.iter().filter(|(c, _)| std::ptr::eq(*c, &a)) {
        assert_eq!(client.delete(&format!("/jobs/{id}")).await.json()["status"], "cancelled");
    }
    let again = a.post_json("/generate-pdf", &json!({"title": "after"})).await;
    assert_eq!(again.status, 202, "{}", String::from_utf8_lossy(&again.body));
    assert_eq!(a.wait_finished(again.json()["id"].as_str().unwrap()).await["status"], "succeeded");
}

#[actix_web::test]
async fn a_keys_pending_jobs_recovered_after_a_restart_count_against_its_limit() {
    let dir = fresh_data_dir();
    let args = [format!("--api-keys={KEY_A},{KEY_B}"), "--max-pending-per-key=2".to_string()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = process::start(&dir, &args);
    let a = as_key(&first.app, KEY_A);
    let ids =
        [id_of(&a.submit_pdf(&hang("a1")).await).to_string(), id_of(&a.submit_pdf(&hang("a2")).await).to_string()];
    first.kill9();

    let second = process::start(&dir, &args);
    let (a, b) = (as_key(&second.app, KEY_A), as_key(&second.app, KEY_B));
    let message = a.post_json("/generate-pdf", &json!({"title": "a3"})).await.assert_error(503, "overloaded");
    assert!(message.contains("this API key has 2 jobs pending; its limit is 2"), "{message}");
    assert_eq!(b.post_json("/generate-pdf", &json!({"title": "b1"})).await.status, 202);
    for id in &ids {
        assert_eq!(a.delete(&format!("/jobs/{id}")).await.json()["status"], "cancelled");
    }
    assert_eq!(a.post_json("/generate-pdf", &json!({"title": "a4"})).await.status, 202);
}
