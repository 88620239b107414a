//! Following an auth log (`/var/log/auth.log`, `/var/log/secure`) across rotations.
//!
//! The open descriptor keeps pointing at the file it opened, so after a rotation by
//! rename (logrotate's default) the rest of the old file is still read through it
//! before the follower moves to the new file at its start. A file truncated in place
//! (`copytruncate`) is read again from its start; what was written between logrotate's
//! copy and its truncation is lost to every reader of the file — documented, not
//! silent: the follower counts the truncations it saw.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Longest line kept; a longer one is cut (and counted) rather than buffered forever.
pub const MAX_LINE: usize = 64 << 10;

/// Bytes read per call at most: a burst is taken over several calls.
const READ_PER_CALL: u64 = 4 << 20;

/// Where the follower starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the current end (lines written from now on).
    End,
    /// At `offset` of the file with inode `ino`, if that is still the file at the path
    /// (resuming after a restart); otherwise at the start of the current file.
    At { ino: u64, offset: u64 },
}

/// Follows one log file.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    offset: u64,
    partial: Vec<u8>,
    /// Truncations in place seen so far.
    pub truncations: u64,
    /// Lines cut at [`MAX_LINE`].
    pub cut_lines: u64,
}

impl Follower {
    pub fn new(path: impl Into<PathBuf>, start: Start) -> Self {
        let path = path.into();
        let mut f = Follower {
            path,
            file: None,
            ino: 0,
            offset: 0,
            partial: Vec::new(),
            truncations: 0,
            cut_lines: 0,
        };
        if let Ok(file) = File::open(&f.path) {
            if let Ok(meta) = file.metadata() {
                f.ino = meta.ino();
                f.offset = match start {
                    Start::End => meta.len(),
                    Start::At { ino, offset } if ino == meta.ino() && offset <= meta.len() => {
                        offset
                    }
                    Start::At { .. } => 0,
                };
                f.file = Some(file);
            }
        }
        f
    }

    /// Where the follower is: save it to resume after a restart.
    pub fn position(&self) -> (u64, u64) {
        (self.ino, self.offset)
    }

    /// Complete lines written since the last call.
    pub fn read_new(&mut self) -> std::io::Result<Vec<String>> {
        let mut lines = Vec::new();
        // Whatever the open file still holds (after a rename: the old file's tail).
        // Only once it is read to its end may the follower move to a new file.
        if !self.drain(&mut lines)? {
            return Ok(lines);
        }
        match std::fs::metadata(&self.path) {
            Ok(meta) if self.file.is_none() || meta.ino() != self.ino => {
                // Rotated (or appeared): the new file from its start.
                self.flush_partial(&mut lines);
                self.file = Some(File::open(&self.path)?);
                self.ino = meta.ino();
                self.offset = 0;
                self.drain(&mut lines)?;
            }
            Ok(meta) if meta.len() < self.offset => {
                // Truncated in place.
                self.truncations += 1;
                self.partial.clear();
                self.offset = 0;
                self.drain(&mut lines)?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // between rename and create
            Err(e) => return Err(e),
        }
        Ok(lines)
    }

    /// Reads on from `offset` (at most `READ_PER_CALL`); true when at the end.
    fn drain(&mut self, lines: &mut Vec<String>) -> std::io::Result<bool> {
        let Some(file) = self.file.as_mut() else {
            return Ok(true);
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        let n = file.take(READ_PER_CALL).read_to_end(&mut buf)?;
        self.offset += n as u64;
        for chunk in buf.split_inclusive(|b| *b == b'\n') {
            if chunk.ends_with(b"\n") {
                self.partial.extend_from_slice(&chunk[..chunk.len() - 1]);
                lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
            } else {
                self.partial.extend_from_slice(chunk);
            }
            if self.partial.len() > MAX_LINE {
                self.partial.truncate(MAX_LINE);
                lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
                self.cut_lines += 1;
            }
        }
        Ok((n as u64) < READ_PER_CALL)
    }

    /// A rotated file's last line without a newline still counts.
    fn flush_partial(&mut self, lines: &mut Vec<String>) {
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &std::path::Path, text: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    #[test]
    fn new_lines_are_read_once_and_partial_lines_wait() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("auth.log");
        append(&log, "old line\n");
        let mut f = Follower::new(&log, Start::End);
        assert!(
            f.read_new().unwrap().is_empty(),
            "history before the start is not replayed"
        );
        append(&log, "one\ntw");
        assert_eq!(f.read_new().unwrap(), vec!["one"]);
        append(&log, "o\n");
        assert_eq!(f.read_new().unwrap(), vec!["two"]);
        assert!(f.read_new().unwrap().is_empty());
    }

    #[test]
    fn a_rotation_by_rename_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("auth.log");
        append(&log, "");
        let mut f = Follower::new(&log, Start::End);
        append(&log, "before\n");
        assert_eq!(f.read_new().unwrap(), vec!["before"]);
        // Written to the old file just before and after the rename, then the new file.
        append(&log, "late-1\n");
        std::fs::rename(&log, dir.path().join("auth.log.1")).unwrap();
        append(&dir.path().join("auth.log.1"), "late-2\n");
        assert_eq!(
            f.read_new().unwrap(),
            vec!["late-1", "late-2"],
            "no new file yet"
        );
        append(&log, "new-1\n");
        assert_eq!(f.read_new().unwrap(), vec!["new-1"]);
    }

    #[test]
    fn a_truncation_in_place_is_counted_and_read_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("auth.log");
        append(&log, "a\nb\n");
        let mut f = Follower::new(&log, Start::At { ino: 0, offset: 0 });
        assert_eq!(
            f.read_new().unwrap(),
            vec!["a", "b"],
            "an unknown inode starts at 0"
        );
        std::fs::write(&log, "").unwrap();
        append(&log, "c\n");
        assert_eq!(f.read_new().unwrap(), vec!["c"]);
        assert_eq!(f.truncations, 1);
    }

    #[test]
    fn a_restart_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("auth.log");
        append(&log, "a\n");
        let mut f = Follower::new(&log, Start::End);
        append(&log, "b\n");
        assert_eq!(f.read_new().unwrap(), vec!["b"]);
        let (ino, offset) = f.position();
        append(&log, "c\n"); // written while the agent was down
        let mut again = Follower::new(&log, Start::At { ino, offset });
        assert_eq!(again.read_new().unwrap(), vec!["c"]);
    }

    #[test]
    fn an_endless_line_is_cut_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("auth.log");
        append(&log, "");
        let mut f = Follower::new(&log, Start::End);
        append(&log, &"x".repeat(MAX_LINE + 10));
        let lines = f.read_new().unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(f.cut_lines, 1);
    }

    #[test]
    fn a_burst_past_the_read_limit_is_finished_before_a_rotation_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("auth.log");
        append(&log, "");
        let mut f = Follower::new(&log, Start::End);
        let line = format!("{}\n", "y".repeat(99)); // 100 bytes
        append(&log, &line.repeat(50_000)); // 5 MB
        std::fs::rename(&log, dir.path().join("auth.log.1")).unwrap();
        append(&log, "new\n");
        let first = f.read_new().unwrap();
        assert!(first.len() < 50_000 && !first.contains(&"new".to_string()));
        let second = f.read_new().unwrap();
        assert_eq!(first.len() + second.len(), 50_001);
        assert_eq!(second.last().map(String::as_str), Some("new"));
    }
}
