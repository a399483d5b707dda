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
                crate::process::panic_message(info.payload())
            );
        }));
    }
}
