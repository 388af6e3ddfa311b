//! The data dir: the SQLite database, the media folder and the generated JWT secret, guarded by
//! one lock file.
//!
//! Everything that writes the data dir directly (`serve`, `admin create`, later data generation,
//! import and backup) opens it through [`DataDir::open`], which takes an exclusive `flock` on
//! `<data-dir>/sanjevani.lock` for as long as the value lives. Two such processes never write the
//! same database at once, and the second one fails at start with an error naming the dir instead
//! of corrupting state or timing out on SQLite's busy lock later. `flock` locks belong to the open
//! file description and vanish when the process dies, so a crash never leaves a stale lock behind.
//!
//! When no `--jwt-secret` is configured, a random one is created once in `<data-dir>/jwt-secret`
//! (mode 0600) and reused, so tokens survive restarts.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data dir.
pub const LOCK_FILE: &str = "sanjevani.lock";
/// Name of the SQLite database inside the data dir.
pub const DB_FILE: &str = "sanjevani.db";
/// Name of the media folder inside the data dir.
pub const MEDIA_DIR: &str = "media";
/// Name of the generated JWT secret inside the data dir.
pub const JWT_SECRET_FILE: &str = "jwt-secret";
/// Random bytes in a generated JWT secret (stored hex-encoded, so 96 characters).
pub const GENERATED_SECRET_BYTES: usize = 48;

/// Why the data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The dir (or its media folder, or the lock file) could not be created or opened.
    #[error("data dir {dir}: cannot {what}: {source}")]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// Another process (a running `serve`, or an admin command) holds the lock.
    #[error(
        "data dir {dir} is locked by another process{holder}, a running serve or admin command; stop it or use another --data-dir"
    )]
    Locked {
        /// The data dir.
        dir: PathBuf,
        /// `" (pid N)"` when the holder wrote its pid, else empty.
        holder: String,
    },
}

/// An open, locked data dir. The lock is released when this value is dropped (or the process
/// ends, however it ends).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Held open for the lock's lifetime: closing it releases the `flock`.
    lock: File,
}

impl DataDir {
    /// Creates `path` and its media folder if missing, then takes the exclusive lock. Fails at
    /// once (no waiting) if another process, or another `DataDir` in this one, holds it.
    pub fn open(path: impl AsRef<Path>) -> Result<DataDir, DataDirError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |what, source| DataDirError::Io { dir: path.clone(), what, source };
        std::fs::create_dir_all(&path).map_err(|e| io_err("create it", e))?;
        std::fs::create_dir_all(path.join(MEDIA_DIR)).map_err(|e| io_err("create its media folder", e))?;
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path.join(LOCK_FILE))
            .map_err(|e| io_err("open its lock file", e))?;
        // SAFETY: `lock` owns a valid open file descriptor for the duration of the call.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut content = String::new();
                let holder = match lock.read_to_string(&mut content) {
                    Ok(_) if content.trim().parse::<u32>().is_ok() => format!(" (pid {})", content.trim()),
                    _ => String::new(),
                };
                return Err(DataDirError::Locked { dir: path, holder });
            }
            return Err(io_err("lock it", err));
        }
        // The pid is only a hint for the error above; failing to write it changes nothing.
        let _ = lock.set_len(0).and_then(|()| writeln!(lock, "{}", std::process::id())).and_then(|()| lock.flush());
        Ok(DataDir { path, lock })
    }

    /// The data dir itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.path.join(DB_FILE)
    }

    /// The media folder (prescription images, audio notes).
    pub fn media_dir(&self) -> PathBuf {
        self.path.join(MEDIA_DIR)
    }

    /// The JWT secret: `configured` if given; else the one in `<data-dir>/jwt-secret`, created
    /// on first use from 48 random bytes, hex-encoded, with mode 0600. The file is written to a
    /// temporary name and renamed into place, so a crash never leaves a truncated secret.
    pub fn jwt_secret(&self, configured: Option<&str>) -> io::Result<String> {
        if let Some(secret) = configured {
            return Ok(secret.to_string());
        }
        let path = self.path.join(JWT_SECRET_FILE);
        match std::fs::read_to_string(&path) {
            Ok(content) => {
                let secret = content.trim();
                if secret.len() < crate::cli::MIN_JWT_SECRET_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} holds fewer than {} bytes; delete it to have a new one made (this signs every user out)",
                            path.display(),
                            crate::cli::MIN_JWT_SECRET_BYTES
                        ),
                    ));
                }
                if let Ok(meta) = std::fs::metadata(&path)
                    && meta.permissions().mode() & 0o077 != 0
                {
                    tracing::warn!(path = %path.display(), "the JWT secret file is readable by others; chmod 600 it");
                }
                Ok(secret.to_string())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let secret = random_hex(GENERATED_SECRET_BYTES);
                let tmp = self.path.join(format!("{JWT_SECRET_FILE}.tmp"));
                let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
                // `mode` applies only when the file is created; a leftover temp file gets it here.
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                file.write_all(secret.as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                File::open(&self.path)?.sync_all()?;
                tracing::info!(path = %path.display(), "no --jwt-secret: created a random one, kept for later starts");
                Ok(secret)
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        // Forget our pid before the lock goes, so a later holder that writes none (the `flock`
        // tool, say) is not reported under our pid.
        let _ = self.lock.set_len(0);
    }
}

/// `n` random bytes from the thread's CSPRNG, hex-encoded.
fn random_hex(n: usize) -> String {
    use rand::Rng;
    let mut bytes = vec![0u8; n];
    rand::rng().fill(&mut bytes[..]);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_dir_and_media_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/var");
        let dir = DataDir::open(&path).unwrap();
        assert!(path.is_dir());
        assert!(dir.media_dir().is_dir());
        assert_eq!(dir.media_dir(), path.join("media"));
        assert_eq!(dir.db_path(), path.join("sanjevani.db"));
        assert_eq!(dir.path(), path);
    }

    #[test]
    fn a_second_open_fails_while_the_first_holds_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDir::open(tmp.path()).unwrap();
        let err = DataDir::open(tmp.path()).unwrap_err();
        assert!(matches!(err, DataDirError::Locked { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&tmp.path().display().to_string()), "{text}");
        assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
        drop(first);
        assert_eq!(std::fs::read_to_string(tmp.path().join(LOCK_FILE)).unwrap(), "", "pid forgotten");
        DataDir::open(tmp.path()).expect("the lock is released on drop");
    }

    #[test]
    fn a_file_where_the_dir_should_be_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("var");
        std::fs::write(&path, "not a dir").unwrap();
        let err = DataDir::open(&path).unwrap_err().to_string();
        assert!(err.contains("cannot create it"), "{err}");
    }

    #[test]
    fn the_generated_secret_is_created_once_reused_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let file = tmp.path().join(JWT_SECRET_FILE);
        assert!(!file.exists());
        let first = dir.jwt_secret(None).unwrap();
        assert_eq!(first.len(), 2 * GENERATED_SECRET_BYTES);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(!tmp.path().join("jwt-secret.tmp").exists());
        assert_eq!(dir.jwt_secret(None).unwrap(), first, "reused");
        drop(dir);
        let dir = DataDir::open(tmp.path()).unwrap();
        assert_eq!(dir.jwt_secret(None).unwrap(), first, "survives a restart");
        assert_eq!(dir.jwt_secret(Some("configured")).unwrap(), "configured");
        assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), first, "a configured secret leaves the file alone");
    }

    #[test]
    fn a_configured_secret_creates_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        assert_eq!(dir.jwt_secret(Some("x".repeat(40).as_str())).unwrap(), "x".repeat(40));
        assert!(!tmp.path().join(JWT_SECRET_FILE).exists());
    }

    #[test]
    fn a_damaged_secret_file_is_an_error_not_a_weak_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join(JWT_SECRET_FILE), "abc\n").unwrap();
        let err = dir.jwt_secret(None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
