//! The job model: identifiers, kinds, statuses and the state machine every job follows.
//!
//! All transitions go through [`Job`]'s methods so the rules hold in one place: terminal states
//! never change, progress never decreases and is 1.0 exactly when a job succeeds.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::domain::callback::CallbackUrl;
use crate::error::ErrorBody;

/// An opaque job identifier: 128 random bits from the OS-seeded CSPRNG, as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(u128);

impl JobId {
    pub fn random() -> Self {
        JobId(rand::random())
    }

    /// The id as 16 big-endian bytes (how stores keep it).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        JobId(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for JobId {
    type Err = ();

    /// Only the exact form we hand out parses, so ids never alias each other.
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            u128::from_str_radix(s, 16).map(JobId).map_err(|_| ())
        } else {
            Err(())
        }
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Who submitted a job when the service runs with API keys: a digest of the key (never the key
/// itself, so a copy of the database gives no access). Jobs of one owner are invisible to others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner([u8; 16]);

impl Owner {
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Owner(bytes)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// What a job does: the name of its kind (`"pdf"`, `"image"`, or a kind of the operator's own),
/// interned so that copying and comparing cost nothing. The engine knows kinds only by name (see
/// [`crate::kind`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKind(&'static str);

/// Every kind name seen by this process: registered at start or read from stored jobs (never
/// from a client's request, so the set stays as small as the kinds that exist).
static KINDS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

impl JobKind {
    /// The kind named `name` (registered, or read from storage), interned once per process.
    /// `None` if `name` is not a valid kind name (see [`valid_name`]).
    pub fn named(name: &str) -> Option<JobKind> {
        if !valid_name(name) {
            return None;
        }
        let mut kinds = KINDS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = kinds.iter().find(|k| **k == name) {
            return Some(JobKind(k));
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        kinds.push(leaked);
        Some(JobKind(leaked))
    }

    /// The kind named `name` if this process knows it already (for names from clients: an
    /// unknown one allocates nothing).
    pub fn known(name: &str) -> Option<JobKind> {
        KINDS.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|k| **k == name).map(|k| JobKind(k))
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// Every kind this process knows, in the order it learned them.
    pub fn all() -> Vec<JobKind> {
        KINDS.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|k| JobKind(k)).collect()
    }
}

impl fmt::Debug for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for JobKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

/// Whether `name` may name a kind: 1 to 64 of `a-z`, `0-9`, `-`, `_`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

impl FromStr for JobStatus {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "queued" => Ok(JobStatus::Queued),
            "running" => Ok(JobStatus::Running),
            "succeeded" => Ok(JobStatus::Succeeded),
            "failed" => Ok(JobStatus::Failed),
            "cancelled" => Ok(JobStatus::Cancelled),
            _ => Err(()),
        }
    }
}

/// What a succeeded job produced (the bytes themselves live in the store).
#[derive(Clone, Debug, PartialEq)]
pub struct ResultMeta {
    /// As the kind gave it (`application/pdf`), kept as text by the stores.
    pub content_type: String,
    pub bytes: usize,
    /// Name offered in `Content-Disposition`; already safe (built by the worker, not the client).
    pub filename: String,
    /// What the kind says of its result beyond its type and size (an image's `width` and
    /// `height`): shown in the job's `result`, kept by the stores as JSON.
    pub extra: ResultExtra,
}

/// A result's own fields, as its kind gave them (a few small entries).
pub type ResultExtra = serde_json::Map<String, serde_json::Value>;

/// Keys of a job's `result` the engine writes itself: a kind's extra fields cannot replace them.
const RESULT_KEYS: [&str; 4] = ["url", "content_type", "bytes", "filename"];

/// One job's state. Cheap to clone: it is what every reader gets a snapshot of.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    pub status: JobStatus,
    /// 0.0 to 1.0; never decreases; 1.0 exactly when succeeded.
    pub progress: f32,
    /// Human text about the current step, e.g. "page 3 of 12".
    pub stage: Option<String>,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    /// How many times the job was started (handed to a worker): a rerun after a crash counts.
    pub attempts: u32,
    /// Set exactly when the job failed (or was cancelled, to say why).
    pub error: Option<ErrorBody>,
    /// Set exactly when the job succeeded.
    pub result: Option<ResultMeta>,
    /// Where the final job object is POSTed when the job ends (not part of the job object: a URL
    /// may carry a token).
    pub callback: Option<CallbackUrl>,
    /// The API key's owner that submitted it (`None` when the service runs without keys).
    pub owner: Option<Owner>,
}

impl Job {
    pub fn new(id: JobId, kind: JobKind, now: SystemTime) -> Self {
        Job {
            id,
            kind,
            status: JobStatus::Queued,
            progress: 0.0,
            stage: Some("queued".into()),
            created_at: now,
            started_at: None,
            finished_at: None,
            attempts: 0,
            error: None,
            result: None,
            callback: None,
            owner: None,
        }
    }

    /// A worker is about to get the job: the attempt is counted (a store makes it durable before
    /// the job can run, so a run that takes the process down is counted too); the job stays
    /// queued until it starts.
    pub fn claim(&mut self) -> bool {
        if self.status != JobStatus::Queued {
            return false;
        }
        self.attempts += 1;
        true
    }

    /// queued → running: a worker started it. Returns whether anything changed.
    pub fn start(&mut self, now: SystemTime) -> bool {
        if self.status != JobStatus::Queued {
            return false;
        }
        self.status = JobStatus::Running;
        self.started_at = Some(now);
        self.progress = 0.0;
        self.stage = Some("started".into());
        true
    }

    /// running → queued: the run was cut off (shutdown, a crash) and the job will run again.
    /// The attempt stays counted.
    pub fn release(&mut self) -> bool {
        if self.status != JobStatus::Running {
            return false;
        }
        self.status = JobStatus::Queued;
        self.started_at = None;
        self.progress = 0.0;
        self.stage = Some("queued".into());
        true
    }

    /// Progress while running; a lower value than already reported is ignored (but the stage
    /// text is still taken), and 1.0 is kept for success.
    pub fn advance(&mut self, fraction: f32, stage: Option<String>) -> bool {
        if self.status != JobStatus::Running {
            return false;
        }
        let fraction = if fraction.is_finite() { fraction.clamp(0.0, 0.999) } else { 0.0 };
        let mut changed = false;
        if fraction > self.progress {
            self.progress = fraction;
            changed = true;
        }
        if stage.is_some() && stage != self.stage {
            self.stage = stage;
            changed = true;
        }
        changed
    }

    pub fn succeed(&mut self, result: ResultMeta, now: SystemTime) -> bool {
        if self.status != JobStatus::Running {
            return false;
        }
        self.status = JobStatus::Succeeded;
        self.progress = 1.0;
        self.stage = Some("done".into());
        self.result = Some(result);
        self.finished_at = Some(now);
        true
    }

    pub fn fail(&mut self, error: ErrorBody, now: SystemTime) -> bool {
        if self.status.is_terminal() {
            return false;
        }
        self.status = JobStatus::Failed;
        self.stage = Some("failed".into());
        self.error = Some(error);
        self.finished_at = Some(now);
        true
    }

    pub fn cancel(&mut self, now: SystemTime) -> bool {
        if self.status.is_terminal() {
            return false;
        }
        self.status = JobStatus::Cancelled;
        self.stage = Some("cancelled".into());
        self.finished_at = Some(now);
        true
    }

    /// The JSON job object of the API.
    pub fn view(&self) -> JobView<'_> {
        JobView(self)
    }
}

/// Serializes a [`Job`] as the API's job object.
pub struct JobView<'a>(&'a Job);

impl Serialize for JobView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let job = self.0;
        let this = format!("/jobs/{}", job.id);
        let result_url = format!("{this}/result");
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("id", &job.id)?;
        map.serialize_entry("kind", &job.kind)?;
        map.serialize_entry("status", &job.status)?;
        map.serialize_entry("progress", &job.progress)?;
        if let Some(stage) = &job.stage {
            map.serialize_entry("stage", stage)?;
        }
        map.serialize_entry("created_at", &rfc3339(job.created_at))?;
        map.serialize_entry("started_at", &job.started_at.map(rfc3339))?;
        map.serialize_entry("finished_at", &job.finished_at.map(rfc3339))?;
        map.serialize_entry("attempts", &job.attempts)?;
        if let (JobStatus::Failed | JobStatus::Cancelled, Some(error)) = (job.status, &job.error) {
            map.serialize_entry("error", error)?;
        }
        if let (JobStatus::Succeeded, Some(result)) = (job.status, &job.result) {
            map.serialize_entry("result", &ResultView { meta: result, url: &result_url })?;
        }
        map.serialize_entry("links", &Links { this: &this, result: &result_url })?;
        map.end()
    }
}

#[derive(Serialize)]
struct Links<'a> {
    #[serde(rename = "self")]
    this: &'a str,
    result: &'a str,
}

struct ResultView<'a> {
    meta: &'a ResultMeta,
    url: &'a str,
}

impl Serialize for ResultView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("url", self.url)?;
        map.serialize_entry("content_type", &self.meta.content_type)?;
        map.serialize_entry("bytes", &self.meta.bytes)?;
        map.serialize_entry("filename", &self.meta.filename)?;
        for (key, value) in self.meta.extra.iter().filter(|(k, _)| !RESULT_KEYS.contains(&k.as_str())) {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job::new(JobId::random(), JobKind::named("pdf").unwrap(), SystemTime::now())
    }

    fn meta() -> ResultMeta {
        ResultMeta {
            content_type: "application/pdf".into(),
            bytes: 10,
            filename: "a.pdf".into(),
            extra: Default::default(),
        }
    }

    #[test]
    fn ids_round_trip_and_only_canonical_text_parses() {
        let id = JobId::random();
        assert_eq!(id.to_string().parse::<JobId>(), Ok(id));
        assert_eq!(id.to_string().len(), 32);
        assert_ne!(JobId::random(), JobId::random());
        let upper = id.to_string().to_uppercase();
        for bad in ["", "1", "xyz", &upper, "0000000000000000000000000000000g", "+0000000000000000000000000000001"] {
            if bad != id.to_string() {
                assert!(bad.parse::<JobId>().is_err(), "{bad:?}");
            }
        }
    }

    #[test]
    fn progress_never_goes_backwards_and_is_one_only_on_success() {
        let mut j = job();
        assert!(!j.advance(0.5, None), "a queued job takes no progress");
        j.claim();
        j.start(SystemTime::now());
        assert_eq!(j.attempts, 1);
        assert!(j.advance(0.5, None));
        assert!(!j.advance(0.3, None));
        assert_eq!(j.progress, 0.5);
        j.advance(1.0, None);
        assert!(j.progress < 1.0, "only success reaches 1.0");
        j.advance(f32::NAN, None);
        assert!(j.progress >= 0.5);
        assert!(j.succeed(meta(), SystemTime::now()));
        assert_eq!(j.progress, 1.0);
    }

    #[test]
    fn terminal_states_never_change() {
        let now = SystemTime::now();
        let mut j = job();
        assert!(j.cancel(now));
        assert!(!j.start(now));
        assert!(!j.fail(ErrorBody::new("x", "y"), now));
        assert!(!j.succeed(meta(), now));
        assert_eq!(j.status, JobStatus::Cancelled);

        let mut j = job();
        j.start(now);
        j.advance(0.4, None);
        assert!(j.fail(ErrorBody::new("timeout", "too slow"), now));
        assert!(!j.cancel(now));
        assert_eq!(j.progress, 0.4, "a failed job keeps its last progress");
    }

    #[test]
    fn a_released_job_runs_again_with_its_attempts_counted() {
        let now = SystemTime::now();
        let mut j = job();
        assert!(!j.release(), "only a running job can be released");
        j.claim();
        j.start(now);
        j.advance(0.5, None);
        assert!(j.release());
        assert_eq!((j.status, j.attempts, j.progress, j.started_at), (JobStatus::Queued, 1, 0.0, None));
        assert!(j.claim() && j.start(now));
        assert_eq!(j.attempts, 2);
    }

    #[test]
    fn a_queued_job_cannot_succeed_without_starting() {
        let mut j = job();
        assert!(!j.succeed(meta(), SystemTime::now()));
        assert_eq!(j.status, JobStatus::Queued);
    }

    #[test]
    fn the_view_has_the_contract_fields() {
        let now = SystemTime::now();
        let mut j = job();
        let v = serde_json::to_value(j.view()).unwrap();
        assert_eq!(v["status"], "queued");
        assert!(v["started_at"].is_null());
        assert!(v.get("error").is_none() && v.get("result").is_none());
        assert_eq!(v["links"]["self"], format!("/jobs/{}", j.id));
        j.start(now);
        j.succeed(meta(), now);
        let v = serde_json::to_value(j.view()).unwrap();
        assert_eq!(v["progress"], 1.0);
        assert_eq!(v["result"]["url"], format!("/jobs/{}/result", j.id));
        assert_eq!(v["result"]["content_type"], "application/pdf");
        assert!(v["finished_at"].as_str().unwrap().ends_with('Z'));
    }
}
