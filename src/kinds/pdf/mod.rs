//! PDF documents: a JSON document spec ([`spec`]) rendered with printpdf ([`render`]), submitted
//! with `POST /generate-pdf` ([`routes`]).

pub mod render;
pub mod routes;
pub mod spec;

use crate::domain::object::Object;
use crate::kind::{InvalidInput, Kind, PayloadRecord};
use crate::kind::{JobContext, Outcome};
use spec::{DocumentSpec, PdfRequest, RenderBudget, SpecError, SpecLimits};

/// The name PDF jobs are stored under.
pub const NAME: &str = "pdf";

/// Renders documents within the limits of configuration.
pub struct PdfKind {
    pub limits: SpecLimits,
}

impl PdfKind {
    /// A kind with the default document limits and this render budget.
    pub const fn new(budget: RenderBudget) -> Self {
        PdfKind { limits: SpecLimits { max_rows: 100_000, max_columns: 50, max_cell_chars: 1_000, render: budget } }
    }

    /// A request as sent, parsed and checked: every field and limit, and (one pass over the
    /// text) whether it can fit what one PDF may render to, so a document that cannot is refused
    /// now, not after a worker spent seconds and hundreds of MiB on it.
    pub fn parse(&self, req: PdfRequest) -> Result<DocumentSpec, SpecError> {
        let spec = DocumentSpec::parse(req, &self.limits)?;
        render::layout::check_budget(&spec, self.limits.render)
            .map_err(|message| SpecError { code: "document_too_large", message })?;
        Ok(spec)
    }
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
        render::render(&spec, self.limits.render, job)
    }

    /// The document spec of `POST /generate-pdf`, without `callback_url` (`POST /jobs` has its own).
    fn parse_json(&self, input: serde_json::Value) -> Option<Result<DocumentSpec, InvalidInput>> {
        let parsed = serde_json::from_value::<Object<PdfRequest>>(input)
            .map_err(|e| InvalidInput::new("invalid_field", format!("input: {e}")))
            .and_then(|req| {
                let req = req.into_inner();
                if req.callback_url.is_some() {
                    return Err(InvalidInput::new(
                        "invalid_field",
                        "input.callback_url: give callback_url beside kind and input, not inside the document",
                    ));
                }
                self.parse(req).map_err(|e| InvalidInput::new(e.code, e.message))
            });
        Some(parsed)
    }
}

impl From<spec::SpecError> for crate::routes::ApiError {
    fn from(e: spec::SpecError) -> Self {
        crate::routes::InvalidInput::new(e.code, e.message).into()
    }
}
