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

/// Settings for a test server: port 0, two PDF workers, the page built into the binary.
pub fn settings() -> Settings {
    let mut s = Settings::defaults();
    s.server.bind = "127.0.0.1:0".parse().unwrap();
    s.workers.pdf_workers = Some(2);
    s.server.http_workers = Some(2);
    // The test process also runs the clients, many servers and the test harness: with the default
    // SCHED_IDLE, their busy threads could starve the workers and make deadlines flaky. The
    // reliability test covers `Idle` on its own.
    s.workers.worker_sched = offload::configuration::WorkerSched::Normal;
    // Every in-process server gets a fresh embedded store of its own (the default store).
    s.store.data_dir = fresh_data_dir();
    s
}

/// A new, empty directory for one server's embedded store. All of one test run's directories
/// are under `target/tmp/api-run-PID`; servers run until the test process exits, so they cannot
/// be removed as each test ends: the first call of a run removes the directories of earlier runs
/// whose process is gone.
pub fn fresh_data_dir() -> std::path::PathBuf {
    static RUN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let gone = name
                .strip_prefix("api-run-")
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
            if gone {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        root.join(format!("api-run-{}", std::process::id()))
    });
    let dir = run.join(format!("{:032x}", rand::random::<u128>()));
    std::fs::create_dir_all(&dir).expect("create a data directory");
    dir
}

pub fn duration(d: Duration) -> humantime::Duration {
    d.into()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(settings()).await
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    spawn_app_with_kinds(settings, Vec::new()).await
}

/// A server with kinds of the test's own beside the built-in ones.
pub async fn spawn_app_with_kinds(settings: Settings, kinds: Vec<offload::startup::KindRegistration>) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let app = Application::with_kinds(settings, listener, kinds).expect("build app");
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

    /// Sends a request with these headers (raw bytes, so tests can send any header value).
    pub async fn request_with_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &[u8])],
        body: Vec<u8>,
    ) -> Reply {
        let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, self.url(path));
        for (name, value) in headers {
            let value = awc::http::header::HeaderValue::from_bytes(value)
                .unwrap_or_else(|e| panic!("header {name}: {value:?} cannot be sent: {e}"));
            req = req.insert_header((*name, value));
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
        poll_until(within, Duration::from_millis(10), || self.job(id), done, |job| format!("job {job}")).await
    }

    /// Polls until the job has ended (succeeded, failed or cancelled).
    pub async fn wait_finished(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(30), |j| {
            matches!(j["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
        })
        .await
    }
}

/// Polls `/readyz` until it answers `status`, failing the test after `within`.
pub async fn wait_ready(app: &TestApp, status: u16, within: Duration) -> Reply {
    poll_until(
        within,
        Duration::from_millis(20),
        || app.get("/readyz"),
        |r| r.status.as_u16() == status,
        |r| format!("/readyz {} {}", r.status, String::from_utf8_lossy(&r.body)),
    )
    .await
}

/// Fetches with `fetch` every `every` until `done` holds; fails the test after `within`, showing
/// the last value with `show`.
pub async fn poll_until<T, F: std::future::Future<Output = T>>(
    within: Duration,
    every: Duration,
    fetch: impl Fn() -> F,
    done: impl Fn(&T) -> bool,
    show: impl Fn(&T) -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let value = fetch().await;
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "not in the expected state within {within:?}: {}", show(&value));
        actix_rt::time::sleep(every).await;
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

/// A real HTTP server inside the test, standing in for an analytics sink or a webhook receiver:
/// it records every request and answers as told.
pub struct Receiver {
    pub url: String,
    pub port: u16,
    log: std::sync::Arc<ReceiverLog>,
}

/// How a [`Receiver`] answers.
#[derive(Clone, Copy, Default)]
pub struct Behaviour {
    /// Wait this long before answering each request.
    pub delay: Duration,
    /// Answer the first this many requests with `fail_status`.
    pub fail_first: usize,
    /// Answer every request with `fail_status`.
    pub always_fail: bool,
    pub fail_status: u16,
}

/// One request a [`Receiver`] got.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub headers: awc::http::header::HeaderMap,
    pub body: bytes::Bytes,
    /// What the receiver answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

#[derive(Default)]
struct ReceiverLog {
    requests: std::sync::Mutex<Vec<Received>>,
    changed: tokio::sync::Notify,
    behaviour: std::sync::Mutex<Behaviour>,
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Receiver {
        Self::start_on("127.0.0.1:0", behaviour).await
    }

    /// A receiver listening on `addr` (e.g. `[::1]:0` for IPv6 loopback).
    pub async fn start_on(addr: &str, behaviour: Behaviour) -> Receiver {
        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        let listener = TcpListener::bind(addr).expect("bind port 0");
        let bound = listener.local_addr().unwrap();
        let port = bound.port();
        let log = std::sync::Arc::new(ReceiverLog { behaviour: behaviour.into(), ..Default::default() });
        let server_log = log.clone();
        let server = HttpServer::new(move || {
            let log = server_log.clone();
            App::new().app_data(web::PayloadConfig::new(64 << 20)).default_service(web::to(
                move |req: HttpRequest, body: bytes::Bytes| {
                    let log = log.clone();
                    async move {
                        let behaviour = *log.behaviour.lock().unwrap();
                        let seen = log.requests.lock().unwrap().len();
                        let fail = behaviour.always_fail || seen < behaviour.fail_first;
                        let status = if fail { behaviour.fail_status } else { 200 };
                        if !behaviour.delay.is_zero() {
                            actix_rt::time::sleep(behaviour.delay).await;
                        }
                        let mut headers = awc::http::header::HeaderMap::new();
                        for (k, v) in req.headers() {
                            headers.insert(k.clone(), v.clone());
                        }
                        log.requests.lock().unwrap().push(Received { at: Instant::now(), headers, body, status });
                        log.changed.notify_waiters();
                        HttpResponse::build(awc::http::StatusCode::from_u16(status).unwrap()).finish()
                    }
                },
            ))
        })
        .workers(1)
        .max_connections(10_000)
        .disable_signals()
        .listen(listener)
        .expect("listen")
        .run();
        actix_rt::spawn(server);
        Receiver { url: format!("http://{bound}"), port, log }
    }

    /// Answers the requests from now on as `behaviour` says (`fail_first` still counts every
    /// request received so far).
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.log.behaviour.lock().unwrap() = behaviour;
    }

    pub fn requests(&self) -> Vec<Received> {
        self.log.requests.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the requests received, failing the test after `within`.
    pub async fn wait_until(&self, within: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let changed = self.log.changed.notified();
            let requests = self.requests();
            if done(&requests) {
                return requests;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "receiver: condition not met within {within:?}; got {} requests", requests.len());
            // Re-check at least every 50 ms in case a notification raced the check.
            let _ = actix_rt::time::timeout(left.min(Duration::from_millis(50)), changed).await;
        }
    }
}

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// One scrape of `GET /metrics`, every line checked against the text format's grammar.
pub struct Scrape(Vec<Sample>);

/// One sample line: `name{label="value",...} value`.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels` (0 if there is none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map_or(0.0, |s| s.value)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.name == name)
    }

    /// How many series `name` has.
    pub fn series(&self, name: &str) -> usize {
        self.0.iter().filter(|s| s.name == name).count()
    }

    /// The samples, for failure messages.
    pub fn dump(&self) -> String {
        self.0.iter().map(|s| format!("{} {:?} {}\n", s.name, s.labels, s.value)).collect()
    }
}

impl TestApp {
    pub async fn metrics(&self) -> Scrape {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
        let text = String::from_utf8(reply.body.to_vec()).expect("UTF-8");
        Scrape(text.lines().filter_map(parse_exposition_line).collect())
    }

    /// Polls `/metrics` until `done` holds, failing the test after `within`.
    pub async fn wait_metrics(&self, within: Duration, done: impl Fn(&Scrape) -> bool) -> Scrape {
        poll_until(within, Duration::from_millis(20), || self.metrics(), done, |m| format!("metrics\n{}", m.dump()))
            .await
    }

    /// `GET /analytics/summary`, asserting 200.
    pub async fn summary(&self) -> Value {
        let reply = self.get("/analytics/summary").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
        reply.json()
    }

    /// Polls the analytics summary until `done` holds, failing the test after `within`.
    pub async fn wait_summary(&self, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        poll_until(within, Duration::from_millis(20), || self.summary(), done, |s| format!("summary {s}")).await
    }
}

/// Parses one line of the Prometheus text format (0.0.4), panicking on anything malformed:
/// `# HELP`/`# TYPE` comments (None) or `name{label="value",...} value` (label values may hold
/// any character, with `\\`, `\"` and `\n` escaped).
fn parse_exposition_line(line: &str) -> Option<Sample> {
    if line.is_empty() {
        return None;
    }
    if let Some(comment) = line.strip_prefix("# ") {
        let mut words = comment.split(' ');
        let kind = words.next().unwrap();
        assert!(kind == "HELP" || kind == "TYPE", "unexpected comment: {line}");
        if kind == "TYPE" {
            let t = comment.rsplit(' ').next().unwrap();
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&t), "{line}");
        }
        return None;
    }
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let name_end = line.find(|c: char| !is_name_char(c)).unwrap_or_else(|| panic!("no value: {line}"));
    let name = &line[..name_end];
    assert!(!name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit()), "bad name: {line}");
    let mut rest = &line[name_end..];
    let mut labels = std::collections::BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find("=\"").unwrap_or_else(|| panic!("bad label: {line}"));
            let key = &rest[..eq];
            assert!(!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "label: {line}");
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break eq + 2 + i + 1,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => panic!("bad escape {other:?}: {line}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value: {line}"),
                }
            };
            labels.insert(key.to_string(), value);
            rest = &rest[end..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before the value: {line}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
    };
    Some(Sample { name: name.to_string(), labels, value })
}
