//! What instances tell each other: this instance's starts and progress written and announced
//! every 50 ms ([`Inner::write_progress`]), and the one connection that LISTENs for the others'
//! notices and hands them to the Dispatcher and the followers here.

use super::*;

impl Inner {
    /// This instance's runs that started or moved since the last time: written (readers on
    /// every instance see them) and announced (followers on every instance get them), in one
    /// statement for all of them.
    pub(super) async fn write_progress(&self) -> Result<(), StoreError> {
        let mut started = Vec::new();
        // Each run as held, and whether its progress moved (not only its start).
        let moved: Vec<(Job, bool)> = self.with_state(|s| {
            s.held
                .values_mut()
                .filter(|h| (h.dirty || h.start_unsaid) && h.job.status == JobStatus::Running)
                .map(|h| {
                    if std::mem::take(&mut h.start_unsaid) {
                        started.push(notice::changed(h.job.id, JobStatus::Running, &self.tag));
                    }
                    (h.job.clone(), std::mem::take(&mut h.dirty))
                })
                .collect()
        });
        if moved.is_empty() {
            return Ok(());
        }
        let announced: Vec<_> =
            moved.iter().filter(|m| m.1).map(|(j, _)| (j.id, j.progress, j.stage.clone())).collect();
        let mut notices = started;
        notices.extend(notice::progress(&self.tag, &announced));
        let raw: Vec<[u8; 16]> = moved.iter().map(|(j, _)| j.id.to_bytes()).collect();
        let ids: Vec<&[u8]> = raw.iter().map(|b| b.as_slice()).collect();
        let attempts: Vec<i32> = moved.iter().map(|(j, _)| j.attempts as i32).collect();
        let starts: Vec<Option<i64>> = moved.iter().map(|(j, _)| j.started_at.map(micros)).collect();
        let fractions: Vec<f32> = moved.iter().map(|(j, _)| j.progress).collect();
        let stages: Vec<Option<&str>> = moved.iter().map(|(j, _)| j.stage.as_deref()).collect();
        let conn = self.conns.shared().await?;
        conn.query(
            "WITH u AS (UPDATE offload_jobs o SET status = 1, started_at = x.t, progress = x.p, stage = x.s \
               FROM unnest($1::bytea[], $2::int4[], $3::int8[], $4::real[], $5::text[]) AS x(id, a, t, p, s) \
               WHERE o.id = x.id AND o.attempts = x.a AND o.lease_owner = $6 AND o.status IN (0, 1) RETURNING 1), \
             n AS (SELECT pg_notify('offload', t) FROM unnest($7::text[]) AS t) \
             SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM n)",
            &[&ids, &attempts, &starts, &fractions, &stages, &self.me, &notices],
        )
        .await?;
        Ok(())
    }

    /// One connection that LISTENs; reconnects with backoff when it drops, and then refreshes
    /// (notifications sent meanwhile are lost: the refresh and the slow poll catch up).
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
        let (client, mut connection) = tokio_postgres::connect(&self.url, NoTls).await?;
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
        let mut job = Job::new(JobId::random(), JobKind::Pdf, SystemTime::now());
        job.start(SystemTime::now());
        job.fail(ErrorBody::new("timeout", "too slow"), SystemTime::now());
        let running = as_of(&job, JobStatus::Running).expect("a running snapshot");
        assert_eq!(running.status, JobStatus::Running);
        assert!(running.error.is_none() && running.finished_at.is_none());
        assert_eq!(as_of(&job, JobStatus::Failed).map(|j| j.status), Some(JobStatus::Failed));
        // Queued again since: nothing to show for the old state.
        assert!(as_of(&Job::new(JobId::random(), JobKind::Pdf, SystemTime::now()), JobStatus::Running).is_none());
    }
}
