//! `GET /ws`: follow jobs live.
//!
//! One task per connection selects over three things: the connection's [`Outbox`] (filled by the
//! Dispatcher, which never waits on a socket), frames from the client, and a heartbeat. A client
//! that stops reading stalls only its own task; if a send stays blocked past the send timeout the
//! connection is dropped.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use serde_json::{json, Value};

use super::Hub;
use super::Outbox;
use crate::access::{Caller, WsCaller};
use crate::error::ErrorBody;
use crate::job::JobId;
use crate::metrics::Metrics;
use crate::store::JobStore;

/// WebSocket limits, from configuration.
#[derive(Clone, Debug)]
pub struct WsSettings {
    /// How often the server pings.
    pub heartbeat: Duration,
    /// A client silent (no frame, no pong) this long is dropped.
    pub idle_timeout: Duration,
    /// Largest frame (and reassembled message) accepted from a client.
    pub max_frame: usize,
    /// Most jobs one connection may follow.
    pub max_subscriptions: usize,
    /// When set, only these `Origin` values may connect.
    pub allowed_origins: Option<Vec<String>>,
    /// A send blocked this long (a client that stopped reading) drops the connection.
    pub send_timeout: Duration,
}

/// What a connection needs to follow jobs: the hub, and the store for their current state.
struct Follow {
    hub: Arc<Hub>,
    store: Arc<dyn JobStore>,
    /// Whose jobs this connection may follow.
    caller: Caller,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// The WebSocket of live job events. After the handshake, send text frames
/// `{"subscribe": ["<id>", ...]}` or `{"unsubscribe": [...]}`; receive `{"type": "job", "job": {...}}`
/// with each followed job's current state at once, then every status change and progress at most
/// every 50 ms, and `{"type": "error", "code": "unknown_job" | "bad_frame" | "too_many_subscriptions",
/// "message", "id" | "ids"}` for bad input (the socket stays open). With `--api-keys` the key may
/// also be passed as `?access_token=KEY`. A request that does not ask for a WebSocket is
/// `426 upgrade_required`.
#[utoipa::path(
    get,
    path = "/ws",
    tag = "jobs",
    params(("access_token" = Option<String>, Query, description = "An API key, for clients that cannot set headers")),
    responses(
        (status = 101, description = "Switching protocols: the WebSocket is open"),
        (status = 400, description = "`bad_request`: an upgrade to WebSocket without `Sec-WebSocket-Version`, or with a missing or malformed `Sec-WebSocket-Key`", body = crate::error::ErrorResponse),
        (status = 401, description = "With `--api-keys`: no valid key", body = crate::error::ErrorResponse),
        (status = 403, description = "`origin_not_allowed`: the Origin is not in `--ws-allowed-origins`", body = crate::error::ErrorResponse),
        (status = 426, description = "`upgrade_required`: not a WebSocket upgrade (no `Upgrade: websocket` with `Connection: Upgrade`), or a `Sec-WebSocket-Version` other than 13", body = crate::error::ErrorResponse,
            headers(("Upgrade" = String, description = "`websocket`"), ("Connection" = String, description = "`Upgrade`"), ("Sec-WebSocket-Version" = String, description = "`13`"))),
    )
)]
pub async fn connect(
    WsCaller(caller): WsCaller,
    req: HttpRequest,
    body: web::Payload,
    settings: web::Data<WsSettings>,
    hub: web::Data<Arc<Hub>>,
    store: web::Data<Arc<dyn JobStore>>,
    metrics: web::Data<Arc<Metrics>>,
) -> Result<HttpResponse, actix_web::Error> {
    if !asks_for_websocket(&req) {
        return Ok(upgrade_required());
    }
    if let Some(allowed) = &settings.allowed_origins {
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !allowed.iter().any(|a| a == origin) {
            let body = ErrorBody::new("origin_not_allowed", format!("origin {origin:?} may not open a WebSocket here"));
            return Ok(body.response(StatusCode::FORBIDDEN));
        }
    }
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let stream =
        stream.max_frame_size(settings.max_frame).aggregate_continuations().max_continuation_size(settings.max_frame);
    let settings = settings.get_ref().clone();
    let follow = Follow { hub: hub.get_ref().clone(), store: store.get_ref().clone(), caller };
    let metrics = metrics.get_ref().clone();
    actix_rt::spawn(async move {
        metrics.ws_connections.inc();
        // Decremented however the task ends, even if it is dropped.
        let _open = scopeguard(move || metrics.ws_connections.dec());
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new());
        let reason = serve(conn, session.clone(), stream, outbox, &follow, &settings).await;
        follow.hub.unsubscribe(conn, None);
        let _ = session.close(reason).await;
    });
    Ok(response)
}

/// Whether a request asks to become a WebSocket, by the same test as actix's handshake:
/// `Upgrade` names `websocket` and `Connection` names `upgrade`. The rest of the handshake
/// (version, key) is checked by `actix_ws::handle`.
fn asks_for_websocket(req: &HttpRequest) -> bool {
    let upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok());
    upgrade.is_some_and(|v| v.to_ascii_lowercase().contains("websocket")) && req.head().upgrade()
}

/// `426`: this route speaks only WebSocket. actix writes `Connection: upgrade` itself beside an
/// `Upgrade` header (RFC 9110 §7.8), and drops a `Connection` header set here.
fn upgrade_required() -> HttpResponse {
    let mut res = ErrorBody::new(
        "upgrade_required",
        "GET /ws opens a WebSocket: send Upgrade: websocket, Connection: Upgrade and the Sec-WebSocket-* headers",
    )
    .response(StatusCode::UPGRADE_REQUIRED);
    let headers = res.headers_mut();
    headers.insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_VERSION, header::HeaderValue::from_static("13"));
    res
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Runs one connection until it ends; returns the close reason to send.
async fn serve(
    conn: u64,
    mut session: Session,
    mut stream: actix_ws::AggregatedMessageStream,
    outbox: Arc<Outbox>,
    follow: &Follow,
    settings: &WsSettings,
) -> Option<CloseReason> {
    let mut following: HashSet<JobId> = HashSet::new();
    let mut last_heard = Instant::now();
    let mut heartbeat = actix_rt::time::interval(settings.heartbeat);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = outbox.ready() => {
                for job in outbox.take() {
                    let frame = json!({"type": "job", "job": job.view()}).to_string();
                    if !send(&mut session, frame, settings).await {
                        return None;
                    }
                }
            }
            msg = stream.recv() => {
                last_heard = Instant::now();
                match msg {
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        let replies = handle_frame(&text, conn, &outbox, &mut following, follow, settings).await;
                        for reply in replies {
                            if !send(&mut session, reply.to_string(), settings).await {
                                return None;
                            }
                        }
                    }
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        let reply = error_frame("bad_frame", "send JSON text frames", None);
                        if !send(&mut session, reply.to_string(), settings).await {
                            return None;
                        }
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        if session.pong(&bytes).await.is_err() {
                            return None;
                        }
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => {}
                    Some(Ok(AggregatedMessage::Close(_))) | None => return None,
                    Some(Err(e)) => {
                        return Some(CloseReason { code: CloseCode::Size, description: Some(format!("protocol error: {e}")) });
                    }
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > settings.idle_timeout {
                    return Some(CloseReason { code: CloseCode::Away, description: Some("idle timeout".into()) });
                }
                if session.ping(b"").await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// Sends one text frame; `false` when the connection is gone or the client stopped reading.
async fn send(session: &mut Session, text: String, settings: &WsSettings) -> bool {
    matches!(actix_rt::time::timeout(settings.send_timeout, session.text(text)).await, Ok(Ok(())))
}

fn error_frame(code: &str, message: &str, id: Option<&str>) -> Value {
    let mut frame = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = id {
        frame["id"] = json!(id);
    }
    frame
}

/// Applies a `subscribe` or `unsubscribe` frame; returns error frames for the client.
async fn handle_frame(
    text: &str,
    conn: u64,
    outbox: &Arc<Outbox>,
    following: &mut HashSet<JobId>,
    follow: &Follow,
    settings: &WsSettings,
) -> Vec<Value> {
    let bad = |m: &str| vec![error_frame("bad_frame", m, None)];
    let Ok(Value::Object(frame)) = serde_json::from_str::<Value>(text) else {
        return bad("expected a JSON object such as {\"subscribe\": [\"<job id>\"]}");
    };
    let (action, list) = match (frame.get("subscribe"), frame.get("unsubscribe"), frame.len()) {
        (Some(list), None, 1) => ("subscribe", list),
        (None, Some(list), 1) => ("unsubscribe", list),
        _ => return bad("expected exactly one of \"subscribe\" or \"unsubscribe\""),
    };
    let Some(items) = list.as_array() else { return bad(&format!("{action}: expected an array of job ids")) };
    let mut replies = Vec::new();
    let mut ids = Vec::new();
    // Ids that name no job: answered in one frame, however many (a frame of 12,000 bad ids once
    // got 12,000 replies). At most `MAX_LISTED` distinct ones are kept, all are counted.
    let mut unknown = Unknown::default();
    let mut not_strings = 0;
    for item in items {
        let Some(raw) = item.as_str() else {
            not_strings += 1;
            continue;
        };
        match raw.parse::<JobId>() {
            Ok(id) => ids.push(id),
            Err(()) => unknown.add(raw),
        }
    }
    if not_strings > 0 {
        replies.push(error_frame("bad_frame", &format!("{action}: job ids are strings ({not_strings} are not)"), None));
    }
    if action == "unsubscribe" {
        ids.iter().for_each(|id| {
            following.remove(id);
        });
        follow.hub.unsubscribe(conn, Some(ids));
        replies.extend(unknown.frame());
        return replies;
    }
    // One id named twice is one subscription (and counts once against the cap).
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
    let new: Vec<JobId> = ids.iter().copied().filter(|id| !following.contains(id)).collect();
    if following.len() + new.len() > settings.max_subscriptions {
        let message = format!("a connection may follow at most {} jobs", settings.max_subscriptions);
        replies.push(error_frame("too_many_subscriptions", &message, None));
        replies.extend(unknown.frame());
        return replies;
    }
    let (hub, store, outbox, caller) = (follow.hub.clone(), follow.store.clone(), outbox.clone(), follow.caller);
    // The snapshots are store reads: off the event loop.
    let subscribed = web::block(move || {
        let mut failed = false;
        let unknown = hub.subscribe(conn, &outbox, ids, caller, |id| match store.get(id) {
            Ok(job) => job,
            Err(_) => {
                failed = true;
                None
            }
        });
        (unknown, failed)
    })
    .await;
    match subscribed {
        Ok((_, true)) => {
            replies.push(error_frame("storage_unavailable", "the job store cannot be read right now; retry", None))
        }
        Ok((missing, false)) => {
            following.extend(new.into_iter().filter(|id| !missing.contains(id)));
            missing.iter().for_each(|id| unknown.add(&id.to_string()));
        }
        Err(_) => replies.push(error_frame("unavailable", "the subscription could not be made", None)),
    }
    replies.extend(unknown.frame());
    replies
}

/// Most ids one `unknown_job` frame lists.
const MAX_LISTED: usize = 100;

/// The ids of one frame that name no job.
#[derive(Default)]
struct Unknown {
    /// The first [`MAX_LISTED`] distinct ones.
    listed: Vec<String>,
    /// All of them, repeats included.
    count: usize,
}

impl Unknown {
    fn add(&mut self, raw: &str) {
        self.count += 1;
        if self.listed.len() < MAX_LISTED && !self.listed.iter().any(|l| l == raw) {
            self.listed.push(raw.to_string());
        }
    }

    /// One `unknown_job` frame: with `id` when one id was bad, with `ids` when more were.
    fn frame(self) -> Option<Value> {
        match self.count {
            0 => None,
            1 => Some(error_frame(
                "unknown_job",
                "no such job (it may have expired)",
                self.listed.first().map(String::as_str),
            )),
            n => {
                let shown = if self.listed.len() < n {
                    format!("; {} distinct ones listed", self.listed.len())
                } else {
                    String::new()
                };
                let mut frame =
                    error_frame("unknown_job", &format!("{n} ids name no job (they may have expired){shown}"), None);
                frame["ids"] = json!(self.listed);
                Some(frame)
            }
        }
    }
}
