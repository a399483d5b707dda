//! Rows and parameters: a job read from a row, its mutable fields as parameters, how an end
//! changes it, the webhook it owes, and forgetting jobs with what is kept beside them.

use super::*;

pub(super) fn stored_status(code: i16) -> Result<JobStatus, StoreError> {
    status_of(i64::from(code)).ok_or_else(|| unavailable(format!("a stored job has status {code}")))
}

pub(super) fn stored_kind(name: &str) -> Result<JobKind, StoreError> {
    JobKind::named(name).ok_or_else(|| unavailable(format!("a stored job has kind {name:?}")))
}

pub(super) fn job_from_row(r: &Row) -> Result<(i64, Job), StoreError> {
    crate::store::codes::job_from(&PgRow(r)).map_err(unavailable)
}

/// PostgreSQL's columns in the shapes the shared mapper reads.
struct PgRow<'a>(&'a Row);

impl crate::store::codes::JobRow for PgRow<'_> {
    fn int(&self, column: usize) -> Result<Option<i64>, String> {
        use tokio_postgres::types::Type;
        let r = self.0;
        let text = |e: tokio_postgres::Error| e.to_string();
        match *r.columns()[column].type_() {
            Type::INT2 => r.try_get::<_, Option<i16>>(column).map(|v| v.map(i64::from)).map_err(text),
            Type::INT4 => r.try_get::<_, Option<i32>>(column).map(|v| v.map(i64::from)).map_err(text),
            _ => r.try_get::<_, Option<i64>>(column).map_err(text),
        }
    }
    fn real(&self, column: usize) -> Result<f64, String> {
        self.0.try_get::<_, f32>(column).map(f64::from).map_err(|e| e.to_string())
    }
    fn text(&self, column: usize) -> Result<Option<String>, String> {
        self.0.try_get(column).map_err(|e| e.to_string())
    }
    fn bytes(&self, column: usize) -> Result<Option<Vec<u8>>, String> {
        self.0.try_get(column).map_err(|e| e.to_string())
    }
}

/// The mutable fields of a job as statement parameters (in [`save`]'s order, from `$2`).
pub(super) struct Fields<'a> {
    pub(super) status: i16,
    pub(super) progress: f32,
    pub(super) stage: Option<&'a str>,
    pub(super) started_at: Option<i64>,
    pub(super) finished_at: Option<i64>,
    pub(super) error_code: Option<&'a str>,
    pub(super) error_message: Option<&'a str>,
    pub(super) result_type: Option<&'a str>,
    pub(super) result_bytes: Option<i64>,
    pub(super) result_name: Option<&'a str>,
    /// The result's extra fields, as JSON text.
    pub(super) result_meta: Option<String>,
}

impl<'a> Fields<'a> {
    pub(super) fn of(job: &'a Job) -> Self {
        let result = job.result.as_ref();
        Fields {
            status: status_code(job.status) as i16,
            progress: job.progress,
            stage: job.stage.as_deref(),
            started_at: job.started_at.map(micros),
            finished_at: job.finished_at.map(micros),
            error_code: job.error.as_ref().map(|e| e.code.as_str()),
            error_message: job.error.as_ref().map(|e| e.message.as_str()),
            result_type: result.map(|m| m.content_type.as_str()),
            result_bytes: result.map(|m| m.bytes as i64),
            result_name: result.map(|m| m.filename.as_str()),
            result_meta: result.and_then(|m| extra_text(&m.extra)),
        }
    }

    pub(super) fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 11] {
        [
            &self.status,
            &self.progress,
            &self.stage,
            &self.started_at,
            &self.finished_at,
            &self.error_code,
            &self.error_message,
            &self.result_type,
            &self.result_bytes,
            &self.result_name,
            &self.result_meta,
        ]
    }
}

/// Writes every mutable field of `job` back ($2…$12), and lets go of its lease; the end is
/// dated by the database's clock too (what retention goes by).
pub(super) async fn save(tx: &tokio_postgres::Transaction<'_>, seq: i64, job: &Job) -> Result<(), StoreError> {
    let fields = Fields::of(job);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&seq];
    params.extend(fields.params());
    tx.execute(
        "UPDATE offload_jobs SET status = $2, progress = $3, stage = $4, started_at = $5, finished_at = $6, \
         error_code = $7, error_message = $8, result_type = $9, result_bytes = $10, result_name = $11, \
         result_meta = $12, lease_owner = NULL, lease_until = NULL, \
         db_finished_at = (extract(epoch FROM now()) * 1000000)::int8 WHERE seq = $1",
        &params,
    )
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// The job as a run's end leaves it (started, if the start was not recorded), with the result
/// to keep; `None` if the state machine refuses the end. A result larger than `budget` fails it.
pub(super) fn ended(mut job: Job, outcome: Final, budget: usize) -> Option<(Job, Option<Bytes>)> {
    let outcome = match outcome {
        Final::Succeeded { bytes, .. } if bytes.len() > budget => {
            Final::Failed(crate::store::result_too_large(bytes.len(), budget))
        }
        other => other,
    };
    let bytes = match &outcome {
        Final::Succeeded { bytes, .. } => Some(bytes.clone()),
        _ => None,
    };
    let now = crate::clock::now();
    job.start(now);
    apply_final(&mut job, outcome, now).then_some(())?;
    // PostgreSQL's text refuses NUL; a file name or a message may carry one from the input.
    for text in
        [job.error.as_mut().map(|e| &mut e.message), job.result.as_mut().map(|r| &mut r.filename)].into_iter().flatten()
    {
        if text.contains('\0') {
            *text = text.replace('\0', "\u{fffd}");
        }
    }
    let bytes = bytes.filter(|_| job.status == JobStatus::Succeeded);
    Some((job, bytes))
}

/// The webhook a job's end owes: its URL and the final job object, exactly as POSTed.
pub(super) fn owed_body(job: &Job) -> Option<(&str, Vec<u8>)> {
    let url = job.callback.as_ref()?;
    Some((url.as_str(), serde_json::to_vec(&job.view()).unwrap_or_default()))
}

/// Deletes jobs and everything kept with them.
pub(super) async fn forget(tx: &tokio_postgres::Transaction<'_>, seqs: &[i64]) -> Result<(), StoreError> {
    if seqs.is_empty() {
        return Ok(());
    }
    for sql in [
        "DELETE FROM offload_jobs WHERE seq = ANY($1)",
        "DELETE FROM offload_payloads WHERE seq = ANY($1)",
        "DELETE FROM offload_results WHERE seq = ANY($1)",
        "DELETE FROM offload_idempotency WHERE first_seq = ANY($1)",
    ] {
        tx.execute(sql, &[&seqs]).await.map_err(unavailable)?;
    }
    Ok(())
}
