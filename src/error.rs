//! The one error format of the API: `{"error": {"code": "snake_case", "message": "text"}}`.
//!
//! Each concern has its own error enum (submission, job lookup, document validation, request
//! parsing); they all render through [`ErrorBody`] so the format cannot drift.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde::Serialize;
use utoipa::ToSchema;

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

/// The error object every 4xx and 5xx answer carries.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorResponse {
    error: ErrorDetail,
}

/// A stable machine-readable code and a message naming what went wrong.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// snake_case and stable. 400: `malformed_json`, `malformed_multipart`, `invalid_header`,
    /// `bad_request`; 401: `unauthorized`; 403: `origin_not_allowed`; 404: `not_found`,
    /// `job_not_found`, `webhook_secret_not_set`, `no_api_keys`; 405: `method_not_allowed`; 408: `request_timeout`; 409: `result_not_ready`,
    /// `job_finished`; 413: `payload_too_large`; 415: `unsupported_media_type`,
    /// `unsupported_image`; 422: `invalid_field`, `too_many_rows`, `too_many_columns`,
    /// `cell_too_long`, `text_too_long`, `too_many_paragraphs`, `document_too_large`,
    /// `invalid_query`, `invalid_op`, `image_too_large`, `empty_file`, `missing_file`,
    /// `too_many_files`, `invalid_image`, `invalid_callback_url`, `callback_not_allowed`,
    /// `invalid_event`, `no_events`, `too_many_events`, `idempotency_key_reused`, `unknown_kind`; 426:
    /// `upgrade_required`; 503 (with
    /// `Retry-After`): `overloaded`, `shutting_down`, `draining`, `storage_unavailable`,
    /// `pool_unavailable`, `pool_down`, `unavailable`; 500: `internal_error`. A failed job's `error.code`: `worker_panic`,
    /// `timeout`, `result_too_large`, `document_too_large`, `shutdown`, `worker_lost`,
    /// `payload_unreadable`, `truncated_image`, `invalid_image`, `image_too_large`,
    /// `encode_failed`; a cancelled job's: `cancelled`.
    #[schema(pattern = "^[a-z_]+$")]
    code: String,
    message: String,
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
