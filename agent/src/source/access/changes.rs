//! Wakes a log follower when the file it reads may have grown or been replaced
//! (inotify, through `notify`), instead of looking every `poll`: on a host whose
//! logins go to wtmp or an auth log, a quiet file costs no wakeups and no reads.
//!
//! The watch is on the file itself (not its busy directory), so other logs' writes do
//! not wake it. A rotation (the file renamed or deleted, a new one made) is noticed by
//! its inode: the new file is watched from the next wait on. While the file does not
//! exist, or if inotify is not available, the follower looks every `poll` as before;
//! and it always looks at least every [`LONGEST_WAIT`], so a missed event costs
//! latency, never a login.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The longest a follower waits without an event.
pub const LONGEST_WAIT: Duration = Duration::from_secs(10);

/// Why [`FileChanges::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// inotify said the file changed (or was moved, deleted, made).
    Changed,
    /// The wait's time was up (polling, or the longest wait).
    Timeout,
    Shutdown,
}

/// Whether an inotify event means the file may read differently now: written,
/// truncated, renamed, deleted, made — not opened, read or closed after reading.
fn changes_file(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) | notify::EventKind::Other => false,
        _ => true,
    }
}

pub struct FileChanges {
    path: PathBuf,
    /// `None`: inotify could not be set up; the follower polls.
    watcher: Option<notify::INotifyWatcher>,
    /// The inode being watched.
    watched: Option<u64>,
    events: mpsc::UnboundedReceiver<()>,
}

impl FileChanges {
    pub fn new(path: &Path) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = notify::INotifyWatcher::new(
            move |event: notify::Result<notify::Event>| {
                // The follower's own opens and reads are inotify events too: only a
                // change of the file may wake it, or it would wake itself for ever.
                if event.is_ok_and(|e| changes_file(&e.kind)) {
                    let _ = tx.send(());
                }
            },
            notify::Config::default(),
        )
        .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "no inotify for the log; it is read every poll"))
        .ok();
        FileChanges {
            path: path.to_path_buf(),
            watcher,
            watched: None,
            events,
        }
    }

    /// Watches the file now at the path, if that is another inode than the watched one.
    /// True when a watch is in place.
    fn watch_current(&mut self) -> bool {
        let Some(watcher) = self.watcher.as_mut() else {
            return false;
        };
        let ino = std::fs::metadata(&self.path).ok().map(|m| m.ino());
        if ino.is_some() && ino == self.watched {
            return true;
        }
        if self.watched.take().is_some() {
            let _ = watcher.unwatch(&self.path);
        }
        let Some(ino) = ino else { return false };
        match watcher.watch(&self.path, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.watched = Some(ino);
                true
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "log not watched; polling");
                false
            }
        }
    }

    /// Waits for a change of the file (or `poll` when it cannot be watched, at most
    /// [`LONGEST_WAIT`] in any case).
    pub fn wait(&mut self, shutdown: &CancellationToken, poll: Duration) -> Wake {
        let before = self.watched;
        let longest = if self.watch_current() {
            LONGEST_WAIT
        } else {
            poll
        };
        // A file watched only from now on (a rotation's new one) may have been written
        // before the watch: read it once first.
        if before.is_some() && self.watched != before {
            return Wake::Changed;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return if crate::source::sleep_unless_cancelled(shutdown, poll) {
                Wake::Timeout
            } else {
                Wake::Shutdown
            };
        };
        let events = &mut self.events;
        let woke = runtime.block_on(async {
            tokio::select! {
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = events.recv() => Wake::Changed,
                _ = tokio::time::sleep(longest) => Wake::Timeout,
            }
        });
        // Several events for one write (or a burst of writes) are one wakeup.
        while self.events.try_recv().is_ok() {}
        if shutdown.is_cancelled() {
            Wake::Shutdown
        } else {
            woke
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_write_and_a_rotation_wake_the_waiter_and_a_quiet_file_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.log");
        std::fs::write(&path, "").unwrap();
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let shutdown = CancellationToken::new();
            let mut changes = FileChanges::new(&p);
            assert!(changes.watch_current(), "inotify watch in place");
            // Read, not written: nothing arrives. (Reading used to wake the
            // follower, which read again: a busy loop.)
            assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
            std::thread::sleep(Duration::from_millis(200));
            assert!(changes.events.try_recv().is_err(), "a read woke the waiter");
            let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
            writeln!(f, "a line").unwrap();
            assert_eq!(
                changes.wait(&shutdown, Duration::from_secs(3600)),
                Wake::Changed
            );
            // Rotated: renamed away, a new file made; the new inode is watched.
            let first = changes.watched;
            std::fs::rename(&p, p.with_extension("log.1")).unwrap();
            std::fs::write(&p, "").unwrap();
            assert_eq!(
                changes.wait(&shutdown, Duration::from_secs(3600)),
                Wake::Changed
            );
            assert!(changes.watch_current());
            assert_ne!(changes.watched, first);
            writeln!(
                std::fs::OpenOptions::new().append(true).open(&p).unwrap(),
                "after rotation"
            )
            .unwrap();
            assert_eq!(
                changes.wait(&shutdown, Duration::from_secs(3600)),
                Wake::Changed
            );
            shutdown.cancel();
            assert_eq!(
                changes.wait(&shutdown, Duration::from_secs(3600)),
                Wake::Shutdown
            );
        })
        .await
        .unwrap();
    }
}
