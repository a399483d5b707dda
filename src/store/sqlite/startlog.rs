//! [`StartLog`]: which job, and which attempt of it, each worker thread started last, written where
//! a crash of the process cannot lose it (the page cache: a plain `pwrite`, no fsync, a few
//! microseconds).
//!
//! Why: an attempt must be counted before a job can take the process down (else a poison job
//! crash-loops the service), but only jobs that really started count as attempts. Neither the
//! claim nor the start is written to the database (two writes per job nobody needs to wait
//! for: the final write records both). At recovery, a job that is not finished on disk takes the
//! attempt its slot names if the database has not counted that attempt yet. (An OS crash may lose
//! the log; then such a job runs again with its attempt not counted, which is the safe side for a
//! job that did not crash anything.)
//!
//! The attempt is what makes recovery count a run once, whatever happened after it:
//! - a job released by a shutdown (a deploy) was written with its attempt counted, so its slot,
//!   still naming it when the next process opens the log, adds nothing;
//! - a recovery killed after its commit but before the log is cleared finds its own commit on
//!   disk at the next start, and adds nothing again.
//!
//! Slots are 24 bytes: the id (16), the attempt (u32, little-endian), 4 bytes of zeros. The
//! log of releases before this format (`started`, 16-byte slots without the attempt) is read once,
//! as it was meant (one more attempt for a job not finished), and removed.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::job::JobId;

/// The log's file name in the data directory.
const FILE: &str = "starts";
/// The log of older releases (ids only); read once, then removed.
const LEGACY_FILE: &str = "started";
const SLOT_BYTES: u64 = 24;
const LEGACY_SLOT_BYTES: usize = 16;

/// A run the last process started: the attempt it ran as. `None`: noted by an older release,
/// which did not write the attempt (recovery counts one more, as that release did).
pub type Starts = HashMap<JobId, Option<u32>>;

pub struct StartLog {
    file: File,
    /// The older release's log, removed once the recovery that read it committed.
    legacy: Option<PathBuf>,
    /// Next free slot (one per worker thread).
    next_slot: AtomicU64,
}

thread_local! {
    /// This thread's slot, once it has started a job.
    static SLOT: Cell<Option<u64>> = const { Cell::new(None) };
}

impl StartLog {
    /// Opens the log in `dir` and returns it with the runs the last process had started; call
    /// [`StartLog::clear`] once they are accounted for (recovery committed). Reading it again
    /// before the clear gives the same runs, and recovery counts each run once however many
    /// times it reads them.
    pub fn open(dir: &Path) -> std::io::Result<(Arc<Self>, Starts)> {
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(dir.join(FILE))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes)?;
        let mut starts = Starts::new();
        for slot in bytes.chunks_exact(SLOT_BYTES as usize) {
            let id: [u8; 16] = slot[..16].try_into().expect("16 bytes");
            if id.iter().any(|b| *b != 0) {
                let attempt = Some(u32::from_le_bytes(slot[16..20].try_into().expect("4 bytes")));
                // Two slots may name one job (a clear that failed left an older run's slot): the
                // later attempt is the one that may not be counted yet.
                let entry = starts.entry(JobId::from_bytes(id)).or_insert(attempt);
                *entry = (*entry).max(attempt);
            }
        }
        let legacy_path = dir.join(LEGACY_FILE);
        let legacy = match std::fs::read(&legacy_path) {
            Ok(old) => {
                for slot in old.chunks_exact(LEGACY_SLOT_BYTES) {
                    if slot.iter().any(|b| *b != 0) {
                        let id = JobId::from_bytes(slot.try_into().expect("16 bytes"));
                        starts.entry(id).or_insert(None);
                    }
                }
                Some(legacy_path)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok((Arc::new(StartLog { file, legacy, next_slot: AtomicU64::new(0) }), starts))
    }

    /// Forgets what the last process started.
    pub fn clear(&self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        if let Some(path) = &self.legacy {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Notes that the calling thread starts attempt `attempt` of `id` now.
    pub fn mark(&self, id: JobId, attempt: u32) {
        let slot = SLOT.with(|s| match s.get() {
            Some(slot) => slot,
            None => {
                let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
                s.set(Some(slot));
                slot
            }
        });
        let mut bytes = [0u8; SLOT_BYTES as usize];
        bytes[..16].copy_from_slice(&id.to_bytes());
        bytes[16..20].copy_from_slice(&attempt.to_le_bytes());
        if let Err(e) = self.file.write_all_at(&bytes, slot * SLOT_BYTES) {
            tracing::warn!(job = %id, "cannot note the job's start: {e}");
        }
    }
}

/// The attempts a job not finished on disk has once the run the log names is counted: `None`
/// when that run is counted already (a release or an earlier recovery wrote it).
pub fn counted_attempts(on_disk: u32, logged: Option<u32>) -> Option<u32> {
    match logged {
        Some(attempt) if attempt > on_disk => Some(attempt),
        Some(_) => None,
        None => Some(on_disk + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runs_each_thread_started_last_are_read_back_until_cleared() {
        let tmp = tempfile::Builder::new().prefix("offload-startlog-").tempdir().unwrap();
        let dir = tmp.path();
        let (log, before) = StartLog::open(dir).unwrap();
        assert!(before.is_empty());
        log.clear().unwrap();
        let (a, b, c) = (JobId::random(), JobId::random(), JobId::random());
        log.mark(a, 1);
        log.mark(b, 3); // the same thread: replaces a
        let other = log.clone();
        std::thread::spawn(move || other.mark(c, 1)).join().unwrap();
        drop(log);
        let (log, started) = StartLog::open(dir).unwrap();
        assert_eq!(started, Starts::from([(b, Some(3)), (c, Some(1))]));
        let (_, kept) = StartLog::open(dir).unwrap();
        assert_eq!(kept, started, "kept until cleared");
        log.clear().unwrap();
        let (_, again) = StartLog::open(dir).unwrap();
        assert!(again.is_empty(), "cleared");
    }

    #[test]
    fn an_older_release_log_is_read_once_and_removed_with_the_clear() {
        let tmp = tempfile::Builder::new().prefix("offload-startlog-").tempdir().unwrap();
        let (old, new) = (JobId::random(), JobId::random());
        let mut legacy = old.to_bytes().to_vec();
        legacy.extend_from_slice(&[0; 16]); // an unused slot
        std::fs::write(tmp.path().join(LEGACY_FILE), legacy).unwrap();
        let (log, started) = StartLog::open(tmp.path()).unwrap();
        assert_eq!(started, Starts::from([(old, None)]));
        log.mark(new, 2);
        let (_, both) = StartLog::open(tmp.path()).unwrap();
        assert_eq!(both, Starts::from([(old, None), (new, Some(2))]));
        log.clear().unwrap();
        assert!(!tmp.path().join(LEGACY_FILE).exists());
    }

    #[test]
    fn a_run_is_counted_once() {
        // (attempts on disk, the attempt logged) → attempts after recovery, if it changes.
        let cases = [
            (0, Some(1), Some(1)), // started, crashed: counted
            (1, Some(2), Some(2)), // its second run crashed: counted
            (1, Some(1), None),    // released by a deploy (written counted), or recovered already
            (2, Some(1), None),    // an older run's slot: nothing to add
            (0, None, Some(1)),    // an older release's log: one more, as it did
            (4, None, Some(5)),
        ];
        for (disk, logged, want) in cases {
            assert_eq!(counted_attempts(disk, logged), want, "disk {disk}, logged {logged:?}");
        }
    }
}
