//! Bounds on request bodies, in time and in memory.
//!
//! - Every request body must arrive within `--body-timeout`: a client that declares a large body
//!   and sends it slowly (or never) would otherwise hold a connection and its buffer for ever.
//!   [`body_deadline`] wraps the body stream; past the deadline it ends with a timed-out error,
//!   which the JSON and multipart readers answer with `408 request_timeout`.
//!   A WebSocket handshake is not wrapped: after the upgrade its "body" is the socket.
//! - All bodies being received or held by their handlers share `--max-body-memory`
//!   ([`BodyPermit`], the extractor of the three routes that read a body, after the API key): a
//!   request is counted from its head until its handler is done with its bytes, at what it can
//!   cost once parsed (a JSON body at [`JSON_FACTOR`] × its `Content-Length`, an upload at
//!   [`UPLOAD_FACTOR`] ×; a chunked body, or one sent with `Upgrade`, as its route's largest),
//!   and one that does not fit is answered `503 overloaded` with `Retry-After` before any of its
//!   body is read. Many slow or parallel requests cannot add up to more than the budget.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::{header, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use bytes::Bytes;
use futures::Stream;

/// How long a request body may take to arrive, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct BodyTimeout(pub Duration);

/// Puts the body of every request under the deadline (from the moment the head was read), but a
/// WebSocket handshake's: after the upgrade that stream is the socket, which lives for as long as
/// the client stays (the WebSocket has its own heartbeat and idle timeout).
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let handshake = req.path() == "/ws" && req.headers().contains_key(header::UPGRADE);
    if let Some(timeout) = req.app_data::<web::Data<BodyTimeout>>().map(|t| t.0).filter(|_| !handshake) {
        let body = req.take_payload();
        let deadline = Box::pin(tokio::time::sleep(timeout));
        req.set_payload(Payload::Stream { payload: Box::pin(Deadline { body, deadline, expired: false }) });
    }
    next.call(req).await
}

/// Whether a body error is the deadline's.
pub fn is_timeout(e: &PayloadError) -> bool {
    matches!(e, PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

struct Deadline {
    body: Payload,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: bool,
}

impl Stream for Deadline {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(next) = Pin::new(&mut self.body).poll_next(cx) {
            return Poll::Ready(next);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired = true;
            let timed_out =
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the request body did not arrive in time");
            return Poll::Ready(Some(Err(PayloadError::Io(timed_out))));
        }
        Poll::Pending
    }
}

/// A JSON body is counted at this many times its length: what it can take once parsed
/// (`serde_json::Value` or the document's cells: 16-32 bytes for a 2-byte `0,`).
pub const JSON_FACTOR: usize = 16;
/// An upload is counted at three times its length: the multipart parser's buffer doubles as it
/// grows (measured, `bench/hostile.py` row 4: a 100 MiB filename refused at the 64 MiB cap peaked
/// the process 189 MiB above idle).
pub const UPLOAD_FACTOR: usize = 3;

/// Bytes of request bodies in flight across all connections, and the most there may be.
#[derive(Debug)]
pub struct BodyBudget {
    /// `--max-body-memory`.
    limit: usize,
    held: AtomicUsize,
    /// The largest body of each kind of route (what a chunked body is counted as).
    max_json: usize,
    max_upload: usize,
}

impl BodyBudget {
    pub fn new(limit: usize, max_json: usize, max_upload: usize) -> Arc<Self> {
        Arc::new(BodyBudget { limit, held: AtomicUsize::new(0), max_json, max_upload })
    }

    /// Counts `bytes` if they fit; the reservation is returned when the guard drops.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reserved> {
        let mut held = self.held.load(Ordering::Relaxed);
        loop {
            let next = held.checked_add(bytes).filter(|n| *n <= self.limit)?;
            match self.held.compare_exchange_weak(held, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Reserved { budget: self.clone(), bytes }),
                Err(now) => held = now,
            }
        }
    }

    /// Bytes counted now (for metrics and tests).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// What a request's body is counted as: its declared length (a chunked or `Upgrade` body:
    /// the route's largest) times what parsing can make of it, never more than the whole budget
    /// (one request alone always fits: it never waits for a retry that cannot come).
    fn cost(&self, req: &HttpRequest) -> usize {
        let upload = req.path() == "/images";
        let (route_max, factor) = if upload { (self.max_upload, UPLOAD_FACTOR) } else { (self.max_json, JSON_FACTOR) };
        let headers = req.headers();
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        // With `Upgrade` or chunked framing the length header does not bound the body.
        let unbounded = headers.contains_key(header::TRANSFER_ENCODING) || headers.contains_key(header::UPGRADE);
        let bytes = match declared {
            _ if unbounded => route_max,
            // A body declared larger than its route allows is refused (413) without being read.
            Some(n) => n.min(route_max),
            None => 0,
        };
        bytes.saturating_mul(factor).min(self.limit)
    }
}

struct Reserved {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A request body's place in `--max-body-memory`, held until dropped: take it as a handler
/// argument after the API key, and move a clone into blocking work that still holds the bytes
/// (a client that hangs up drops the handler, not that work).
#[derive(Clone)]
pub struct BodyPermit(#[allow(dead_code)] Option<Arc<Reserved>>);

impl FromRequest for BodyPermit {
    type Error = actix_web::Error;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(budget) = req.app_data::<web::Data<Arc<BodyBudget>>>().map(|b| b.get_ref().clone()) else {
            return std::future::ready(Ok(BodyPermit(None)));
        };
        let cost = budget.cost(req);
        if cost == 0 {
            return std::future::ready(Ok(BodyPermit(None)));
        }
        std::future::ready(match budget.reserve(cost) {
            Some(reserved) => Ok(BodyPermit(Some(Arc::new(reserved)))),
            None => {
                let message = format!(
                    "request bodies being received already hold close to the {} byte limit; retry shortly",
                    budget.limit
                );
                let res = crate::error::ErrorBody::new("overloaded", message)
                    .response_retry_after(StatusCode::SERVICE_UNAVAILABLE, 1);
                Err(actix_web::error::InternalError::from_response("over the body budget", res).into())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_counted_at_what_it_can_cost_and_unbounded_framing_at_the_route_maximum() {
        use actix_web::test::TestRequest;
        let budget = BodyBudget::new(1 << 30, 1000, 5000);
        // (path, headers, cost)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], usize);
        let cases: [Case; 7] = [
            ("/generate-pdf", &[("content-length", "100")], 100 * JSON_FACTOR),
            ("/generate-pdf", &[("content-length", "999999")], 1000 * JSON_FACTOR),
            ("/generate-pdf", &[("transfer-encoding", "chunked")], 1000 * JSON_FACTOR),
            // `Upgrade` makes actix read the body until the connection closes, whatever the length says.
            ("/analytics/events", &[("upgrade", "websocket"), ("content-length", "1")], 1000 * JSON_FACTOR),
            ("/images", &[("content-length", "100")], 100 * UPLOAD_FACTOR),
            ("/images", &[("upgrade", "h2c")], 5000 * UPLOAD_FACTOR),
            ("/generate-pdf", &[], 0),
        ];
        for (path, headers, want) in cases {
            let mut req = TestRequest::post().uri(path);
            for (name, value) in headers {
                req = req.insert_header((*name, *value));
            }
            assert_eq!(budget.cost(&req.to_http_request()), want, "{path} {headers:?}");
        }
        let small = BodyBudget::new(10, 1000, 5000);
        let req = TestRequest::post().uri("/images").insert_header(("content-length", "100")).to_http_request();
        assert_eq!(small.cost(&req), 10, "one request alone always fits");
    }

    #[test]
    fn reservations_fit_the_limit_and_are_returned_when_dropped() {
        let budget = BodyBudget::new(100, 10, 50);
        let a = budget.reserve(60).expect("fits");
        assert!(budget.reserve(41).is_none(), "over the limit");
        let b = budget.reserve(40).expect("exactly fills it");
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        assert!(budget.reserve(usize::MAX).is_none(), "no overflow");
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
