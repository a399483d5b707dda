//! Image jobs end to end, with images generated here: every format in and out, every op, EXIF
//! orientation, and a table of hostile uploads.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::Value;

use crate::helpers::{duration, id_of, settings, spawn_app, spawn_app_with, Part, TestApp, BOUNDARY};

/// A `w`×`h` image: red left half, blue right half, a green square in the top-left corner.
fn picture(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        if x < w / 8 && y < h / 8 {
            Rgb([0, 200, 0])
        } else if x < w / 2 {
            Rgb([220, 20, 20])
        } else {
            Rgb([20, 20, 220])
        }
    }))
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    match format {
        ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::Bmp => img.to_rgb8().write_to(&mut out, format).unwrap(),
        _ => img.write_to(&mut out, format).unwrap(),
    }
    out.into_inner()
}

/// A `w`×`h` PNG of the test picture.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    encode(&picture(w, h), ImageFormat::Png)
}

async fn finished_result(app: &TestApp, job: &Value) -> (Value, crate::helpers::Reply) {
    let done = app.wait_finished(id_of(job)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let result = app.get(done["result"]["url"].as_str().unwrap()).await;
    assert_eq!(result.status.as_u16(), 200);
    (done, result)
}

fn color_at(img: &DynamicImage, x: u32, y: u32) -> [u8; 3] {
    img.to_rgb8().get_pixel(x, y).0
}

fn is_red(c: [u8; 3]) -> bool {
    c[0] > 150 && c[1] < 90 && c[2] < 90
}

fn is_blue(c: [u8; 3]) -> bool {
    c[2] > 150 && c[0] < 90 && c[1] < 90
}

#[actix_web::test]
async fn every_input_format_becomes_every_output_format() {
    let app = spawn_app().await;
    let inputs = [
        (ImageFormat::Png, "in.png"),
        (ImageFormat::Jpeg, "in.jpg"),
        (ImageFormat::Gif, "in.gif"),
        (ImageFormat::WebP, "in.webp"),
        (ImageFormat::Bmp, "in.bmp"),
        (ImageFormat::Tiff, "in.tiff"),
    ];
    let outputs = [
        ("png", ImageFormat::Png, "image/png"),
        ("jpeg", ImageFormat::Jpeg, "image/jpeg"),
        ("webp", ImageFormat::WebP, "image/webp"),
    ];
    let source = picture(600, 400);
    for (format, name) in inputs {
        for (out_name, out_format, content_type) in outputs {
            let parts =
                [Part::file(name, "application/octet-stream", encode(&source, format)), Part::text("format", out_name)];
            let jobs = app.submit_images(&parts).await;
            assert_eq!(jobs.len(), 1);
            assert_eq!(jobs[0]["kind"], "image");
            let (done, result) = finished_result(&app, &jobs[0]).await;
            assert_eq!(done["result"]["content_type"], content_type);
            assert_eq!((done["result"]["width"].as_u64(), done["result"]["height"].as_u64()), (Some(256), Some(171)));
            assert_eq!(result.header("content-type").unwrap(), content_type);
            assert_eq!(image::guess_format(&result.body).unwrap(), out_format, "{name} -> {out_name}");
            let back = image::load_from_memory(&result.body).unwrap();
            assert_eq!((back.width(), back.height()), (256, 171));
            assert!(is_red(color_at(&back, 100, 150)) && is_blue(color_at(&back, 200, 100)), "{name} -> {out_name}");
        }
    }
}

#[actix_web::test]
async fn every_op_does_what_it_says() {
    let app = spawn_app().await;
    let png = encode(&picture(200, 100), ImageFormat::Png);
    // (ops, expected size, check on the result)
    type Check = fn(&DynamicImage) -> bool;
    let cases: Vec<(&str, (u32, u32), Check)> = vec![
        (r#"[{"op":"thumbnail","size":50}]"#, (50, 25), |i| {
            is_red(color_at(i, 15, 20)) && is_blue(color_at(i, 40, 20))
        }),
        (r#"[{"op":"thumbnail","size":1000}]"#, (200, 100), |i| is_red(color_at(i, 50, 50))),
        (r#"[{"op":"resize","width":100}]"#, (100, 50), |i| is_blue(color_at(i, 90, 40))),
        (r#"[{"op":"resize","width":30,"height":90}]"#, (30, 90), |_| true),
        (r#"[{"op":"crop","x":100,"y":0,"width":50,"height":40}]"#, (50, 40), |i| is_blue(color_at(i, 25, 20))),
        (r#"[{"op":"rotate","degrees":90}]"#, (100, 200), |i| {
            is_red(color_at(i, 50, 50)) && is_blue(color_at(i, 50, 150))
        }),
        (r#"[{"op":"rotate","degrees":180}]"#, (200, 100), |i| {
            is_blue(color_at(i, 10, 50)) && color_at(i, 195, 95)[1] > 150
        }),
        (r#"[{"op":"rotate","degrees":270}]"#, (100, 200), |i| {
            is_blue(color_at(i, 50, 50)) && is_red(color_at(i, 50, 150))
        }),
        (r#"[{"op":"flip","axis":"horizontal"}]"#, (200, 100), |i| {
            is_blue(color_at(i, 10, 50)) && color_at(i, 195, 5)[1] > 150
        }),
        (r#"[{"op":"flip","axis":"vertical"}]"#, (200, 100), |i| color_at(i, 5, 95)[1] > 150),
        (r#"[{"op":"grayscale"}]"#, (200, 100), |i| {
            let c = color_at(i, 50, 50);
            c[0] == c[1] && c[1] == c[2]
        }),
        (r#"[{"op":"blur","sigma":8}]"#, (200, 100), |i| {
            let c = color_at(i, 100, 50);
            c[0] > 60 && c[2] > 60
        }),
        (r#"[{"op":"brighten","value":100}]"#, (200, 100), |i| color_at(i, 50, 50)[1] >= 110),
        (r#"[{"op":"contrast","value":-90}]"#, (200, 100), |i| color_at(i, 50, 50)[0] < 180),
        (
            r#"[{"op":"crop","x":0,"y":0,"width":100,"height":100},{"op":"rotate","degrees":90},{"op":"flip","axis":"horizontal"},{"op":"grayscale"},{"op":"resize","height":20}]"#,
            (20, 20),
            |_| true,
        ),
    ];
    for (ops, (w, h), check) in cases {
        let jobs = app.submit_images(&[Part::file("p.png", "image/png", png.clone()), Part::text("ops", ops)]).await;
        let (done, result) = finished_result(&app, &jobs[0]).await;
        assert_eq!(
            (done["result"]["width"].as_u64().unwrap(), done["result"]["height"].as_u64().unwrap()),
            (w.into(), h.into()),
            "{ops}"
        );
        let img = image::load_from_memory(&result.body).unwrap();
        assert_eq!((img.width(), img.height()), (w, h), "{ops}");
        assert!(check(&img), "{ops}: pixels not as expected");
    }
}

/// A baseline JPEG with an EXIF APP1 segment saying `orientation`.
fn jpeg_with_orientation(img: &DynamicImage, orientation: u16) -> Vec<u8> {
    let jpeg = encode(img, ImageFormat::Jpeg);
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01".to_vec();
    tiff.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01]);
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[actix_web::test]
async fn phone_photos_come_out_upright() {
    let app = spawn_app().await;
    // Stored landscape, red left / blue right; orientation 6 means "rotate 90° clockwise to show",
    // so upright it is portrait with red on top. 1600x800 takes the scaled-decode path; 400x200
    // the full decode.
    for (w, h) in [(1600, 800), (400, 200)] {
        let photo = jpeg_with_orientation(&picture(w, h), 6);
        let jobs = app.submit_images(&[Part::file("IMG_0001.JPG", "image/jpeg", photo)]).await;
        let (done, result) = finished_result(&app, &jobs[0]).await;
        assert_eq!(
            (done["result"]["width"].as_u64(), done["result"]["height"].as_u64()),
            (Some(128), Some(256)),
            "{w}x{h}"
        );
        let img = image::load_from_memory(&result.body).unwrap();
        assert!(is_red(color_at(&img, 64, 60)), "{w}x{h}: top should be red, is {:?}", color_at(&img, 64, 60));
        assert!(is_blue(color_at(&img, 64, 200)), "{w}x{h}: bottom should be blue");
    }
}

#[actix_web::test]
async fn big_jpeg_thumbnails_match_the_full_decode() {
    let app = spawn_app().await;
    let photo = encode(&picture(4000, 3000), ImageFormat::Jpeg);
    let jobs = app.submit_images(&[Part::file("big.jpg", "image/jpeg", photo), Part::text("format", "png")]).await;
    let (done, result) = finished_result(&app, &jobs[0]).await;
    assert_eq!((done["result"]["width"].as_u64(), done["result"]["height"].as_u64()), (Some(256), Some(192)));
    let img = image::load_from_memory(&result.body).unwrap();
    assert!(is_red(color_at(&img, 60, 150)) && is_blue(color_at(&img, 200, 150)));
    assert!(color_at(&img, 10, 10)[1] > 150, "the green corner survives the scaled decode");
}

#[actix_web::test]
async fn transparency_is_kept_in_png_and_webp_and_flattened_on_white_in_jpeg() {
    let app = spawn_app().await;
    // Left half opaque red, right half fully transparent.
    let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(400, 200, |x, _| {
        if x < 200 {
            image::Rgba([220, 20, 20, 255])
        } else {
            image::Rgba([0, 0, 0, 0])
        }
    }));
    let png = encode(&rgba, ImageFormat::Png);
    for format in ["png", "webp", "jpeg"] {
        let jobs =
            app.submit_images(&[Part::file("logo.png", "image/png", png.clone()), Part::text("format", format)]).await;
        let (_, result) = finished_result(&app, &jobs[0]).await;
        let img = image::load_from_memory(&result.body).unwrap().to_rgba8();
        assert_eq!(img.dimensions(), (256, 128));
        let right = img.get_pixel(200, 64).0;
        if format == "jpeg" {
            assert!(
                right[0] > 240 && right[1] > 240 && right[2] > 240,
                "jpeg: transparent area should be white: {right:?}"
            );
        } else {
            assert_eq!(right[3], 0, "{format}: transparency lost");
        }
        assert!(
            is_red([img.get_pixel(50, 64).0[0], img.get_pixel(50, 64).0[1], img.get_pixel(50, 64).0[2]]),
            "{format}"
        );
    }
}

#[actix_web::test]
async fn several_files_make_jobs_in_order() {
    let app = spawn_app().await;
    let parts: Vec<Part> = [40u32, 60, 80]
        .iter()
        .map(|&w| Part::file(&format!("{w}.png"), "image/png", encode(&picture(w, 20), ImageFormat::Png)))
        .chain([Part::text("ops", r#"[{"op":"grayscale"}]"#)])
        .collect();
    let jobs = app.submit_images(&parts).await;
    assert_eq!(jobs.len(), 3);
    for (job, w) in jobs.iter().zip([40, 60, 80]) {
        let (done, result) = finished_result(&app, job).await;
        assert_eq!(done["result"]["width"], w);
        assert!(result.header("content-disposition").unwrap().contains(&format!("{w}.png")));
    }
}

/// A GIF whose logical screen is 1×1 and whose one frame declares `w`×`h` (its data is a
/// couple of bytes: nothing checks them before a decoder allocates the frame).
fn gif_with_frame(w: u16, h: u16) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&[1, 0, 1, 0, 0x80, 0, 0]); // 1x1 screen, a 2-colour global table
    g.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    g.push(0x2C); // image descriptor
    g.extend_from_slice(&[0, 0, 0, 0]);
    g.extend_from_slice(&w.to_le_bytes());
    g.extend_from_slice(&h.to_le_bytes());
    g.push(0);
    g.extend_from_slice(&[2, 2, 0x4C, 0x01, 0]); // LZW minimum code size, one data block, end
    g.push(0x3B);
    g
}

/// A greyscale TIFF with one page per `(w, h)`: the first page's pixel (one byte) is real,
/// later pages only declare their size (one byte of data each), as a file whose first page is
/// small and whose next page is huge would.
fn tiff_with_pages(pages: &[(u32, u32)]) -> Vec<u8> {
    const ENTRIES: usize = 9;
    let ifd_len = 2 + ENTRIES * 12 + 4;
    let data_at = 8 + pages.len() * ifd_len;
    let mut t = b"II".to_vec();
    t.extend_from_slice(&42u16.to_le_bytes());
    t.extend_from_slice(&8u32.to_le_bytes());
    for (i, &(w, h)) in pages.iter().enumerate() {
        t.extend_from_slice(&(ENTRIES as u16).to_le_bytes());
        let bytes = if i == 0 { w * h } else { 1 };
        // (tag, type: 3 SHORT or 4 LONG, value)
        let entries: [(u16, u16, u32); ENTRIES] = [
            (256, 4, w),
            (257, 4, h),
            (258, 3, 8),
            (259, 3, 1),
            (262, 3, 1),
            (273, 4, data_at as u32),
            (277, 3, 1),
            (278, 4, h),
            (279, 4, bytes),
        ];
        for (tag, kind, value) in entries {
            t.extend_from_slice(&tag.to_le_bytes());
            t.extend_from_slice(&kind.to_le_bytes());
            t.extend_from_slice(&1u32.to_le_bytes());
            t.extend_from_slice(&value.to_le_bytes());
        }
        let next = if i + 1 < pages.len() { 8 + (i + 1) * ifd_len } else { 0 };
        t.extend_from_slice(&(next as u32).to_le_bytes());
    }
    let (w, h) = pages[0];
    t.extend(std::iter::repeat_n(0x80u8, (w * h) as usize));
    t
}

/// An animated WebP on a `canvas`, one lossless 1×1 picture per frame, each frame declaring
/// `(x, y, w, h)` (x and y even).
fn animated_webp(canvas: (u32, u32), frames: &[(u32, u32, u32, u32)]) -> Vec<u8> {
    let still = encode(&picture(1, 1), ImageFormat::WebP);
    let vp8l = &still[12..]; // the one chunk after "RIFF" size "WEBP"
    let u24 = |v: u32| v.to_le_bytes()[..3].to_vec();
    let chunk = |fourcc: &[u8], payload: &[u8]| {
        let mut c = fourcc.to_vec();
        c.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        c.extend_from_slice(payload);
        if payload.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    let mut vp8x = vec![0x02, 0, 0, 0]; // animation
    vp8x.extend(u24(canvas.0 - 1));
    vp8x.extend(u24(canvas.1 - 1));
    let mut body = b"WEBP".to_vec();
    body.extend(chunk(b"VP8X", &vp8x));
    body.extend(chunk(b"ANIM", &[0, 0, 0, 0, 0, 0]));
    for &(x, y, w, h) in frames {
        let mut anmf = Vec::new();
        for v in [x / 2, y / 2, w - 1, h - 1, 100] {
            anmf.extend(u24(v));
        }
        anmf.push(0);
        anmf.extend_from_slice(vp8l);
        body.extend(chunk(b"ANMF", &anmf));
    }
    let mut riff = b"RIFF".to_vec();
    riff.extend_from_slice(&(body.len() as u32).to_le_bytes());
    riff.extend(body);
    riff
}

/// CRC-32 of PNG chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A 60-byte PNG whose header declares `w`×`h` pixels.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
    out.extend_from_slice(&8u32.to_be_bytes());
    out.extend_from_slice(idat);
    out.extend_from_slice(&crc32(idat).to_be_bytes());
    out
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
}

/// What a hostile upload must come to.
enum Expect<'a> {
    Refused(u16, &'static str),
    Fails(&'static [&'static str]),
    Succeeds(&'a str),
}

#[actix_web::test]
async fn hostile_uploads_are_answered_quickly_and_harm_nothing() {
    let mut s = settings();
    s.images.max_upload = "2MiB".parse().unwrap();
    let app = spawn_app_with(s).await;
    let png = encode(&picture(300, 200), ImageFormat::Png);
    let jpeg = encode(&picture(300, 200), ImageFormat::Jpeg);
    let long_name = format!("{}.png", "n".repeat(10_000));
    let longest_name = format!("{}.png", "n".repeat(1020));
    let long_stem = "n".repeat(64);
    let cases: Vec<(&str, Part, Expect)> = vec![
        (
            "truncated JPEG",
            Part::file("cut.jpg", "image/jpeg", jpeg[..jpeg.len() * 2 / 3].to_vec()),
            Expect::Fails(&["truncated_image"]),
        ),
        (
            "truncated PNG",
            Part::file("cut.png", "image/png", png[..png.len() * 2 / 3].to_vec()),
            Expect::Fails(&["truncated_image", "invalid_image"]),
        ),
        (
            "text named .png",
            Part::file("notes.png", "image/png", b"just some text, not pixels".to_vec()),
            Expect::Refused(415, "unsupported_image"),
        ),
        ("empty file", Part::file("empty.png", "image/png", Vec::new()), Expect::Refused(422, "empty_file")),
        (
            "PNG named .jpg, lying type",
            Part::file("photo.jpg", "image/jpeg", png.clone()),
            Expect::Succeeds("photo.png"),
        ),
        (
            "declares 60000x60000",
            Part::file("bomb.png", "image/png", png_declaring(60_000, 60_000)),
            Expect::Refused(422, "image_too_large"),
        ),
        (
            "over the size limit",
            Part::file("big.bin", "image/png", vec![0x89; 3 << 20]),
            Expect::Refused(413, "payload_too_large"),
        ),
        ("path in the name", Part::file("../../etc/passwd", "image/png", png.clone()), Expect::Succeeds("passwd.png")),
        (
            "NUL trick in the name",
            Part::file("a.png%00.php", "image/png", png.clone()),
            Expect::Succeeds("a-png-00.png"),
        ),
        (
            "10,000-character name",
            Part::file(&long_name, "image/png", png.clone()),
            Expect::Refused(422, "invalid_field"),
        ),
        (
            "a GIF frame larger than its 1x1 screen",
            Part::file("huge.gif", "image/gif", gif_with_frame(12_000, 12_000)),
            Expect::Refused(422, "image_too_large"),
        ),
        ("1,024-character name", Part::file(&longest_name, "image/png", png.clone()), Expect::Succeeds(&long_stem)),
        (
            "a TIFF whose second page is 12000x12000",
            Part::file("pages.tif", "image/tiff", tiff_with_pages(&[(1, 1), (12_000, 12_000)])),
            Expect::Refused(422, "image_too_large"),
        ),
        (
            "a two-page TIFF within the limit",
            Part::file("pages.tif", "image/tiff", tiff_with_pages(&[(1, 1), (20, 20)])),
            Expect::Succeeds("pages.png"),
        ),
        (
            "an animated WebP frame outside its 1x1 canvas",
            Part::file("anim.webp", "image/webp", animated_webp((1, 1), &[(0, 0, 1, 1), (0, 0, 12_000, 12_000)])),
            Expect::Refused(422, "image_too_large"),
        ),
        (
            "an animated WebP within its canvas",
            Part::file("anim.webp", "image/webp", animated_webp((4, 4), &[(0, 0, 1, 1), (2, 2, 1, 1)])),
            Expect::Succeeds("anim.png"),
        ),
    ];
    let before = rss_kib();
    for (what, part, expect) in cases {
        let started = Instant::now();
        let reply = app.upload(&[part]).await;
        match expect {
            Expect::Refused(status, code) => {
                reply.expect_error(status, code, what);
            }
            Expect::Fails(codes) => {
                assert_eq!(reply.status.as_u16(), 202, "{what}");
                let job = reply.json()["jobs"][0].clone();
                let done = app.wait_finished(id_of(&job)).await;
                assert_eq!(done["status"], "failed", "{what}: {done}");
                let code = done["error"]["code"].as_str().unwrap();
                assert!(codes.contains(&code), "{what}: failed with {code}");
            }
            Expect::Succeeds(filename) => {
                assert_eq!(reply.status.as_u16(), 202, "{what}: {}", String::from_utf8_lossy(&reply.body));
                let job = reply.json()["jobs"][0].clone();
                let (_, result) = finished_result(&app, &job).await;
                let disposition = result.header("content-disposition").unwrap();
                assert!(disposition.contains(filename), "{what}: {disposition}");
                assert!(
                    !disposition.contains('/') && !disposition.contains("..") && disposition.len() < 200,
                    "{what}: {disposition}"
                );
            }
        }
        eprintln!("hostile upload {what:28} answered in {:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(1), "{what} took {:?}", started.elapsed());
    }
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 200, "RSS grew by {grown_mib} MiB");

    let jobs = app.submit_images(&[Part::file("ok.png", "image/png", png)]).await;
    finished_result(&app, &jobs[0]).await;
    assert_eq!(app.get("/healthz").await.status.as_u16(), 200);
}

#[actix_web::test]
async fn a_body_that_arrives_too_slowly_gets_408_on_every_route_that_takes_one() {
    let mut s = settings();
    s.server.body_timeout = duration(Duration::from_millis(500));
    let app = spawn_app_with(s).await;
    let multipart_head = format!(
        "Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n--{BOUNDARY}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"slow.png\"\r\n\r\n"
    );
    let json_head = "Content-Type: application/json\r\nContent-Length: 8000000\r\n\r\n{\"title\": \"".to_string();
    // Each declares a body, sends its start, and then nothing more.
    let rows = [("/images", multipart_head), ("/generate-pdf", json_head.clone()), ("/analytics/events", json_head)];
    for (path, rest) in rows {
        let addr = app.address.trim_start_matches("http://").to_string();
        let started = Instant::now();
        let request = format!("POST {path} HTTP/1.1\r\nHost: x\r\n{rest}");
        let response = actix_web::rt::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut response = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                response.extend_from_slice(&buf[..n]);
                if response.windows(4).any(|w| w == b"\r\n\r\n") && response.ends_with(b"}}") {
                    break;
                }
            }
            String::from_utf8_lossy(&response).to_string()
        })
        .await
        .unwrap();
        assert!(response.starts_with("HTTP/1.1 408"), "{path}: {response}");
        assert!(response.contains("\"code\":\"request_timeout\""), "{path}: {response}");
        assert!(started.elapsed() < Duration::from_secs(5), "{path}: {:?}", started.elapsed());
    }
}

/// Opens a connection that declares an 8 MB JSON body and returns whether the server refused it
/// at once (503); if not, sends `send` bytes of the body and keeps the connection open.
fn declare_big_body(addr: &str, send: usize) -> (bool, Option<std::net::TcpStream>) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let head =
        "POST /generate-pdf HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8000000\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => {
            let answer = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("overloaded"), "{answer}");
            assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
            (true, None)
        }
        _ => {
            let mut body = b"{\"title\": \"".to_vec();
            body.resize(send, b'a');
            stream.write_all(&body).unwrap();
            (false, Some(stream))
        }
    }
}

/// Many requests that declare large bodies and stall cannot hold more than `--max-body-memory`
/// between them: past it they are refused before their bodies are read (they used to hold
/// 8 MB each, 40 of them raised RSS by 380 MB). A JSON body counts 16 times its length (what it
/// can become once parsed): 1 GiB holds eight 8 MB declarations.
#[actix_web::test]
async fn bodies_still_arriving_share_a_memory_budget_and_the_rest_get_503() {
    let dir = crate::helpers::fresh_data_dir();
    let p = crate::process::start(&dir, &["--max-body-memory", "1GiB", "--body-timeout", "60s"]);
    let addr = p.app.address.trim_start_matches("http://").to_string();
    let before = p.memory("VmHWM");
    let opened = actix_web::rt::task::spawn_blocking(move || {
        (0..40).map(|_| declare_big_body(&addr, 4_000_000)).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let refused = opened.iter().filter(|(refused, _)| *refused).count();
    assert_eq!(refused, 32, "{refused} of 40 refused");
    // A small request still fits beside them.
    let job = p.app.submit_pdf(&serde_json::json!({"title": "small"})).await;
    assert_eq!(p.app.wait_finished(id_of(&job)).await["status"], "succeeded");
    let grown = p.memory("VmHWM").saturating_sub(before) >> 20;
    assert!(grown < 80, "peak RSS grew by {grown} MiB");
    // Once the stalled ones are gone, their budget is free again.
    drop(opened);
    let addr = p.app.address.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let addr = addr.clone();
        let (refused, stream) =
            actix_web::rt::task::spawn_blocking(move || declare_big_body(&addr, 1000)).await.unwrap();
        drop(stream);
        if !refused {
            break;
        }
        assert!(Instant::now() < deadline, "the budget was never returned");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small JPEG with `extra` more (tiny) scans before its end: thousands of them would make any
/// decoder pass over the image thousands of times.
fn many_scans(extra: usize) -> Vec<u8> {
    let jpeg = encode(&picture(20, 10), ImageFormat::Jpeg);
    let mut out = jpeg[..jpeg.len() - 2].to_vec();
    for _ in 0..extra {
        out.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00, 0x12, 0x34]);
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

#[actix_web::test]
async fn bad_uploads_get_json_errors() {
    let app = spawn_app().await;
    let png = || Part::file("p.png", "image/png", encode(&picture(20, 10), ImageFormat::Png));
    let cases: Vec<(Vec<Part>, u16, &str, &str)> = vec![
        (vec![Part::text("ops", "[]")], 422, "missing_file", "file"),
        (vec![png(), Part::text("ops", r#"[{"op":"sharpen"}]"#)], 422, "invalid_op", "ops[0] (sharpen)"),
        (
            vec![png(), Part::text("ops", r#"[{"op":"grayscale"},{"op":"blur","sigma":500}]"#)],
            422,
            "invalid_op",
            "ops[1] (blur)",
        ),
        (
            vec![png(), Part::text("ops", r#"[{"op":"crop","x":15,"y":0,"width":10,"height":5}]"#)],
            422,
            "invalid_op",
            "file[0] (p.png): ops[0] (crop)",
        ),
        (
            vec![png(), Part::text("ops", r#"[{"op":"resize","width":40000,"height":40000}]"#)],
            422,
            "image_too_large",
            "file[0] (p.png): ops[0] (resize)",
        ),
        (vec![png(), Part::text("format", "gif")], 422, "invalid_field", "format"),
        (vec![png(), Part::text("colour", "red")], 422, "invalid_field", "colour"),
        (
            vec![Part::file("s.jpg", "image/jpeg", many_scans(200))],
            422,
            "invalid_image",
            "file[0] (s.jpg): the JPEG has 201 scans",
        ),
    ];
    for (parts, status, code, starts) in cases {
        let message = app.upload(&parts).await.expect_error(status, code, starts);
        assert!(message.starts_with(starts), "{message}");
    }
    app.request("POST", "/images", Some("application/json"), b"{}".to_vec())
        .await
        .assert_error(415, "unsupported_media_type");
    app.request("GET", "/images", None, vec![]).await.assert_error(405, "method_not_allowed");
    let none = app.request("POST", "/images", Some("multipart/form-data; boundary=x"), b"garbage".to_vec()).await;
    assert!(matches!(none.status.as_u16(), 400 | 422), "{}", none.status);
}

/// Bodies whose parts the multipart parser cannot read: each is `400 malformed_multipart`, as the
/// document says, never a 5xx or a job.
#[actix_web::test]
async fn multipart_bodies_the_parser_cannot_read_are_400_malformed_multipart() {
    let app = spawn_app().await;
    let form = "multipart/form-data; boundary=x";
    let part = |headers: &[u8]| [b"--x\r\n", headers, b"\r\n\r\nPNG-ish bytes\r\n--x--\r\n"].concat();
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("a Content-Disposition without a name", form, part(b"Content-Disposition: form-data; filename=\"a.png\"")),
        ("no Content-Disposition", form, part(b"Content-Type: image/png")),
        ("a disposition other than form-data", form, part(b"Content-Disposition: attachment; name=\"file\"")),
        ("a name that is not UTF-8", form, part(b"Content-Disposition: form-data; name=\"fil\xff\"")),
        ("a header line without a colon", form, part(b"Content-Disposition: form-data; name=\"file\"\r\nnot a header")),
        (
            "a body cut before its closing boundary",
            form,
            b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nPNG".to_vec(),
        ),
        (
            "a Content-Type without a boundary",
            "multipart/form-data",
            part(b"Content-Disposition: form-data; name=\"file\""),
        ),
    ];
    for (what, content_type, body) in cases {
        let reply = app.request("POST", "/images", Some(content_type), body).await;
        reply.expect_error(400, "malformed_multipart", what);
    }
    assert_eq!(app.get("/jobs").await.json()["jobs"], serde_json::json!([]), "a refused upload made a job");
}

/// A `w`×`h` PNG of pseudo-random pixels: it does not compress, so its result is about 3 bytes a pixel.
fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let img = RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png)
}

#[actix_web::test]
async fn a_result_of_several_mebibytes_downloads_whole_with_its_length() {
    // Results over 1 MiB are streamed from the store in pieces: the bytes must be all there, in order.
    let app = spawn_app().await;
    let input = noise_png(1200, 1000);
    let parts = [
        Part::file("noise.png", "image/png", input.clone()),
        Part::text("ops", r#"[{"op":"flip","axis":"horizontal"},{"op":"flip","axis":"horizontal"}]"#),
    ];
    let job = &app.submit_images(&parts).await[0];
    let (done, result) = finished_result(&app, job).await;
    let bytes = done["result"]["bytes"].as_u64().unwrap() as usize;
    assert!(bytes > 3 << 20, "the result should be several MiB, is {bytes}");
    assert_eq!(result.body.len(), bytes);
    assert_eq!(result.header("content-length").as_deref(), Some(bytes.to_string().as_str()));
    let got = image::load_from_memory(&result.body).expect("a PNG").to_rgb8();
    let want = image::load_from_memory(&input).unwrap().to_rgb8();
    assert!(got == want, "two horizontal flips give back the input, pixel for pixel");
}

#[actix_web::test]
async fn part_headers_count_against_the_upload_limit_and_long_filenames_are_refused() {
    let mut s = settings();
    s.images.max_upload = "1MiB".parse().unwrap();
    let app = spawn_app_with(s).await;
    let long = format!("{}.png", "n".repeat(2048));
    app.upload(&[Part::file(&long, "image/png", png(8, 8))]).await.assert_error(422, "invalid_field");

    // A chunked body (no Content-Length to refuse it by) whose one part header carries an 8 MiB
    // filename: the parser would buffer it whole; the limit cuts it off at 1 MiB.
    let body = crate::helpers::multipart(&[Part::file(&"n".repeat(8 << 20), "image/png", png(8, 8))]);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
        body.chunks(64 << 10).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
    let sent = app
        .client
        .post(app.url("/images"))
        .insert_header(("content-type", format!("multipart/form-data; boundary={BOUNDARY}")))
        .send_stream(futures::stream::iter(chunks))
        .await;
    match sent {
        Ok(mut res) => {
            assert_eq!(res.status().as_u16(), 413, "{:?}", res.body().await);
            let body: Value = serde_json::from_slice(&res.body().await.unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "payload_too_large");
        }
        // The server answers and closes while the rest is still being sent.
        Err(e) => {
            assert!(e.to_string().to_lowercase().contains("broken pipe") || e.to_string().contains("reset"), "{e}")
        }
    }
    let listed = app.get("/jobs").await.json();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 0, "nothing was accepted: {listed}");
}
