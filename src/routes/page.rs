//! The browser page: the files of `static/`, built into the binary at compile time so the binary
//! serves the page from any working directory. `--static-dir` serves a directory instead (read
//! from disk on each request, for working on the page without rebuilding).
//!
//! A built-in file is answered with its type, a strong `ETag` (a hash of its bytes, computed at
//! compile time) and `Cache-Control: no-cache`: a browser keeps it but asks again each time, and a
//! matching `If-None-Match` is a `304` without a body. The names are not content-hashed, so a
//! longer freshness lifetime would keep an old page after a deploy.

use std::future::{ready, Ready};

use actix_web::http::header::{self, EntityTag, IfNoneMatch};
use actix_web::{HttpMessage, HttpRequest, HttpResponse};

/// One file of the page, built into the binary.
pub struct Asset {
    /// Its name in `static/`, and so its path under `/`.
    pub name: &'static str,
    pub body: &'static [u8],
    /// 64-bit FNV-1a of `body`: the entity tag.
    hash: u64,
}

impl Asset {
    const fn new(name: &'static str, body: &'static [u8]) -> Self {
        Asset { name, body, hash: fnv1a(body) }
    }

    /// The `Content-Type` of the file, from its extension.
    pub fn content_type(&self) -> &'static str {
        match self.name.rsplit_once('.').map(|(_, ext)| ext) {
            Some("html") => "text/html; charset=utf-8",
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            Some("png") => "image/png",
            Some("ico") => "image/x-icon",
            _ => "application/octet-stream",
        }
    }

    fn etag(&self) -> EntityTag {
        EntityTag::new_strong(format!("{:016x}", self.hash))
    }
}

/// 64-bit FNV-1a, at compile time.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

macro_rules! built_in {
    ($($name:literal),* $(,)?) => {
        &[$(Asset::new($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/static/", $name)))),*]
    };
}

/// Every file of `static/` (a unit test checks the list against the directory).
pub const ASSETS: &[Asset] = built_in!["index.html", "app.js", "style.css", "api.html", "api.js"];

/// The file answered at `/`.
pub const INDEX: &str = "index.html";

/// Answers GET (and HEAD, whose body actix drops) for one built-in file.
pub fn serve(req: HttpRequest, asset: &'static Asset) -> Ready<HttpResponse> {
    let etag = asset.etag();
    let unchanged = match req.get_header::<IfNoneMatch>() {
        Some(IfNoneMatch::Any) => true,
        Some(IfNoneMatch::Items(tags)) => tags.iter().any(|tag| tag.weak_eq(&etag)),
        None => false,
    };
    let mut res = if unchanged { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    res.insert_header(header::ETag(etag)).insert_header((header::CACHE_CONTROL, "no-cache"));
    ready(if unchanged { res.finish() } else { res.content_type(asset.content_type()).body(asset.body) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_static_is_built_in_with_a_known_type() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/static");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .expect("read static/")
            .map(|e| e.expect("a directory entry").file_name().into_string().expect("a UTF-8 name"))
            .collect();
        let mut built_in: Vec<String> = ASSETS.iter().map(|a| a.name.to_string()).collect();
        on_disk.sort();
        built_in.sort();
        assert_eq!(built_in, on_disk, "static/ and ASSETS differ: add the file to ASSETS (or remove it)");
        for asset in ASSETS {
            assert_ne!(asset.content_type(), "application/octet-stream", "{}: add its type", asset.name);
            let disk = std::fs::read(format!("{dir}/{}", asset.name)).expect("read the file");
            assert_eq!(asset.body, &disk[..], "{}", asset.name);
        }
        assert!(ASSETS.iter().any(|a| a.name == INDEX));
    }

    #[test]
    fn the_etag_changes_with_the_bytes() {
        let tags: Vec<u64> = [&b""[..], b"a", b"b", b"ab", b"ba"].iter().map(|b| fnv1a(b)).collect();
        let mut unique = tags.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tags.len(), "{tags:x?}");
        // The reference value of FNV-1a 64 for "a".
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
