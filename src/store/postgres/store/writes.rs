//! The writes of a job's life: submissions (grouped, or one transaction for a keyed one),
//! claims (grouped), starts (noted here), ends (grouped, or read and locked when this instance
//! has no copy of the job), cancels and releases.

use super::*;

impl Inner {
    /// A job's end in a transaction: the row, no more payload, the webhook owed if it has a
    /// callback (held by this instance, which delivers it).
    pub(super) async fn end(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        seq: i64,
        job: &Job,
    ) -> Result<(), StoreError> {
        save(tx, seq, job).await?;
        tx.execute("DELETE FROM offload_payloads WHERE seq = $1", &[&seq]).await.map_err(unavailable)?;
        if let Some((url, body)) = owed_body(job) {
            tx.execute(
                "INSERT INTO offload_webhooks (job_id, url, body, lease_owner, lease_until, owner) \
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), $6) \
                 ON CONFLICT (job_id) DO UPDATE SET url = $2, body = $3, lease_owner = $4, \
                 lease_until = now() + make_interval(secs => $5), owner = $6",
                &[
                    &job.id.to_bytes().as_slice(),
                    &url,
                    &body,
                    &self.me,
                    &self.lease.as_secs_f64(),
                    &job.owner.map(|o| o.to_bytes().to_vec()),
                ],
            )
            .await
            .map_err(unavailable)?;
            self.with_state(|s| s.delivering.insert(job.id));
        }
        Ok(())
    }

    /// Submissions without a key, inserted in one statement: one commit for all, every
    /// submitter answered after it. A submission whose request gave up waiting is left out.
    pub(super) async fn insert_batch(self: Arc<Self>, batch: Vec<InsertRequest>) {
        let batch: Vec<InsertRequest> = batch.into_iter().filter(|r| !r.reply.is_closed()).collect();
        if batch.is_empty() {
            return;
        }
        let all: Vec<&NewJob> = batch.iter().flat_map(|r| &r.jobs).collect();
        let results = match self.insert_many(&all).await {
            Ok(()) => vec![Ok(()); batch.len()],
            // One submission the database refuses must not fail the others: each alone, within
            // one bound for them all.
            Err(Grouped { error, refused: true }) if batch.len() > 1 => {
                tracing::warn!(
                    "a grouped insert failed ({error}); inserting its {} submissions one by one",
                    batch.len()
                );
                let deadline = tokio::time::Instant::now() + ONE_BY_ONE;
                let mut results = Vec::with_capacity(batch.len());
                for request in &batch {
                    let jobs: Vec<&NewJob> = request.jobs.iter().collect();
                    let alone = self.insert_many(&jobs);
                    results.push(match tokio::time::timeout_at(deadline, alone).await {
                        Ok(done) => done.map_err(|g| g.error),
                        Err(_) => Err(error.clone()),
                    });
                }
                results
            }
            Err(Grouped { error, .. }) => vec![Err(error); batch.len()],
        };
        for (request, result) in batch.into_iter().zip(results) {
            // An outcome that cannot be known names this request's own jobs.
            let result = result.map_err(|e| match e {
                StoreError::Uncertain { message, .. } => {
                    StoreError::Uncertain { message, ids: request.jobs.iter().map(|n| n.job.id).collect() }
                }
                other => other,
            });
            if result.is_ok() {
                self.inserted(&request.jobs.iter().collect::<Vec<_>>());
            }
            let answer = result.map(|()| Inserted::Created(request.jobs.into_iter().map(|n| n.job).collect()));
            let _ = request.reply.send(answer);
        }
    }

    pub(super) async fn insert_many(&self, jobs: &[&NewJob]) -> Result<(), Grouped> {
        let raw: Vec<[u8; 16]> = jobs.iter().map(|n| n.job.id.to_bytes()).collect();
        let ids: Vec<&[u8]> = raw.iter().map(|b| b.as_slice()).collect();
        let kinds: Vec<&str> = jobs.iter().map(|n| n.job.kind.as_str()).collect();
        let statuses: Vec<i16> = jobs.iter().map(|n| status_code(n.job.status) as i16).collect();
        let attempts: Vec<i32> = jobs.iter().map(|n| n.job.attempts as i32).collect();
        let progress: Vec<f32> = jobs.iter().map(|n| n.job.progress).collect();
        let stages: Vec<Option<&str>> = jobs.iter().map(|n| n.job.stage.as_deref()).collect();
        let created: Vec<i64> = jobs.iter().map(|n| micros(n.job.created_at)).collect();
        let callbacks: Vec<Option<&str>> = jobs.iter().map(|n| n.job.callback.as_ref().map(|c| c.as_str())).collect();
        let weights: Vec<i64> = jobs.iter().map(|n| n.weight as i64).collect();
        let owners: Vec<Option<Vec<u8>>> = jobs.iter().map(|n| n.job.owner.map(|o| o.to_bytes().to_vec())).collect();
        let specs: Vec<&[u8]> = jobs.iter().map(|n| n.record.spec.as_slice()).collect();
        let data: Vec<Option<&[u8]>> = jobs.iter().map(|n| n.record.data.as_deref()).collect();
        let conn = self.conns.shared().await.map_err(Grouped::other)?;
        let rows = conn
            .try_query(
                "WITH new AS (SELECT * FROM unnest($1::bytea[], $2::text[], $3::int2[], $4::int4[], $5::real[], \
                   $6::text[], $7::int8[], $8::text[], $9::int8[], $10::bytea[], $11::bytea[], $12::bytea[]) \
                   AS x(id, kind, status, attempts, progress, stage, created_at, callback, weight, owner, spec, data)), \
                 j AS (INSERT INTO offload_jobs (id, kind, status, attempts, progress, stage, created_at, callback, \
                   weight, owner) SELECT id, kind, status, attempts, progress, stage, created_at, callback, weight, \
                   owner FROM new RETURNING seq, id), \
                 p AS (INSERT INTO offload_payloads (seq, spec, data) \
                   SELECT j.seq, new.spec, new.data FROM j JOIN new USING (id)) \
                 SELECT count(*), pg_notify('offload', 'q') FROM j",
                &[
                    &ids, &kinds, &statuses, &attempts, &progress, &stages, &created, &callbacks, &weights, &owners,
                    &specs, &data,
                ],
            )
            .await
            .map_err(|e| {
                // The database's error: nothing was inserted. No answer (the connection lost) after
                // the statement was sent: it may have committed.
                match super::super::conn::answered(&e) {
                    true => Grouped::of(e),
                    false => Grouped::other(uncertain(e, jobs)),
                }
            })?;
        let n = rows.first().map_or(0, |r| r.get::<_, i64>(0)) as usize;
        if n != jobs.len() {
            return Err(Grouped::other(uncertain(format!("inserted {n} of {} jobs", jobs.len()), jobs)));
        }
        Ok(())
    }

    /// What this instance added, counted before the next refresh sees it.
    pub(super) fn inserted(&self, jobs: &[&NewJob]) {
        self.with_state(|s| {
            for new in jobs {
                *s.claimable.slot(new.job.kind) += 1;
                *s.stats.queued.slot(new.job.kind) += 1;
                s.stats.by_status.queued += 1;
                s.stats.queued_bytes += new.weight;
                if let Some(owner) = new.job.owner {
                    *s.owners.entry(owner).or_default() += 1;
                }
            }
        });
    }

    /// A submission with an `Idempotency-Key`, in a transaction of its own: the jobs and the
    /// key together, or (another request with the key committed first) nothing, and that
    /// request's jobs.
    pub(super) async fn insert_keyed(
        self: Arc<Self>,
        jobs: Vec<NewJob>,
        key: IdempotencyKey,
    ) -> Result<Inserted, StoreError> {
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let mut first_seq = None;
        for new in &jobs {
            let job = &new.job;
            let row = tx
                .query_one(
                    "INSERT INTO offload_jobs (id, kind, status, attempts, progress, stage, created_at, callback, weight, owner) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING seq",
                    &[
                        &job.id.to_bytes().as_slice(),
                        &job.kind.as_str(),
                        &(status_code(job.status) as i16),
                        &(job.attempts as i32),
                        &job.progress,
                        &job.stage,
                        &micros(job.created_at),
                        &job.callback.as_ref().map(|c| c.as_str()),
                        &(new.weight as i64),
                        &job.owner.map(|o| o.to_bytes().to_vec()),
                    ],
                )
                .await
                .map_err(unavailable)?;
            let seq: i64 = row.get(0);
            first_seq.get_or_insert(seq);
            tx.execute(
                "INSERT INTO offload_payloads (seq, spec, data) VALUES ($1, $2, $3)",
                &[&seq, &new.record.spec, &new.record.data.as_deref()],
            )
            .await
            .map_err(unavailable)?;
        }
        let Some(first) = first_seq else { return Ok(Inserted::Created(Vec::new())) };
        let ids = pack_ids(jobs.iter().map(|j| j.job.id));
        let added = tx
            .execute(
                "INSERT INTO offload_idempotency (key, fingerprint, first_seq, ids) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key) DO NOTHING",
                &[&key.key, &key.fingerprint.as_slice(), &first, &ids],
            )
            .await
            .map_err(unavailable)?;
        if added == 0 {
            // Another request with this key committed first: nothing of this one is kept.
            tx.rollback().await.map_err(unavailable)?;
            drop(conn);
            return match self.replay(&key).await? {
                Some(jobs) => Ok(Inserted::Replayed(jobs)),
                None => Err(unavailable("the idempotency key vanished meanwhile")),
            };
        }
        tx.execute("SELECT pg_notify('offload', 'q')", &[]).await.map_err(unavailable)?;
        // Before the commit, an error leaves nothing behind; a commit whose answer is lost may
        // have committed.
        let keyed: Vec<&NewJob> = jobs.iter().collect();
        tx.commit().await.map_err(|e| match super::super::conn::answered(&e) {
            true => unavailable(e),
            false => uncertain(e, &keyed),
        })?;
        drop(conn);
        self.inserted(&jobs.iter().collect::<Vec<_>>());
        Ok(Inserted::Created(jobs.into_iter().map(|n| n.job).collect()))
    }

    pub(super) async fn replay(&self, key: &IdempotencyKey) -> Result<Option<Vec<Job>>, StoreError> {
        let conn = self.conns.shared().await?;
        let row =
            conn.query_opt("SELECT fingerprint, ids FROM offload_idempotency WHERE key = $1", &[&key.key]).await?;
        let Some(row) = row else { return Ok(None) };
        let print: Vec<u8> = row.get(0);
        if print != key.fingerprint {
            return Err(StoreError::KeyReused);
        }
        let ids: Vec<u8> = row.get(1);
        let mut jobs = Vec::new();
        for id in unpack_ids(&ids) {
            if let Some((_, job)) = self.load(id).await? {
                jobs.push(self.live(job));
            }
        }
        Ok(Some(jobs))
    }

    /// Claims, for as many jobs of each kind as were asked together: one statement per kind.
    pub(super) async fn claim_batch(self: Arc<Self>, batch: Vec<ClaimRequest>) {
        let mut by_kind: HashMap<JobKind, Vec<ClaimRequest>> = HashMap::new();
        for request in batch {
            by_kind.entry(request.kind).or_default().push(request);
        }
        for (kind, requests) in by_kind {
            match self.claim_many(kind, requests.len()).await {
                Ok(claimed) => {
                    let mut claimed = claimed.into_iter();
                    for request in requests {
                        let _ = request.reply.send(Ok(claimed.next()));
                    }
                }
                Err(e) => {
                    for request in requests {
                        let _ = request.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Up to `n` of the oldest claimable jobs of `kind`, with their payloads, in one round trip.
    pub(super) async fn claim_many(&self, kind: JobKind, n: usize) -> Result<Vec<Claimed>, StoreError> {
        let conn = self.conns.shared().await?;
        let rows = conn
            .query(
                concat!(
                    "WITH picked AS (SELECT seq FROM offload_jobs WHERE status = 0 AND lease_owner IS NULL AND kind = $1 \
                       ORDER BY seq LIMIT $4 FOR UPDATE SKIP LOCKED), \
                     claimed AS (UPDATE offload_jobs SET attempts = attempts + 1, lease_owner = $2, \
                       lease_until = now() + make_interval(secs => $3) WHERE seq IN (SELECT seq FROM picked) \
                       RETURNING ",
                    job_columns!(),
                    ") SELECT claimed.*, p.spec, p.data FROM claimed LEFT JOIN offload_payloads p ON p.seq = claimed.seq \
                     ORDER BY claimed.seq"
                ),
                &[&kind.as_str(), &self.me, &self.lease.as_secs_f64(), &(n as i64)],
            )
            .await?;
        drop(conn);
        if rows.len() < n {
            self.with_state(|s| *s.claimable.slot(kind) = 0);
        }
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let (_, job) = job_from_row(&row)?;
            let record = row
                .get::<_, Option<Vec<u8>>>(18)
                .map(|spec| PayloadRecord { spec, data: row.get::<_, Option<Vec<u8>>>(19).map(Bytes::from) });
            // Read back by the kind, on the worker thread: the store never decodes a payload.
            let decoded = record.map(Work::Stored).ok_or_else(|| "the payload is missing".to_string());
            match decoded {
                Ok(work) => {
                    self.with_state(|s| {
                        s.held
                            .insert(job.id, Held { job: job.clone(), ending: false, start_unsaid: false, dirty: false })
                    });
                    claimed.push(Claimed { job, work });
                }
                Err(message) => self.unreadable(job, message).await,
            }
        }
        Ok(claimed)
    }

    /// A claimed job whose stored payload cannot be read: failed, for good (fenced like any
    /// end: a cancel from elsewhere meanwhile wins). Not failing it now only delays: its lease
    /// brings it back.
    pub(super) async fn unreadable(&self, job: Job, message: String) {
        tracing::error!(job = %job.id, "stored payload unreadable: {message}");
        let failed = Final::Failed(ErrorBody::new("payload_unreadable", message));
        if let Err(e) = self.finish_read(job.id, job.attempts, failed).await {
            tracing::warn!(job = %job.id, "cannot record the unreadable payload yet: {e}");
        }
    }

    /// A start is noted here, and written with the next progress (within 50 ms): a start costs
    /// no statement of its own. The attempt was counted at the claim, so a crash before the
    /// write loses nothing: the lease brings the job back either way.
    pub(super) fn start(&self, id: JobId, attempt: u32, at: SystemTime) -> bool {
        self.with_state(|s| {
            let Some(held) = s.held.get_mut(&id).filter(|h| h.job.attempts == attempt) else { return false };
            let started = held.job.start(at);
            held.start_unsaid |= started;
            started
        })
    }

    /// This instance no longer holds `attempt` of the job (a later claim of it stays held).
    pub(super) fn settle(&self, id: JobId, attempt: u32) {
        self.with_state(|s| {
            if s.held.get(&id).is_some_and(|h| h.job.attempts == attempt) {
                s.held.remove(&id);
            }
        });
    }

    /// Ends of runs, in one statement for all: each job's row, its result, its payload gone,
    /// its webhook owed (held by this instance, which delivers it) and its notices, fenced on
    /// (attempt, lease owner) job by job. A row another session holds locked is skipped, not
    /// waited for (the statements behind this one on its connection would wait too): its end is
    /// tried again, alone, until the lock goes.
    pub(super) async fn end_batch(self: Arc<Self>, batch: Vec<EndRequest>) {
        let (done, skipped) = match self.end_many(&batch).await {
            Ok(ends) => ends.split(batch),
            // One end the database refuses must not fail the others: each alone, within one
            // bound for them all.
            Err(Grouped { error, refused: true }) if batch.len() > 1 => {
                tracing::warn!("a grouped end failed ({error}); writing its {} ends one by one", batch.len());
                let deadline = tokio::time::Instant::now() + ONE_BY_ONE;
                let (mut done, mut skipped) = (Vec::new(), Vec::new());
                for request in batch {
                    let alone = self.end_many(std::slice::from_ref(&request));
                    match tokio::time::timeout_at(deadline, alone).await {
                        Ok(Ok(ends)) if ends.skipped.is_empty() => {
                            let ended = ends.ended.contains(&request.job.id);
                            done.push((request, Ok(ended)));
                        }
                        Ok(Ok(_)) => skipped.push(request),
                        Ok(Err(g)) => done.push((request, Err(g.error))),
                        Err(_) => done.push((request, Err(error.clone()))),
                    }
                }
                (done, skipped)
            }
            Err(Grouped { error, .. }) => (batch.into_iter().map(|r| (r, Err(error.clone()))).collect(), Vec::new()),
        };
        self.ends_written(done);
        if !skipped.is_empty() {
            tokio::spawn(self.retry_skipped_ends(skipped));
        }
    }

    /// Ends whose rows another session holds locked, tried again (every 100 ms, then up to
    /// every second) until written; their writers wait meanwhile. Any other failure answers
    /// them (the Dispatcher tries again).
    async fn retry_skipped_ends(self: Arc<Self>, mut waiting: Vec<EndRequest>) {
        let mut pause = SKIPPED_END_RETRY;
        tracing::info!(jobs = waiting.len(), "ends wait for rows another database session holds locked");
        while !waiting.is_empty() {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            match self.end_many(&waiting).await {
                Ok(ends) => {
                    let (done, skipped) = ends.split(waiting);
                    self.ends_written(done);
                    waiting = skipped;
                }
                Err(Grouped { error, .. }) => {
                    self.ends_written(waiting.into_iter().map(|r| (r, Err(error.clone()))).collect());
                    return;
                }
            }
        }
    }

    /// Ends written (whether each ended the job) or failed: the state here, then the answers.
    fn ends_written(self: &Arc<Self>, done: Vec<(EndRequest, Result<bool, StoreError>)>) {
        self.with_state(|s| {
            for (request, result) in &done {
                let (id, attempt) = (request.job.id, request.job.attempts);
                match result {
                    Ok(ended) => {
                        if s.held.get(&id).is_some_and(|h| h.job.attempts == attempt) {
                            s.held.remove(&id);
                        }
                        if *ended {
                            if request.job.callback.is_some() {
                                s.delivering.insert(id);
                            }
                            *s.stats.by_status.slot(request.job.status) += 1;
                            s.stats.result_bytes += request.bytes.as_ref().map_or(0, Bytes::len);
                        }
                    }
                    // Not ended: the Dispatcher retries, and may, from the job as held.
                    Err(_) => {
                        if let Some(held) = s.held.get_mut(&id) {
                            held.ending = false;
                        }
                    }
                }
            }
        });
        // Results past the budget: the oldest finished jobs go now, not at the next sweep.
        let over = self.with_state(|s| s.stats.result_bytes) > self.result_budget;
        if over && !self.evicting.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.evict().await {
                    tracing::warn!("cannot forget the oldest results: {e}");
                }
                this.evicting.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        for (request, result) in done {
            let _ = request.reply.send(result.map(|ended| ended.then_some(request.job)));
        }
    }

    /// The ends of `batch` in one statement: the jobs it ended, and those it skipped (their
    /// rows are locked by another session; still this run's to end).
    pub(super) async fn end_many(&self, batch: &[EndRequest]) -> Result<Ends, Grouped> {
        let raw: Vec<[u8; 16]> = batch.iter().map(|r| r.job.id.to_bytes()).collect();
        let ids: Vec<&[u8]> = raw.iter().map(|b| b.as_slice()).collect();
        let attempts: Vec<i32> = batch.iter().map(|r| r.job.attempts as i32).collect();
        let fields: Vec<Fields> = batch.iter().map(|r| Fields::of(&r.job)).collect();
        let owed: Vec<Option<(&str, Vec<u8>)>> = batch.iter().map(|r| owed_body(&r.job)).collect();
        let said: Vec<String> = batch.iter().map(|r| notice::changed(r.job.id, r.job.status, &self.tag)).collect();
        let ran: Vec<Option<String>> = batch
            .iter()
            .map(|r| r.start_unsaid.then(|| notice::changed(r.job.id, JobStatus::Running, &self.tag)))
            .collect();
        let column = |f: for<'f> fn(&'f Fields<'_>) -> Option<&'f str>| fields.iter().map(f).collect::<Vec<_>>();
        let statuses: Vec<i16> = fields.iter().map(|f| f.status).collect();
        let progress: Vec<f32> = fields.iter().map(|f| f.progress).collect();
        let started: Vec<Option<i64>> = fields.iter().map(|f| f.started_at).collect();
        let finished: Vec<Option<i64>> = fields.iter().map(|f| f.finished_at).collect();
        let result_bytes: Vec<Option<i64>> = fields.iter().map(|f| f.result_bytes).collect();
        let metas: Vec<Option<&str>> = fields.iter().map(|f| f.result_meta.as_deref()).collect();
        let results: Vec<Option<&[u8]>> = batch.iter().map(|r| r.bytes.as_deref()).collect();
        let urls: Vec<Option<&str>> = owed.iter().map(|o| o.as_ref().map(|o| o.0)).collect();
        let bodies: Vec<Option<&[u8]>> = owed.iter().map(|o| o.as_ref().map(|o| o.1.as_slice())).collect();
        let conn = self.conns.shared().await.map_err(Grouped::other)?;
        let rows = conn
            .try_query(
                "WITH x AS (SELECT * FROM unnest($1::bytea[], $2::int4[], $3::int2[], $4::real[], $5::text[], \
                   $6::int8[], $7::int8[], $8::text[], $9::text[], $10::text[], $11::int8[], $12::text[], $13::text[], \
                   $14::bytea[], $15::text[], $16::bytea[], $17::text[], $18::text[]) \
                   AS x(id, attempt, status, progress, stage, started_at, finished_at, error_code, error_message, \
                   result_type, result_bytes, result_name, result_meta, result, url, body, said, ran)), \
                 l AS (SELECT seq FROM offload_jobs WHERE id = ANY($1::bytea[]) AND lease_owner = $19 \
                   AND status IN (0, 1) FOR UPDATE SKIP LOCKED), \
                 u AS (UPDATE offload_jobs o SET status = x.status, progress = x.progress, stage = x.stage, \
                   started_at = x.started_at, finished_at = x.finished_at, error_code = x.error_code, \
                   error_message = x.error_message, result_type = x.result_type, result_bytes = x.result_bytes, \
                   result_name = x.result_name, result_meta = x.result_meta, \
                   lease_owner = NULL, lease_until = NULL, db_finished_at = (extract(epoch FROM now()) * 1000000)::int8 \
                   FROM x WHERE o.seq IN (SELECT seq FROM l) AND o.id = x.id AND o.attempts = x.attempt AND o.lease_owner = $19 AND o.status IN (0, 1) \
                   RETURNING o.seq, o.id, o.owner), \
                 r AS (INSERT INTO offload_results (seq, bytes) SELECT u.seq, x.result FROM u JOIN x USING (id) \
                   WHERE x.result IS NOT NULL ON CONFLICT (seq) DO UPDATE SET bytes = excluded.bytes), \
                 d AS (DELETE FROM offload_payloads WHERE seq IN (SELECT seq FROM u)), \
                 w AS (INSERT INTO offload_webhooks (job_id, url, body, lease_owner, lease_until, owner) \
                   SELECT u.id, x.url, x.body, $19, now() + make_interval(secs => $20), u.owner FROM u JOIN x USING (id) \
                   WHERE x.url IS NOT NULL ON CONFLICT (job_id) DO UPDATE SET url = excluded.url, \
                   body = excluded.body, lease_owner = excluded.lease_owner, lease_until = excluded.lease_until, \
                   owner = excluded.owner) \
                 SELECT x.id, u.id IS NOT NULL, \
                   CASE WHEN u.id IS NOT NULL AND x.ran IS NOT NULL THEN pg_notify('offload', x.ran) END, \
                   CASE WHEN u.id IS NOT NULL THEN pg_notify('offload', x.said) END, \
                   u.id IS NULL AND EXISTS (SELECT 1 FROM offload_jobs o WHERE o.id = x.id AND o.attempts = x.attempt \
                     AND o.lease_owner = $19 AND o.status IN (0, 1)) \
                 FROM x LEFT JOIN u USING (id)",
                &[
                    &ids,
                    &attempts,
                    &statuses,
                    &progress,
                    &column(|f| f.stage),
                    &started,
                    &finished,
                    &column(|f| f.error_code),
                    &column(|f| f.error_message),
                    &column(|f| f.result_type),
                    &result_bytes,
                    &column(|f| f.result_name),
                    &metas,
                    &results,
                    &urls,
                    &bodies,
                    &said,
                    &ran,
                    &self.me,
                    &self.lease.as_secs_f64(),
                ],
            )
            .await
            .map_err(Grouped::of)?;
        let mut ends = Ends::default();
        for row in rows {
            let Ok(id) = <[u8; 16]>::try_from(row.get::<_, Vec<u8>>(0)) else { continue };
            if row.get::<_, bool>(1) {
                ends.ended.push(JobId::from_bytes(id));
            } else if row.get::<_, bool>(4) {
                ends.skipped.push(JobId::from_bytes(id));
            }
        }
        Ok(ends)
    }

    /// An end this instance has no copy of the job for: read and locked in a transaction.
    pub(super) async fn finish_read(&self, id: JobId, attempt: u32, outcome: Final) -> Result<Option<Job>, StoreError> {
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let row = tx
            .query_opt(
                concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM offload_jobs WHERE id = $1 AND attempts = $2 AND lease_owner = $3 \
                     AND status IN (0, 1) FOR UPDATE"
                ),
                &[&id.to_bytes().as_slice(), &(attempt as i32), &self.me],
            )
            .await
            .map_err(unavailable)?;
        let Some((job, bytes)) = row.map(|r| job_from_row(&r)).transpose()?.and_then(|(seq, job)| {
            let (job, bytes) = ended(job, outcome, self.result_budget)?;
            Some(((seq, job), bytes))
        }) else {
            self.settle(id, attempt);
            return Ok(None);
        };
        let (seq, job) = job;
        if let Some(bytes) = bytes {
            tx.execute(
                "INSERT INTO offload_results (seq, bytes) VALUES ($1, $2) ON CONFLICT (seq) DO UPDATE SET bytes = $2",
                &[&seq, &bytes.as_ref()],
            )
            .await
            .map_err(unavailable)?;
        }
        self.end(&tx, seq, &job).await?;
        tx.execute("SELECT pg_notify('offload', $1)", &[&notice::changed(id, job.status, &self.tag)])
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.settle(id, attempt);
        Ok(Some(job))
    }

    pub(super) async fn cancel(self: Arc<Self>, id: JobId, reason: ErrorBody) -> Result<CancelOutcome, StoreError> {
        let mut conn = self.conns.alone().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let row = tx
            .query_opt(
                concat!("SELECT ", job_columns!(), " FROM offload_jobs WHERE id = $1 FOR UPDATE"),
                &[&id.to_bytes().as_slice()],
            )
            .await
            .map_err(unavailable)?;
        let Some((seq, mut job)) = row.map(|r| job_from_row(&r)).transpose()? else {
            return Ok(CancelOutcome::Unknown);
        };
        if job.status.is_terminal() {
            return Ok(CancelOutcome::Finished(job));
        }
        job.cancel(crate::clock::now());
        job.error = Some(reason);
        self.end(&tx, seq, &job).await?;
        // Followers elsewhere see it (this instance's Dispatcher tells its own); the instance
        // running it stops the run.
        tx.execute("SELECT pg_notify('offload', $1)", &[&notice::changed(id, job.status, &self.tag)])
            .await
            .map_err(unavailable)?;
        tx.execute("SELECT pg_notify('offload', $1)", &[&notice::cancelled(id)]).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.settle(id, job.attempts);
        Ok(CancelOutcome::Cancelled(job))
    }

    pub(super) async fn release(self: Arc<Self>, id: JobId, attempt: u32) -> Result<bool, StoreError> {
        // A claim that never started gives its attempt back; a run keeps it counted, its start
        // written or only noted here (a start is written with the next progress, within 50 ms).
        let started = self.with_state(|s| {
            s.held.get(&id).is_some_and(|h| h.job.attempts == attempt && h.job.status == JobStatus::Running)
        });
        let conn = self.conns.shared().await?;
        // A row another session holds locked is not waited for: the lease brings the job back
        // instead.
        let row = conn
            .query_opt(
                "WITH l AS (SELECT seq FROM offload_jobs WHERE id = $1 AND attempts = $2 AND lease_owner = $3 \
                   AND status IN (0, 1) FOR UPDATE SKIP LOCKED), \
                 u AS (UPDATE offload_jobs SET \
                   attempts = CASE WHEN status = 0 AND NOT $5 THEN attempts - 1 ELSE attempts END, \
                   status = 0, stage = 'queued', progress = 0, started_at = NULL, lease_owner = NULL, lease_until = NULL \
                   WHERE seq IN (SELECT seq FROM l) AND id = $1 AND attempts = $2 AND lease_owner = $3 \
                   AND status IN (0, 1) RETURNING pg_notify('offload', $4), pg_notify('offload', 'q')) \
                 SELECT (SELECT count(*) FROM u), NOT EXISTS (SELECT 1 FROM l) AND EXISTS (SELECT 1 FROM offload_jobs \
                   WHERE id = $1 AND attempts = $2 AND lease_owner = $3 AND status IN (0, 1))",
                &[
                    &id.to_bytes().as_slice(),
                    &(attempt as i32),
                    &self.me,
                    &notice::changed(id, JobStatus::Queued, EVERYONE),
                    &started,
                ],
            )
            .await?;
        self.settle(id, attempt);
        let (changed, skipped) = row.map_or((0, false), |r| (r.get::<_, i64>(0), r.get::<_, bool>(1)));
        if skipped {
            return Err(unavailable("another database session holds the job's row locked"));
        }
        Ok(changed == 1)
    }
}
