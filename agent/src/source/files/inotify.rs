//! inotify backend (through `notify`), for where fanotify is unavailable (not root,
//! inside a user namespace). inotify does not say who wrote, so every file it
//! reports carries `attribution: none`; it cannot watch reads or refuse opens.
//!
//! Two gaps of inotify are closed here rather than hoped away:
//! - a directory is watched only after it appears, so files created in it before
//!   the watch was added would be missed: every new directory is scanned and its
//!   files are handed over as [`RawEvent::Found`] (reported once they are quiet) —
//!   twice, since notify hands the creation over before it adds the watch;
//! - the kernel queue can overflow (`IN_Q_OVERFLOW`, notify's `Rescan` flag): that is
//!   passed on as [`RawEvent::Overflow`], and the source rescans and says so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// How long after a directory appeared it is scanned again: notify hands over the
/// directory's creation before it adds the directory's watch, so a file written in
/// between is seen by neither the first scan nor the watch — the second scan finds it
/// (well within the quiet time before a file is reported, so a file found twice is
/// reported once).
const RESCAN_NEW_DIR_AFTER: Duration = Duration::from_millis(200);

/// New directories waiting for their second scan; beyond this they are treated as an
/// overflow (the source rescans everything and says so).
const MAX_DIRS_WAITING: usize = 4096;

impl InotifyBackend {
    pub fn new() -> Result<Self, String> {
        let (tx, rx) = mpsc::channel(256);
        let (dirs_tx, dirs_rx) =
            std::sync::mpsc::sync_channel::<(Instant, PathBuf)>(MAX_DIRS_WAITING);
        let rescan_tx = tx.clone();
        std::thread::Builder::new()
            .name("weilan-inotify-dirs".into())
            .spawn(move || rescan_new_dirs(dirs_rx, rescan_tx))
            .map_err(|e| format!("inotify: {e}"))?;
        let watcher = notify::INotifyWatcher::new(
            move |res: notify::Result<notify::Event>| {
                let (mut batch, new_dirs) = translate(res);
                for dir in new_dirs {
                    if dirs_tx.try_send((Instant::now(), dir)).is_err() {
                        batch.push(RawEvent::Overflow);
                        break;
                    }
                }
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

/// Scans each new directory a second time, [`RESCAN_NEW_DIR_AFTER`] after it appeared;
/// ends with the watcher.
fn rescan_new_dirs(
    dirs: std::sync::mpsc::Receiver<(Instant, PathBuf)>,
    tx: mpsc::Sender<Vec<RawEvent>>,
) {
    while let Ok((seen, dir)) = dirs.recv() {
        std::thread::sleep((seen + RESCAN_NEW_DIR_AFTER).saturating_duration_since(Instant::now()));
        let mut out = Vec::new();
        scan_new_dir(&dir, &mut out);
        if !out.is_empty() && tx.blocking_send(out).is_err() {
            return;
        }
    }
}

/// The raw events of one notify event, and the directories it says appeared (scanned
/// now, and again a moment later).
fn translate(res: notify::Result<notify::Event>) -> (Vec<RawEvent>, Vec<PathBuf>) {
    let ev = match res {
        Ok(ev) => ev,
        Err(e) => {
            tracing::error!(error = %e, "inotify error");
            return (Vec::new(), Vec::new());
        }
    };
    if ev.need_rescan() {
        return (vec![RawEvent::Overflow], Vec::new());
    }
    let write = |path: &PathBuf, close: bool| RawEvent::Write {
        path: path.clone(),
        close,
        writer: None,
        file: None,
        origins: Vec::new(),
    };
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => (
            ev.paths.iter().map(|p| write(p, true)).collect(),
            Vec::new(),
        ),
        EventKind::Modify(ModifyKind::Data(_)) | EventKind::Create(CreateKind::File) => (
            ev.paths.iter().map(|p| write(p, false)).collect(),
            Vec::new(),
        ),
        EventKind::Create(CreateKind::Folder) => {
            let mut out = Vec::new();
            for dir in &ev.paths {
                scan_new_dir(dir, &mut out);
            }
            (out, ev.paths)
        }
        _ => (Vec::new(), Vec::new()),
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
    fn mark_mount(
        &mut self,
        mount_point: &Path,
        _whole_fs: bool,
        _refuse: bool,
    ) -> Result<(), String> {
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
