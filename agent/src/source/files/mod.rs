//! The files source: every file written onto an exit point (removable media, network
//! shares) becomes one `file.exported` event with its writer, hash and classification.
//!
//! Exit points are found in the mount table: mounts of block devices that live on USB,
//! network and FUSE file systems named in the settings, and explicitly configured
//! mount points. Each is marked with fanotify (`FAN_MARK_MOUNT`), whose events carry
//! the writing process. Writes are aggregated per file (first and last write) and the
//! file is reported when it is closed after writing; hashing and classification run on
//! bounded workers, off the event loop.

pub mod linux;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::Semaphore;
use weilan_config::event::{Classification, Event, FileExported, FileOverflow};

use super::usb::mounts::{self, Mount};
use super::usb::sysfs::Sysfs;
use super::{BoxFuture, Source, SourceContext, SourceError};
use crate::classify::{detectors, extract};

/// Who did a write, read from `/proc` when the event arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writer {
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
}

/// One event from the kernel interface.
#[derive(Debug)]
pub enum RawEvent {
    /// A file was modified (`close == false`) or closed after writing (`close == true`).
    Write {
        path: PathBuf,
        close: bool,
        writer: Option<Writer>,
        /// The written file itself (close events): hashing it by descriptor survives a
        /// rename right after the write (rsync's temporary-name-then-rename).
        file: Option<std::fs::File>,
    },
    /// The kernel queue overflowed: events were lost.
    Overflow,
}

/// The kernel interface: marks mounts and yields events.
pub trait FileBackend: Send {
    fn mark_mount(&mut self, mount_point: &Path) -> Result<(), String>;
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<RawEvent>, String>>;
}

#[derive(Debug, Clone)]
pub struct FilesConfig {
    pub sysfs_root: PathBuf,
    pub mountinfo: PathBuf,
    pub mount_poll: Duration,
    /// Mount points always watched (besides USB and network mounts).
    pub watch_mounts: Vec<PathBuf>,
    /// File system types that are exit points (network shares, FUSE, MTP).
    pub network_fs: Vec<String>,
    /// Files are hashed up to this many bytes (the event says when a file was larger).
    pub hash_max_bytes: u64,
    pub limits: extract::Limits,
    /// Files hashed and classified at once.
    pub workers: usize,
}

pub fn default_network_fs() -> Vec<String> {
    [
        "cifs",
        "smb3",
        "nfs",
        "nfs4",
        "fuse.sshfs",
        "fuse.rclone",
        "davfs",
        "fuse.davfs2",
        "fuse.gvfsd-fuse",
        "fuse.jmtpfs",
        "fuse.simple-mtpfs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

struct ExitPoint {
    mount: Mount,
    usb_serial: Option<String>,
    usb_hash: Option<String>,
}

struct Pending {
    first: Timestamp,
    last: Timestamp,
    writer: Option<Writer>,
}

pub struct FilesSource {
    config: FilesConfig,
    backend: Box<dyn FileBackend>,
    sysfs: Sysfs,
}

impl FilesSource {
    pub fn new(config: FilesConfig, backend: Box<dyn FileBackend>) -> Self {
        let root = std::fs::canonicalize(&config.sysfs_root).unwrap_or(config.sysfs_root.clone());
        FilesSource {
            sysfs: Sysfs::new(root),
            config,
            backend,
        }
    }

    /// Exit points in a mount table.
    fn exit_points(&self, table: &BTreeMap<u64, Mount>) -> Vec<ExitPoint> {
        let explicit: HashSet<&Path> = self
            .config
            .watch_mounts
            .iter()
            .map(PathBuf::as_path)
            .collect();
        let mut out = Vec::new();
        for m in table.values() {
            let usb = self
                .sysfs
                .block_dir(&m.dev)
                .and_then(|b| self.sysfs.usb_ancestor(&b))
                .and_then(|d| self.sysfs.read_device(&d, false).ok());
            let wanted = explicit.contains(Path::new(&m.mount_point))
                || self.config.network_fs.contains(&m.fs_type)
                || usb.is_some();
            if wanted {
                out.push(ExitPoint {
                    mount: m.clone(),
                    usb_serial: usb.as_ref().and_then(|u| u.serial.clone()),
                    usb_hash: usb.map(|u| u.hash),
                });
            }
        }
        out
    }

    async fn run_inner(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        let mut marked: HashMap<String, ExitPoint> = HashMap::new();
        let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
        let workers = Arc::new(Semaphore::new(self.config.workers.max(1)));
        let mut poll = tokio::time::interval(self.config.mount_poll);
        // When the last write was seen: after an overflow, rescan from a bit before it.
        let mut last_seen = Timestamp::now();
        // Files reported recently and when they were closed, so a rescan does not
        // report them again (bounded).
        let mut reported: HashMap<PathBuf, Timestamp> = HashMap::new();
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                _ = poll.tick() => {
                    let text = tokio::fs::read_to_string(&self.config.mountinfo).await.unwrap_or_default();
                    let table = mounts::parse(&text);
                    let now: Vec<ExitPoint> = self.exit_points(&table);
                    let current: HashSet<String> = now.iter().map(|e| e.mount.mount_point.clone()).collect();
                    marked.retain(|mp, _| current.contains(mp));
                    for ep in now {
                        if marked.contains_key(&ep.mount.mount_point) {
                            continue;
                        }
                        match self.backend.mark_mount(Path::new(&ep.mount.mount_point)) {
                            Ok(()) => {
                                tracing::info!(mount = %ep.mount.mount_point, fs = %ep.mount.fs_type, "watching exit point");
                                marked.insert(ep.mount.mount_point.clone(), ep);
                            }
                            Err(e) => tracing::error!(mount = %ep.mount.mount_point, error = %e, "cannot watch exit point"),
                        }
                    }
                }
                batch = self.backend.next() => {
                    let batch = batch.map_err(SourceError::Other)?;
                    for ev in batch {
                        match ev {
                            RawEvent::Overflow => {
                                tracing::error!("fanotify queue overflowed; rescanning the exit points");
                                let since = last_seen - jiff::SignedDuration::from_secs(2);
                                let overflow = rescan(
                                    &self.config, &marked, &pending, &reported, since, ctx, &workers).await?;
                                ctx.sink.emit(Event::FileOverflow(overflow)).await?;
                            }
                            RawEvent::Write { path, close, writer, file } => {
                                let now = Timestamp::now();
                                last_seen = now;
                                let entry = pending.entry(path.clone()).or_insert(Pending { first: now, last: now, writer: None });
                                entry.last = now;
                                // Keep the best-known writer (one whose executable was read).
                                if entry.writer.as_ref().is_none_or(|w| w.exe.is_none()) && writer.is_some() {
                                    entry.writer = writer;
                                }
                                if close {
                                    if reported.len() >= 100_000 {
                                        reported.clear();
                                    }
                                    reported.insert(path.clone(), now);
                                    let p = pending.remove(&path).expect("just inserted");
                                    let Some(ep) = marked.values().filter(|e| path.starts_with(&e.mount.mount_point)).max_by_key(|e| e.mount.mount_point.len()) else {
                                        continue;
                                    };
                                    let job = Job {
                                        path,
                                        file,
                                        pending: p,
                                        mount_point: ep.mount.mount_point.clone(),
                                        fs_type: ep.mount.fs_type.clone(),
                                        source: ep.mount.source.clone(),
                                        usb_serial: ep.usb_serial.clone(),
                                        usb_hash: ep.usb_hash.clone(),
                                        hash_max: self.config.hash_max_bytes,
                                        limits: self.config.limits,
                                    };
                                    spawn_job(job, ctx, &workers).await?;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Describes a file on a bounded worker and emits its `file.exported`.
async fn spawn_job(
    job: Job,
    ctx: &SourceContext,
    workers: &Arc<Semaphore>,
) -> Result<(), SourceError> {
    let permit = workers
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| SourceError::PipelineClosed)?;
    let sink = ctx.sink.clone();
    tokio::spawn(async move {
        let event = tokio::task::spawn_blocking(move || job.describe()).await;
        drop(permit);
        match event {
            Ok(Some(e)) => {
                let _ = sink.emit(Event::FileExported(e)).await;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "file description failed"),
        }
    });
    Ok(())
}

/// Most directory entries one rescan walks.
const RESCAN_MAX_ENTRIES: u64 = 200_000;

/// After an overflow: report files on the exit points modified since `since` that
/// are not already pending (writer unknown).
async fn rescan(
    config: &FilesConfig,
    marked: &HashMap<String, ExitPoint>,
    pending: &HashMap<PathBuf, Pending>,
    reported: &HashMap<PathBuf, Timestamp>,
    since: Timestamp,
    ctx: &SourceContext,
    workers: &Arc<Semaphore>,
) -> Result<FileOverflow, SourceError> {
    let mut walked = 0u64;
    let mut found = 0u64;
    let mut complete = true;
    let since_sys: std::time::SystemTime = since.into();
    for ep in marked.values() {
        let mut stack = vec![PathBuf::from(&ep.mount.mount_point)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                walked += 1;
                if walked > RESCAN_MAX_ENTRIES {
                    complete = false;
                    break;
                }
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() {
                    stack.push(entry.path());
                    continue;
                }
                if !ft.is_file() || pending.contains_key(&entry.path()) {
                    continue;
                }
                let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
                    continue;
                };
                if modified < since_sys {
                    continue;
                }
                let at = Timestamp::try_from(modified).unwrap_or(since);
                if reported
                    .get(&entry.path())
                    .is_some_and(|closed| *closed >= at)
                {
                    continue; // reported when it was closed, unchanged since
                }
                found += 1;
                let job = Job {
                    path: entry.path(),
                    file: None,
                    pending: Pending {
                        first: at,
                        last: at,
                        writer: None,
                    },
                    mount_point: ep.mount.mount_point.clone(),
                    fs_type: ep.mount.fs_type.clone(),
                    source: ep.mount.source.clone(),
                    usb_serial: ep.usb_serial.clone(),
                    usb_hash: ep.usb_hash.clone(),
                    hash_max: config.hash_max_bytes,
                    limits: config.limits,
                };
                spawn_job(job, ctx, workers).await?;
            }
        }
    }
    Ok(FileOverflow {
        mount_points: marked.keys().cloned().collect(),
        since,
        rescanned: found,
        walked,
        complete,
    })
}

struct Job {
    path: PathBuf,
    file: Option<std::fs::File>,
    pending: Pending,
    mount_point: String,
    fs_type: String,
    source: String,
    usb_serial: Option<String>,
    usb_hash: Option<String>,
    hash_max: u64,
    limits: extract::Limits,
}

impl Job {
    /// Stats, hashes and classifies the file (blocking). `None` if it is gone.
    fn describe(mut self) -> Option<FileExported> {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        // The file as written, wherever it is now (renamed, or even deleted).
        let opened = match self.file.take() {
            Some(f) => Ok(f),
            None => std::fs::File::open(&self.path),
        };
        if let Ok(f) = &opened {
            if let Ok(now) = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())) {
                if !now.to_string_lossy().ends_with(" (deleted)") {
                    self.path = now;
                }
            }
        }
        let meta = match &opened {
            Ok(f) => f.metadata().ok()?,
            Err(_) => return None,
        };
        if !meta.is_file() {
            return None;
        }
        let (sha256, hashed) = match opened {
            Ok(f) => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                let mut reader = f.take(self.hash_max);
                let mut buf = vec![0u8; 256 * 1024];
                let mut n_total = 0u64;
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            ctx.update(&buf[..n]);
                            n_total += n as u64;
                        }
                        Err(_) => break,
                    }
                }
                (Some(hex::encode(ctx.finish().as_ref())), n_total)
            }
            Err(_) => (None, 0),
        };
        let (classification, note) = match extract::extract(&self.path, self.limits) {
            extract::Extracted::Text {
                text, truncated, ..
            } => (
                detectors::scan(&text)
                    .into_iter()
                    .map(|f| Classification {
                        detector: f.detector,
                        count: f.count,
                        samples: f.samples,
                    })
                    .collect(),
                truncated.then(|| "truncated: only the first part was classified".to_string()),
            ),
            extract::Extracted::Unsupported(kind) => {
                (Vec::new(), Some(format!("unsupported: {kind}")))
            }
            extract::Extracted::Failed(e) => (Vec::new(), Some(format!("failed: {e}"))),
        };
        let w = self.pending.writer;
        Some(FileExported {
            path: self.path.display().to_string(),
            mount_point: self.mount_point,
            fs_type: self.fs_type,
            mount_source: self.source,
            usb_serial: self.usb_serial,
            usb_hash: self.usb_hash,
            size: meta.len(),
            sha256,
            hashed_bytes: hashed,
            pid: w.as_ref().map(|w| w.pid),
            exe: w.as_ref().and_then(|w| w.exe.clone()),
            cmdline: w.as_ref().and_then(|w| w.cmdline.clone()),
            uid: w.as_ref().and_then(|w| w.uid),
            user: w.as_ref().and_then(|w| w.user.clone()),
            first_write: self.pending.first,
            last_write: self.pending.last,
            attribution: if w.is_some() {
                "fanotify".into()
            } else {
                "none".into()
            },
            classification,
            classification_note: note,
        })
    }
}

impl Source for FilesSource {
    fn name(&self) -> &'static str {
        "files"
    }

    fn run<'a>(&'a mut self, ctx: &'a SourceContext) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(self.run_inner(ctx))
    }
}

#[cfg(test)]
mod tests;
