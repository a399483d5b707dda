//! `GET /openapi.json`: the OpenAPI 3.1 description of the API.
//!
//! Each operation is described by a `#[utoipa::path]` attribute on its handler; the request and
//! response bodies by the schema types below, which mirror what the handlers read and write (the
//! job object is serialized by hand in `job.rs`, documents are parsed through `domain::pdf`). Two
//! things keep the description from drifting: a test checks that every route of
//! [`super::ROUTES`] is in the document with its methods and nothing else is, and Schemathesis
//! (`scripts/test.sh`) drives the real service from the document and checks every answer against
//! it.

use actix_web::HttpResponse;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

pub use crate::error::{ErrorDetail, ErrorResponse};

/// What a job does.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum Kind {
    Pdf,
    Image,
}

/// Where a job is in its life.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A job.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Job {
    /// 32 lowercase hex digits.
    #[schema(pattern = "^[0-9a-f]{32}$")]
    id: String,
    kind: Kind,
    status: Status,
    /// 0 to 1; never decreases; 1 exactly when the job succeeded.
    #[schema(minimum = 0.0, maximum = 1.0)]
    progress: f32,
    /// The current step, e.g. "page 3 of 12".
    stage: Option<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    started_at: Option<String>,
    #[schema(format = DateTime)]
    finished_at: Option<String>,
    /// How many times the job was started.
    #[schema(minimum = 0)]
    attempts: u32,
    /// Why it failed or was cancelled.
    error: Option<ErrorDetail>,
    /// What it produced, once succeeded.
    result: Option<JobResult>,
    links: JobLinks,
}

/// A succeeded job's result.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobResult {
    /// Where to download it.
    url: String,
    content_type: String,
    #[schema(minimum = 0)]
    bytes: u64,
    filename: String,
    /// Image results only.
    width: Option<u32>,
    height: Option<u32>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobLinks {
    #[schema(rename = "self")]
    this: String,
    result: String,
}

/// Jobs of `GET /jobs`, newest first, and how many jobs are held in each status.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobList {
    jobs: Vec<Job>,
    counts: Counts,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Counts {
    queued: u64,
    running: u64,
    succeeded: u64,
    failed: u64,
    cancelled: u64,
}

/// `POST /jobs`: a job of a kind whose input is JSON.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kind": "pdf", "input": {"title": "Quarterly report", "paragraphs": ["Sales went up."]}}))]
#[allow(dead_code)]
pub struct JobRequest {
    /// The kind's name: `pdf`, or a kind of the operator's own.
    #[schema(min_length = 1, max_length = 64, pattern = "^[a-z0-9_-]+$")]
    kind: String,
    /// The kind's input (for `pdf`, the document of `POST /generate-pdf` without `callback_url`).
    #[schema(value_type = Object)]
    input: serde_json::Value,
    /// POSTed the final job object when the job ends (public http(s) addresses only).
    #[schema(format = "uri")]
    callback_url: Option<String>,
}

/// The jobs an upload made, one per file, in order.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AcceptedJobs {
    jobs: Vec<Job>,
}

/// A schema written as JSON, for what the derive cannot say.
pub fn by_hand(schema: Value) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::RefOr::T(serde_json::from_value(schema).expect("a valid schema"))
}

/// An analytics event.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "page_view", "user": "u-42", "properties": {"path": "/pricing"}, "timestamp": "2026-12-02T10:00:00Z"}))]
#[allow(dead_code)]
pub struct Event {
    /// 1 to 128 characters once trimmed, no control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    name: String,
    #[schema(min_length = 1, max_length = 256)]
    user: Option<String>,
    properties: Option<serde_json::Map<String, Value>>,
    #[schema(format = DateTime)]
    timestamp: Option<String>,
}

/// One event or an array of them.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum Events {
    One(Event),
    Many(EventBatch),
}

/// 1 to `--analytics-max-batch` (default 1,000) events (written by hand: the derive takes no
/// item bounds on a newtype).
#[allow(dead_code)]
pub struct EventBatch(Vec<Event>);

impl utoipa::PartialSchema for EventBatch {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(utoipa::openapi::Ref::from_schema_name("Event"))
            .min_items(Some(1))
            .max_items(Some(1000))
            .into()
    }
}

impl ToSchema for EventBatch {}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct EventsAccepted {
    accepted: u64,
}

/// What the analytics actor has counted.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Summary {
    total: u64,
    by_name: std::collections::HashMap<String, u64>,
    unique_users: u64,
    per_minute: Vec<MinuteCount>,
    dropped: u64,
    forwarded: u64,
    sink_errors: u64,
    buffered: u64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct MinuteCount {
    #[schema(format = DateTime)]
    minute: String,
    count: u64,
}

/// The secret an API key's webhooks are signed with.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct WebhookSecretDoc {
    /// The HMAC-SHA256 key of `X-Offload-Signature`, used as is: 64 lowercase hex digits when
    /// derived from `--webhook-secret`, or the key's own from `--webhook-secrets`.
    #[schema(min_length = 16)]
    secret: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    status: String,
}

/// The API key scheme (used when the service runs with `--api-keys`).
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("An API key of `--api-keys`; needed only when the service runs with keys."))
            .build();
        components.add_security_scheme("api_key", SecurityScheme::Http(scheme));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "offload",
        description = "Heavy work off the request path: PDF and image jobs accepted at once (202), run on worker \
                       threads, followed by polling, WebSocket or webhook. Errors are always \
                       `{\"error\": {\"code\", \"message\"}}`. With `--api-keys`, every route but `/healthz`, `/readyz` and the page \
                       needs `Authorization: Bearer KEY` (401 otherwise), and a key sees only its own jobs."
    ),
    paths(
        super::jobs::submit_job,
        super::jobs::list_jobs,
        super::jobs::get_job,
        super::jobs::cancel_job,
        super::jobs::get_result,
        crate::realtime::ws::connect,
        super::webhook_secret::webhook_secret,
        super::analytics::ingest,
        super::analytics::summary,
        super::metrics::metrics,
        super::health::healthz,
        super::health::readyz,
        document,
    ),
    modifiers(&BearerKeys),
    security((), ("api_key" = [])),
)]
pub struct ApiDoc;

/// The served document: the engine's paths and each kind's, built once per application.
pub struct Spec(Value);

impl Spec {
    pub fn build(kinds: impl IntoIterator<Item = utoipa::openapi::OpenApi>) -> Spec {
        let mut doc = ApiDoc::openapi();
        for fragment in kinds {
            doc.merge(fragment);
        }
        let mut doc = serde_json::to_value(doc).expect("the OpenAPI document serializes");
        camel_case_links(&mut doc);
        Spec(doc)
    }

    pub fn json(&self) -> &Value {
        &self.0
    }
}

/// utoipa 5.5 writes the fields of Link objects in snake case (`operation_id`); OpenAPI names
/// them `operationId`, `operationRef`, `requestBody`.
fn camel_case_links(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(links)) = map.get_mut("links") {
                for link in links.values_mut().filter_map(Value::as_object_mut) {
                    for (from, to) in [
                        ("operation_id", "operationId"),
                        ("operation_ref", "operationRef"),
                        ("request_body", "requestBody"),
                    ] {
                        if let Some(v) = link.remove(from) {
                            link.insert(to.to_string(), v);
                        }
                    }
                }
            }
            map.values_mut().for_each(camel_case_links);
        }
        Value::Array(items) => items.iter_mut().for_each(camel_case_links),
        _ => {}
    }
}

/// The OpenAPI 3.1 description of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI document", content_type = "application/json"),
        (status = 401, description = "With `--api-keys`: no valid key", body = ErrorResponse),
    )
)]
pub async fn document(_caller: crate::access::Caller, spec: actix_web::web::Data<Spec>) -> HttpResponse {
    HttpResponse::Ok().insert_header(("cache-control", "private, max-age=300")).json(spec.json())
}
