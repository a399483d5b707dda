//! `POST /generate-pdf`.

use actix::Addr;
use actix_web::http::header;
use actix_web::{web, HttpResponse};

use super::ApiError;
use crate::dispatch::{Dispatcher, Submit};
use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::domain::pdf::{DocumentSpec, PdfRequest, SpecLimits};
use crate::domain::JobPayload;

pub async fn generate_pdf(
    body: web::Json<PdfRequest>,
    limits: web::Data<SpecLimits>,
    policy: web::Data<CallbackPolicy>,
    dispatcher: web::Data<Addr<Dispatcher>>,
) -> Result<HttpResponse, ApiError> {
    let mut req = body.into_inner();
    let callback = req.callback_url.take().map(|raw| CallbackUrl::parse(&raw, **policy)).transpose()?;
    let spec = DocumentSpec::parse(req, &limits)?;
    let jobs = dispatcher.send(Submit { jobs: vec![JobPayload::Pdf(spec)], callback }).await??;
    let job = &jobs[0];
    Ok(HttpResponse::Accepted().insert_header((header::LOCATION, format!("/jobs/{}", job.id))).json(job.view()))
}
