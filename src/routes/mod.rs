//! Thin HTTP handlers: parse the request, send one message to the Dispatcher, answer.
//!
//! Also where every error actix itself produces (bad JSON, wrong content type, body too large,
//! unknown route, wrong method) is turned into the API's JSON error format.

mod analytics;
mod deadline;
mod errors;
mod health;
mod jobs;
mod metrics;
pub mod openapi;
mod page;
pub mod submit;
mod webhook_secret;

use std::path::Path;

use actix_web::dev::ServiceResponse;
use actix_web::error::{InternalError, JsonPayloadError, QueryPayloadError};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::{guard, web, HttpRequest, HttpResponse};

pub use analytics::AnalyticsLimits;
pub use deadline::{body_deadline, is_timeout, BodyBudget, BodyPermit, BodyTimeout};
pub use errors::{ApiError, InvalidInput};

use crate::error::{code_for_status, ErrorBody};

/// An HTTP method a route answers; `Get` answers HEAD too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        }
    }

    /// An actix route for this method (`Get` answers HEAD too).
    pub fn route(self) -> actix_web::Route {
        match self {
            Verb::Get => get_or_head(),
            Verb::Post => web::post(),
            Verb::Delete => web::delete(),
        }
    }
}

/// What a kind adds to the HTTP API: its routes, what its handlers extract, its OpenAPI paths.
pub struct KindRoutes {
    pub routes: Vec<KindRoute>,
    /// Adds the kind's app data (its limits, the kind itself) to each HTTP worker's app.
    pub app_data: std::sync::Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>,
    /// The kind's paths and schemas, merged into the served document.
    pub openapi: utoipa::openapi::OpenApi,
}

impl KindRoutes {
    /// No routes of its own: the kind is submitted with `POST /jobs` only.
    pub fn none() -> Self {
        KindRoutes {
            routes: Vec::new(),
            app_data: std::sync::Arc::new(|_: &mut web::ServiceConfig| {}),
            openapi: utoipa::openapi::OpenApiBuilder::new().build(),
        }
    }
}

/// One route of a kind: its path, its methods, and the handler of each method.
pub struct KindRoute {
    pub path: &'static str,
    pub verbs: &'static [Verb],
    pub handler: fn(Verb) -> actix_web::Route,
}

/// Every route of the engine, with its methods: what [`configure`] registers (with each
/// resource's `405` and `Allow` built from it) beside the kinds' routes, and what the OpenAPI
/// document is checked against.
pub const ROUTES: &[(&str, &[Verb])] = &[
    ("/jobs", &[Verb::Get, Verb::Post]),
    ("/jobs/{id}", &[Verb::Get, Verb::Delete]),
    ("/jobs/{id}/result", &[Verb::Get]),
    ("/ws", &[Verb::Get]),
    ("/webhook-secret", &[Verb::Get]),
    ("/analytics/events", &[Verb::Post]),
    ("/analytics/summary", &[Verb::Get]),
    ("/metrics", &[Verb::Get]),
    ("/healthz", &[Verb::Get]),
    ("/readyz", &[Verb::Get]),
    ("/openapi.json", &[Verb::Get]),
];

/// The handler of one route and method.
fn handler(path: &str, verb: Verb) -> actix_web::Route {
    let route = verb.route();
    match (path, verb) {
        ("/jobs", Verb::Get) => route.to(jobs::list_jobs),
        ("/jobs", Verb::Post) => route.to(jobs::submit_job),
        ("/jobs/{id}", Verb::Get) => route.to(jobs::get_job),
        ("/jobs/{id}", Verb::Delete) => route.to(jobs::cancel_job),
        ("/jobs/{id}/result", Verb::Get) => route.to(jobs::get_result),
        // A WebSocket handshake is a GET; HEAD is not one.
        ("/ws", Verb::Get) => web::get().to(crate::realtime::ws::connect),
        ("/webhook-secret", Verb::Get) => route.to(webhook_secret::webhook_secret),
        ("/analytics/events", Verb::Post) => route.to(analytics::ingest),
        ("/analytics/summary", Verb::Get) => route.to(analytics::summary),
        ("/metrics", Verb::Get) => route.to(metrics::metrics),
        ("/healthz", Verb::Get) => route.to(health::healthz),
        ("/readyz", Verb::Get) => route.to(health::readyz),
        ("/openapi.json", Verb::Get) => route.to(openapi::document),
        _ => unreachable!("ROUTES names {} {path} without a handler", verb.as_str()),
    }
}

/// Every route served: the engine's and the kinds'.
pub fn table(kinds: &[KindRoutes]) -> Vec<(&'static str, &'static [Verb])> {
    let of_kinds = kinds.iter().flat_map(|k| k.routes.iter().map(|r| (r.path, r.verbs)));
    ROUTES.iter().copied().chain(of_kinds).collect()
}

/// Registers every route of [`ROUTES`] and of `kinds`. `json_limit` bounds JSON bodies; the
/// browser page is the one built into the binary, or the files of `static_dir` when one is given.
pub fn configure(cfg: &mut web::ServiceConfig, json_limit: usize, static_dir: Option<&Path>, kinds: &[KindRoutes]) {
    cfg.app_data(json_config(json_limit)).app_data(web::QueryConfig::default().error_handler(query_error));
    for kind in kinds {
        (kind.app_data)(cfg);
        for route in &kind.routes {
            let mut resource = web::resource(route.path);
            for &verb in route.verbs {
                resource = resource.route((route.handler)(verb));
            }
            let allow = allow_of(route.path, route.verbs);
            cfg.service(resource.default_service(web::to(move || not_allowed(allow))));
        }
    }
    for &(path, verbs) in ROUTES {
        let mut resource = web::resource(path);
        for &verb in verbs {
            resource = resource.route(handler(path, verb));
        }
        let allow = allow_of(path, verbs);
        cfg.service(resource.default_service(web::to(move || not_allowed(allow))));
    }
    let Some(static_dir) = static_dir else {
        for asset in page::ASSETS {
            let name = format!("/{}", asset.name);
            let paths = if asset.name == page::INDEX { vec!["/".to_string(), name] } else { vec![name] };
            cfg.service(
                web::resource(paths)
                    .route(get_or_head().to(move |req: HttpRequest| page::serve(req, asset)))
                    .default_service(web::to(|| not_allowed("GET, HEAD"))),
            );
        }
        cfg.default_service(web::to(not_found));
        return;
    };
    let static_root = std::sync::Arc::new(static_dir.to_path_buf());
    cfg.service(
        actix_files::Files::new("/", static_dir)
            .index_file("index.html")
            .guard(guard::Any(guard::Get()).or(guard::Head()))
            .default_handler(web::to(not_found)),
    )
    .default_service(web::to(move |req: HttpRequest| fallback(req, static_root.clone())));
}

/// The `Allow` header of a route (the engine's or a kind's), built once per process and path
/// (`configure` runs on every HTTP worker).
fn allow_of(path: &'static str, verbs: &'static [Verb]) -> &'static str {
    static ALLOWS: std::sync::Mutex<Vec<(&'static str, &'static str)>> = std::sync::Mutex::new(Vec::new());
    let mut allows = ALLOWS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, allow)) = allows.iter().find(|(p, _)| *p == path) {
        return allow;
    }
    let allow = allow_text(path, verbs);
    allows.push((path, allow));
    allow
}

/// Methods as an `Allow` value. Leaked: one short string per route and process.
fn allow_text(path: &str, verbs: &[Verb]) -> &'static str {
    let mut names = Vec::new();
    for verb in verbs {
        names.push(verb.as_str());
        if *verb == Verb::Get && path != "/ws" {
            names.push("HEAD");
        }
    }
    Box::leak(names.join(", ").into_boxed_str())
}

/// A GET route that answers HEAD the same way (without the body, as HTTP wants).
fn get_or_head() -> actix_web::Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// What matched no route with `--static-dir`: a file of the page asked for with another method than GET or HEAD is
/// `405` with `Allow`; anything else is `404`.
async fn fallback(req: HttpRequest, static_root: std::sync::Arc<std::path::PathBuf>) -> HttpResponse {
    let relative = req.path().trim_start_matches('/');
    let safe = std::path::Path::new(relative).components().all(|c| matches!(c, std::path::Component::Normal(_)));
    let is_page = relative.is_empty()
        || (safe && {
            // A file-system look-up: on the blocking pool, not the HTTP thread.
            let file = static_root.join(relative);
            web::block(move || file.is_file()).await.unwrap_or(false)
        });
    if is_page {
        return not_allowed("GET, HEAD").await;
    }
    not_found(req).await
}

/// Rewrites any error response that is not already JSON (actix's own 400s, 404s from
/// extractors, …) into the API's error format, keeping its status and headers.
pub fn json_errors<B: 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(|res: ServiceResponse<B>| {
        let is_json = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
        }
        let status = res.status();
        let message = res
            .response()
            .error()
            .map(|e| e.to_string())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
        let (req, old) = res.into_parts();
        let mut new = ErrorBody::new(code_for_status(status), message).response(status);
        for (name, value) in old.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                new.headers_mut().insert(name.clone(), value.clone());
            }
        }
        Ok(ErrorHandlerResponse::Response(ServiceResponse::new(req, new).map_into_right_body::<B>()))
    })
}

fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default().limit(limit).error_handler(move |err, _req| {
        let (status, body) = match &err {
            JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorBody::new("payload_too_large", format!("the request body is larger than the {limit} byte limit")),
            ),
            JsonPayloadError::ContentType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorBody::new(
                    "unsupported_media_type",
                    "the body must be JSON, sent with Content-Type: application/json",
                ),
            ),
            JsonPayloadError::Deserialize(e) if e.is_data() => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorBody::new("invalid_field", e.to_string()))
            }
            JsonPayloadError::Payload(e) if deadline::is_timeout(e) => (
                StatusCode::REQUEST_TIMEOUT,
                ErrorBody::new("request_timeout", "the request body did not arrive in time"),
            ),
            JsonPayloadError::Deserialize(e) => {
                (StatusCode::BAD_REQUEST, ErrorBody::new("malformed_json", format!("the body is not valid JSON: {e}")))
            }
            other => (StatusCode::BAD_REQUEST, ErrorBody::new("bad_request", other.to_string())),
        };
        InternalError::from_response(err, body.response(status)).into()
    })
}

/// A query string that does not fit the route's parameters (a repeated one, say) is well-formed
/// but invalid: 422, like a bad value.
fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let body = ErrorBody::new("invalid_query", format!("the query string is not valid: {err}"));
    InternalError::from_response(err, body.response(StatusCode::UNPROCESSABLE_ENTITY)).into()
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    ErrorBody::new("not_found", format!("no route for {} {}", req.method(), req.path())).response(StatusCode::NOT_FOUND)
}

async fn not_allowed(allow: &'static str) -> HttpResponse {
    let mut res = ErrorBody::new("method_not_allowed", format!("this resource allows only {allow}"))
        .response(StatusCode::METHOD_NOT_ALLOWED);
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}
