//! The browser page is built into the binary: the real binary started in an empty directory serves
//! it, with every file the page references; `--static-dir` serves a directory instead.

use std::collections::BTreeSet;
use std::path::Path;

use crate::helpers::{fresh_data_dir, Reply, TestApp};
use crate::process::{listening, spawn_in};

const STATIC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/static");

/// The local paths an HTML file links to or loads (`href="/…"`, `src="/…"`).
fn references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attr in ["href=\"", "src=\""] {
        for (at, _) in html.match_indices(attr) {
            let rest = &html[at + attr.len()..];
            let value = &rest[..rest.find('"').expect("a closed attribute")];
            if value.starts_with('/') && !value.starts_with("//") {
                found.push(value.to_string());
            }
        }
    }
    found
}

/// The type a file of the page must be served with, from its extension.
fn expected_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("js") => "text/javascript",
        Some("css") => "text/css",
        Some("json") => "application/json",
        _ => "text/html",
    }
}

/// The file of `static/` that `path` is, if it is one (`/` is `index.html`).
fn on_disk(path: &str) -> Option<Vec<u8>> {
    let name = if path == "/" { "index.html" } else { path.trim_start_matches('/') };
    std::fs::read(Path::new(STATIC).join(name)).ok()
}

async fn get_with(app: &TestApp, method: &str, path: &str, headers: &[(&str, &[u8])]) -> Reply {
    app.request_with_headers(method, path, headers, Vec::new()).await
}

#[actix_web::test]
async fn the_binary_serves_its_built_in_page_from_an_empty_directory() {
    let cwd = tempfile::tempdir().expect("a working directory");
    let offload = listening(spawn_in(cwd.path(), &fresh_data_dir(), &[]));
    let app = &offload.app;

    // From `/`, every page and every file they reference, each once.
    let mut seen = BTreeSet::new();
    let mut queue = vec!["/".to_string()];
    while let Some(path) = queue.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let reply = app.get(&path).await;
        assert_eq!(reply.status, 200, "GET {path}: {}", String::from_utf8_lossy(&reply.body));
        let content_type = reply.header("content-type").unwrap_or_default();
        assert!(content_type.starts_with(expected_type(&path)), "GET {path}: {content_type}");
        if content_type.starts_with("text/html") {
            queue.extend(references(std::str::from_utf8(&reply.body).expect("UTF-8 HTML")));
        }
        let Some(file) = on_disk(&path) else { continue };
        assert!(reply.body == file, "GET {path}: not the file of static/");
        let etag = reply.header("etag").unwrap_or_else(|| panic!("GET {path}: no ETag"));
        assert_eq!(reply.header("cache-control").as_deref(), Some("no-cache"), "GET {path}");

        let head = get_with(app, "HEAD", &path, &[]).await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} sent a body");
        assert_eq!(head.header("content-type"), reply.header("content-type"), "HEAD {path}");
        assert_eq!(head.header("etag").as_deref(), Some(etag.as_str()), "HEAD {path}");

        let again = get_with(app, "GET", &path, &[("if-none-match", etag.as_bytes())]).await;
        assert_eq!((again.status.as_u16(), again.body.len()), (304, 0), "GET {path} with its ETag");
        let other = get_with(app, "GET", &path, &[("if-none-match", b"\"0000000000000000\"")]).await;
        assert_eq!(other.status, 200, "GET {path} with another ETag");
    }
    for page_file in ["/", "/app.js", "/style.css", "/api.html", "/api.js"] {
        assert!(seen.contains(page_file), "{page_file} is not reached from /: {seen:?}");
    }
    let index = app.get("/index.html").await;
    assert_eq!(index.status, 200);
    assert!(index.body == on_disk("/").unwrap(), "/index.html is not the page");

    let missing = [
        ("GET", "/no-such-page.html", 404, "not_found"),
        ("GET", "/static/index.html", 404, "not_found"),
        ("GET", "/app.js/", 404, "not_found"),
        ("GET", "/../Cargo.toml", 404, "not_found"),
        ("POST", "/no-such-page.html", 404, "not_found"),
        ("POST", "/", 405, "method_not_allowed"),
        ("PUT", "/style.css", 405, "method_not_allowed"),
    ];
    for (method, path, status, code) in missing {
        let reply = get_with(app, method, path, &[]).await;
        reply.expect_error(status, code, &format!("{method} {path}"));
        if status == 405 {
            assert_eq!(reply.header("allow").as_deref(), Some("GET, HEAD"), "{method} {path}");
        }
    }
}

#[actix_web::test]
async fn a_static_dir_replaces_the_built_in_page() {
    let cwd = tempfile::tempdir().expect("a working directory");
    let page = tempfile::tempdir().expect("a page directory");
    let custom = "<!doctype html><title>custom page</title>\n";
    std::fs::write(page.path().join("index.html"), custom).unwrap();
    let dir = page.path().to_str().unwrap();
    let offload = listening(spawn_in(cwd.path(), &fresh_data_dir(), &["--static-dir", dir]));
    let app = &offload.app;

    let index = app.get("/").await;
    assert_eq!(index.status, 200);
    assert!(index.header("content-type").unwrap_or_default().starts_with("text/html"));
    assert_eq!(String::from_utf8_lossy(&index.body), custom);
    // Only that directory: the built-in files are not served beside it.
    get_with(app, "GET", "/app.js", &[]).await.assert_error(404, "not_found");
    get_with(app, "PUT", "/index.html", &[]).await.assert_error(405, "method_not_allowed");
}
