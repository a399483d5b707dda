//! `spawn_app` and small HTTP helpers shared by every test module.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use offload::configuration::Settings;
use offload::startup::Application;
use serde_json::Value;

pub struct TestApp {
    pub address: String,
    pub client: awc::Client,
}

/// A response reduced to what tests look at.
pub struct Reply {
    pub status: StatusCode,
    pub headers: awc::http::header::HeaderMap,
    pub body: bytes::Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }

    /// Asserts the API's error format with `status` and `code`; returns the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        self.expect_error(status, code, "")
    }

    /// As [`Reply::assert_error`], naming `context` (e.g. the request) when it fails.
    pub fn expect_error(&self, status: u16, code: &str, context: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "{context}: body {}", String::from_utf8_lossy(&self.body));
        assert!(
            self.header("content-type").unwrap_or_default().starts_with("application/json"),
            "{context}: error without JSON content type"
        );
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{context}: body {body}");
        let message = body["error"]["message"].as_str().expect("message").to_string();
        assert!(!message.is_empty());
        message
    }
}

/// Settings for a test server: port 0, two PDF workers, the repo's static directory.
pub fn settings() -> Settings {
    let mut s = Settings::defaults();
    s.bind = "127.0.0.1:0".parse().unwrap();
    s.pdf_workers = Some(2);
    s.http_workers = Some(2);
    s.static_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/static").into();
    s
}

pub fn duration(d: Duration) -> humantime::Duration {
    d.into()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(settings()).await
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let app = Application::with_listener(settings, listener).expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    actix_rt::spawn(app.run_until_stopped());
    let client = awc::Client::builder().timeout(Duration::from_secs(30)).finish();
    TestApp { address, client }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    async fn reply(
        mut res: awc::ClientResponse<
            impl futures::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>> + Unpin,
        >,
    ) -> Reply {
        let body = res.body().limit(64 << 20).await.expect("read body");
        Reply { status: res.status(), headers: res.headers().clone(), body }
    }

    pub async fn get(&self, path: &str) -> Reply {
        Self::reply(self.client.get(self.url(path)).send().await.expect("GET")).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        Self::reply(self.client.delete(self.url(path)).send().await.expect("DELETE")).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        Self::reply(self.client.post(self.url(path)).send_json(body).await.expect("POST")).await
    }

    pub async fn request(&self, method: &str, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Reply {
        let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, self.url(path));
        if let Some(ct) = content_type {
            req = req.insert_header(("content-type", ct));
        }
        Self::reply(req.send_body(body).await.expect("request")).await
    }

    /// Submits a PDF job, asserting 202; returns the job object.
    pub async fn submit_pdf(&self, spec: &Value) -> Value {
        let reply = self.post_json("/generate-pdf", spec).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&reply.body));
        let job = reply.json();
        assert_eq!(reply.header("location").unwrap(), format!("/jobs/{}", job["id"].as_str().unwrap()));
        job
    }

    pub async fn job(&self, id: &str) -> Value {
        let reply = self.get(&format!("/jobs/{id}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
        reply.json()
    }

    /// Polls the job until `done` holds, failing the test after `within`.
    pub async fn wait_for(&self, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "job did not reach the expected state in {within:?}: {job}");
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls until the job has ended (succeeded, failed or cancelled).
    pub async fn wait_finished(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(30), |j| {
            matches!(j["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
        })
        .await
    }
}

pub fn id_of(job: &Value) -> &str {
    job["id"].as_str().expect("job id")
}

/// A document whose table has `rows` rows of 5 columns, like the peers' benchmark document.
pub fn report(rows: usize) -> Value {
    let rows: Vec<Value> = (1..=rows)
        .map(|n| {
            serde_json::json!([
                n,
                format!("Widget {n}"),
                (n * 7) % 13 + 1,
                format!("{:.2}", 1.0 + ((n * 37) % 1000) as f64 / 10.0),
                "x"
            ])
        })
        .collect();
    serde_json::json!({
        "title": "Quarterly report",
        "subtitle": "Generated by the offload tests",
        "paragraphs": ["This report lists every widget we sold. It is long enough to wrap over more than one line on an A4 page, which the layout must handle."],
        "table": {"columns": ["#", "Item", "Qty", "Unit price", "Note"], "rows": rows},
    })
}

/// Text of a PDF via poppler's `pdftotext` (installed by scripts/test.sh).
pub fn pdf_text(pdf: &[u8]) -> String {
    poppler("pdftotext", &["-layout"], pdf, &["-"])
}

/// `pdfinfo` output (page count, page size).
pub fn pdf_info(pdf: &[u8]) -> String {
    poppler("pdfinfo", &[], pdf, &[])
}

/// Runs a poppler tool on `pdf` (written to a temporary file) and returns its output.
fn poppler(tool: &str, before: &[&str], pdf: &[u8], after: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("offload-test-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("doc.pdf");
    std::fs::write(&path, pdf).unwrap();
    let out = std::process::Command::new(tool)
        .args(before)
        .arg(&path)
        .args(after)
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed (poppler-utils): {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// One part of a multipart/form-data body.
pub struct Part {
    pub name: &'static str,
    pub filename: Option<String>,
    pub content_type: Option<&'static str>,
    pub data: Vec<u8>,
}

impl Part {
    pub fn file(filename: &str, content_type: &'static str, data: Vec<u8>) -> Self {
        Part { name: "file", filename: Some(filename.to_string()), content_type: Some(content_type), data }
    }

    pub fn text(name: &'static str, value: &str) -> Self {
        Part { name, filename: None, content_type: None, data: value.as_bytes().to_vec() }
    }
}

pub const BOUNDARY: &str = "offload-test-boundary-7MA4YWxkTrZu0gW";

pub fn multipart(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match &p.filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\n", p.name, f).as_bytes(),
            ),
            None => {
                body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{}\"\r\n", p.name).as_bytes())
            }
        }
        if let Some(ct) = p.content_type {
            body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(&p.data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

impl TestApp {
    pub async fn upload(&self, parts: &[Part]) -> Reply {
        let ct = format!("multipart/form-data; boundary={BOUNDARY}");
        let ct: &'static str = Box::leak(ct.into_boxed_str());
        self.request("POST", "/images", Some(ct), multipart(parts)).await
    }

    /// Uploads, asserts 202, returns the jobs.
    pub async fn submit_images(&self, parts: &[Part]) -> Vec<Value> {
        let reply = self.upload(parts).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&reply.body));
        reply.json()["jobs"].as_array().unwrap().clone()
    }
}
