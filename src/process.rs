//! Process- and thread-level settings that need the OS (the crate's `unsafe` lives here): thread
//! names, worker thread priorities, transparent huge pages; and the text of a panic payload.

/// How worker threads are scheduled against the HTTP and event-loop threads (Linux).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerSched {
    /// `SCHED_IDLE`: workers get a core only when no normal thread wants it, so a request that
    /// arrives preempts them at once. For a host (or container) that runs offload alone.
    Idle,
    /// The normal scheduler with `--worker-nice`: workers keep a small share of the CPU even
    /// when other programs on the host keep every core busy.
    Normal,
}

/// Names the current thread (Linux: at most 15 bytes are kept) so that `top -H`, `perf` and
/// `/proc/<pid>/task/*/comm` tell the HTTP workers, the Dispatcher, the async I/O arbiter and the
/// job workers apart (actix names all its event-loop threads alike).
pub fn name_thread(name: &std::ffi::CStr) {
    #[cfg(target_os = "linux")]
    // SAFETY: a NUL-terminated string that outlives the call.
    unsafe {
        libc::prctl(
            libc::PR_SET_NAME,
            name.as_ptr() as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = name;
}

#[cfg(target_os = "linux")]
pub fn lower_priority(nice: i32, sched: WorkerSched) {
    let warn = |what: &str, err: std::io::Error| {
        tracing::warn!(nice, ?sched, "could not lower the worker thread's {what}: {err}")
    };
    // SAFETY: plain system calls on the current thread; `param` outlives the call.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if nice > 0 && libc::setpriority(libc::PRIO_PROCESS, tid, nice.min(19)) != 0 {
            warn("nice value", std::io::Error::last_os_error());
        }
        let param = libc::sched_param { sched_priority: 0 };
        if sched == WorkerSched::Idle && libc::sched_setscheduler(tid as libc::pid_t, libc::SCHED_IDLE, &param) != 0 {
            warn("scheduling class", std::io::Error::last_os_error());
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn lower_priority(_nice: i32, _sched: WorkerSched) {}

/// Turns transparent huge pages off for this process. mimalloc asks for them on its arenas, so
/// every touched 2 MiB region became resident: a 500-job PDF batch peaked at ~60 MiB RSS instead
/// of ~22 MiB, with no measurable gain in speed. Call first thing in `main`; it also covers
/// memory mapped before the call (the flag is checked when a page is faulted in).
pub fn disable_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments only (unsigned long, as the kernel reads them); it
    // changes a flag of this process.
    unsafe {
        if libc::prctl(
            libc::PR_SET_THP_DISABLE,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) != 0
        {
            eprintln!("could not turn transparent huge pages off: {}", std::io::Error::last_os_error());
        }
    }
}

/// The text of a panic payload, when it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("unknown panic")
}

/// Takes an exclusive advisory lock (`flock`) on `file` without waiting: `Ok(false)` when another
/// process holds it. The lock lasts as long as the file stays open (and ends with the process,
/// however it ends, so a `kill -9` never leaves a stale lock behind).
pub fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this `File` owns for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(err)
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(true)
    }
}
