//! Logging: a `tracing` subscriber, readable by default and JSON on request, plus a panic hook
//! that routes panic messages (including those caught at a job's panic boundary) into the log.

use tracing_subscriber::EnvFilter;

use crate::configuration::LogFormat;

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level.
/// Calling it twice (as tests may) leaves the first subscriber in place.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok() {
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            tracing::error!(
                thread = thread.name().unwrap_or("unnamed"),
                location = info.location().map(|l| l.to_string()).unwrap_or_default(),
                "panic: {}",
                crate::workers::panic_message(info.payload())
            );
        }));
    }
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
