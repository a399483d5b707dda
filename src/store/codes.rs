//! How job fields are written in a database, the same for every store that keeps jobs in one
//! (the embedded SQLite store and PostgreSQL): small integer codes for statuses, kinds by name,
//! microseconds since the Unix epoch for times, ids packed as 16-byte runs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::job::{JobId, JobStatus};

pub fn status_code(s: JobStatus) -> i64 {
    match s {
        JobStatus::Queued => 0,
        JobStatus::Running => 1,
        JobStatus::Succeeded => 2,
        JobStatus::Failed => 3,
        JobStatus::Cancelled => 4,
    }
}

pub fn status_of(code: i64) -> Option<JobStatus> {
    Some(match code {
        0 => JobStatus::Queued,
        1 => JobStatus::Running,
        2 => JobStatus::Succeeded,
        3 => JobStatus::Failed,
        4 => JobStatus::Cancelled,
        _ => return None,
    })
}

pub fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

pub fn time_of(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)
}

/// A result's extra fields as stored: a JSON object, or NULL when there are none.
pub fn extra_text(extra: &crate::job::ResultExtra) -> Option<String> {
    (!extra.is_empty()).then(|| serde_json::Value::Object(extra.clone()).to_string())
}

/// Reads back what [`extra_text`] stored.
pub fn extra_of(stored: Option<&str>) -> Result<crate::job::ResultExtra, String> {
    match stored {
        None => Ok(Default::default()),
        Some(text) => match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            _ => Err(format!("result fields {text:?} are not a JSON object")),
        },
    }
}

/// Job ids packed as 16-byte runs (an idempotency key's jobs).
pub fn pack_ids(ids: impl Iterator<Item = JobId>) -> Vec<u8> {
    ids.flat_map(|id| id.to_bytes()).collect()
}

pub fn unpack_ids(bytes: &[u8]) -> Vec<JobId> {
    bytes.chunks_exact(16).map(|c| JobId::from_bytes(c.try_into().expect("16-byte chunk"))).collect()
}
