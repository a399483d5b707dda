//! PDF jobs: lay the document out ([`layout`]), turn each page into printpdf operations with a
//! progress report and a cancel check per page, and serialize the document.

pub mod layout;
pub mod metrics;

use bytes::Bytes;
use printpdf::{
    BuiltinFont, Color, Greyscale, Line, LinePoint, OffsetDateTime, Op, PaintMode, PdfDocument, PdfFontHandle, PdfPage,
    PdfSaveOptions, Point, Pt, Rect, TextItem, TextMatrix,
};

use self::layout::{Item, PageLayout, Stop};
use self::metrics::Face;
use crate::error::ErrorBody;
use crate::kind::{JobContext, JobFailure, JobOutput, Outcome};
use crate::kinds::pdf::spec::{DocumentSpec, RenderBudget};

/// Renders `spec` to PDF bytes within `budget`, reporting progress per page.
pub fn render(spec: &DocumentSpec, budget: RenderBudget, job: &mut JobContext) -> Outcome {
    #[cfg(feature = "test-hooks")]
    test_hooks::before(spec, job)?;
    job.progress(0.0, || "laying out".into());
    let layout = layout::layout(spec, budget, || job.checkpoint()).map_err(|stop| match stop {
        Stop::Checkpoint(failure) => failure,
        Stop::TooLarge(message) => JobFailure::Error(ErrorBody::new("document_too_large", message)),
    })?;
    let total = layout.pages.len();
    let mut pages = Vec::with_capacity(total);
    // Each page's layout is dropped once it became operations: the two never both exist whole.
    for (i, page) in layout.pages.into_iter().enumerate() {
        job.checkpoint()?;
        #[cfg(feature = "test-hooks")]
        test_hooks::per_page(spec);
        let size = Rect::from_wh(Pt(layout.width), Pt(layout.height));
        pages.push(PdfPage {
            media_box: size.clone(),
            trim_box: size.clone(),
            crop_box: size,
            ops: page_ops(&page, layout.height),
        });
        let done = i + 1;
        job.progress(0.05 + 0.85 * done as f32 / total as f32, || format!("page {done} of {total}"));
    }
    job.checkpoint()?;
    job.progress(0.9, || "writing the file".into());
    let mut doc = PdfDocument::new(&spec.title);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if let Ok(date) = OffsetDateTime::from_unix_timestamp(now) {
        doc.metadata.info.creation_date = date;
        doc.metadata.info.modification_date = date;
        doc.metadata.info.metadata_date = date;
    }
    doc.metadata.info.producer = "offload".into();
    let mut warnings = Vec::new();
    let bytes = doc.with_pages(pages).save(&PdfSaveOptions::default(), &mut warnings);
    Ok(JobOutput {
        bytes: Bytes::from(bytes),
        content_type: "application/pdf",
        filename: format!("{}.pdf", slug(&spec.title)),
        extra: Default::default(),
    })
}

/// printpdf operations for one page: fills and rules first, then all text in one text section.
fn page_ops(page: &PageLayout, height: f32) -> Vec<Op> {
    let mut ops = Vec::with_capacity(page.items.len() * 2 + 8);
    let mut fill_gray = None;
    ops.push(Op::SetOutlineColor { col: gray(0.6) });
    ops.push(Op::SetOutlineThickness { pt: Pt(0.5) });
    for item in &page.items {
        match item {
            Item::Fill { x, top, width, height: h, gray: g } => {
                set_fill(&mut ops, &mut fill_gray, *g);
                let mut rect = Rect::from_xywh(Pt(*x), Pt(height - top - h), Pt(*width), Pt(*h));
                rect.mode = Some(PaintMode::Fill);
                ops.push(Op::DrawRectangle { rectangle: rect });
            }
            Item::Rule { x1, y1, x2, y2 } => {
                let point = |x: f32, y: f32| LinePoint { p: Point { x: Pt(x), y: Pt(height - y) }, bezier: false };
                ops.push(Op::DrawLine {
                    line: Line { points: vec![point(*x1, *y1), point(*x2, *y2)], is_closed: false },
                });
            }
            Item::Text { .. } => {}
        }
    }
    ops.push(Op::StartTextSection);
    let mut font = None;
    for item in &page.items {
        if let Item::Text { x, baseline, face, size, gray: g, text } = item {
            if font != Some((*face, *size)) {
                font = Some((*face, *size));
                let builtin = match face {
                    Face::Regular => BuiltinFont::Helvetica,
                    Face::Bold => BuiltinFont::HelveticaBold,
                };
                ops.push(Op::SetFont { font: PdfFontHandle::Builtin(builtin), size: Pt(*size) });
            }
            set_fill(&mut ops, &mut fill_gray, *g);
            ops.push(Op::SetTextMatrix { matrix: TextMatrix::Translate(Pt(*x), Pt(height - baseline)) });
            ops.push(Op::ShowText { items: vec![TextItem::Text(text.clone())] });
        }
    }
    ops.push(Op::EndTextSection);
    ops
}

fn gray(level: f32) -> Color {
    Color::Greyscale(Greyscale { percent: level, icc_profile: None })
}

fn set_fill(ops: &mut Vec<Op>, current: &mut Option<f32>, level: f32) {
    if *current != Some(level) {
        *current = Some(level);
        ops.push(Op::SetFillColor { col: gray(level) });
    }
}

/// A filename stem from a title: lowercase ASCII letters and digits joined by dashes.
fn slug(title: &str) -> String {
    let mut out = String::new();
    for word in title.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()) {
        if out.len() + word.len() > 60 {
            break;
        }
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(&word.to_ascii_lowercase());
    }
    if out.is_empty() {
        "document".into()
    } else {
        out
    }
}

#[cfg(feature = "test-hooks")]
mod test_hooks {
    use std::time::Duration;

    use crate::kind::{JobContext, JobFailure};
    use crate::kinds::pdf::spec::{DocumentSpec, TestHook};

    pub fn before(spec: &DocumentSpec, job: &JobContext) -> Result<(), JobFailure> {
        match spec.test_hook {
            Some(TestHook::Panic) => panic!("test hook: a panic inside the PDF worker"),
            Some(TestHook::Abort) => std::process::abort(),
            Some(TestHook::Hang) => loop {
                job.checkpoint()?;
                std::thread::sleep(Duration::from_millis(5));
            },
            _ => Ok(()),
        }
    }

    pub fn per_page(spec: &DocumentSpec) {
        if let Some(TestHook::SlowPages { millis }) = spec.test_hook {
            std::thread::sleep(Duration::from_millis(millis));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_safe_filenames() {
        assert_eq!(slug("Quarterly report: Q3/2026"), "quarterly-report-q3-2026");
        assert_eq!(slug("../../etc/passwd"), "etc-passwd");
        assert_eq!(slug("Ωμέγα"), "document");
        assert!(slug(&"word ".repeat(100)).len() <= 60);
    }
}
