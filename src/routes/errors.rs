//! The HTTP layer's error type: every way a handler can fail, each with its status and a
//! stable machine-readable code.

use actix::MailboxError;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::async_io::analytics::{EventError, IngestError};
use crate::dispatch::SubmitError;
use crate::domain::callback::CallbackError;
use crate::error::ErrorBody;
use crate::job::{Job, JobId};
pub use crate::kind::InvalidInput;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A kind's input is invalid (its own codes and statuses).
    #[error("{}", .0.message)]
    Invalid(InvalidInput),
    #[error("job not found")]
    JobNotFound,
    #[error("job {} is {}", .0.id, .0.status.as_str())]
    ResultNotReady(Box<Job>),
    #[error("job {} already ended", .0.id)]
    AlreadyFinished(Box<Job>),
    #[error("{field}: {message}")]
    InvalidQuery { field: &'static str, message: String },
    #[error("{}", .0.message)]
    InvalidCallback(#[from] CallbackError),
    #[error("{}", .0.message)]
    InvalidEvent(#[from] EventError),
    #[error("{0}")]
    Ingest(#[from] IngestError),
    #[error("{0:?}")]
    Submit(SubmitError),
    #[error("the dispatcher is not running: {0}")]
    Dispatcher(#[from] MailboxError),
    #[error("{header}: {message}")]
    InvalidHeader { header: &'static str, message: String },
    #[error("storage unavailable: {0}")]
    Storage(String),
    #[error("the blocking pool is gone")]
    Blocking,
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        ApiError::Invalid(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => ApiError::Storage(m),
            StoreError::Uncertain { message, ids } => ApiError::Submit(SubmitError::Uncertain { message, ids }),
            StoreError::KeyReused => ApiError::Submit(SubmitError::KeyReused),
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        ApiError::Blocking
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        ApiError::Submit(e)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidQuery { .. }
            | ApiError::InvalidCallback(_)
            | ApiError::InvalidEvent(_)
            | ApiError::Submit(SubmitError::KeyReused) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Submit(SubmitError::NeverFits(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Submit(SubmitError::UnknownKind(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::InvalidHeader { .. } => StatusCode::BAD_REQUEST,
            ApiError::Ingest(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Invalid(e) => e.status,
            ApiError::JobNotFound => StatusCode::NOT_FOUND,
            ApiError::ResultNotReady(_) | ApiError::AlreadyFinished(_) => StatusCode::CONFLICT,
            ApiError::Submit(_) | ApiError::Dispatcher(_) | ApiError::Storage(_) | ApiError::Blocking => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        match self {
            ApiError::Invalid(e) => ErrorBody::new(e.code, &e.message).response(status),
            ApiError::InvalidCallback(e) => ErrorBody::new(e.code, &e.message).response(status),
            ApiError::InvalidEvent(e) => ErrorBody::new(e.code, &e.message).response(status),
            ApiError::Ingest(e) => ErrorBody::new(e.code(), e.to_string()).response_retry_after(status, 1),
            ApiError::JobNotFound => {
                ErrorBody::new("job_not_found", "no such job (it may have expired)").response(status)
            }
            ApiError::ResultNotReady(job) => {
                let message = match &job.error {
                    Some(e) => format!("the job is {} ({}): there is no result", job.status.as_str(), e.code),
                    None => format!("the job is {}: there is no result yet", job.status.as_str()),
                };
                ErrorBody::new("result_not_ready", message).response(status)
            }
            ApiError::AlreadyFinished(job) => {
                ErrorBody::new("job_finished", format!("the job already ended as {}", job.status.as_str()))
                    .response(status)
            }
            ApiError::InvalidQuery { field, message } => {
                ErrorBody::new("invalid_query", format!("{field}: {message}")).response(status)
            }
            ApiError::Submit(SubmitError::Overloaded { retry_after, reason }) => {
                ErrorBody::new("overloaded", format!("too much work pending ({reason}); retry later"))
                    .response_retry_after(status, *retry_after)
            }
            ApiError::Submit(SubmitError::ShuttingDown) => {
                ErrorBody::new("shutting_down", "the service is shutting down and takes no new jobs")
                    .response_retry_after(status, 5)
            }
            ApiError::Submit(SubmitError::NoPool(kind)) => {
                ErrorBody::new("pool_unavailable", format!("no worker pool runs {} jobs", kind.as_str()))
                    .response_retry_after(status, 5)
            }
            ApiError::Submit(SubmitError::Storage(m)) => storage_unavailable(m, status, Kept::No),
            ApiError::Storage(m) => storage_unavailable(m, status, Kept::NotAWrite),
            ApiError::Submit(SubmitError::Uncertain { message, ids }) => {
                storage_unavailable(message, status, Kept::Unknown(ids))
            }
            ApiError::Submit(SubmitError::KeyReused) => ErrorBody::new(
                "idempotency_key_reused",
                "Idempotency-Key: this key was already used for a different request; use a new key",
            )
            .response(status),
            ApiError::Submit(SubmitError::NeverFits(reason)) => {
                ErrorBody::new("payload_too_large", format!("{reason}: it can never be accepted")).response(status)
            }
            ApiError::Submit(SubmitError::UnknownKind(name)) => {
                ErrorBody::new("unknown_kind", format!("{name:?} cannot name a kind")).response(status)
            }
            ApiError::InvalidHeader { header, message } => {
                ErrorBody::new("invalid_header", format!("{header}: {message}")).response(status)
            }
            ApiError::Blocking => {
                ErrorBody::new("unavailable", "the service is shutting down").response_retry_after(status, 5)
            }
            ApiError::Dispatcher(_) => {
                ErrorBody::new("unavailable", "the job dispatcher is not running").response_retry_after(status, 5)
            }
        }
    }
}

/// What a `503 storage_unavailable` did to the request's jobs.
pub enum Kept<'a> {
    /// Refused before anything was written: nothing was created.
    No,
    /// The write may have been kept (a failed fsync, a lost answer): these jobs may exist.
    Unknown(&'a [JobId]),
    /// Not a submission (a read, a cancel, readiness).
    NotAWrite,
}

/// The store cannot write or read. The message says what became of a submission: nothing
/// created, or (when the store cannot know) which jobs may exist and how to retry safely.
pub fn storage_unavailable(detail: &str, status: StatusCode, kept: Kept<'_>) -> HttpResponse {
    tracing::debug!("storage unavailable: {detail}");
    let message = match kept {
        Kept::No => "the job store cannot write right now (disk full or I/O error): nothing was created; retry shortly"
            .to_string(),
        Kept::Unknown(ids) => {
            let ids: Vec<String> = ids.iter().map(JobId::to_string).collect();
            format!(
                "the job store failed while committing this request, so whether it was kept is unknown: \
                 job {} may exist (GET /jobs/{{id}} tells; it may also appear after a restart). A retry with \
                 the same Idempotency-Key header is safe: it never creates a second job",
                ids.join(", ")
            )
        }
        Kept::NotAWrite => "the job store cannot be used right now (disk full, I/O error or database \
                            unreachable); retry shortly"
            .to_string(),
    };
    ErrorBody::new("storage_unavailable", message).response_retry_after(status, 2)
}
