//! `POST /generate-pdf`.

use std::sync::Arc;

use actix::Addr;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::openapi::{Document, ErrorResponse, Job};
use super::submit::{submit, REPLAYED};
use super::ApiError;
use super::BodyPermit;
use crate::access::Caller;
use crate::dispatch::Dispatcher;
use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::domain::object::Object;
use crate::domain::pdf::{DocumentSpec, PdfRequest, SpecError, SpecLimits};
use crate::domain::JobPayload;
use crate::store::JobStore;
use crate::workers::pdf::layout;

/// Submit a PDF document: answered at once with the queued job.
#[utoipa::path(
    post,
    path = "/generate-pdf",
    tag = "jobs",
    request_body(content = Document, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$", description = "1 to 255 visible ASCII characters: a repeat with the same body answers the first request's jobs (`Idempotent-Replayed: true`), with another body 422")),
    responses(
        (status = 202, description = "Accepted: the job, queued (or the first request's job, replayed)", body = Job,
            headers(("Location" = String, description = "/jobs/{id}")),
            links(("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")))),
                  ("GetResult" = (operation_id = "get_result", parameters(("id" = "$response.body#/id")))),
                  ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")))))),
        (status = 400, description = "Not JSON, or a malformed Idempotency-Key", body = ErrorResponse),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 408, description = "The body did not arrive within `--body-timeout`", body = ErrorResponse),
        (status = 413, description = "Larger than `--max-json-body`, or more than the limits could ever queue", body = ErrorResponse),
        (status = 415, description = "Not sent as application/json", body = ErrorResponse),
        (status = 422, description = "Well-formed but invalid: the message names the field", body = ErrorResponse),
        (status = 503, description = "Overloaded, draining or the store cannot write: retry after `Retry-After` seconds. For `storage_unavailable` the message says either that nothing was created, or that the commit failed and names the job that may exist (a retry with the same `Idempotency-Key` is safe)", body = ErrorResponse, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
// One extractor per concern (key, body budget, limits, store, Dispatcher).
#[allow(clippy::too_many_arguments)]
pub async fn generate_pdf(
    caller: Caller,
    permit: BodyPermit,
    req: HttpRequest,
    body: web::Json<Object<PdfRequest>>,
    limits: web::Data<SpecLimits>,
    policy: web::Data<CallbackPolicy>,
    store: web::Data<Arc<dyn JobStore>>,
    dispatcher: web::Data<Addr<Dispatcher>>,
) -> Result<HttpResponse, ApiError> {
    let mut spec = body.into_inner().into_inner();
    let callback = spec.callback_url.take().map(|raw| CallbackUrl::parse(&raw, **policy)).transpose()?;
    let spec = DocumentSpec::parse(spec, &limits)?;
    // A document that cannot fit what one PDF may render is refused now, not after a worker
    // spent seconds and hundreds of MiB on it (one pass over the text).
    layout::check_budget(&spec, limits.render).map_err(|message| SpecError { code: "document_too_large", message })?;
    let submitted = submit(&req, caller, &permit, vec![JobPayload::Pdf(spec)], callback, &store, &dispatcher).await?;
    let job = submitted.jobs.first().ok_or(ApiError::JobNotFound)?;
    let mut res = HttpResponse::Accepted();
    res.insert_header((header::LOCATION, format!("/jobs/{}", job.id)));
    if submitted.replayed {
        res.insert_header((REPLAYED, "true"));
    }
    Ok(res.json(job.view()))
}
