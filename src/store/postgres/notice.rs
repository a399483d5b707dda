//! What instances tell each other over `NOTIFY` (always inside the transaction that caused it,
//! so it arrives once committed). Ids and small numbers only, far under NOTIFY's 8,000 bytes:
//! a listener that wants a job's state reads it.
//!
//! | payload | meaning |
//! |---|---|
//! | `q` | there is new work to claim |
//! | `j` status id from | a job changed to `status` (a digit, the stored code) |
//! | `c` id | a job was cancelled: whoever runs it stops |
//! | `p` from JSON | progress of a running job: `{"id": [fraction, stage]}` (a map, so one notice could carry several) |
//!
//! `id` is a job id (32 hex digits); `from` the sender's tag (8 hex digits), so an instance
//! skips what it already told its own followers.

use std::collections::BTreeMap;

use crate::job::{JobId, JobStatus};
use crate::store::codes::{status_code, status_of};

/// The channel every instance listens on.
pub const CHANNEL: &str = "offload";
/// NOTIFY refuses payloads from 8,000 bytes; every notice stays under this.
#[cfg(test)]
const MAX_PAYLOAD: usize = 7_900;

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

/// A running job's progress (a stage is cut to 200 characters, far under the payload limit).
pub fn progress(from: &str, id: JobId, fraction: f32, stage: Option<&str>) -> String {
    let stage = stage.map(|s| s.chars().take(200).collect::<String>());
    format!("p{from}{}", serde_json::json!({ id.to_string(): [fraction, stage] }))
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
        let payload = progress("0a1b2c3d", id, 0.5, Some("page 2"));
        let jobs = vec![(id, 0.5, Some("page 2".to_string()))];
        assert_eq!(parse(&payload), Some(Notice::Progress { from: "0a1b2c3d".into(), jobs }));
        assert!(progress("0a1b2c3d", id, 0.5, Some(&"x".repeat(5000))).len() < MAX_PAYLOAD);
    }

    #[test]
    fn garbage_is_ignored() {
        for payload in ["", "x", "c123", "j9", "j1abc", "pzz", "p0a1b2c3d{not json"] {
            assert_eq!(parse(payload), None, "{payload}");
        }
    }
}
