//! `GET /webhook-secret`: the secret the caller's webhooks are signed with.
//!
//! With API keys, each key's webhooks are signed with a secret of its own: the one
//! `--webhook-secrets` gives it, else one derived from `--webhook-secret` (see
//! [`crate::async_io::webhooks::key_secret`]); a key reads its own here. The service secret
//! itself is never served: without keys (every job signed with it) and without any secret for
//! the key (its webhooks unsigned) this answers 404.

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use super::openapi::{ErrorResponse, WebhookSecretDoc};
use crate::access::Caller;
use crate::async_io::webhooks::Signing;
use crate::error::ErrorBody;

/// The key of `X-Offload-Signature` on this API key's webhooks.
#[utoipa::path(
    get,
    path = "/webhook-secret",
    tag = "webhooks",
    responses(
        (status = 200, description = "The secret this API key's webhooks are signed with: use it as the HMAC-SHA256 \
            key to check `X-Offload-Signature: sha256=<hex>` of the exact body", body = WebhookSecretDoc),
        (status = 401, description = "With `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 404, description = "No per-key secret: the service runs without `--webhook-secret` and has no \
            `--webhook-secrets` entry for this key (its webhooks are unsigned; `webhook_secret_not_set`), or without API keys (webhooks are signed with the service secret, \
            which is not served; `no_api_keys`)", body = ErrorResponse),
    )
)]
pub async fn webhook_secret(caller: Caller, signing: web::Data<Signing>) -> HttpResponse {
    let owner = match caller {
        Caller::Key(owner) => owner,
        Caller::Open => {
            let body = ErrorBody::new(
                "no_api_keys",
                "the service runs without API keys: webhooks are signed with the service's --webhook-secret, \
                 which is not served",
            );
            return body.response(StatusCode::NOT_FOUND);
        }
    };
    let Some(secret) = signing.secret_for(Some(owner)) else {
        let body = ErrorBody::new(
            "webhook_secret_not_set",
            "the service runs without --webhook-secret and has no secret of its own for this API key: \
             its webhooks are not signed",
        );
        return body.response(StatusCode::NOT_FOUND);
    };
    HttpResponse::Ok().insert_header((header::CACHE_CONTROL, "no-store")).json(serde_json::json!({"secret": secret}))
}
