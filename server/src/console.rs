//! The web console: one HTML page, its script and its style sheet, embedded in the binary so it
//! works with no internet (no CDN, fonts or map tiles) and always matches the server it came with.
//! `GET /` serves the page, `GET /console/app.js` and `GET /console/app.css` the assets.
//!
//! Every file carries a strong `ETag` (a hash of its bytes) and `Cache-Control: no-cache`, so a
//! browser revalidates on each load and gets `304 Not Modified` until the binary changes. The
//! page's Content-Security-Policy allows only this origin (its API and WebSockets) and `data:` /
//! `blob:` images (the prescription preview), so user text rendered by the script cannot pull in
//! anything else.

use crate::http::Body;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

/// One embedded file.
pub struct Asset {
    bytes: &'static [u8],
    content_type: &'static str,
    etag: OnceLock<String>,
}

impl Asset {
    const fn new(bytes: &'static [u8], content_type: &'static str) -> Asset {
        Asset { bytes, content_type, etag: OnceLock::new() }
    }

    fn etag(&self) -> &str {
        self.etag.get_or_init(|| {
            let digest = Sha256::digest(self.bytes);
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            format!("\"{hex}\"")
        })
    }
}

static INDEX: Asset = Asset::new(include_bytes!("../console/index.html"), "text/html; charset=utf-8");
static SCRIPT: Asset = Asset::new(include_bytes!("../console/app.js"), "text/javascript; charset=utf-8");
static STYLE: Asset = Asset::new(include_bytes!("../console/app.css"), "text/css; charset=utf-8");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console file at this path (`[]` is `/`), if it is one.
pub fn asset(segments: &[&str]) -> Option<&'static Asset> {
    match segments {
        [] => Some(&INDEX),
        ["console", "app.js"] => Some(&SCRIPT),
        ["console", "app.css"] => Some(&STYLE),
        _ => None,
    }
}

/// The file, or `304 Not Modified` when the request's `If-None-Match` names its ETag.
pub fn respond(asset: &Asset, request_headers: &HeaderMap) -> Response<Body> {
    let etag = asset.etag();
    let fresh = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag);
    let mut response = if fresh {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(Full::new(Bytes::from_static(asset.bytes)))
    };
    let headers = response.headers_mut();
    if !fresh {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    }
    if let Ok(v) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    if std::ptr::eq(asset, &INDEX) {
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_files() {
        assert!(std::ptr::eq(asset(&[]).unwrap(), &INDEX));
        assert!(std::ptr::eq(asset(&["console", "app.js"]).unwrap(), &SCRIPT));
        assert!(asset(&["console", "other.js"]).is_none());
        assert!(asset(&["index.html"]).is_none());
    }

    #[test]
    fn a_matching_etag_gets_304_without_a_body() {
        let etag = INDEX.etag().to_owned();
        assert!(etag.starts_with('"') && etag.len() == 26);
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&format!("\"x\", W/{etag}")).unwrap());
        let r = respond(&INDEX, &headers);
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(r.headers()[header::ETAG], etag.as_str());
        let r = respond(&INDEX, &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
    }
}
