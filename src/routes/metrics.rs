//! `GET /metrics`: Prometheus text format.

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpResponse};

use super::openapi::ErrorResponse;
use crate::access::Caller;
use crate::dispatch::{Dispatcher, GetLoad};
use crate::metrics::{Metrics, CONTENT_TYPE};

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain"),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
    )
)]
/// With API keys, any valid key may scrape (Prometheus sends it as a bearer token).
pub async fn metrics(
    _caller: Caller,
    metrics: web::Data<Arc<Metrics>>,
    dispatcher: web::Data<Addr<Dispatcher>>,
) -> HttpResponse {
    // Queue sizes and jobs held are the Dispatcher's state: read them now. If it does not answer,
    // the rest is still worth serving.
    if let Ok(load) = dispatcher.send(GetLoad).await {
        for (kind, queued, in_flight, workers) in load.pools {
            let pool = [kind.as_str()];
            metrics.pool_queued.with_label_values(&pool).set(queued as i64);
            metrics.pool_in_flight.with_label_values(&pool).set(in_flight as i64);
            metrics.pool_workers.with_label_values(&pool).set(workers as i64);
        }
        metrics.store_healthy.set(i64::from(load.store_healthy));
        metrics.store_result_bytes.set(load.result_bytes as i64);
        let s = load.by_status;
        let held = [
            ("queued", s.queued),
            ("running", s.running),
            ("succeeded", s.succeeded),
            ("failed", s.failed),
            ("cancelled", s.cancelled),
        ];
        for (status, n) in held {
            metrics.jobs_held.with_label_values(&[status]).set(n as i64);
        }
    }
    HttpResponse::Ok().content_type(CONTENT_TYPE).insert_header(("cache-control", "no-store")).body(metrics.render())
}
