//! Listing jobs, health and readiness, the browser page.

use serde_json::json;

use crate::helpers::{id_of, spawn_app};

#[actix_web::test]
async fn jobs_are_listed_newest_first_with_filters() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let job = app.submit_pdf(&json!({"title": format!("doc {n}")})).await;
        ids.push(id_of(&job).to_string());
    }
    for id in &ids {
        app.wait_finished(id).await;
    }
    let all = app.get("/jobs").await.json();
    let listed: Vec<&str> = all["jobs"].as_array().unwrap().iter().map(id_of).collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);

    let one = app.get("/jobs?limit=1&kind=pdf&status=succeeded").await.json();
    assert_eq!(one["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(id_of(&one["jobs"][0]), ids[2]);
    assert_eq!(all["counts"]["succeeded"], 3);
    assert_eq!(all["counts"]["queued"], 0);
    let none = app.get("/jobs?status=running").await.json();
    assert!(none["jobs"].as_array().unwrap().is_empty());
    let images = app.get("/jobs?kind=image").await.json();
    assert!(images["jobs"].as_array().unwrap().is_empty());
}

#[actix_web::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status.as_u16(), 200);
    assert_eq!(health.json()["status"], "ok");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status.as_u16(), 200);
    assert_eq!(ready.json()["status"], "ready");
}

#[actix_web::test]
async fn the_browser_page_is_served_at_the_root() {
    let app = spawn_app().await;
    let page = app.get("/").await;
    assert_eq!(page.status.as_u16(), 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(String::from_utf8_lossy(&page.body).contains("offload"));
}

#[actix_web::test]
async fn the_container_health_probe_reports_through_its_exit_code() {
    let app = spawn_app().await;
    let bind = app.address.trim_start_matches("http://").to_string();
    let probe = |bind: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_offload"))
            .args(["--healthcheck", "--bind", &bind])
            .status()
            .unwrap()
    };
    let healthy = actix_web::rt::task::spawn_blocking(move || probe(bind)).await.unwrap();
    assert!(healthy.success());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let down = actix_web::rt::task::spawn_blocking(move || probe(closed)).await.unwrap();
    assert_eq!(down.code(), Some(1));
}
