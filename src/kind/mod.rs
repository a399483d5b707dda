//! The seam between the engine and the work it runs: a [`Kind`] is one kind of job (render a
//! PDF, process an image, or a kind of your own), and the engine sees it only through this trait.
//!
//! A kind names itself (the stable name stored with every job), says how its input is stored
//! and read back, what a queued input weighs against the queue's memory budget, and runs one
//! job on a worker thread with a [`JobContext`] for progress, cancellation and its deadline.
//! Its HTTP routes and settings live in its own folder (`src/kinds/…`, or outside the crate for a
//! kind of your own) and reach the engine through [`Registration`]: only start-up names kinds.
//!
//! The engine (Dispatcher, stores, WebSocket hub, webhooks) carries a job's input as an opaque
//! [`Input`] while it stays in this process, and as a [`PayloadRecord`] (bytes) when it is stored;
//! it never looks inside either.

use std::any::Any;
use std::sync::Arc;

pub mod context;

pub use crate::domain::PayloadRecord;
pub use context::{JobContext, JobFailure, JobOutput, Outcome};

/// One kind of work, typed: `Input` is what its runner takes, parsed and checked before the job
/// is accepted.
pub trait Kind: Send + Sync + 'static {
    /// What one job of this kind works on.
    type Input: Send + Sync + 'static;

    /// The stable name stored with each job (`"pdf"`): lowercase ASCII letters, digits, `-` and
    /// `_`, 1 to 64 characters. Renaming a kind orphans the jobs stored under the old name.
    fn name(&self) -> &'static str;

    /// The stored form of an input: what a durable store keeps, and what an idempotency key's
    /// fingerprint is taken over (equal inputs must give equal records).
    fn encode(&self, input: &Self::Input) -> PayloadRecord;

    /// Reads back what [`Kind::encode`] stored. Anything malformed is an error naming the
    /// problem (the job then fails with `payload_unreadable`), never a panic.
    fn decode(&self, record: PayloadRecord) -> Result<Self::Input, String>;

    /// About how many bytes the input holds while its job is queued (the `--max-queued-bytes`
    /// budget).
    fn weight(&self, input: &Self::Input) -> usize;

    /// Runs one job on a worker thread. Check `job.checkpoint()` between steps (it says when the
    /// job is cancelled, past its deadline or stopped by a shutdown) and report progress with
    /// `job.progress`; a panic fails the job alone (`worker_panic`).
    fn run(&self, input: Self::Input, job: &mut JobContext) -> Outcome;

    /// Parses and checks the `input` of `POST /jobs` (`{"kind": …, "input": …}`), on an HTTP
    /// thread: keep it cheap and bounded (the body is at most `--max-json-body`). `None`: this
    /// kind takes no JSON input (only its own routes submit it).
    fn parse_json(&self, input: serde_json::Value) -> Option<Result<Self::Input, InvalidInput>> {
        let _ = input;
        None
    }
}

/// What a kind says of an input it refuses: a status (413, 415 or 422), a stable code and a
/// message naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput {
    pub status: actix_web::http::StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl InvalidInput {
    /// A `422` with `code`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        InvalidInput { status: actix_web::http::StatusCode::UNPROCESSABLE_ENTITY, code, message: message.into() }
    }
}

/// An input whose type only its kind knows.
pub struct Input(Box<dyn Any + Send + Sync>);

impl Input {
    pub fn new<T: Send + Sync + 'static>(value: T) -> Self {
        Input(Box::new(value))
    }

    /// The value, if it is a `T`.
    pub fn downcast<T: 'static>(self) -> Result<T, Input> {
        self.0.downcast::<T>().map(|b| *b).map_err(Input)
    }

    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Input(..)")
    }
}

/// What a worker is handed: the input as accepted by this process, or as stored (read back by
/// the kind on the worker thread, not by the store).
#[derive(Debug)]
pub enum Work {
    Ready(Input),
    Stored(PayloadRecord),
}

/// A [`Kind`] with its input type erased: what the engine holds.
pub trait Runner: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn encode(&self, input: &Input) -> PayloadRecord;
    fn weight(&self, input: &Input) -> usize;
    /// Decodes a stored record if need be and runs the job.
    fn run(&self, work: Work, job: &mut JobContext) -> Outcome;
    /// See [`Kind::parse_json`]: the input, ready to submit.
    fn parse_json(&self, input: serde_json::Value) -> Option<Result<(Input, usize), InvalidInput>>;
}

impl<K: Kind> Runner for K {
    fn name(&self) -> &'static str {
        Kind::name(self)
    }

    fn encode(&self, input: &Input) -> PayloadRecord {
        Kind::encode(self, typed::<K>(input))
    }

    fn weight(&self, input: &Input) -> usize {
        Kind::weight(self, typed::<K>(input))
    }

    fn run(&self, work: Work, job: &mut JobContext) -> Outcome {
        let input = match work {
            Work::Ready(input) => match input.downcast::<K::Input>() {
                Ok(input) => input,
                Err(_) => return Err(unreadable(format!("the input is not a {} job's", Kind::name(self)))),
            },
            Work::Stored(record) => Kind::decode(self, record).map_err(unreadable)?,
        };
        Kind::run(self, input, job)
    }

    fn parse_json(&self, input: serde_json::Value) -> Option<Result<(Input, usize), InvalidInput>> {
        Some(Kind::parse_json(self, input)?.map(|input| {
            let weight = Kind::weight(self, &input);
            (Input::new(input), weight)
        }))
    }
}

/// An input of kind `K`. Inputs reach a runner only through jobs of its own kind, so another type
/// here is a bug in the engine.
fn typed<K: Kind>(input: &Input) -> &K::Input {
    input
        .downcast_ref::<K::Input>()
        .unwrap_or_else(|| panic!("an input handed to the {} kind is not its own", std::any::type_name::<K>()))
}

fn unreadable(message: String) -> JobFailure {
    tracing::error!("stored payload unreadable: {message}");
    JobFailure::Error(crate::error::ErrorBody::new("payload_unreadable", message))
}

/// The kinds this service runs, by name (what `POST /jobs` looks a kind up in).
#[derive(Clone, Default)]
pub struct Kinds {
    runners: Vec<Arc<dyn Runner>>,
    /// The names of the kinds that take JSON input, for the message of an unknown kind.
    json: Vec<&'static str>,
}

impl Kinds {
    /// Asks each kind once whether it takes JSON (with `null`: a kind that does answers `Some`,
    /// even for an input it refuses).
    pub fn new(runners: Vec<Arc<dyn Runner>>) -> Self {
        let json =
            runners.iter().filter(|r| r.parse_json(serde_json::Value::Null).is_some()).map(|r| r.name()).collect();
        Kinds { runners, json }
    }

    pub fn find(&self, name: &str) -> Option<&Arc<dyn Runner>> {
        self.runners.iter().find(|r| r.name() == name)
    }

    /// The kinds `POST /jobs` takes.
    pub fn taking_json(&self) -> &[&'static str] {
        &self.json
    }
}

/// A kind's input ready to submit: its runner, the input, and its weight.
pub struct NewWork {
    pub runner: Arc<dyn Runner>,
    pub input: Input,
    pub weight: usize,
}

impl NewWork {
    pub fn new<K: Kind>(kind: &Arc<K>, input: K::Input) -> Self {
        let weight = kind.weight(&input);
        NewWork { runner: kind.clone(), input: Input::new(input), weight }
    }

    pub fn name(&self) -> &'static str {
        self.runner.name()
    }
}

pub use crate::job::valid_name;

#[cfg(test)]
mod tests {
    use super::*;

    struct Upper;

    impl Kind for Upper {
        type Input = String;
        fn name(&self) -> &'static str {
            "upper"
        }
        fn encode(&self, input: &String) -> PayloadRecord {
            PayloadRecord { spec: input.as_bytes().to_vec(), data: None }
        }
        fn decode(&self, record: PayloadRecord) -> Result<String, String> {
            String::from_utf8(record.spec).map_err(|e| format!("not UTF-8: {e}"))
        }
        fn weight(&self, input: &String) -> usize {
            input.len()
        }
        fn run(&self, input: String, _: &mut JobContext) -> Outcome {
            Ok(JobOutput {
                bytes: input.to_uppercase().into(),
                content_type: "text/plain",
                filename: "upper.txt".into(),
                extra: Default::default(),
            })
        }
    }

    #[test]
    fn a_runner_takes_its_input_ready_or_stored_and_refuses_what_it_cannot_read() {
        let kind = Arc::new(Upper);
        let work = NewWork::new(&kind, "abc".to_string());
        assert_eq!((work.name(), work.weight), ("upper", 3));
        let record = work.runner.encode(&work.input);
        let mut job = JobContext::detached();
        let ready = work.runner.run(Work::Ready(work.input), &mut job).unwrap();
        let stored = Runner::run(kind.as_ref(), Work::Stored(record), &mut job).unwrap();
        assert_eq!((&ready.bytes[..], &stored.bytes[..]), (&b"ABC"[..], &b"ABC"[..]));
        let bad = PayloadRecord { spec: vec![0xff], data: None };
        match Runner::run(kind.as_ref(), Work::Stored(bad), &mut job) {
            Err(JobFailure::Error(e)) => assert_eq!(e.code, "payload_unreadable"),
            other => panic!("{other:?}"),
        }
        match Runner::run(kind.as_ref(), Work::Ready(Input::new(7u32)), &mut job) {
            Err(JobFailure::Error(e)) => assert_eq!(e.code, "payload_unreadable"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kind_names_are_short_lowercase_words() {
        for ok in ["pdf", "image", "csv-summary", "embed_v2", "a"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "PDF", "with space", "ünïcode", "a/b", &"k".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
