//! API keys: who is calling, and which jobs they may see.
//!
//! Without keys the service is open (every caller is [`Caller::Open`] and sees every job). With
//! `--api-keys`, every API route takes a [`Caller`] (or [`WsCaller`]) extractor as its first
//! argument, so a request without a valid `Authorization: Bearer KEY` is answered
//! `401 unauthorized` before its body is read. A job belongs to the key that submitted it
//! ([`Owner`], a digest of the key); for any other key it does not exist.
//!
//! Keys are hashed once at start; a presented key is hashed and compared in constant time with
//! every configured digest. Keys are never logged (their `Debug` is redacted, and the access log
//! writes paths without their query, where `/ws?access_token=` carries one).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ErrorBody;
use crate::job::{Job, Owner};

/// Shortest and longest key accepted in the configuration.
const MIN_KEY: usize = 16;
const MAX_KEY: usize = 256;

/// One API key as configured: 16–256 visible ASCII characters, no comma (the list separator).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let n = raw.len();
        if !(MIN_KEY..=MAX_KEY).contains(&n) {
            return Err(format!("an API key must be {MIN_KEY} to {MAX_KEY} characters (one has {n})"));
        }
        if !raw.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err("an API key must be visible ASCII characters, without spaces or commas".into());
        }
        Ok(ApiKey(raw.to_string()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

/// The configured keys, as digests.
#[derive(Clone)]
pub struct ApiKeys {
    /// SHA-256 of each key, deduplicated.
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    pub fn new(keys: &[ApiKey]) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("--api-keys names no key".into());
        }
        let mut digests: Vec<[u8; 32]> = keys.iter().map(|k| digest(k.0.as_bytes())).collect();
        digests.sort_unstable();
        digests.dedup();
        Ok(ApiKeys { digests })
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The owner a presented key stands for, if it is one of ours. Every digest is compared, in
    /// constant time, whatever matches.
    pub fn identify(&self, presented: &[u8]) -> Option<Owner> {
        let d = digest(presented);
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&d);
        }
        bool::from(found).then(|| owner_of(&d))
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

/// Shortest explicit webhook secret accepted.
const MIN_WEBHOOK_SECRET: usize = 16;

/// Explicit webhook secrets of some API keys (`--webhook-secrets @file`): they win over the
/// secret derived from `--webhook-secret`.
#[derive(Clone, Default)]
pub struct KeySecrets(HashMap<Owner, String>);

impl KeySecrets {
    /// `text`: one `KEY SECRET` pair a line (blank lines and `#` comments skipped); each key must
    /// be one of `keys`, once; a secret is 16 or more visible ASCII characters. Errors name the
    /// line, never a key or a secret.
    pub fn parse(text: &str, keys: &ApiKeys) -> Result<Self, String> {
        let mut secrets = HashMap::new();
        for (i, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(key), Some(secret), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("line {i}: expected KEY SECRET"));
            };
            let owner =
                keys.identify(key.as_bytes()).ok_or_else(|| format!("line {i}: the key is not in --api-keys"))?;
            if secret.len() < MIN_WEBHOOK_SECRET || !secret.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(format!(
                    "line {i}: a webhook secret must be at least {MIN_WEBHOOK_SECRET} visible ASCII characters"
                ));
            }
            if secrets.insert(owner, secret.to_string()).is_some() {
                return Err(format!("line {i}: the key already has a secret"));
            }
        }
        Ok(KeySecrets(secrets))
    }

    /// `@path`: [`KeySecrets::parse`] of the file.
    pub fn from_arg(raw: &str, keys: &ApiKeys) -> Result<Self, String> {
        let path = raw.strip_prefix('@').ok_or("give a file: @path (secrets on the command line would show in ps)")?;
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Self::parse(&text, keys)
    }

    pub fn get(&self, owner: Owner) -> Option<&str> {
        self.0.get(&owner).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for KeySecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeySecrets({} keys)", self.0.len())
    }
}

/// `KEY[,KEY…]`, or `@path`: a file with one key a line (blank lines and `#` comments skipped).
impl FromStr for ApiKeys {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let keys: Vec<ApiKey> = match raw.strip_prefix('@') {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("cannot read the key file {path}: {e}"))?;
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(ApiKey::parse)
                    .collect::<Result<_, _>>()?
            }
            None => {
                raw.split(',').map(str::trim).filter(|k| !k.is_empty()).map(ApiKey::parse).collect::<Result<_, _>>()?
            }
        };
        ApiKeys::new(&keys)
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The owner is half of the key's digest: what a copy of the database holds gives no key back.
fn owner_of(digest: &[u8; 32]) -> Owner {
    Owner::from_bytes(digest[..16].try_into().expect("16 of 32 bytes"))
}

/// The service's access setting, shared by every handler.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// `None`: the service is open.
    pub keys: Option<Arc<ApiKeys>>,
}

/// Who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The service runs without keys: everyone sees every job.
    Open,
    /// A caller with a valid key: sees only its own jobs.
    Key(Owner),
}

impl Caller {
    /// The owner new jobs get.
    pub fn owner(self) -> Option<Owner> {
        match self {
            Caller::Open => None,
            Caller::Key(owner) => Some(owner),
        }
    }

    /// Whether the job exists for this caller.
    pub fn may_see(self, job: &Job) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key(owner) => job.owner == Some(owner),
        }
    }

    /// From the request's `Authorization: Bearer` header (and, if `query` allows it, an
    /// `access_token` query parameter).
    fn identify(req: &HttpRequest, query: bool) -> Result<Caller, Unauthorized> {
        let Some(keys) = req.app_data::<web::Data<Access>>().and_then(|a| a.keys.clone()) else {
            return Ok(Caller::Open);
        };
        let header = req.headers().get(header::AUTHORIZATION);
        let presented = match (header.map(bearer), query) {
            (Some(Some(token)), _) => token,
            // On the WebSocket a browser may carry other credentials (Basic, behind a proxy):
            // the key is then in the query.
            (Some(None), true) => access_token(req.query_string()).ok_or(Unauthorized::Malformed)?,
            (Some(None), false) => return Err(Unauthorized::Malformed),
            (None, true) => access_token(req.query_string()).ok_or(Unauthorized::Missing)?,
            (None, false) => return Err(Unauthorized::Missing),
        };
        keys.identify(presented.as_bytes()).map(Caller::Key).ok_or(Unauthorized::Wrong)
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

fn access_token(query: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "access_token").map(|(_, v)| v.into_owned())
}

impl FromRequest for Caller {
    type Error = Unauthorized;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(Caller::identify(req, false))
    }
}

/// The caller of `/ws`, which also takes the key as `?access_token=KEY` (a browser cannot set
/// headers on a WebSocket).
#[derive(Clone, Copy, Debug)]
pub struct WsCaller(pub Caller);

impl FromRequest for WsCaller {
    type Error = Unauthorized;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(Caller::identify(req, true).map(WsCaller))
    }
}

/// Why a request was refused `401`.
#[derive(Debug, thiserror::Error)]
pub enum Unauthorized {
    #[error("this service needs an API key: send Authorization: Bearer <key>")]
    Missing,
    #[error("the Authorization header must be Bearer <key>")]
    Malformed,
    #[error("the API key is not valid")]
    Wrong,
}

impl ResponseError for Unauthorized {
    fn status_code(&self) -> StatusCode {
        StatusCode::UNAUTHORIZED
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = ErrorBody::new("unauthorized", self.to_string()).response(StatusCode::UNAUTHORIZED);
        let challenge = match self {
            Unauthorized::Missing => r#"Bearer realm="offload""#,
            _ => r#"Bearer realm="offload", error="invalid_token""#,
        };
        res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        res
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    const A: &str = "key-a-0123456789abcdef";
    const B: &str = "key-b-0123456789abcdef";

    #[test]
    fn keys_are_16_to_256_visible_ascii_characters_without_commas() {
        let longest = "k".repeat(256);
        let long = "k".repeat(257);
        let cases: [(&str, bool); 8] = [
            (A, true),
            ("0123456789abcdef", true),
            (&longest, true),
            ("0123456789abcde", false),
            (&long, false),
            ("0123456789 abcdef", false),
            ("0123456789abcdef\u{e9}", false),
            ("0123456789,abcdef", false),
        ];
        for (raw, ok) in cases {
            assert_eq!(ApiKey::parse(raw).is_ok(), ok, "{raw:?}");
        }
    }

    #[test]
    fn a_list_or_a_file_of_keys_parses_and_empty_is_refused() {
        let keys: ApiKeys = format!("{A}, {B},{A}").parse().unwrap();
        assert_eq!(keys.len(), 2, "duplicates are one key");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("# team keys\n{A}\n\n  {B}  \n")).unwrap();
        let from_file: ApiKeys = format!("@{}", path.display()).parse().unwrap();
        assert_eq!(from_file.len(), 2);
        assert!(from_file.identify(B.as_bytes()).is_some());
        for bad in ["", " , ", "short", "@/nonexistent/keys"] {
            assert!(bad.parse::<ApiKeys>().is_err(), "{bad:?}");
        }
        assert!(!format!("{keys:?}").contains(A), "Debug never shows a key");
    }

    #[test]
    fn each_key_is_its_own_owner_and_others_are_refused() {
        let keys = ApiKeys::new(&[ApiKey::parse(A).unwrap(), ApiKey::parse(B).unwrap()]).unwrap();
        let a = keys.identify(A.as_bytes()).unwrap();
        let b = keys.identify(B.as_bytes()).unwrap();
        assert_ne!(a, b);
        assert_eq!(keys.identify(A.as_bytes()), Some(a), "stable");
        for wrong in ["", "key-a-0123456789abcdeF", &A[..A.len() - 1], "key-c-0123456789abcdef"] {
            assert_eq!(keys.identify(wrong.as_bytes()), None, "{wrong:?}");
        }
    }

    #[test]
    fn explicit_webhook_secrets_are_key_secret_pairs_of_configured_keys() {
        let keys = ApiKeys::new(&[ApiKey::parse(A).unwrap(), ApiKey::parse(B).unwrap()]).unwrap();
        let a = keys.identify(A.as_bytes()).unwrap();
        let good = format!("# per-tenant secrets\n{A} secret-of-a-0123456789\n\n  {B}\tsecret-of-b-0123456789  \n");
        let secrets = KeySecrets::parse(&good, &keys).unwrap();
        assert_eq!(secrets.len(), 2);
        assert_eq!(secrets.get(a), Some("secret-of-a-0123456789"));
        assert!(!format!("{secrets:?}").contains("secret-of"), "Debug never shows a secret");
        // (file, what the error says)
        let bad: [(String, &str); 5] = [
            (A.to_string(), "line 1: expected KEY SECRET"),
            (format!("{A} secret-of-a-0123456789 extra"), "line 1: expected KEY SECRET"),
            ("key-c-0123456789abcdef secret-of-c-0123456789".into(), "line 1: the key is not in --api-keys"),
            (format!("# x\n{A} short-secret"), "line 2: a webhook secret must be at least 16"),
            (format!("{A} secret-of-a-0123456789\n{A} secret-of-a-9876543210"), "line 2: the key already has"),
        ];
        for (text, want) in bad {
            let err = KeySecrets::parse(&text, &keys).unwrap_err();
            assert!(err.starts_with(want), "{text:?}: {err}");
            assert!(!err.contains(A) && !err.contains("secret-of"), "an error echoes a key or a secret: {err}");
        }
        assert!(KeySecrets::from_arg("secret-on-the-command-line", &keys).is_err(), "only @file");
    }

    #[test]
    fn the_bearer_header_and_the_ws_query_are_read() {
        let keys = Arc::new(ApiKeys::new(&[ApiKey::parse(A).unwrap()]).unwrap());
        let owner = keys.identify(A.as_bytes()).unwrap();
        let access = web::Data::new(Access { keys: Some(keys) });
        let req = |auth: Option<String>, uri: &str| {
            let mut t = TestRequest::with_uri(uri).app_data(access.clone());
            if let Some(auth) = auth {
                t = t.insert_header((header::AUTHORIZATION, auth));
            }
            t.to_http_request()
        };
        // (Authorization header, URI, query allowed, outcome)
        type Case = (Option<String>, String, bool, Result<Caller, &'static str>);
        let cases: Vec<Case> = vec![
            (Some(format!("Bearer {A}")), "/jobs".into(), false, Ok(Caller::Key(owner))),
            (Some(format!("bearer  {A} ")), "/jobs".into(), false, Ok(Caller::Key(owner))),
            (None, "/jobs".into(), false, Err("missing")),
            (Some(format!("Basic {A}")), "/jobs".into(), false, Err("malformed")),
            (Some("Bearer".into()), "/jobs".into(), false, Err("malformed")),
            (Some(format!("Bearer {B}")), "/jobs".into(), false, Err("wrong")),
            (None, format!("/ws?access_token={A}"), true, Ok(Caller::Key(owner))),
            (None, format!("/ws?access_token={A}"), false, Err("missing")),
            (None, format!("/ws?access_token={B}"), true, Err("wrong")),
            (Some("Basic dXNlcjpwYXNz".into()), format!("/ws?access_token={A}"), true, Ok(Caller::Key(owner))),
            (Some("Basic dXNlcjpwYXNz".into()), "/ws".into(), true, Err("malformed")),
        ];
        for (auth, uri, query, want) in cases {
            let got = Caller::identify(&req(auth.clone(), &uri), query).map_err(|e| match e {
                Unauthorized::Missing => "missing",
                Unauthorized::Malformed => "malformed",
                Unauthorized::Wrong => "wrong",
            });
            assert_eq!(got, want, "{auth:?} {uri}");
        }
        let open = TestRequest::default().to_http_request();
        assert_eq!(Caller::identify(&open, false).unwrap(), Caller::Open, "no keys: open");
    }
}
