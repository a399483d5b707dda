//! Every request body must arrive within `--body-timeout`: a client that declares a large body
//! and sends it slowly (or never) would otherwise hold a connection and its buffer for ever.
//! The middleware wraps the body stream; past the deadline it ends with a timed-out error,
//! which the JSON and multipart readers answer with `408 request_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
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
