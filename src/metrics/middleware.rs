//! Times every HTTP request into `offload_http_request_duration_seconds{method, route, status}`.
//!
//! The route label is the matched pattern (`/jobs/{id}`), never the raw path, so the number of
//! series stays bounded whatever clients send.

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;

use super::Metrics;

pub async fn record(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req.app_data::<web::Data<Arc<Metrics>>>().map(|m| Arc::clone(m.get_ref()));
    let method = req.method().clone();
    let res = next.call(req).await?;
    if let Some(metrics) = metrics {
        let route = res.request().match_pattern().unwrap_or_else(|| "(unmatched)".into());
        let status = res.status();
        metrics
            .http_requests
            .with_label_values(&[method.as_str(), route.as_str(), status.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}
