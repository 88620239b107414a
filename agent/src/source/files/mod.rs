//! The files source: every file written onto an exit point (removable media, network
//! shares) becomes one `file.exported` event with its writer, hash and classification.
//!
//! Exit points are found in the mount table: mounts of block devices that live on USB,
//! network and FUSE file systems named in the settings, and explicitly configured
//! mount points. Each is marked with fanotify (`FAN_MARK_MOUNT`), whose events carry
//! the writing process. Writes are aggregated per file (first and last write) and the
//! file is reported when it is closed after writing; hashing and classification run on
//! bounded workers, off the event loop.

pub mod inotify;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod writers;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use weilan_config::event::{Event, FileEnforced, FileExported, FileOverflow, FileSourceRead};
use weilan_config::policy::files::{ExitKind, FilesPolicy};
use weilan_config::policy::Policy;

use super::usb::mounts::{self, Mount};
use super::usb::sysfs::Sysfs;
use super::{BoxFuture, Source, SourceContext, SourceError};
use crate::classify::{extract, Classifier};

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
        /// Sensitive source files the writer read shortly before.
        origins: Vec<String>,
    },
    /// A file found in a directory that appeared (inotify cannot watch a directory
    /// before it exists): reported once it has been quiet, unless a close comes first.
    Found { path: PathBuf },
    /// The kernel queue overflowed: events were lost.
    Overflow,
    /// A process opened a file in a sensitive source folder.
    SourceRead(FileSourceRead),
    /// Watching works, but less well than it should (said as a source problem).
    Degraded(String),
    /// A copy was refused while it happened (a `deny` rule); `created` is an empty
    /// file the refused `O_CREAT` left on the exit point, to be removed.
    Denied {
        enforced: Box<FileEnforced>,
        created: Option<PathBuf>,
    },
}

/// An exit point as the permission handler needs it.
#[derive(Debug, Clone)]
pub struct GuardedExit {
    pub mount_point: PathBuf,
    /// The mounted device (`st_dev`), to place files written through other mounts.
    pub dev: Option<u64>,
    pub kind: ExitKind,
    pub usb_hash: Option<String>,
}

/// What a backend that can refuse opens needs to know; the source keeps it current.
#[derive(Default)]
pub struct GuardState {
    pub exits: Vec<GuardedExit>,
    pub sources: Vec<PathBuf>,
    pub policy: Arc<FilesPolicy>,
    pub classifier: Arc<Classifier>,
}

impl GuardState {
    /// The exit point holding `path` (the longest mount point that is a prefix).
    pub fn exit_for(&self, path: &Path) -> Option<&GuardedExit> {
        self.exits
            .iter()
            .filter(|e| path.starts_with(&e.mount_point))
            .max_by_key(|e| e.mount_point.as_os_str().len())
    }

    /// Where a file the kernel named `path` lies, as this agent sees it. A file
    /// written through a mount in another mount namespace is named relative to its
    /// file system's root (that mount is not reachable from here): it is placed under
    /// the exit point showing the same device (`dev` from the file's `st_dev`).
    pub fn place(&self, path: PathBuf, dev: impl FnOnce() -> Option<u64>) -> PathBuf {
        if self.exit_for(&path).is_some() || self.source_for(&path).is_some() {
            return path;
        }
        let Some(dev) = dev() else { return path };
        match self.exits.iter().find(|e| e.dev == Some(dev)) {
            Some(e) => in_view(&e.mount_point, &path),
            None => path,
        }
    }

    /// The sensitive source folder holding `path`.
    pub fn source_for(&self, path: &Path) -> Option<&PathBuf> {
        self.sources.iter().find(|s| path.starts_with(s))
    }
}

pub type Guard = Arc<RwLock<GuardState>>;

/// The kernel interface: marks mounts and yields events.
pub trait FileBackend: Send {
    /// Watches an exit point, or changes how. `whole_fs`: the mount shows the whole
    /// file system, so the backend may watch the file system itself — then writes
    /// through any mount of it, in any mount namespace (containers, sandboxed
    /// services, flatpak), are seen, not only those through this mount. `refuse`: a
    /// `deny` rule applies to this exit point, so opens on it must wait for a
    /// decision (permission events); otherwise writes are only observed.
    fn mark_mount(
        &mut self,
        mount_point: &Path,
        whole_fs: bool,
        refuse: bool,
    ) -> Result<(), String>;
    /// Watches opens of the files directly in `dir` (a sensitive source folder or
    /// one of its subfolders), or changes how; `refuse` as for [`Self::mark_mount`].
    fn mark_source_dir(&mut self, dir: &Path, _refuse: bool) -> Result<(), String> {
        Err(format!(
            "{}: this backend cannot watch reads (fanotify is needed)",
            dir.display()
        ))
    }
    /// The exit point at `mount_point` went away (unmounted): its marks went with it.
    fn forget_mount(&mut self, _mount_point: &Path) {}
    /// Watches which programs start from the file system holding `mount_point`, so a
    /// writer is named by the program it started even if it exits before its writes
    /// are read. Each file system once; backends that cannot do nothing.
    fn watch_programs(&mut self, _mount_point: &Path) -> Result<(), String> {
        Ok(())
    }
    /// The state its permission handler decides with, if it has one; the source
    /// keeps it current.
    fn guard(&self) -> Option<Guard> {
        None
    }
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<RawEvent>, String>>;
}

#[derive(Debug, Clone)]
pub struct FilesConfig {
    pub sysfs_root: PathBuf,
    pub mountinfo: PathBuf,
    pub mount_poll: Duration,
    /// Mount points always watched (besides USB and network mounts).
    pub watch_mounts: Vec<PathBuf>,
    /// Files are hashed up to this many bytes (the event says when a file was larger).
    pub hash_max_bytes: u64,
    pub limits: extract::Limits,
    /// Files hashed and classified at once.
    pub workers: usize,
    /// How long a file found in a new directory must be quiet before it is reported.
    pub settle: Duration,
}

#[derive(Clone)]
struct ExitPoint {
    mount: Mount,
    kind: ExitKind,
    usb_serial: Option<String>,
    usb_hash: Option<String>,
    /// A `deny` rule applies here: opens are permission events.
    refuse: bool,
}

/// The sensitive source folders marked, and whether opens in them are permission
/// events (the policy has a `deny` rule).
#[derive(Default)]
struct SourceMarks {
    dirs: HashSet<PathBuf>,
    refuse: bool,
}

struct Pending {
    first: Timestamp,
    last: Timestamp,
    writer: Option<Writer>,
    origins: Vec<String>,
    /// The file itself, from its first write event: if its exit point goes away
    /// before it is closed (a stick pulled), it is still described through this.
    held: Option<std::fs::File>,
    /// Found by a directory scan (no write event seen): reported once quiet.
    found: bool,
    quiet_since: std::time::Instant,
}

impl Pending {
    /// A file first seen `now`, by a write event or (`found`) a directory scan.
    fn new(now: Timestamp, found: bool) -> Pending {
        Pending {
            first: now,
            last: now,
            writer: None,
            origins: Vec::new(),
            held: None,
            found,
            quiet_since: std::time::Instant::now(),
        }
    }
}

/// File systems no program is started from (kernel interfaces).
const NO_PROGRAMS: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "hugetlbfs",
    "autofs",
    "binfmt_misc",
    "efivarfs",
    "nsfs",
    "rpc_pipefs",
    "selinuxfs",
];

/// Most directories marked under the sensitive source folders.
const MAX_SOURCE_DIRS: usize = 10_000;
/// How often the sensitive source folders are walked for new subfolders.
const SOURCE_REWALK: Duration = Duration::from_secs(10);

pub struct FilesSource {
    config: FilesConfig,
    backend: Box<dyn FileBackend>,
    sysfs: Sysfs,
    policy: watch::Receiver<Arc<Policy>>,
    judge: Arc<dyn FileJudge>,
    guard: Guard,
    /// The backend can refuse opens (it has a guard): exit points a `deny` rule
    /// applies to are marked for permission events.
    guard_refuses: bool,
    /// The mount table (its hash) whose file systems program starts are watched on.
    programs_watched_for: Option<u64>,
    /// Exit points mounted only in other mount namespaces, and when they were found.
    foreign: (Option<std::time::Instant>, Vec<ExitPoint>),
    /// Exit points already derived from a mount table, by a hash of its text: an
    /// unchanged table costs a hash, not a sysfs walk per mount (see `exit_points_in`).
    derived: HashMap<u64, Vec<ExitPoint>>,
}

/// Mount tables whose exit points are remembered at most (the agent's own and one per
/// other mount namespace); beyond it the memory starts afresh.
const MAX_DERIVED: usize = 256;

/// How often other mount namespaces are searched for exit points.
const FOREIGN_RESCAN: Duration = Duration::from_secs(2);

/// What a worker reads a file with: the policy in force and its classifier.
#[derive(Clone)]
struct Reading {
    policy: Arc<FilesPolicy>,
    classifier: Arc<Classifier>,
}

/// A file written onto an exit point, as the source found it: where, by whom, its
/// content's hash and classes. `event.action` and `event.rule_id` are left to the
/// guard.
pub struct WrittenFile {
    pub event: FileExported,
    pub kind: ExitKind,
    /// The policy the file was classified under (its detectors), to decide with.
    pub policy: Arc<FilesPolicy>,
}

/// What the files source reports to the files guard.
pub enum FileFact {
    Written(Box<WrittenFile>),
    /// The permission handler refused an open (the one decision taken in line);
    /// `created` is the empty file a refused `O_CREAT` may have left.
    Refused {
        enforced: Box<FileEnforced>,
        created: Option<PathBuf>,
    },
}

/// Decides on the source's facts and acts (`crate::guard::files::FilesGuard`; a
/// recorder in tests); returns the events to record, in order.
pub trait FileJudge: Send + Sync {
    fn judge(&self, fact: FileFact) -> Vec<Event>;
}

/// What the files source's loop keeps between events.
struct Watch {
    /// Exit points being watched, by mount point.
    marked: HashMap<String, ExitPoint>,
    /// Files being written, not closed yet.
    pending: HashMap<PathBuf, Pending>,
    /// Everything modified before this is known to be reported (or pending): the
    /// source's start, then the start of the last rescan. After an overflow the
    /// rescan starts here — not at the last event processed, which may lag far
    /// behind the writes that were lost.
    complete_until: Timestamp,
    /// Files the last rescans reported, so that their close events still queued
    /// behind the overflow do not report them twice (bounded).
    rescanned: HashMap<PathBuf, Timestamp>,
    /// Closed files waiting out the rename grace (see `RENAME_GRACE`), in order of
    /// their deadline.
    delayed: std::collections::VecDeque<(tokio::time::Instant, Job)>,
    /// Files reported recently and when they were closed, so a rescan does not
    /// report them again (bounded).
    reported: HashMap<PathBuf, Timestamp>,
    /// Rewrite loops being folded into one event each.
    folding: HashMap<PathBuf, Folding>,
    /// Descriptors kept by files still being written (see `Pending::held`).
    held_open: usize,
    /// Exit points that went away lately: writes to them still queued are reported.
    gone_exits: GoneExits,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            marked: HashMap::new(),
            pending: HashMap::new(),
            complete_until: Timestamp::now(),
            rescanned: HashMap::new(),
            delayed: std::collections::VecDeque::new(),
            reported: HashMap::new(),
            folding: HashMap::new(),
            held_open: 0,
            gone_exits: GoneExits::default(),
        }
    }

    /// One write or close read from the backend: folded into its file's pending
    /// writes; a close hands the file on (after the rename grace, or folded into a
    /// rewrite loop); a write to an exit point that went away meanwhile is reported
    /// at once, through its descriptor.
    async fn on_write(
        &mut self,
        hash_max: u64,
        reading: &Reading,
        workers: &Workers,
        write: Write,
    ) -> Result<(), SourceError> {
        let Write {
            path,
            close,
            writer,
            file,
            origins,
        } = write;
        let now = Timestamp::now();
        // The stick was pulled before this write was read (a
        // busy host): there is no later close or mount change
        // to report it by, so it is reported now, through its
        // descriptor.
        if !on_exit_point(&self.marked, &path) {
            if let Some(ep) = self.gone_exits.find(&path) {
                let mut p = self
                    .pending
                    .remove(&path)
                    .unwrap_or_else(|| Pending::new(now, false));
                let held = p.held.take();
                self.held_open -= usize::from(held.is_some());
                let file = file.or(held);
                p.last = now;
                if p.writer.as_ref().is_none_or(|w| w.exe.is_none()) && writer.is_some() {
                    p.writer = writer;
                }
                p.origins.extend(origins.into_iter().take(16));
                tracing::warn!(path = %path.display(), mount = %ep.mount.mount_point, close, "write read after its exit point went away; reported now");
                let mut job = job_on(ep, hash_max, path, file, p, reading);
                job.unclosed = !close;
                workers.submit(job).await?;
                return Ok(());
            }
        }
        if close && rescanned_before(&mut self.rescanned, &path, file.as_ref()) {
            if self.pending.remove(&path).is_some_and(|p| p.held.is_some()) {
                self.held_open -= 1;
            }
            return Ok(()); // reported by the rescan, unchanged since
        }
        let entry = self
            .pending
            .entry(path.clone())
            .or_insert(Pending::new(now, false));
        entry.last = now;
        entry.found = false;
        // A write's descriptor is kept (the first) in case
        // the file is never closed; a close's is described.
        let file = if close {
            file
        } else {
            if entry.held.is_none() && self.held_open < MAX_HELD_OPEN {
                self.held_open += usize::from(file.is_some());
                entry.held = file;
            }
            None
        };
        entry.quiet_since = std::time::Instant::now();
        for o in origins {
            if !entry.origins.contains(&o) && entry.origins.len() < 16 {
                entry.origins.push(o);
            }
        }
        // Keep the best-known writer (one whose executable was read).
        if entry.writer.as_ref().is_none_or(|w| w.exe.is_none()) && writer.is_some() {
            entry.writer = writer;
        }
        if close {
            self.on_close(hash_max, reading, workers, path, file, now)
                .await?;
        }

        Ok(())
    }

    /// Events were lost (the kernel's queue overflowed): the exit points are walked
    /// for files modified since the last complete point, and the files being written
    /// are reported once they are quiet (their close may have been lost).
    async fn after_overflow(
        &mut self,
        hash_max: u64,
        reading: &Reading,
        workers: &Workers,
    ) -> Result<FileOverflow, SourceError> {
        tracing::error!("file event queue overflowed; rescanning the exit points");
        let since = self.complete_until - jiff::SignedDuration::from_secs(2);
        let walk_started = Timestamp::now();
        if self.rescanned.len() >= 200_000 {
            self.rescanned.clear();
        }
        let overflow = rescan(
            hash_max,
            &self.marked,
            &self.pending,
            &mut self.reported,
            &mut self.rescanned,
            since,
            workers,
            reading,
        )
        .await?;
        self.complete_until = walk_started;
        for p in self.pending.values_mut() {
            p.found = true;
        }
        Ok(overflow)
    }

    /// A file closed: reported after the rename grace, or folded into its report
    /// still waiting or into a rewrite loop.
    async fn on_close(
        &mut self,
        hash_max: u64,
        reading: &Reading,
        workers: &Workers,
        path: PathBuf,
        file: Option<std::fs::File>,
        now: Timestamp,
    ) -> Result<(), SourceError> {
        if self.reported.len() >= REPORTED_MAX {
            // Only files reported since the last complete
            // point matter to a future rescan.
            let keep = self.complete_until - jiff::SignedDuration::from_secs(2);
            self.reported.retain(|_, t| *t >= keep);
            if self.reported.len() >= REPORTED_MAX {
                self.reported.clear();
            }
        }
        let again = self
            .reported
            .get(&path)
            .is_some_and(|t| now.duration_since(*t).unsigned_abs() < COALESCE_WINDOW);
        self.reported.insert(path.clone(), now);
        let p = self.pending.remove(&path).expect("just inserted");
        self.held_open -= usize::from(p.held.is_some());
        if let Some(mut job) = job(hash_max, &self.marked, path, file, p, reading) {
            // Closed again soon after its last report: a
            // rewrite loop, folded into one event that is
            // described when the loop stops.
            // Closed again before its report went out (still
            // waiting out the rename grace): that one report
            // carries the newest content and both rounds.
            if let Some((_, waiting)) = self.delayed.iter_mut().find(|(_, j)| j.path == job.path) {
                job.rewrites = waiting.rewrites.max(1) + 1;
                job.pending.first = waiting.pending.first;
                *waiting = job;
                return Ok(());
            }
            let deadline = tokio::time::Instant::now() + COALESCE_WINDOW;
            if let Some(f) = self.folding.get_mut(&job.path) {
                job.rewrites = f.job.rewrites + 1;
                job.pending.first = f.job.pending.first;
                let report_by = f.report_by;
                *f = Folding {
                    job,
                    deadline,
                    report_by,
                };
                return Ok(());
            }
            if again && self.folding.len() < MAX_COALESCING {
                job.rewrites = 1;
                let report_by = tokio::time::Instant::now() + MAX_FOLD;
                self.folding.insert(
                    job.path.clone(),
                    Folding {
                        job,
                        deadline,
                        report_by,
                    },
                );
                return Ok(());
            }
            // Every file waits out the rename grace (`cp f
            // stick/ && mv stick/f stick/g` is reported as g).
            if self.delayed.len() < MAX_DELAYED {
                self.delayed
                    .push_back((tokio::time::Instant::now() + RENAME_GRACE, job));
            } else {
                workers.submit(job).await?;
            }
        }

        Ok(())
    }
}

/// A write or close as the backend reported it (`RawEvent::Write`).
struct Write {
    path: PathBuf,
    close: bool,
    writer: Option<Writer>,
    file: Option<std::fs::File>,
    origins: Vec<String>,
}

impl FilesSource {
    pub fn new(
        config: FilesConfig,
        backend: Box<dyn FileBackend>,
        policy: watch::Receiver<Arc<Policy>>,
        judge: Arc<dyn FileJudge>,
    ) -> Self {
        let root = std::fs::canonicalize(&config.sysfs_root).unwrap_or(config.sysfs_root.clone());
        let guard_refuses = backend.guard().is_some();
        let guard: Guard = backend.guard().unwrap_or_default();
        FilesSource {
            guard_refuses,
            programs_watched_for: None,
            sysfs: Sysfs::new(root),
            config,
            backend,
            policy,
            judge,
            guard,
            foreign: (None, Vec::new()),
            derived: HashMap::new(),
        }
    }

    /// The agent's mount table. Read in place: a procfs file is generated from memory
    /// and never blocks, and a hop to tokio's blocking pool every poll cost more
    /// (waking a thread) than the read.
    fn read_mountinfo(&self) -> String {
        std::fs::read_to_string(&self.config.mountinfo).unwrap_or_default()
    }

    /// Exit points mounted only in other mount namespaces — a stick mounted inside a
    /// container or an `unshare -m` shell, invisible in the agent's own mount table —
    /// reached through `/proc/PID/root` of a process in that namespace. A device the
    /// agent's namespace also mounts is already watched whole (file-system mark).
    fn foreign_exits(&mut self, own: &[ExitPoint], policy: &FilesPolicy) -> Vec<ExitPoint> {
        use std::os::unix::fs::MetadataExt;
        if self.foreign.0.is_some_and(|t| t.elapsed() < FOREIGN_RESCAN) {
            return self.foreign.1.clone();
        }
        let mut out = Vec::new();
        let mut devs: HashSet<String> = own.iter().map(|e| e.mount.dev.clone()).collect();
        let mut namespaces: HashSet<u64> = std::fs::metadata("/proc/self/ns/mnt")
            .map(|m| m.ino())
            .into_iter()
            .collect();
        let pids = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
        for pid in pids {
            let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/mnt")) else {
                continue;
            };
            if !namespaces.insert(ns.ino()) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
                continue;
            };
            for mut ep in self.exit_points_in(&text, policy) {
                if ep.kind == ExitKind::Watched
                    || ep.mount.root != "/"
                    || !devs.insert(ep.mount.dev.clone())
                {
                    continue;
                }
                ep.mount.mount_point = format!("/proc/{pid}/root{}", ep.mount.mount_point);
                out.push(ep);
            }
        }
        self.foreign = (Some(std::time::Instant::now()), out.clone());
        out
    }

    /// Exit points in a mount table, given as the text of a `mountinfo`. A table seen
    /// before gives the exit points derived then: while a file system stays mounted
    /// its device number cannot go to another device, so only its USB stick can have
    /// changed — removable exit points alone are looked up again (a pulled stick).
    fn exit_points_in(&mut self, text: &str, policy: &FilesPolicy) -> Vec<ExitPoint> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        let key = h.finish();
        if let Some(known) = self.derived.get(&key) {
            let known = known.clone();
            return known
                .into_iter()
                .filter_map(|ep| match ep.kind {
                    ExitKind::Removable => self.exit_point(&ep.mount, policy),
                    _ => Some(ep),
                })
                .collect();
        }
        let out: Vec<ExitPoint> = mounts::parse(text)
            .values()
            .filter_map(|m| self.exit_point(m, policy))
            .collect();
        if self.derived.len() >= MAX_DERIVED {
            self.derived.clear();
        }
        self.derived.insert(key, out.clone());
        out
    }

    /// Has the backend watch program starts on every file system a program can be
    /// started from (not pseudo file systems, not `noexec` mounts), as they appear.
    fn watch_programs_in(&mut self, mountinfo: &str) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        mountinfo.hash(&mut h);
        if self.programs_watched_for == Some(h.finish()) {
            return;
        }
        self.programs_watched_for = Some(h.finish());
        for m in mounts::parse(mountinfo).values() {
            if m.no_exec || NO_PROGRAMS.contains(&m.fs_type.as_str()) {
                continue;
            }
            if let Err(e) = self.backend.watch_programs(Path::new(&m.mount_point)) {
                tracing::debug!(mount = %m.mount_point, error = %e, "program starts not watched there");
            }
        }
    }

    /// Whether a mount is an exit point, and of which kind.
    fn exit_point(&self, m: &Mount, policy: &FilesPolicy) -> Option<ExitPoint> {
        let usb = self
            .sysfs
            .block_dir(&m.dev)
            .and_then(|b| self.sysfs.usb_ancestor(&b))
            .and_then(|d| self.sysfs.read_device(&d, false).ok());
        let kind = if usb.is_some() {
            ExitKind::Removable
        } else if policy.exit_fs_types.contains(&m.fs_type) {
            ExitKind::Network
        } else if self
            .config
            .watch_mounts
            .iter()
            .any(|w| w.as_path() == Path::new(&m.mount_point))
        {
            ExitKind::Watched
        } else {
            return None;
        };
        Some(ExitPoint {
            mount: m.clone(),
            kind,
            usb_serial: usb.as_ref().and_then(|u| u.serial.clone()),
            usb_hash: usb.map(|u| u.hash),
            refuse: self.guard_refuses && policy.deny_applies_to(kind),
        })
    }

    /// Brings the marked exit points up to date with a mount table and policy: marks
    /// new ones, forgets those gone, updates those whose kind changed — in place, so
    /// an exit point that stays one is watched without a break.
    /// Returns the exit points that went away (unmounted, or their stick pulled).
    fn refresh_exits(
        &mut self,
        marked: &mut HashMap<String, ExitPoint>,
        mountinfo: &str,
        policy: &FilesPolicy,
    ) -> Vec<ExitPoint> {
        self.watch_programs_in(mountinfo);
        let mut now: Vec<ExitPoint> = self.exit_points_in(mountinfo, policy);
        let foreign = self.foreign_exits(&now, policy);
        now.extend(foreign);
        let current: HashSet<String> = now.iter().map(|e| e.mount.mount_point.clone()).collect();
        let gone_points: Vec<String> = marked
            .keys()
            .filter(|mp| !current.contains(*mp))
            .cloned()
            .collect();
        let gone: Vec<ExitPoint> = gone_points
            .iter()
            .filter_map(|mp| marked.remove(mp))
            .collect();
        for ep in &gone {
            self.backend.forget_mount(Path::new(&ep.mount.mount_point));
        }
        let mut changed = !gone.is_empty();
        for mut ep in now {
            let whole_fs = ep.mount.root == "/";
            if let Some(held) = marked.get_mut(&ep.mount.mount_point) {
                if held.refuse != ep.refuse {
                    // A `deny` rule for its kind came or went: opens wait, or stop waiting.
                    let mp = Path::new(&ep.mount.mount_point);
                    if let Err(e) = self.backend.mark_mount(mp, whole_fs, ep.refuse) {
                        tracing::error!(mount = %ep.mount.mount_point, error = %e, "cannot change how the exit point is watched");
                        ep.refuse = held.refuse;
                    }
                }
                if held.kind != ep.kind
                    || held.mount.dev != ep.mount.dev
                    || held.refuse != ep.refuse
                {
                    *held = ep;
                    changed = true;
                }
                continue;
            }
            match self
                .backend
                .mark_mount(Path::new(&ep.mount.mount_point), whole_fs, ep.refuse)
            {
                Ok(()) => {
                    tracing::info!(mount = %ep.mount.mount_point, fs = %ep.mount.fs_type, exit = ep.kind.as_str(), "watching exit point");
                    marked.insert(ep.mount.mount_point.clone(), ep);
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(mount = %ep.mount.mount_point, error = %e, "cannot watch exit point")
                }
            }
        }
        if changed {
            self.guard.write().unwrap_or_else(|e| e.into_inner()).exits = marked
                .values()
                .map(|e| GuardedExit {
                    mount_point: PathBuf::from(&e.mount.mount_point),
                    dev: parse_dev(&e.mount.dev),
                    kind: e.kind,
                    usb_hash: e.usb_hash.clone(),
                })
                .collect();
        }
        gone
    }

    /// Puts a new policy into the guard (classifier, sensitive sources).
    fn apply_policy(&mut self) -> Reading {
        let policy = self.policy.borrow_and_update().clone();
        // `exit_fs_types` may have changed what an exit point is.
        self.derived.clear();
        self.foreign.0 = None;
        let files = Arc::new(policy.files.clone());
        let classifier = Arc::new(Classifier::from_policy(&files, self.config.limits));
        let mut g = self.guard.write().unwrap_or_else(|e| e.into_inner());
        g.policy = files.clone();
        g.classifier = classifier.clone();
        g.sources = files
            .sensitive_sources
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or(p.clone()))
            .collect();
        Reading {
            policy: files,
            classifier,
        }
    }

    /// Marks the sensitive source folders and their subfolders not marked yet; when
    /// a `deny` rule came or went, changes how the marked ones are watched.
    fn mark_sources(&mut self, marked: &mut SourceMarks) {
        let (roots, refuse) = {
            let g = self.guard.read().unwrap_or_else(|e| e.into_inner());
            (g.sources.clone(), g.policy.has_deny())
        };
        if marked.refuse != refuse {
            marked.refuse = refuse;
            for dir in &marked.dirs {
                if let Err(e) = self.backend.mark_source_dir(dir, refuse) {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot change how the sensitive source folder is watched");
                }
            }
        }
        let marked = &mut marked.dirs;
        for root in roots {
            let mut stack = vec![root];
            while let Some(dir) = stack.pop() {
                if !marked.contains(&dir) {
                    if marked.len() >= MAX_SOURCE_DIRS {
                        tracing::error!(
                            limit = MAX_SOURCE_DIRS,
                            "too many sensitive source folders; the rest are not watched"
                        );
                        return;
                    }
                    match self.backend.mark_source_dir(&dir, refuse) {
                        Ok(()) => {
                            marked.insert(dir.clone());
                        }
                        Err(e) => {
                            tracing::error!(dir = %dir.display(), error = %e, "cannot watch sensitive source folder");
                            marked.insert(dir.clone()); // do not retry every walk
                        }
                    }
                }
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push(e.path());
                        }
                    }
                }
            }
        }
    }

    async fn run_inner(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        let mut w = Watch::new();
        let workers = Workers::start(
            self.config.workers.max(1),
            ctx.sink.clone(),
            self.judge.clone(),
        );
        let mut poll = tokio::time::interval(self.config.mount_poll);
        let mut source_walk = tokio::time::interval(SOURCE_REWALK);
        let mut source_dirs = SourceMarks::default();
        let mut reading = self.apply_policy();
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => {
                    // Files waiting out the rename grace or a rewrite loop are described now.
                    for (_, job) in w.delayed.drain(..) {
                        workers.submit(job).await?;
                    }
                    for (_, f) in w.folding.drain() {
                        workers.submit(f.job).await?;
                    }
                    return Ok(());
                }
                _ = sleep_until_earliest(&w.folding) => {
                    let now = tokio::time::Instant::now();
                    let done: Vec<PathBuf> = w.folding
                        .iter()
                        .filter(|(_, f)| f.deadline.min(f.report_by) <= now)
                        .map(|(p, _)| p.clone())
                        .collect();
                    for path in done {
                        let f = w.folding.remove(&path).expect("listed");
                        workers.submit(f.job).await?;
                    }
                }
                changed = self.policy.changed() => {
                    if changed.is_err() {
                        // The policy manager is gone (shutting down): keep the last one.
                        std::future::pending::<()>().await;
                    }
                    reading = self.apply_policy();
                    self.mark_sources(&mut source_dirs);
                    // `exit_fs_types` may have changed: re-derive the exit points now,
                    // in place, so writes to those that stay exits are never missed.
                    let text = self.read_mountinfo();
                    let gone = self.refresh_exits(&mut w.marked, &text, &reading.policy);
                    w.gone_exits.note(&gone);
                    w.held_open -= report_unclosed(self.config.hash_max_bytes, gone, &mut w.pending, &workers, &reading).await?;
                }
                _ = source_walk.tick() => self.mark_sources(&mut source_dirs),
                _ = sleep_until_front(&w.delayed) => {
                    let now = tokio::time::Instant::now();
                    while w.delayed.front().is_some_and(|(at, _)| *at <= now) {
                        let (_, job) = w.delayed.pop_front().expect("checked");
                        workers.submit(job).await?;
                    }
                }
                _ = poll.tick() => {
                    let text = self.read_mountinfo();
                    let gone = self.refresh_exits(&mut w.marked, &text, &reading.policy);
                    w.gone_exits.note(&gone);
                    w.held_open -= report_unclosed(self.config.hash_max_bytes, gone, &mut w.pending, &workers, &reading).await?;
                    // Files found in new directories that stayed quiet: report them.
                    let quiet: Vec<PathBuf> = w.pending
                        .iter()
                        .filter(|(_, p)| p.found && p.quiet_since.elapsed() >= self.config.settle)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for path in quiet {
                        let p = w.pending.remove(&path).expect("listed");
                        w.held_open -= usize::from(p.held.is_some());
                        w.reported.insert(path.clone(), Timestamp::now());
                        // Its close event may still be queued (a backlog longer than
                        // the settle time): that one must not report it again.
                        w.rescanned.insert(path.clone(), Timestamp::now());
                        if let Some(job) = job(self.config.hash_max_bytes, &w.marked, path, None, p, &reading) {
                            workers.submit(job).await?;
                        }
                    }
                }
                batch = self.backend.next() => {
                    let batch = batch.map_err(SourceError::Other)?;
                    for ev in batch {
                        match ev {
                            RawEvent::Overflow => {
                                let overflow = w.after_overflow(self.config.hash_max_bytes, &reading, &workers).await?;
                                ctx.sink.emit(Event::FileOverflow(overflow)).await?;
                            }
                            RawEvent::SourceRead(r) => ctx.sink.emit(Event::FileSourceRead(r)).await?,
                            RawEvent::Degraded(problem) => ctx.sink.report("files", problem).await?,
                            RawEvent::Denied { enforced, created } => {
                                for e in self.judge.judge(FileFact::Refused { enforced, created }) {
                                    ctx.sink.emit(e).await?;
                                }
                            }
                            RawEvent::Found { path } => {
                                // Already pending, or closed and reported meanwhile.
                                if !w.pending.contains_key(&path) && !w.reported.contains_key(&path) {
                                    let now = Timestamp::now();
                                    w.pending.insert(path, Pending::new(now, true));
                                }
                            }
                            RawEvent::Write { path, close, writer, file, origins } => {
                                w.on_write(self.config.hash_max_bytes, &reading, &workers, Write { path, close, writer, file, origins }).await?;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whether `path` lies on an exit point being watched.
fn on_exit_point(marked: &HashMap<String, ExitPoint>, path: &Path) -> bool {
    marked
        .values()
        .any(|e| path.starts_with(&e.mount.mount_point))
}

/// Exit points that went away in the last [`GONE_GRACE`] (at most [`MAX_GONE`]): a
/// write the kernel queued before a stick was pulled may be read only after the
/// mount left the table, and is still a file that left on that stick.
#[derive(Default)]
struct GoneExits(std::collections::VecDeque<(std::time::Instant, ExitPoint)>);

/// How long a vanished exit point still claims the writes read late.
const GONE_GRACE: Duration = Duration::from_secs(120);
/// Most vanished exit points remembered.
const MAX_GONE: usize = 64;

impl GoneExits {
    fn note(&mut self, gone: &[ExitPoint]) {
        for ep in gone {
            if self.0.len() >= MAX_GONE {
                self.0.pop_front();
            }
            self.0.push_back((std::time::Instant::now(), ep.clone()));
        }
    }

    /// The most recently vanished exit point that `path` lies on.
    fn find(&mut self, path: &Path) -> Option<&ExitPoint> {
        while self
            .0
            .front()
            .is_some_and(|(at, _)| at.elapsed() > GONE_GRACE)
        {
            self.0.pop_front();
        }
        self.0
            .iter()
            .rev()
            .map(|(_, ep)| ep)
            .find(|ep| path.starts_with(&ep.mount.mount_point))
    }
}

/// Files still open for writing on exit points that went away (a stick pulled
/// with a file open): described now through the descriptor kept from their
/// first write, and reported as `unclosed`.
async fn report_unclosed(
    hash_max: u64,
    gone: Vec<ExitPoint>,
    pending: &mut HashMap<PathBuf, Pending>,
    workers: &Workers,
    reading: &Reading,
) -> Result<usize, SourceError> {
    // Descriptors handed over (the caller's count of held ones drops by that).
    let mut released = 0;
    for ep in gone {
        let open: Vec<PathBuf> = pending
            .iter()
            .filter(|(p, e)| !e.found && p.starts_with(&ep.mount.mount_point))
            .map(|(p, _)| p.clone())
            .collect();
        for path in open {
            let mut p = pending.remove(&path).expect("listed");
            let file = p.held.take();
            released += usize::from(file.is_some());
            tracing::warn!(path = %path.display(), mount = %ep.mount.mount_point, "exit point gone while a file on it was open for writing");
            let mut job = job_on(&ep, hash_max, path, file, p, reading);
            job.unclosed = true;
            workers.submit(job).await?;
        }
    }
    Ok(released)
}

/// `path`, as the kernel names an open file, in the agent's view of the exit point
/// `mount_point`. A file written through another mount namespace's mount of the
/// same file system is named from the file system's root; one on an exit point of
/// another namespace (`/proc/PID/root/...`) as that namespace sees it.
fn in_view(mount_point: &Path, path: &Path) -> PathBuf {
    if path.starts_with(mount_point) {
        return path.to_path_buf();
    }
    let relative = path.strip_prefix("/").unwrap_or(path);
    let mut parts = mount_point.components();
    if let (
        Some(std::path::Component::RootDir),
        Some(std::path::Component::Normal(proc_)),
        Some(std::path::Component::Normal(pid)),
        Some(std::path::Component::Normal(root)),
    ) = (parts.next(), parts.next(), parts.next(), parts.next())
    {
        let inner = Path::new("/").join(parts.as_path());
        if proc_ == "proc" && root == "root" && path.starts_with(&inner) {
            return Path::new("/proc").join(pid).join("root").join(relative);
        }
    }
    mount_point.join(relative)
}

/// `major:minor` as `st_dev`.
fn parse_dev(s: &str) -> Option<u64> {
    let (ma, mi) = s.split_once(':')?;
    Some(nix::sys::stat::makedev(ma.parse().ok()?, mi.parse().ok()?))
}

/// A job for a file on one of the `marked` exit points (`None` if it is on none).
fn job(
    hash_max: u64,
    marked: &HashMap<String, ExitPoint>,
    path: PathBuf,
    file: Option<std::fs::File>,
    pending: Pending,
    reading: &Reading,
) -> Option<Job> {
    let Some(ep) = marked
        .values()
        .filter(|e| path.starts_with(&e.mount.mount_point))
        .max_by_key(|e| e.mount.mount_point.len())
    else {
        // Another mount of a marked file system, outside every exit point.
        tracing::debug!(path = %path.display(), "write outside the exit points ignored");
        return None;
    };
    Some(job_on(ep, hash_max, path, file, pending, reading))
}

/// A job for a file on the exit point `ep`.
fn job_on(
    ep: &ExitPoint,
    hash_max: u64,
    path: PathBuf,
    file: Option<std::fs::File>,
    pending: Pending,
    reading: &Reading,
) -> Job {
    Job {
        path,
        file,
        pending,
        mount_point: ep.mount.mount_point.clone(),
        fs_type: ep.mount.fs_type.clone(),
        source: ep.mount.source.clone(),
        kind: ep.kind,
        usb_serial: ep.usb_serial.clone(),
        usb_hash: ep.usb_hash.clone(),
        hash_max,
        reading: reading.clone(),
        rewrites: 0,
        unclosed: false,
    }
}

/// Most descriptors kept for files still being written (beyond, a file whose stick
/// is pulled while open is reported with what is known, unread).
const MAX_HELD_OPEN: usize = 512;

/// A file closed again within this long of its last report is folded into one event.
const COALESCE_WINDOW: Duration = Duration::from_secs(2);
/// Most files being folded at once (each holds a descriptor); beyond, reported as is.
const MAX_COALESCING: usize = 1024;

/// A rewrite loop being folded: the latest write's job and how many rounds so far.
struct Folding {
    job: Job,
    deadline: tokio::time::Instant,
    /// A loop that never pauses is still reported at least this often.
    report_by: tokio::time::Instant,
}

/// Longest a rewrite loop is folded before its event is sent anyway.
const MAX_FOLD: Duration = Duration::from_secs(60);

async fn sleep_until_earliest(folding: &HashMap<PathBuf, Folding>) {
    match folding.values().map(|f| f.deadline.min(f.report_by)).min() {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Bounded hashing/classifying workers: `n` threads that take jobs from one bounded
/// queue. Each keeps its read buffer, so a storm of small files costs a queue hand-over
/// per file, not a task, a thread hand-over and a fresh 256 KiB buffer.
struct Workers {
    jobs: mpsc::Sender<Job>,
}

/// Jobs waiting for a worker (back-pressure beyond that: the event loop waits, the
/// kernel queue fills, and an overflow is reported).
const JOB_QUEUE: usize = 1024;
const READ_BUFFER: usize = 256 * 1024;

impl Workers {
    fn start(n: usize, sink: super::EventSink, judge: Arc<dyn FileJudge>) -> Workers {
        let (tx, rx) = mpsc::channel::<Job>(JOB_QUEUE);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..n {
            let (rx, sink, judge) = (rx.clone(), sink.clone(), judge.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("files-worker-{i}"))
                .spawn(move || {
                    let mut buf = vec![0u8; READ_BUFFER];
                    loop {
                        // One worker waits on the queue at a time; the others wait
                        // for the lock. Ends when the source drops the sender.
                        let job = match rx.lock() {
                            Ok(mut r) => r.blocking_recv(),
                            Err(_) => None,
                        };
                        let Some(job) = job else { return };
                        if !run_job(job, &mut buf, &sink, judge.as_ref()) {
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a files worker");
            }
        }
        Workers { jobs: tx }
    }

    async fn submit(&self, job: Job) -> Result<(), SourceError> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| SourceError::Other("the files workers stopped".into()))
    }
}

/// Describes a file and hands it to the guard, whose events it records.
/// `false` when the pipeline is closed.
fn run_job(job: Job, buf: &mut [u8], sink: &super::EventSink, judge: &dyn FileJudge) -> bool {
    let path = job.path.clone();
    let (kind, policy) = (job.kind, job.reading.policy.clone());
    let described = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.describe(buf)));
    let (mut event, held) = match described {
        Ok(Some(d)) => d,
        Ok(None) => return true, // gone before it could be read
        Err(_) => {
            tracing::error!(path = %path.display(), "describing a file failed (panic); skipped");
            return true;
        }
    };
    // Renamed while it was being described: reported (and acted on) by its name now.
    if let Some(now) = held
        .as_ref()
        .and_then(|f| current_path(f, &event.mount_point))
    {
        event.path = now.display().to_string();
    }
    let fact = FileFact::Written(Box::new(WrittenFile {
        event,
        kind,
        policy,
    }));
    judge
        .judge(fact)
        .into_iter()
        .all(|e| sink.emit_blocking(e).is_ok())
}

/// How long a closed file waits before it is described. Copy tools write a temporary
/// name and rename it when done (rsync's `.name.XXXXXX`, browsers' `.part`), and a
/// user may `cp f stick/ && mv stick/f stick/g`: the close event comes before the
/// rename, and a file is named by its descriptor's current path when it is described,
/// so waiting a moment lets the event carry the final name.
const RENAME_GRACE: Duration = Duration::from_millis(500);
/// Most files waiting out the grace at once (each holds a descriptor); beyond that
/// they are described at once (then a quarantine still finds a renamed file by its
/// descriptor).
const MAX_DELAYED: usize = 256;

async fn sleep_until_front(delayed: &std::collections::VecDeque<(tokio::time::Instant, Job)>) {
    match delayed.front() {
        Some((at, _)) => tokio::time::sleep_until(*at).await,
        None => std::future::pending().await,
    }
}

/// Whether `path` was reported by a rescan after it was last modified (then its
/// queued close event must not report it again); forgets it either way.
fn rescanned_before(
    rescanned: &mut HashMap<PathBuf, Timestamp>,
    path: &Path,
    file: Option<&std::fs::File>,
) -> bool {
    let Some(at) = rescanned.remove(path) else {
        return false;
    };
    let modified = match file {
        Some(f) => f.metadata(),
        None => std::fs::metadata(path),
    }
    .and_then(|m| m.modified())
    .ok()
    .and_then(|m| Timestamp::try_from(m).ok());
    modified.is_some_and(|m| m <= at)
}

/// Files remembered as reported (for rescans); about 150 bytes each.
const REPORTED_MAX: usize = 250_000;

/// Most directory entries one rescan walks.
const RESCAN_MAX_ENTRIES: u64 = 1_000_000;

/// After an overflow: report files on the exit points modified since `since` that
/// are not already pending (writer unknown).
#[allow(clippy::too_many_arguments)]
async fn rescan(
    hash_max: u64,
    marked: &HashMap<String, ExitPoint>,
    pending: &HashMap<PathBuf, Pending>,
    reported: &mut HashMap<PathBuf, Timestamp>,
    rescanned: &mut HashMap<PathBuf, Timestamp>,
    since: Timestamp,
    workers: &Workers,
    reading: &Reading,
) -> Result<FileOverflow, SourceError> {
    // The walk runs on a blocking thread: a large exit point must not hold up the
    // event loop.
    let roots: Vec<PathBuf> = marked
        .values()
        .map(|e| PathBuf::from(&e.mount.mount_point))
        .collect();
    let (candidates, walked, complete) =
        tokio::task::spawn_blocking(move || walk_modified(roots, since.into()))
            .await
            .map_err(|e| SourceError::Other(format!("rescan walk failed: {e}")))?;
    let mut found = 0u64;
    for (path, modified) in candidates {
        if pending.contains_key(&path) {
            continue;
        }
        let at = Timestamp::try_from(modified).unwrap_or(since);
        if reported.get(&path).is_some_and(|closed| *closed >= at) {
            continue; // reported when it was closed, unchanged since
        }
        found += 1;
        // Remembered both ways: a later rescan skips it, and its close event still
        // queued behind the overflow does not report it again.
        reported.insert(path.clone(), Timestamp::now());
        rescanned.insert(path.clone(), Timestamp::now());
        let p = Pending::new(at, false);
        if let Some(job) = job(hash_max, marked, path, None, p, reading) {
            workers.submit(job).await?;
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

/// Regular files under `roots` modified at or after `since` (blocking); how many
/// entries were walked, and whether the walk finished within its bound.
fn walk_modified(
    roots: Vec<PathBuf>,
    since: std::time::SystemTime,
) -> (Vec<(PathBuf, std::time::SystemTime)>, u64, bool) {
    let mut out = Vec::new();
    let mut walked = 0u64;
    let mut stack = roots;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            walked += 1;
            if walked > RESCAN_MAX_ENTRIES {
                return (out, walked, false);
            }
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                if let Ok(m) = entry.metadata().and_then(|m| m.modified()) {
                    if m >= since {
                        out.push((entry.path(), m));
                    }
                }
            }
        }
    }
    (out, walked, true)
}

struct Job {
    path: PathBuf,
    file: Option<std::fs::File>,
    pending: Pending,
    mount_point: String,
    fs_type: String,
    source: String,
    kind: ExitKind,
    usb_serial: Option<String>,
    usb_hash: Option<String>,
    hash_max: u64,
    reading: Reading,
    /// Write-and-close rounds this job stands for when a rewrite loop was folded.
    rewrites: u64,
    /// The exit point went away while the file was open for writing.
    unclosed: bool,
}

impl Job {
    /// Stats, hashes and classifies the file (blocking). `None` if it is gone.
    ///
    /// Also returns the open file, to name it by where it is now once described.
    fn describe(mut self, buf: &mut [u8]) -> Option<(FileExported, Option<std::fs::File>)> {
        use std::io::Seek;
        // The file as written, wherever it is now (renamed, or even deleted).
        let f = match self.file.take() {
            Some(f) => f,
            None => match std::fs::File::open(&self.path) {
                Ok(f) => f,
                // Unreachable with its stick gone: still reported, as far as known.
                Err(e) if self.unclosed => return Some(self.unread(e)),
                Err(_) => return None,
            },
        };
        let meta = f.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        if let Some(now) = current_path(&f, &self.mount_point) {
            self.path = now;
        }
        let held = f.try_clone().ok();
        // The whole file (up to `hash_max`), read by its data extents: a sparse
        // file's holes cost no I/O.
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let (hashed, hash_ok) =
            match crate::sparse::for_each_chunk(&f, meta.len(), self.hash_max, buf, |c| {
                hasher.update(c)
            }) {
                Ok(n) => (n, true),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "hashing stopped");
                    (0, false)
                }
            };
        let sha256 = hash_ok.then(|| hex::encode(hasher.finish().as_ref()));
        let mut f = f;
        let _ = f.rewind();
        let (classification, note) = self.reading.classifier.classify_file(f);
        let content = Content {
            size: meta.len(),
            sha256,
            hashed,
            classification,
            note,
        };
        Some((self.exported(content), held))
    }

    /// The event for a file that could not be read at all (its device is gone).
    fn unread(self, error: std::io::Error) -> (FileExported, Option<std::fs::File>) {
        let content = Content {
            size: 0,
            sha256: None,
            hashed: 0,
            classification: Vec::new(),
            note: Some(format!(
                "failed: unreadable once its exit point was gone: {error}"
            )),
        };
        (self.exported(content), None)
    }
}

/// What reading a file found.
struct Content {
    size: u64,
    sha256: Option<String>,
    hashed: u64,
    classification: Vec<weilan_config::event::Classification>,
    note: Option<String>,
}

impl Job {
    /// The `file.exported` for this job's file with what reading it found; the
    /// guard fills in its action and rule.
    fn exported(self, c: Content) -> FileExported {
        let w = self.pending.writer;
        FileExported {
            path: self.path.display().to_string(),
            mount_point: self.mount_point,
            fs_type: self.fs_type,
            mount_source: self.source,
            usb_serial: self.usb_serial,
            usb_hash: self.usb_hash,
            size: c.size,
            sha256: c.sha256,
            hashed_bytes: c.hashed,
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
            classification: c.classification,
            classification_note: c.note,
            exit: self.kind.as_str().into(),
            action: String::new(),
            rule_id: String::new(),
            origins: self.pending.origins,
            rewrites: self.rewrites,
            unclosed: self.unclosed,
        }
    }
}

/// Where the open file `f` is now, in the agent's view of `mount_point`: renamed
/// files by their new name; a file made with `O_TMPFILE` and linked in later (its
/// descriptor still names the unnamed `#inode`) by the name it was linked under,
/// found by its inode. `None` for a file with no name left (deleted).
fn current_path(f: &std::fs::File, mount_point: &str) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let now = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()?;
    let place = |p: &Path| in_view(Path::new(mount_point), p);
    let text = now.to_string_lossy();
    let Some(gone) = text.strip_suffix(" (deleted)") else {
        return Some(place(&now));
    };
    let meta = f.metadata().ok()?;
    if meta.nlink() == 0 {
        return None;
    }
    // Linked again (O_TMPFILE + linkat): look in the directory it was made in, then
    // (bounded) in the whole exit point.
    let (dev, ino) = (meta.dev(), meta.ino());
    let same =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
    let made_in = place(Path::new(gone)).parent().map(Path::to_path_buf);
    let mut dirs: Vec<PathBuf> = made_in.into_iter().collect();
    dirs.push(PathBuf::from(mount_point));
    let mut budget = 100_000u32;
    let mut stack = dirs;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            budget = budget.checked_sub(1)?;
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.insert(0, p);
            } else if same(&p) {
                return Some(p);
            }
        }
    }
    None
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
