//! `POST /jobs` (any kind whose input is JSON), `GET /jobs`, `GET /jobs/{id}`,
//! `GET /jobs/{id}/result`, `DELETE /jobs/{id}`.

use std::sync::Arc;

use actix::Addr;
use actix_web::http::header::{self, ContentDisposition, DispositionParam, DispositionType};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::openapi::JobRequest as JobRequestDoc;
use super::openapi::{ErrorResponse, Job as JobDoc, JobList as JobListDoc, Kind as KindDoc, Status as StatusDoc};
use super::submit::{accepted_one, submit};
use super::{ApiError, BodyPermit, InvalidInput};
use crate::access::Caller;
use crate::dispatch::{CancelError, CancelJob, Dispatcher};
use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::domain::object::Object;
use crate::job::{Job, JobId, JobKind, JobView};
use crate::kind::{Kinds, NewWork};
use crate::store::{JobStore, ListFilter, ResultBody, ResultReader, StatusCounts};

/// Most jobs one `GET /jobs` returns.
const MAX_LIST: usize = 1000;
const DEFAULT_LIST: usize = 100;

/// An id that cannot be one of ours is simply an unknown job.
fn job_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse().map_err(|_| ApiError::JobNotFound)
}

/// The job, if it exists for this caller (another key's job does not).
fn visible(store: &dyn JobStore, id: JobId, caller: Caller) -> Result<Option<Job>, ApiError> {
    Ok(store.get(id)?.filter(|job| caller.may_see(job)))
}

/// The body of `POST /jobs`. Unknown fields are refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    kind: String,
    input: serde_json::Value,
    #[serde(default)]
    callback_url: Option<String>,
}

/// Submit a job of any kind whose input is JSON (`pdf`, or a kind of the operator's own):
/// answered at once with the queued job.
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    request_body(content = JobRequestDoc, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$", description = "1 to 255 visible ASCII characters: a repeat with the same body answers the first request's job (`Idempotent-Replayed: true`), with another body 422")),
    responses(
        (status = 202, description = "Accepted: the job, queued (or the first request's job, replayed)", body = JobDoc,
            headers(("Location" = String, description = "/jobs/{id}")),
            links(("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")))),
                  ("GetResult" = (operation_id = "get_result", parameters(("id" = "$response.body#/id")))),
                  ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")))))),
        (status = 400, description = "`malformed_json`: not JSON; `invalid_header`: a malformed Idempotency-Key", body = ErrorResponse),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 408, description = "`request_timeout`: the body did not arrive within `--body-timeout`", body = ErrorResponse),
        (status = 413, description = "`payload_too_large`: larger than `--max-json-body`, or more than the limits could ever queue", body = ErrorResponse),
        (status = 415, description = "`unsupported_media_type`: not sent as application/json", body = ErrorResponse),
        (status = 422, description = "`unknown_kind`: no kind of that name takes JSON input (the message names those that do); `invalid_field` and the kind's own codes (e.g. `document_too_large`): the input is invalid, the message names the field; `invalid_callback_url`, `callback_not_allowed`, `idempotency_key_reused`", body = ErrorResponse),
        (status = 503, description = "Overloaded, draining or the store cannot write: retry after `Retry-After` seconds. For `storage_unavailable` the message says either that nothing was created, or that the commit failed and names the job that may exist (a retry with the same `Idempotency-Key` is safe)", body = ErrorResponse, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
// One extractor per concern (key, body budget, kinds, callback policy, store, Dispatcher).
#[allow(clippy::too_many_arguments)]
pub async fn submit_job(
    caller: Caller,
    permit: BodyPermit,
    req: HttpRequest,
    body: web::Json<Object<JobRequest>>,
    kinds: web::Data<Kinds>,
    policy: web::Data<CallbackPolicy>,
    store: web::Data<Arc<dyn JobStore>>,
    dispatcher: web::Data<Addr<crate::dispatch::Dispatcher>>,
) -> Result<HttpResponse, ApiError> {
    let JobRequest { kind, input, callback_url } = body.into_inner().into_inner();
    let unknown = || {
        let names = kinds.taking_json();
        InvalidInput::new(
            "unknown_kind",
            format!("kind: no kind {kind:?} takes JSON input here; the kinds that do: {}", names.join(", ")),
        )
    };
    let runner = kinds.find(&kind).ok_or_else(unknown)?.clone();
    let (input, weight) = runner.parse_json(input).ok_or_else(unknown)??;
    let callback = callback_url.map(|raw| CallbackUrl::parse(&raw, **policy)).transpose()?;
    let work = NewWork { runner, input, weight };
    let submitted = submit(&req, caller, &permit, vec![work], callback, &store, &dispatcher).await?;
    accepted_one(submitted)
}

/// A job's current state.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (32 lowercase hex digits)")),
    responses(
        (status = 200, description = "The job", body = JobDoc),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 404, description = "No such job (or another key's)", body = ErrorResponse),
        (status = 503, description = "The store cannot be read", body = ErrorResponse),
    )
)]
pub async fn get_job(
    caller: Caller,
    path: web::Path<String>,
    store: web::Data<Arc<dyn JobStore>>,
) -> Result<HttpResponse, ApiError> {
    let id = job_id(&path)?;
    let store = store.get_ref().clone();
    let job = web::block(move || visible(&*store, id, caller)).await??.ok_or(ApiError::JobNotFound)?;
    Ok(HttpResponse::Ok().insert_header((header::CACHE_CONTROL, "no-store")).json(job.view()))
}

/// A succeeded job's result: the PDF or the image.
#[utoipa::path(
    get,
    path = "/jobs/{id}/result",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (32 lowercase hex digits)")),
    responses(
        (status = 200, description = "The result, with Content-Disposition: attachment",
            content(("application/pdf"), ("image/png"), ("image/jpeg"), ("image/webp"))),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 404, description = "No such job (or another key's)", body = ErrorResponse),
        (status = 409, description = "The job has not succeeded (yet)", body = ErrorResponse),
        (status = 503, description = "The store cannot be read", body = ErrorResponse),
    )
)]
pub async fn get_result(
    caller: Caller,
    path: web::Path<String>,
    store: web::Data<Arc<dyn JobStore>>,
) -> Result<HttpResponse, ApiError> {
    let id = job_id(&path)?;
    let store = store.get_ref().clone();
    // Read from disk on the blocking pool, never through the Dispatcher's mailbox.
    let found = web::block(move || -> Result<_, ApiError> {
        if caller != Caller::Open && visible(&*store, id, caller)?.is_none() {
            return Ok(Err(None));
        }
        match store.result(id)? {
            Some(found) => Ok(Ok(found)),
            None => Ok(Err(store.get(id)?)),
        }
    })
    .await??;
    let (meta, body) = match found {
        Ok(found) => found,
        Err(None) => return Err(ApiError::JobNotFound),
        Err(Some(job)) => return Err(ApiError::ResultNotReady(Box::new(job))),
    };
    let disposition = ContentDisposition {
        disposition: DispositionType::Attachment,
        parameters: vec![DispositionParam::Filename(meta.filename.clone())],
    };
    let mut res = HttpResponse::Ok();
    // As the kind gave it; a value no header may carry is sent as bytes.
    let content_type = header::HeaderValue::from_str(&meta.content_type)
        .unwrap_or(header::HeaderValue::from_static("application/octet-stream"));
    res.content_type(content_type)
        .insert_header(disposition)
        .insert_header((header::CACHE_CONTROL, "private, max-age=3600, immutable"));
    Ok(match body {
        ResultBody::Whole(bytes) => res.body(bytes),
        ResultBody::Stream { len, reader } => res.no_chunking(len as u64).streaming(stream_result(len, reader)),
    })
}

/// Bytes of a large result sent as they are read, one piece at a time on the blocking pool: a
/// download holds one piece in memory, however large the result.
fn stream_result(
    len: usize,
    reader: Box<dyn ResultReader>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, actix_web::Error>> {
    const PIECE: usize = 256 << 10;
    futures::stream::try_unfold((0usize, reader), move |(offset, mut reader)| async move {
        if offset >= len {
            return Ok(None);
        }
        let (piece, reader) = web::block(move || (reader.read_at(offset, PIECE), reader)).await?;
        let piece = piece.map_err(|e| actix_web::error::ErrorServiceUnavailable(e.to_string()))?;
        if piece.is_empty() {
            return Err(actix_web::error::ErrorServiceUnavailable("the result is gone"));
        }
        let next = offset + piece.len();
        Ok(Some((piece, (next, reader))))
    })
}

/// Cancel a job: a queued one never starts, a running one stops at its next checkpoint.
#[utoipa::path(
    delete,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (32 lowercase hex digits)")),
    responses(
        (status = 200, description = "The job, cancelled", body = JobDoc),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 404, description = "No such job (or another key's)", body = ErrorResponse),
        (status = 409, description = "The job already ended", body = ErrorResponse),
        (status = 503, description = "The store cannot write", body = ErrorResponse),
    )
)]
pub async fn cancel_job(
    caller: Caller,
    path: web::Path<String>,
    store: web::Data<Arc<dyn JobStore>>,
    dispatcher: web::Data<Addr<Dispatcher>>,
) -> Result<HttpResponse, ApiError> {
    let id = job_id(&path)?;
    if caller != Caller::Open {
        // The owner never changes: checked once, before the Dispatcher is asked.
        let store = store.get_ref().clone();
        web::block(move || visible(&*store, id, caller)).await??.ok_or(ApiError::JobNotFound)?;
    }
    let job = dispatcher.send(CancelJob(id)).await?.map_err(|e| match e {
        CancelError::NotFound => ApiError::JobNotFound,
        CancelError::AlreadyFinished(job) => ApiError::AlreadyFinished(job),
        CancelError::Storage(m) => ApiError::Storage(m),
    })?;
    Ok(HttpResponse::Ok().json(job.view()))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    kind: Option<String>,
    limit: Option<String>,
}

#[derive(Serialize)]
struct JobList<'a> {
    jobs: Vec<JobView<'a>>,
    /// All jobs held now (not only the listed ones; with API keys, the caller's), by status.
    counts: StatusCounts,
}

/// Jobs, newest first (with API keys: the caller's), and the counts by status.
#[utoipa::path(
    get,
    path = "/jobs",
    tag = "jobs",
    params(
        ("status" = Option<StatusDoc>, Query, description = "Only jobs in this status"),
        ("kind" = Option<KindDoc>, Query, description = "Only jobs of this kind"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "At most this many (default 100)"),
    ),
    responses(
        (status = 200, description = "The jobs", body = JobListDoc),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 422, description = "A bad query parameter", body = ErrorResponse),
        (status = 503, description = "The store cannot be read", body = ErrorResponse),
    )
)]
pub async fn list_jobs(
    caller: Caller,
    query: web::Query<ListQuery>,
    store: web::Data<Arc<dyn JobStore>>,
) -> Result<HttpResponse, ApiError> {
    let mut filter = parse_filter(&query)?;
    filter.owner = caller.owner();
    let store = store.get_ref().clone();
    let (jobs, counts) = web::block(move || {
        let counts = match caller.owner() {
            None => store.stats().by_status,
            Some(owner) => store.counts(owner)?,
        };
        store.list(&filter).map(|jobs| (jobs, counts))
    })
    .await??;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(JobList { jobs: jobs.iter().map(|j| j.view()).collect(), counts }))
}

fn parse_filter(q: &ListQuery) -> Result<ListFilter, ApiError> {
    let invalid = |field, message: &str| ApiError::InvalidQuery { field, message: message.to_string() };
    let status = q
        .status
        .as_deref()
        .map(|s| s.parse().map_err(|_| invalid("status", "must be queued, running, succeeded, failed or cancelled")))
        .transpose()?;
    let kind = match q.kind.as_deref() {
        None => None,
        // A kind this process never saw has no jobs here (and allocates nothing).
        Some(k) => match JobKind::known(k) {
            Some(kind) => Some(kind),
            None => {
                let known: Vec<&str> = JobKind::all().iter().map(|k| k.as_str()).collect();
                return Err(invalid("kind", &format!("must be a kind of this service: {}", known.join(", "))));
            }
        },
    };
    let limit = match q.limit.as_deref() {
        None => DEFAULT_LIST,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST).contains(&n) => n,
            _ => return Err(invalid("limit", "must be a whole number from 1 to 1000")),
        },
    };
    Ok(ListFilter { status, kind, limit, owner: None })
}
