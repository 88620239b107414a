//! inotify backend (through `notify`), for where fanotify is unavailable (not root,
//! inside a user namespace). inotify does not say who wrote, so every file it
//! reports carries `attribution: none`; it cannot watch reads or refuse opens.
//!
//! Two gaps of inotify are closed here rather than hoped away:
//! - a directory is watched only after it appears, so files created in it before
//!   the watch was added would be missed: every new directory is scanned and its
//!   files are handed over as [`RawEvent::Found`] (reported once they are quiet);
//! - the kernel queue can overflow (`IN_Q_OVERFLOW`, notify's `Rescan` flag): that is
//!   passed on as [`RawEvent::Overflow`], and the source rescans and says so.

use std::path::{Path, PathBuf};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{FileBackend, RawEvent};
use crate::source::BoxFuture;

/// Most files handed over from one new directory tree.
const MAX_FOUND_PER_DIR: usize = 100_000;

pub struct InotifyBackend {
    watcher: notify::INotifyWatcher,
    rx: mpsc::Receiver<Vec<RawEvent>>,
}

impl InotifyBackend {
    pub fn new() -> Result<Self, String> {
        let (tx, rx) = mpsc::channel(256);
        let watcher = notify::INotifyWatcher::new(
            move |res: notify::Result<notify::Event>| {
                let batch = translate(res);
                // Blocking here holds notify's thread: the kernel queue then fills and
                // overflows, which is reported — back-pressure, never a silent drop.
                if !batch.is_empty() {
                    let _ = tx.blocking_send(batch);
                }
            },
            notify::Config::default(),
        )
        .map_err(|e| format!("inotify: {e}"))?;
        Ok(InotifyBackend { watcher, rx })
    }
}

fn translate(res: notify::Result<notify::Event>) -> Vec<RawEvent> {
    let ev = match res {
        Ok(ev) => ev,
        Err(e) => {
            tracing::error!(error = %e, "inotify error");
            return Vec::new();
        }
    };
    if ev.need_rescan() {
        return vec![RawEvent::Overflow];
    }
    let write = |path: &PathBuf, close: bool| RawEvent::Write {
        path: path.clone(),
        close,
        writer: None,
        file: None,
        origins: Vec::new(),
    };
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            ev.paths.iter().map(|p| write(p, true)).collect()
        }
        EventKind::Modify(ModifyKind::Data(_)) | EventKind::Create(CreateKind::File) => {
            ev.paths.iter().map(|p| write(p, false)).collect()
        }
        EventKind::Create(CreateKind::Folder) => {
            let mut out = Vec::new();
            for dir in &ev.paths {
                scan_new_dir(dir, &mut out);
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Files already inside a directory that just appeared (e.g. `cp -r`, `mkdir -p a/b`
/// then a quick write).
fn scan_new_dir(dir: &Path, out: &mut Vec<RawEvent>) {
    let mut stack = vec![dir.to_path_buf()];
    let mut n = 0;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                n += 1;
                if n > MAX_FOUND_PER_DIR {
                    // Treat it like an overflow: the source rescans and says so.
                    out.push(RawEvent::Overflow);
                    return;
                }
                out.push(RawEvent::Found { path: e.path() });
            }
        }
    }
}

impl FileBackend for InotifyBackend {
    fn mark_mount(&mut self, mount_point: &Path, _whole_fs: bool) -> Result<(), String> {
        self.watcher
            .watch(mount_point, RecursiveMode::Recursive)
            .map_err(|e| format!("inotify watch {}: {e}", mount_point.display()))
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Vec<RawEvent>, String>> {
        Box::pin(async move {
            self.rx
                .recv()
                .await
                .ok_or_else(|| "the inotify watcher stopped".to_string())
        })
    }
}
