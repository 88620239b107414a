//! The alert log: JSON lines, one alert per line, appended and flushed per batch.
//! Security staff follow it with `weilan-collector tail`; SIEMs ingest it as is.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::store::Alert;

pub struct AlertLog {
    path: PathBuf,
    file: File,
}

impl AlertLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AlertLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends alerts, one JSON object per line, and syncs them to disk.
    pub fn write(&mut self, alerts: &[Alert]) -> std::io::Result<()> {
        if alerts.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for a in alerts {
            serde_json::to_writer(&mut buf, a)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }
}
