//! PDF documents: a JSON document spec ([`spec`]) rendered with printpdf ([`render`]), submitted
//! with `POST /generate-pdf` ([`routes`]).

pub mod render;
pub mod routes;
pub mod spec;

use crate::kind::{Kind, PayloadRecord};
use crate::workers::{JobContext, Outcome};
use spec::{DocumentSpec, RenderBudget};

/// The name PDF jobs are stored under.
pub const NAME: &str = "pdf";

/// Renders documents within a budget of pages and lines.
pub struct PdfKind {
    pub budget: RenderBudget,
}

impl Kind for PdfKind {
    type Input = DocumentSpec;

    fn name(&self) -> &'static str {
        NAME
    }

    // Cannot fail: strings, numbers and enums only.
    fn encode(&self, spec: &DocumentSpec) -> PayloadRecord {
        PayloadRecord { spec: serde_json::to_vec(spec).expect("a document spec serializes to JSON"), data: None }
    }

    fn decode(&self, record: PayloadRecord) -> Result<DocumentSpec, String> {
        if record.data.is_some() {
            return Err("stored PDF spec: a PDF job has no bulk data, but the record carries some".into());
        }
        spec::decode_stored(&record.spec)
    }

    fn weight(&self, spec: &DocumentSpec) -> usize {
        spec.approx_bytes()
    }

    fn run(&self, spec: DocumentSpec, job: &mut JobContext) -> Outcome {
        render::render(&spec, self.budget, job)
    }
}

impl From<spec::SpecError> for crate::routes::ApiError {
    fn from(e: spec::SpecError) -> Self {
        crate::routes::InvalidInput::new(e.code, e.message).into()
    }
}
