//! What instances tell each other over `NOTIFY` (always inside the transaction that caused it,
//! so it arrives once committed). Ids and small numbers only, far under NOTIFY's 8,000 bytes:
//! a listener that wants a job's state reads it.
//!
//! | payload | meaning |
//! |---|---|
//! | `q` | there is new work to claim |
//! | `j` status id from | a job changed to `status` (a digit, the stored code) |
//! | `c` id | a job was cancelled: whoever runs it stops |
//! | `p` from JSON | progress of running jobs: `{"id": [fraction, stage], …}` |
//!
//! `id` is a job id (32 hex digits); `from` the sender's tag (8 hex digits), so an instance
//! skips what it already told its own followers.

use std::collections::BTreeMap;

use crate::job::{JobId, JobStatus};
use crate::store::codes::{status_code, status_of};

/// The channel every instance listens on.
pub const CHANNEL: &str = "offload";
/// NOTIFY refuses payloads from 8,000 bytes; progress notices stay under this.
pub const MAX_PAYLOAD: usize = 7_900;

#[derive(Debug, PartialEq)]
pub enum Notice {
    Work,
    Changed { id: JobId, status: JobStatus, from: String },
    Cancelled(JobId),
    Progress { from: String, jobs: Vec<(JobId, f32, Option<String>)> },
}

pub fn changed(id: JobId, status: JobStatus, from: &str) -> String {
    format!("j{}{id}{from}", status_code(status))
}

pub fn cancelled(id: JobId) -> String {
    format!("c{id}")
}

/// The progress of `jobs` in as few payloads as fit, each under [`MAX_PAYLOAD`].
pub fn progress(from: &str, jobs: &[(JobId, f32, Option<String>)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut map = serde_json::Map::new();
    let mut size = 0;
    for (id, fraction, stage) in jobs {
        // Stages are short words; a long one is cut rather than overflowing the payload.
        let stage = stage.as_ref().map(|s| s.chars().take(200).collect::<String>());
        let value = serde_json::json!([fraction, stage]);
        let cost = 40 + value.to_string().len();
        if size + cost > MAX_PAYLOAD - 16 && !map.is_empty() {
            out.push(format!("p{from}{}", serde_json::Value::Object(std::mem::take(&mut map))));
            size = 0;
        }
        map.insert(id.to_string(), value);
        size += cost;
    }
    if !map.is_empty() {
        out.push(format!("p{from}{}", serde_json::Value::Object(map)));
    }
    out
}

pub fn parse(payload: &str) -> Option<Notice> {
    let tag = payload.get(..1)?;
    let rest = &payload[1..];
    match tag {
        "q" => Some(Notice::Work),
        "c" => Some(Notice::Cancelled(rest.parse().ok()?)),
        "j" => {
            let status = status_of(rest.get(..1)?.parse().ok()?)?;
            let id = rest.get(1..33)?.parse().ok()?;
            Some(Notice::Changed { id, status, from: rest.get(33..)?.to_string() })
        }
        "p" => {
            let from = rest.get(..8)?.to_string();
            let map: BTreeMap<String, (f32, Option<String>)> = serde_json::from_str(rest.get(8..)?).ok()?;
            let jobs = map.into_iter().filter_map(|(id, (f, s))| Some((id.parse().ok()?, f, s))).collect();
            Some(Notice::Progress { from, jobs })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_notice_reads_back() {
        let id = JobId::random();
        assert_eq!(parse("q"), Some(Notice::Work));
        assert_eq!(parse(&cancelled(id)), Some(Notice::Cancelled(id)));
        for status in [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Cancelled] {
            assert_eq!(
                parse(&changed(id, status, "0a1b2c3d")),
                Some(Notice::Changed { id, status, from: "0a1b2c3d".into() })
            );
        }
        let jobs = vec![(id, 0.5, Some("page 2".to_string()))];
        let payloads = progress("0a1b2c3d", &jobs);
        assert_eq!(payloads.len(), 1);
        assert_eq!(parse(&payloads[0]), Some(Notice::Progress { from: "0a1b2c3d".into(), jobs }));
    }

    #[test]
    fn progress_of_many_jobs_is_split_under_the_payload_limit() {
        let jobs: Vec<_> = (0..500).map(|i| (JobId::random(), i as f32 / 500.0, Some("x".repeat(300)))).collect();
        let payloads = progress("0a1b2c3d", &jobs);
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() < MAX_PAYLOAD), "{:?}", payloads.iter().map(String::len).max());
        let back: usize = payloads
            .iter()
            .map(|p| match parse(p) {
                Some(Notice::Progress { jobs, .. }) => jobs.len(),
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(back, 500);
    }

    #[test]
    fn garbage_is_ignored() {
        for payload in ["", "x", "c123", "j9", "j1abc", "pzz", "p0a1b2c3d{not json"] {
            assert_eq!(parse(payload), None, "{payload}");
        }
    }
}
