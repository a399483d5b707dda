//! `POST /generate-pdf`.

use actix::Addr;
use actix_web::http::header;
use actix_web::{web, HttpResponse};

use super::ApiError;
use crate::dispatch::{Dispatcher, Submit};
use crate::domain::pdf::{DocumentSpec, PdfRequest, SpecLimits};
use crate::domain::JobPayload;

pub async fn generate_pdf(
    body: web::Json<PdfRequest>,
    limits: web::Data<SpecLimits>,
    dispatcher: web::Data<Addr<Dispatcher>>,
) -> Result<HttpResponse, ApiError> {
    let spec = DocumentSpec::parse(body.into_inner(), &limits)?;
    let jobs = dispatcher.send(Submit::one(JobPayload::Pdf(spec))).await??;
    let job = &jobs[0];
    Ok(HttpResponse::Accepted().insert_header((header::LOCATION, format!("/jobs/{}", job.id))).json(job.view()))
}
