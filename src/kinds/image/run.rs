//! Image jobs: decode under limits (at reduced scale when the first op shrinks a JPEG a lot),
//! make it upright (EXIF orientation), apply the ops in order, encode. Progress and a cancel
//! check between stages.

use std::io::Cursor;

use bytes::Bytes;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader, Rgb, RgbImage};

use super::task::{decode_limits, swaps_axes, Axis, ImageOp, ImageTask, OutputFormat};
use crate::error::ErrorBody;
use crate::kind::{JobContext, JobFailure, JobOutput, Outcome};

/// JPEG quality of `jpeg` output.
const JPEG_QUALITY: u8 = 85;

pub fn process(task: &ImageTask, job: &mut JobContext) -> Outcome {
    let stages = task.ops.len() + 2;
    let at = |stage: usize| stage as f32 / stages as f32;
    job.progress(0.0, || "decoding".into());
    let mut img = decode(task)?;
    for (i, op) in task.ops.iter().enumerate() {
        job.checkpoint()?;
        job.progress(at(i + 1), || format!("{} ({} of {})", op.name(), i + 1, task.ops.len()));
        img = apply(*op, img);
    }
    job.checkpoint()?;
    job.progress(at(stages - 1), || "encoding".into());
    let bytes = encode(&img, task.output)?;
    Ok(JobOutput {
        bytes,
        content_type: task.output.content_type(),
        filename: format!("{}.{}", task.stem, task.output.extension()),
        extra: serde_json::json!({"width": img.width(), "height": img.height()})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    })
}

fn failure(code: &str, message: impl Into<String>) -> JobFailure {
    JobFailure::Error(ErrorBody::new(code, message))
}

/// Decodes the upload, upright. A JPEG whose first op shrinks it at least 2× on both sides is
/// decoded at reduced scale (the IDCT scales by 1/2, 1/4 or 1/8), which skips most of the work
/// after entropy decoding.
pub fn decode(task: &ImageTask) -> Result<DynamicImage, JobFailure> {
    if task.format == ImageFormat::Jpeg && jpeg_is_truncated(&task.bytes) {
        return Err(failure("truncated_image", "the JPEG file is cut short: it has no end-of-image marker"));
    }
    let scaled = scaled_jpeg_target(task).and_then(|(w, h)| decode_jpeg_scaled(task, w, h));
    let mut img = scaled.map_or_else(|| decode_full(task), Ok)?;
    img.apply_orientation(task.orientation);
    Ok(img)
}

/// The size, in stored (not yet rotated) pixels, to ask a scaled JPEG decode for.
fn scaled_jpeg_target(task: &ImageTask) -> Option<(u32, u32)> {
    if task.format != ImageFormat::Jpeg {
        return None;
    }
    let first = task.ops.first()?;
    if !matches!(first, ImageOp::Thumbnail { .. } | ImageOp::Resize { .. }) {
        return None;
    }
    let (sw, sh) = task.stored;
    let upright = if swaps_axes(task.orientation) { (sh, sw) } else { (sw, sh) };
    let (tw, th) = first.output_size(upright.0, upright.1);
    let (tw, th) = if swaps_axes(task.orientation) { (th, tw) } else { (tw, th) };
    (tw * 2 <= sw && th * 2 <= sh).then_some((tw, th))
}

/// libjpeg-turbo's DCT scaling (through the `mozjpeg` crate): the IDCT runs at 1/2 or 1/4 or
/// 1/8 size, on this thread only, picking the smallest scale that still covers `w`×`h`.
/// `None`: decode it in full instead. That is the answer for what this path does not handle
/// (CMYK, a header that disagrees with the size checked at upload) and for any libjpeg error
/// (12-bit, arithmetic-coded or lossless JPEGs, broken files): the full decoder has the last word
/// on what is valid, so the shortcut never changes which uploads fail or how.
fn decode_jpeg_scaled(task: &ImageTask, w: u32, h: u32) -> Option<DynamicImage> {
    // libjpeg reports errors by unwinding out of its error handler (without the panic hook).
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<DynamicImage>> {
        let mut decoder = mozjpeg::Decompress::new_mem(&task.bytes)?;
        let (sw, sh) = decoder.size();
        // Its memory is bounded by the size the upload was checked against (`max_pixels`).
        if (sw, sh) != (task.stored.0 as usize, task.stored.1 as usize) {
            return Ok(None);
        }
        let covers = |eighths: usize| sw * eighths / 8 >= w as usize && sh * eighths / 8 >= h as usize;
        let Some(eighths) = [1u8, 2, 4].into_iter().find(|&n| covers(usize::from(n))) else {
            return Ok(None);
        };
        decoder.scale(eighths);
        let gray = match decoder.color_space() {
            mozjpeg::ColorSpace::JCS_GRAYSCALE => true,
            mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_RGB => false,
            _ => return Ok(None),
        };
        let mut started = if gray { decoder.grayscale()? } else { decoder.rgb()? };
        let (ow, oh) = (started.width() as u32, started.height() as u32);
        let pixels: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        Ok(if gray {
            image::GrayImage::from_raw(ow, oh, pixels).map(DynamicImage::ImageLuma8)
        } else {
            RgbImage::from_raw(ow, oh, pixels).map(DynamicImage::ImageRgb8)
        })
    });
    match decoded {
        Ok(Ok(img)) => img,
        Ok(Err(e)) => {
            tracing::debug!("scaled JPEG decode gave up, decoding in full: {e}");
            None
        }
        Err(payload) => {
            let text = payload.downcast_ref::<String>().map_or("unknown libjpeg error", String::as_str);
            tracing::debug!("scaled JPEG decode gave up, decoding in full: {text}");
            None
        }
    }
}

/// Decodes every pixel (no reduced-scale shortcut), under the decoder limits.
pub fn decode_full(task: &ImageTask) -> Result<DynamicImage, JobFailure> {
    let mut reader = ImageReader::with_format(Cursor::new(&task.bytes[..]), task.format);
    reader.limits(decode_limits(task.max_pixels));
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            failure("image_too_large", format!("the image needs more memory than its limit: {e}"))
        }
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            failure("truncated_image", "the image file is cut short")
        }
        other => {
            let text = other.to_string();
            let lower = text.to_ascii_lowercase();
            if lower.contains("eof")
                || lower.contains("end of")
                || lower.contains("truncated")
                || lower.contains("unexpected end")
            {
                failure("truncated_image", format!("the image file is cut short: {text}"))
            } else {
                failure("invalid_image", format!("the image cannot be decoded: {text}"))
            }
        }
    })
}

/// A JPEG ends with the EOI marker (FF D9), possibly followed by padding. Without it the file
/// was cut short, and the decoder would fill the missing part with grey instead of failing.
pub fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0x00 && b != b'\n' && b != b'\r' && b != b' ').map_or(0, |i| i + 1);
    let tail = &bytes[..end];
    // Some writers append data after EOI; look for it near the end only, where the scan data of
    // a truncated file cannot contain it (an FF byte in scan data is always followed by 00).
    let window = &tail[tail.len().saturating_sub(4096)..];
    !window.windows(2).any(|w| w == [0xFF, 0xD9])
}

pub fn apply(op: ImageOp, img: DynamicImage) -> DynamicImage {
    let (w, h) = (img.width(), img.height());
    match op {
        ImageOp::Thumbnail { .. } => {
            let (nw, nh) = op.output_size(w, h);
            if (nw, nh) == (w, h) {
                img
            } else {
                img.thumbnail_exact(nw, nh)
            }
        }
        ImageOp::Resize { .. } => {
            let (nw, nh) = op.output_size(w, h);
            img.resize_exact(nw, nh, FilterType::CatmullRom)
        }
        ImageOp::Crop { x, y, width, height } => img.crop_imm(x, y, width, height),
        ImageOp::Rotate { degrees: 90 } => img.rotate90(),
        ImageOp::Rotate { degrees: 180 } => img.rotate180(),
        ImageOp::Rotate { .. } => img.rotate270(),
        ImageOp::Flip { axis: Axis::Horizontal } => img.fliph(),
        ImageOp::Flip { axis: Axis::Vertical } => img.flipv(),
        ImageOp::Grayscale => img.grayscale(),
        ImageOp::Blur { sigma } => img.fast_blur(sigma),
        ImageOp::Brighten { value } => img.brighten(value),
        ImageOp::Contrast { value } => img.adjust_contrast(value),
    }
}

pub fn encode(img: &DynamicImage, format: OutputFormat) -> Result<Bytes, JobFailure> {
    let mut out = Vec::new();
    let result = match format {
        OutputFormat::Png => img.write_with_encoder(PngEncoder::new(&mut out)),
        OutputFormat::Jpeg => {
            let rgb = flatten_on_white(img);
            rgb.write_with_encoder(JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY))
        }
        OutputFormat::Webp => {
            if img.color().has_alpha() {
                img.to_rgba8().write_with_encoder(WebPEncoder::new_lossless(&mut out))
            } else {
                img.to_rgb8().write_with_encoder(WebPEncoder::new_lossless(&mut out))
            }
        }
    };
    result.map_err(|e| failure("encode_failed", format!("the result cannot be encoded: {e}")))?;
    Ok(Bytes::from(out))
}

/// JPEG has no alpha: composite transparent images over white instead of dropping the channel.
fn flatten_on_white(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = u16::from(p[3]);
        let mix = |c: u8| ((u16::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jpeg_without_its_end_marker_is_truncated() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, Rgb([200, 10, 10])));
        let jpeg = encode(&img, OutputFormat::Jpeg).unwrap();
        assert!(!jpeg_is_truncated(&jpeg));
        let mut padded = jpeg.to_vec();
        padded.extend_from_slice(&[0, 0, 0]);
        assert!(!jpeg_is_truncated(&padded));
        assert!(jpeg_is_truncated(&jpeg[..jpeg.len() - 2]));
        assert!(jpeg_is_truncated(&jpeg[..jpeg.len() / 2]));
    }

    fn thumbnail_task(bytes: Vec<u8>, stored: (u32, u32)) -> ImageTask {
        let ops: std::sync::Arc<[ImageOp]> = std::sync::Arc::from(vec![ImageOp::Thumbnail { size: 256 }]);
        ImageTask {
            planned: ops[0].output_size(stored.0, stored.1),
            bytes: bytes.into(),
            format: ImageFormat::Jpeg,
            stored,
            orientation: image::metadata::Orientation::NoTransforms,
            ops,
            output: OutputFormat::Jpeg,
            stem: "t".into(),
            max_pixels: 50_000_000,
        }
    }

    #[test]
    fn a_jpeg_shrunk_4x_is_decoded_at_a_quarter_scale_in_its_own_colours() {
        for (img, gray) in [
            (DynamicImage::ImageRgb8(RgbImage::from_pixel(1024, 768, Rgb([200, 40, 90]))), false),
            (DynamicImage::ImageLuma8(image::GrayImage::from_pixel(1024, 768, image::Luma([77]))), true),
        ] {
            let mut jpeg = Vec::new();
            img.write_with_encoder(JpegEncoder::new_with_quality(&mut jpeg, 90)).unwrap();
            let task = thumbnail_task(jpeg, (1024, 768));
            assert_eq!(scaled_jpeg_target(&task), Some((256, 192)));
            let decoded = decode_jpeg_scaled(&task, 256, 192).expect("scaled");
            assert_eq!((decoded.width(), decoded.height()), (256, 192), "2/8 of 1024x768");
            assert_eq!(decoded.color().has_color(), !gray);
            let centre = decoded.to_rgb8().get_pixel(128, 96).0;
            let want = img.to_rgb8().get_pixel(0, 0).0;
            for (c, w) in centre.iter().zip(want) {
                assert!(c.abs_diff(w) <= 3, "{centre:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn a_broken_jpeg_falls_back_to_the_full_decoder_which_refuses_it() {
        let mut garbage = vec![0xFF, 0xD8];
        garbage.extend_from_slice(b"no frame header here, only text");
        garbage.extend_from_slice(&[0xFF, 0xD9]);
        let task = thumbnail_task(garbage, (1024, 768));
        assert!(decode_jpeg_scaled(&task, 256, 192).is_none(), "libjpeg's error is caught");
        let Err(JobFailure::Error(e)) = decode(&task) else { panic!("expected an error") };
        // The full decoder's verdict, as for any upload that never took the scaled path.
        assert!(matches!(e.code.as_str(), "invalid_image" | "truncated_image"), "{}: {}", e.code, e.message);
    }

    #[test]
    fn a_header_that_disagrees_with_the_checked_size_is_not_decoded_scaled() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(1024, 768, Rgb([1, 2, 3])));
        let mut jpeg = Vec::new();
        img.write_with_encoder(JpegEncoder::new_with_quality(&mut jpeg, 90)).unwrap();
        assert!(decode_jpeg_scaled(&thumbnail_task(jpeg, (1000, 768)), 256, 192).is_none());
    }

    #[test]
    fn transparent_pixels_become_white_in_jpeg() {
        let img = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(2, 2, image::Rgba([0, 0, 0, 0])));
        assert_eq!(flatten_on_white(&img).get_pixel(0, 0).0, [255, 255, 255]);
    }
}
