//! fanotify backend: marks whole mounts (`FAN_MARK_MOUNT`) for `FAN_OPEN_PERM`,
//! `FAN_MODIFY` and `FAN_CLOSE_WRITE`.
//!
//! Attribution needs the writer's `/proc` entry, and a short-lived `cp` has exited
//! (its `exe` unreadable) by the time its close-write event is read. So the group is a
//! content-class group: every open on an exit point waits for our answer, and while it
//! waits we read the opener's exe, command line and user, then allow the open at once.
//! Later write events of that pid use what was read then. Every permission event is
//! answered (a silent handler would freeze the file system); if the agent dies the
//! kernel releases waiting opens when the group closes.
//!
//! A thread reads the group (non-blocking, with poll) and hands batches over a bounded
//! channel; when the consumer is slow the kernel queue fills and overflows, which is
//! reported, never silent.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::collections::HashMap;

use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyResponse, InitFlags, MarkFlags, MaskFlags, Response,
};
use tokio::sync::mpsc;

use super::{FileBackend, RawEvent, Writer};
use crate::source::BoxFuture;

pub struct FanotifyBackend {
    fan: Arc<Fanotify>,
    rx: mpsc::Receiver<Vec<RawEvent>>,
    stop: Arc<AtomicBool>,
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
        let (f, s) = (fan.clone(), stop.clone());
        std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || read_loop(&f, &tx, &s))
            .map_err(|e| e.to_string())?;
        Ok(FanotifyBackend { fan, rx, stop })
    }
}

impl Drop for FanotifyBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_loop(fan: &Fanotify, tx: &mpsc::Sender<Vec<RawEvent>>, stop: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let me = std::process::id() as i32;
    // Openers seen in permission events, by pid (bounded).
    let mut openers: HashMap<i32, Writer> = HashMap::new();
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
                if ev.pid() != me {
                    if let Some(w) = writer(ev.pid()) {
                        if openers.len() >= 4096 {
                            openers.clear();
                        }
                        openers.insert(ev.pid(), w);
                    }
                }
                // Always answer, and at once: the opener is waiting.
                if let Err(e) = fan.write_response(FanotifyResponse::new(fd, Response::FAN_ALLOW)) {
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
            let close = mask.contains(MaskFlags::FAN_CLOSE_WRITE);
            let who = openers
                .get(&ev.pid())
                .cloned()
                .or_else(|| writer(ev.pid()).filter(|w| w.exe.is_some()));
            if close {
                openers.remove(&ev.pid());
            }
            let file = if close {
                fd.try_clone_to_owned().ok().map(std::fs::File::from)
            } else {
                None
            };
            batch.push(RawEvent::Write {
                path,
                close,
                writer: who,
                file,
            });
        }
        if !batch.is_empty() && tx.blocking_send(batch).is_err() {
            return;
        }
    }
}

/// Process details from `/proc`, if the process still exists.
pub fn writer(pid: i32) -> Option<Writer> {
    if pid <= 0 {
        return None;
    }
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let exe = std::fs::read_link(proc.join("exe"))
        .ok()
        .map(|p| p.display().to_string());
    let cmdline = std::fs::read(proc.join("cmdline")).ok().map(|b| {
        let b = &b[..b.len().min(4096)];
        String::from_utf8_lossy(b)
            .trim_end_matches('\0')
            .replace('\0', " ")
    });
    let uid = std::fs::read_to_string(proc.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
        });
    if exe.is_none() && cmdline.is_none() && uid.is_none() {
        return None;
    }
    let user = uid
        .and_then(|u| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u))
                .ok()
                .flatten()
        })
        .map(|u| u.name);
    Some(Writer {
        pid: pid as u32,
        exe,
        cmdline,
        uid,
        user,
    })
}

impl FileBackend for FanotifyBackend {
    fn mark_mount(&mut self, mount_point: &Path) -> Result<(), String> {
        let dir = std::fs::File::open(mount_point)
            .map_err(|e| format!("{}: {e}", mount_point.display()))?;
        self.fan
            .mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_MOUNT,
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
