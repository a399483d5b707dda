//! This instance's wall clock, as it dates jobs (created, started, finished) and as the
//! retention sweep asks for the time. Test builds (`test-hooks`) can put it off, to play an
//! instance whose clock is wrong: `OFFLOAD_TEST_CLOCK_OFFSET` shifts it (a humantime duration,
//! `-` in front for a clock behind), and `OFFLOAD_TEST_SWEEP_EVERY` sets how often the sweep runs.

use std::time::{Duration, SystemTime};

/// The time now, as this instance dates jobs.
pub fn now() -> SystemTime {
    #[cfg(feature = "test-hooks")]
    {
        hooks::shifted(SystemTime::now())
    }
    #[cfg(not(feature = "test-hooks"))]
    SystemTime::now()
}

/// How often the retention sweep runs: `usual`, unless a test says otherwise.
pub fn sweep_every(usual: Duration) -> Duration {
    #[cfg(feature = "test-hooks")]
    if let Some(every) = hooks::duration("OFFLOAD_TEST_SWEEP_EVERY") {
        return every;
    }
    usual
}

#[cfg(feature = "test-hooks")]
mod hooks {
    use std::sync::OnceLock;
    use std::time::{Duration, SystemTime};

    pub fn duration(var: &str) -> Option<Duration> {
        humantime::parse_duration(std::env::var(var).ok()?.trim()).ok()
    }

    pub fn shifted(now: SystemTime) -> SystemTime {
        // (ahead, by how much), read once.
        static OFFSET: OnceLock<(bool, Duration)> = OnceLock::new();
        let (ahead, by) = *OFFSET.get_or_init(|| {
            let raw = std::env::var("OFFLOAD_TEST_CLOCK_OFFSET").unwrap_or_default();
            let raw = raw.trim();
            let (ahead, text) = match raw.strip_prefix('-') {
                Some(rest) => (false, rest),
                None => (true, raw.strip_prefix('+').unwrap_or(raw)),
            };
            (ahead, humantime::parse_duration(text).unwrap_or_default())
        });
        if ahead {
            now + by
        } else {
            now.checked_sub(by).unwrap_or(SystemTime::UNIX_EPOCH)
        }
    }
}
