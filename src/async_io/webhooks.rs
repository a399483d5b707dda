//! Webhook delivery: the [`Webhooks`] actor, on the async I/O arbiter, POSTs a job's final job
//! object to its `callback_url`.
//!
//! Each delivery is its own task: up to `max_attempts` POSTs with a timeout each, retried with
//! exponential backoff and jitter on network errors, timeouts, 408, 429 and 5xx (other answers
//! are final). With a secret, every request carries
//! `X-Offload-Signature: sha256=<hex HMAC-SHA256 of the exact body>`. At most `concurrency`
//! deliveries run at once; at most `capacity` wait or run, past that new ones are dropped (counted).
//!
//! Which secret signs: a job without an owner (the service runs open) is signed with the service
//! secret (`--webhook-secret`) itself; a job of an API key with that key's own secret,
//! [`key_secret`], derived from the service secret and the job's owner at delivery time (so no
//! secret is ever stored, and a restart re-delivers owed webhooks with the same key). A tenant
//! that knows its own secret can then verify its webhooks but cannot sign one another key's
//! receiver would accept.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::backoff::Backoff;
use super::client::{http_client, refused_target};
use super::guard::guarded;
use crate::access::KeySecrets;
use crate::domain::callback::CallbackUrl;
use crate::job::{JobId, Owner};
use crate::metrics::Metrics;
use crate::store::JobStore;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-offload-signature";

#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub signing: Signing,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub timeout: Duration,
    pub concurrency: usize,
    pub capacity: usize,
    /// Refuse names that resolve to non-public addresses (unless `--allow-private-webhooks`).
    pub public_only: bool,
}

/// POST `body` (a job object, serialized once: the exact bytes signed) to `url`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub job: JobId,
    /// The job's owner (its API key): picks the signing secret.
    pub owner: Option<Owner>,
    pub url: CallbackUrl,
    pub body: Bytes,
}

pub struct Webhooks {
    settings: WebhookSettings,
    client: awc::Client,
    waiting: VecDeque<Deliver>,
    running: usize,
    metrics: Arc<Metrics>,
    /// Told when a delivery is over (delivered or given up), so it is no longer owed.
    store: Arc<dyn JobStore>,
}

/// Starts the actor under a supervisor on `arbiter`.
pub fn start(
    arbiter: &ArbiterHandle,
    settings: WebhookSettings,
    metrics: Arc<Metrics>,
    store: Arc<dyn JobStore>,
) -> Addr<Webhooks> {
    Supervisor::start_in_arbiter(arbiter, move |_| Webhooks {
        client: http_client(settings.timeout, settings.public_only),
        settings,
        waiting: VecDeque::new(),
        running: 0,
        metrics,
        store,
    })
}

/// `sha256=<hex>` of `body` keyed with `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What the per-key secret is derived under (a version, so the derivation can change).
const KEY_SECRET_CONTEXT: &str = "offload-webhook-v1:";

/// The webhook secret of one API key: the hex of `HMAC-SHA256(service_secret,
/// "offload-webhook-v1:" + owner)`, where the owner is the lowercase hex of the key's owner id
/// (what its jobs store). The receiver uses the 64 hex characters as its HMAC key, as it would
/// use `--webhook-secret`.
pub fn key_secret(service_secret: &str, owner: Owner) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(service_secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(KEY_SECRET_CONTEXT.as_bytes());
    mac.update(owner.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// What webhooks are signed with: the service secret (`--webhook-secret`) and the explicit
/// secrets of some keys (`--webhook-secrets`).
#[derive(Clone, Default)]
pub struct Signing {
    pub service: Option<String>,
    pub keys: Arc<KeySecrets>,
}

impl Signing {
    /// The secret of `owner`'s webhooks: its explicit one, else as [`signing_secret`] says.
    pub fn secret_for(&self, owner: Option<Owner>) -> Option<String> {
        match owner.and_then(|o| self.keys.get(o)) {
            Some(explicit) => Some(explicit.to_string()),
            None => signing_secret(self.service.as_deref(), owner),
        }
    }
}

impl std::fmt::Debug for Signing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signing(service secret: {}, {:?})", self.service.is_some(), self.keys)
    }
}

/// The secret a job's webhook is signed with: the service secret for a job without an owner,
/// the owner's own for a job of an API key; `None` (unsigned) without a service secret.
pub fn signing_secret(service_secret: Option<&str>, owner: Option<Owner>) -> Option<String> {
    let secret = service_secret?;
    Some(match owner {
        None => secret.to_string(),
        Some(owner) => key_secret(secret, owner),
    })
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    /// Out of attempts, or the receiver gave a final refusal.
    Failed,
    /// The target resolved to an address webhooks may not reach.
    Refused,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }
}

impl Webhooks {
    fn start_waiting(&mut self, ctx: &mut Context<Self>) {
        while self.running < self.settings.concurrency.max(1) {
            let Some(delivery) = self.waiting.pop_front() else { break };
            self.running += 1;
            let client = self.client.clone();
            let settings = self.settings.clone();
            let metrics = self.metrics.clone();
            let addr = ctx.address();
            let job = delivery.job;
            actix_rt::spawn(async move {
                use futures::FutureExt;
                let attempt = deliver(&client, &settings, &delivery, &metrics);
                let outcome = std::panic::AssertUnwindSafe(attempt).catch_unwind().await.unwrap_or(Outcome::Failed);
                addr.do_send(Done { job, outcome });
            });
        }
        self.metrics.webhook_pending.set((self.waiting.len() + self.running) as i64);
    }
}

async fn deliver(client: &awc::Client, settings: &WebhookSettings, d: &Deliver, metrics: &Metrics) -> Outcome {
    let key = settings.signing.secret_for(d.owner);
    let signature = key.map(|secret| signature(&secret, &d.body));
    for attempt in 1..=settings.max_attempts.max(1) {
        let mut request = client
            .post(d.url.as_str())
            .insert_header(("content-type", "application/json"))
            .insert_header(("x-offload-job-id", d.job.to_string()))
            .insert_header(("x-offload-attempt", attempt.to_string()));
        if let Some(signature) = &signature {
            request = request.insert_header((SIGNATURE_HEADER, signature.as_str()));
        }
        let (retry, reason) = match request.send_body(d.body.clone()).await {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(job = %d.job, url = %d.url, attempt, "webhook delivered");
                return Outcome::Delivered;
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                tracing::warn!(job = %d.job, url = %d.url, attempt, status, "webhook answered with an error");
                (resp.status().is_server_error() || status == 408 || status == 429, "status")
            }
            Err(e) => {
                if let Some(refused) = refused_target(&e) {
                    tracing::warn!(job = %d.job, url = %d.url, "webhook refused: {refused}");
                    return Outcome::Refused;
                }
                let timeout = matches!(e, awc::error::SendRequestError::Timeout)
                    || matches!(e, awc::error::SendRequestError::Connect(awc::error::ConnectError::Timeout));
                tracing::warn!(job = %d.job, url = %d.url, attempt, "webhook attempt failed: {e}");
                (true, if timeout { "timeout" } else { "network" })
            }
        };
        metrics.webhook_attempt_failures.with_label_values(&[reason]).inc();
        if !retry || attempt == settings.max_attempts {
            break;
        }
        actix_rt::time::sleep(settings.backoff.delay(attempt)).await;
    }
    tracing::warn!(job = %d.job, url = %d.url, "webhook delivery failed for good");
    Outcome::Failed
}

impl Actor for Webhooks {
    type Context = Context<Self>;
}

impl Supervised for Webhooks {
    fn restarting(&mut self, _: &mut Context<Self>) {
        tracing::warn!("webhook actor restarting");
    }
}

impl Handler<Deliver> for Webhooks {
    type Result = ();
    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) {
        let metrics = self.metrics.clone();
        guarded(self, ctx, "webhooks", &metrics, |this, ctx| {
            if this.waiting.len() + this.running >= this.settings.capacity.max(1) {
                // Still owed in a durable store: delivered after the next start (with a shared
                // store, by any instance once this one lets go of it).
                tracing::warn!(job = %msg.job, "webhook queue full; delivery dropped");
                this.store.webhook_dropped(msg.job);
                this.metrics.webhook_deliveries.with_label_values(&["dropped"]).inc();
                return;
            }
            this.waiting.push_back(msg);
            this.start_waiting(ctx);
        });
    }
}

/// A delivery task ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Done {
    job: JobId,
    outcome: Outcome,
}

impl Handler<Done> for Webhooks {
    type Result = ();
    fn handle(&mut self, msg: Done, ctx: &mut Context<Self>) {
        self.running = self.running.saturating_sub(1);
        self.metrics.webhook_deliveries.with_label_values(&[msg.outcome.label()]).inc();
        self.store.webhook_done(msg.job);
        self.start_waiting(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac_sha256() {
        // RFC 4231, test case 2.
        let sig = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn each_owner_gets_its_own_secret_and_jobs_without_one_keep_the_service_secret() {
        let a = Owner::from_bytes([0xa1; 16]);
        let b = Owner::from_bytes([0xb2; 16]);
        // The derivation, spelled out: HMAC-SHA256(S, "offload-webhook-v1:" + hex owner), hex.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"service-secret").unwrap();
        mac.update(format!("offload-webhook-v1:{}", "a1".repeat(16)).as_bytes());
        let expected_a = hex::encode(mac.finalize().into_bytes());
        assert_eq!(key_secret("service-secret", a), expected_a);
        assert_eq!(expected_a.len(), 64);
        // (service secret, owner, signing secret)
        let cases: [(Option<&str>, Option<Owner>, Option<String>); 5] = [
            (Some("service-secret"), None, Some("service-secret".into())),
            (Some("service-secret"), Some(a), Some(expected_a.clone())),
            (Some("service-secret"), Some(b), Some(key_secret("service-secret", b))),
            (None, None, None),
            (None, Some(a), None),
        ];
        for (service, owner, want) in cases {
            assert_eq!(signing_secret(service, owner), want, "{service:?} {owner:?}");
        }
        assert_ne!(key_secret("service-secret", a), key_secret("service-secret", b));
        assert_ne!(key_secret("service-secret", a), key_secret("other-secret", a), "a new service secret, new keys");
    }

    #[test]
    fn an_explicit_secret_wins_over_the_derived_one_for_its_key_only() {
        let keys = crate::access::ApiKeys::new(&[
            crate::access::ApiKey::parse("key-a-0123456789abcdef").unwrap(),
            crate::access::ApiKey::parse("key-b-0123456789abcdef").unwrap(),
        ])
        .unwrap();
        let a = keys.identify(b"key-a-0123456789abcdef").unwrap();
        let b = keys.identify(b"key-b-0123456789abcdef").unwrap();
        let explicit = KeySecrets::parse("key-a-0123456789abcdef explicit-secret-of-a", &keys).unwrap();
        let with =
            |service: Option<&str>| Signing { service: service.map(str::to_string), keys: Arc::new(explicit.clone()) };
        // (service secret, owner, signing secret)
        let cases: [(Option<&str>, Option<Owner>, Option<String>); 5] = [
            (Some("service-secret"), Some(a), Some("explicit-secret-of-a".into())),
            (None, Some(a), Some("explicit-secret-of-a".into())),
            (Some("service-secret"), Some(b), Some(key_secret("service-secret", b))),
            (None, Some(b), None),
            (Some("service-secret"), None, Some("service-secret".into())),
        ];
        for (service, owner, want) in cases {
            assert_eq!(with(service).secret_for(owner), want, "{service:?} {owner:?}");
        }
        assert!(!format!("{:?}", with(Some("service-secret"))).contains("secret-"), "Debug shows no secret");
    }
}
