//! Analytics: ingestion, the summary, job events, forwarding to a sink (slow, failing, dead) and
//! the actor's restart after a panic.

use std::time::{Duration, Instant};

use awc::http::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{closed_port, duration, id_of, report, settings, spawn_app, spawn_app_with, Behaviour, Receiver};

fn sink_settings(url: &str) -> offload::configuration::Settings {
    let mut s = settings();
    s.analytics_sink.analytics_sink = Some(url.parse().unwrap());
    s.analytics_sink.analytics_batch_size = 50;
    s.analytics_sink.analytics_flush_interval = duration(Duration::from_millis(50));
    s.analytics_sink.analytics_sink_backoff = duration(Duration::from_millis(50));
    s
}

/// Events of all forwarded batches, in order.
fn forwarded(requests: &[crate::helpers::Received]) -> Vec<Value> {
    requests
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| r.json().as_array().expect("a batch is a JSON array").clone())
        .collect()
}

#[actix_rt::test]
async fn events_are_counted_in_the_summary() {
    let app = spawn_app().await;
    let one = app.post_json("/analytics/events", &json!({"name": "page_view", "user": "ann"})).await;
    assert_eq!(one.status, StatusCode::ACCEPTED);
    assert_eq!(one.json(), json!({"accepted": 1}));
    let batch = json!([
        {"name": "page_view", "user": "bob", "timestamp": "2026-11-21T10:00:30Z"},
        {"name": "signup", "user": "ann", "properties": {"plan": "pro"}, "timestamp": "2026-11-21T10:00:59.999+00:00"},
        {"name": "signup", "timestamp": "2026-11-21T12:01:00+02:00"}
    ]);
    let many = app.post_json("/analytics/events", &batch).await;
    assert_eq!(many.status, StatusCode::ACCEPTED);
    assert_eq!(many.json(), json!({"accepted": 3}));

    let s = app.summary().await;
    assert_eq!(s["total"], 4, "{s}");
    assert_eq!(s["by_name"], json!({"page_view": 2, "signup": 2}));
    assert_eq!(s["unique_users"], 2);
    let minutes = s["per_minute"].as_array().unwrap();
    let find = |m: &str| minutes.iter().find(|e| e["minute"] == m).map(|e| e["count"].clone());
    assert_eq!(find("2026-11-21T10:00:00Z"), Some(json!(2)), "{s}");
    assert_eq!(find("2026-11-21T10:01:00Z"), Some(json!(1)), "offsets are honoured: {s}");
    assert_eq!(minutes.iter().map(|m| m["count"].as_u64().unwrap()).sum::<u64>(), 4);
    assert_eq!(
        (s["dropped"].clone(), s["forwarded"].clone(), s["sink_errors"].clone()),
        (json!(0), json!(0), json!(0))
    );
}

#[actix_rt::test]
async fn the_service_records_its_own_job_events() {
    let app = spawn_app().await;
    let ok = app.submit_pdf(&report(5)).await;
    let failing = app.submit_pdf(&json!({"title": "boom", "test_hook": "panic"})).await;
    let slow = app.submit_pdf(&json!({"title": "slow", "test_hook": {"slow_pages": {"millis": 5000}}})).await;
    assert_eq!(app.delete(&format!("/jobs/{}", id_of(&slow))).await.status, StatusCode::OK);
    app.wait_finished(id_of(&ok)).await;
    app.wait_finished(id_of(&failing)).await;
    let s = app
        .wait_summary(Duration::from_secs(10), |s| {
            s["by_name"]["job_succeeded"] == 1 && s["by_name"]["job_failed"] == 1 && s["by_name"]["job_cancelled"] == 1
        })
        .await;
    assert_eq!(s["by_name"]["job_submitted"], 3, "{s}");
    assert_eq!(s["total"], 6);
}

#[actix_rt::test]
async fn bad_events_are_refused_and_change_nothing() {
    let mut s = settings();
    s.analytics.analytics_max_batch = 3;
    s.server.max_json_body = offload::configuration::ByteSize(4096);
    s.analytics.analytics_max_properties = offload::configuration::ByteSize(1024);
    let app = spawn_app_with(s).await;
    let json_ct = Some("application/json");
    let big = json!({"name": "x", "properties": {"blob": "y".repeat(5000)}}).to_string();
    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        ("not JSON", json_ct, "{name: page_view}".into(), 400, "malformed_json"),
        ("no content type", None, r#"{"name":"a"}"#.into(), 415, "unsupported_media_type"),
        ("text content type", Some("text/plain"), r#"{"name":"a"}"#.into(), 415, "unsupported_media_type"),
        ("empty body", json_ct, String::new(), 400, "malformed_json"),
        ("a string", json_ct, r#""page_view""#.into(), 422, "invalid_event"),
        ("empty array", json_ct, "[]".into(), 422, "no_events"),
        (
            "too many",
            json_ct,
            r#"[{"name":"a"},{"name":"a"},{"name":"a"},{"name":"a"}]"#.into(),
            422,
            "too_many_events",
        ),
        ("no name", json_ct, r#"{"user":"u"}"#.into(), 422, "invalid_event"),
        ("empty name", json_ct, r#"{"name":""}"#.into(), 422, "invalid_event"),
        ("numeric name", json_ct, r#"{"name":5}"#.into(), 422, "invalid_event"),
        ("bad timestamp", json_ct, r#"{"name":"a","timestamp":"2026-11-21 10:00"}"#.into(), 422, "invalid_event"),
        ("properties not an object", json_ct, r#"{"name":"a","properties":"x"}"#.into(), 422, "invalid_event"),
        (
            "properties over the limit (1 KiB here)",
            json_ct,
            json!({"name": "a", "properties": {"k": "x".repeat(2000)}}).to_string(),
            422,
            "invalid_event",
        ),
        ("unknown field", json_ct, r#"{"name":"a","usr":"u"}"#.into(), 422, "invalid_event"),
        ("one bad in a batch", json_ct, r#"[{"name":"a"},{"nam":"b"}]"#.into(), 422, "invalid_event"),
        ("too large", json_ct, big, 413, "payload_too_large"),
    ];
    for (what, ct, body, status, code) in cases {
        let reply = app.request("POST", "/analytics/events", ct, body.into_bytes()).await;
        reply.expect_error(status, code, what);
    }
    app.request("GET", "/analytics/events", None, vec![]).await.expect_error(405, "method_not_allowed", "GET");
    let s = app.summary().await;
    assert_eq!(s["total"], 0, "a refused request takes no events: {s}");
    let ok = app.post_json("/analytics/events", &json!([{"name": "a"}, {"name": "b"}])).await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "the service still takes good events");
}

#[actix_rt::test]
async fn batches_reach_the_sink_and_add_up() {
    let sink = Receiver::start(Behaviour::default()).await;
    let app = spawn_app_with(sink_settings(&format!("{}/ingest", sink.url))).await;
    let mut sent = 0;
    for request in 0..10 {
        let events: Vec<Value> =
            (0..23).map(|i| json!({"name": format!("e{}", (request * 23 + i) % 7), "user": format!("u{i}")})).collect();
        sent += events.len();
        assert_eq!(app.post_json("/analytics/events", &Value::Array(events)).await.status, StatusCode::ACCEPTED);
    }
    let requests = sink.wait_until(Duration::from_secs(10), |r| forwarded(r).len() >= sent).await;
    let events = forwarded(&requests);
    assert_eq!(events.len(), sent, "every event forwarded exactly once");
    for r in &requests {
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
        let n = r.json().as_array().unwrap().len();
        assert!((1..=50).contains(&n), "batch of {n}");
    }
    let names: Vec<String> = events.iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
    let expected: Vec<String> = (0..sent).map(|i| format!("e{}", i % 7)).collect();
    assert_eq!(names, expected, "events arrive in order");
    assert!(events.iter().all(|e| e["timestamp"].as_str().is_some_and(|t| t.ends_with('Z'))));
    let s = app.wait_summary(Duration::from_secs(5), |s| s["forwarded"] == sent).await;
    assert_eq!((s["total"].clone(), s["dropped"].clone(), s["sink_errors"].clone()), (json!(sent), json!(0), json!(0)));
}

#[actix_rt::test]
async fn a_slow_sink_leaves_ingestion_fast() {
    let sink = Receiver::start(Behaviour { delay: Duration::from_secs(2), ..Default::default() }).await;
    let mut s = sink_settings(&sink.url);
    s.analytics_sink.analytics_batch_size = 10;
    let app = spawn_app_with(s).await;
    let mut latencies = Vec::new();
    for i in 0..200 {
        let started = Instant::now();
        let reply = app.post_json("/analytics/events", &json!({"name": "click", "user": format!("u{i}")})).await;
        latencies.push(started.elapsed());
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    assert!(p99 < Duration::from_millis(50), "ingest p99 {p99:?} with a 2 s sink");
    let s = app.summary().await;
    assert_eq!(s["total"], 200);
    assert!(s["forwarded"].as_u64().unwrap() < 200, "the sink is still busy: {s}");
    // It does get there, one 2-second batch at a time.
    sink.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await;
}

#[actix_rt::test]
async fn failed_sink_requests_are_retried() {
    let sink = Receiver::start(Behaviour { fail_first: 2, fail_status: 503, ..Default::default() }).await;
    let app = spawn_app_with(sink_settings(&sink.url)).await;
    let events: Vec<Value> = (0..5).map(|i| json!({"name": "retry_me", "properties": {"i": i}})).collect();
    app.post_json("/analytics/events", &Value::Array(events)).await;
    let requests = sink.wait_until(Duration::from_secs(10), |r| r.iter().any(|x| x.status == 200)).await;
    assert_eq!(requests.iter().map(|r| r.status).collect::<Vec<_>>(), [503, 503, 200]);
    assert_eq!(requests[0].body, requests[2].body, "the same batch is sent again");
    assert_eq!(forwarded(&requests).len(), 5);
    let s = app.wait_summary(Duration::from_secs(5), |s| s["forwarded"] == 5).await;
    assert_eq!((s["sink_errors"].clone(), s["dropped"].clone()), (json!(2), json!(0)));
}

#[actix_rt::test]
async fn a_dead_sink_keeps_at_most_its_byte_budget_of_large_events() {
    // 40 events of ~500 KB for a sink that never answers: a 2 MiB buffer keeps four at most,
    // however many events it may hold by count.
    let mut s = sink_settings(&format!("http://127.0.0.1:{}/", closed_port()));
    s.analytics.analytics_max_properties = "1MiB".parse().unwrap();
    s.analytics_sink.analytics_buffer_bytes = "2MiB".parse().unwrap();
    s.analytics_sink.analytics_sink_attempts = 1;
    s.analytics_sink.analytics_batch_size = 1000;
    s.analytics_sink.analytics_flush_interval = duration(Duration::from_secs(3600));
    let app = spawn_app_with(s).await;
    for _ in 0..40 {
        let event = json!({"name": "big", "properties": {"k": "x".repeat(500_000)}});
        assert_eq!(app.post_json("/analytics/events", &event).await.status, StatusCode::ACCEPTED);
    }
    let s = app.wait_summary(Duration::from_secs(10), |s| s["total"] == 40).await;
    assert!(s["buffered"].as_u64().unwrap() <= 4, "{s}");
    assert!(s["dropped"].as_u64().unwrap() >= 36, "{s}");
}

#[actix_rt::test]
async fn a_dead_sink_drops_what_it_cannot_keep() {
    let mut s = sink_settings(&format!("http://127.0.0.1:{}/", closed_port()));
    s.analytics_sink.analytics_buffer = 100;
    s.analytics_sink.analytics_sink_attempts = 2;
    let app = spawn_app_with(s).await;
    let started = Instant::now();
    for _ in 0..3 {
        let events: Vec<Value> = (0..100).map(|_| json!({"name": "lost"})).collect();
        let reply = app.post_json("/analytics/events", &Value::Array(events)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    assert!(started.elapsed() < Duration::from_secs(1), "ingestion does not wait for the sink");
    let s = app.wait_summary(Duration::from_secs(10), |s| s["dropped"] == 300).await;
    assert_eq!(s["total"], 300, "every event is still counted");
    assert_eq!(s["forwarded"], 0);
    assert!(s["buffered"].as_u64().unwrap() <= 100);
    assert!(s["sink_errors"].as_u64().unwrap() >= 2, "{s}");
    let m = app.metrics().await;
    assert_eq!(m.value("offload_analytics_events_dropped_total", &[]), 300.0);
}

#[actix_rt::test]
async fn a_panic_in_the_analytics_actor_is_survived() {
    let app = spawn_app().await;
    app.post_json("/analytics/events", &json!({"name": "before"})).await;
    assert_eq!(app.summary().await["total"], 1);
    let reply = app.post_json("/analytics/events", &json!({"name": "offload_test_panic"})).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    app.wait_metrics(Duration::from_secs(5), |m| {
        m.value("offload_async_actor_restarts_total", &[("actor", "analytics")]) == 1.0
    })
    .await;
    let reply = app.post_json("/analytics/events", &json!([{"name": "after"}, {"name": "after"}])).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let s = app.wait_summary(Duration::from_secs(5), |s| s["by_name"]["after"] == 2).await;
    assert_eq!(s["by_name"]["before"], 1, "counts from before the panic are kept: {s}");
    let job = app.submit_pdf(&report(3)).await;
    assert_eq!(app.wait_finished(id_of(&job)).await["status"], "succeeded", "jobs are unaffected");
    app.wait_summary(Duration::from_secs(5), |s| s["by_name"]["job_succeeded"] == 1).await;
}
