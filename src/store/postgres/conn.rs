//! Connections to the database, made again when they drop.
//!
//! Two kinds, because a transaction needs its connection alone while a single statement does
//! not: *shared* connections carry single statements of many tasks at once (tokio-postgres
//! pipelines them: an insert, a claim and an end on one connection cost one round trip together,
//! not three), and *alone* connections are lent to one transaction at a time. The hot path
//! (grouped inserts, claims and ends, the progress writer) is single statements; transactions are
//! for keyed submissions, cancels and the retention sweep. Every shared statement is prepared once per
//! connection, so a claim is one Bind/Execute, not Parse + Bind/Execute.
//!
//! A statement pipelined on a shared connection holds every statement behind it while it waits,
//! so no shared statement waits on a row lock: the writes there lock with `SKIP LOCKED` and try
//! the rows skipped again later, and every connection has a `lock_timeout` for what is left (a
//! row of another table, a table lock). Each shared connection notes since when it has waited
//! for an answer: a database that stops answering turns the store unhealthy (see
//! [`Conns::stalled`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::store::StoreError;

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// How long the server may run one statement before it cancels it.
const STATEMENT_TIMEOUT_MS: u64 = 30_000;
/// The same, as the bound of a request's write (an insert, a cancel) seen from here.
pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_millis(STATEMENT_TIMEOUT_MS);
/// How long a statement may wait for a lock before the server gives up on it (`lock_timeout`).
/// The hot path never waits on a row lock (it skips locked rows); this bounds the rest: a
/// cancel or an end read in a transaction, a row of another table, a table lock.
pub(super) const LOCK_TIMEOUT_MS: u64 = 3_000;
/// A shared connection that has waited this long for an answer makes the store unhealthy.
pub(super) const STALL_AFTER: Duration = Duration::from_secs(5);

/// The connection settings of `url`, with bounded waits on a database that stops answering: a
/// connect gives up after 5 s (unless the URL says otherwise), a connection whose peer vanished
/// is noticed within about half a minute (TCP keepalives after 10 s idle, and a 30 s TCP user
/// timeout for data never acknowledged), the server cancels a statement after 30 s and a lock
/// wait after 3 s (both added to the URL's `options`). Without them a half-open connection would
/// hold every statement pipelined on it until the kernel's two-hour default.
pub(super) fn config(url: &str) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    let mut options = config.get_options().unwrap_or_default().to_string();
    if !options.contains("statement_timeout") {
        options = format!("{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}");
    }
    if !options.contains("lock_timeout") {
        options = format!("{options} -c lock_timeout={LOCK_TIMEOUT_MS}");
    }
    config.options(options.trim());
    Ok(config)
}

/// The connections of one store.
pub(super) struct Conns {
    url: String,
    shared: Vec<Slot>,
    alone: Vec<tokio::sync::Mutex<Option<Client>>>,
    /// Round robin over the shared connections.
    next: AtomicUsize,
    /// The last connection error, until a refresh succeeds (what `/readyz` reports).
    failing: Mutex<Option<String>>,
}

/// One shared connection: the live one, and a lock so only one task reconnects it.
struct Slot {
    live: Mutex<Option<Arc<Shared>>>,
    connecting: tokio::sync::Mutex<()>,
}

/// A connection many tasks use at once, with the statements prepared on it.
pub(super) struct Shared {
    client: Client,
    prepared: Mutex<HashMap<&'static str, Statement>>,
    watch: Watch,
}

/// Since when a shared connection waits for an answer: statements in flight, and the later of
/// the last answer and the moment it became busy. Its answers come in order, so this is how
/// long its oldest statement in flight has waited since the one before it was answered.
#[derive(Default)]
struct Watch {
    busy: AtomicUsize,
    since: Mutex<Option<Instant>>,
}

/// One statement in flight on a shared connection; [`Pending::answered`] when its answer came
/// (a future dropped before, a request given up on, is no answer).
struct Pending<'a>(&'a Watch);

impl Watch {
    fn start(&self) -> Pending<'_> {
        if self.busy.fetch_add(1, Ordering::AcqRel) == 0 {
            *self.since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        Pending(self)
    }

    /// How long it has waited for an answer, if anything is in flight.
    fn waiting(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.since.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed())
    }
}

impl Pending<'_> {
    fn answered(self) {
        *self.0.since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the database refused this statement for what it carries (a constraint, a value),
/// so that the requests of a grouped statement are worth trying one by one; not when it timed
/// out, waited on a lock too long, lacked resources or lost its connection.
pub(super) fn refused(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| !matches!(&c.code()[..2], "08" | "53" | "55" | "57" | "58" | "XX"))
}

/// Whether the database answered with an error (the statement, or the transaction, did not
/// commit). An error without a database's answer (the connection lost, no answer) leaves the
/// outcome of a statement already sent unknown.
pub(super) fn answered(e: &tokio_postgres::Error) -> bool {
    e.code().is_some()
}

impl Conns {
    /// `size` connections in all (at least 2): half shared (rounded up), the rest alone.
    pub fn new(url: String, size: usize) -> Self {
        let size = size.max(2);
        let shared = size.div_ceil(2);
        Conns {
            url,
            shared: (0..shared)
                .map(|_| Slot { live: Mutex::new(None), connecting: tokio::sync::Mutex::new(()) })
                .collect(),
            alone: (0..size - shared).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            failing: Mutex::new(None),
        }
    }

    /// The settings every connection of this store is made with (see [`config`]).
    pub fn config(&self) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
        config(&self.url)
    }

    pub async fn connect(&self) -> Result<Client, StoreError> {
        let connected = match self.config() {
            Ok(config) => config.connect(NoTls).await,
            Err(e) => Err(e),
        };
        match connected {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!("database connection ended: {e}");
                    }
                });
                Ok(client)
            }
            Err(e) => {
                self.fail(&e);
                Err(unavailable(e))
            }
        }
    }

    /// A shared connection, (re)connected as needed.
    pub async fn shared(&self) -> Result<Arc<Shared>, StoreError> {
        let slot = &self.shared[self.next.fetch_add(1, Ordering::Relaxed) % self.shared.len()];
        if let Some(live) = slot.current() {
            return Ok(live);
        }
        let _one = slot.connecting.lock().await;
        if let Some(live) = slot.current() {
            return Ok(live);
        }
        let live = Arc::new(Shared {
            client: self.connect().await?,
            prepared: Mutex::new(HashMap::new()),
            watch: Watch::default(),
        });
        *slot.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(live.clone());
        Ok(live)
    }

    /// A connection for one transaction, (re)connected as needed.
    pub async fn alone(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, StoreError> {
        let start = rand::random::<u32>() as usize % self.alone.len();
        let free = (0..self.alone.len()).find_map(|i| self.alone[(start + i) % self.alone.len()].try_lock().ok());
        let mut guard = match free {
            Some(g) => g,
            None => self.alone[start].lock().await,
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect().await?);
        }
        Ok(tokio::sync::MutexGuard::map(guard, |c| c.as_mut().expect("connected")))
    }

    pub fn fail(&self, e: &dyn std::fmt::Display) {
        *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    pub fn recovered(&self) {
        *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn failing(&self) -> Option<String> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How long a shared connection has waited for an answer, when that is [`STALL_AFTER`] or
    /// more: the database (or the way to it) is stuck. The counts are read every 250 ms, so
    /// something is always in flight to notice it; it clears by itself once answers come.
    pub fn stalled(&self) -> Option<Duration> {
        self.shared.iter().filter_map(|slot| slot.current()?.watch.waiting()).max().filter(|w| *w >= STALL_AFTER)
    }
}

impl Slot {
    fn current(&self) -> Option<Arc<Shared>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().filter(|c| !c.client.is_closed()).cloned()
    }
}

impl Shared {
    async fn statement(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(st) = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).get(sql) {
            return Ok(st.clone());
        }
        let st = self.client.prepare(sql).await?;
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).insert(sql, st.clone());
        Ok(st)
    }

    /// `sql` prepared (once) and run, watched while in flight; the database's own error.
    pub async fn try_query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let pending = self.watch.start();
        let rows = match self.statement(sql).await {
            Ok(st) => self.client.query(&st, params).await,
            Err(e) => Err(e),
        };
        pending.answered();
        rows
    }

    pub async fn query(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        self.try_query(sql, params).await.map_err(unavailable)
    }

    pub async fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            0 | 1 => Ok(rows.pop()),
            n => Err(unavailable(format!("one row expected, {n} came"))),
        }
    }

    pub async fn execute(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let pending = self.watch.start();
        let done = match self.statement(sql).await {
            Ok(st) => self.client.execute(&st, params).await,
            Err(e) => Err(e),
        };
        pending.answered();
        done.map_err(unavailable)
    }

    /// A statement built at run time (a list's filters): prepared each time.
    pub async fn query_built(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let pending = self.watch.start();
        let rows = self.client.query(sql, params).await;
        pending.answered();
        rows.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_bounded_waits_unless_the_url_sets_its_own() {
        let c = config("postgres://u@db:5432/offload").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(c.get_options(), Some("-c statement_timeout=30000 -c lock_timeout=3000"));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));

        let own = config("postgres://u@db/offload?connect_timeout=2&options=-c%20statement_timeout%3D1000").unwrap();
        assert_eq!(own.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(own.get_options(), Some("-c statement_timeout=1000 -c lock_timeout=3000"));

        let other = config("postgres://u@db/offload?options=-c%20search_path%3Djobs").unwrap();
        assert_eq!(other.get_options(), Some("-c search_path=jobs -c statement_timeout=30000 -c lock_timeout=3000"));

        let locks = config("postgres://u@db/offload?options=-c%20lock_timeout%3D500").unwrap();
        assert_eq!(locks.get_options(), Some("-c lock_timeout=500 -c statement_timeout=30000"));
    }
}
