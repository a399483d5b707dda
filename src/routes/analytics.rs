//! `POST /analytics/events` and `GET /analytics/summary`.

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::openapi::{ErrorResponse, Events, EventsAccepted, Summary};
use super::ApiError;
use super::BodyPermit;
use crate::access::Caller;
use crate::async_io::analytics::{parse_events, AnalyticsHandle, GetSummary};
use crate::error::ErrorBody;

/// Most events in one request, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct AnalyticsLimits {
    pub max_batch: usize,
    /// Largest `properties` of one event, in bytes of JSON.
    pub max_properties: usize,
}

/// Parses and hands the events over; never waits for them to be counted.
/// Analytics are the service's, not a key's: any valid key may send events and read the summary.
#[utoipa::path(
    post,
    path = "/analytics/events",
    tag = "analytics",
    request_body(content = Events, content_type = "application/json"),
    responses(
        (status = 202, description = "Handed over to be counted (and forwarded)", body = EventsAccepted),
        (status = 400, description = "Not JSON", body = ErrorResponse),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 413, description = "Larger than `--max-json-body`", body = ErrorResponse),
        (status = 415, description = "Not sent as application/json", body = ErrorResponse),
        (status = 422, description = "An invalid event: the message names its index and field", body = ErrorResponse),
        (status = 503, description = "Overloaded, draining or the store cannot write: retry after `Retry-After` seconds", body = ErrorResponse, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn ingest(
    _caller: Caller,
    _permit: BodyPermit,
    body: web::Json<Value>,
    limits: web::Data<AnalyticsLimits>,
    analytics: web::Data<AnalyticsHandle>,
) -> Result<HttpResponse, ApiError> {
    let events = parse_events(body.into_inner(), limits.max_batch, limits.max_properties)?;
    let accepted = analytics.submit(events)?;
    Ok(HttpResponse::Accepted().json(json!({ "accepted": accepted })))
}

/// What has been counted.
#[utoipa::path(
    get,
    path = "/analytics/summary",
    tag = "analytics",
    responses(
        (status = 200, description = "The counts", body = Summary),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 503, description = "Analytics is restarting", body = ErrorResponse),
    )
)]
pub async fn summary(_caller: Caller, analytics: web::Data<AnalyticsHandle>) -> HttpResponse {
    match analytics.addr().send(GetSummary).await {
        Ok(Some(summary)) => HttpResponse::Ok().insert_header(("cache-control", "no-store")).json(summary),
        _ => ErrorBody::new("unavailable", "analytics is restarting; retry shortly")
            .response_retry_after(actix_web::http::StatusCode::SERVICE_UNAVAILABLE, 1),
    }
}
