//! `POST /generate-pdf`.

use std::sync::Arc;

use actix::Addr;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::submit::{submit, REPLAYED};
use super::ApiError;
use crate::access::Caller;
use crate::dispatch::Dispatcher;
use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::domain::object::Object;
use crate::domain::pdf::{DocumentSpec, PdfRequest, SpecError, SpecLimits};
use crate::domain::JobPayload;
use crate::store::JobStore;
use crate::workers::pdf::layout;

pub async fn generate_pdf(
    caller: Caller,
    req: HttpRequest,
    body: web::Json<Object<PdfRequest>>,
    limits: web::Data<SpecLimits>,
    policy: web::Data<CallbackPolicy>,
    store: web::Data<Arc<dyn JobStore>>,
    dispatcher: web::Data<Addr<Dispatcher>>,
) -> Result<HttpResponse, ApiError> {
    let mut spec = body.into_inner().into_inner();
    let callback = spec.callback_url.take().map(|raw| CallbackUrl::parse(&raw, **policy)).transpose()?;
    let spec = DocumentSpec::parse(spec, &limits)?;
    // A document that cannot fit what one PDF may render is refused now, not after a worker
    // spent seconds and hundreds of MiB on it (one pass over the text).
    layout::check_budget(&spec, limits.render).map_err(|message| SpecError { code: "document_too_large", message })?;
    let submitted = submit(&req, caller, vec![JobPayload::Pdf(spec)], callback, &store, &dispatcher).await?;
    let job = submitted.jobs.first().ok_or(ApiError::JobNotFound)?;
    let mut res = HttpResponse::Accepted();
    res.insert_header((header::LOCATION, format!("/jobs/{}", job.id)));
    if submitted.replayed {
        res.insert_header((REPLAYED, "true"));
    }
    Ok(res.json(job.view()))
}
