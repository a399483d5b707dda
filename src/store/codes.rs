//! How job fields are written in a database, the same for every store that keeps jobs in one
//! (the embedded SQLite store and PostgreSQL): the job columns in one order and one row mapper
//! ([`job_from`]) for both, small integer codes for statuses, kinds by name, microseconds since
//! the Unix epoch for times, a result's own fields as JSON, ids packed as 16-byte runs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::error::ErrorBody;
use crate::job::{Job, JobId, JobKind, JobStatus, Owner, ResultMeta};

/// The job columns [`job_from`] reads, in its order (a macro, for `concat!` into statements).
macro_rules! job_columns {
    () => {
        "seq, id, kind, status, attempts, progress, stage, created_at, started_at, finished_at, error_code, \
         error_message, result_type, result_bytes, result_name, result_meta, callback, owner"
    };
}
pub(crate) use job_columns;

/// A row of [`job_columns`], whichever database it comes from: each store reads its own column
/// types into these few shapes (SQLite's integers are all 64-bit; PostgreSQL's are 16, 32 or 64).
pub trait JobRow {
    fn int(&self, column: usize) -> Result<Option<i64>, String>;
    fn real(&self, column: usize) -> Result<f64, String>;
    fn text(&self, column: usize) -> Result<Option<String>, String>;
    fn bytes(&self, column: usize) -> Result<Option<Vec<u8>>, String>;
}

/// A row of [`job_columns`] → (seq, job); an error names the column that cannot be read.
pub fn job_from(r: &impl JobRow) -> Result<(i64, Job), String> {
    let required = |what: &'static str| move |v: Option<i64>| v.ok_or(format!("a stored job has no {what}"));
    let id = r.bytes(1)?.and_then(|b| <[u8; 16]>::try_from(b).ok()).ok_or("a stored job id is not 16 bytes")?;
    let status = r.int(3).and_then(required("status"))?;
    let status = status_of(status).ok_or(format!("a stored job has status {status}"))?;
    let kind = r.text(2)?.unwrap_or_default();
    let kind = JobKind::named(&kind).ok_or(format!("a stored job has kind {kind:?}"))?;
    let error = r.text(10)?.map(|code| Ok::<_, String>(ErrorBody::new(code, r.text(11)?.unwrap_or_default())));
    let result = match r.text(12)? {
        Some(content_type) => Some(ResultMeta {
            content_type,
            bytes: r.int(13)?.unwrap_or(0) as usize,
            filename: r.text(14)?.unwrap_or_default(),
            extra: extra_of(r.text(15)?.as_deref())?,
        }),
        None => None,
    };
    // Stored callbacks were checked against the policy at submit; delivery checks the address.
    let callback = r.text(16)?.and_then(|raw| CallbackUrl::parse(&raw, CallbackPolicy { allow_private: true }).ok());
    let owner = r.bytes(17)?.and_then(|o| <[u8; 16]>::try_from(o).ok()).map(Owner::from_bytes);
    let job = Job {
        id: JobId::from_bytes(id),
        kind,
        status,
        attempts: r.int(4).and_then(required("attempts"))? as u32,
        progress: r.real(5)? as f32,
        stage: r.text(6)?,
        created_at: time_of(r.int(7).and_then(required("creation time"))?),
        started_at: r.int(8)?.map(time_of),
        finished_at: r.int(9)?.map(time_of),
        error: error.transpose()?,
        result,
        callback,
        owner,
    };
    Ok((r.int(0).and_then(required("sequence number"))?, job))
}

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
