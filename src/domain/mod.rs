//! Request types shared by every kind, parsed into values that are valid by construction ("parse,
//! don't validate"): callback URLs, JSON objects, and a payload's stored form. Each kind's own
//! request types live in its folder (`crate::kinds`).

pub mod callback;
pub mod object;

use bytes::Bytes;

/// A payload as stored: `spec` is JSON (everything but bulk bytes), `data` the bulk bytes (an
/// uploaded image), if any.
#[derive(Clone, Debug, PartialEq)]
pub struct PayloadRecord {
    pub spec: Vec<u8>,
    pub data: Option<Bytes>,
}
