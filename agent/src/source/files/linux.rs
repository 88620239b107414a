//! fanotify backend: marks exit points — the whole file system (`FAN_MARK_FILESYSTEM`,
//! so writers in other mount namespaces are seen too) or, for a bind mount of a
//! subtree, the mount (`FAN_MARK_MOUNT`) — for `FAN_MODIFY` and `FAN_CLOSE_WRITE`, and
//! sensitive source folders (inode marks on each folder, `FAN_EVENT_ON_CHILD`) for
//! opens.
//!
//! Permission events only where a refusal can follow: an exit point gets
//! `FAN_OPEN_PERM` only while a `deny` rule of the policy applies to its kind, and
//! source folders get `FAN_OPEN_PERM` only while the policy has a `deny` rule
//! (otherwise a plain `FAN_OPEN` notification). Every other write is a notification:
//! the writer never waits for the agent.
//!
//! Attribution: a notification carries only the writer's pid, and a short-lived `cp`
//! may have exited by the time it is read. So a second thread keeps a table of
//! processes from the kernel's process connector ([`super::writers`]): each exec is
//! read from `/proc` as it happens (that thread wakes at once, even while the file
//! thread works through a storm), forks inherit their parent's description, and exits
//! are kept a while for queued events. A writer is still named by pid only if it
//! exited before even its exec could be read (a machine starved of CPU for the
//! process's whole life); where a `deny` rule applies, the opener waits and is read
//! while it waits, as before.
//! Every permission event is answered (a silent handler would freeze the file
//! system); if the agent dies the kernel releases waiting opens when the group closes.
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
//! A thread reads the group (non-blocking, with poll) and hands batches over a
//! bounded channel; when the consumer is slow the kernel queue fills
//! and overflows, which is reported, never silent (and a rescan finds the files).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyResponse, InitFlags, MarkFlags, MaskFlags, Response,
};
use tokio::sync::mpsc;
use weilan_config::event::{Classification, FileEnforced, FileSourceRead};

use super::writers::Writers;
use super::{FileBackend, Guard, GuardState, RawEvent, Writer};
use crate::classify;
use crate::procevents::{ExecOpenError, ProcConnector, ProcEvent};
use crate::source::BoxFuture;

pub struct FanotifyBackend {
    fan: Arc<Fanotify>,
    brake: Arc<Brake>,
    /// File systems (`st_dev`) whose program starts are watched.
    programs_on: HashSet<u64>,
    rx: mpsc::Receiver<Vec<RawEvent>>,
    stop: Arc<AtomicBool>,
    guard: Guard,
}

impl FanotifyBackend {
    /// Needs CAP_SYS_ADMIN (root) in the initial user namespace.
    pub fn new() -> Result<Self, String> {
        Self::build(true)
    }

    /// As on a host where the process connector is unavailable (a container): writers
    /// are named from program starts and `/proc` alone. For tests.
    pub fn without_process_events() -> Result<Self, String> {
        Self::build(false)
    }

    fn build(process_events: bool) -> Result<Self, String> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(|e| format!("fanotify_init: {e}"))?;
        let fan = Arc::new(fan);
        let (tx, rx) = mpsc::channel(64);
        let stop = Arc::new(AtomicBool::new(false));
        let guard: Guard = Arc::default();
        let mut writers = new_writers();
        let inbox: Inbox = Arc::default();
        let connector = if process_events {
            ProcConnector::open()
        } else {
            Err(ExecOpenError::Unavailable("not asked for".into()))
        };
        match connector {
            Ok(connector) => {
                writers.events_started();
                let (w, t, s) = (inbox.clone(), tx.clone(), stop.clone());
                std::thread::Builder::new()
                    .name("fanotify-procs".into())
                    .spawn(move || watch_processes(connector, &w, &t, &s))
                    .map_err(|e| e.to_string())?;
            }
            Err(ExecOpenError::Unavailable(e)) => {
                tracing::info!(error = %e, "writers are read from /proc when their events arrive");
            }
            Err(ExecOpenError::Failed(e)) => return Err(e),
        }
        let brake: Arc<Brake> = Arc::default();
        let (f, s, g, b) = (fan.clone(), stop.clone(), guard.clone(), brake.clone());
        std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || read_loop(&f, Seen::new(writers, inbox), &tx, &s, &g, &b))
            .map_err(|e| e.to_string())?;
        Ok(FanotifyBackend {
            fan,
            brake,
            programs_on: HashSet::new(),
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

/// What the process-event thread learnt, waiting for the file-event thread.
enum Update {
    Event(ProcEvent, Option<Writer>),
    /// The connector dropped events.
    Lost,
    /// The connector failed.
    Stopped,
}

/// Updates handed from the process-event thread to the file-event thread. The lock
/// is held only to push or to swap the vector: the process-event thread, which races
/// exiting processes, never waits behind a lookup. The condition variable wakes a
/// file-event thread waiting for a process's fork.
type Inbox = Arc<(Mutex<Vec<Update>>, std::sync::Condvar)>;

/// Longest the file-event thread waits for the fork of a writer it knows only by
/// the program it started (a short-lived one, gone before it was read). Forks need
/// no `/proc` read, so the process-event thread hands them over at once.
const FORK_WAIT: Duration = Duration::from_millis(20);

/// Most updates waiting; beyond, they are dropped and the table forgotten (as when
/// the kernel drops events). The file thread takes them at least every 500 ms.
const MAX_WAITING_UPDATES: usize = 65_536;

/// The reader thread's memory.
struct Seen {
    /// Who each process is.
    writers: Writers,
    inbox: Inbox,
    /// When a wait for a writer's fork last ran out.
    wait_ran_out: Option<Instant>,
    /// Sensitive source files each process opened.
    reads: HashMap<i32, Vec<SourceOpen>>,
    /// (pid, path) already reported as `file.source_read`.
    reported_reads: HashSet<(i32, PathBuf)>,
    /// Classification of source files by (dev, inode, size, mtime).
    classified: HashMap<(u64, u64, u64, i64), Vec<Classification>>,
}

impl Seen {
    fn new(writers: Writers, inbox: Inbox) -> Seen {
        Seen {
            writers,
            inbox,
            wait_ran_out: None,
            reads: HashMap::new(),
            reported_reads: HashSet::new(),
            classified: HashMap::new(),
        }
    }

    /// Applies what the process-event thread learnt since last time.
    fn take_updates(&mut self) {
        let updates = std::mem::take(&mut *self.inbox.0.lock().unwrap_or_else(|e| e.into_inner()));
        for u in updates {
            match u {
                Update::Event(e, described) => self.writers.apply(e, described),
                Update::Lost => self.writers.events_lost(),
                Update::Stopped => self.writers.events_stopped(),
            }
        }
    }

    /// Who `pid` is. A process known only partly (gone before it was read) is
    /// looked up again once the process-event thread has handed over what it has:
    /// its fork (its parent's user) follows within moments. That wait is bounded,
    /// and skipped for a while after one ran out (that thread is behind).
    fn writer(&mut self, pid: i32) -> Option<Writer> {
        let pid = u32::try_from(pid).ok()?;
        // Read from `/proc` (alive, a zombie or a kernel thread: the user is known),
        // or known from its fork: nothing more will come.
        let complete = |w: &Option<Writer>| w.as_ref().is_some_and(|w| w.uid.is_some());
        let mut found = self.writers.lookup(pid);
        if complete(&found) || !self.writers.events_complete() {
            return found;
        }
        let deadline = Instant::now() + FORK_WAIT;
        let waiting_allowed = self.wait_ran_out.is_none_or(|t| t.elapsed() > WAIT_PAUSE);
        loop {
            self.take_updates();
            found = self.writers.lookup(pid).or(found);
            if complete(&found) || !waiting_allowed {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                self.wait_ran_out = Some(now);
                return found;
            }
            let (lock, more) = &*self.inbox;
            let waiting = lock.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.is_empty() {
                let _ = more.wait_timeout(waiting, deadline - now);
            }
        }
    }
}

/// After a wait for a fork ran out, how long no writer waits again.
const WAIT_PAUSE: Duration = Duration::from_secs(1);

/// The table of processes, read from `/proc`.
fn new_writers() -> Writers {
    Writers::new(
        Box::new(|pid| writer(pid as i32)),
        Box::new(|pid| {
            let started = start_time(pid as i32)?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|p| p.display().to_string());
            Some((started, exe))
        }),
    )
}

/// Keeps the table of processes from the connector's events, on a thread of its own:
/// it wakes at each exec, even while the file-event thread works through a storm, so
/// a short-lived writer is read before it exits.
fn watch_processes(
    mut connector: ProcConnector,
    inbox: &(Mutex<Vec<Update>>, std::sync::Condvar),
    tx: &mpsc::Sender<Vec<RawEvent>>,
    stop: &AtomicBool,
) {
    if let Err(e) = crate::procevents::hurry_this_thread() {
        tracing::warn!(error = %e, "the process-event thread runs at normal priority: on a busy machine a short-lived writer may be named by pid only");
    }
    let hand_over = |u: Update| {
        let mut waiting = inbox.0.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() >= MAX_WAITING_UPDATES {
            waiting.clear();
            waiting.push(Update::Lost);
        }
        waiting.push(u);
        inbox.1.notify_one();
    };
    let mut events = Vec::new();
    let mut lost = 0u64;
    while !stop.load(Ordering::Relaxed) {
        events.clear();
        match connector.recv(true, &mut events) {
            Ok(false) => {}
            Ok(true) => {
                hand_over(Update::Lost);
                lost += 1;
                // Said once, then every 100th: the storm that caused it may last.
                if lost == 1 || lost.is_multiple_of(100) {
                    let problem = format!(
                        "process notifications overflowed ({lost} times so far): writers that exited before their file events were read may be named by pid only"
                    );
                    if tx.blocking_send(vec![RawEvent::Degraded(problem)]).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                hand_over(Update::Stopped);
                let problem = format!(
                    "{e}: writers are read from /proc when their events arrive (one that exited first is named by pid only)"
                );
                let _ = tx.blocking_send(vec![RawEvent::Degraded(problem)]);
                return;
            }
        }
        for event in &events {
            let described = match *event {
                ProcEvent::Exec { pid } | ProcEvent::Uid { pid } => writer(pid as i32),
                _ => None,
            };
            hand_over(Update::Event(*event, described));
        }
    }
}

/// Makes opens on exit points wait while the agent is behind. Writes are plain
/// notifications where no `deny` rule applies, and nothing then slows a writer: past
/// the kernel's queue (16 384 events) they would overflow, and the files would be
/// found by a rescan without their writer. So when the hand-over to the source is
/// full, every exit point also gets `FAN_OPEN_PERM`, and other processes' opens are
/// answered only once the source has taken what waits ([`Behind`]); once it has
/// caught up (for a second), the exit points go back to notifications.
#[derive(Default)]
struct Brake {
    /// Exit points: mount point → (marked as its whole file system, a `deny` rule
    /// applies so opens wait anyway).
    exits: Mutex<HashMap<PathBuf, (bool, bool)>>,
    on: AtomicBool,
}

/// A read of this many events filled the buffer; so many such reads in a row and the
/// reader brakes.
const FULL_READ: usize = 150;
const FULL_READS_TO_BRAKE: u32 = 4;

/// How long the brake stays on at least once the agent has caught up.
const BRAKE_HOLD: Duration = Duration::from_secs(1);

impl Brake {
    /// Adds or removes `FAN_OPEN_PERM` on the exit points no `deny` rule applies to.
    fn set(&self, fan: &Fanotify, on: bool) {
        self.on.store(on, Ordering::Relaxed);
        let exits = self.exits.lock().unwrap_or_else(|e| e.into_inner());
        for (mount_point, (whole_fs, refuse)) in exits.iter() {
            if *refuse {
                continue;
            }
            let Ok(dir) = std::fs::File::open(mount_point) else {
                continue; // gone meanwhile: the source forgets it
            };
            let scope = if *whole_fs {
                MarkFlags::FAN_MARK_FILESYSTEM
            } else {
                MarkFlags::FAN_MARK_MOUNT
            };
            let how = if on {
                MarkFlags::FAN_MARK_ADD
            } else {
                MarkFlags::FAN_MARK_REMOVE
            };
            if let Err(e) = fan.mark(how | scope, MaskFlags::FAN_OPEN_PERM, &dir, None::<&Path>) {
                tracing::warn!(mount = %mount_point.display(), error = %e, on, "the exit point's brake did not change");
            }
        }
        tracing::info!(
            on,
            exits = exits.len(),
            "file-event brake: opens on exit points wait for the agent while it catches up"
        );
    }
}

/// While the source is behind: what the reader holds back.
#[derive(Default)]
struct Behind {
    /// Events the source has not taken yet (at most [`MAX_BACKLOG`]).
    backlog: Vec<RawEvent>,
    /// Other processes' opens, answered once the source has caught up: they wait.
    /// The agent's own opens (its workers hashing a file) are answered at once, so
    /// holding these can never wait on the agent itself.
    held: Vec<nix::sys::fanotify::FanotifyEvent>,
    /// Since when the brake is on.
    braked_since: Option<Instant>,
}

/// Most events held back for the source; beyond, notifications are dropped and one
/// overflow is reported (the source rescans), as the kernel does. Each close holds a
/// descriptor, and the hand-over already holds up to 64 batches: more would run the
/// agent out of descriptors, and the kernel drops an event it cannot open.
const MAX_BACKLOG: usize = 4096;
/// Most opens held back; beyond, opens are answered at once.
const MAX_HELD: usize = 1024;

impl Behind {
    /// Hands the backlog to the source if it has room; then decides the held opens.
    /// `Err` when the source is gone.
    fn catch_up(
        &mut self,
        fan: &Fanotify,
        guard: &Guard,
        seen: &mut Seen,
        tx: &mpsc::Sender<Vec<RawEvent>>,
    ) -> Result<(), ()> {
        if !self.backlog.is_empty() {
            match tx.try_send(std::mem::take(&mut self.backlog)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(b)) => self.backlog = b,
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(()),
            }
        }
        if self.backlog.is_empty() && !self.held.is_empty() {
            let me = std::process::id() as i32;
            for ev in std::mem::take(&mut self.held) {
                on_event(fan, guard, seen, me, &ev, &mut self.backlog);
            }
        }
        Ok(())
    }

    /// Queues a batch behind the backlog, bounded. A write that is not a close gives
    /// up its descriptor here: only a file never closed (its stick pulled) needs it,
    /// and the descriptors waiting must stay well inside the agent's file limit (a
    /// fanotify read that cannot open the next event's file loses that event).
    fn queue(&mut self, batch: Vec<RawEvent>) {
        if self.backlog.len() + batch.len() > MAX_BACKLOG {
            if !matches!(self.backlog.last(), Some(RawEvent::Overflow)) {
                self.backlog.push(RawEvent::Overflow);
            }
            return;
        }
        self.backlog.extend(batch.into_iter().map(|ev| match ev {
            RawEvent::Write {
                path,
                close: false,
                writer,
                file: _,
                origins,
            } => RawEvent::Write {
                path,
                close: false,
                writer,
                file: None,
                origins,
            },
            other => other,
        }));
    }
}

fn read_loop(
    fan: &Fanotify,
    mut seen: Seen,
    tx: &mpsc::Sender<Vec<RawEvent>>,
    stop: &AtomicBool,
    guard: &Guard,
    brake: &Brake,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let me = std::process::id() as i32;
    let mut behind = Behind::default();
    let mut full_reads = 0;
    while !stop.load(Ordering::Relaxed) {
        seen.take_updates(); // also while idle: the inbox stays short
        if behind.catch_up(fan, guard, &mut seen, tx).is_err() {
            return;
        }
        let waiting = !behind.backlog.is_empty() || !behind.held.is_empty();
        let caught_up = !waiting && tx.capacity() * 2 > tx.max_capacity();
        if caught_up
            && behind
                .braked_since
                .is_some_and(|t| t.elapsed() > BRAKE_HOLD)
        {
            brake.set(fan, false);
            behind.braked_since = None;
        }
        let mut fds = [PollFd::new(fan.as_fd(), PollFlags::POLLIN)];
        let timeout = if waiting { 10u16 } else { 500 };
        match poll(&mut fds, PollTimeout::from(timeout)) {
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
            Err(e @ (nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE)) => {
                // The kernel could not open the next event's file for us and dropped
                // that event. Stopping here would leave every waiting open on an exit
                // point unanswered: carry on, and have the source rescan.
                tracing::error!(error = %e, "fanotify event lost: no file descriptor left");
                behind.queue(vec![RawEvent::Overflow]);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "fanotify read failed");
                return;
            }
        };
        // A full read (the 4 KiB buffer holds ~170 events) means more wait in the
        // kernel's queue: several in a row, and this thread is falling behind the
        // writers itself — brake before that queue overflows.
        full_reads = if events.len() >= FULL_READ {
            full_reads + 1
        } else {
            0
        };
        if full_reads >= FULL_READS_TO_BRAKE {
            if behind.braked_since.is_none() {
                brake.set(fan, true);
            }
            behind.braked_since = Some(Instant::now());
        }
        // Execs read until now come first: they precede these writes.
        seen.take_updates();
        let mut batch = Vec::with_capacity(events.len());
        for ev in events {
            let others_open = ev.mask().contains(MaskFlags::FAN_OPEN_PERM) && ev.pid() != me;
            if waiting && others_open && behind.held.len() < MAX_HELD {
                behind.held.push(ev); // its opener waits until the source catches up
                continue;
            }
            on_event(fan, guard, &mut seen, me, &ev, &mut batch);
        }
        if batch.is_empty() {
            continue;
        }
        if waiting {
            behind.queue(batch);
            continue;
        }
        match tx.try_send(batch) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(batch)) => {
                if behind.braked_since.is_none() {
                    brake.set(fan, true);
                }
                behind.braked_since = Some(Instant::now());
                behind.queue(batch);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// One fanotify event: a permission event is answered at once.
fn on_event(
    fan: &Fanotify,
    guard: &Guard,
    seen: &mut Seen,
    me: i32,
    ev: &nix::sys::fanotify::FanotifyEvent,
    batch: &mut Vec<RawEvent>,
) {
    let mask = ev.mask();
    if mask.contains(MaskFlags::FAN_Q_OVERFLOW) {
        batch.push(RawEvent::Overflow);
        return;
    }
    let Some(fd) = ev.fd() else { return };
    if mask.contains(MaskFlags::FAN_OPEN_EXEC) {
        started(seen, ev.pid(), fd);
        let file_events = MaskFlags::FAN_OPEN_PERM
            | MaskFlags::FAN_OPEN
            | MaskFlags::FAN_MODIFY
            | MaskFlags::FAN_CLOSE_WRITE;
        if !mask.intersects(file_events) {
            return;
        }
    }
    let permission = mask.contains(MaskFlags::FAN_OPEN_PERM);
    if permission || mask.contains(MaskFlags::FAN_OPEN) {
        let allow = if ev.pid() == me {
            true // the agent's own reads (hashing, quarantine)
        } else {
            let g = guard.read().unwrap_or_else(|e| e.into_inner());
            on_open(&g, seen, ev.pid(), fd, permission, batch)
        };
        if permission {
            // Always answer, and at once: the opener is waiting.
            let response = if allow {
                Response::FAN_ALLOW
            } else {
                Response::FAN_DENY
            };
            if let Err(e) = fan.write_response(FanotifyResponse::new(fd, response)) {
                tracing::error!(error = %e, "fanotify permission answer failed");
            }
        }
        return;
    }
    if ev.pid() == me {
        return; // the agent's own I/O (hashing opens for reading only)
    }
    let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
        return;
    };
    let path = guard
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .place(path, || fstat_dev(fd));
    let close = mask.contains(MaskFlags::FAN_CLOSE_WRITE);
    let who = seen.writer(ev.pid());
    // The written file's descriptor travels with every write event: a close is
    // described through it; the first write's is kept in case the file is never
    // closed (its stick pulled while it is open).
    let origins = if close {
        seen.reads
            .get(&ev.pid())
            .map(|r| {
                r.iter()
                    .filter(|o| o.at.elapsed() < ORIGIN_WINDOW)
                    .map(|o| o.path.display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    batch.push(RawEvent::Write {
        path,
        close,
        writer: who,
        file: fd.try_clone_to_owned().ok().map(std::fs::File::from),
        origins,
    });
}

/// A process started the program `fd` is (a `FAN_OPEN_EXEC` event). The program
/// loader (`ld-linux…`), opened for the same start, is not the program.
fn started(seen: &mut Seen, pid: i32, fd: BorrowedFd<'_>) {
    let Ok(pid) = u32::try_from(pid) else { return };
    let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
        return;
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let loader = ["ld-linux", "ld64.so", "ld-musl", "ld.so"]
        .iter()
        .any(|l| name.starts_with(l));
    if !loader {
        seen.writers.started(pid, path.display().to_string());
    }
}

/// Notes one open (of a source file, or on an exit point) and decides it: `false`
/// refuses it. Only a permission event (`can_refuse`) is ever refused: a notification
/// has already happened.
fn on_open(
    g: &GuardState,
    seen: &mut Seen,
    pid: i32,
    fd: BorrowedFd<'_>,
    can_refuse: bool,
    batch: &mut Vec<RawEvent>,
) -> bool {
    let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
        return true;
    };
    let path = g.place(path, || fstat_dev(fd));
    let deny_rules = can_refuse && g.policy.has_deny();
    let who = seen.writer(pid);
    if let Some(source) = g.source_for(&path) {
        let classification = if deny_rules {
            classify_source(g, seen, fd)
        } else {
            Vec::new()
        };
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
    // An open on an exit point: refused only if the opener holds a classified source.
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
    let p = crate::procinfo::brief(u32::try_from(pid).ok().filter(|p| *p > 0)?)?;
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

    fn watch_programs(&mut self, mount_point: &Path) -> Result<(), String> {
        let dir = std::fs::File::open(mount_point)
            .map_err(|e| format!("{}: {e}", mount_point.display()))?;
        let dev = fstat_dev(dir.as_fd()).ok_or("fstat failed")?;
        if self.programs_on.contains(&dev) {
            return Ok(());
        }
        // A notification, never a permission event: no program start waits for us.
        let marked = self
            .fan
            .mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                MaskFlags::FAN_OPEN_EXEC,
                &dir,
                None::<&Path>,
            )
            .or_else(|_| {
                // Some file systems take no file-system mark (e.g. a btrfs subvolume
                // mount): the mount then.
                self.fan.mark(
                    MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_MOUNT,
                    MaskFlags::FAN_OPEN_EXEC,
                    &dir,
                    None::<&Path>,
                )
            });
        marked.map_err(|e| format!("fanotify_mark {}: {e}", mount_point.display()))?;
        self.programs_on.insert(dev);
        Ok(())
    }

    fn mark_source_dir(&mut self, dir: &Path, refuse: bool) -> Result<(), String> {
        let d = std::fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (want, drop) = if refuse {
            (MaskFlags::FAN_OPEN_PERM, MaskFlags::FAN_OPEN)
        } else {
            (MaskFlags::FAN_OPEN, MaskFlags::FAN_OPEN_PERM)
        };
        self.fan
            .mark(
                MarkFlags::FAN_MARK_ADD,
                want | MaskFlags::FAN_EVENT_ON_CHILD,
                &d,
                None::<&Path>,
            )
            .map_err(|e| format!("fanotify_mark {}: {e}", dir.display()))?;
        // Added first, then the other kind of open removed: never unwatched between.
        let _ = self
            .fan
            .mark(MarkFlags::FAN_MARK_REMOVE, drop, &d, None::<&Path>);
        Ok(())
    }

    fn mark_mount(
        &mut self,
        mount_point: &Path,
        whole_fs: bool,
        refuse: bool,
    ) -> Result<(), String> {
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
        // Opens wait for the agent only where a `deny` rule can refuse them (or while
        // the brake is on).
        let mut exits = self.brake.exits.lock().unwrap_or_else(|e| e.into_inner());
        let braked = self.brake.on.load(Ordering::Relaxed);
        let mut want = MaskFlags::FAN_MODIFY | MaskFlags::FAN_CLOSE_WRITE;
        if refuse || braked {
            want |= MaskFlags::FAN_OPEN_PERM;
        }
        self.fan
            .mark(MarkFlags::FAN_MARK_ADD | scope, want, &dir, None::<&Path>)
            .map_err(|e| format!("fanotify_mark {}: {e}", mount_point.display()))?;
        exits.insert(mount_point.to_path_buf(), (whole_fs, refuse));
        if !refuse && !braked {
            let _ = self.fan.mark(
                MarkFlags::FAN_MARK_REMOVE | scope,
                MaskFlags::FAN_OPEN_PERM,
                &dir,
                None::<&Path>,
            );
        }
        Ok(())
    }

    fn forget_mount(&mut self, mount_point: &Path) {
        // Its kernel mark went with the unmount; the brake must not mark whatever
        // file system now shows that folder.
        self.brake
            .exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mount_point);
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
