//! A kind of your own through the Rust API: the `csv-summary` kind of `examples/csv_summary`
//! registered beside the built-in ones and served by the whole engine (`POST /jobs`, durable
//! store, idempotency, progress over WebSocket, result download, webhooks, `GET /jobs` filters);
//! and `POST /jobs` for the built-in `pdf` kind and its refusals.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{id_of, settings, spawn_app_with_kinds, Behaviour, Receiver, Reply, TestApp};
use crate::ws::{follow_to_end, open, send};
use offload::startup::KindRegistration;

#[path = "../../examples/csv_summary/kind.rs"]
mod csv_summary;

async fn app_with_csv_summary() -> TestApp {
    let mut s = settings();
    s.webhooks.allow_private_webhooks = true;
    let kind = Arc::new(csv_summary::CsvSummary { max_rows: 50_000 });
    spawn_app_with_kinds(s, vec![KindRegistration::json_only(kind, 1)]).await
}

async fn post_job(app: &TestApp, body: &Value, key: Option<&str>) -> Reply {
    let mut headers: Vec<(&str, &[u8])> = vec![("content-type", b"application/json")];
    if let Some(k) = key {
        headers.push(("idempotency-key", k.as_bytes()));
    }
    app.request_with_headers("POST", "/jobs", &headers, serde_json::to_vec(body).unwrap()).await
}

/// A CSV of `rows` rows: `price` is 1..=rows, `qty` alternates 1 and 3, `note` is text.
fn csv(rows: usize) -> String {
    let mut out = String::from("item,price,qty,note\n");
    for n in 1..=rows {
        out.push_str(&format!("\"item, {n}\",{n},{},\"said \"\"hi\"\"\"\n", if n % 2 == 0 { 3 } else { 1 }));
    }
    out
}

#[actix_web::test]
async fn a_kind_of_your_own_is_submitted_followed_downloaded_and_called_back() {
    let app = app_with_csv_summary().await;
    let receiver = Receiver::start(Behaviour::default()).await;
    let body = json!({
        "kind": "csv-summary",
        "input": {"csv": csv(20_000), "columns": ["price", "qty", "note"]},
        "callback_url": format!("{}/hook", receiver.url),
    });
    let accepted = post_job(&app, &body, Some("summary-1")).await;
    assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
    let job = accepted.json();
    let id = id_of(&job).to_string();
    assert_eq!(job["kind"], "csv-summary");
    assert_eq!(accepted.header("location").as_deref(), Some(format!("/jobs/{id}").as_str()));
    // Followed over the WebSocket to its end, progress never going back.
    let mut socket = open(&app).await;
    send(&mut socket, json!({"subscribe": [id]})).await;
    let events = follow_to_end(&mut socket, &id).await;
    crate::ws::assert_monotonic(&events);
    let last = events.last().unwrap();
    assert_eq!(last["status"], "succeeded", "{last}");
    assert_eq!(last["result"]["content_type"], "application/json", "{last}");
    // The result, as the kind computed it.
    let result = app.get(&format!("/jobs/{id}/result")).await;
    assert_eq!(result.status, 200);
    assert_eq!(result.header("content-type").as_deref(), Some("application/json"));
    let report = result.json();
    assert_eq!(report["rows"], 20_000);
    let price = &report["columns"]["price"];
    assert_eq!(
        (price["count"].as_u64(), price["min"].as_f64(), price["max"].as_f64()),
        (Some(20_000), Some(1.0), Some(20_000.0))
    );
    assert_eq!(price["mean"], 10_000.5);
    assert_eq!(report["columns"]["qty"]["mean"], 2.0);
    assert_eq!(report["columns"]["note"]["not_numbers"], 20_000, "{report}");
    // The webhook: the final job object, once.
    let hooks = receiver.wait_until(Duration::from_secs(10), |r| !r.is_empty()).await;
    assert_eq!(hooks.len(), 1);
    assert_eq!(id_of(&hooks[0].json()), id);
    assert_eq!(hooks[0].json()["status"], "succeeded");
    // A repeat with the key replays; the kind filter lists it.
    let again = post_job(&app, &body, Some("summary-1")).await;
    assert_eq!((again.status.as_u16(), again.header("idempotent-replayed").as_deref()), (202, Some("true")));
    assert_eq!(id_of(&again.json()), id);
    let listed = app.get("/jobs?kind=csv-summary").await.json();
    let ids: Vec<&str> = listed["jobs"].as_array().unwrap().iter().map(id_of).collect();
    assert_eq!(ids, [id.as_str()]);
    assert_eq!(app.get("/jobs?kind=pdf").await.json()["jobs"], json!([]));
}

#[actix_web::test]
async fn post_jobs_runs_a_pdf_and_refuses_what_it_cannot_take() {
    let app = app_with_csv_summary().await;
    let pdf = post_job(&app, &json!({"kind": "pdf", "input": {"title": "Through POST /jobs"}}), None).await;
    assert_eq!(pdf.status, 202, "{}", String::from_utf8_lossy(&pdf.body));
    let done = app.wait_finished(id_of(&pdf.json())).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let bytes = app.get(&format!("/jobs/{}/result", id_of(&done))).await;
    assert!(crate::helpers::pdf_text(&bytes.body).contains("Through POST /jobs"));
    // (body, status, code, a word the message must name)
    let cases = [
        (json!({"kind": "video", "input": {}}), 422, "unknown_kind", "csv-summary"),
        (json!({"kind": "image", "input": {}}), 422, "unknown_kind", "pdf"),
        (json!({"kind": "pdf"}), 422, "invalid_field", "input"),
        (json!({"kind": "pdf", "input": {"title": ""}}), 422, "invalid_field", "title"),
        (
            json!({"kind": "pdf", "input": {"title": "t", "callback_url": "https://example.com"}}),
            422,
            "invalid_field",
            "callback_url",
        ),
        (json!({"kind": "pdf", "input": ["t"]}), 422, "invalid_field", "input"),
        (json!({"kind": "pdf", "input": {"title": "t"}, "delay": 5}), 422, "invalid_field", "delay"),
        (
            json!({"kind": "pdf", "input": {"title": "t"}, "callback_url": "not a url"}),
            422,
            "invalid_callback_url",
            "callback_url",
        ),
        (json!({"kind": "csv-summary", "input": {"csv": ""}}), 422, "invalid_field", "header"),
        (
            json!({"kind": "csv-summary", "input": {"csv": "a,b\n1,2\n", "columns": ["c"]}}),
            422,
            "invalid_field",
            "\"c\"",
        ),
        (json!({"kind": "csv-summary", "input": {"csv": csv(50_001)}}), 422, "too_many_rows", "50001"),
    ];
    for (body, status, code, named) in cases {
        let reply = post_job(&app, &body, None).await;
        let message = reply.expect_error(status, code, &body.to_string());
        assert!(message.contains(named), "{body}: {message:?} does not name {named:?}");
    }
    let counts = app.get("/jobs").await.json()["counts"].clone();
    assert_eq!(counts["succeeded"], 1, "refused requests made no job: {counts}");
}
