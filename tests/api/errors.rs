//! Every class of bad input gets the JSON error with the right status, and the service stays
//! healthy afterwards.

use serde_json::json;

use crate::helpers::{id_of, settings, spawn_app, spawn_app_with};

/// method, path, content type, body, expected status, expected code
type Case = (&'static str, String, Option<&'static str>, Vec<u8>, u16, &'static str);

#[actix_web::test]
async fn bad_requests_get_json_errors_and_harm_nothing() {
    let mut s = settings();
    s.server.max_json_body = "64KiB".parse().unwrap();
    s.pdf.max_rows = 10;
    s.pdf.max_columns = 3;
    s.pdf.max_cell_chars = 20;
    let app = spawn_app_with(s).await;

    let json = |v: serde_json::Value| v.to_string().into_bytes();
    let big = json(json!({"title": "t", "paragraphs": ["x".repeat(70_000)]}));
    let unknown = "0123456789abcdef0123456789abcdef";
    let cases: Vec<Case> = vec![
        ("POST", "/generate-pdf".into(), Some("application/json"), b"{\"title\": ".to_vec(), 400, "malformed_json"),
        ("POST", "/generate-pdf".into(), Some("application/json"), b"not json".to_vec(), 400, "malformed_json"),
        (
            "POST",
            "/generate-pdf".into(),
            Some("text/plain"),
            json(json!({"title": "t"})),
            415,
            "unsupported_media_type",
        ),
        ("POST", "/generate-pdf".into(), None, json(json!({"title": "t"})), 415, "unsupported_media_type"),
        ("POST", "/generate-pdf".into(), Some("application/json"), json(json!({})), 422, "invalid_field"),
        ("POST", "/generate-pdf".into(), Some("application/json"), json(json!({"title": 5})), 422, "invalid_field"),
        ("POST", "/generate-pdf".into(), Some("application/json"), json(json!([1, 2])), 422, "invalid_field"),
        // Fields by position (serde's derived structs take arrays): refused, whole body or nested.
        (
            "POST",
            "/generate-pdf".into(),
            Some("application/json"),
            json(json!(["T", null, ["p"], [["A"]], "Letter"])),
            422,
            "invalid_field",
        ),
        (
            "POST",
            "/generate-pdf".into(),
            Some("application/json"),
            json(json!({"title": "t", "table": [["A", "B"], [["x", "y"]]]})),
            422,
            "invalid_field",
        ),
        (
            "POST",
            "/generate-pdf".into(),
            Some("application/json"),
            json(json!({"title": "t", "colour": "red"})),
            422,
            "invalid_field",
        ),
        ("POST", "/generate-pdf".into(), Some("application/json"), json(json!({"title": " "})), 422, "invalid_field"),
        (
            "POST",
            "/generate-pdf".into(),
            Some("application/json"),
            json(json!({"title": "t", "page_size": "A3"})),
            422,
            "invalid_field",
        ),
        (
            "POST",
            "/generate-pdf".into(),
            Some("application/json"),
            json(json!({"title": "t", "table": {"columns": ["a"], "rows": vec![["x"]; 11]}})),
            422,
            "too_many_rows",
        ),
        (
            "POST",
            "/generate-pdf".into(),
            Some("application/json"),
            json(json!({"title": "t", "table": {"columns": ["a", "b", "c", "d"]}})),
            422,
            "too_many_columns",
        ),
        (
            "POST",
            "/generate-pdf".into(),
            Some("application/json"),
            json(json!({"title": "t", "table": {"columns": ["a"], "rows": [["x".repeat(21)]]}})),
            422,
            "cell_too_long",
        ),
        (
            "POST",
            "/generate-pdf".into(),
            Some("application/json"),
            json(json!({"title": "t", "table": {"columns": ["a"], "rows": [[{"nested": true}]]}})),
            422,
            "invalid_field",
        ),
        ("POST", "/generate-pdf".into(), Some("application/json"), big, 413, "payload_too_large"),
        ("GET", "/no/such/route".into(), None, vec![], 404, "not_found"),
        ("POST", "/no/such/route".into(), Some("application/json"), b"{}".to_vec(), 404, "not_found"),
        ("GET", "/generate-pdf".into(), None, vec![], 405, "method_not_allowed"),
        ("PUT", format!("/jobs/{unknown}"), None, vec![], 405, "method_not_allowed"),
        ("POST", "/healthz".into(), None, vec![], 405, "method_not_allowed"),
        ("GET", "/jobs/not-a-job-id".into(), None, vec![], 404, "job_not_found"),
        ("GET", format!("/jobs/{unknown}"), None, vec![], 404, "job_not_found"),
        ("GET", format!("/jobs/{unknown}/result"), None, vec![], 404, "job_not_found"),
        ("DELETE", format!("/jobs/{unknown}"), None, vec![], 404, "job_not_found"),
        ("GET", "/jobs?status=bogus".into(), None, vec![], 422, "invalid_query"),
        ("GET", "/jobs?kind=video".into(), None, vec![], 422, "invalid_query"),
        ("GET", "/jobs?limit=0".into(), None, vec![], 422, "invalid_query"),
        ("GET", "/jobs?limit=lots".into(), None, vec![], 422, "invalid_query"),
        ("GET", "/jobs?limit=5&limit=6".into(), None, vec![], 422, "invalid_query"),
        ("GET", "/static/../Cargo.toml".into(), None, vec![], 404, "not_found"),
        // The page's files take GET and HEAD only; a file that is not there is not found.
        ("POST", "/".into(), None, vec![], 405, "method_not_allowed"),
        ("TRACE", "/".into(), None, vec![], 405, "method_not_allowed"),
        ("PUT", "/app.js".into(), None, vec![], 405, "method_not_allowed"),
        ("POST", "/no-such-file.js".into(), None, vec![], 404, "not_found"),
        ("POST", "/../Cargo.toml".into(), None, vec![], 404, "not_found"),
        ("HEAD", format!("/jobs/{unknown}"), None, vec![], 404, ""),
    ];
    for (method, path, content_type, body, status, code) in cases {
        let reply = app.request(method, &path, content_type, body).await;
        if method == "HEAD" {
            // The status of GET, without a body.
            assert_eq!((reply.status.as_u16(), reply.body.len()), (status, 0), "{method} {path}");
            continue;
        }
        let message = reply.expect_error(status, code, &format!("{method} {path}"));
        if status == 405 {
            assert!(reply.header("allow").is_some(), "{method} {path}: 405 without Allow");
        }
        if code == "too_many_rows" {
            assert!(message.starts_with("table.rows"), "{message}");
        }
    }

    assert_eq!(app.get("/healthz").await.status.as_u16(), 200);
    let job = app.submit_pdf(&json!({"title": "still fine"})).await;
    assert_eq!(app.wait_finished(id_of(&job)).await["status"], "succeeded");
}

#[actix_web::test]
async fn head_works_like_get_on_every_get_route_without_a_body() {
    let app = spawn_app().await;
    let job = app.submit_pdf(&json!({"title": "head"})).await;
    app.wait_finished(id_of(&job)).await;
    let id = id_of(&job);
    for path in [
        "/jobs".to_string(),
        format!("/jobs/{id}"),
        format!("/jobs/{id}/result"),
        "/analytics/summary".into(),
        "/metrics".into(),
        "/healthz".into(),
        "/readyz".into(),
        "/".into(),
        "/app.js".into(),
    ] {
        let get = app.get(&path).await;
        let head = app.request("HEAD", &path, None, vec![]).await;
        assert_eq!(get.status.as_u16(), 200, "GET {path}");
        assert_eq!(head.status, get.status, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} sent a body");
        assert_eq!(head.header("content-type"), get.header("content-type"), "HEAD {path}");
    }
    let allow = app.request("DELETE", "/healthz", None, vec![]).await.header("allow").unwrap_or_default();
    assert!(allow.contains("HEAD"), "{allow}");
}

#[actix_web::test]
async fn a_result_that_is_not_ready_is_a_conflict() {
    let app = spawn_app_with(settings()).await;
    let job = app.submit_pdf(&json!({"title": "slow", "test_hook": "hang"})).await;
    let id = id_of(&job);
    app.get(&format!("/jobs/{id}/result")).await.assert_error(409, "result_not_ready");
    app.delete(&format!("/jobs/{id}")).await;
    app.get(&format!("/jobs/{id}/result")).await.assert_error(409, "result_not_ready");
    app.delete(&format!("/jobs/{id}")).await.assert_error(409, "job_finished");
}
