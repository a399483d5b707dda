//! Live progress over WebSocket.

use std::io::Write;
use std::time::{Duration, Instant};

use awc::ws::{Frame, Message};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};

use crate::helpers::{duration, id_of, report, settings, spawn_app, spawn_app_with, TestApp};

pub type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

pub async fn open(app: &TestApp) -> Socket {
    let (_, socket) = app.client.ws(app.url("/ws")).connect().await.expect("WebSocket connect");
    socket
}

pub async fn send(socket: &mut Socket, frame: Value) {
    socket.send(Message::Text(frame.to_string().into())).await.unwrap();
}

/// The next JSON text frame (pings are answered by awc's codec user: we answer them here).
async fn next(socket: &mut Socket, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame =
            actix_rt::time::timeout(left, socket.next()).await.expect("no frame in time").expect("socket closed");
        match frame.expect("frame") {
            Frame::Text(bytes) => return serde_json::from_slice(&bytes).unwrap(),
            Frame::Ping(p) => socket.send(Message::Pong(p)).await.unwrap(),
            _ => {}
        }
    }
}

/// Follows `id` until its final state; returns every job event seen.
pub async fn follow_to_end(socket: &mut Socket, id: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let frame = next(socket, Duration::from_secs(60)).await;
        assert_eq!(frame["type"], "job", "{frame}");
        assert_eq!(id_of(&frame["job"]), id);
        let done = matches!(frame["job"]["status"].as_str(), Some("succeeded" | "failed" | "cancelled"));
        seen.push(frame["job"].clone());
        if done {
            return seen;
        }
    }
}

pub fn assert_monotonic(events: &[Value]) {
    let mut last = 0.0;
    for e in events {
        let p = e["progress"].as_f64().unwrap();
        assert!(p >= last, "progress went back from {last} to {p}");
        last = p;
    }
}

#[actix_web::test]
async fn a_subscriber_sees_progress_then_success() {
    let app = spawn_app().await;
    let mut spec = report(1200);
    spec["test_hook"] = json!({"slow_pages": {"millis": 30}});
    let job = app.submit_pdf(&spec).await;
    let mut socket = open(&app).await;
    send(&mut socket, json!({"subscribe": [id_of(&job)]})).await;
    let events = follow_to_end(&mut socket, id_of(&job)).await;
    assert_monotonic(&events);
    let last = events.last().unwrap();
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["progress"], 1.0);
    let between = events.iter().filter(|e| e["status"] == "running" && e["progress"].as_f64().unwrap() > 0.0).count();
    assert!(between >= 3, "expected several progress events, saw {between}: {events:?}");
    // At most one progress event per 50 ms while it ran (plus the edges).
    let ran = |field: &str| humantime::parse_rfc3339(last[field].as_str().unwrap()).unwrap();
    let ran_ms = ran("finished_at").duration_since(ran("started_at")).unwrap().as_millis() as usize;
    assert!(between <= ran_ms / 50 + 3, "{between} progress events in {ran_ms} ms");
}

#[actix_web::test]
async fn a_late_subscriber_gets_the_final_state_at_once() {
    let app = spawn_app().await;
    let job = app.submit_pdf(&json!({"title": "done already"})).await;
    app.wait_finished(id_of(&job)).await;
    let mut socket = open(&app).await;
    let started = Instant::now();
    send(&mut socket, json!({"subscribe": [id_of(&job)]})).await;
    let frame = next(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(frame["job"]["status"], "succeeded");
    assert!(started.elapsed() < Duration::from_millis(500));
}

/// The body deadline is for request bodies: a WebSocket outlives it (after the upgrade the
/// "body" is the socket).
#[actix_web::test]
async fn a_websocket_outlives_the_body_timeout() {
    let mut s = settings();
    s.server.body_timeout = duration(Duration::from_millis(300));
    let app = spawn_app_with(s).await;
    let mut socket = open(&app).await;
    // Longer than the body timeout, on purpose: what is tested is the passing of time.
    actix_rt::time::sleep(Duration::from_millis(900)).await;
    let job = app.submit_pdf(&json!({"title": "late"})).await;
    send(&mut socket, json!({"subscribe": [id_of(&job)]})).await;
    let events = follow_to_end(&mut socket, id_of(&job)).await;
    assert_eq!(events.last().unwrap()["status"], "succeeded");
}

#[actix_web::test]
async fn a_frame_of_12000_bad_ids_gets_one_error_frame_listing_them() {
    let app = spawn_app().await;
    let job = app.submit_pdf(&json!({"title": "real"})).await;
    let mut socket = open(&app).await;
    let unknown = "0123456789abcdef0123456789abcdef";
    let mut ids: Vec<String> = (0..12_000).map(|i| if i < 150 { format!("a{i}") } else { "1".into() }).collect();
    ids.push(unknown.to_string());
    ids.push(id_of(&job).to_string());
    let frame = json!({"subscribe": ids});
    assert!(frame.to_string().len() < 60_000);
    send(&mut socket, frame).await;
    // A marker after it: the error replies to the big frame come before the marker's (job
    // snapshots travel through the outbox and may come later).
    send(&mut socket, json!({"subscribe": "marker"})).await;
    let mut errors = Vec::new();
    let (mut marker, mut followed) = (false, false);
    while !(marker && followed) {
        let reply = next(&mut socket, Duration::from_secs(10)).await;
        match (reply["type"].as_str(), reply["code"].as_str()) {
            (Some("error"), Some("bad_frame")) => marker = true,
            (Some("error"), _) if !marker => errors.push(reply),
            (Some("job"), _) => followed |= reply["job"]["id"] == id_of(&job),
            _ => panic!("{reply}"),
        }
    }
    assert_eq!(errors.len(), 1, "one frame for all the bad ids: {errors:?}");
    let listed = errors[0]["ids"].as_array().expect("ids");
    assert_eq!(listed.len(), 100, "at most 100 distinct ids listed");
    assert!(errors[0]["message"].as_str().unwrap().starts_with("12001 ids"), "{}", errors[0]);
}

#[actix_web::test]
async fn bad_frames_and_unknown_ids_get_error_frames_and_the_socket_stays_usable() {
    let app = spawn_app().await;
    let mut socket = open(&app).await;
    let unknown = "0123456789abcdef0123456789abcdef";
    let cases: Vec<(Value, &str)> = vec![
        (json!({"subscribe": [unknown]}), "unknown_job"),
        (json!({"subscribe": ["not-an-id"]}), "unknown_job"),
        (json!({"subscribe": "x"}), "bad_frame"),
        (json!({"watch": []}), "bad_frame"),
        (json!([1, 2]), "bad_frame"),
        (json!({"subscribe": [], "unsubscribe": []}), "bad_frame"),
    ];
    for (frame, code) in cases {
        send(&mut socket, frame.clone()).await;
        let reply = next(&mut socket, Duration::from_secs(5)).await;
        assert_eq!(reply["type"], "error", "{frame}");
        assert_eq!(reply["code"], code, "{frame}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    socket.send(Message::Text("not json at all".into())).await.unwrap();
    assert_eq!(next(&mut socket, Duration::from_secs(5)).await["code"], "bad_frame");
    // Still usable.
    let job = app.submit_pdf(&json!({"title": "after errors"})).await;
    send(&mut socket, json!({"subscribe": [id_of(&job)]})).await;
    let events = follow_to_end(&mut socket, id_of(&job)).await;
    assert_eq!(events.last().unwrap()["status"], "succeeded");
}

#[actix_web::test]
async fn two_hundred_clients_each_follow_their_own_job() {
    let app = spawn_app().await;
    let mut tasks = Vec::new();
    for n in 0..200 {
        let app = TestApp {
            address: app.address.clone(),
            client: awc::Client::builder().timeout(Duration::from_secs(60)).finish(),
        };
        tasks.push(actix_rt::spawn(async move {
            let mut spec = report(60 + n % 50);
            spec["test_hook"] = json!({"slow_pages": {"millis": 5}});
            let job = app.submit_pdf(&spec).await;
            let mut socket = open(&app).await;
            send(&mut socket, json!({"subscribe": [id_of(&job)]})).await;
            let events = follow_to_end(&mut socket, id_of(&job)).await;
            assert_monotonic(&events);
            let last = events.last().unwrap().clone();
            assert_eq!(last["status"], "succeeded", "{last}");
            assert_eq!(last["progress"], 1.0);
        }));
    }
    for t in tasks {
        t.await.expect("a client failed");
    }
}

/// A masked client text frame (RFC 6455 §5.2), for a raw client that never reads.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[actix_web::test]
async fn a_client_that_never_reads_delays_no_one() {
    let app = spawn_app().await;
    let addr = app.address.trim_start_matches("http://").to_string();
    // A raw client asks for megabytes of replies (an error frame for each of many bad ids) and
    // never reads a byte of them.
    let stuck = std::thread::spawn(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let handshake = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        tcp.write_all(handshake.as_bytes()).unwrap();
        let ids: Vec<String> = (0..1500).map(|i| format!("bad-{i}")).collect();
        let frame = masked_text(json!({"subscribe": ids}).to_string().as_bytes());
        for _ in 0..60 {
            if tcp.write_all(&frame).is_err() {
                break;
            }
        }
        tcp
    });
    // Meanwhile everyone else is served as usual.
    let started = Instant::now();
    let mut socket = open(&app).await;
    for _ in 0..5 {
        let job = app.submit_pdf(&report(100)).await;
        send(&mut socket, json!({"subscribe": [id_of(&job)]})).await;
        let events = follow_to_end(&mut socket, id_of(&job)).await;
        assert_eq!(events.last().unwrap()["status"], "succeeded");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "others were slowed: {:?}", started.elapsed());
    assert_eq!(app.get("/healthz").await.status.as_u16(), 200);
    drop(stuck.join().unwrap());
}

/// Reads frames without answering pings until the server closes; returns the close code.
async fn wait_for_close(socket: &mut Socket, within: Duration) -> Option<u16> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match actix_rt::time::timeout(left, socket.next()).await.expect("server did not close the socket in time") {
            Some(Ok(Frame::Close(reason))) => return reason.map(|r| u16::from(r.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

#[actix_web::test]
async fn silent_clients_are_dropped_after_the_idle_timeout() {
    let mut s = settings();
    s.ws.ws_heartbeat = duration(Duration::from_millis(100));
    s.ws.ws_idle_timeout = duration(Duration::from_millis(300));
    let app = spawn_app_with(s).await;
    let mut socket = open(&app).await;
    let started = Instant::now();
    assert_eq!(wait_for_close(&mut socket, Duration::from_secs(5)).await, Some(1001));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[actix_web::test]
async fn oversized_frames_close_the_connection() {
    let app = spawn_app().await;
    let mut socket = open(&app).await;
    let huge = json!({"subscribe": vec!["x".repeat(100); 1000]}).to_string();
    assert!(huge.len() > 64 * 1024);
    socket.send(Message::Text(huge.into())).await.unwrap();
    assert_eq!(wait_for_close(&mut socket, Duration::from_secs(5)).await, Some(1009));
}

#[actix_web::test]
async fn the_subscription_cap_and_the_origin_allowlist_hold() {
    let mut s = settings();
    s.ws.ws_max_subscriptions = 2;
    s.ws.ws_allowed_origins = Some(vec!["http://good.example".into()]);
    let app = spawn_app_with(s).await;
    let refused = app.client.ws(app.url("/ws")).origin("http://evil.example").connect().await;
    match refused {
        Err(awc::error::WsClientError::InvalidResponseStatus(status)) => assert_eq!(status.as_u16(), 403),
        other => panic!("expected 403, got {:?}", other.map(|(r, _)| r.status())),
    }
    let (_, mut socket) = app.client.ws(app.url("/ws")).origin("http://good.example").connect().await.unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(id_of(&app.submit_pdf(&json!({"title": format!("cap {n}")})).await).to_string());
    }
    send(&mut socket, json!({"subscribe": ids[..2]})).await;
    for _ in 0..2 {
        assert_eq!(next(&mut socket, Duration::from_secs(5)).await["type"], "job");
    }
    send(&mut socket, json!({"subscribe": [ids[2].clone()]})).await;
    loop {
        let frame = next(&mut socket, Duration::from_secs(5)).await;
        if frame["type"] == "error" {
            assert_eq!(frame["code"], "too_many_subscriptions");
            break;
        }
        assert_ne!(id_of(&frame["job"]), ids[2], "a third job was followed");
    }
    send(&mut socket, json!({"unsubscribe": [ids[0].clone()]})).await;
    send(&mut socket, json!({"subscribe": [ids[2].clone()]})).await;
    loop {
        let frame = next(&mut socket, Duration::from_secs(5)).await;
        if frame["type"] == "job" && id_of(&frame["job"]) == ids[2] {
            break;
        }
        assert_ne!(frame["type"], "error", "{frame}");
    }
}

#[actix_web::test]
async fn one_id_named_many_times_in_a_frame_is_one_subscription() {
    let mut s = settings();
    s.ws.ws_max_subscriptions = 2;
    let app = spawn_app_with(s).await;
    let (_, mut socket) = app.client.ws(app.url("/ws")).connect().await.unwrap();
    let a = id_of(&app.submit_pdf(&json!({"title": "a"})).await).to_string();
    let b = id_of(&app.submit_pdf(&json!({"title": "b"})).await).to_string();
    // 1,001 copies of one id, then two of another: two subscriptions, within a cap of 2.
    send(&mut socket, json!({"subscribe": vec![a.clone(); 1001]})).await;
    send(&mut socket, json!({"subscribe": [b.clone(), b.clone()]})).await;
    let (mut seen_a, mut seen_b) = (false, false);
    while !(seen_a && seen_b) {
        let frame = next(&mut socket, Duration::from_secs(5)).await;
        assert_eq!(frame["type"], "job", "no error expected: {frame}");
        seen_a |= id_of(&frame["job"]) == a;
        seen_b |= id_of(&frame["job"]) == b;
    }
}

/// `GET /ws` with `headers` (CRLF-ended lines) over a plain connection: the status, the headers
/// (names lowercased) and the body. Raw, because an HTTP client treats `Connection: Upgrade` as
/// its own business.
fn raw_ws_request(addr: &str, headers: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /ws HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf).expect("an answer in time");
        assert!(n > 0, "closed before the head: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(got[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let fields: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let length: usize = fields.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = got[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut buf).expect("the body in time");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&buf[..n]);
    }
    (status, fields, body)
}

#[actix_web::test]
async fn a_get_that_is_not_a_websocket_handshake_is_refused_as_documented() {
    let app = spawn_app().await;
    let addr = app.address.trim_start_matches("http://").to_string();
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("a plain GET", String::new(), 426, "upgrade_required"),
        ("Upgrade without Connection: Upgrade", "Upgrade: websocket\r\n".into(), 426, "upgrade_required"),
        ("Connection: Upgrade without Upgrade", "Connection: Upgrade\r\n".into(), 426, "upgrade_required"),
        ("an upgrade to another protocol", "Upgrade: h2c\r\nConnection: Upgrade\r\n".into(), 426, "upgrade_required"),
        ("WebSocket version 8", format!("{upgrade}{key}Sec-WebSocket-Version: 8\r\n"), 426, "upgrade_required"),
        ("no Sec-WebSocket-Version", format!("{upgrade}{key}"), 400, "bad_request"),
        ("no Sec-WebSocket-Key", format!("{upgrade}Sec-WebSocket-Version: 13\r\n"), 400, "bad_request"),
        (
            "a short Sec-WebSocket-Key",
            format!("{upgrade}Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n"),
            400,
            "bad_request",
        ),
    ];
    for (what, headers, status, code) in cases {
        let addr = addr.clone();
        let (got, fields, body) =
            actix_web::rt::task::spawn_blocking(move || raw_ws_request(&addr, &headers)).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(got, status, "{what}: {text}");
        let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.to_ascii_lowercase());
        assert!(field("content-type").unwrap_or_default().starts_with("application/json"), "{what}: {fields:?}");
        let error: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
        assert_eq!(error["error"]["code"], code, "{what}: {error}");
        if status == 426 {
            assert_eq!(field("upgrade").as_deref(), Some("websocket"), "{what}: {fields:?}");
            let connection = field("connection").unwrap_or_default();
            assert!(connection.split(',').any(|o| o.trim() == "upgrade"), "{what}: Connection {connection:?}");
            assert_eq!(field("sec-websocket-version").as_deref(), Some("13"), "{what}: {fields:?}");
        }
    }
    // A real handshake still opens the socket.
    let mut socket = open(&app).await;
    let job = app.submit_pdf(&json!({"title": "after the refusals"})).await;
    send(&mut socket, json!({"subscribe": [id_of(&job)]})).await;
    assert_eq!(next(&mut socket, Duration::from_secs(5)).await["type"], "job");
}
