//! What instances tell each other: this instance's starts and progress written and announced
//! every 50 ms ([`Inner::write_progress`]), and the one connection that LISTENs for the others'
//! notices and hands them to the Dispatcher and the followers here.

use super::*;

impl Inner {
    /// This instance's runs that started or moved since the last time: written (readers on
    /// every instance see them) and announced (followers on every instance get them), in one
    /// statement for all of them. Only the rows this instance still holds are written, and only
    /// those are announced: a run that lost its lease says nothing.
    pub(super) async fn write_progress(&self) -> Result<(), StoreError> {
        // Each run as held, whether its start is news, whether its progress moved.
        let moved: Vec<(Job, bool, bool)> = self.with_state(|s| {
            s.held
                .values_mut()
                .filter(|h| (h.dirty || h.start_unsaid) && !h.ending && h.job.status == JobStatus::Running)
                .map(|h| (h.job.clone(), std::mem::take(&mut h.start_unsaid), std::mem::take(&mut h.dirty)))
                .collect()
        });
        if moved.is_empty() {
            return Ok(());
        }
        let said =
            |(j, start, _): &(Job, bool, bool)| start.then(|| notice::changed(j.id, JobStatus::Running, &self.tag));
        let progress = |(j, _, dirty): &(Job, bool, bool)| {
            dirty.then(|| notice::progress(&self.tag, j.id, j.progress, j.stage.as_deref()))
        };
        let started: Vec<Option<String>> = moved.iter().map(said).collect();
        let announced: Vec<Option<String>> = moved.iter().map(progress).collect();
        let raw: Vec<[u8; 16]> = moved.iter().map(|m| m.0.id.to_bytes()).collect();
        let ids: Vec<&[u8]> = raw.iter().map(|b| b.as_slice()).collect();
        let attempts: Vec<i32> = moved.iter().map(|m| m.0.attempts as i32).collect();
        let starts: Vec<Option<i64>> = moved.iter().map(|m| m.0.started_at.map(micros)).collect();
        let fractions: Vec<f32> = moved.iter().map(|m| m.0.progress).collect();
        let stages: Vec<Option<&str>> = moved.iter().map(|m| m.0.stage.as_deref()).collect();
        let written = async {
            let conn = self.conns.shared().await?;
            // Rows another session holds locked are skipped, not waited for: written next time.
            conn.query(
                "WITH x AS (SELECT * FROM unnest($1::bytea[], $2::int4[], $3::int8[], $4::real[], $5::text[], \
                   $7::text[], $8::text[]) AS x(id, a, t, p, s, started, moved)), \
                 l AS (SELECT seq FROM offload_jobs WHERE id = ANY($1::bytea[]) AND lease_owner = $6 \
                   AND status IN (0, 1) FOR UPDATE SKIP LOCKED), \
                 u AS (UPDATE offload_jobs o SET status = 1, started_at = x.t, progress = x.p, stage = x.s FROM x \
                   WHERE o.seq IN (SELECT seq FROM l) AND o.id = x.id AND o.attempts = x.a AND o.lease_owner = $6 \
                   AND o.status IN (0, 1) RETURNING o.id) \
                 SELECT x.id, CASE WHEN u.id IS NOT NULL AND x.started IS NOT NULL THEN pg_notify('offload', x.started) END, \
                   CASE WHEN u.id IS NOT NULL AND x.moved IS NOT NULL THEN pg_notify('offload', x.moved) END, \
                   u.id IS NULL AND EXISTS (SELECT 1 FROM offload_jobs o WHERE o.id = x.id AND o.attempts = x.a \
                     AND o.lease_owner = $6 AND o.status IN (0, 1)) \
                 FROM x LEFT JOIN u USING (id)",
                &[&ids, &attempts, &starts, &fractions, &stages, &self.me, &started, &announced],
            )
            .await
        };
        // Written next time: the flags come back for the runs still held as they were, when
        // nothing was written or their rows were skipped.
        let skipped: Vec<[u8; 16]> = match written.await {
            Ok(rows) => rows
                .iter()
                .filter(|r| r.get::<_, bool>(3))
                .filter_map(|r| <[u8; 16]>::try_from(r.get::<_, Vec<u8>>(0)).ok())
                .collect(),
            Err(e) => {
                self.again(&moved, |_| true);
                return Err(e);
            }
        };
        if !skipped.is_empty() {
            self.again(&moved, |id| skipped.contains(&id.to_bytes()));
        }
        Ok(())
    }

    /// Runs of `moved` to write again next time (those `which` says), when still held as they
    /// were.
    fn again(&self, moved: &[(Job, bool, bool)], which: impl Fn(JobId) -> bool) {
        self.with_state(|s| {
            for (job, start, dirty) in moved.iter().filter(|m| which(m.0.id)) {
                if let Some(h) = s.held.get_mut(&job.id).filter(|h| h.job.attempts == job.attempts) {
                    h.start_unsaid |= *start;
                    h.dirty |= *dirty;
                }
            }
        });
    }

    /// One connection that LISTENs; reconnects with backoff when it drops, and then refreshes
    /// the counts and re-reads the jobs followed here (notices sent meanwhile are lost).
    pub(super) async fn listen(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.listen_once().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!("database listener: {e}; reconnecting in {backoff:?}");
                    self.conns.fail(&e);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    pub(super) async fn listen_once(self: &Arc<Self>) -> Result<(), tokio_postgres::Error> {
        use futures::StreamExt;
        let (client, mut connection) = self.conns.config()?.connect(NoTls).await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n.payload().to_string());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        let load = client.prepare(concat!("SELECT ", job_columns!(), " FROM offload_jobs WHERE id = ANY($1)")).await?;
        self.refresh_now.notify_one();
        self.catch_up(&client, &load).await;
        while let Some(first) = rx.recv().await {
            // Whatever arrived meanwhile is handled together: one read for all the jobs.
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            self.on_notices(&client, &load, batch).await;
        }
        match driver.await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }

    /// After (re)connecting: what followers here may have missed while no one listened, as the
    /// jobs are now.
    async fn catch_up(&self, client: &Client, load: &tokio_postgres::Statement) {
        let Some(events) = self.with_state(|s| s.events.clone()) else { return };
        let raw: Vec<[u8; 16]> = events.watched().iter().map(|id| id.to_bytes()).collect();
        if raw.is_empty() {
            return;
        }
        let ids: Vec<&[u8]> = raw.iter().map(|b| b.as_slice()).collect();
        match client.query(load, &[&ids]).await {
            Ok(rows) => {
                for (_, job) in rows.iter().filter_map(|r| job_from_row(r).ok()) {
                    events.changed(self.live(job));
                }
            }
            Err(e) => tracing::warn!("cannot re-read the followed jobs: {e}"),
        }
    }

    pub(super) async fn on_notices(&self, client: &Client, load: &tokio_postgres::Statement, payloads: Vec<String>) {
        let Some(events) = self.with_state(|s| s.events.clone()) else { return };
        let mut work = false;
        let mut changes: Vec<(JobId, JobStatus)> = Vec::new();
        let mut progress: Vec<(JobId, f32, Option<String>)> = Vec::new();
        for payload in &payloads {
            match notice::parse(payload) {
                Some(Notice::Work) => work = true,
                Some(Notice::Cancelled(id)) => events.cancelled(id),
                Some(Notice::Changed { id, status, from }) if from != self.tag && events.wants(id) => {
                    if !changes.contains(&(id, status)) {
                        changes.push((id, status));
                    }
                }
                Some(Notice::Progress { from, jobs }) if from != self.tag => {
                    progress.extend(jobs.into_iter().filter(|(id, _, _)| events.wants(*id)));
                }
                Some(_) => {}
                None => tracing::debug!("unknown notice {payload:?}"),
            }
        }
        if work {
            self.refresh_now.notify_one();
        }
        let mut wanted: Vec<[u8; 16]> =
            changes.iter().map(|c| c.0).chain(progress.iter().map(|p| p.0)).map(|id| id.to_bytes()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return;
        }
        let ids: Vec<&[u8]> = wanted.iter().map(|b| b.as_slice()).collect();
        let rows = match client.query(load, &[&ids]).await {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!("cannot read jobs changed elsewhere: {e}"),
        };
        let jobs: HashMap<JobId, Job> =
            rows.iter().filter_map(|r| job_from_row(r).ok()).map(|(_, j)| (j.id, j)).collect();
        for (id, status) in changes {
            if let Some(snapshot) = jobs.get(&id).and_then(|job| as_of(job, status)) {
                events.changed(snapshot);
            }
        }
        for (id, fraction, stage) in progress {
            if let Some(job) = jobs.get(&id).filter(|j| j.status == JobStatus::Running) {
                let mut job = job.clone();
                job.advance(fraction, stage);
                events.changed(job);
            }
        }
    }
}

/// The job as it was when it reached `status`, from its state now: itself, or (it ended before
/// this instance read it) the running job it was, so a follower sees every status it went
/// through. `None` for a state the job left for an earlier one (queued again).
pub(super) fn as_of(job: &Job, status: JobStatus) -> Option<Job> {
    if job.status == status {
        return Some(job.clone());
    }
    if status == JobStatus::Running && job.status.is_terminal() && job.started_at.is_some() {
        let mut then = job.clone();
        then.status = JobStatus::Running;
        then.stage = Some("started".into());
        then.progress = 0.0;
        then.finished_at = None;
        then.error = None;
        then.result = None;
        return Some(then);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_ended_before_it_was_read_shows_its_run_first() {
        let mut job = Job::new(JobId::random(), JobKind::named("pdf").unwrap(), SystemTime::now());
        job.start(SystemTime::now());
        job.fail(ErrorBody::new("timeout", "too slow"), SystemTime::now());
        let running = as_of(&job, JobStatus::Running).expect("a running snapshot");
        assert_eq!(running.status, JobStatus::Running);
        assert!(running.error.is_none() && running.finished_at.is_none());
        assert_eq!(as_of(&job, JobStatus::Failed).map(|j| j.status), Some(JobStatus::Failed));
        // Queued again since: nothing to show for the old state.
        assert!(as_of(
            &Job::new(JobId::random(), JobKind::named("pdf").unwrap(), SystemTime::now()),
            JobStatus::Running
        )
        .is_none());
    }
}
