//! The alert log: JSON lines, one alert per line, appended and synced per batch.
//! Security staff follow it with `weilan-collector tail`; SIEMs ingest it as is.
//!
//! Rotation by size and age: the file is renamed to `NAME.1` (older ones shift to
//! `NAME.2`, …, the oldest beyond `keep` is deleted) and a new file is started. A batch
//! is never split across files, and `tail` drains the old file before it follows the
//! new one, so no line is lost to a reader.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use weilan_config::settings::collector::AlertRotation;

use crate::store::Alert;

pub struct AlertLog {
    path: PathBuf,
    file: File,
    size: u64,
    started: SystemTime,
    rotation: AlertRotation,
}

/// The `n`-th rotated file of `path` (`n` ≥ 1; 1 is the newest).
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl AlertLog {
    pub fn open(path: &Path, rotation: AlertRotation) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let meta = file.metadata()?;
        Ok(AlertLog {
            path: path.to_path_buf(),
            size: meta.len(),
            // A file carried over from an earlier run counts from its creation (or
            // last change when the file system does not record creation).
            started: meta
                .created()
                .or_else(|_| meta.modified())
                .unwrap_or_else(|_| SystemTime::now()),
            file,
            rotation,
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
        if self.due(buf.len() as u64) {
            self.rotate()?;
        }
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        self.file.sync_data()
    }

    fn due(&self, adding: u64) -> bool {
        if self.size == 0 {
            return false; // never rotate an empty file (a huge batch still lands)
        }
        let by_size = self.rotation.max_bytes > 0 && self.size + adding > self.rotation.max_bytes;
        let by_age = self.rotation.max_age_secs > 0
            && self
                .started
                .elapsed()
                .is_ok_and(|a| a >= Duration::from_secs(self.rotation.max_age_secs));
        by_size || by_age
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let keep = self.rotation.keep.max(1);
        let _ = std::fs::remove_file(rotated(&self.path, keep));
        for n in (1..keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?; // the renames survive a crash
        }
        self.size = 0;
        self.started = SystemTime::now();
        tracing::info!(path = %self.path.display(), "alert log rotated");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Level;

    fn alert(n: i64) -> Alert {
        Alert {
            alert_id: n,
            time: jiff::Timestamp::now(),
            level: Level::Red,
            rule_id: "r".into(),
            agent_id: "ws".into(),
            summary: "x".repeat(100),
            event_ids: vec![],
            details: serde_json::Value::Null,
            title: String::new(),
            tags: vec![],
            key: "ws".into(),
            count: 1,
            last_seen: jiff::Timestamp::now(),
            update: false,
        }
    }

    fn lines(p: &Path) -> Vec<i64> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Alert>(l).unwrap().alert_id)
            .collect()
    }

    #[test]
    fn rotates_by_size_keeps_n_files_and_loses_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let rotation = AlertRotation {
            max_bytes: 1000,
            max_age_secs: 0,
            keep: 3,
        };
        let mut log = AlertLog::open(&path, rotation).unwrap();
        for n in 0..40 {
            log.write(&[alert(n)]).unwrap();
        }
        assert!(!rotated(&path, 4).exists(), "only `keep` rotated files");
        let mut all = Vec::new();
        for n in (1..=3).rev() {
            let p = rotated(&path, n);
            assert!(std::fs::metadata(&p).unwrap().len() <= 1000);
            all.extend(lines(&p));
        }
        all.extend(lines(&path));
        // The newest files hold a contiguous tail of what was written, in order.
        let first = all[0];
        assert_eq!(all, (first..40).collect::<Vec<_>>());
        assert!(first > 0, "the oldest file was deleted");
    }

    #[test]
    fn rotates_by_age_of_a_file_from_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let never_by_size = AlertRotation {
            max_bytes: 0,
            max_age_secs: 3600,
            keep: 2,
        };
        AlertLog::open(&path, never_by_size)
            .unwrap()
            .write(&[alert(1)])
            .unwrap();
        // Reopened as it would be after a restart, two hours later.
        let mut log = AlertLog::open(&path, never_by_size).unwrap();
        log.started = SystemTime::now() - Duration::from_secs(7200);
        log.write(&[alert(2)]).unwrap();
        assert_eq!(
            (lines(&rotated(&path, 1)), lines(&path)),
            (vec![1], vec![2])
        );
    }
}
