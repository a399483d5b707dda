//! Bounds on request bodies, in time and in memory.
//!
//! - Every request body must arrive within `--body-timeout`: a client that declares a large body
//!   and sends it slowly (or never) would otherwise hold a connection and its buffer for ever.
//!   [`body_deadline`] wraps the body stream; past the deadline it ends with a timed-out error,
//!   which the JSON and multipart readers answer with `408 request_timeout`.
//! - All bodies being received or held by their handlers share `--max-body-memory`
//!   ([`body_budget`]): a request is counted from its head (its `Content-Length`, or the route's
//!   largest body when it is chunked) until its answer, and one that does not fit is answered
//!   `503 overloaded` with `Retry-After` before any of its body is read. Many slow or parallel
//!   uploads cannot add up to more than the budget.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::{header, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};
use bytes::Bytes;
use futures::Stream;

/// How long a request body may take to arrive, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct BodyTimeout(pub Duration);

/// Puts the body of every request under the deadline (from the moment the head was read).
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(timeout) = req.app_data::<web::Data<BodyTimeout>>().map(|t| t.0) {
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

/// Bytes of request bodies in flight across all connections, and the most there may be.
#[derive(Debug)]
pub struct BodyBudget {
    /// `--max-body-memory`.
    limit: usize,
    held: AtomicUsize,
    /// What a chunked body (no `Content-Length`) is counted as: its route's largest body.
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

/// Counts a request's body against the shared budget from its head until its answer.
pub async fn body_budget(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(budget) = req.app_data::<web::Data<Arc<BodyBudget>>>().map(|b| b.get_ref().clone()) else {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    };
    let route_max = if req.path() == "/images" { budget.max_upload } else { budget.max_json };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let cost = match declared {
        // A body declared larger than its route allows is refused (413) without being read.
        Some(n) => n.min(route_max),
        None if req.headers().contains_key(header::TRANSFER_ENCODING) => route_max,
        None => 0,
    };
    // One request alone always fits, whatever the limits: it never waits for a retry that
    // cannot come.
    let cost = cost.min(budget.limit);
    if cost == 0 {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    }
    let Some(reserved) = budget.reserve(cost) else {
        let message = format!(
            "request bodies being received already hold close to the {} byte limit; retry shortly",
            budget.limit
        );
        let res = crate::error::ErrorBody::new("overloaded", message)
            .response_retry_after(StatusCode::SERVICE_UNAVAILABLE, 1);
        return Ok(req.into_response(res).map_into_boxed_body());
    };
    let res = next.call(req).await;
    drop(reserved);
    res.map(ServiceResponse::map_into_boxed_body)
}

#[cfg(test)]
mod tests {
    use super::*;

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
