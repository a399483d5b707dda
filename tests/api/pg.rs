//! A real PostgreSQL server for the tests that need one: Debian's server binaries, a throwaway
//! cluster in a temporary directory on a free port, started once per test process (as the
//! `postgres` user when the tests run as root), stopped when the process exits; each test gets a
//! database of its own.

use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A cluster: the one shared by this test process ([`Postgres::get`]), or one of a test's own
/// ([`Postgres::own`], which it may stop and start again).
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    /// The server of an own cluster (a shared one lives in a thread of its own).
    child: std::sync::Mutex<Option<std::process::Child>>,
}

/// The server binaries (`initdb`, `postgres`) of the newest installed PostgreSQL.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server is installed (scripts/test.sh installs it: apt-get install postgresql)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server under /usr/lib/postgresql/*/bin")
}

/// Runs as the `postgres` user when the tests run as root (the server refuses to run as root).
fn as_server_user(command: &mut Command) -> &mut Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let (uid, gid) = postgres_ids();
        command.uid(uid).gid(gid);
    }
    command
}

fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd.lines().find(|l| l.starts_with("postgres:")).expect("a postgres user (the package creates it)");
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// The process's cluster, started on first use.
    pub fn get() -> &'static Postgres {
        static CLUSTER: OnceLock<Postgres> = OnceLock::new();
        CLUSTER.get_or_init(Postgres::start)
    }

    fn start() -> Postgres {
        let (dir, port) = Self::init();
        let server_dir = dir.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // A thread of its own spawns the server and lives as long as the process: the server is
        // told to quit (SIGQUIT, an immediate shutdown) when the thread that spawned it ends.
        std::thread::spawn(move || {
            let mut child = server(&server_dir, port).spawn().expect("start postgres");
            tx.send(()).unwrap();
            let _ = child.wait();
        });
        rx.recv().unwrap();
        let cluster = Postgres { port, dir, child: std::sync::Mutex::new(None) };
        cluster.wait_listening();
        cluster
    }

    /// A cluster of the calling test alone (stopped when the test's thread ends).
    pub fn own() -> Postgres {
        let (dir, port) = Self::init();
        let cluster = Postgres { port, dir, child: std::sync::Mutex::new(None) };
        cluster.start_again();
        cluster
    }

    /// Stops an own cluster at once (as a crash or a lost host would).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // SAFETY: kill with a valid pid and signal.
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let _ = child.wait();
        }
    }

    /// Freezes an own cluster (SIGSTOP to the server and every process it started), as a stuck
    /// host or a long pause would: connections stay open, nothing answers. It goes on when the
    /// guard is dropped (a failing test included).
    pub fn freeze(&self) -> Frozen<'_> {
        for pid in self.processes() {
            // SAFETY: kill with a pid of the cluster and a valid signal.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Frozen(self)
    }

    /// Kills every process of a frozen own cluster but its server (SIGKILL): once thawed, the
    /// server sees its children die, ends every connection and restarts them (as after a crash
    /// of one backend), so a statement a client sent meanwhile gets no answer.
    pub fn kill_backends(&self, _frozen: &Frozen<'_>) {
        for pid in self.processes().into_iter().skip(1) {
            // SAFETY: kill with a pid of the cluster and a valid signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Lets a frozen own cluster go on (SIGCONT).
    fn thaw(&self) {
        for pid in self.processes().into_iter().rev() {
            // SAFETY: as in `freeze`.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }

    /// The server of an own cluster first, then the processes it started (from `/proc`).
    fn processes(&self) -> Vec<i32> {
        let server = self.child.lock().unwrap().as_ref().expect("an own, running cluster").id() as i32;
        let mut pids = vec![server];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // pid (comm) state ppid ...: the command may hold spaces, the fields after ')' do not.
            let parent =
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if parent == Some(server) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Starts an own cluster again, on the same port and data.
    pub fn start_again(&self) {
        let child = server(&self.dir, self.port).spawn().expect("start postgres");
        *self.child.lock().unwrap() = Some(child);
        self.wait_listening();
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not listen:\n{}", log(&self.dir));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new cluster directory, initialized; and a free port for it.
    fn init() -> (PathBuf, u16) {
        let bin = bin_dir();
        // Under the system temp directory (the server user must be able to reach it); clusters
        // of earlier test processes that are gone are removed.
        for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let gone = name
                .strip_prefix("offload-pg-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if gone {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = std::env::temp_dir().join(format!("offload-pg-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let (uid, gid) = postgres_ids();
            chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let init = as_server_user(Command::new(bin.join("initdb")).arg("-D").arg(dir.join("data")))
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        (dir, free_port())
    }

    /// A URL of a new, empty database of this cluster.
    pub async fn fresh_database(&self) -> String {
        let name = format!("t_{:032x}", rand::random::<u128>());
        let admin = self.connect(&self.url("postgres")).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create a database");
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A client of `url`, its connection driven on the current runtime.
    pub async fn connect(&self, url: &str) -> tokio_postgres::Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    actix_rt::spawn(async move {
                        let _ = connection.await;
                    });
                    return client;
                }
                // The server accepts TCP a moment before it accepts sessions.
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    actix_rt::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("connect to {url}: {e}"),
            }
        }
    }
}

/// The server command of the cluster in `dir`: told to quit (SIGQUIT) when the thread that
/// spawns it ends.
fn server(dir: &Path, port: u16) -> Command {
    let mut command = Command::new(bin_dir().join("postgres"));
    command
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .args(["-c", "max_connections=300", "-c", "shared_buffers=64MB"])
        .arg("-k")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("log")).unwrap()));
    as_server_user(&mut command);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong);
            Ok(())
        });
    }
    command
}

/// An own cluster frozen by [`Postgres::freeze`], until dropped.
pub struct Frozen<'a>(&'a Postgres);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0.thaw();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("log")).unwrap_or_default()
}
