//! Webhook delivery: the [`Webhooks`] actor, on the async I/O arbiter, POSTs a job's final job
//! object to its `callback_url`.
//!
//! Each delivery is its own task: up to `max_attempts` POSTs with a timeout each, retried with
//! exponential backoff and jitter on network errors, timeouts, 408, 429 and 5xx (other answers
//! are final). With a secret, every request carries
//! `X-Offload-Signature: sha256=<hex HMAC-SHA256 of the exact body>`. At most `concurrency`
//! deliveries run at once; at most `capacity` wait or run, past that new ones are dropped (counted).

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
use crate::domain::callback::CallbackUrl;
use crate::job::JobId;
use crate::metrics::Metrics;
use crate::store::JobStore;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-offload-signature";

#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub secret: Option<String>,
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
    let signature = settings.secret.as_deref().map(|secret| signature(secret, &d.body));
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
}
