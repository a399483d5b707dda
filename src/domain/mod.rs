//! Request types parsed into values that are valid by construction ("parse, don't validate").
//! Handlers turn raw JSON into these; workers receive only these.

pub mod pdf;

use crate::dispatch::JobKind;

/// The work a job carries to its worker pool.
#[derive(Debug)]
pub enum JobPayload {
    Pdf(pdf::DocumentSpec),
}

impl JobPayload {
    pub fn kind(&self) -> JobKind {
        match self {
            JobPayload::Pdf(_) => JobKind::Pdf,
        }
    }
}
