//! Every setting of the service, as a command-line flag and an `OFFLOAD_*` environment variable.
//!
//! `offload --help` lists them all with their defaults, a section per concern: [`Settings`] is
//! made of one group struct per section (`settings.server`, `settings.store`, …), each flattened
//! into the command line, so a flag's name does not show its group. Limits are configuration with
//! safe defaults; nothing here is read from anywhere else.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

pub use crate::process::WorkerSched;

/// Where jobs are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// An embedded SQLite database in `--data-dir`: accepted jobs, uploads, results and owed
    /// webhooks survive crashes, restarts and deploys.
    Sqlite,
    /// Process memory: nothing survives the process (throwaway runs, benchmarks).
    Memory,
    /// A PostgreSQL database (`--database-url`) shared by several instances: one service.
    Postgres,
}

pub use crate::store::SyncMode;

/// A setting that must never be printed (API keys): parsing never fails, so an error message
/// cannot echo it, and `Debug` shows nothing of it. It is checked where it is used.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// All settings, in groups; each group is a section of `offload --help`. Field docs double as
/// `--help` text.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "offload",
    version,
    about = "Take heavy work off the request path: PDF and image jobs behind an HTTP API"
)]
pub struct Settings {
    /// Probe `GET /healthz` on the bind address and exit 0 if healthy, 1 if not (for containers).
    #[arg(long)]
    pub healthcheck: bool,

    #[command(flatten)]
    pub server: ServerSettings,

    #[command(flatten)]
    pub workers: WorkerSettings,

    #[command(flatten)]
    pub admission: AdmissionSettings,

    #[command(flatten)]
    pub store: StoreSettings,

    #[command(flatten)]
    pub pdf: PdfSettings,

    #[command(flatten)]
    pub images: ImageSettings,

    #[command(flatten)]
    pub webhooks: WebhooksSettings,

    #[command(flatten)]
    pub access: AccessSettings,

    #[command(flatten)]
    pub ws: WebSocketSettings,

    #[command(flatten)]
    pub analytics: AnalyticsSettings,

    #[command(flatten)]
    pub analytics_sink: AnalyticsSinkSettings,
}

/// The HTTP server: where it listens, its threads, request bodies, the page and the logs.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Server")]
pub struct ServerSettings {
    /// Address to listen on; port 0 picks a free port (the bound address is logged).
    #[arg(long, env = "OFFLOAD_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// HTTP worker threads (default: number of cores).
    #[arg(long, env = "OFFLOAD_HTTP_WORKERS")]
    pub http_workers: Option<usize>,

    /// Largest JSON request body (counted after decompression).
    #[arg(long, env = "OFFLOAD_MAX_JSON_BODY", default_value = "8MiB")]
    pub max_json_body: ByteSize,

    /// Memory all request bodies being received may hold together (each counted by its
    /// `Content-Length`, a chunked one as its route's largest body, from its head until its
    /// answer); a request that does not fit gets 503 with `Retry-After` before its body is read.
    #[arg(long, env = "OFFLOAD_MAX_BODY_MEMORY", default_value = "256MiB")]
    pub max_body_memory: ByteSize,

    /// Every request body (JSON or multipart) must arrive within this, else 408 `request_timeout`.
    #[arg(long, visible_alias = "upload-timeout", env = "OFFLOAD_BODY_TIMEOUT", default_value = "60s")]
    pub body_timeout: humantime::Duration,

    /// Serve the browser page at `/` from this directory instead of the copy of `static/` built
    /// into the binary (to work on the page without rebuilding).
    #[arg(long, env = "OFFLOAD_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "OFFLOAD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The worker pools that run jobs: their threads, how they are scheduled, how long a job may run.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Workers")]
pub struct WorkerSettings {
    /// PDF worker threads in the PDF pool (default: number of cores). With `--store postgres`, 0
    /// makes an instance that accepts and serves PDF jobs and leaves running them to others.
    #[arg(long, env = "OFFLOAD_PDF_WORKERS")]
    pub pdf_workers: Option<usize>,

    /// Image worker threads in the image pool (default: number of cores; 0 as for PDFs).
    #[arg(long, env = "OFFLOAD_IMAGE_WORKERS")]
    pub image_workers: Option<usize>,

    /// How much lower worker threads' scheduling priority is than the HTTP threads' (Linux nice
    /// value, 0 to 19; 0 keeps them equal). Keeps the API responsive while workers fill every core.
    #[arg(long, env = "OFFLOAD_WORKER_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub worker_nice: i32,

    /// Scheduling class of worker threads: `idle` (Linux `SCHED_IDLE`: any HTTP thread that wakes
    /// up runs first) or `normal` (nice `--worker-nice`, which keeps workers a share of the CPU
    /// beside other busy programs on the host).
    #[arg(long, env = "OFFLOAD_WORKER_SCHED", value_enum, default_value_t = WorkerSched::Idle)]
    pub worker_sched: WorkerSched,

    /// A job still running after this long fails with code `timeout` (e.g. 90s, 5m).
    #[arg(long, env = "OFFLOAD_JOB_TIMEOUT", default_value = "5m")]
    pub job_timeout: humantime::Duration,

    /// On SIGTERM/SIGINT, how long running and queued jobs get to finish before they are stopped.
    #[arg(long, env = "OFFLOAD_SHUTDOWN_GRACE", default_value = "30s")]
    pub shutdown_grace: humantime::Duration,
}

/// How much work is accepted before submissions get 503.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Admission")]
pub struct AdmissionSettings {
    /// Most jobs a pool holds at once, queued plus running; beyond it submissions get 503.
    #[arg(long, env = "OFFLOAD_MAX_PENDING", default_value_t = 1024)]
    pub max_pending: usize,

    /// With `--api-keys`: most jobs of one key, queued plus running (all pools together); past
    /// it that key's submissions get 503 while other keys' still go in. Off by default. On
    /// PostgreSQL it counts the key's jobs on every instance.
    #[arg(long, env = "OFFLOAD_MAX_PENDING_PER_KEY", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_per_key: Option<u32>,

    /// Most request bytes held by queued jobs across all pools; beyond it submissions get 503.
    #[arg(long, env = "OFFLOAD_MAX_QUEUED_BYTES", default_value = "128MiB")]
    pub max_queued_bytes: ByteSize,
}

/// Where jobs, payloads, results and owed webhooks are kept, and for how long.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Store")]
pub struct StoreSettings {
    /// Where jobs, payloads, results and owed webhooks are kept.
    #[arg(long, env = "OFFLOAD_STORE", value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,

    /// The embedded store's directory (created if missing); one process at a time may use it.
    #[arg(long, env = "OFFLOAD_DATA_DIR", default_value = "offload-data")]
    pub data_dir: PathBuf,

    /// Embedded store: `full` fsyncs every commit before answering (an accepted job survives an
    /// OS crash or power loss); `normal` survives a crash of the process only, and is faster.
    #[arg(long, env = "OFFLOAD_SYNC", value_enum, default_value_t = SyncMode::Full)]
    pub sync: SyncMode,

    /// A job started this many times without finishing (each run cut off by a crash) ends
    /// `failed` with code `worker_lost`, so a job that crashes the process cannot crash-loop it.
    #[arg(long, env = "OFFLOAD_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// Finished jobs and their results are forgotten this long after they finish.
    #[arg(long, env = "OFFLOAD_RESULT_TTL", default_value = "1h")]
    pub result_ttl: humantime::Duration,

    /// Durable stores: most result bytes kept (on disk; with PostgreSQL, in the database for all
    /// instances together); a larger result fails its job, and past it the oldest finished jobs
    /// go first.
    #[arg(long, env = "OFFLOAD_RESULT_DISK", default_value = "4GiB")]
    pub result_disk: ByteSize,

    /// Most result bytes kept in memory; past it the oldest finished jobs expire early.
    #[arg(long, env = "OFFLOAD_RESULT_MEMORY", default_value = "256MiB")]
    pub result_memory: ByteSize,

    /// Most finished jobs remembered; past it the oldest expire early.
    #[arg(long, env = "OFFLOAD_MAX_FINISHED_JOBS", default_value_t = 100_000)]
    pub max_finished_jobs: usize,

    /// `--store postgres`: the database, e.g. `postgres://user:pass@host:5432/offload` (falls
    /// back to `DATABASE_URL`).
    #[arg(long, env = "OFFLOAD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,

    /// `--store postgres`: how long an instance holds a job without renewing its lease (renewed
    /// every third of it); past it another instance runs the job again.
    #[arg(long, env = "OFFLOAD_LEASE", default_value = "30s")]
    pub lease: humantime::Duration,

    /// `--store postgres`: connections each instance keeps to the database (at least 2: half
    /// carry single statements pipelined, half transactions), besides one that listens.
    #[arg(long, env = "OFFLOAD_DB_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=256))]
    pub db_connections: u16,
}

/// Limits of one PDF document: its table and what it may render to.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "PDF documents")]
pub struct PdfSettings {
    /// Most table rows in one PDF document.
    #[arg(long, env = "OFFLOAD_MAX_ROWS", default_value_t = 100_000)]
    pub max_rows: usize,

    /// Most table columns in one PDF document.
    #[arg(long, env = "OFFLOAD_MAX_COLUMNS", default_value_t = 50)]
    pub max_columns: usize,

    /// Most characters in one table cell (also the limit for a column header).
    #[arg(long, env = "OFFLOAD_MAX_CELL_CHARS", default_value_t = 1000)]
    pub max_cell_chars: usize,

    /// Most pages one PDF may render to. A PDF job's memory grows with what it renders (every
    /// page and line is kept until the file is written), so this and `--max-pdf-lines` bound it.
    /// A document that must be longer is refused at submit (422 `document_too_large`); one that
    /// turns out longer once laid out fails with the same code.
    #[arg(long, env = "OFFLOAD_MAX_PDF_PAGES", default_value_t = 1000)]
    pub max_pdf_pages: usize,

    /// Most lines of text one PDF may render (every line of every cell, header cell and
    /// paragraph): see `--max-pdf-pages`.
    #[arg(long, env = "OFFLOAD_MAX_PDF_LINES", default_value_t = 200_000)]
    pub max_pdf_lines: usize,
}

/// Limits of one image upload and of every image in it.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Images")]
pub struct ImageSettings {
    /// Largest `POST /images` body, enforced while it streams in.
    #[arg(long, env = "OFFLOAD_MAX_UPLOAD", default_value = "64MiB")]
    pub max_upload: ByteSize,

    /// Most files in one upload.
    #[arg(long, env = "OFFLOAD_MAX_FILES", default_value_t = 100)]
    pub max_files: usize,

    /// Most pixels of an image: input, output and every step between.
    #[arg(long, env = "OFFLOAD_MAX_PIXELS", default_value_t = 50_000_000)]
    pub max_pixels: u64,

    /// Most scans in a JPEG upload. A progressive JPEG has one scan per pass (typically 10-20);
    /// each scan is another pass of the decoder over the whole image, so thousands of tiny scans
    /// would be a small file that costs minutes of CPU inside one uninterruptible decode.
    #[arg(long, env = "OFFLOAD_MAX_JPEG_SCANS", default_value_t = 100)]
    pub max_jpeg_scans: usize,
}

/// Callbacks POSTed when a job finishes: signing, retries and how many at once.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Webhooks")]
pub struct WebhooksSettings {
    /// Webhooks: key for `X-Offload-Signature: sha256=<HMAC-SHA256 of the body>` (unsigned without).
    #[arg(long, env = "OFFLOAD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Webhooks, with `--api-keys`: `@path`, a file of `KEY SECRET` lines (a secret is 16 or more
    /// visible ASCII characters): these keys' webhooks are signed with their own secret instead
    /// of one derived from `--webhook-secret`.
    #[arg(long, env = "OFFLOAD_WEBHOOK_SECRETS", hide_env_values = true)]
    pub webhook_secrets: Option<Secret>,

    /// Webhooks: attempts per delivery.
    #[arg(long, env = "OFFLOAD_WEBHOOK_MAX_ATTEMPTS", default_value_t = 5)]
    pub webhook_max_attempts: u32,

    /// Webhooks: wait before the first retry; doubles each time (with jitter), at most 5 min.
    #[arg(long, env = "OFFLOAD_WEBHOOK_BACKOFF", default_value = "1s")]
    pub webhook_backoff: humantime::Duration,

    /// Webhooks: time allowed for one POST (connect, send, and the receiver's answer).
    #[arg(long, env = "OFFLOAD_WEBHOOK_TIMEOUT", default_value = "10s")]
    pub webhook_timeout: humantime::Duration,

    /// Webhooks: most deliveries in progress at once; the rest wait their turn.
    #[arg(long, env = "OFFLOAD_WEBHOOK_CONCURRENCY", default_value_t = 64)]
    pub webhook_concurrency: usize,

    /// Webhooks: most deliveries waiting or in progress; past it new ones are dropped (counted).
    #[arg(long, env = "OFFLOAD_WEBHOOK_QUEUE", default_value_t = 10_000)]
    pub webhook_queue: usize,

    /// Webhooks: allow callback URLs on loopback, private and link-local addresses.
    #[arg(long, env = "OFFLOAD_ALLOW_PRIVATE_WEBHOOKS")]
    pub allow_private_webhooks: bool,
}

/// Who may call the API.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Access")]
pub struct AccessSettings {
    /// API keys, `KEY[,KEY…]` or `@path` (a file, one key a line): every API route then needs
    /// `Authorization: Bearer KEY`, and each key sees only the jobs it submitted. Without keys
    /// the service is open. A key is 16–256 visible ASCII characters.
    #[arg(long, env = "OFFLOAD_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<Secret>,
}

/// The `/ws` endpoint that pushes job updates.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "WebSocket")]
pub struct WebSocketSettings {
    /// WebSocket: how often the server pings.
    #[arg(long, env = "OFFLOAD_WS_HEARTBEAT", default_value = "10s")]
    pub ws_heartbeat: humantime::Duration,

    /// WebSocket: a client silent (no frame, no pong) this long is dropped.
    #[arg(long, env = "OFFLOAD_WS_IDLE_TIMEOUT", default_value = "30s")]
    pub ws_idle_timeout: humantime::Duration,

    /// WebSocket: largest frame accepted from a client.
    #[arg(long, env = "OFFLOAD_WS_MAX_FRAME", default_value = "64KiB")]
    pub ws_max_frame: ByteSize,

    /// WebSocket: most jobs one connection may follow.
    #[arg(long, env = "OFFLOAD_WS_MAX_SUBSCRIPTIONS", default_value_t = 1000)]
    pub ws_max_subscriptions: usize,

    /// WebSocket: comma-separated `Origin` values allowed to connect (default: any).
    #[arg(long, env = "OFFLOAD_WS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub ws_allowed_origins: Option<Vec<String>>,
}

/// `POST /analytics/events`: what one request may carry and what is counted.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Analytics")]
pub struct AnalyticsSettings {
    /// Analytics: most events one `POST /analytics/events` may carry.
    #[arg(long, env = "OFFLOAD_ANALYTICS_MAX_BATCH", default_value_t = 1000)]
    pub analytics_max_batch: usize,

    /// Analytics: most events waiting to be counted; past it ingestion answers 503 (the hand-off
    /// from HTTP threads to the analytics actor never waits).
    #[arg(long, env = "OFFLOAD_ANALYTICS_QUEUE", default_value_t = 10_000)]
    pub analytics_queue: usize,

    /// Analytics: most bytes of events waiting to be counted (503 past it), whatever their number.
    #[arg(long, env = "OFFLOAD_ANALYTICS_QUEUE_BYTES", default_value = "64MiB")]
    pub analytics_queue_bytes: ByteSize,

    /// Analytics: largest `properties` of one event, as JSON (422 beyond).
    #[arg(long, env = "OFFLOAD_ANALYTICS_MAX_PROPERTIES", default_value = "16KiB")]
    pub analytics_max_properties: ByteSize,

    /// Analytics: most distinct event names counted one by one; the rest count under `(other)`.
    #[arg(long, env = "OFFLOAD_ANALYTICS_MAX_NAMES", default_value_t = 1000)]
    pub analytics_max_names: usize,

    /// Analytics: most minutes kept in `per_minute` (the oldest are forgotten first).
    #[arg(long, env = "OFFLOAD_ANALYTICS_MINUTES", default_value_t = 1440)]
    pub analytics_minutes: usize,
}

/// Forwarding analytics events to another service.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Analytics sink")]
pub struct AnalyticsSinkSettings {
    /// Analytics: forward every event to this URL, in batches (a JSON array per POST).
    #[arg(long, env = "OFFLOAD_ANALYTICS_SINK")]
    pub analytics_sink: Option<url::Url>,

    /// Analytics sink: most events in one POST.
    #[arg(long, env = "OFFLOAD_ANALYTICS_BATCH_SIZE", default_value_t = 500)]
    pub analytics_batch_size: usize,

    /// Analytics sink: a partial batch is sent after waiting this long.
    #[arg(long, env = "OFFLOAD_ANALYTICS_FLUSH_INTERVAL", default_value = "1s")]
    pub analytics_flush_interval: humantime::Duration,

    /// Analytics sink: most events held for forwarding; past it the oldest are dropped (counted).
    #[arg(long, env = "OFFLOAD_ANALYTICS_BUFFER", default_value_t = 20_000)]
    pub analytics_buffer: usize,

    /// Analytics sink: most bytes held for forwarding; past it the oldest are dropped (counted).
    #[arg(long, env = "OFFLOAD_ANALYTICS_BUFFER_BYTES", default_value = "64MiB")]
    pub analytics_buffer_bytes: ByteSize,

    /// Analytics sink: attempts per batch before it is dropped (counted).
    #[arg(long, env = "OFFLOAD_ANALYTICS_SINK_ATTEMPTS", default_value_t = 5)]
    pub analytics_sink_attempts: u32,

    /// Analytics sink: time allowed for one POST.
    #[arg(long, env = "OFFLOAD_ANALYTICS_SINK_TIMEOUT", default_value = "10s")]
    pub analytics_sink_timeout: humantime::Duration,

    /// Analytics sink: wait before the first retry; doubles each time (with jitter), at most 30 s.
    #[arg(long, env = "OFFLOAD_ANALYTICS_SINK_BACKOFF", default_value = "500ms")]
    pub analytics_sink_backoff: humantime::Duration,
}

impl Settings {
    /// Defaults as if started with no flags and no environment, for tests and embedding.
    pub fn defaults() -> Self {
        Settings::parse_from(["offload"])
    }

    /// Threads of the PDF pool: 0 (no PDF pool here) only with a shared store, where another
    /// instance runs the jobs.
    pub fn pdf_workers(&self) -> usize {
        self.workers.pool(self.workers.pdf_workers, self.store.store)
    }

    /// Threads of the image pool, as for [`Settings::pdf_workers`].
    pub fn image_workers(&self) -> usize {
        self.workers.pool(self.workers.image_workers, self.store.store)
    }
}

impl ServerSettings {
    pub fn body_timeout(&self) -> Duration {
        self.body_timeout.into()
    }

    pub fn http_workers(&self) -> usize {
        self.http_workers.unwrap_or_else(cores).max(1)
    }
}

impl WorkerSettings {
    fn pool(&self, set: Option<usize>, store: StoreKind) -> usize {
        match set {
            Some(0) if store == StoreKind::Postgres => 0,
            set => set.unwrap_or_else(cores).max(1),
        }
    }

    pub fn job_timeout(&self) -> Duration {
        self.job_timeout.into()
    }

    pub fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace.into()
    }
}

impl StoreSettings {
    /// `--database-url`, else `DATABASE_URL`.
    pub fn database_url(&self) -> Option<String> {
        self.database_url.as_ref().map(|s| s.expose().to_string()).or_else(|| std::env::var("DATABASE_URL").ok())
    }

    pub fn result_ttl(&self) -> Duration {
        self.result_ttl.into()
    }
}

impl PdfSettings {
    /// What one PDF may render to: (pages, lines of text), each at least 1.
    pub fn render_budget(&self) -> (usize, usize) {
        (self.max_pdf_pages.max(1), self.max_pdf_lines.max(1))
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A number of bytes, written as `1048576`, `512KiB`, `8MiB` or `1GiB` (`K`, `M`, `G`, `KB`…
/// are read as binary units too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size such as 8MiB"))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
        };
        n.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_with_binary_units() {
        let cases = [
            ("0", 0),
            ("1048576", 1 << 20),
            ("512KiB", 512 << 10),
            ("8MiB", 8 << 20),
            ("8M", 8 << 20),
            ("8mb", 8 << 20),
            ("1GiB", 1 << 30),
            (" 2 KiB ", 2 << 10),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(want)), "{text}");
        }
    }

    #[test]
    fn bad_byte_sizes_are_refused() {
        for text in ["", "MiB", "8 parsecs", "-1", "99999999999999999999GiB", "1.5MiB"] {
            assert!(text.parse::<ByteSize>().is_err(), "{text} should not parse");
        }
    }

    #[test]
    fn byte_sizes_print_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(8 << 20).to_string(), "8MiB");
        assert_eq!(ByteSize(1500).to_string(), "1500B");
    }

    #[test]
    fn defaults_parse() {
        let s = Settings::defaults();
        assert_eq!(s.server.bind.port(), 8080);
        assert_eq!(s.server.max_json_body.bytes(), 8 << 20);
        assert!(s.pdf_workers() >= 1);
    }

    #[test]
    fn flags_land_in_their_group() {
        let s = Settings::parse_from(["offload", "--store", "postgres", "--pdf-workers", "0", "--image-workers", "0"]);
        assert_eq!(s.store.store, StoreKind::Postgres);
        assert_eq!((s.pdf_workers(), s.image_workers()), (0, 0), "0 workers with a shared store");
        let s =
            Settings::parse_from(["offload", "--pdf-workers", "0", "--upload-timeout", "5s", "--max-pdf-pages", "0"]);
        assert_eq!(s.pdf_workers(), 1, "an instance with its own store runs its jobs");
        assert_eq!(s.server.body_timeout(), Duration::from_secs(5));
        assert_eq!(s.pdf.render_budget().0, 1);
        let refused = Settings::try_parse_from(["offload", "--db-connections", "1"]);
        assert!(refused.is_err(), "validation stays with the flag");
    }

    /// Every flag and environment variable as they were named when the settings were one flat
    /// struct: grouping them must not rename, add or drop any.
    const FLAGS: [(&str, Option<&str>); 65] = [
        ("bind", Some("OFFLOAD_BIND")),
        ("http-workers", Some("OFFLOAD_HTTP_WORKERS")),
        ("pdf-workers", Some("OFFLOAD_PDF_WORKERS")),
        ("image-workers", Some("OFFLOAD_IMAGE_WORKERS")),
        ("worker-nice", Some("OFFLOAD_WORKER_NICE")),
        ("worker-sched", Some("OFFLOAD_WORKER_SCHED")),
        ("max-pending", Some("OFFLOAD_MAX_PENDING")),
        ("max-pending-per-key", Some("OFFLOAD_MAX_PENDING_PER_KEY")),
        ("max-queued-bytes", Some("OFFLOAD_MAX_QUEUED_BYTES")),
        ("store", Some("OFFLOAD_STORE")),
        ("data-dir", Some("OFFLOAD_DATA_DIR")),
        ("sync", Some("OFFLOAD_SYNC")),
        ("max-attempts", Some("OFFLOAD_MAX_ATTEMPTS")),
        ("result-disk", Some("OFFLOAD_RESULT_DISK")),
        ("job-timeout", Some("OFFLOAD_JOB_TIMEOUT")),
        ("result-ttl", Some("OFFLOAD_RESULT_TTL")),
        ("result-memory", Some("OFFLOAD_RESULT_MEMORY")),
        ("max-finished-jobs", Some("OFFLOAD_MAX_FINISHED_JOBS")),
        ("shutdown-grace", Some("OFFLOAD_SHUTDOWN_GRACE")),
        ("max-json-body", Some("OFFLOAD_MAX_JSON_BODY")),
        ("max-rows", Some("OFFLOAD_MAX_ROWS")),
        ("max-columns", Some("OFFLOAD_MAX_COLUMNS")),
        ("max-cell-chars", Some("OFFLOAD_MAX_CELL_CHARS")),
        ("max-pdf-pages", Some("OFFLOAD_MAX_PDF_PAGES")),
        ("max-pdf-lines", Some("OFFLOAD_MAX_PDF_LINES")),
        ("max-body-memory", Some("OFFLOAD_MAX_BODY_MEMORY")),
        ("max-upload", Some("OFFLOAD_MAX_UPLOAD")),
        ("body-timeout", Some("OFFLOAD_BODY_TIMEOUT")),
        ("max-files", Some("OFFLOAD_MAX_FILES")),
        ("max-pixels", Some("OFFLOAD_MAX_PIXELS")),
        ("max-jpeg-scans", Some("OFFLOAD_MAX_JPEG_SCANS")),
        ("ws-heartbeat", Some("OFFLOAD_WS_HEARTBEAT")),
        ("ws-idle-timeout", Some("OFFLOAD_WS_IDLE_TIMEOUT")),
        ("ws-max-frame", Some("OFFLOAD_WS_MAX_FRAME")),
        ("ws-max-subscriptions", Some("OFFLOAD_WS_MAX_SUBSCRIPTIONS")),
        ("ws-allowed-origins", Some("OFFLOAD_WS_ALLOWED_ORIGINS")),
        ("analytics-max-batch", Some("OFFLOAD_ANALYTICS_MAX_BATCH")),
        ("analytics-queue", Some("OFFLOAD_ANALYTICS_QUEUE")),
        ("analytics-queue-bytes", Some("OFFLOAD_ANALYTICS_QUEUE_BYTES")),
        ("analytics-max-properties", Some("OFFLOAD_ANALYTICS_MAX_PROPERTIES")),
        ("analytics-max-names", Some("OFFLOAD_ANALYTICS_MAX_NAMES")),
        ("analytics-minutes", Some("OFFLOAD_ANALYTICS_MINUTES")),
        ("analytics-sink", Some("OFFLOAD_ANALYTICS_SINK")),
        ("analytics-batch-size", Some("OFFLOAD_ANALYTICS_BATCH_SIZE")),
        ("analytics-flush-interval", Some("OFFLOAD_ANALYTICS_FLUSH_INTERVAL")),
        ("analytics-buffer", Some("OFFLOAD_ANALYTICS_BUFFER")),
        ("analytics-buffer-bytes", Some("OFFLOAD_ANALYTICS_BUFFER_BYTES")),
        ("analytics-sink-attempts", Some("OFFLOAD_ANALYTICS_SINK_ATTEMPTS")),
        ("analytics-sink-timeout", Some("OFFLOAD_ANALYTICS_SINK_TIMEOUT")),
        ("analytics-sink-backoff", Some("OFFLOAD_ANALYTICS_SINK_BACKOFF")),
        ("webhook-secret", Some("OFFLOAD_WEBHOOK_SECRET")),
        ("webhook-secrets", Some("OFFLOAD_WEBHOOK_SECRETS")),
        ("webhook-max-attempts", Some("OFFLOAD_WEBHOOK_MAX_ATTEMPTS")),
        ("webhook-backoff", Some("OFFLOAD_WEBHOOK_BACKOFF")),
        ("webhook-timeout", Some("OFFLOAD_WEBHOOK_TIMEOUT")),
        ("webhook-concurrency", Some("OFFLOAD_WEBHOOK_CONCURRENCY")),
        ("webhook-queue", Some("OFFLOAD_WEBHOOK_QUEUE")),
        ("allow-private-webhooks", Some("OFFLOAD_ALLOW_PRIVATE_WEBHOOKS")),
        ("database-url", Some("OFFLOAD_DATABASE_URL")),
        ("lease", Some("OFFLOAD_LEASE")),
        ("db-connections", Some("OFFLOAD_DB_CONNECTIONS")),
        ("api-keys", Some("OFFLOAD_API_KEYS")),
        ("static-dir", Some("OFFLOAD_STATIC_DIR")),
        ("healthcheck", None),
        ("log-format", Some("OFFLOAD_LOG_FORMAT")),
    ];

    /// `(long flag, env)` of every argument of `command`, walking flattened groups and subcommands.
    fn flags_of(command: &clap::Command, into: &mut Vec<(String, Option<String>)>) {
        for arg in command.get_arguments() {
            if let Some(long) = arg.get_long() {
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                into.push((long.to_string(), env));
            }
        }
        for sub in command.get_subcommands() {
            flags_of(sub, into);
        }
    }

    #[test]
    fn every_flag_and_env_keeps_its_name() {
        use clap::CommandFactory;
        let mut got = Vec::new();
        flags_of(&Settings::command(), &mut got);
        got.retain(|(long, _)| long != "help" && long != "version");
        got.sort();
        let mut want: Vec<(String, Option<String>)> =
            FLAGS.iter().map(|(l, e)| (l.to_string(), e.map(str::to_string))).collect();
        want.sort();
        let missing: Vec<_> = want.iter().filter(|w| !got.contains(w)).collect();
        let extra: Vec<_> = got.iter().filter(|g| !want.contains(g)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "missing: {missing:?}\nextra: {extra:?}");
        assert_eq!(got.len(), want.len(), "a flag appears twice");
        let command = Settings::command();
        let body_timeout = command.get_arguments().find(|a| a.get_long() == Some("body-timeout"));
        let aliases = body_timeout.expect("--body-timeout").get_visible_aliases().unwrap_or_default();
        assert_eq!(aliases, ["upload-timeout"]);
    }

    #[test]
    fn every_setting_is_in_a_section_of_help() {
        use clap::CommandFactory;
        let command = Settings::command();
        let loose: Vec<_> =
            command.get_arguments().filter(|a| a.get_help_heading().is_none()).filter_map(|a| a.get_long()).collect();
        assert_eq!(loose, ["healthcheck"], "settings outside a group");
        let help = Settings::command().render_help().to_string();
        for heading in ["Server:", "Workers:", "Store:", "PDF documents:", "WebSocket:", "Analytics sink:"] {
            assert!(help.lines().any(|l| l == heading), "no {heading} section in\n{help}");
        }
    }
}
