//! Request types parsed into values that are valid by construction ("parse, don't validate").
//! Handlers turn raw JSON into these; workers receive only these.

pub mod callback;
pub mod image;
pub mod pdf;

use crate::job::JobKind;

/// The work a job carries to its worker pool.
#[derive(Debug)]
pub enum JobPayload {
    Pdf(pdf::DocumentSpec),
    Image(image::ImageTask),
}

impl JobPayload {
    pub fn kind(&self) -> JobKind {
        match self {
            JobPayload::Pdf(_) => JobKind::Pdf,
            JobPayload::Image(_) => JobKind::Image,
        }
    }

    /// Approximate bytes held while the job waits, counted against the queued-bytes budget.
    pub fn approx_bytes(&self) -> usize {
        match self {
            JobPayload::Pdf(spec) => spec.approx_bytes(),
            JobPayload::Image(task) => task.approx_bytes(),
        }
    }
}
