//! Request types parsed into values that are valid by construction ("parse, don't validate").
//! Handlers turn raw JSON into these; workers receive only these.

pub mod callback;
pub mod image;
pub mod object;
pub mod pdf;

use bytes::Bytes;

use crate::job::JobKind;

/// The work a job carries to its worker pool.
#[derive(Debug, PartialEq)]
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

    /// The stored form, for a store that keeps accepted jobs across restarts. Cheap enough for
    /// the HTTP thread: one compact `serde_json::to_vec`, and an image's bytes are shared, not
    /// copied.
    pub fn encode(&self) -> PayloadRecord {
        match self {
            // Cannot fail: strings, numbers and enums only.
            JobPayload::Pdf(spec) => PayloadRecord {
                spec: serde_json::to_vec(spec).expect("a document spec serializes to JSON"),
                data: None,
            },
            JobPayload::Image(task) => PayloadRecord { spec: task.encode_spec(), data: Some(task.bytes.clone()) },
        }
    }

    /// Reads back what [`JobPayload::encode`] stored for a job of `kind`. Anything malformed (not
    /// JSON, another kind's spec, an image without its bytes, a PDF with bytes, unknown names or
    /// numbers, a spec that breaks what workers rely on) is an error naming the problem.
    pub fn decode(kind: JobKind, record: PayloadRecord) -> Result<JobPayload, String> {
        match kind {
            JobKind::Pdf => {
                if record.data.is_some() {
                    return Err("stored PDF spec: a PDF job has no bulk data, but the record carries some".into());
                }
                pdf::decode_stored(&record.spec).map(JobPayload::Pdf)
            }
            JobKind::Image => image::ImageTask::decode_stored(&record.spec, record.data).map(JobPayload::Image),
        }
    }
}

/// A payload as stored: `spec` is JSON (everything but bulk bytes), `data` the bulk bytes (an
/// uploaded image), if any.
#[derive(Clone, Debug, PartialEq)]
pub struct PayloadRecord {
    pub spec: Vec<u8>,
    pub data: Option<Bytes>,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::image::{ImageLimits, ImageOp, ImageTask, OutputFormat};
    use super::pdf::DocumentSpec;
    use super::*;

    fn image_payload() -> JobPayload {
        let img = ::image::DynamicImage::ImageRgb8(::image::RgbImage::from_pixel(40, 30, ::image::Rgb([1, 2, 3])));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), ::image::ImageFormat::Png).unwrap();
        let ops: Arc<[ImageOp]> = Arc::from(vec![ImageOp::Rotate { degrees: 90 }, ImageOp::Thumbnail { size: 16 }]);
        let limits = ImageLimits { max_pixels: 1_000_000, max_jpeg_scans: 100 };
        JobPayload::Image(ImageTask::inspect("file", "a.png", png.into(), ops, OutputFormat::Png, &limits).unwrap())
    }

    /// `record` with its spec's JSON changed by `edit`.
    fn edited(record: &PayloadRecord, edit: impl FnOnce(&mut serde_json::Value)) -> PayloadRecord {
        let mut json: serde_json::Value = serde_json::from_slice(&record.spec).unwrap();
        edit(&mut json);
        PayloadRecord { spec: serde_json::to_vec(&json).unwrap(), data: record.data.clone() }
    }

    #[test]
    fn both_kinds_round_trip_and_report_their_kind() {
        for payload in [JobPayload::Pdf(DocumentSpec::titled("t")), image_payload()] {
            let kind = payload.kind();
            assert_eq!(JobPayload::decode(kind, payload.encode()).unwrap(), payload);
        }
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let pdf = JobPayload::Pdf(DocumentSpec::titled("t")).encode();
        let img = image_payload().encode();
        let png = img.data.clone();
        let spec_only = |spec: &[u8], data: Option<Bytes>| PayloadRecord { spec: spec.to_vec(), data };
        let mut cases: Vec<(&str, JobKind, PayloadRecord, &str)> = vec![
            ("PDF: not JSON", JobKind::Pdf, spec_only(b"not json", None), "not a valid document"),
            ("PDF: empty spec", JobKind::Pdf, spec_only(b"", None), "not a valid document"),
            ("PDF: JSON but not an object", JobKind::Pdf, spec_only(b"[1, 2]", None), "not a valid document"),
            ("image: not JSON", JobKind::Image, spec_only(b"\xff\xfe", png.clone()), "not a valid image task"),
            ("image record read as a PDF", JobKind::Pdf, img.clone(), "no bulk data"),
            ("image spec read as a PDF", JobKind::Pdf, spec_only(&img.spec, None), "missing field `title`"),
            ("PDF record read as an image", JobKind::Image, pdf.clone(), "not a valid image task"),
            ("PDF spec with data read as an image", JobKind::Image, spec_only(&pdf.spec, png.clone()), "missing field"),
            ("image without data", JobKind::Image, spec_only(&img.spec, None), "image bytes are missing"),
            ("image with empty data", JobKind::Image, spec_only(&img.spec, Some(Bytes::new())), "bytes are empty"),
            ("unknown format", JobKind::Image, edited(&img, |j| j["format"] = "jxl".into()), "unknown format \"jxl\""),
            ("format not a string", JobKind::Image, edited(&img, |j| j["format"] = 3.into()), "not a valid image task"),
            ("orientation 0", JobKind::Image, edited(&img, |j| j["orientation"] = 0.into()), "orientation 0 is not"),
            ("orientation 9", JobKind::Image, edited(&img, |j| j["orientation"] = 9.into()), "orientation 9 is not"),
            ("orientation 300", JobKind::Image, edited(&img, |j| j["orientation"] = 300.into()), "not a valid"),
            ("orientation -1", JobKind::Image, edited(&img, |j| j["orientation"] = (-1).into()), "not a valid"),
            (
                "unknown op",
                JobKind::Image,
                edited(&img, |j| j["ops"] = serde_json::json!([{"op": "sharpen"}])),
                "not a valid image task",
            ),
            ("unknown output", JobKind::Image, edited(&img, |j| j["output"] = "avif".into()), "not a valid image task"),
            ("missing field", JobKind::Image, edited(&img, |j| j.as_object_mut().unwrap().clear()), "missing field"),
            (
                "ops that no longer plan to the stored size",
                JobKind::Image,
                edited(&img, |j| j["planned"] = serde_json::json!([1, 1])),
                "the ops make 12x16, not the stored 1x1",
            ),
            (
                "a crop outside the image",
                JobKind::Image,
                edited(&img, |j| {
                    j["ops"] = serde_json::json!([{"op": "crop", "x": 39, "y": 0, "width": 5, "height": 5}])
                }),
                "not inside",
            ),
            (
                "an image over its own pixel limit",
                JobKind::Image,
                edited(&img, |j| j["max_pixels"] = 100.into()),
                "100 pixel limit",
            ),
            ("unknown page size", JobKind::Pdf, edited(&pdf, |j| j["page_size"] = "a3".into()), "not a valid document"),
            (
                "a table row wider than the header",
                JobKind::Pdf,
                edited(&pdf, |j| {
                    j["table"] = serde_json::json!({"columns": ["a", "b"], "rows": [["1"], ["3", "4", "5"]]})
                }),
                "table row 1 has 3 cells, but the table has 2 columns",
            ),
            (
                "a table without columns",
                JobKind::Pdf,
                edited(&pdf, |j| j["table"] = serde_json::json!({"columns": [], "rows": []})),
                "no columns",
            ),
        ];
        #[cfg(feature = "test-hooks")]
        cases.push((
            "an unknown test hook",
            JobKind::Pdf,
            edited(&pdf, |j| j["test_hook"] = "explode".into()),
            "not a valid document",
        ));
        for (name, kind, record, want) in cases {
            match JobPayload::decode(kind, record) {
                Ok(payload) => panic!("{name}: decoded to {payload:?}"),
                Err(e) => assert!(e.contains(want), "{name}: {e:?} does not mention {want:?}"),
            }
        }
    }
}
