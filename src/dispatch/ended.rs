//! What must happen once a job ends, whatever ended it (its run, a cancel, a timeout, a
//! shutdown): the list in one place, so every end has the same consequences.
//!
//! An end is counted in the metrics (by kind and status, with the run's duration when it ran),
//! recorded as an analytics event (`job_succeeded` with its duration, `job_failed` with its error
//! code, `job_cancelled`), settles one job of its owner when the Dispatcher counts owners itself
//! (`--max-pending-per-key` on a store that does not count them), and sends the webhook of a job
//! with a `callback_url`: its final job object, the same bytes the store wrote as the delivery
//! owed. The Dispatcher carries the effects out; none waits for anything.

use std::time::Duration;

use crate::async_io::analytics::Event;
use crate::async_io::webhooks::Deliver;
use crate::job::{Job, JobStatus, Owner};

/// One consequence of a job's end.
pub(super) enum Effect {
    /// Count it in `jobs_finished` and, when it ran, `job_duration`, labelled by kind and status.
    Count { kind: &'static str, status: &'static str, ran: Option<Duration> },
    /// Record this analytics event.
    Record(Event),
    /// One job of this owner is no longer pending.
    OwnerSettled(Owner),
    /// POST the final job object to the job's callback.
    Webhook(Deliver),
}

/// What the end of `job` (in its final state) brings about. `counts_owners`: whether the
/// Dispatcher counts each owner's pending jobs itself.
pub(super) fn effects(job: &Job, counts_owners: bool) -> Vec<Effect> {
    let (kind, status) = (job.kind.as_str(), job.status.as_str());
    let ran = job.started_at.zip(job.finished_at).and_then(|(s, f)| f.duration_since(s).ok());
    let mut props = job_props(job);
    let name = match job.status {
        JobStatus::Succeeded => {
            props.insert("duration_ms".into(), ran.map_or(0, |d| d.as_millis() as u64).into());
            "job_succeeded"
        }
        JobStatus::Failed => {
            props.insert("code".into(), job.error.as_ref().map_or("", |e| e.code.as_str()).into());
            "job_failed"
        }
        _ => "job_cancelled",
    };
    let mut effects = vec![Effect::Count { kind, status, ran }, Effect::Record(Event::internal(name, props))];
    if let Some(owner) = job.owner.filter(|_| counts_owners) {
        effects.push(Effect::OwnerSettled(owner));
    }
    if let Some(url) = &job.callback {
        match serde_json::to_vec(&job.view()) {
            Ok(body) => effects.push(Effect::Webhook(Deliver {
                job: job.id,
                owner: job.owner,
                url: url.clone(),
                body: body.into(),
            })),
            Err(e) => tracing::error!(job = %job.id, "job object not serializable: {e}"),
        }
    }
    effects
}

/// The properties every job analytics event carries.
pub(super) fn job_props(job: &Job) -> serde_json::Map<String, serde_json::Value> {
    let mut props = serde_json::Map::new();
    props.insert("job_id".into(), job.id.to_string().into());
    props.insert("kind".into(), job.kind.as_str().into());
    props
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use serde_json::{json, Value};

    use super::*;
    use crate::domain::callback::{CallbackPolicy, CallbackUrl};
    use crate::error::ErrorBody;
    use crate::job::{JobId, JobKind, ResultMeta};

    fn job(owner: Option<Owner>, callback: Option<&str>) -> Job {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut job = Job::new(JobId::random(), JobKind::named("pdf").unwrap(), t0);
        job.owner = owner;
        job.callback = callback.map(|u| CallbackUrl::parse(u, CallbackPolicy::default()).unwrap());
        assert!(job.claim());
        job
    }

    fn started(mut job: Job) -> Job {
        let at = job.created_at + Duration::from_secs(1);
        assert!(job.start(at));
        job
    }

    fn at(job: &Job, ms: u64) -> SystemTime {
        job.created_at + Duration::from_millis(ms)
    }

    /// The effects in a comparable form.
    fn summary(effects: &[Effect]) -> Vec<Value> {
        effects
            .iter()
            .map(|e| match e {
                Effect::Count { kind, status, ran } => {
                    json!({"count": [kind, status], "ran_ms": ran.map(|d| d.as_millis() as u64)})
                }
                Effect::Record(event) => json!({"event": event.name, "properties": event.properties}),
                Effect::OwnerSettled(owner) => json!({"owner_settled": owner.to_string()}),
                Effect::Webhook(d) => {
                    let body: Value = serde_json::from_slice(&d.body).unwrap();
                    json!({"webhook": d.url.as_str(), "owner": d.owner.map(|o| o.to_string()), "job": d.job.to_string(), "status": body["status"]})
                }
            })
            .collect()
    }

    #[test]
    fn a_failed_job_is_counted_by_kind_and_status_and_its_webhook_sent() {
        let owner = Owner::from_bytes([7; 16]);
        let mut job = started(job(Some(owner), Some("https://example.com/hook")));
        let finished = at(&job, 1_250);
        assert!(job.fail(ErrorBody::new("timeout", "too long"), finished));
        let id = job.id.to_string();
        assert_eq!(
            summary(&effects(&job, false)),
            vec![
                json!({"count": ["pdf", "failed"], "ran_ms": 250}),
                json!({"event": "job_failed", "properties": {"job_id": id, "kind": "pdf", "code": "timeout"}}),
                json!({"webhook": "https://example.com/hook", "owner": owner.to_string(), "job": id, "status": "failed"}),
            ]
        );
    }

    #[test]
    fn a_succeeded_job_records_its_duration_and_settles_its_owner_when_counted_here() {
        let owner = Owner::from_bytes([1; 16]);
        let mut job = started(job(Some(owner), None));
        let meta = ResultMeta {
            content_type: "application/pdf".into(),
            bytes: 3,
            filename: "a.pdf".into(),
            extra: Default::default(),
        };
        assert!(job.succeed(meta, at(&job, 1_040)));
        let id = job.id.to_string();
        assert_eq!(
            summary(&effects(&job, true)),
            vec![
                json!({"count": ["pdf", "succeeded"], "ran_ms": 40}),
                json!({"event": "job_succeeded", "properties": {"job_id": id, "kind": "pdf", "duration_ms": 40}}),
                json!({"owner_settled": owner.to_string()}),
            ]
        );
        // A store that counts owners itself settles them: nothing to do here.
        assert_eq!(effects(&job, false).len(), 2);
    }

    #[test]
    fn a_cancelled_job_without_a_callback_sends_nothing() {
        // Cancelled while queued: it never ran, so no duration either.
        let mut job = job(None, None);
        assert!(job.cancel(at(&job, 10)));
        let id = job.id.to_string();
        assert_eq!(
            summary(&effects(&job, true)),
            vec![
                json!({"count": ["pdf", "cancelled"], "ran_ms": null}),
                json!({"event": "job_cancelled", "properties": {"job_id": id, "kind": "pdf"}}),
            ]
        );
    }

    #[test]
    fn a_cancelled_job_with_a_callback_sends_its_final_state() {
        let mut job = started(job(None, Some("http://hooks.example.org/done")));
        assert!(job.cancel(at(&job, 1_500)));
        let summary = summary(&effects(&job, true));
        assert_eq!(summary[0], json!({"count": ["pdf", "cancelled"], "ran_ms": 500}));
        assert_eq!(
            summary[2],
            json!({"webhook": "http://hooks.example.org/done", "owner": null, "job": job.id.to_string(), "status": "cancelled"})
        );
        assert_eq!(summary.len(), 3);
    }

    #[test]
    fn the_webhook_body_is_the_job_object() {
        let mut job = started(job(None, Some("https://example.com/x")));
        assert!(job.fail(ErrorBody::new("shutdown", "gone"), at(&job, 1_001)));
        let Some(Effect::Webhook(d)) = effects(&job, false).pop() else { panic!("no webhook") };
        assert_eq!(d.body, serde_json::to_vec(&job.view()).unwrap());
    }
}
