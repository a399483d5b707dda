//! The on-disk schema, its migrations, and how a job row maps to a [`Job`].

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::job::{Job, JobId, JobKind, JobStatus, Owner};
use crate::store::codes;

/// The schema this binary writes. Older databases are migrated on start; a newer one (written by
/// a later release) is refused rather than misread.
pub const SCHEMA_VERSION: i64 = 5;

/// Migration `n` takes the schema from version `n` to `n + 1`.
const MIGRATIONS: [&str; 5] = [
    r#"
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, -- creation order; never reused (results and payloads are keyed by it)
    id BLOB NOT NULL UNIQUE,          -- 16 random bytes
    kind INTEGER NOT NULL,
    status INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    progress REAL NOT NULL,
    stage TEXT,
    created_at INTEGER NOT NULL,      -- microseconds since the Unix epoch
    started_at INTEGER,
    finished_at INTEGER,
    error_code TEXT,
    error_message TEXT,
    result_type TEXT,
    result_bytes INTEGER,
    result_name TEXT,
    result_width INTEGER,
    result_height INTEGER,
    callback TEXT,
    weight INTEGER NOT NULL,          -- payload bytes counted against the queued-bytes budget
    suspect INTEGER NOT NULL DEFAULT 0 -- was running when a process died: runs alone until it ends
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
-- What a worker needs, until the job ends.
CREATE TABLE payloads (seq INTEGER PRIMARY KEY, spec BLOB NOT NULL, data BLOB);
CREATE TABLE results (seq INTEGER PRIMARY KEY, bytes BLOB NOT NULL);
-- Webhooks owed: written with the final state, deleted once delivered or given up.
CREATE TABLE webhooks (id INTEGER PRIMARY KEY, job_id BLOB NOT NULL UNIQUE, url TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE idempotency (key TEXT PRIMARY KEY, fingerprint BLOB NOT NULL, first_seq INTEGER NOT NULL, ids BLOB NOT NULL);
CREATE INDEX idempotency_by_job ON idempotency (first_seq);
CREATE TABLE meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
"#,
    // API keys: the owner of each job (NULL when the service runs open). The indexes are partial,
    // so a service without keys pays nothing for them on insert.
    r#"
ALTER TABLE jobs ADD COLUMN owner BLOB;
CREATE INDEX jobs_by_owner ON jobs (owner, seq) WHERE owner IS NOT NULL;
CREATE INDEX jobs_by_owner_status ON jobs (owner, status, seq) WHERE owner IS NOT NULL;
"#,
    // Per-key webhook secrets: an owed webhook keeps its job's owner (the job may expire first).
    r#"
ALTER TABLE webhooks ADD COLUMN owner BLOB;
"#,
    // Kinds by name: the store knows no kind (0 and 1 were pdf and image). The column keeps its
    // declared INTEGER type (SQLite cannot alter one); its affinity leaves names as text.
    r#"
UPDATE jobs SET kind = CASE kind WHEN 0 THEN 'pdf' WHEN 1 THEN 'image' ELSE 'unknown-' || kind END
    WHERE typeof(kind) = 'integer';
"#,
    // A result's own fields as a JSON object (the store knows no image): width and height move
    // into it; their columns stay, unused (SQLite drops no column in a migration this cheaply).
    r#"
ALTER TABLE jobs ADD COLUMN result_meta TEXT;
UPDATE jobs SET result_meta = json_object('width', result_width, 'height', result_height)
    WHERE result_width IS NOT NULL AND result_height IS NOT NULL;
"#,
];

/// Brings the schema to [`SCHEMA_VERSION`], in one transaction.
pub fn migrate(conn: &mut Connection) -> Result<(), String> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "the data directory holds schema version {version}, newer than this binary's {SCHEMA_VERSION}: \
             run a newer offload, or point --data-dir elsewhere"
        ));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql).map_err(|e| format!("migration {from} → {}: {e}", from + 1))?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

/// The columns [`job_from_row`] reads, in order.
pub const JOB_COLUMNS: &str = crate::store::codes::job_columns!();

pub use crate::store::codes::{micros, pack_ids, status_code, unpack_ids};

pub fn status_of(code: i64) -> rusqlite::Result<JobStatus> {
    codes::status_of(code).ok_or_else(|| bad_column(3, format!("status {code}")))
}

pub fn kind_of(name: String) -> rusqlite::Result<JobKind> {
    JobKind::named(&name).ok_or_else(|| bad_column(2, format!("kind {name:?}")))
}

fn bad_column(i: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Integer, what.into())
}

/// A row selected with [`JOB_COLUMNS`] → (seq, job), by the mapper both SQL stores share.
pub fn job_from_row(r: &Row<'_>) -> rusqlite::Result<(i64, Job)> {
    codes::job_from(&SqliteRow(r)).map_err(|e| bad_column(0, e))
}

/// SQLite's columns in the shapes [`codes::job_from`] reads.
struct SqliteRow<'a, 'r>(&'a Row<'r>);

impl codes::JobRow for SqliteRow<'_, '_> {
    fn int(&self, column: usize) -> Result<Option<i64>, String> {
        self.0.get(column).map_err(|e| e.to_string())
    }
    fn real(&self, column: usize) -> Result<f64, String> {
        self.0.get(column).map_err(|e| e.to_string())
    }
    fn text(&self, column: usize) -> Result<Option<String>, String> {
        self.0.get(column).map_err(|e| e.to_string())
    }
    fn bytes(&self, column: usize) -> Result<Option<Vec<u8>>, String> {
        self.0.get(column).map_err(|e| e.to_string())
    }
}

/// One job by id.
pub fn load(conn: &Connection, id: JobId) -> rusqlite::Result<Option<(i64, Job)>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    conn.prepare_cached(&sql)?.query_row(params![id.to_bytes()], job_from_row).optional()
}

/// One job by its row (the claim knows it from the queue).
pub fn load_seq(conn: &Connection, seq: i64) -> rusqlite::Result<Option<Job>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE seq = ?1");
    conn.prepare_cached(&sql)?.query_row(params![seq], |r| Ok(job_from_row(r)?.1)).optional()
}

/// A new job row; its sequence number.
pub fn insert(conn: &Connection, job: &Job, weight: usize) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO jobs (id, kind, status, attempts, progress, stage, created_at, callback, weight, owner) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        job.id.to_bytes(),
        job.kind.as_str(),
        status_code(job.status),
        job.attempts,
        f64::from(job.progress),
        job.stage,
        micros(job.created_at),
        job.callback.as_ref().map(|c| c.as_str()),
        weight as i64,
        job.owner.map(Owner::to_bytes),
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Writes every mutable field of `job` back to row `seq`.
pub fn save(conn: &Connection, seq: i64, job: &Job) -> rusqlite::Result<()> {
    let result = job.result.as_ref();
    conn.prepare_cached(
        "UPDATE jobs SET status = ?2, attempts = ?3, progress = ?4, stage = ?5, started_at = ?6, \
         finished_at = ?7, error_code = ?8, error_message = ?9, result_type = ?10, result_bytes = ?11, \
         result_name = ?12, result_meta = ?13 WHERE seq = ?1",
    )?
    .execute(params![
        seq,
        status_code(job.status),
        job.attempts,
        f64::from(job.progress),
        job.stage,
        job.started_at.map(micros),
        job.finished_at.map(micros),
        job.error.as_ref().map(|e| e.code.as_str()),
        job.error.as_ref().map(|e| e.message.as_str()),
        result.map(|m| m.content_type.as_str()),
        result.map(|m| m.bytes as i64),
        result.map(|m| m.filename.as_str()),
        result.and_then(|m| codes::extra_text(&m.extra)),
    ])?;
    Ok(())
}

/// Deletes a job and everything kept for it but an owed webhook.
pub fn delete(conn: &Connection, seq: i64) -> rusqlite::Result<()> {
    for sql in [
        "DELETE FROM jobs WHERE seq = ?1",
        "DELETE FROM payloads WHERE seq = ?1",
        "DELETE FROM results WHERE seq = ?1",
        "DELETE FROM idempotency WHERE first_seq = ?1",
    ] {
        conn.prepare_cached(sql)?.execute(params![seq])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_database_is_migrated_with_its_jobs_kept_and_no_owner() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let id = JobId::random();
        conn.execute(
            "INSERT INTO jobs (id, kind, status, attempts, progress, created_at, weight) VALUES (?1, 1, 0, 0, 0, 1, 5)",
            params![id.to_bytes()],
        )
        .unwrap();
        let done = JobId::random();
        conn.execute(
            "INSERT INTO jobs (id, kind, status, attempts, progress, created_at, weight, result_type, result_bytes, \
             result_name, result_width, result_height) VALUES (?1, 1, 2, 1, 1, 1, 5, 'image/png', 9, 'a.png', 40, 30)",
            params![done.to_bytes()],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let (_, job) = load(&conn, id).unwrap().expect("the job is kept");
        assert_eq!((job.status, job.owner, job.kind.as_str()), (JobStatus::Queued, None, "image"), "kind 1 was image");
        // An image result of a version-1 database keeps its size, now among its extra fields.
        let (_, image) = load(&conn, done).unwrap().expect("kept");
        let extra = image.result.expect("a result").extra;
        assert_eq!(serde_json::Value::Object(extra), serde_json::json!({"width": 40, "height": 30}));
        migrate(&mut conn).expect("migrating again changes nothing");
    }

    #[test]
    fn the_owner_is_stored_and_read_back() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let mut job = Job::new(JobId::random(), JobKind::named("image").unwrap(), std::time::SystemTime::now());
        job.owner = Some(Owner::from_bytes([7; 16]));
        insert(&conn, &job, 10).unwrap();
        assert_eq!(load(&conn, job.id).unwrap().unwrap().1.owner, job.owner);
    }
}
