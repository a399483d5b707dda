//! Raw thumbnail speed, outside the service: full decode vs reduced-scale decode of a 4000×3000
//! JPEG, one thread (median of runs), and jobs/s with every core busy.
//!
//! `cargo run --release --example thumbnail_bench [RUNS] [--write PATH] [--image PATH]`
//! With `--write PATH` it also saves the test JPEG (photo-like noise over gradients) for the HTTP
//! benchmark in `bench/thumbnails.sh`; with `--image PATH` it measures that JPEG instead (e.g. the
//! peers' 1920×1080 test image).

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::codecs::jpeg::JpegEncoder;
use image::metadata::Orientation;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use offload::kinds::image::run::{apply, decode, decode_full, encode};
use offload::kinds::image::task::{ImageOp, ImageTask, OutputFormat};

/// The service's allocator (src/main.rs), so that the ratio compares like with like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn photo(w: u32, h: u32) -> Vec<u8> {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let img = RgbImage::from_fn(w, h, |x, y| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let noise = (seed % 48) as u8;
        Rgb([(x * 255 / w) as u8 / 2 + noise, (y * 255 / h) as u8 / 2 + noise, ((x + y) % 256) as u8 / 2 + noise])
    });
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img).write_with_encoder(JpegEncoder::new_with_quality(&mut out, 90)).unwrap();
    out
}

fn task(bytes: &[u8], stored: (u32, u32), ops: Vec<ImageOp>) -> ImageTask {
    let planned = ops.iter().fold(stored, |(w, h), op| op.output_size(w, h));
    ImageTask {
        bytes: bytes.to_vec().into(),
        format: ImageFormat::Jpeg,
        stored,
        orientation: Orientation::NoTransforms,
        ops: Arc::from(ops),
        output: OutputFormat::Jpeg,
        planned,
        stem: "bench".into(),
        max_pixels: 50_000_000,
    }
}

/// Decode, ops, encode: what an image job does, minus the service.
fn thumbnail(t: &ImageTask, scaled: bool) -> usize {
    let decoded = if scaled { decode(t) } else { decode_full(t) };
    let mut img = decoded.unwrap_or_else(|_| panic!("decode"));
    for op in t.ops.iter() {
        img = apply(*op, img);
    }
    encode(&img, t.output).unwrap_or_else(|_| panic!("encode")).len()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    offload::process::disable_huge_pages();
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(15);
    let flag = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let jpeg = match flag("--image") {
        Some(path) => std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")),
        None => photo(4000, 3000),
    };
    if let Some(path) = flag("--write") {
        std::fs::write(path, &jpeg).unwrap();
    }
    let stored = image::ImageReader::with_format(std::io::Cursor::new(&jpeg), ImageFormat::Jpeg)
        .into_dimensions()
        .unwrap_or_else(|e| panic!("not a JPEG: {e}"));
    let t = task(&jpeg, stored, vec![ImageOp::Thumbnail { size: 256 }]);
    for (name, scaled) in [("full decode + thumbnail", false), ("scaled decode + thumbnail", true)] {
        thumbnail(&t, scaled);
        let times: Vec<Duration> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                thumbnail(&t, scaled);
                start.elapsed()
            })
            .collect();
        println!("{name:28} median {:7.1} ms  ({runs} runs, one thread)", median(times).as_secs_f64() * 1000.0);
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_thread = runs.max(10);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..cores {
            s.spawn(|| {
                for _ in 0..per_thread {
                    thumbnail(&t, true);
                }
            });
        }
    });
    let rate = (cores * per_thread) as f64 / start.elapsed().as_secs_f64();
    println!(
        "scaled thumbnails, {cores} threads: {rate:.1} jobs/s ({}x{} JPEG, {} KiB)",
        stored.0,
        stored.1,
        jpeg.len() / 1024
    );
}
