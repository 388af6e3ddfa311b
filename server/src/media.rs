//! Prescription images and response audio. Files are stored under the data dir by content hash
//! (so a re-upload costs nothing and names never come from clients), their type checked by magic
//! bytes rather than by name, and made durable before the request that carries them is
//! acknowledged. They are served only through signed, expiring URLs (`?exp=<unix>&sig=<hmac>`,
//! valid 24 h, signed afresh each time a record is served), and the path a URL may name is a
//! fixed pattern, so nothing outside the media folder can be reached.

use hmac::{Hmac, KeyInit, Mac};
use sanjevani_engine::Error;
use sanjevani_engine::message::MediaUrls;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a signed URL stays valid.
pub const URL_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What an upload is for; decides the folder and the accepted types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// `image` on a medicine request: PNG, JPEG or WebP.
    Prescription,
    /// `audio` on a response: MP3, AAC/M4A, OGG/Opus, WAV or WebM.
    Audio,
}

impl MediaKind {
    fn folder(self) -> &'static str {
        match self {
            MediaKind::Prescription => "prescriptions",
            MediaKind::Audio => "audio",
        }
    }
}

/// Recognises a file type from its first bytes; returns the extension used on disk.
pub fn sniff(kind: MediaKind, bytes: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| bytes.get(offset..offset + magic.len()) == Some(magic);
    match kind {
        MediaKind::Prescription => {
            if at(0, b"\x89PNG\r\n\x1a\n") {
                Some("png")
            } else if at(0, b"\xff\xd8\xff") {
                Some("jpg")
            } else if at(0, b"RIFF") && at(8, b"WEBP") {
                Some("webp")
            } else {
                None
            }
        }
        MediaKind::Audio => {
            if at(0, b"ID3") {
                Some("mp3")
            } else if at(0, b"OggS") {
                Some("ogg")
            } else if at(0, b"RIFF") && at(8, b"WAVE") {
                Some("wav")
            } else if at(0, b"\x1a\x45\xdf\xa3") {
                Some("webm")
            } else if at(4, b"ftyp") {
                Some("m4a")
            } else if bytes.len() >= 2 && bytes[0] == 0xff && bytes[1] & 0xf6 == 0xf0 {
                Some("aac")
            } else if bytes.len() >= 2 && bytes[0] == 0xff && bytes[1] & 0xe0 == 0xe0 && bytes[1] & 0x06 != 0 {
                Some("mp3")
            } else {
                None
            }
        }
    }
}

fn content_type(ext: &str) -> &'static str {
    match ext {
        "png" => "image/png",
        "jpg" => "image/jpeg",
        "webp" => "image/webp",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "webm" => "audio/webm",
        "m4a" => "audio/mp4",
        "aac" => "audio/aac",
        _ => "application/octet-stream",
    }
}

/// The media folder and the key that signs its URLs.
pub struct Media {
    root: PathBuf,
    key: [u8; 32],
}

impl Media {
    /// Media under `root` (created if missing), URLs signed with a key derived from `secret`.
    pub fn new(root: &Path, secret: &[u8]) -> std::io::Result<Media> {
        for kind in [MediaKind::Prescription, MediaKind::Audio] {
            std::fs::create_dir_all(root.join(kind.folder()))?;
        }
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).map_err(std::io::Error::other)?;
        mac.update(b"sanjevani media url key v1");
        Ok(Media { root: root.to_path_buf(), key: mac.finalize().into_bytes().into() })
    }

    /// Checks the type and stores the bytes durably; returns the media key
    /// (`prescriptions/<sha256>.<ext>`). Wrong type → 400 naming `field`.
    pub async fn save(&self, kind: MediaKind, field: &'static str, bytes: bytes::Bytes) -> Result<String, Error> {
        let Some(ext) = sniff(kind, &bytes) else {
            let allowed = match kind {
                MediaKind::Prescription => "a PNG, JPEG or WebP image",
                MediaKind::Audio => "MP3, AAC/M4A, OGG/Opus, WAV or WebM audio",
            };
            return Err(Error::field(field, format!("{field} must be {allowed}")));
        };
        let hash: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("{}/{hash}.{ext}", kind.folder());
        let path = self.root.join(&key);
        let dir = self.root.join(kind.folder());
        tokio::task::spawn_blocking(move || write_durably(&dir, &path, &bytes))
            .await
            .map_err(|e| Error::store("media write task", e))?
            .map_err(|e| Error::store("media write", e))?;
        Ok(key)
    }

    /// A signed URL for `key` under `base`, valid for 24 h from now.
    pub fn signed_url(&self, base: &str, key: &str) -> String {
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) + URL_LIFETIME.as_secs();
        format!("{base}/media/{key}?exp={exp}&sig={}", self.signature(key, exp))
    }

    fn signature(&self, key: &str, exp: u64) -> String {
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key) else { return String::new() };
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(exp.to_string().as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Resolves `GET /media/<key>?exp=&sig=`: the file's bytes and Content-Type, or `None`
    /// (→ 404) for a malformed key, a missing, expired or wrong signature, or a missing file.
    pub async fn open(&self, key: &str, query: Option<&str>) -> Option<(Vec<u8>, &'static str)> {
        let ext = valid_key(key)?;
        let (mut exp, mut sig) = (None, None);
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "exp" => exp = v.parse::<u64>().ok(),
                "sig" => sig = Some(v.into_owned()),
                _ => {}
            }
        }
        let (exp, sig) = (exp?, sig?);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(u64::MAX, |d| d.as_secs());
        if exp < now || !constant_time_eq(self.signature(key, exp).as_bytes(), sig.as_bytes()) {
            return None;
        }
        let bytes = tokio::fs::read(self.root.join(key)).await.ok()?;
        Some((bytes, content_type(ext)))
    }
}

impl MediaUrls for Media {
    fn url(&self, base: &str, key: &str) -> String {
        self.signed_url(base, key)
    }
}

/// `prescriptions|audio` / 64 hex / known extension — nothing else names a file.
fn valid_key(key: &str) -> Option<&'static str> {
    let (folder, file) = key.split_once('/')?;
    if folder != "prescriptions" && folder != "audio" {
        return None;
    }
    let (hash, ext) = file.split_once('.')?;
    if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    ["png", "jpg", "webp", "mp3", "ogg", "wav", "webm", "m4a", "aac"].into_iter().find(|e| *e == ext)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!(".upload-{:x}", rand::random::<u64>()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_by_magic_bytes() {
        assert_eq!(sniff(MediaKind::Prescription, b"\x89PNG\r\n\x1a\nrest"), Some("png"));
        assert_eq!(sniff(MediaKind::Prescription, b"\xff\xd8\xff\xe0"), Some("jpg"));
        assert_eq!(sniff(MediaKind::Prescription, b"RIFF\0\0\0\0WEBPVP8 "), Some("webp"));
        assert_eq!(sniff(MediaKind::Prescription, b"GIF89a"), None);
        assert_eq!(sniff(MediaKind::Prescription, b"ID3\x03"), None);
        assert_eq!(sniff(MediaKind::Audio, b"ID3\x03\0"), Some("mp3"));
        assert_eq!(sniff(MediaKind::Audio, b"OggS\0"), Some("ogg"));
        assert_eq!(sniff(MediaKind::Audio, b"RIFF\0\0\0\0WAVEfmt "), Some("wav"));
        assert_eq!(sniff(MediaKind::Audio, b"\x1a\x45\xdf\xa3"), Some("webm"));
        assert_eq!(sniff(MediaKind::Audio, b"\0\0\0\x20ftypM4A "), Some("m4a"));
        assert_eq!(sniff(MediaKind::Audio, b"\xff\xf1\x50\x80"), Some("aac"));
        assert_eq!(sniff(MediaKind::Audio, b"\xff\xfb\x90\x00"), Some("mp3"));
        assert_eq!(sniff(MediaKind::Audio, b"\x89PNG\r\n\x1a\n"), None);
    }

    #[test]
    fn keys_cannot_escape() {
        let hash = "a".repeat(64);
        assert_eq!(valid_key(&format!("prescriptions/{hash}.png")), Some("png"));
        assert_eq!(valid_key(&format!("../{hash}.png")), None);
        assert_eq!(valid_key(&format!("prescriptions/../{hash}.png")), None);
        assert_eq!(valid_key(&format!("prescriptions/{hash}.png/..")), None);
        assert_eq!(valid_key("prescriptions/x.png"), None);
    }

    #[tokio::test]
    async fn signed_urls_verify_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let media = Media::new(dir.path(), b"secret-secret-secret-secret-1234").unwrap();
        let key = media
            .save(MediaKind::Prescription, "image", bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\nx"))
            .await
            .unwrap();
        let url = media.signed_url("http://h", &key);
        let query = url.split_once('?').unwrap().1;
        assert_eq!(media.open(&key, Some(query)).await.unwrap().1, "image/png");
        assert!(media.open(&key, None).await.is_none());
        assert!(media.open(&key, Some(&query.replace("sig=", "sig=0"))).await.is_none());
        let stale = format!("exp=1&sig={}", media.signature(&key, 1));
        assert!(media.open(&key, Some(&stale)).await.is_none());
        let err = media.save(MediaKind::Prescription, "image", bytes::Bytes::from_static(b"GIF89a")).await.unwrap_err();
        assert_eq!(err.status(), 400);
    }
}
