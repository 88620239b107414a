//! fanotify backend: marks exit points — the whole file system (`FAN_MARK_FILESYSTEM`,
//! so writers in other mount namespaces are seen too) or, for a bind mount of a
//! subtree, the mount (`FAN_MARK_MOUNT`) — for `FAN_OPEN_PERM`,
//! `FAN_MODIFY` and `FAN_CLOSE_WRITE`, and sensitive source folders (inode marks on
//! each folder, `FAN_EVENT_ON_CHILD`) for `FAN_OPEN_PERM`.
//!
//! Attribution needs the writer's `/proc` entry, and a short-lived `cp` has exited
//! (its `exe` unreadable) by the time its close-write event is read. So the group is a
//! content-class group: every open on an exit point waits for our answer, and while it
//! waits we read the opener's exe, command line and user, then answer. Later write
//! events of that pid use what was read then. Every permission event is answered (a
//! silent handler would freeze the file system); if the agent dies the kernel
//! releases waiting opens when the group closes.
//!
//! ## What `deny` refuses (and what it does not)
//! With a `deny` rule in the policy, opens are refused (`EPERM`) when
//! - a process that holds open a file from a sensitive source folder, classified so
//!   that a `deny` rule matches for that exit point, opens any file on the exit point
//!   (`cp`, `dd`, a file manager copying in-process), or
//! - a process that holds a file on an exit point open for writing opens such a
//!   classified source file (`cat secret > /media/usb/x`: the shell opened the
//!   destination first).
//!
//! The source file is classified from the descriptor fanotify hands over (never
//! re-opened: that would wait on this very thread), cached by inode, size and mtime.
//! Not refused: copies through an intermediate (copy to `/tmp`, then to the stick),
//! programs that split reading and writing across processes (`rsync` between local
//! paths: its receiver is another process), content retyped or transformed. Those
//! files are still reported when they land, and a `deny` rule then quarantines them.
//!
//! A thread reads the group (non-blocking, with poll) and hands batches over a bounded
//! channel; when the consumer is slow the kernel queue fills and overflows, which is
//! reported, never silent.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyResponse, InitFlags, MarkFlags, MaskFlags, Response,
};
use tokio::sync::mpsc;
use weilan_config::event::{Classification, FileEnforced, FileSourceRead};

use super::{FileBackend, Guard, GuardState, RawEvent, Writer};
use crate::classify;
use crate::source::BoxFuture;

pub struct FanotifyBackend {
    fan: Arc<Fanotify>,
    rx: mpsc::Receiver<Vec<RawEvent>>,
    stop: Arc<AtomicBool>,
    guard: Guard,
}

impl FanotifyBackend {
    /// Needs CAP_SYS_ADMIN (root) in the initial user namespace.
    pub fn new() -> Result<Self, String> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(|e| format!("fanotify_init: {e}"))?;
        let fan = Arc::new(fan);
        let (tx, rx) = mpsc::channel(64);
        let stop = Arc::new(AtomicBool::new(false));
        let guard: Guard = Arc::default();
        let (f, s, g) = (fan.clone(), stop.clone(), guard.clone());
        std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || read_loop(&f, &tx, &s, &g))
            .map_err(|e| e.to_string())?;
        Ok(FanotifyBackend {
            fan,
            rx,
            stop,
            guard,
        })
    }
}

impl Drop for FanotifyBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A sensitive source file a process opened.
struct SourceOpen {
    path: PathBuf,
    classification: Vec<Classification>,
    at: Instant,
}

/// How long a read of a sensitive file counts as a written file's origin.
const ORIGIN_WINDOW: Duration = Duration::from_secs(600);
/// Most processes and files per process remembered (bounded memory).
const MAX_READERS: usize = 4096;
const MAX_READS_PER_PID: usize = 64;
const MAX_CLASSIFIED: usize = 4096;

/// The reader thread's memory.
#[derive(Default)]
struct Seen {
    /// Openers seen in permission events on exit points, by pid, with the process's
    /// start time (a reused pid is a different process).
    openers: HashMap<i32, (u64, Writer)>,
    /// Sensitive source files each process opened.
    reads: HashMap<i32, Vec<SourceOpen>>,
    /// (pid, path) already reported as `file.source_read`.
    reported_reads: HashSet<(i32, PathBuf)>,
    /// Classification of source files by (dev, inode, size, mtime).
    classified: HashMap<(u64, u64, u64, i64), Vec<Classification>>,
}

fn read_loop(fan: &Fanotify, tx: &mpsc::Sender<Vec<RawEvent>>, stop: &AtomicBool, guard: &Guard) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let me = std::process::id() as i32;
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(fan.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(500u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "fanotify poll failed");
                return;
            }
        }
        let events = match fan.read_events() {
            Ok(e) => e,
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => {
                tracing::error!(error = %e, "fanotify read failed");
                return;
            }
        };
        let mut batch = Vec::with_capacity(events.len());
        for ev in &events {
            let mask = ev.mask();
            if mask.contains(MaskFlags::FAN_Q_OVERFLOW) {
                batch.push(RawEvent::Overflow);
                continue;
            }
            let Some(fd) = ev.fd() else { continue };
            if mask.contains(MaskFlags::FAN_OPEN_PERM) {
                let allow = if ev.pid() == me {
                    true // the agent's own reads (hashing, quarantine)
                } else {
                    let g = guard.read().unwrap_or_else(|e| e.into_inner());
                    on_open(&g, &mut seen, ev.pid(), fd, &mut batch)
                };
                // Always answer, and at once: the opener is waiting.
                let response = if allow {
                    Response::FAN_ALLOW
                } else {
                    Response::FAN_DENY
                };
                if let Err(e) = fan.write_response(FanotifyResponse::new(fd, response)) {
                    tracing::error!(error = %e, "fanotify permission answer failed");
                }
                continue;
            }
            if ev.pid() == me {
                continue; // the agent's own I/O (hashing opens for reading only)
            }
            let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
                continue;
            };
            let path = guard
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .place(path, || fstat_dev(fd));
            let close = mask.contains(MaskFlags::FAN_CLOSE_WRITE);
            let who = seen
                .openers
                .get(&ev.pid())
                .map(|(_, w)| w.clone())
                .or_else(|| writer(ev.pid()).filter(|w| w.exe.is_some()));
            // The written file's descriptor travels with every write event: a close
            // is described through it; the first write's is kept in case the file is
            // never closed (its stick pulled while it is open).
            let (file, origins) = if close {
                let origins = seen
                    .reads
                    .get(&ev.pid())
                    .map(|r| {
                        r.iter()
                            .filter(|o| o.at.elapsed() < ORIGIN_WINDOW)
                            .map(|o| o.path.display().to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    fd.try_clone_to_owned().ok().map(std::fs::File::from),
                    origins,
                )
            } else {
                (
                    fd.try_clone_to_owned().ok().map(std::fs::File::from),
                    Vec::new(),
                )
            };
            batch.push(RawEvent::Write {
                path,
                close,
                writer: who,
                file,
                origins,
            });
        }
        if !batch.is_empty() && tx.blocking_send(batch).is_err() {
            return;
        }
    }
}

/// Decides one permission event: `false` refuses the open.
fn on_open(
    g: &GuardState,
    seen: &mut Seen,
    pid: i32,
    fd: BorrowedFd<'_>,
    batch: &mut Vec<RawEvent>,
) -> bool {
    let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
        return true;
    };
    let path = g.place(path, || fstat_dev(fd));
    let deny_rules = g.policy.has_deny();
    if let Some(source) = g.source_for(&path) {
        let classification = if deny_rules {
            classify_source(g, seen, fd)
        } else {
            Vec::new()
        };
        let who = writer(pid);
        if seen.reported_reads.len() >= MAX_READERS * 4 {
            seen.reported_reads.clear();
        }
        if seen.reported_reads.insert((pid, path.clone())) {
            let w = who.clone().unwrap_or_default();
            batch.push(RawEvent::SourceRead(FileSourceRead {
                path: path.display().to_string(),
                source: source.display().to_string(),
                pid: pid as u32,
                exe: w.exe,
                cmdline: w.cmdline,
                uid: w.uid,
                user: w.user,
                classification: classification.clone(),
            }));
        }
        if seen.reads.len() >= MAX_READERS && !seen.reads.contains_key(&pid) {
            seen.reads.clear();
        }
        let reads = seen.reads.entry(pid).or_default();
        reads.retain(|r| r.path != path && r.at.elapsed() < ORIGIN_WINDOW);
        if reads.len() >= MAX_READS_PER_PID {
            reads.remove(0);
        }
        reads.push(SourceOpen {
            path: path.clone(),
            classification: classification.clone(),
            at: Instant::now(),
        });
        if deny_rules && !classification.is_empty() {
            // Does the opener write to an exit point right now (e.g. its stdout)?
            for dest in writable_files(pid) {
                let Some(exit) = g.exit_for(&dest) else {
                    continue;
                };
                if let Some(v) = g
                    .policy
                    .deny_rule(&classify::counts(&classification), exit.kind)
                {
                    batch.push(denied(&v, &dest, &path, exit, who.as_ref(), None));
                    return false;
                }
            }
        }
        return true;
    }
    let Some(exit) = g.exit_for(&path) else {
        return true;
    };
    // An open on an exit point: remember the opener for attribution. A process
    // writing many files is read from /proc once, re-checked by its executable (an
    // exec in the same pid gets read again).
    let started = start_time(pid);
    let exe_now = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string());
    let who = match seen.openers.get(&pid) {
        Some((t, w)) if started == Some(*t) && exe_now.is_some() && w.exe == exe_now => {
            Some(w.clone())
        }
        _ => writer(pid),
    };
    if let (Some(w), Some(t)) = (&who, started) {
        if seen.openers.len() >= MAX_READERS {
            seen.openers.clear();
        }
        seen.openers.insert(pid, (t, w.clone()));
    }
    if !deny_rules {
        return true;
    }
    let Some(reads) = seen.reads.get(&pid) else {
        return true;
    };
    let classified: Vec<&SourceOpen> = reads
        .iter()
        .filter(|r| !r.classification.is_empty())
        .collect();
    if classified.is_empty() {
        return true;
    }
    let open_now = open_files(pid);
    for r in classified {
        if !open_now.contains(&r.path) {
            continue; // read earlier and closed: origin only, not refused
        }
        if let Some(v) = g
            .policy
            .deny_rule(&classify::counts(&r.classification), exit.kind)
        {
            // A refused O_CREAT has already created an empty file (if it was new).
            let created = nix::sys::stat::fstat(fd)
                .ok()
                .filter(|st| st.st_size == 0)
                .map(|_| path.clone());
            batch.push(denied(&v, &path, &r.path, exit, who.as_ref(), created));
            return false;
        }
    }
    true
}

fn denied(
    v: &weilan_config::policy::files::FileVerdict,
    dest: &Path,
    source: &Path,
    exit: &super::GuardedExit,
    who: Option<&Writer>,
    created: Option<PathBuf>,
) -> RawEvent {
    RawEvent::Denied {
        enforced: Box::new(FileEnforced {
            action: v.action.as_str().into(),
            rule_id: v.rule_id.clone(),
            matched: v.matched.clone(),
            path: Some(dest.display().to_string()),
            source_path: Some(source.display().to_string()),
            sha256: None,
            mount_point: Some(exit.mount_point.display().to_string()),
            usb_hash: exit.usb_hash.clone(),
            pid: who.map(|w| w.pid),
            exe: who.and_then(|w| w.exe.clone()),
            user: who.and_then(|w| w.user.clone()),
            outcome: "done".into(),
            error: None,
            evidence: None,
            detail: format!(
                "copy of {} ({}) onto {} refused while it happened",
                source.display(),
                v.matched.join(", "),
                exit.mount_point.display()
            ),
        }),
        created,
    }
}

/// Classifies a source file from the descriptor fanotify handed over (cached).
fn classify_source(g: &GuardState, seen: &mut Seen, fd: BorrowedFd<'_>) -> Vec<Classification> {
    let Ok(st) = nix::sys::stat::fstat(fd) else {
        return Vec::new();
    };
    use nix::sys::stat::SFlag;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Vec::new();
    }
    let key = (
        st.st_dev,
        st.st_ino,
        st.st_size as u64,
        st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
    );
    if let Some(c) = seen.classified.get(&key) {
        return c.clone();
    }
    let Ok(owned) = fd.try_clone_to_owned() else {
        return Vec::new();
    };
    let (c, _) = g.classifier.classify_file(std::fs::File::from(owned));
    let keep: Vec<Classification> = {
        let counts = classify::counts(&c);
        let hits: Vec<String> = g
            .policy
            .classified(&counts)
            .into_iter()
            .map(String::from)
            .collect();
        c.into_iter()
            .filter(|f| hits.contains(&f.detector))
            .collect()
    };
    if seen.classified.len() >= MAX_CLASSIFIED {
        seen.classified.clear();
    }
    seen.classified.insert(key, keep.clone());
    keep
}

fn fstat_dev(fd: BorrowedFd<'_>) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|st| st.st_dev)
}

/// When `pid` started (clock ticks since boot): tells a reused pid from the process
/// that had it.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses; the
    // start time is field 22, i.e. the 20th after the name.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Files `pid` has open (targets of `/proc/<pid>/fd`; links are read, never opened).
fn open_files(pid: i32) -> HashSet<PathBuf> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect()
}

/// Files `pid` has open for writing (`/proc/<pid>/fdinfo` flags).
fn writable_files(pid: i32) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.is_absolute() {
            continue; // pipes, sockets, anon inodes
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or(0);
        if flags & 0o3 != 0 {
            out.push(target); // O_WRONLY or O_RDWR
        }
    }
    out
}

/// Process details from `/proc`, if the process still exists.
pub fn writer(pid: i32) -> Option<Writer> {
    let p = crate::procinfo::process(u32::try_from(pid).ok().filter(|p| *p > 0)?)?;
    Some(Writer {
        pid: p.pid,
        exe: p.exe,
        cmdline: p.cmdline,
        uid: p.uid,
        user: p.user,
    })
}

impl FileBackend for FanotifyBackend {
    fn guard(&self) -> Option<Guard> {
        Some(self.guard.clone())
    }

    fn mark_source_dir(&mut self, dir: &Path) -> Result<(), String> {
        let d = std::fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        self.fan
            .mark(
                MarkFlags::FAN_MARK_ADD,
                MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_EVENT_ON_CHILD,
                &d,
                None::<&Path>,
            )
            .map_err(|e| format!("fanotify_mark {}: {e}", dir.display()))
    }

    fn mark_mount(&mut self, mount_point: &Path, whole_fs: bool) -> Result<(), String> {
        let dir = std::fs::File::open(mount_point)
            .map_err(|e| format!("{}: {e}", mount_point.display()))?;
        // A mount mark sees only writes through this very mount: a writer in another
        // mount namespace (its own copy of the mount) would pass unseen. A file-system
        // mark sees them all; it is used when the mount shows the whole file system
        // (the usual case for sticks and shares), so nothing outside it is captured.
        let scope = if whole_fs {
            MarkFlags::FAN_MARK_FILESYSTEM
        } else {
            MarkFlags::FAN_MARK_MOUNT
        };
        self.fan
            .mark(
                MarkFlags::FAN_MARK_ADD | scope,
                MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_MODIFY | MaskFlags::FAN_CLOSE_WRITE,
                &dir,
                None::<&Path>,
            )
            .map_err(|e| format!("fanotify_mark {}: {e}", mount_point.display()))
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Vec<RawEvent>, String>> {
        Box::pin(async move {
            self.rx
                .recv()
                .await
                .ok_or_else(|| "the fanotify reader stopped".to_string())
        })
    }
}
