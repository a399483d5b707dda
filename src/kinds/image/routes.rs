//! `POST /images`: a multipart upload streamed under a size limit and a deadline, checked file by
//! file without decoding, then submitted as one job per file (all or none).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_multipart::Multipart;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::Serialize;

use utoipa::{OpenApi, ToSchema};

use super::task::{default_ops, parse_ops, ImageError, ImageLimits, ImageOp, ImageTask, OutputFormat};
use super::ImageKind;
use crate::access::Caller;
use crate::dispatch::Dispatcher;
use crate::domain::callback::{CallbackPolicy, CallbackUrl};
use crate::job::JobView;
use crate::kind::NewWork;
use crate::routes::openapi::{by_hand, AcceptedJobs, ErrorResponse};
use crate::routes::submit::{submit, REPLAYED};
use crate::routes::{ApiError, BodyPermit, KindRoute, KindRoutes, Verb};
use crate::store::JobStore;

/// The routes, app data and OpenAPI paths of image jobs.
pub fn http(kind: Arc<ImageKind>, limits: UploadLimits) -> KindRoutes {
    KindRoutes {
        routes: vec![KindRoute {
            path: "/images",
            verbs: &[Verb::Post],
            handler: |verb| verb.route().to(upload_images),
        }],
        app_data: Arc::new(move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(web::Data::new(limits)).app_data(web::Data::from(kind.clone()));
        }),
        openapi: ImageDoc::openapi(),
    }
}

#[derive(OpenApi)]
#[openapi(paths(upload_images))]
struct ImageDoc;

/// Upload limits, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Most body bytes, counted while they arrive.
    pub max_bytes: usize,
    /// The whole body must arrive within this.
    pub timeout: Duration,
    pub max_files: usize,
    pub image: ImageLimits,
}

/// Longest filename of a part (the result's name keeps at most 64 characters of it anyway).
const MAX_FILENAME: usize = 1024;
/// Largest `ops` or `format` field.
const MAX_TEXT_FIELD: usize = 64 * 1024;

struct Upload {
    /// (client filename, bytes) in the order sent.
    files: Vec<(String, Bytes)>,
    ops: Option<String>,
    format: Option<String>,
    callback_url: Option<String>,
}

#[derive(Serialize)]
struct Accepted<'a> {
    jobs: Vec<JobView<'a>>,
}

/// Upload images: one job per file, all or none.
#[utoipa::path(
    post,
    path = "/images",
    tag = "jobs",
    request_body(content = ImageUpload, content_type = "multipart/form-data"),
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$", description = "1 to 255 visible ASCII characters: a repeat with the same body answers the first request's jobs (`Idempotent-Replayed: true`), with another body 422")),
    responses(
        (status = 202, description = "Accepted: one queued job per file, in order", body = AcceptedJobs,
            links(("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/jobs/0/id")))),
                  ("GetResult" = (operation_id = "get_result", parameters(("id" = "$response.body#/jobs/0/id")))),
                  ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/jobs/0/id")))))),
        (status = 400, description = "`malformed_multipart`: the multipart body cannot be parsed (no boundary, a part without `Content-Disposition: form-data` and a `name`, an unreadable part header, a truncated body); `invalid_header`: a malformed `Idempotency-Key`", body = ErrorResponse),
        (status = 401, description = "`unauthorized`, with `--api-keys`: no key, a malformed header or an unknown key", body = ErrorResponse),
        (status = 408, description = "`request_timeout`: the upload did not arrive within `--body-timeout`", body = ErrorResponse),
        (status = 413, description = "`payload_too_large`: larger than `--max-upload`, or more than the limits could ever queue", body = ErrorResponse),
        (status = 415, description = "`unsupported_media_type`: not multipart/form-data; `unsupported_image`: not a supported image", body = ErrorResponse),
        (status = 422, description = "A bad file, op or field, the message names it: `invalid_field`, `invalid_op`, `missing_file`, `too_many_files`, `empty_file`, `invalid_image`, `image_too_large`, `invalid_callback_url`, `callback_not_allowed`, `idempotency_key_reused`", body = ErrorResponse),
        (status = 500, description = "`internal_error`: the upload could not be checked", body = ErrorResponse),
        (status = 503, description = "`overloaded`, `shutting_down`, `pool_unavailable`, `storage_unavailable`, `unavailable`: retry after `Retry-After` seconds. For `storage_unavailable` the message says either that nothing was created, or that the commit failed and names the job that may exist (a retry with the same `Idempotency-Key` is safe)", body = ErrorResponse, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
// One extractor per concern (key, body budget, limits, store, Dispatcher).
#[allow(clippy::too_many_arguments)]
pub async fn upload_images(
    caller: Caller,
    permit: BodyPermit,
    req: HttpRequest,
    payload: web::Payload,
    limits: web::Data<UploadLimits>,
    kind: web::Data<ImageKind>,
    policy: web::Data<CallbackPolicy>,
    store: web::Data<Arc<dyn JobStore>>,
    dispatcher: web::Data<Addr<Dispatcher>>,
) -> Result<HttpResponse, ApiError> {
    // A bad key is refused before the upload is read.
    crate::routes::submit::idempotency_key(&req)?;
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    if !is_multipart {
        return Err(ImageError::new(415, "unsupported_media_type", "send the files as multipart/form-data").into());
    }
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes) {
        return Err(too_large(limits.max_bytes).into());
    }
    // Every byte counts against the limit, part headers included: the parser buffers a part's
    // headers (a filename may be any length) before the handler sees the part.
    let over = Arc::new(AtomicBool::new(false));
    let multipart = Multipart::new(req.headers(), capped(payload, limits.max_bytes, over.clone()));
    let read = actix_rt::time::timeout(limits.timeout, read_upload(multipart, &limits));
    let upload = read
        .await
        .map_err(|_| {
            ImageError::new(
                408,
                "request_timeout",
                format!("the upload did not arrive within {} s", limits.timeout.as_secs_f64()),
            )
        })?
        .map_err(|e| if over.load(Ordering::Relaxed) { too_large(limits.max_bytes) } else { e })?;

    let callback = upload.callback_url.as_deref().map(|raw| CallbackUrl::parse(raw, **policy)).transpose()?;
    let limits = **limits;
    // Header parsing copies and scans the files: keep it off the HTTP thread.
    let held = permit.clone();
    let tasks = web::block(move || {
        let _held = held;
        inspect(upload, &limits)
    })
    .await
    .map_err(|_| ImageError::new(500, "internal_error", "the upload could not be checked"))??;
    let kind = kind.into_inner();
    let payloads = tasks.into_iter().map(|task| NewWork::new(&kind, task)).collect();
    let submitted = submit(&req, caller, &permit, payloads, callback, &store, &dispatcher).await?;
    let mut res = HttpResponse::Accepted();
    if submitted.replayed {
        res.insert_header((REPLAYED, "true"));
    }
    Ok(res.json(Accepted { jobs: submitted.jobs.iter().map(|j| j.view()).collect() }))
}

/// The request body, cut off with an error once more than `max` bytes arrived (`over` says so).
fn capped(
    payload: web::Payload,
    max: usize,
    over: Arc<AtomicBool>,
) -> impl futures::Stream<Item = Result<Bytes, actix_web::error::PayloadError>> {
    let mut seen = 0usize;
    payload.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len();
        if seen > max {
            over.store(true, Ordering::Relaxed);
            return Err(actix_web::error::PayloadError::Overflow);
        }
        Ok(chunk)
    })
}

fn too_large(max: usize) -> ImageError {
    ImageError::new(413, "payload_too_large", format!("the upload is larger than the {max} byte limit"))
}

async fn read_upload(mut multipart: Multipart, limits: &UploadLimits) -> Result<Upload, ImageError> {
    let mut upload = Upload { files: Vec::new(), ops: None, format: None, callback_url: None };
    let mut total = 0usize;
    while let Some(field) = multipart.next().await {
        let mut field = field.map_err(bad_multipart)?;
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.content_disposition().and_then(|cd| cd.get_filename()).unwrap_or_default().to_string();
        if filename.len() > MAX_FILENAME {
            return Err(ImageError::new(
                422,
                "invalid_field",
                format!("{name}: the filename is longer than {MAX_FILENAME} bytes"),
            ));
        }
        if !matches!(name.as_str(), "file" | "ops" | "format" | "callback_url") {
            return Err(ImageError::new(
                422,
                "invalid_field",
                format!("{name}: unknown field; send `file` parts and optional `ops`, `format`, `callback_url`"),
            ));
        }
        if name == "file" && upload.files.len() >= limits.max_files {
            return Err(ImageError::new(
                422,
                "too_many_files",
                format!("file: at most {} files an upload", limits.max_files),
            ));
        }
        let mut buf = BytesMut::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(bad_multipart)?;
            total += chunk.len();
            if total > limits.max_bytes {
                return Err(too_large(limits.max_bytes));
            }
            if name != "file" && buf.len() + chunk.len() > MAX_TEXT_FIELD {
                return Err(ImageError::new(
                    422,
                    "invalid_field",
                    format!("{name}: longer than {MAX_TEXT_FIELD} bytes"),
                ));
            }
            buf.extend_from_slice(&chunk);
        }
        let text = |buf: BytesMut| {
            String::from_utf8(buf.to_vec())
                .map_err(|_| ImageError::new(422, "invalid_field", format!("{name}: not UTF-8 text")))
        };
        match name.as_str() {
            "file" => upload.files.push((filename, buf.freeze())),
            "ops" => upload.ops = Some(text(buf)?),
            "callback_url" => upload.callback_url = Some(text(buf)?),
            _ => upload.format = Some(text(buf)?),
        }
    }
    if upload.files.is_empty() {
        return Err(ImageError::new(422, "missing_file", "file: send at least one `file` part"));
    }
    Ok(upload)
}

fn bad_multipart(e: actix_multipart::MultipartError) -> ImageError {
    if let actix_multipart::MultipartError::Payload(p) = &e {
        if crate::routes::is_timeout(p) {
            return ImageError::new(408, "request_timeout", "the upload did not arrive in time");
        }
    }
    ImageError::new(400, "malformed_multipart", format!("the multipart body cannot be read: {e}"))
}

fn inspect(upload: Upload, limits: &UploadLimits) -> Result<Vec<ImageTask>, ImageError> {
    let ops: Arc<[ImageOp]> = match upload.ops.as_deref() {
        Some(text) if !text.trim().is_empty() => parse_ops(text)?.into(),
        _ => default_ops().into(),
    };
    let output = match upload.format.as_deref() {
        Some(text) if !text.trim().is_empty() => OutputFormat::parse(text)?,
        _ => OutputFormat::Png,
    };
    upload
        .files
        .into_iter()
        .enumerate()
        .map(|(i, (name, bytes))| {
            let shown: String = name.chars().take(80).collect();
            let field = format!("file[{i}] ({shown})");
            ImageTask::inspect(&field, &name, bytes, ops.clone(), output, &limits.image)
        })
        .collect()
}

/// `POST /images`: one or more files and how to process them (multipart/form-data).
pub struct ImageUpload;

impl utoipa::PartialSchema for ImageUpload {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        by_hand(serde_json::json!({
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {
                    "description": "The images (PNG, JPEG, GIF, WebP, BMP or TIFF, detected from the bytes), up to `--max-files` (default 100).",
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 100,
                    "items": {"type": "string", "contentMediaType": "application/octet-stream"}
                },
                "ops": {
                    "description": "A JSON array of operations, applied in order, e.g. `[{\"op\": \"thumbnail\", \"size\": 256}]`: `thumbnail{size}`, `resize{width?, height?}`, `crop{x, y, width, height}`, `rotate{degrees: 90|180|270}`, `flip{axis: horizontal|vertical}`, `grayscale`, `blur{sigma: 0.1-100}`, `brighten{value: -255-255}`, `contrast{value: -100-100}`; at most 32. Default `[{\"op\": \"thumbnail\", \"size\": 256}]`.",
                    "type": "string",
                    "contentMediaType": "application/json"
                },
                "format": {"description": "The output format (default png).", "type": "string", "enum": ["png", "jpeg", "webp"]},
                "callback_url": {"description": "POSTed each job's final object when it ends.", "type": "string", "format": "uri"}
            }
        }))
    }
}

impl ToSchema for ImageUpload {}
