//! The one error format of the API: `{"error": {"code": "snake_case", "message": "text"}}`.
//!
//! Each concern has its own error enum (submission, job lookup, document validation, request
//! parsing); they all render through [`ErrorBody`] so the format cannot drift.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde::Serialize;

/// A machine-readable code and a human message naming what went wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a ErrorBody,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody { code: code.into(), message: message.into() }
    }

    /// The HTTP response carrying this error with `status`.
    pub fn response(&self, status: StatusCode) -> HttpResponse {
        HttpResponse::build(status)
            .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
            .json(Envelope { error: self })
    }

    /// As [`ErrorBody::response`], with `Retry-After` in whole seconds (429/503).
    pub fn response_retry_after(&self, status: StatusCode, seconds: u64) -> HttpResponse {
        let mut response = self.response(status);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        response
    }
}

/// The code used when an error response is produced without a more specific one.
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        422 => "invalid_request",
        426 => "upgrade_required",
        429 => "too_many_requests",
        431 => "headers_too_large",
        503 => "unavailable",
        s if s >= 500 => "internal_error",
        _ => "request_error",
    }
}
