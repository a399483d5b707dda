//! The real `offload` binary as a child process: start it on port 0 with its own data directory,
//! read the bound address from its log, stop it with SIGTERM or SIGKILL, wait for it to exit.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::TestApp;

/// A running `offload` process that said where it listens. Dropping it kills the process
/// (SIGKILL), so a failing test leaves nothing behind.
pub struct Process {
    pub app: TestApp,
    inner: Spawned,
}

/// A process that was started but may not be listening (yet, or ever). Dropping it kills the
/// process.
pub struct Spawned {
    child: Child,
    /// Every stdout (log) line not read yet.
    log: mpsc::Receiver<String>,
    /// Every line the process wrote, stdout and stderr, in arrival order.
    output: Arc<Mutex<Vec<String>>>,
}

/// How a [`Spawned`] process went: listening (with its address), or exited before it said so.
pub enum Outcome {
    Listening(Process),
    Exited { status: ExitStatus, output: String },
}

/// Starts `offload --bind 127.0.0.1:0 --data-dir DATA_DIR ARGS...` without waiting for it.
///
/// Workers use the normal scheduler: with `SCHED_IDLE` the test process's busy threads could
/// starve them and make deadlines flaky. Core dumps are off (a test may make the process abort).
pub fn spawn(data_dir: &Path, args: &[&str]) -> Spawned {
    spawn_with_env(data_dir, args, &[])
}

/// [`spawn`] with environment variables of its own (test hooks, `LD_PRELOAD`).
pub fn spawn_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Spawned {
    let mut command = Command::new(env!("CARGO_BIN_EXE_offload"));
    command.envs(env.iter().copied());
    launch(command, data_dir, args)
}

/// [`spawn`] in the working directory `cwd` (the test's own is the repository), without an
/// `OFFLOAD_STATIC_DIR` the test may have been given.
pub fn spawn_in(cwd: &Path, data_dir: &Path, args: &[&str]) -> Spawned {
    let mut command = Command::new(env!("CARGO_BIN_EXE_offload"));
    command.current_dir(cwd).env_remove("OFFLOAD_STATIC_DIR");
    launch(command, data_dir, args)
}

fn launch(mut command: Command, data_dir: &Path, args: &[&str]) -> Spawned {
    command
        .args(["--bind", "127.0.0.1:0", "--worker-sched", "normal"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    let mut child = command.spawn().expect("start offload");
    let output = Arc::new(Mutex::new(Vec::new()));
    let (tx, log) = mpsc::channel();
    forward(child.stdout.take().unwrap(), output.clone(), Some(tx));
    forward(child.stderr.take().unwrap(), output.clone(), None);
    Spawned { child, log, output }
}

/// Copies `stream` line by line into `output` (and `tx`), echoing it to the test's stderr.
fn forward(stream: impl Read + Send + 'static, output: Arc<Mutex<Vec<String>>>, tx: Option<mpsc::Sender<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[offload] {line}");
            output.lock().unwrap().push(line.clone());
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
}

/// Starts `offload` (see [`spawn`]) and waits for its `listening on` line; panics if it exits
/// first.
pub fn start(data_dir: &Path, args: &[&str]) -> Process {
    start_with_env(data_dir, args, &[])
}

/// [`start`], with these environment variables set too.
pub fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Process {
    listening(spawn_with_env(data_dir, args, env))
}

/// Waits for `spawned` to listen (see [`start`]).
pub fn listening(spawned: Spawned) -> Process {
    match spawned.wait_listening(Duration::from_secs(20)) {
        Outcome::Listening(p) => p,
        Outcome::Exited { status, output } => panic!("offload exited ({status}) before listening:\n{output}"),
    }
}

impl Spawned {
    /// Waits up to `within` for the `listening on` line, or for the process to exit.
    pub fn wait_listening(mut self, within: Duration) -> Outcome {
        let deadline = Instant::now() + within;
        let addr = loop {
            match self.log.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        break rest.chars().take_while(|c| !c.is_whitespace()).collect::<String>();
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Stdout closed: the process is exiting; try_wait below sees it.
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(5)),
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return Outcome::Exited { status, output: self.output_after_exit() };
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("no `listening on` log line within {within:?}:\n{}", self.output_text());
            }
        };
        let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
        let app = TestApp { address: format!("http://{addr}"), client };
        Outcome::Listening(Process { app, inner: self })
    }

    fn output_text(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// The whole output once the process has exited (the reader threads get a moment to drain
    /// the pipes).
    fn output_after_exit(&self) -> String {
        drain(&self.output)
    }
}

fn drain(output: &Arc<Mutex<Vec<String>>>) -> String {
    // The reader threads hold the only other references; they drop them at end of stream.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Arc::strong_count(output) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    output.lock().unwrap().join("\n")
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// The process id (for reading `/proc/PID/...`).
    pub fn pid(&self) -> u32 {
        self.inner.child.id()
    }

    /// A memory figure of the process from `/proc/PID/status`, in bytes: `VmRSS` (resident now)
    /// or `VmHWM` (the peak resident size so far).
    pub fn memory(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read /proc/PID/status");
        let line = status
            .lines()
            .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
            .unwrap_or_else(|| panic!("no {field}:\n{status}"));
        let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"));
        kib * 1024
    }

    /// Freezes the process (SIGSTOP), as a long GC pause or a partition would.
    pub fn sigstop(&self) {
        signal(&self.inner.child, libc::SIGSTOP);
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn sigcont(&self) {
        signal(&self.inner.child, libc::SIGCONT);
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        signal(&self.inner.child, libc::SIGTERM);
    }

    /// `kill -9`: SIGKILL, then reaps the process. Panics if it had already exited on its own.
    pub fn kill9(&mut self) {
        if let Some(status) = self.inner.child.try_wait().unwrap() {
            panic!("offload had already exited ({status}) before kill -9:\n{}", self.output());
        }
        signal(&self.inner.child, libc::SIGKILL);
        let status = self.inner.child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }

    /// Waits up to `within` for the process to exit; kills it and panics if it does not.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        wait_exit(&mut self.inner.child, within).await
    }

    /// The stdout (log) lines written after the `listening on` line and not taken before.
    pub fn take_log(&self) -> Vec<String> {
        self.inner.log.try_iter().collect()
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.inner.output_text()
    }

    /// Everything the process wrote, once it has exited.
    pub fn output_after_exit(&self) -> String {
        self.inner.output_after_exit()
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: a plain syscall on our own child, which is not reaped yet (so the pid is still ours).
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
}

/// Polls `child` until it exits; kills it and panics after `within`.
pub async fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("offload did not exit within {within:?}");
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}
