//! Liveness and readiness.

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use super::openapi::{ErrorResponse, Health};
use super::ApiError;
use crate::dispatch::{Dispatcher, Readiness};
use crate::error::ErrorBody;

/// Alive: answers without touching any actor.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, description = "Alive (never touches the job engine)", body = Health))
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready for new work", body = Health),
        (status = 503, description = "Draining, a worker pool down, or the store cannot write", body = ErrorResponse),
    )
)]
/// Ready for new work: not draining, the store writing, and every worker pool running.
pub async fn readyz(dispatcher: web::Data<Addr<Dispatcher>>) -> Result<HttpResponse, ApiError> {
    let state = dispatcher.send(Readiness).await?;
    if state.draining {
        let body = ErrorBody::new("draining", "the service is shutting down");
        return Ok(body.response_retry_after(StatusCode::SERVICE_UNAVAILABLE, 5));
    }
    if let Some(detail) = &state.storage {
        return Ok(super::errors::storage_unavailable(
            detail,
            StatusCode::SERVICE_UNAVAILABLE,
            super::errors::Kept::NotAWrite,
        ));
    }
    if !state.pools_down.is_empty() {
        let down: Vec<&str> = state.pools_down.iter().map(|k| k.as_str()).collect();
        let body = ErrorBody::new("pool_down", format!("worker pools down: {}", down.join(", ")));
        return Ok(body.response_retry_after(StatusCode::SERVICE_UNAVAILABLE, 5));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
}
