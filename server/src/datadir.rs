//! Placeholder for the data dir (being written on the `cli` branch).

use std::path::{Path, PathBuf};

/// The data dir.
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Opens (creates) the dir.
    pub fn open(root: &Path) -> std::io::Result<DataDir> {
        std::fs::create_dir_all(root.join("media"))?;
        Ok(DataDir { root: root.to_path_buf() })
    }

    /// The SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("sanjevani.db")
    }

    /// The media folder.
    pub fn media_dir(&self) -> PathBuf {
        self.root.join("media")
    }

    /// The JWT secret.
    pub fn jwt_secret(&self, configured: Option<&str>) -> std::io::Result<String> {
        Ok(configured.map(str::to_owned).unwrap_or_else(|| "placeholder-secret-placeholder-secret".into()))
    }
}
