//! [`StartLog`]: which job each worker thread started last, written where a crash of the process
//! cannot lose it (the page cache: a plain `pwrite`, no fsync, a few microseconds).
//!
//! Why: an attempt must be counted before a job can take the process down (else a poison job
//! crash-loops the service), but only jobs that really started count as attempts. Neither the
//! claim nor the start is written to the database (two writes per job nobody needs to wait
//! for: the final write records both). At recovery, a job that is not finished on disk counts
//! one more attempt if its id is in this log. (An OS crash may lose the log; then such a job runs again with its
//! attempt not counted, which is the safe side for a job that did not crash anything.)

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::job::JobId;

pub struct StartLog {
    file: File,
    /// Next free slot (one 16-byte slot per worker thread).
    next_slot: AtomicU64,
}

thread_local! {
    /// This thread's slot, once it has started a job.
    static SLOT: Cell<Option<u64>> = const { Cell::new(None) };
}

const ID_BYTES: u64 = 16;

impl StartLog {
    /// Opens the log in `dir` and returns it with the ids the last process had started; call
    /// [`StartLog::clear`] once they are accounted for (recovery committed).
    pub fn open(dir: &Path) -> std::io::Result<(Arc<Self>, HashSet<JobId>)> {
        let path = dir.join("started");
        let file = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes)?;
        let started = bytes
            .chunks_exact(ID_BYTES as usize)
            .filter(|c| c.iter().any(|b| *b != 0))
            .map(|c| JobId::from_bytes(c.try_into().expect("16-byte chunk")))
            .collect();
        Ok((Arc::new(StartLog { file, next_slot: AtomicU64::new(0) }), started))
    }

    /// Forgets what the last process started.
    pub fn clear(&self) -> std::io::Result<()> {
        self.file.set_len(0)
    }

    /// Notes that the calling thread starts `id` now.
    pub fn mark(&self, id: JobId) {
        let slot = SLOT.with(|s| match s.get() {
            Some(slot) => slot,
            None => {
                let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
                s.set(Some(slot));
                slot
            }
        });
        if let Err(e) = self.file.write_all_at(&id.to_bytes(), slot * ID_BYTES) {
            tracing::warn!(job = %id, "cannot note the job's start: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ids_each_thread_started_last_are_read_back_once() {
        let tmp = tempfile::Builder::new().prefix("offload-startlog-").tempdir().unwrap();
        let dir = tmp.path();
        let (log, before) = StartLog::open(dir).unwrap();
        assert!(before.is_empty());
        log.clear().unwrap();
        let (a, b, c) = (JobId::random(), JobId::random(), JobId::random());
        log.mark(a);
        log.mark(b); // the same thread: replaces a
        let other = log.clone();
        std::thread::spawn(move || other.mark(c)).join().unwrap();
        drop(log);
        let (log, started) = StartLog::open(dir).unwrap();
        assert_eq!(started, HashSet::from([b, c]));
        let (_, kept) = StartLog::open(dir).unwrap();
        assert_eq!(kept, started, "kept until cleared");
        log.clear().unwrap();
        let (_, again) = StartLog::open(dir).unwrap();
        assert!(again.is_empty(), "cleared");
    }
}
