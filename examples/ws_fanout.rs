//! WebSocket fan-out: N clients each follow their own PDF job over `GET /ws`.
//!
//! 1. Opens N WebSocket connections to `/ws`, at most `--connect-concurrency` handshakes in
//!    flight at once (so 10,000 clients do not all SYN together).
//! 2. Submits N one-page PDF jobs (`POST /generate-pdf`: the peers' 40-row × 5-column document,
//!    the body `bench/peers.sh body 1` prints) with `--submit-concurrency` requests in flight; as
//!    soon as job i is accepted, client i sends `{"subscribe": [id]}`.
//! 3. Waits until every client saw its job reach a terminal status, or `--timeout` seconds after
//!    the last submission.
//!
//! Event latency: for every pushed status change (not the snapshot the server sends right after
//! subscribing) the local receive time minus the job's own timestamp of that change: `started_at`
//! for `running`, `finished_at` for a final status. Same machine, same clock. The server writes
//! timestamps truncated to the millisecond, so each figure is at most 1 ms too high; and the
//! client runs on one thread, so a busy client adds its own queueing to what it measures.
//!
//! Prints one JSON summary on stdout (progress notes on stderr).
//!
//! `cargo run --release --example ws_fanout -- --url http://127.0.0.1:8080 --clients 1000`
//! (`bench/ws_fanout.sh` starts a suitably configured server and raises `ulimit -n` first.)

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use awc::ws::{Frame, Message};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::oneshot;

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

#[derive(Parser, Debug)]
#[command(about = "N WebSocket clients, each following its own one-page PDF job")]
struct Args {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Base URL the WebSocket clients connect to (default: `--url`): another instance on the
    /// same PostgreSQL database measures the latency of events across instances.
    #[arg(long)]
    ws_url: Option<String>,
    /// Number of clients (= connections = jobs).
    #[arg(short = 'n', long, default_value_t = 1000)]
    clients: usize,
    /// WebSocket handshakes in flight at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Attempts per connection before the client counts as not connected.
    #[arg(long, default_value_t = 3)]
    connect_attempts: u32,
    /// Submissions in flight at once.
    #[arg(long, default_value_t = 32)]
    submit_concurrency: usize,
    /// Seconds to wait after the last submission for the remaining terminal events.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Only open the connections, hold them this many seconds, submit nothing (to tell the
    /// server's memory per idle connection apart from its memory per job).
    #[arg(long)]
    connect_only: Option<u64>,
}

/// The peers' benchmark document (`common.py`, `make_pdf("Benchmark report", 40, 1)`).
fn document() -> Value {
    let rows: Vec<Value> = (1..=40u32)
        .map(|n| {
            let qty = (n * 7) % 13 + 1;
            let price = f64::from((n * 37) % 1000) / 10.0 + 1.0;
            json!([
                n.to_string(),
                format!("Widget {n}"),
                qty.to_string(),
                format!("{price:.2}"),
                format!("{:.2}", f64::from(qty) * price)
            ])
        })
        .collect();
    json!({
        "title": "Benchmark report - page 1/1",
        "table": {"columns": ["#", "Item", "Qty", "Unit price", "Total"], "rows": rows},
        "page_size": "A4",
    })
}

/// What one client saw.
#[derive(Default)]
struct ClientState {
    job: Option<String>,
    /// Status of the last job frame received (None until the subscribe snapshot arrived).
    last_status: Option<String>,
    terminal: Option<String>,
    /// The job had already ended when the subscribe snapshot was taken (no push to time).
    ended_before_subscribe: bool,
    error: Option<String>,
}

#[derive(Default)]
struct Shared {
    clients: Vec<ClientState>,
    /// Latencies (ms) of pushed `running` events and of pushed final events.
    started_ms: Vec<f64>,
    finished_ms: Vec<f64>,
    completed: usize,
    last_terminal: Option<Instant>,
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

fn ms_since(received: SystemTime, stamp: Option<&str>) -> Option<f64> {
    let at = humantime::parse_rfc3339(stamp?).ok()?;
    Some(match received.duration_since(at) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    })
}

/// Handles one text frame for client `i`.
fn on_text(shared: &RefCell<Shared>, i: usize, received: SystemTime, text: &[u8]) {
    let mut s = shared.borrow_mut();
    let Ok(frame) = serde_json::from_slice::<Value>(text) else {
        s.clients[i].error.get_or_insert_with(|| "unparsable frame".into());
        return;
    };
    if frame["type"] == "error" {
        let code = frame["code"].as_str().unwrap_or("?").to_string();
        s.clients[i].error.get_or_insert(format!("error frame: {code}"));
        return;
    }
    let job = &frame["job"];
    let (Some(id), Some(status)) = (job["id"].as_str(), job["status"].as_str()) else { return };
    if s.clients[i].job.as_deref() != Some(id) || s.clients[i].terminal.is_some() {
        return;
    }
    let previous = s.clients[i].last_status.replace(status.to_string());
    match previous {
        None => {
            // The snapshot sent right after subscribing: not a push of a change.
            if is_terminal(status) {
                s.clients[i].ended_before_subscribe = true;
            }
        }
        Some(prev) if prev != status => {
            let field = if status == "running" { "started_at" } else { "finished_at" };
            if let Some(ms) = ms_since(received, job[field].as_str()) {
                if status == "running" {
                    s.started_ms.push(ms);
                } else if is_terminal(status) {
                    s.finished_ms.push(ms);
                }
            }
        }
        Some(_) => {} // progress within the same status
    }
    if is_terminal(status) {
        s.clients[i].terminal = Some(status.to_string());
        s.completed += 1;
        s.last_terminal = Some(Instant::now());
    }
}

/// One client: answers pings, subscribes once its job id arrives, records every job frame. Runs
/// until the socket closes or the task is aborted at the end of the run.
async fn client(i: usize, mut socket: Socket, job: oneshot::Receiver<String>, shared: Rc<RefCell<Shared>>) {
    let mut job = Some(job);
    loop {
        tokio::select! {
            id = async { job.as_mut().unwrap().await }, if job.is_some() => {
                job = None;
                let Ok(id) = id else { continue }; // submission failed: just keep the socket open
                shared.borrow_mut().clients[i].job = Some(id.clone());
                let frame = json!({"subscribe": [id]}).to_string();
                if let Err(e) = socket.send(Message::Text(frame.into())).await {
                    shared.borrow_mut().clients[i].error.get_or_insert(format!("send subscribe: {e}"));
                    return;
                }
            }
            frame = socket.next() => {
                let received = SystemTime::now();
                match frame {
                    Some(Ok(Frame::Text(text))) => on_text(&shared, i, received, &text),
                    Some(Ok(Frame::Ping(p))) => {
                        if socket.send(Message::Pong(p)).await.is_err() {
                            shared.borrow_mut().clients[i].error.get_or_insert("send pong failed".into());
                            return;
                        }
                    }
                    Some(Ok(Frame::Close(reason))) => {
                        shared.borrow_mut().clients[i].error.get_or_insert(format!("closed by server: {reason:?}"));
                        return;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        shared.borrow_mut().clients[i].error.get_or_insert(format!("protocol error: {e}"));
                        return;
                    }
                    None => {
                        shared.borrow_mut().clients[i].error.get_or_insert("connection closed".into());
                        return;
                    }
                }
            }
        }
    }
}

/// Opens one WebSocket; returns it and how many attempts failed first.
async fn connect(ws: &awc::Client, url: &str, attempts: u32) -> (Result<Socket, String>, u32) {
    let mut last = String::new();
    for attempt in 0..attempts.max(1) {
        if attempt > 0 {
            actix_rt::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        match ws.ws(url).connect().await {
            Ok((_, socket)) => return (Ok(socket), attempt),
            Err(e) => last = e.to_string(),
        }
    }
    (Err(last), attempts.max(1))
}

/// Percentiles (nearest rank) of a sample, in ms with two decimals.
fn summary(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({"events": 0});
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        (v[rank - 1] * 100.0).round() / 100.0
    };
    json!({"events": v.len(), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0), "min": at(0.0)})
}

/// This process's peak resident memory (VmHWM) in MiB, on Linux.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

fn round3(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

#[actix_rt::main]
async fn main() {
    let args = Args::parse();
    let base = args.url.trim_end_matches('/').to_string();
    let ws_url = format!("{}/ws", args.ws_url.as_deref().unwrap_or(&base).trim_end_matches('/'));
    let n = args.clients;
    let shared = Rc::new(RefCell::new(Shared {
        clients: (0..n).map(|_| ClientState::default()).collect(),
        ..Shared::default()
    }));

    // awc's connector caps a client at 100 connections by default, and an upgraded WebSocket keeps
    // its slot for life: without `limit(0)` client 101 would wait for a free slot and time out.
    let ws_client = awc::Client::builder()
        .connector(awc::Connector::new().limit(0).timeout(Duration::from_secs(30)))
        .timeout(Duration::from_secs(30))
        .finish();
    let http = awc::Client::builder()
        .connector(awc::Connector::new().limit(args.submit_concurrency.max(1)).timeout(Duration::from_secs(30)))
        .timeout(Duration::from_secs(60))
        .finish();

    // 1. Connect, at most `connect_concurrency` handshakes at once.
    let started = Instant::now();
    let mut senders: Vec<Option<oneshot::Sender<String>>> = (0..n).map(|_| None).collect();
    let mut tasks = Vec::with_capacity(n);
    let mut connect_errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut connect_retries = 0;
    {
        let mut attempts = futures::stream::iter(0..n)
            .map(|i| {
                let (client, url) = (&ws_client, &ws_url);
                async move { (i, connect(client, url, args.connect_attempts).await) }
            })
            .buffer_unordered(args.connect_concurrency.max(1));
        while let Some((i, (result, failed_attempts))) = attempts.next().await {
            connect_retries += failed_attempts;
            match result {
                Ok(socket) => {
                    let (tx, rx) = oneshot::channel();
                    senders[i] = Some(tx);
                    tasks.push(actix_rt::spawn(client(i, socket, rx, shared.clone())));
                }
                Err(e) => {
                    shared.borrow_mut().clients[i].error = Some(format!("connect: {e}"));
                    *connect_errors.entry(e).or_default() += 1;
                }
            }
        }
    }
    let connected = tasks.len();
    let connect_s = started.elapsed().as_secs_f64();
    eprintln!("ws_fanout: {connected}/{n} connected in {connect_s:.2} s ({connect_retries} retries)");
    if let Some(hold) = args.connect_only {
        actix_rt::time::sleep(Duration::from_secs(hold)).await;
        let alive = tasks.iter().filter(|t| !t.is_finished()).count();
        let out = json!({
            "clients": n,
            "connected": connected,
            "still_open_after_hold": alive,
            "hold_s": hold,
            "connect_errors": connect_errors,
            "connect_retries": connect_retries,
            "connect_s": round3(connect_s),
            "client_peak_rss_mib": peak_rss_mib(),
        });
        println!("{out}");
        return;
    }

    // 2. Submit one job per connected client; hand each id to its client at once.
    let body = document().to_string();
    let submit_url = format!("{base}/generate-pdf");
    let submit_started = Instant::now();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    {
        let jobs: Vec<(usize, oneshot::Sender<String>)> =
            senders.iter_mut().enumerate().filter_map(|(i, s)| s.take().map(|s| (i, s))).collect();
        let mut submissions = futures::stream::iter(jobs)
            .map(|(i, tx)| {
                let (http, url, body) = (&http, &submit_url, &body);
                async move {
                    let sent = http.post(url.as_str()).content_type("application/json").send_body(body.clone()).await;
                    let outcome = match sent {
                        Ok(mut resp) => {
                            let status = resp.status().as_u16().to_string();
                            let json = resp.json::<Value>().limit(1 << 20).await.ok();
                            let id = json.as_ref().and_then(|j| j["id"].as_str()).map(str::to_string);
                            (status, id)
                        }
                        Err(e) => (format!("error: {e}"), None),
                    };
                    (i, tx, outcome)
                }
            })
            .buffer_unordered(args.submit_concurrency.max(1));
        while let Some((i, tx, (status, id))) = submissions.next().await {
            *codes.entry(status.clone()).or_default() += 1;
            match id {
                Some(id) if status == "202" => {
                    let _ = tx.send(id);
                }
                _ => shared.borrow_mut().clients[i].error = Some(format!("submit: {status}")),
            }
        }
    }
    let submit_s = submit_started.elapsed().as_secs_f64();
    let accepted = codes.get("202").copied().unwrap_or(0);
    eprintln!("ws_fanout: {connected} jobs submitted in {submit_s:.2} s: {codes:?}; waiting for terminal events");

    // 3. Wait for every accepted job's final event (or the timeout).
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut timed_out = false;
    loop {
        let done = shared.borrow().completed;
        if done >= accepted {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let wall_s = started.elapsed().as_secs_f64();
    for task in &tasks {
        task.abort();
    }

    let mut s = shared.borrow_mut();
    let drain_s = s.last_terminal.map_or(0.0, |t| t.duration_since(submit_started).as_secs_f64());
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut ended_before_subscribe = 0;
    for c in &s.clients {
        if let Some(t) = &c.terminal {
            *statuses.entry(t.clone()).or_default() += 1;
        } else if let Some(e) = &c.error {
            // Keep the map short: the first 80 characters name the kind of error.
            *errors.entry(e.chars().take(80).collect()).or_default() += 1;
        } else {
            *errors.entry("no terminal event".into()).or_default() += 1;
        }
        ended_before_subscribe += usize::from(c.ended_before_subscribe);
    }
    let started_ms = std::mem::take(&mut s.started_ms);
    let finished_ms = std::mem::take(&mut s.finished_ms);
    let all: Vec<f64> = started_ms.iter().chain(&finished_ms).copied().collect();
    let out = json!({
        "clients": n,
        "connected": connected,
        "accepted": accepted,
        "completed": s.completed,
        "missing": n - s.completed,
        "final_statuses": statuses,
        "ended_before_subscribe": ended_before_subscribe,
        "latency_ms": summary(all),
        "latency_started_ms": summary(started_ms),
        "latency_finished_ms": summary(finished_ms),
        "submit_status_codes": codes,
        "connect_errors": connect_errors,
        "connect_retries": connect_retries,
        "client_errors": errors,
        "timed_out": timed_out,
        "connect_s": round3(connect_s),
        "submit_s": round3(submit_s),
        "submit_to_last_event_s": round3(drain_s),
        "wall_s": round3(wall_s),
        "client_peak_rss_mib": peak_rss_mib(),
    });
    println!("{out}");
}
