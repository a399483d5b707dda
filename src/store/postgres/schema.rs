//! The PostgreSQL schema and its migrations.
//!
//! Every instance migrates at start, in one transaction holding a transaction-level advisory
//! lock, so instances started together migrate once and the others find the work done. A
//! database written by a newer release is refused rather than misread.
//!
//! The queue tables churn (a row is inserted, updated at claim, start and end, then deleted), so
//! they leave room on every page for HOT updates (`fillfactor`) and are vacuumed early
//! (`autovacuum_vacuum_scale_factor` 0.02 instead of 0.2, a small threshold): dead rows are
//! cleaned after about 2 % of the table changed, not 20 %.

use tokio_postgres::Client;

/// The schema this binary writes.
pub const SCHEMA_VERSION: i32 = 5;

/// The advisory lock migrations hold (any constant no other application on the database uses).
const MIGRATION_LOCK: i64 = 0x6f66_666c_6f61_6401; // "offload" + 1

/// Migration `n` takes the schema from version `n` to `n + 1`.
pub const MIGRATIONS: [&str; 5] = [
    r#"
CREATE TABLE offload_jobs (
    seq BIGSERIAL PRIMARY KEY,          -- creation order; never reused
    id BYTEA NOT NULL UNIQUE,           -- 16 random bytes
    kind SMALLINT NOT NULL,
    status SMALLINT NOT NULL,           -- 0 queued, 1 running, 2 succeeded, 3 failed, 4 cancelled
    attempts INTEGER NOT NULL,
    progress REAL NOT NULL,
    stage TEXT,
    created_at BIGINT NOT NULL,         -- microseconds since the Unix epoch
    started_at BIGINT,
    finished_at BIGINT,
    error_code TEXT,
    error_message TEXT,
    result_type TEXT,
    result_bytes BIGINT,
    result_name TEXT,
    result_width INTEGER,
    result_height INTEGER,
    callback TEXT,
    weight BIGINT NOT NULL,             -- payload bytes counted against the queued-bytes budget
    owner BYTEA,                        -- the API key's owner, NULL when open
    lease_owner BYTEA,                  -- the instance holding the job (claimed or running)
    lease_until TIMESTAMPTZ,            -- renewed by that instance's heartbeat
    cancel_requested BOOLEAN NOT NULL DEFAULT false
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 200);
-- The queue: what a claim scans, oldest first.
CREATE INDEX offload_jobs_queue ON offload_jobs (kind, seq) WHERE status = 0 AND lease_owner IS NULL;
-- Held jobs whose lease may run out.
CREATE INDEX offload_jobs_leases ON offload_jobs (lease_until) WHERE lease_owner IS NOT NULL;
CREATE INDEX offload_jobs_by_status ON offload_jobs (status, seq);
CREATE INDEX offload_jobs_by_finish ON offload_jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX offload_jobs_by_owner ON offload_jobs (owner, status, seq) WHERE owner IS NOT NULL;
CREATE TABLE offload_payloads (seq BIGINT PRIMARY KEY, spec BYTEA NOT NULL, data BYTEA)
    WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 200);
CREATE TABLE offload_results (seq BIGINT PRIMARY KEY, bytes BYTEA NOT NULL);
-- Webhooks owed: written with the final state; an instance takes one by lease to deliver it.
CREATE TABLE offload_webhooks (
    job_id BYTEA PRIMARY KEY,
    url TEXT NOT NULL,
    body BYTEA NOT NULL,
    lease_owner BYTEA,
    lease_until TIMESTAMPTZ
);
CREATE TABLE offload_idempotency (
    key TEXT PRIMARY KEY,
    fingerprint BYTEA NOT NULL,
    first_seq BIGINT NOT NULL,
    ids BYTEA NOT NULL
);
CREATE INDEX offload_idempotency_by_job ON offload_idempotency (first_seq);
"#,
    // Per-key webhook secrets: an owed webhook keeps its job's owner (the job may expire first).
    r#"
ALTER TABLE offload_webhooks ADD COLUMN owner BYTEA;
"#,
    // Kinds by name: the store knows no kind (0 and 1 were pdf and image).
    r#"
ALTER TABLE offload_jobs ALTER COLUMN kind TYPE TEXT
    USING CASE kind WHEN 0 THEN 'pdf' WHEN 1 THEN 'image' ELSE 'unknown-' || kind::text END;
"#,
    // Retention by the database's clock.
    r#"
-- When the database wrote each end, by its own clock (microseconds since the Unix epoch):
-- retention goes by it, so instances whose clocks disagree forget a job at the same time.
-- finished_at (the ending instance's clock) stands in for jobs ended before this column.
ALTER TABLE offload_jobs ADD COLUMN db_finished_at BIGINT;
CREATE INDEX offload_jobs_by_db_finish ON offload_jobs ((coalesce(db_finished_at, finished_at)))
    WHERE finished_at IS NOT NULL;
DROP INDEX offload_jobs_by_finish;
"#,
    // A result's own fields as a JSON object (the store knows no image): width and height move
    // into it and their columns go.
    r#"
ALTER TABLE offload_jobs ADD COLUMN result_meta TEXT;
UPDATE offload_jobs SET result_meta = json_build_object('width', result_width, 'height', result_height)::text
    WHERE result_width IS NOT NULL AND result_height IS NOT NULL;
ALTER TABLE offload_jobs DROP COLUMN result_width, DROP COLUMN result_height;
"#,
];

/// Brings the database to [`SCHEMA_VERSION`], in one transaction under the migration lock.
pub async fn migrate(client: &mut Client) -> Result<(), String> {
    let text = |e: tokio_postgres::Error| e.to_string();
    let tx = client.transaction().await.map_err(text)?;
    // Waits for an instance migrating meanwhile as long as the statement timeout lets it (not
    // the connection's short lock timeout); then a table this migration changes may be waited
    // for a little longer than a statement of the service would.
    tx.batch_execute("SET LOCAL lock_timeout = 0").await.map_err(text)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(text)?;
    tx.batch_execute("SET LOCAL lock_timeout = '10s'").await.map_err(text)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS offload_schema (version INTEGER NOT NULL)").await.map_err(text)?;
    let version: i32 = match tx.query_opt("SELECT version FROM offload_schema", &[]).await.map_err(text)? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO offload_schema (version) VALUES (0)", &[]).await.map_err(text)?;
            0
        }
    };
    if version > SCHEMA_VERSION {
        return Err(format!(
            "the database holds offload schema version {version}, newer than this binary's {SCHEMA_VERSION}: \
             run a newer offload, or point --database-url elsewhere"
        ));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).await.map_err(|e| format!("migration {from} → {}: {e}", from + 1))?;
    }
    tx.execute("UPDATE offload_schema SET version = $1", &[&SCHEMA_VERSION]).await.map_err(text)?;
    tx.commit().await.map_err(text)
}

/// The schema version a database holds (0 when offload never ran on it).
pub async fn version(client: &Client) -> Result<i32, String> {
    let exists: bool = client
        .query_one("SELECT to_regclass('offload_schema') IS NOT NULL", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client.query_opt("SELECT version FROM offload_schema", &[]).await.map_err(|e| e.to_string())?;
    Ok(row.map_or(0, |r| r.get(0)))
}
