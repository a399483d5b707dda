//! `POST /generate-pdf`, its OpenAPI description, and what start-up registers of it.

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse};
use utoipa::{OpenApi, ToSchema};

use super::spec::PdfRequest;
use super::PdfKind;
use crate::access::Caller;
use crate::dispatch::Dispatcher;
use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::domain::object::Object;
use crate::kind::NewWork;
use crate::routes::openapi::{by_hand, ErrorResponse, Job};
use crate::routes::submit::{accepted_one, submit};
use crate::routes::{ApiError, BodyPermit, KindRoute, KindRoutes, Verb};
use crate::store::JobStore;

/// The routes, app data and OpenAPI paths of PDF jobs.
pub fn http(kind: Arc<PdfKind>) -> KindRoutes {
    KindRoutes {
        routes: vec![KindRoute {
            path: "/generate-pdf",
            verbs: &[Verb::Post],
            handler: |verb| verb.route().to(generate_pdf),
        }],
        app_data: Arc::new(move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(web::Data::from(kind.clone()));
        }),
        openapi: PdfDoc::openapi(),
    }
}

#[derive(OpenApi)]
#[openapi(paths(generate_pdf))]
struct PdfDoc;

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
    kind: web::Data<PdfKind>,
    policy: web::Data<CallbackPolicy>,
    store: web::Data<Arc<dyn JobStore>>,
    dispatcher: web::Data<Addr<Dispatcher>>,
) -> Result<HttpResponse, ApiError> {
    let mut spec = body.into_inner().into_inner();
    let callback = spec.callback_url.take().map(|raw| CallbackUrl::parse(&raw, **policy)).transpose()?;
    let spec = kind.parse(spec)?;
    let submitted =
        submit(&req, caller, &permit, vec![NewWork::new(&kind.into_inner(), spec)], callback, &store, &dispatcher)
            .await?;
    accepted_one(submitted)
}

/// A document to render as PDF. Unknown fields are refused.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "title": "Quarterly report",
    "subtitle": "Q3",
    "paragraphs": ["Sales went up this quarter."],
    "table": {"columns": ["Item", "Qty", "Price"], "rows": [["Widget", 3, 9.99], ["Gadget", 1, 24.5]]},
    "page_size": "A4"
}))]
#[allow(dead_code)]
pub struct Document {
    /// 1 to 500 characters, not only spaces or control characters.
    #[schema(min_length = 1, max_length = 500, pattern = "[^\\s\\u0000-\\u001f\\u007f-\\u009f]")]
    title: String,
    /// Up to 2,000 characters.
    #[schema(max_length = 2000)]
    subtitle: Option<String>,
    /// Wrapped to the page width; `\n` breaks a line. Up to 10,000 paragraphs of 100,000 characters.
    #[schema(max_items = 10000)]
    paragraphs: Option<Vec<String>>,
    table: Option<Table>,
    /// `A4` (default) or `Letter`.
    page_size: Option<PageSize>,
    /// POSTed the final job object when the job ends (public http(s) addresses only).
    #[schema(format = "uri")]
    callback_url: Option<String>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub enum PageSize {
    A4,
    Letter,
}

/// A table: a header row and rows of at most as many cells.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Table {
    #[schema(min_items = 1, max_items = 50)]
    columns: Vec<Cell>,
    #[schema(max_items = 100000)]
    rows: Option<Vec<Vec<Cell>>>,
}

/// A cell: text (up to `--max-cell-chars`, default 1,000), or a number, boolean or null printed
/// as text.
pub struct Cell;

impl utoipa::PartialSchema for Cell {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        by_hand(serde_json::json!({
            "description": "Text (up to `--max-cell-chars`, default 1,000), or a number, boolean or null printed as text.",
            "oneOf": [
                {"type": "string", "maxLength": 1000},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "null"}
            ]
        }))
    }
}

impl ToSchema for Cell {}
