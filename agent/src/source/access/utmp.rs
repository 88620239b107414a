//! The last fallback for login sessions: `/var/log/wtmp`, the record every login
//! program and sshd append to (parsed by `utmp-rs`). It has sessions only — start,
//! end, terminal, remote host — no failures and no sudo, so it is used when neither
//! the journal nor an auth log exists, and the events say `source: utmp`.
//!
//! [`WtmpFollower`] reads whole records appended since its offset; a file that got
//! smaller was rotated (logrotate starts a new wtmp monthly) and is read from its
//! start. Logouts (`DEAD_PROCESS`) carry only the terminal, so the follower remembers
//! who logged in on which terminal.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use utmp_rs::UtmpEntry;
use weilan_config::event::{AccessLogin, AccessLogout, Event};

/// Size of one record (`struct utmp` on Linux, 64- and 32-bit alike).
pub const RECORD: u64 = 384;
/// Records read per call at most (a rotated multi-megabyte wtmp is read in steps).
const MAX_RECORDS: u64 = 4096;

/// Console (a virtual terminal: someone at the keyboard), serial `tty`, `remote`
/// (a pseudo-terminal with a remote host) or `other` (a local pseudo-terminal).
pub fn method(line: &str, host: &str) -> &'static str {
    if line.starts_with("tty") && line[3..].bytes().all(|b| b.is_ascii_digit()) {
        "console"
    } else if line.starts_with("ttyS") || line.starts_with("ttyUSB") || line.starts_with("ttyAMA") {
        "tty"
    } else if !host.is_empty() {
        "remote"
    } else {
        "other"
    }
}

pub struct WtmpFollower {
    path: PathBuf,
    ino: u64,
    offset: u64,
    /// Terminal → (user, method, session id) of the session open on it.
    open: HashMap<String, (String, &'static str, String)>,
}

impl WtmpFollower {
    /// Starts at `(ino, offset)` if that is still the file, else at its end.
    pub fn new(path: impl Into<PathBuf>, saved: Option<(u64, u64)>) -> Self {
        let path = path.into();
        let meta = std::fs::metadata(&path).ok();
        let (ino, size) = meta.map_or((0, 0), |m| (m.ino(), m.len()));
        let offset = match saved {
            Some((i, o)) if i == ino && o <= size => o - o % RECORD,
            _ => size - size % RECORD,
        };
        WtmpFollower {
            path,
            ino,
            offset,
            open: HashMap::new(),
        }
    }

    pub fn position(&self) -> (u64, u64) {
        (self.ino, self.offset)
    }

    /// Events for the records appended since the last call.
    pub fn read_new(&mut self) -> std::io::Result<Vec<Event>> {
        let mut f = std::fs::File::open(&self.path)?;
        let meta = f.metadata()?;
        if meta.ino() != self.ino || meta.len() < self.offset {
            // Rotated (a new file) or truncated: its records are all new.
            self.ino = meta.ino();
            self.offset = 0;
        }
        let whole = (meta.len() - self.offset) / RECORD;
        let n = whole.min(MAX_RECORDS);
        if n == 0 {
            return Ok(Vec::new());
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![0u8; (n * RECORD) as usize];
        f.read_exact(&mut buf)?;
        self.offset += n * RECORD;
        Ok(parse_records(&buf)
            .into_iter()
            .filter_map(|e| self.event(e))
            .collect())
    }

    fn event(&mut self, e: UtmpEntry) -> Option<Event> {
        match e {
            UtmpEntry::UserProcess {
                pid,
                line,
                user,
                host,
                ..
            } => {
                let method = method(&line, &host);
                let session = format!("{line}:{pid}");
                self.open
                    .insert(line.clone(), (user.clone(), method, session.clone()));
                Some(Event::AccessLogin(AccessLogin {
                    uid: crate::procinfo::user_id(&user),
                    user,
                    method: method.into(),
                    session_id: Some(session),
                    tty: Some(line),
                    remote_addr: (!host.is_empty()).then_some(host),
                    source: "utmp".into(),
                }))
            }
            // The logout record is written by another process (sshd's monitor, init)
            // than the login's, so the session is the one open on that terminal.
            UtmpEntry::DeadProcess { line, .. } => {
                let (user, method, session) = self.open.remove(&line)?;
                Some(Event::AccessLogout(AccessLogout {
                    user,
                    method: method.into(),
                    session_id: Some(session),
                    tty: Some(line),
                    source: "utmp".into(),
                }))
            }
            _ => None,
        }
    }
}

/// The entries of whole wtmp records; a corrupt record is skipped, not the rest.
pub fn parse_records(buf: &[u8]) -> Vec<UtmpEntry> {
    let mut out = Vec::new();
    for chunk in buf.chunks(RECORD as usize) {
        match utmp_rs::parse_from_reader(chunk) {
            Ok(entries) => out.extend(entries),
            Err(e) => tracing::debug!(error = %e, "wtmp record skipped"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One wtmp record as glibc writes it (`struct utmp`, x86_64 and 32-bit alike):
    /// type @0, pid @4, line[32] @8, id[4] @40, user[32] @44, host[256] @76,
    /// exit @332, session @336, tv @340, addr_v6 @348.
    fn record(kind: i16, pid: i32, line: &str, user: &str, host: &str) -> Vec<u8> {
        let mut r = vec![0u8; RECORD as usize];
        r[0..2].copy_from_slice(&kind.to_le_bytes());
        r[4..8].copy_from_slice(&pid.to_le_bytes());
        r[8..8 + line.len()].copy_from_slice(line.as_bytes());
        r[44..44 + user.len()].copy_from_slice(user.as_bytes());
        r[76..76 + host.len()].copy_from_slice(host.as_bytes());
        r[340..344].copy_from_slice(&1_795_000_000i32.to_le_bytes());
        r
    }

    fn append(path: &std::path::Path, bytes: &[u8]) {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    #[test]
    fn console_and_remote_sessions_start_and_end_and_history_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let wtmp = dir.path().join("wtmp");
        append(&wtmp, &record(libc::USER_PROCESS, 10, "tty1", "old", ""));
        let mut f = WtmpFollower::new(&wtmp, None);
        assert!(f.read_new().unwrap().is_empty(), "history before the start");
        let mut burst = record(libc::USER_PROCESS, 11, "tty1", "root", "");
        burst.extend(record(libc::USER_PROCESS, 12, "pts/0", "alice", "10.1.2.3"));
        // Half a record: waits for the rest.
        burst.extend(&record(libc::DEAD_PROCESS, 11, "tty1", "", "")[..100]);
        append(&wtmp, &burst);
        let events = f.read_new().unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(
            matches!(&events[0], Event::AccessLogin(l) if l.user == "root" && l.method == "console" && l.tty.as_deref() == Some("tty1") && l.source == "utmp")
        );
        assert!(
            matches!(&events[1], Event::AccessLogin(l) if l.user == "alice" && l.method == "remote" && l.remote_addr.as_deref() == Some("10.1.2.3"))
        );
        append(
            &wtmp,
            &record(libc::DEAD_PROCESS, 11, "tty1", "", "")[100..],
        );
        let events = f.read_new().unwrap();
        assert!(
            matches!(&events[..], [Event::AccessLogout(l)] if l.user == "root" && l.method == "console"),
            "{events:?}"
        );
        // Rotation: a new, shorter file is read from its start; a restart resumes.
        let saved = f.position();
        std::fs::rename(&wtmp, dir.path().join("wtmp.1")).unwrap();
        append(&wtmp, &record(libc::USER_PROCESS, 13, "ttyS0", "bob", ""));
        let events = f.read_new().unwrap();
        assert!(
            matches!(&events[..], [Event::AccessLogin(l)] if l.user == "bob" && l.method == "tty")
        );
        let mut again = WtmpFollower::new(&wtmp, Some(f.position()));
        assert!(again.read_new().unwrap().is_empty(), "resumed, nothing new");
        assert_ne!(saved, f.position());
    }

    #[test]
    fn terminals_name_how_someone_logged_in() {
        assert_eq!(method("tty3", ""), "console");
        assert_eq!(method("ttyS0", ""), "tty");
        assert_eq!(method("pts/4", "192.0.2.1"), "remote");
        assert_eq!(method("pts/4", ""), "other");
    }
}
