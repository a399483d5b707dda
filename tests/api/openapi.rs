//! `GET /openapi.json`: the document describes exactly the routes the service serves, and the
//! service answers each with a status the document lists.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::helpers::{id_of, spawn_app};

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            out.insert((path.clone(), method.to_uppercase()));
        }
    }
    out
}

#[actix_web::test]
async fn the_document_lists_every_route_the_service_serves_and_no_other() {
    let app = spawn_app().await;
    let reply = app.get("/openapi.json").await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").unwrap().starts_with("application/json"));
    let doc = reply.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let kinds: Vec<_> =
        offload::startup::builtin_kinds(&crate::helpers::settings()).into_iter().map(|k| k.http).collect();
    let served: BTreeSet<(String, String)> = offload::routes::table(&kinds)
        .iter()
        .flat_map(|(path, verbs)| verbs.iter().map(|v| (path.to_string(), v.as_str().to_string())))
        .collect();
    assert_eq!(operations(&doc), served, "document (left) and route table (right) differ");
    // Every error answer is described with the error object.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().expect("responses") {
                if status.as_str() >= "400" {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/ErrorResponse", "{method} {path} {status}");
                }
            }
        }
    }
}

#[actix_web::test]
async fn every_operation_answers_with_a_status_the_document_lists() {
    let app = spawn_app().await;
    let doc = app.get("/openapi.json").await.json();
    let job = app.submit_pdf(&json!({"title": "documented"})).await;
    app.wait_finished(id_of(&job)).await;
    let id = id_of(&job).to_string();
    for (path, method) in operations(&doc) {
        let url = path.replace("{id}", &id);
        let (content_type, body): (Option<&str>, Vec<u8>) = match (path.as_str(), method.as_str()) {
            ("/generate-pdf", _) => (Some("application/json"), br#"{"title": "t"}"#.to_vec()),
            ("/analytics/events", _) => (Some("application/json"), br#"{"name": "n"}"#.to_vec()),
            ("/images", _) => (Some("multipart/form-data; boundary=x"), b"--x--\r\n".to_vec()),
            _ => (None, vec![]),
        };
        let reply = app.request(&method, &url, content_type, body).await;
        let listed = &doc["paths"][&path][method.to_lowercase()]["responses"];
        let status = reply.status.as_u16().to_string();
        assert!(listed.get(&status).is_some(), "{method} {url} answered {status}, the document lists {listed}");
    }
}

/// Each error code a route answers (as its tests show) is named in the description of its status.
#[actix_web::test]
async fn the_document_names_the_error_codes_of_each_status() {
    let app = spawn_app().await;
    let doc = app.get("/openapi.json").await.json();
    let cases = [
        ("/ws", "get", "400", "bad_request"),
        ("/ws", "get", "403", "origin_not_allowed"),
        ("/ws", "get", "426", "upgrade_required"),
        ("/images", "post", "400", "malformed_multipart"),
        ("/images", "post", "400", "invalid_header"),
        ("/images", "post", "408", "request_timeout"),
        ("/images", "post", "413", "payload_too_large"),
        ("/images", "post", "415", "unsupported_media_type"),
        ("/images", "post", "415", "unsupported_image"),
        ("/images", "post", "422", "missing_file"),
        ("/images", "post", "422", "invalid_op"),
        ("/images", "post", "422", "image_too_large"),
        ("/images", "post", "503", "overloaded"),
    ];
    for (path, method, status, code) in cases {
        let response = &doc["paths"][path][method]["responses"][status];
        let description = response["description"].as_str().unwrap_or_default();
        assert!(
            description.contains(&format!("`{code}`")),
            "{method} {path} {status} does not name {code}: {response}"
        );
    }
    let upgrade = &doc["paths"]["/ws"]["get"]["responses"]["426"]["headers"];
    for header in ["Upgrade", "Connection"] {
        assert!(upgrade.get(header).is_some(), "426 does not list {header}: {upgrade}");
    }
}
