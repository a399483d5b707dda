//! What every submit route shares: the `Idempotency-Key` header, the request's fingerprint, the
//! replay of a key already seen, and the hand-off to the Dispatcher.

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpRequest};
use sha2::{Digest, Sha256};

use super::ApiError;
use super::BodyPermit;
use crate::access::Caller;
use crate::dispatch::{Dispatcher, Submit, Submitted};
use crate::domain::callback::CallbackUrl;
use crate::domain::PayloadRecord;
use crate::kind::NewWork;
use crate::store::{IdempotencyKey, JobStore};

/// The request header naming an idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response header set on a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";
/// Longest idempotency key.
const MAX_KEY: usize = 255;

/// The `Idempotency-Key` header, if sent: 1–255 visible ASCII characters.
pub fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let mut values = req.headers().get_all(IDEMPOTENCY_KEY);
    let Some(value) = values.next() else { return Ok(None) };
    let invalid = |message: &str| ApiError::InvalidHeader { header: "Idempotency-Key", message: message.to_string() };
    if values.next().is_some() {
        return Err(invalid("send it once"));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY {
        return Err(invalid("must be 1 to 255 characters"));
    }
    if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(invalid("must be visible ASCII characters (no spaces or control characters)"));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// SHA-256 over what the request asks for, as parsed: equal requests give equal prints.
fn fingerprint(records: &[PayloadRecord], kinds: &[&str], callback: Option<&CallbackUrl>) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    for (record, kind) in records.iter().zip(kinds) {
        field(kind.as_bytes());
        field(&record.spec);
        field(record.data.as_deref().unwrap_or_default());
    }
    field(callback.map_or("", |c| c.as_str()).as_bytes());
    h.finalize().into()
}

/// Submits `payloads` as one all-or-none request: replays a known key from the store without
/// bothering the Dispatcher, else hands the jobs to it.
pub async fn submit(
    req: &HttpRequest,
    caller: Caller,
    permit: &BodyPermit,
    payloads: Vec<NewWork>,
    callback: Option<CallbackUrl>,
    store: &Arc<dyn JobStore>,
    dispatcher: &Addr<Dispatcher>,
) -> Result<Submitted, ApiError> {
    // Keys are per API key: one client's key never names another's jobs. A space cannot occur
    // in a key, so the scoped form cannot collide with an unscoped one.
    let key = idempotency_key(req)?.map(|key| match caller.owner() {
        Some(owner) => format!("{owner} {key}"),
        None => key,
    });
    // Only a durable store or a key needs the stored form of the payloads.
    let records: Vec<PayloadRecord> = if store.durable() || key.is_some() {
        payloads.iter().map(|p| p.runner.encode(&p.input)).collect()
    } else {
        payloads.iter().map(|_| PayloadRecord { spec: Vec::new(), data: None }).collect()
    };
    let (records, key) = match key {
        None => (records, None),
        Some(key) => {
            // Hashing an upload's bytes and reading the store: off the event loop.
            let kinds: Vec<&'static str> = payloads.iter().map(NewWork::name).collect();
            let (store, callback, held) = (store.clone(), callback.clone(), permit.clone());
            let (records, key, known) = web::block(move || {
                let _held = held;
                let key = IdempotencyKey { key, fingerprint: fingerprint(&records, &kinds, callback.as_ref()) };
                let known = store.replay(&key);
                (records, key, known)
            })
            .await?;
            if let Some(jobs) = known? {
                return Ok(Submitted { jobs, replayed: true });
            }
            (records, Some(key))
        }
    };
    let jobs = payloads.into_iter().zip(records).collect();
    Ok(dispatcher.send(Submit { jobs, callback, key, owner: caller.owner() }).await??)
}

/// `202 Accepted` for a submission of one job: `Location`, the job object, and
/// `Idempotent-Replayed: true` when a key replayed it.
pub fn accepted_one(submitted: Submitted) -> Result<actix_web::HttpResponse, ApiError> {
    let job = submitted.jobs.first().ok_or(ApiError::JobNotFound)?;
    let mut res = actix_web::HttpResponse::Accepted();
    res.insert_header((actix_web::http::header::LOCATION, format!("/jobs/{}", job.id)));
    if submitted.replayed {
        res.insert_header((REPLAYED, "true"));
    }
    Ok(res.json(job.view()))
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters() {
        let long = "k".repeat(256);
        let longest = "k".repeat(255);
        // (header bytes, the key parsed, or None when refused)
        type Case<'a> = (&'a [u8], Result<Option<&'a str>, ()>);
        let cases: [Case; 7] = [
            (b"abc-123_XYZ:~", Ok(Some("abc-123_XYZ:~"))),
            (longest.as_bytes(), Ok(Some(longest.as_str()))),
            (b"", Err(())),
            (long.as_bytes(), Err(())),
            (b"has space", Err(())),
            (b"tab\there", Err(())),
            ("caf\u{e9}".as_bytes(), Err(())),
        ];
        for (raw, want) in cases {
            let value = actix_web::http::header::HeaderValue::from_bytes(raw).unwrap();
            let req = TestRequest::default().insert_header((IDEMPOTENCY_KEY, value)).to_http_request();
            let got = idempotency_key(&req).map_err(|_| ());
            assert_eq!(got.as_ref().map(|o| o.as_deref()), want.as_ref().map(|o| *o), "{raw:?}");
        }
        assert_eq!(idempotency_key(&TestRequest::default().to_http_request()).unwrap(), None);
    }

    #[test]
    fn equal_requests_have_equal_fingerprints_and_any_difference_changes_it() {
        let rec = |spec: &[u8]| PayloadRecord { spec: spec.to_vec(), data: None };
        let a = fingerprint(&[rec(b"{\"t\":1}")], &["pdf"], None);
        assert_eq!(a, fingerprint(&[rec(b"{\"t\":1}")], &["pdf"], None));
        assert_ne!(a, fingerprint(&[rec(b"{\"t\":2}")], &["pdf"], None));
        assert_ne!(a, fingerprint(&[rec(b"{\"t\":1}"), rec(b"")], &["pdf", "pdf"], None));
        let url = CallbackUrl::parse("https://example.com/hook", Default::default()).unwrap();
        assert_ne!(a, fingerprint(&[rec(b"{\"t\":1}")], &["pdf"], Some(&url)));
    }
}
