//! Keeping the shared tables right: leases renewed, expired leases taken back (jobs queued again
//! or failed, webhooks delivered from here), retention by TTL and by the result budget.

use super::*;

impl Inner {
    /// Renews this instance's leases on the jobs it holds and the webhooks it delivers, and on
    /// nothing else: a lease whose work this instance lost track of (a claim whose answer was
    /// lost with its connection) runs out and is rescued. A held job whose lease could not be
    /// renewed was taken back (this instance was cut off past its lease): its run here stops,
    /// so a job runs on one instance at a time. Rows another session holds locked are skipped,
    /// not waited for: still this instance's, they are renewed next time.
    pub(super) async fn heartbeat(&self) -> Result<(), StoreError> {
        let (jobs, hooks): (Vec<[u8; 16]>, Vec<[u8; 16]>) = self.with_state(|s| {
            (s.held.keys().map(|id| id.to_bytes()).collect(), s.delivering.iter().map(|id| id.to_bytes()).collect())
        });
        let job_ids: Vec<&[u8]> = jobs.iter().map(|b| b.as_slice()).collect();
        let hook_ids: Vec<&[u8]> = hooks.iter().map(|b| b.as_slice()).collect();
        let conn = self.conns.shared().await?;
        let row = conn
            .query_opt(
                "WITH l AS (SELECT seq FROM offload_jobs WHERE lease_owner = $1 AND id = ANY($3::bytea[]) \
                   FOR UPDATE SKIP LOCKED), \
                 j AS (UPDATE offload_jobs SET lease_until = now() + make_interval(secs => $2) \
                   WHERE seq IN (SELECT seq FROM l) AND lease_owner = $1 RETURNING id), \
                 k AS (SELECT job_id FROM offload_webhooks WHERE lease_owner = $1 AND job_id = ANY($4::bytea[]) \
                   FOR UPDATE SKIP LOCKED), \
                 w AS (UPDATE offload_webhooks SET lease_until = now() + make_interval(secs => $2) \
                   WHERE job_id IN (SELECT job_id FROM k) AND lease_owner = $1 RETURNING 1) \
                 SELECT (SELECT coalesce(array_agg(id), '{}') FROM j), (SELECT count(*) FROM w), \
                   (SELECT coalesce(array_agg(id), '{}') FROM offload_jobs WHERE lease_owner = $1 \
                     AND id = ANY($3::bytea[]) AND seq NOT IN (SELECT seq FROM l))",
                &[&self.me, &self.lease.as_secs_f64(), &job_ids, &hook_ids],
            )
            .await?;
        // Renewed, or skipped while still this instance's.
        let renewed: std::collections::HashSet<Vec<u8>> = row
            .map(|r| {
                let mut ids = r.get::<_, Vec<Vec<u8>>>(0);
                ids.extend(r.get::<_, Vec<Vec<u8>>>(2));
                ids
            })
            .unwrap_or_default()
            .into_iter()
            .collect();
        let lost: Vec<JobId> = jobs
            .iter()
            .filter(|id| !renewed.contains(id.as_slice()))
            .map(|id| JobId::from_bytes(*id))
            .filter(|id| self.with_state(|s| s.held.get(id).is_some_and(|h| !h.ending)))
            .collect();
        if !lost.is_empty() {
            tracing::warn!(
                jobs = lost.len(),
                "leases lost (another instance took the jobs back): stopping their runs here"
            );
            let events = self.with_state(|s| {
                for id in &lost {
                    s.held.remove(id);
                }
                s.events.clone()
            });
            for id in lost {
                if let Some(events) = &events {
                    events.cancelled(id);
                }
            }
        }
        Ok(())
    }

    /// Webhooks whose lease ran out (the instance delivering them stopped, or none took them
    /// yet), taken by this instance: at most `limit` at a time.
    pub(super) async fn take_webhooks(&self, limit: i64) -> Result<Vec<OwedWebhook>, StoreError> {
        let conn = self.conns.shared().await?;
        let rows = conn
            .query(
                "UPDATE offload_webhooks SET lease_owner = $1, lease_until = now() + make_interval(secs => $2) \
                 WHERE job_id IN (SELECT job_id FROM offload_webhooks WHERE lease_until IS NULL OR lease_until < now() \
                   LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING job_id, url, body, \
                   coalesce(owner, (SELECT j.owner FROM offload_jobs j WHERE j.id = offload_webhooks.job_id))",
                &[&self.me, &self.lease.as_secs_f64(), &limit],
            )
            .await?;
        let owed: Vec<OwedWebhook> = rows
            .iter()
            .filter_map(|r| {
                let id: Vec<u8> = r.get(0);
                let url = CallbackUrl::parse(&r.get::<_, String>(1), CallbackPolicy { allow_private: true }).ok()?;
                let owner = match r.get::<_, Option<Vec<u8>>>(3) {
                    Some(bytes) => Some(Owner::from_bytes(bytes.try_into().ok()?)),
                    None => None,
                };
                Some(OwedWebhook {
                    job: JobId::from_bytes(id.try_into().ok()?),
                    owner,
                    url,
                    body: Bytes::from(r.get::<_, Vec<u8>>(2)),
                })
            })
            .collect();
        self.with_state(|s| s.delivering.extend(owed.iter().map(|w| w.job)));
        Ok(owed)
    }

    /// Jobs whose holder stopped renewing: queued again, or failed past the attempts allowed.
    /// Followers everywhere hear of both. Rows another session holds locked wait for the next
    /// rescue.
    pub(super) async fn rescue(&self) -> Result<(), StoreError> {
        let failed = self.fail_lost().await?;
        let conn = self.conns.shared().await?;
        let requeued = conn
            .execute(
                "UPDATE offload_jobs SET status = 0, stage = 'queued', progress = 0, started_at = NULL, \
                 lease_owner = NULL, lease_until = NULL \
                 WHERE seq IN (SELECT seq FROM offload_jobs WHERE lease_owner IS NOT NULL AND lease_until < now() \
                   AND status IN (0, 1) FOR UPDATE SKIP LOCKED) \
                 AND lease_owner IS NOT NULL AND lease_until < now() AND status IN (0, 1) \
                 RETURNING pg_notify('offload', 'j0' || encode(id, 'hex') || $1), pg_notify('offload', 'q')",
                &[&EVERYONE],
            )
            .await?;
        if failed + requeued > 0 {
            tracing::info!(requeued, failed, "jobs of an instance that stopped renewing its leases taken back");
        }
        // Webhooks a stopped instance owed: delivered from here (only once the Dispatcher
        // listens: before that, the start takes them with `owed_webhooks`).
        if let Some(events) = self.with_state(|s| s.events.clone()) {
            let owed = self.take_webhooks(RESCUED_WEBHOOKS).await?;
            if !owed.is_empty() {
                tracing::info!(owed = owed.len(), "delivering webhooks owed by an instance that stopped");
                events.owed(owed);
            }
        }
        Ok(())
    }

    /// Expired leases of jobs started `--max-attempts` times: failed `worker_lost` like any end
    /// (the payload gone, the webhook owed, held by this instance and handed to the Dispatcher
    /// to deliver), at most 100 at a time.
    async fn fail_lost(&self) -> Result<u64, StoreError> {
        let lost = crate::store::worker_lost(self.max_attempts);
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let rows = tx
            .query(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM offload_jobs WHERE lease_owner IS NOT NULL AND lease_until < now() \
                     AND status IN (0, 1) AND attempts >= $1 LIMIT 100 FOR UPDATE SKIP LOCKED"
                ),
                &[&(self.max_attempts as i32)],
            )
            .await
            .map_err(unavailable)?;
        let mut owed = Vec::new();
        for (seq, mut job) in rows.iter().filter_map(|r| job_from_row(r).ok()) {
            job.fail(lost.clone(), crate::clock::now());
            self.end(&tx, seq, &job).await?;
            tx.execute("SELECT pg_notify('offload', $1)", &[&notice::changed(job.id, job.status, EVERYONE)])
                .await
                .map_err(unavailable)?;
            if let (Some(url), Ok(body)) = (job.callback.clone(), serde_json::to_vec(&job.view())) {
                owed.push(OwedWebhook { job: job.id, owner: job.owner, url, body: Bytes::from(body) });
            }
        }
        tx.commit().await.map_err(unavailable)?;
        match self.with_state(|s| s.events.clone()) {
            Some(events) if !owed.is_empty() => events.owed(owed),
            // No Dispatcher yet to deliver them: let the leases run out for a rescue to take.
            _ => self.with_state(|s| {
                for w in &owed {
                    s.delivering.remove(&w.job);
                }
            }),
        }
        Ok(rows.len() as u64)
    }

    /// Forgets finished jobs past the TTL, in batches; then, while the results kept pass the
    /// budget, the oldest finished jobs. Both go by the database's clock: when the database
    /// recorded the end (`db_finished_at`; `finished_at`, the ending instance's clock, for jobs
    /// ended before that column existed), against the database's `now()`.
    pub(super) async fn expire(self: Arc<Self>) -> Result<usize, StoreError> {
        let ttl = i64::try_from(self.ttl.as_micros()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let mut conn = self.conns.alone().await?;
            let tx = conn.transaction().await.map_err(unavailable)?;
            let rows = tx
                .query(
                    "SELECT seq FROM offload_jobs WHERE finished_at IS NOT NULL \
                     AND coalesce(db_finished_at, finished_at) < (extract(epoch FROM now()) * 1000000)::int8 - $1 \
                     ORDER BY coalesce(db_finished_at, finished_at) LIMIT 2000 FOR UPDATE SKIP LOCKED",
                    &[&ttl],
                )
                .await
                .map_err(unavailable)?;
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            forget(&tx, &seqs).await?;
            tx.commit().await.map_err(unavailable)?;
            total += seqs.len();
            if seqs.len() < 2000 {
                break;
            }
        }
        if self.with_state(|s| s.stats.result_bytes) > self.result_budget {
            total += self.evict().await?;
        }
        Ok(total)
    }

    /// Results past `--result-disk`: the oldest succeeded jobs holding at least the excess,
    /// forgotten. The excess is counted by the database (every instance's results), under a lock
    /// so that one instance evicts at a time; this instance's own estimate only says when to
    /// look.
    pub(super) async fn evict(&self) -> Result<usize, StoreError> {
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let alone: bool =
            tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&EVICT_LOCK]).await.map_err(unavailable)?.get(0);
        if !alone {
            return Ok(0);
        }
        let total: i64 = tx
            .query_one("SELECT coalesce(sum(result_bytes), 0)::BIGINT FROM offload_jobs WHERE status = 2", &[])
            .await
            .map_err(unavailable)?
            .get(0);
        let total = total.max(0) as usize;
        let over = total.saturating_sub(self.result_budget);
        let (mut seqs, mut freed) = (Vec::new(), 0usize);
        if over > 0 {
            let rows = tx
                .query(
                    "SELECT seq, result_bytes FROM offload_jobs WHERE status = 2 AND result_bytes > 0 \
                     ORDER BY coalesce(db_finished_at, finished_at), seq LIMIT 2000 FOR UPDATE SKIP LOCKED",
                    &[],
                )
                .await
                .map_err(unavailable)?;
            for row in rows {
                if freed >= over {
                    break;
                }
                seqs.push(row.get::<_, i64>(0));
                freed += row.get::<_, i64>(1).max(0) as usize;
            }
            forget(&tx, &seqs).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        if !seqs.is_empty() {
            tracing::info!(jobs = seqs.len(), freed, "finished jobs forgotten early: results past --result-disk");
        }
        self.with_state(|s| s.stats.result_bytes = total.saturating_sub(freed));
        Ok(seqs.len())
    }
}
