//! The kinds of work built in, one folder each: its request types and checks, its runner, its
//! routes and OpenAPI paths. Each depends on the engine's small types ([`crate::kind::Kind`], the
//! job context, the route helpers); nothing in the engine depends on them but start-up, which
//! registers them.
//!
//! - [`pdf`]: documents rendered with printpdf (`POST /generate-pdf`).
//! - [`image`]: uploads decoded, transformed and encoded with the image crate (`POST /images`).

pub mod image;
pub mod pdf;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::image::task::{ImageLimits, ImageOp, ImageTask, OutputFormat};
    use super::image::ImageKind;
    use super::pdf::spec::{DocumentSpec, RenderBudget};
    use super::pdf::PdfKind;
    use crate::domain::PayloadRecord;
    use crate::kind::Kind;

    const PDF: PdfKind = PdfKind::new(RenderBudget { max_pages: 10, max_lines: 100 });

    /// Which kind reads a record back.
    #[derive(Clone, Copy, Debug)]
    enum Reader {
        Pdf,
        Image,
    }

    fn decode(reader: Reader, record: PayloadRecord) -> Result<String, String> {
        match reader {
            Reader::Pdf => PDF.decode(record).map(|d| format!("{d:?}")),
            Reader::Image => ImageKind.decode(record).map(|t| format!("{t:?}")),
        }
    }

    fn image_task() -> ImageTask {
        let img = ::image::DynamicImage::ImageRgb8(::image::RgbImage::from_pixel(40, 30, ::image::Rgb([1, 2, 3])));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), ::image::ImageFormat::Png).unwrap();
        let ops: Arc<[ImageOp]> = Arc::from(vec![ImageOp::Rotate { degrees: 90 }, ImageOp::Thumbnail { size: 16 }]);
        let limits = ImageLimits { max_pixels: 1_000_000, max_jpeg_scans: 100 };
        ImageTask::inspect("file", "a.png", png.into(), ops, OutputFormat::Png, &limits).unwrap()
    }

    /// `record` with its spec's JSON changed by `edit`.
    fn edited(record: &PayloadRecord, edit: impl FnOnce(&mut serde_json::Value)) -> PayloadRecord {
        let mut json: serde_json::Value = serde_json::from_slice(&record.spec).unwrap();
        edit(&mut json);
        PayloadRecord { spec: serde_json::to_vec(&json).unwrap(), data: record.data.clone() }
    }

    #[test]
    fn both_kinds_round_trip() {
        let spec = DocumentSpec::titled("t");
        assert_eq!(PDF.decode(PDF.encode(&spec)).unwrap(), spec);
        let task = image_task();
        assert_eq!(ImageKind.decode(ImageKind.encode(&task)).unwrap(), task);
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let pdf = PDF.encode(&DocumentSpec::titled("t"));
        let img = ImageKind.encode(&image_task());
        let png = img.data.clone();
        let spec_only = |spec: &[u8], data: Option<Bytes>| PayloadRecord { spec: spec.to_vec(), data };
        let mut cases: Vec<(&str, Reader, PayloadRecord, &str)> = vec![
            ("PDF: not JSON", Reader::Pdf, spec_only(b"not json", None), "not a valid document"),
            ("PDF: empty spec", Reader::Pdf, spec_only(b"", None), "not a valid document"),
            ("PDF: JSON but not an object", Reader::Pdf, spec_only(b"[1, 2]", None), "not a valid document"),
            ("image: not JSON", Reader::Image, spec_only(b"\xff\xfe", png.clone()), "not a valid image task"),
            ("image record read as a PDF", Reader::Pdf, img.clone(), "no bulk data"),
            ("image spec read as a PDF", Reader::Pdf, spec_only(&img.spec, None), "missing field `title`"),
            ("PDF record read as an image", Reader::Image, pdf.clone(), "not a valid image task"),
            ("PDF spec with data read as an image", Reader::Image, spec_only(&pdf.spec, png.clone()), "missing field"),
            ("image without data", Reader::Image, spec_only(&img.spec, None), "image bytes are missing"),
            ("image with empty data", Reader::Image, spec_only(&img.spec, Some(Bytes::new())), "bytes are empty"),
            ("unknown format", Reader::Image, edited(&img, |j| j["format"] = "jxl".into()), "unknown format \"jxl\""),
            ("format not a string", Reader::Image, edited(&img, |j| j["format"] = 3.into()), "not a valid image task"),
            ("orientation 0", Reader::Image, edited(&img, |j| j["orientation"] = 0.into()), "orientation 0 is not"),
            ("orientation 9", Reader::Image, edited(&img, |j| j["orientation"] = 9.into()), "orientation 9 is not"),
            ("orientation 300", Reader::Image, edited(&img, |j| j["orientation"] = 300.into()), "not a valid"),
            ("orientation -1", Reader::Image, edited(&img, |j| j["orientation"] = (-1).into()), "not a valid"),
            (
                "unknown op",
                Reader::Image,
                edited(&img, |j| j["ops"] = serde_json::json!([{"op": "sharpen"}])),
                "not a valid image task",
            ),
            ("unknown output", Reader::Image, edited(&img, |j| j["output"] = "avif".into()), "not a valid image task"),
            ("missing field", Reader::Image, edited(&img, |j| j.as_object_mut().unwrap().clear()), "missing field"),
            (
                "ops that no longer plan to the stored size",
                Reader::Image,
                edited(&img, |j| j["planned"] = serde_json::json!([1, 1])),
                "the ops make 12x16, not the stored 1x1",
            ),
            (
                "a crop outside the image",
                Reader::Image,
                edited(&img, |j| {
                    j["ops"] = serde_json::json!([{"op": "crop", "x": 39, "y": 0, "width": 5, "height": 5}])
                }),
                "not inside",
            ),
            (
                "an image over its own pixel limit",
                Reader::Image,
                edited(&img, |j| j["max_pixels"] = 100.into()),
                "100 pixel limit",
            ),
            ("unknown page size", Reader::Pdf, edited(&pdf, |j| j["page_size"] = "a3".into()), "not a valid document"),
            (
                "a table row wider than the header",
                Reader::Pdf,
                edited(&pdf, |j| {
                    j["table"] = serde_json::json!({"columns": ["a", "b"], "rows": [["1"], ["3", "4", "5"]]})
                }),
                "table row 1 has 3 cells, but the table has 2 columns",
            ),
            (
                "a table without columns",
                Reader::Pdf,
                edited(&pdf, |j| j["table"] = serde_json::json!({"columns": [], "rows": []})),
                "no columns",
            ),
        ];
        #[cfg(feature = "test-hooks")]
        cases.push((
            "an unknown test hook",
            Reader::Pdf,
            edited(&pdf, |j| j["test_hook"] = "explode".into()),
            "not a valid document",
        ));
        for (name, reader, record, want) in cases {
            match decode(reader, record) {
                Ok(payload) => panic!("{name}: decoded to {payload:?}"),
                Err(e) => assert!(e.contains(want), "{name}: {e:?} does not mention {want:?}"),
            }
        }
    }
}
