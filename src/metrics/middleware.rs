//! Times every HTTP request into `offload_http_request_duration_seconds{method, route, status}`.
//!
//! Every label is drawn from a bounded set, so the number of series stays bounded whatever
//! clients send: the route is the matched pattern (`/jobs/{id}`), never the raw path, and the
//! method one of the standard ones or `other` (any token is a valid HTTP method).

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
    let method = method_label(req.method());
    let res = next.call(req).await?;
    if let Some(metrics) = metrics {
        let route = res.request().match_pattern().unwrap_or_else(|| "(unmatched)".into());
        let status = res.status();
        metrics
            .http_requests
            .with_label_values(&[method, route.as_str(), status.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}

/// The method as a label: the standard methods by name, anything else `other`.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    const KNOWN: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
    KNOWN.into_iter().find(|m| *m == method.as_str()).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use actix_web::http::Method;

    use super::*;

    #[test]
    fn made_up_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for made_up in ["BREW", "get", "X-1", "PROPFIND"] {
            assert_eq!(method_label(&Method::from_bytes(made_up.as_bytes()).unwrap()), "other", "{made_up}");
        }
    }
}
