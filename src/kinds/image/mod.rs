//! Images: uploads checked without decoding ([`task`]), then decoded, transformed and encoded on
//! a worker ([`run`]), submitted with `POST /images` ([`routes`]).

pub mod routes;
pub mod run;
pub mod task;

use crate::kind::{JobContext, Outcome};
use crate::kind::{Kind, PayloadRecord};
use task::ImageTask;

/// The name image jobs are stored under.
pub const NAME: &str = "image";

/// Processes uploaded images.
pub struct ImageKind;

impl Kind for ImageKind {
    type Input = ImageTask;

    fn name(&self) -> &'static str {
        NAME
    }

    /// The task's JSON, and the image's bytes shared, not copied.
    fn encode(&self, task: &ImageTask) -> PayloadRecord {
        PayloadRecord { spec: task.encode_spec(), data: Some(task.bytes.clone()) }
    }

    fn decode(&self, record: PayloadRecord) -> Result<ImageTask, String> {
        ImageTask::decode_stored(&record.spec, record.data)
    }

    fn weight(&self, task: &ImageTask) -> usize {
        task.approx_bytes()
    }

    fn run(&self, task: ImageTask, job: &mut JobContext) -> Outcome {
        run::process(&task, job)
    }
}

impl From<task::ImageError> for crate::routes::ApiError {
    fn from(e: task::ImageError) -> Self {
        let status = actix_web::http::StatusCode::from_u16(e.status)
            .unwrap_or(actix_web::http::StatusCode::UNPROCESSABLE_ENTITY);
        crate::routes::InvalidInput { status, code: e.code, message: e.message }.into()
    }
}
