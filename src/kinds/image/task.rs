//! Image jobs as uploaded to `POST /images`: the operations (`ops`), the output format, and the
//! checks that run before anything is decoded (format from the bytes, declared size, what the
//! op chain would produce).

use std::borrow::Cow;
use std::io::Cursor;
use std::sync::Arc;

use bytes::Bytes;
use image::metadata::Orientation;
use image::{ImageDecoder, ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Pixel limits and the like, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct ImageLimits {
    /// Most pixels of an input, of an output, and of any step in between.
    pub max_pixels: u64,
    /// Most scans (SOS segments) in a JPEG: see [`jpeg_scan_count`].
    pub max_jpeg_scans: usize,
}

/// Most operations in one `ops` array.
pub const MAX_OPS: usize = 32;
/// Largest side any op may ask for.
pub const MAX_SIDE: u32 = 50_000;

/// One step of the chain, as the API names it. Serialize/Deserialize are the stored form (the
/// same shape as the API's, `{"op": "thumbnail", "size": 256}`); requests go through [`parse_ops`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ImageOp {
    /// Fit inside size×size, keeping the aspect ratio; never enlarges.
    Thumbnail {
        size: u32,
    },
    /// One side given: the other keeps the aspect ratio.
    Resize {
        width: Option<u32>,
        height: Option<u32>,
    },
    Crop {
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    },
    /// Clockwise.
    Rotate {
        degrees: u16,
    },
    Flip {
        axis: Axis,
    },
    Grayscale,
    Blur {
        sigma: f32,
    },
    /// Added to each channel, −255 to 255.
    Brighten {
        value: i32,
    },
    /// Percent, −100 to 100.
    Contrast {
        value: f32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    Horizontal,
    Vertical,
}

impl ImageOp {
    pub fn name(&self) -> &'static str {
        match self {
            ImageOp::Thumbnail { .. } => "thumbnail",
            ImageOp::Resize { .. } => "resize",
            ImageOp::Crop { .. } => "crop",
            ImageOp::Rotate { .. } => "rotate",
            ImageOp::Flip { .. } => "flip",
            ImageOp::Grayscale => "grayscale",
            ImageOp::Blur { .. } => "blur",
            ImageOp::Brighten { .. } => "brighten",
            ImageOp::Contrast { .. } => "contrast",
        }
    }

    /// The size this op turns a `w`×`h` image into.
    pub fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        match *self {
            ImageOp::Thumbnail { size } => {
                if w <= size && h <= size {
                    (w, h)
                } else {
                    fit(w, h, size, size)
                }
            }
            ImageOp::Resize { width: Some(nw), height: Some(nh) } => (nw, nh),
            ImageOp::Resize { width: Some(nw), height: None } => (nw, scale(h, nw, w)),
            ImageOp::Resize { width: None, height: Some(nh) } => (scale(w, nh, h), nh),
            ImageOp::Resize { width: None, height: None } => (w, h),
            ImageOp::Crop { width, height, .. } => (width, height),
            ImageOp::Rotate { degrees: 90 | 270 } => (h, w),
            _ => (w, h),
        }
    }
}

/// `a * num / den`, rounded, at least 1.
fn scale(a: u32, num: u32, den: u32) -> u32 {
    ((u64::from(a) * u64::from(num) + u64::from(den) / 2) / u64::from(den).max(1)).clamp(1, u64::from(u32::MAX)) as u32
}

/// The largest size with the aspect ratio of `w`×`h` that fits in `max_w`×`max_h`.
pub fn fit(w: u32, h: u32, max_w: u32, max_h: u32) -> (u32, u32) {
    let (w64, h64) = (u64::from(w), u64::from(h));
    if w64 * u64::from(max_h) >= h64 * u64::from(max_w) {
        (max_w, scale(h, max_w, w))
    } else {
        (scale(w, max_h, h), max_h)
    }
}

/// Output encodings (stored as `"png"`, `"jpeg"`, `"webp"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "png" => Ok(OutputFormat::Png),
            "jpeg" | "jpg" => Ok(OutputFormat::Jpeg),
            "webp" => Ok(OutputFormat::Webp),
            _ => Err(ImageError::invalid("format: must be png, jpeg or webp")),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpg",
            OutputFormat::Webp => "webp",
        }
    }
}

/// Why an upload was refused before any job was made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ImageError {
    /// 413, 415 or 422.
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ImageError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ImageError { status, code, message: message.into() }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "invalid_field", message)
    }

    fn op(index: usize, name: &str, message: impl std::fmt::Display) -> Self {
        Self::new(422, "invalid_op", format!("ops[{index}] ({name}): {message}"))
    }
}

/// The default chain when `ops` is absent.
pub fn default_ops() -> Vec<ImageOp> {
    vec![ImageOp::Thumbnail { size: 256 }]
}

/// Parses the `ops` field (a JSON array), naming the op at fault.
pub fn parse_ops(text: &str) -> Result<Vec<ImageOp>, ImageError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ImageError::invalid(format!("ops: not valid JSON: {e}")))?;
    let Value::Array(items) = value else { return Err(ImageError::invalid("ops: must be a JSON array of operations")) };
    if items.len() > MAX_OPS {
        return Err(ImageError::invalid(format!("ops: {} operations, the limit is {MAX_OPS}", items.len())));
    }
    items.iter().enumerate().map(|(i, item)| parse_op(i, item)).collect()
}

fn parse_op(i: usize, item: &Value) -> Result<ImageOp, ImageError> {
    let Some(obj) = item.as_object() else {
        return Err(ImageError::op(i, "?", "must be an object like {\"op\": \"thumbnail\", \"size\": 256}"));
    };
    let Some(name) = obj.get("op").and_then(Value::as_str) else {
        return Err(ImageError::op(i, "?", "needs an \"op\" name"));
    };
    let allowed: &[&str] = match name {
        "thumbnail" => &["size"],
        "resize" => &["width", "height"],
        "crop" => &["x", "y", "width", "height"],
        "rotate" => &["degrees"],
        "flip" => &["axis"],
        "grayscale" => &[],
        "blur" => &["sigma"],
        "brighten" | "contrast" => &["value"],
        other => {
            return Err(ImageError::op(
                i,
                other,
                "unknown op; use thumbnail, resize, crop, rotate, flip, grayscale, blur, brighten or contrast",
            ))
        }
    };
    if let Some(extra) = obj.keys().find(|k| *k != "op" && !allowed.contains(&k.as_str())) {
        return Err(ImageError::op(i, name, format!("unknown parameter \"{extra}\"")));
    }
    let int = |key: &str, min: i64, max: i64| -> Result<Option<i64>, ImageError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ImageError::op(i, name, format!("{key} must be a whole number from {min} to {max}"))),
            },
        }
    };
    let required = |key: &str, min: i64, max: i64| -> Result<i64, ImageError> {
        int(key, min, max)?.ok_or_else(|| ImageError::op(i, name, format!("{key} is required")))
    };
    let side = i64::from(MAX_SIDE);
    Ok(match name {
        "thumbnail" => ImageOp::Thumbnail { size: required("size", 1, side)? as u32 },
        "resize" => {
            let width = int("width", 1, side)?.map(|n| n as u32);
            let height = int("height", 1, side)?.map(|n| n as u32);
            if width.is_none() && height.is_none() {
                return Err(ImageError::op(i, name, "give width, height or both"));
            }
            ImageOp::Resize { width, height }
        }
        "crop" => ImageOp::Crop {
            x: required("x", 0, side)? as u32,
            y: required("y", 0, side)? as u32,
            width: required("width", 1, side)? as u32,
            height: required("height", 1, side)? as u32,
        },
        "rotate" => match required("degrees", 0, 360)? {
            d @ (90 | 180 | 270) => ImageOp::Rotate { degrees: d as u16 },
            _ => return Err(ImageError::op(i, name, "degrees must be 90, 180 or 270")),
        },
        "flip" => match obj.get("axis").and_then(Value::as_str) {
            Some("horizontal") => ImageOp::Flip { axis: Axis::Horizontal },
            Some("vertical") => ImageOp::Flip { axis: Axis::Vertical },
            _ => return Err(ImageError::op(i, name, "axis must be \"horizontal\" or \"vertical\"")),
        },
        "grayscale" => ImageOp::Grayscale,
        "blur" => match obj.get("sigma").and_then(Value::as_f64) {
            Some(s) if (0.1..=100.0).contains(&s) => ImageOp::Blur { sigma: s as f32 },
            _ => return Err(ImageError::op(i, name, "sigma must be a number from 0.1 to 100")),
        },
        "brighten" => ImageOp::Brighten { value: required("value", -255, 255)? as i32 },
        _ => match obj.get("value").and_then(Value::as_f64) {
            Some(v) if (-100.0..=100.0).contains(&v) => ImageOp::Contrast { value: v as f32 },
            _ => return Err(ImageError::op(i, name, "value must be a number from -100 to 100")),
        },
    })
}

/// Walks the chain over an upright `w`×`h` input: every crop must fit, and no step may exceed
/// the pixel limit. Returns the output size.
pub fn plan(w: u32, h: u32, ops: &[ImageOp], limits: &ImageLimits) -> Result<(u32, u32), ImageError> {
    let (mut w, mut h) = (w, h);
    for (i, op) in ops.iter().enumerate() {
        if let ImageOp::Crop { x, y, width, height } = *op {
            if u64::from(x) + u64::from(width) > u64::from(w) || u64::from(y) + u64::from(height) > u64::from(h) {
                return Err(ImageError::op(
                    i,
                    op.name(),
                    format!("the {width}x{height} area at ({x}, {y}) is not inside the {w}x{h} image"),
                ));
            }
        }
        (w, h) = op.output_size(w, h);
        if u64::from(w) * u64::from(h) > limits.max_pixels {
            return Err(ImageError::new(
                422,
                "image_too_large",
                format!("ops[{i}] ({}): the {w}x{h} result is over the {} pixel limit", op.name(), limits.max_pixels),
            ));
        }
    }
    Ok((w, h))
}

/// A filename stem safe for `Content-Disposition`: the client's base name without its extension,
/// ASCII letters, digits, `-` and `_` only, at most 64 characters.
pub fn safe_stem(client_name: &str) -> String {
    let base = client_name.rsplit(['/', '\\']).next().unwrap_or("");
    let stem = match base.rfind('.') {
        Some(dot) if dot > 0 => &base[..dot],
        _ => base,
    };
    let mut out = String::new();
    for c in stem.chars() {
        if out.len() >= 64 {
            break;
        }
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "image".into()
    } else {
        out
    }
}

/// A checked upload, ready for a worker: a supported format, within the pixel limit, with an op
/// chain that fits it.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTask {
    pub bytes: Bytes,
    pub format: ImageFormat,
    /// Size as stored, before the EXIF orientation is applied.
    pub stored: (u32, u32),
    pub orientation: Orientation,
    pub ops: Arc<[ImageOp]>,
    pub output: OutputFormat,
    /// Size of the result, as planned.
    pub planned: (u32, u32),
    /// Safe stem for the result's filename.
    pub stem: String,
    pub max_pixels: u64,
}

/// Input formats we accept, always detected from the bytes.
pub const INPUT_FORMATS: [ImageFormat; 6] =
    [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Gif, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Tiff];

impl ImageTask {
    /// Checks one uploaded file without decoding its pixels: detects the format from the bytes,
    /// reads the declared size and orientation from the header, and plans the op chain.
    /// `field` names the part in error messages (e.g. `file[1] (cat.png)`).
    pub fn inspect(
        field: &str,
        client_name: &str,
        bytes: Bytes,
        ops: Arc<[ImageOp]>,
        output: OutputFormat,
        limits: &ImageLimits,
    ) -> Result<Self, ImageError> {
        if bytes.is_empty() {
            return Err(ImageError::new(422, "empty_file", format!("{field}: the file is empty")));
        }
        let unsupported = || {
            ImageError::new(
                415,
                "unsupported_image",
                format!("{field}: not a supported image (PNG, JPEG, GIF, WebP, BMP or TIFF, detected from the bytes)"),
            )
        };
        let format = image::guess_format(&bytes).map_err(|_| unsupported())?;
        if !INPUT_FORMATS.contains(&format) {
            return Err(unsupported());
        }
        let mut reader = ImageReader::with_format(Cursor::new(bytes.clone()), format);
        reader.limits(decode_limits(limits.max_pixels));
        let unreadable = |e: image::ImageError| match e {
            image::ImageError::Limits(_) => ImageError::new(
                422,
                "image_too_large",
                format!("{field}: the image declares more than {} pixels", limits.max_pixels),
            ),
            other => {
                ImageError::new(422, "invalid_image", format!("{field}: the image header cannot be read: {other}"))
            }
        };
        let mut decoder = reader.into_decoder().map_err(unreadable)?;
        let (w, h) = decoder.dimensions();
        if u64::from(w) * u64::from(h) > limits.max_pixels {
            return Err(ImageError::new(
                422,
                "image_too_large",
                format!("{field}: {w}x{h} is over the {} pixel limit", limits.max_pixels),
            ));
        }
        match format {
            ImageFormat::Gif => check_gif_frames(&bytes, field, limits.max_pixels)?,
            ImageFormat::Tiff => check_tiff_pages(&bytes, field, limits.max_pixels)?,
            ImageFormat::WebP => check_webp_frames(&bytes, field, (w, h))?,
            _ => {}
        }
        if format == ImageFormat::Jpeg {
            let scans = jpeg_scan_count(&bytes);
            if scans > limits.max_jpeg_scans {
                return Err(ImageError::new(
                    422,
                    "invalid_image",
                    format!("{field}: the JPEG has {scans} scans, more than the limit of {}", limits.max_jpeg_scans),
                ));
            }
        }
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        let upright = if swaps_axes(orientation) { (h, w) } else { (w, h) };
        let planned = plan(upright.0, upright.1, &ops, limits)
            .map_err(|e| ImageError { message: format!("{field}: {}", e.message), ..e })?;
        Ok(ImageTask {
            bytes,
            format,
            stored: (w, h),
            orientation,
            ops,
            output,
            planned,
            stem: safe_stem(client_name),
            max_pixels: limits.max_pixels,
        })
    }

    /// Approximate bytes this task holds while queued.
    pub fn approx_bytes(&self) -> usize {
        self.bytes.len() + self.stem.len() + 256
    }

    /// The stored spec: JSON of every field but `bytes` (those are stored beside it as they are).
    pub(super) fn encode_spec(&self) -> Vec<u8> {
        let stored = StoredImage {
            format: Cow::Borrowed(format_name(self.format)),
            stored: self.stored,
            orientation: self.orientation.to_exif(),
            ops: Cow::Borrowed(&self.ops[..]),
            output: self.output,
            planned: self.planned,
            stem: Cow::Borrowed(&self.stem),
            max_pixels: self.max_pixels,
        };
        // Cannot fail: no maps with non-string keys, no fallible Serialize impls.
        serde_json::to_vec(&stored).expect("an image spec serializes to JSON")
    }

    /// A task from its stored spec and the uploaded bytes. Checks what the worker relies on: a
    /// known format and orientation, bytes present, and an op chain that still plans to the
    /// stored result size within the stored pixel limit.
    pub(super) fn decode_stored(spec: &[u8], data: Option<Bytes>) -> Result<Self, String> {
        let s: StoredImage =
            serde_json::from_slice(spec).map_err(|e| format!("stored image spec: not a valid image task: {e}"))?;
        let bytes = match data {
            Some(bytes) if !bytes.is_empty() => bytes,
            Some(_) => return Err("stored image task: the image bytes are empty".into()),
            None => return Err("stored image task: the image bytes are missing".into()),
        };
        let format = format_from_name(&s.format).ok_or_else(|| {
            format!("stored image spec: unknown format {:?} (png, jpeg, gif, webp, bmp or tiff)", s.format)
        })?;
        let orientation = Orientation::from_exif(s.orientation).ok_or_else(|| {
            format!("stored image spec: orientation {} is not an EXIF orientation (1 to 8)", s.orientation)
        })?;
        if s.ops.len() > MAX_OPS {
            return Err(format!("stored image spec: {} operations, the limit is {MAX_OPS}", s.ops.len()));
        }
        let (w, h) = s.stored;
        if u64::from(w) * u64::from(h) > s.max_pixels {
            return Err(format!("stored image spec: a {w}x{h} image with a {} pixel limit", s.max_pixels));
        }
        let upright = if swaps_axes(orientation) { (h, w) } else { (w, h) };
        let limits = ImageLimits { max_pixels: s.max_pixels, max_jpeg_scans: usize::MAX };
        match plan(upright.0, upright.1, &s.ops, &limits) {
            Ok(planned) if planned == s.planned => {}
            Ok(planned) => {
                return Err(format!(
                    "stored image spec: the ops make {}x{}, not the stored {}x{}",
                    planned.0, planned.1, s.planned.0, s.planned.1
                ))
            }
            Err(e) => return Err(format!("stored image spec: {}", e.message)),
        }
        Ok(ImageTask {
            bytes,
            format,
            stored: s.stored,
            orientation,
            ops: Arc::from(s.ops.into_owned()),
            output: s.output,
            planned: s.planned,
            stem: s.stem.into_owned(),
            max_pixels: s.max_pixels,
        })
    }
}

/// The stored form of an [`ImageTask`] without its bytes. Foreign types are kept as values of
/// our own: the format as a name ([`format_name`]), the orientation as its EXIF number (1-8).
/// Borrows on encode (no copies on the HTTP thread), owns on decode.
#[derive(Serialize, Deserialize)]
struct StoredImage<'a> {
    format: Cow<'a, str>,
    stored: (u32, u32),
    orientation: u8,
    ops: Cow<'a, [ImageOp]>,
    output: OutputFormat,
    planned: (u32, u32),
    stem: Cow<'a, str>,
    max_pixels: u64,
}

/// The stored name of an input format. Tasks only hold [`INPUT_FORMATS`] (see
/// [`ImageTask::inspect`]); any other is stored as `"unsupported"`, which decoding refuses.
fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Gif => "gif",
        ImageFormat::WebP => "webp",
        ImageFormat::Bmp => "bmp",
        ImageFormat::Tiff => "tiff",
        _ => "unsupported",
    }
}

fn format_from_name(name: &str) -> Option<ImageFormat> {
    Some(match name {
        "png" => ImageFormat::Png,
        "jpeg" => ImageFormat::Jpeg,
        "gif" => ImageFormat::Gif,
        "webp" => ImageFormat::WebP,
        "bmp" => ImageFormat::Bmp,
        "tiff" => ImageFormat::Tiff,
        _ => return None,
    })
}

/// Most frames of a GIF or an animated WebP, and pages of a TIFF, an upload may have.
pub const MAX_FRAMES: usize = 10_000;

/// Every frame of a GIF within the pixel limit, read from the frame descriptors without
/// decoding any pixels: the logical screen (all the header says) bounds nothing, and a decoder
/// allocates a frame's own size (a 12000×12000 frame on a 1×1 screen is 144 megapixels).
pub fn check_gif_frames(bytes: &[u8], field: &str, max_pixels: u64) -> Result<(), ImageError> {
    let invalid =
        |e: gif::DecodingError| ImageError::new(422, "invalid_image", format!("{field}: the GIF cannot be read: {e}"));
    let mut options = gif::DecodeOptions::new();
    options.skip_frame_decoding(true);
    options.set_memory_limit(gif::MemoryLimit::Bytes(std::num::NonZeroU64::new(16 << 20).expect("non-zero")));
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(invalid)?;
    let mut frames = 0usize;
    while let Some(frame) = decoder.next_frame_info().map_err(invalid)? {
        let (w, h) = (frame.width, frame.height);
        if u64::from(w) * u64::from(h) > max_pixels {
            return Err(ImageError::new(
                422,
                "image_too_large",
                format!("{field}: frame {frames} is {w}x{h}, over the {max_pixels} pixel limit"),
            ));
        }
        frames += 1;
        if frames > MAX_FRAMES {
            return Err(ImageError::new(422, "invalid_image", format!("{field}: more than {MAX_FRAMES} frames")));
        }
    }
    Ok(())
}

/// Checks the size of every page of a TIFF against the pixel limit, by walking the image
/// directories by hand: only the width and length tags are read (no strip tables, no pixel data,
/// nothing about features of pages that are never decoded), every directory once, at most
/// [`MAX_FRAMES`] pages and a million entries in all. Only the first page is decoded, but a file
/// whose later pages are huge is not one to accept. Classic and BigTIFF.
pub fn check_tiff_pages(bytes: &[u8], field: &str, max_pixels: u64) -> Result<(), ImageError> {
    const MAX_ENTRIES: u64 = 1_000_000;
    let invalid = |m: &str| ImageError::new(422, "invalid_image", format!("{field}: the TIFF cannot be read: {m}"));
    let cut = || invalid("a directory points past the end of the file");
    let le = match bytes.get(..2) {
        Some(b"II") => true,
        Some(b"MM") => false,
        _ => return Err(invalid("no byte order mark")),
    };
    let read = |at: u64, n: usize| -> Option<u64> {
        let at = usize::try_from(at).ok()?;
        let raw = bytes.get(at..at.checked_add(n)?)?;
        let mut value = 0u64;
        for i in 0..n {
            let byte = if le { raw[n - 1 - i] } else { raw[i] };
            value = value << 8 | u64::from(byte);
        }
        Some(value)
    };
    let big = match read(2, 2) {
        Some(42) => false,
        Some(43) => true,
        _ => return Err(invalid("not a TIFF version this reads")),
    };
    // (bytes of the entry count, of an entry, of an offset; where an entry's value is)
    let (count_len, entry_len, offset_len, value_at) = if big { (8, 20u64, 8, 12) } else { (2, 12u64, 4, 8) };
    let mut next = read(if big { 8 } else { 4 }, offset_len).ok_or_else(cut)?;
    let mut seen = std::collections::HashSet::new();
    let mut entries_seen = 0u64;
    let mut page = 0usize;
    while next != 0 {
        if page >= MAX_FRAMES {
            return Err(ImageError::new(422, "invalid_image", format!("{field}: more than {MAX_FRAMES} pages")));
        }
        if !seen.insert(next) {
            return Err(invalid("its image directories form a loop"));
        }
        let count = read(next, count_len).ok_or_else(cut)?;
        entries_seen = entries_seen.saturating_add(count);
        if entries_seen > MAX_ENTRIES {
            return Err(invalid("too many directory entries"));
        }
        let first = next.saturating_add(count_len as u64);
        let (mut width, mut length) = (None, None);
        for i in 0..count {
            let entry = first.saturating_add(i * entry_len);
            let tag = read(entry, 2).ok_or_else(cut)?;
            let at = |offset: u64| entry.saturating_add(offset);
            if tag != 256 && tag != 257 {
                continue;
            }
            let value = match read(at(2), 2).ok_or_else(cut)? {
                3 => read(at(value_at), 2),
                4 => read(at(value_at), 4),
                16 => read(at(value_at), 8),
                _ => None,
            };
            if tag == 256 {
                width = value
            } else {
                length = value
            }
        }
        if let (Some(w), Some(h)) = (width, length) {
            if w.saturating_mul(h) > max_pixels {
                return Err(ImageError::new(
                    422,
                    "image_too_large",
                    format!("{field}: page {page} is {w}x{h}, over the {max_pixels} pixel limit"),
                ));
            }
        }
        next = read(first.saturating_add(count.saturating_mul(entry_len)), offset_len).ok_or_else(cut)?;
        page += 1;
    }
    Ok(())
}

/// Checks every frame of an animated WebP (its `ANMF` chunks) against the canvas the header
/// declares (already checked against the pixel limit): a frame must lie inside it. At most
/// [`MAX_FRAMES`] frames. Walks the RIFF chunks only; a still WebP has none to check.
pub fn check_webp_frames(bytes: &[u8], field: &str, canvas: (u32, u32)) -> Result<(), ImageError> {
    let invalid = |m: String| ImageError::new(422, "invalid_image", format!("{field}: {m}"));
    let u24 = |b: &[u8]| u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16;
    let mut at = 12; // "RIFF", size, "WEBP"
    let mut frames = 0usize;
    while at + 8 <= bytes.len() {
        let fourcc = &bytes[at..at + 4];
        let size = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        let payload = &bytes[at + 8..bytes.len().min(at + 8 + size)];
        if fourcc == b"ANMF" {
            if payload.len() < 16 {
                return Err(invalid(format!("animation frame {frames} is cut short")));
            }
            let (x, y) = (u24(&payload[0..3]) * 2, u24(&payload[3..6]) * 2);
            let (w, h) = (u24(&payload[6..9]) + 1, u24(&payload[9..12]) + 1);
            if u64::from(x) + u64::from(w) > u64::from(canvas.0) || u64::from(y) + u64::from(h) > u64::from(canvas.1) {
                return Err(ImageError::new(
                    422,
                    "image_too_large",
                    format!(
                        "{field}: animation frame {frames} is {w}x{h} at ({x}, {y}), outside the {}x{} canvas",
                        canvas.0, canvas.1
                    ),
                ));
            }
            frames += 1;
            if frames > MAX_FRAMES {
                return Err(invalid(format!("more than {MAX_FRAMES} frames")));
            }
        }
        // Chunks are padded to an even size.
        match at.checked_add(8).and_then(|a| a.checked_add(size)).and_then(|a| a.checked_add(size & 1)) {
            Some(next) => at = next,
            None => break,
        }
    }
    Ok(())
}

/// Whether an EXIF orientation turns the image on its side.
/// How many scans (SOS segments) a JPEG has, found by walking its markers: segment payloads are
/// skipped by their length (an APP segment may hold any bytes), and inside entropy-coded data only
/// a marker ends the scan (data bytes `FF` are followed by `00`, restart markers by `D0`-`D7`).
/// Stops at EOI or at the end of the bytes. Baseline JPEGs have one scan, progressive ones one per
/// pass; decoders make a pass over the whole image for every scan.
pub fn jpeg_scan_count(bytes: &[u8]) -> usize {
    let (mut i, mut scans) = (2, 0); // after SOI
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF {
            // Entropy-coded data: jump to the next FF (a byte-at-a-time walk took 3.3 ms on a
            // 5.4 MB upload, memchr 0.45 ms).
            match memchr::memchr(0xFF, &bytes[i..]) {
                Some(k) => i += k,
                None => break,
            }
            continue;
        }
        match bytes[i + 1] {
            0xFF => i += 1,                      // fill byte before a marker
            0x00 | 0x01 | 0xD0..=0xD8 => i += 2, // stuffed byte, TEM, RSTn, SOI
            0xD9 => break,                       // EOI
            marker => {
                let Some(len) = bytes.get(i + 2..i + 4) else { break };
                if marker == 0xDA {
                    scans += 1;
                }
                // The length counts its own two bytes; a broken one (< 2) still moves forward.
                i += 2 + usize::from(u16::from_be_bytes([len[0], len[1]])).max(2);
            }
        }
    }
    scans
}

pub fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    )
}

/// Decoder limits for a pixel budget: no side longer than the budget allows, and allocations
/// bounded to the budget at 16 bytes a pixel (RGBA with 32-bit floats) plus slack.
pub fn decode_limits(max_pixels: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    let side = u32::try_from(max_pixels.min(u64::from(u32::MAX))).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(64 << 20));
    limits
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ImageLimits = ImageLimits { max_pixels: 50_000_000, max_jpeg_scans: 100 };

    fn baseline_jpeg() -> Vec<u8> {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(64, 48, image::Rgb([9, 99, 199])));
        let mut jpeg = Vec::new();
        img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)).unwrap();
        jpeg
    }

    /// `jpeg` with `extra` more scans (SOS segment plus entropy-coded bytes, including a stuffed
    /// FF 00 and a restart marker) inserted before its EOI.
    fn with_extra_scans(jpeg: &[u8], extra: usize) -> Vec<u8> {
        let mut out = jpeg[..jpeg.len() - 2].to_vec();
        for _ in 0..extra {
            out.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00]);
            out.extend_from_slice(&[0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3, 0x56]);
        }
        out.extend_from_slice(&[0xFF, 0xD9]);
        out
    }

    #[test]
    fn scans_are_counted_by_walking_markers() {
        let jpeg = baseline_jpeg();
        assert_eq!(jpeg_scan_count(&jpeg), 1, "a baseline JPEG has one scan");
        assert_eq!(jpeg_scan_count(&with_extra_scans(&jpeg, 150)), 151);
        // FF DA inside an APP segment's payload is data, not a scan.
        let mut app = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x0A];
        app.extend_from_slice(&[0xFF, 0xDA, 0xFF, 0xDA, 0xFF, 0xDA, 0xFF, 0xDA]);
        app.extend_from_slice(&jpeg[2..]);
        assert_eq!(jpeg_scan_count(&app), 1);
        // Cut short or broken lengths end the walk without a panic.
        for cut in [0, 1, 2, 3, 5, jpeg.len() / 2] {
            jpeg_scan_count(&jpeg[..cut]);
        }
        jpeg_scan_count(&[0xFF, 0xD8, 0xFF, 0xC4, 0x00, 0x00, 0xFF, 0xDA, 0x00, 0x01]);
    }

    #[test]
    fn a_jpeg_with_more_scans_than_the_limit_is_refused_at_upload() {
        let inspect = |bytes: Vec<u8>| {
            let ops: Arc<[ImageOp]> = Arc::from(default_ops());
            ImageTask::inspect("file", "a.jpg", bytes.into(), ops, OutputFormat::Jpeg, &LIMITS)
        };
        assert!(inspect(with_extra_scans(&baseline_jpeg(), 99)).is_ok(), "100 scans: at the limit");
        let err = inspect(with_extra_scans(&baseline_jpeg(), 100)).unwrap_err();
        assert_eq!((err.status, err.code), (422, "invalid_image"));
        assert!(err.message.contains("101 scans"), "{}", err.message);
    }

    #[test]
    fn every_op_parses() {
        let ops = parse_ops(
            r#"[{"op":"thumbnail","size":256},{"op":"resize","width":100},{"op":"crop","x":0,"y":0,"width":10,"height":5},
               {"op":"rotate","degrees":90},{"op":"flip","axis":"vertical"},{"op":"grayscale"},{"op":"blur","sigma":1.5},
               {"op":"brighten","value":-20},{"op":"contrast","value":12.5}]"#,
        )
        .unwrap();
        assert_eq!(ops.len(), 9);
        assert_eq!(ops[3], ImageOp::Rotate { degrees: 90 });
        assert_eq!(ops[8], ImageOp::Contrast { value: 12.5 });
    }

    #[test]
    fn bad_ops_name_the_op_and_its_index() {
        let cases = [
            (r#"{"op":"thumbnail"}"#, "ops: must be a JSON array"),
            (r#"[{"op":"sharpen"}]"#, "ops[0] (sharpen): unknown op"),
            (r#"[{"size":3}]"#, "ops[0] (?): needs an \"op\""),
            (r#"[{"op":"thumbnail"}]"#, "ops[0] (thumbnail): size is required"),
            (r#"[{"op":"grayscale"},{"op":"thumbnail","size":0}]"#, "ops[1] (thumbnail): size must be"),
            (r#"[{"op":"resize"}]"#, "ops[0] (resize): give width, height or both"),
            (r#"[{"op":"rotate","degrees":45}]"#, "ops[0] (rotate): degrees must be 90, 180 or 270"),
            (r#"[{"op":"flip","axis":"diagonal"}]"#, "ops[0] (flip): axis"),
            (r#"[{"op":"blur","sigma":0}]"#, "ops[0] (blur): sigma"),
            (r#"[{"op":"blur","sigma":101}]"#, "ops[0] (blur): sigma"),
            (r#"[{"op":"brighten","value":300}]"#, "ops[0] (brighten): value"),
            (r#"[{"op":"contrast","value":-101}]"#, "ops[0] (contrast): value"),
            (r#"[{"op":"crop","x":0,"y":0,"width":5}]"#, "ops[0] (crop): height is required"),
            (r#"[{"op":"thumbnail","size":10,"colour":"red"}]"#, "ops[0] (thumbnail): unknown parameter"),
            ("[1]", "ops[0] (?): must be an object"),
            ("not json", "ops: not valid JSON"),
        ];
        for (text, want) in cases {
            let err = parse_ops(text).expect_err(text);
            assert!(err.message.starts_with(want), "{text}: {}", err.message);
            assert_eq!(err.status, 422);
        }
    }

    #[test]
    fn planning_follows_sizes_and_checks_crops_and_limits() {
        let ops = parse_ops(r#"[{"op":"rotate","degrees":90},{"op":"thumbnail","size":256}]"#).unwrap();
        assert_eq!(plan(4000, 3000, &ops, &LIMITS).unwrap(), (192, 256));
        let small = parse_ops(r#"[{"op":"thumbnail","size":256}]"#).unwrap();
        assert_eq!(plan(100, 50, &small, &LIMITS).unwrap(), (100, 50), "never enlarges");
        let resize = parse_ops(r#"[{"op":"resize","height":150}]"#).unwrap();
        assert_eq!(plan(400, 300, &resize, &LIMITS).unwrap(), (200, 150));
        let crop = parse_ops(r#"[{"op":"crop","x":350,"y":0,"width":100,"height":10}]"#).unwrap();
        assert!(plan(400, 300, &crop, &LIMITS).unwrap_err().message.contains("not inside"));
        let huge = parse_ops(r#"[{"op":"resize","width":50000,"height":50000}]"#).unwrap();
        assert_eq!(plan(10, 10, &huge, &LIMITS).unwrap_err().code, "image_too_large");
    }

    #[test]
    fn an_image_task_round_trips_with_its_bytes_beside_the_spec() {
        let img = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(60, 40, image::Rgba([9, 99, 199, 255])));
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), ImageFormat::Png).unwrap();
        let ops: Arc<[ImageOp]> = Arc::from(vec![
            ImageOp::Crop { x: 5, y: 4, width: 50, height: 30 },
            ImageOp::Rotate { degrees: 270 },
            ImageOp::Flip { axis: Axis::Horizontal },
            ImageOp::Resize { width: None, height: Some(40) },
            ImageOp::Resize { width: Some(20), height: Some(30) },
            ImageOp::Grayscale,
            ImageOp::Blur { sigma: 0.3 },
            ImageOp::Brighten { value: -20 },
            ImageOp::Contrast { value: 12.7 },
            ImageOp::Thumbnail { size: 16 },
        ]);
        let task = ImageTask::inspect("file", "../My Photo.png", png.into(), ops, OutputFormat::Webp, &LIMITS).unwrap();
        assert_eq!(task.orientation, Orientation::NoTransforms, "no EXIF");
        use crate::kind::Kind;
        let record = crate::kinds::image::ImageKind.encode(&task);
        let data = record.data.clone().expect("the bytes go beside the spec");
        assert_eq!(data.as_ptr(), task.bytes.as_ptr(), "shared, not copied");
        let json: Value = serde_json::from_slice(&record.spec).unwrap();
        assert_eq!(json["format"], "png");
        assert_eq!(json["orientation"], 1);
        assert_eq!(json["output"], "webp");
        assert_eq!(json["ops"][0], serde_json::json!({"op": "crop", "x": 5, "y": 4, "width": 50, "height": 30}));
        assert_eq!(json["ops"][5], serde_json::json!({"op": "grayscale"}));
        assert!(json.get("bytes").is_none());
        assert_eq!(crate::kinds::image::ImageKind.decode(record).unwrap(), task);
    }

    #[test]
    fn every_input_format_and_orientation_has_a_stored_value() {
        for format in INPUT_FORMATS {
            assert_eq!(format_from_name(format_name(format)), Some(format), "{format:?}");
        }
        assert_eq!(format_from_name(format_name(ImageFormat::Avif)), None);
        for n in 1..=8 {
            assert_eq!(Orientation::from_exif(n).map(Orientation::to_exif), Some(n));
        }
    }

    #[test]
    fn client_filenames_never_become_paths() {
        assert_eq!(safe_stem("../../etc/passwd"), "passwd");
        assert_eq!(safe_stem("a.png%00.php"), "a-png-00");
        assert_eq!(safe_stem("C:\\photos\\IMG 0001.JPG"), "IMG-0001");
        assert_eq!(safe_stem(".hidden"), "hidden");
        assert_eq!(safe_stem(""), "image");
        assert_eq!(safe_stem("Ωμέγα.png"), "image");
        assert!(safe_stem(&"a".repeat(10_000)).len() <= 64);
    }

    #[test]
    fn malformed_webp_chunks_are_errors_or_ignored_never_panics() {
        let riff = |chunks: &[u8]| [b"RIFF\0\0\0\0WEBP".as_slice(), chunks].concat();
        let short = riff(b"ANMF\x04\0\0\0abcd");
        assert_eq!(check_webp_frames(&short, "f", (1, 1)).unwrap_err().code, "invalid_image");
        for harmless in [riff(b"JUNK\xff\xff\xff\xff"), riff(b"ANM"), riff(b""), b"RIFF".to_vec()] {
            assert!(check_webp_frames(&harmless, "f", (1, 1)).is_ok(), "{harmless:?}");
        }
    }

    /// A classic TIFF header and directories, little or big endian: each page (width, length,
    /// where its next directory is: `None` for the end, `Some(n)` for directory n).
    fn tiff(le: bool, pages: &[(u32, u32, Option<usize>)]) -> Vec<u8> {
        let u16b = |v: u16| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let u32b = |v: u32| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let dir = |n: usize| 8 + n * (2 + 2 * 12 + 4);
        let mut t = if le { b"II".to_vec() } else { b"MM".to_vec() };
        t.extend(u16b(42));
        t.extend(u32b(8));
        for &(w, h, next) in pages {
            t.extend(u16b(2));
            for (tag, value) in [(256u16, w), (257, h)] {
                t.extend(u16b(tag));
                t.extend(u16b(4));
                t.extend(u32b(1));
                t.extend(u32b(value));
            }
            t.extend(u32b(next.map_or(0, |n| dir(n) as u32)));
        }
        t
    }

    #[test]
    fn tiff_pages_are_read_from_their_directories_and_bad_ones_refused() {
        // (file, the error code or None when it passes)
        let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
            ("two small pages", tiff(true, &[(10, 10, Some(1)), (20, 20, None)]), None),
            ("big endian", tiff(false, &[(10, 10, Some(1)), (20, 20, None)]), None),
            ("a huge second page", tiff(true, &[(1, 1, Some(1)), (12_000, 12_000, None)]), Some("image_too_large")),
            ("a loop", tiff(true, &[(1, 1, Some(1)), (1, 1, Some(0))]), Some("invalid_image")),
            ("cut short", tiff(true, &[(1, 1, Some(1))]), Some("invalid_image")),
            (
                "far offset",
                {
                    let mut t = tiff(true, &[(1, 1, None)]);
                    t[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
                    t
                },
                Some("invalid_image"),
            ),
            ("not a TIFF", b"IIxx\0\0\0\0".to_vec(), Some("invalid_image")),
        ];
        for (name, bytes, want) in cases {
            let got = check_tiff_pages(&bytes, "f", 50_000_000).err().map(|e| e.code);
            assert_eq!(got, want, "{name}");
        }
    }
}
