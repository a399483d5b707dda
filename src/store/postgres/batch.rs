//! Group commit for the hot path: requests of one kind (inserts, claims, ends) wait in a queue,
//! and a few tasks each take all that wait (up to a batch) and run them as one statement. Under
//! load a statement carries many jobs, so what the database spends per statement (a round trip,
//! parsing the parameters, a commit, a WAL flush) is paid once for all of them; alone, a request
//! runs at once.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, Mutex};

/// A request that knows how much of a batch it takes (jobs, bytes).
pub(super) trait Weigh {
    fn jobs(&self) -> usize {
        1
    }
    fn bytes(&self) -> usize {
        0
    }
}

/// How large one batch may grow.
#[derive(Clone, Copy)]
pub(super) struct Limits {
    pub jobs: usize,
    pub bytes: usize,
    /// Batches in flight at once.
    pub tasks: usize,
}

/// Starts `limits.tasks` tasks on the current runtime that run batches with `run`; returns
/// where requests go. `run` answers every request of its batch.
pub(super) fn start<R, F, Fut>(limits: Limits, run: F) -> mpsc::UnboundedSender<R>
where
    R: Weigh + Send + 'static,
    F: Fn(Vec<R>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(Mutex::new(rx));
    let run = Arc::new(run);
    for _ in 0..limits.tasks.max(1) {
        let (rx, run) = (rx.clone(), run.clone());
        tokio::spawn(async move {
            while let Some(batch) = take(&rx, limits).await {
                run(batch).await;
            }
        });
    }
    tx
}

/// Waits for one request, then takes whatever else waits, within the limits.
async fn take<R: Weigh>(rx: &Mutex<mpsc::UnboundedReceiver<R>>, limits: Limits) -> Option<Vec<R>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let (mut jobs, mut bytes) = (first.jobs(), first.bytes());
    let mut batch = vec![first];
    while jobs < limits.jobs && bytes < limits.bytes {
        match rx.try_recv() {
            Ok(next) => {
                jobs += next.jobs();
                bytes += next.bytes();
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Req(usize, tokio::sync::oneshot::Sender<usize>);
    impl Weigh for Req {
        fn bytes(&self) -> usize {
            self.0
        }
    }

    #[tokio::test]
    async fn what_waits_goes_together_within_the_limits() {
        let (sizes_tx, mut sizes) = mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g = gate.clone();
        let tx = start(Limits { jobs: 4, bytes: 100, tasks: 1 }, move |batch: Vec<Req>| {
            let (sizes_tx, g) = (sizes_tx.clone(), g.clone());
            async move {
                let n = batch.len();
                let _ = sizes_tx.send(n);
                // Each batch waits for the test to let it go, so the rest queue meanwhile.
                g.acquire().await.expect("open").forget();
                for r in batch {
                    let _ = r.1.send(n);
                }
            }
        });
        let mut answers = Vec::new();
        let mut send = |bytes| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(Req(bytes, reply)).expect("running");
            answers.push(answer);
        };
        send(1);
        // The first goes alone: the task took it before the others were sent.
        assert_eq!(sizes.recv().await, Some(1));
        for bytes in [1, 1, 1, 1, 1, 90, 20, 1] {
            send(bytes);
        }
        gate.add_permits(10);
        let mut got = vec![1];
        while got.iter().sum::<usize>() < 9 {
            got.push(sizes.recv().await.expect("a batch"));
        }
        // Then four (the job limit); then 1 + 90 + 20 (the request that crosses the byte limit
        // still goes, and the batch stops there); then the last.
        assert_eq!(got, vec![1, 4, 3, 1]);
        for a in answers {
            assert_eq!(a.await.map(|n| n > 0), Ok(true));
        }
    }
}
