//! The web client's files, embedded at build time from `web/static/` (see `build.rs`), with
//! what HTTP needs to serve each: content type and a strong ETag of the contents.

use std::collections::HashMap;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

pub struct Asset {
    pub body: &'static [u8],
    pub content_type: &'static str,
    /// Quoted, as sent in `ETag`.
    pub etag: String,
}

/// The asset served at `path` (`/` is `/index.html`).
pub fn get(path: &str) -> Option<&'static Asset> {
    static TABLE: OnceLock<HashMap<&'static str, Asset>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        embedded::ASSETS
            .iter()
            .map(|(path, body)| {
                let digest = Sha256::digest(body);
                let asset = Asset {
                    body,
                    content_type: content_type(path),
                    etag: format!("\"{}\"", hex::encode(&digest[..16])),
                };
                (*path, asset)
            })
            .collect()
    });
    let path = if path == "/" { "/index.html" } else { path };
    table.get(path)
}

fn content_type(path: &str) -> &'static str {
    let extension = path.rsplit_once('.').map_or("", |(_, e)| e);
    match extension {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type("/index.html"), "text/html; charset=utf-8");
        assert_eq!(
            content_type("/app/main.mjs"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("/style.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("/noextension"), "application/octet-stream");
    }

    #[test]
    fn unknown_paths_are_not_served() {
        assert!(get("/../Cargo.toml").is_none());
        assert!(get("/definitely-not-an-asset.js").is_none());
    }
}
