//! Who each process is, kept current from the kernel's process events, so a write is
//! attributed to its writer without a permission event on every open.
//!
//! A file event carries only the writer's pid, and by the time it is read a short
//! `cp` may have exited (its `/proc` entry gone). So each program start
//! ([`ProcEvent::Exec`]) is read from `/proc` as it happens, a fork inherits its
//! parent's description (a shell's `echo > file` subshell), an exit keeps the
//! description a while for events still queued, and a uid change re-reads it. A
//! description is then trusted until the next event for that pid — no `/proc` read
//! per file. When the connector drops events the table is forgotten (each process
//! is read again); without the connector (outside the initial namespaces) a
//! description is checked against the process's start time and executable before
//! each use.
//!
//! Bounded: at most [`MAX_PROCESSES`] descriptions; exited ones go first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Writer;
use crate::procevents::ProcEvent;

/// Most processes described at once.
pub const MAX_PROCESSES: usize = 8192;
/// How long an exited process's description is kept for its queued events.
const EXITED_KEPT: Duration = Duration::from_secs(30);

/// Reads one process from `/proc` (`None`: it is gone). Injected for tests.
pub type ReadProcess = Box<dyn Fn(u32) -> Option<Writer> + Send>;
/// A process's start time and executable, to tell a reused pid (`None`: gone).
pub type Identify = Box<dyn Fn(u32) -> Option<(u64, Option<String>)> + Send>;

enum Known {
    /// Read from `/proc` (at its exec, or when first seen).
    Read(Writer),
    /// Forked from `parent` and not read yet: it runs the parent's program.
    Forked { parent: u32 },
    /// Seen only by the executable it started (the fanotify exec event).
    Nothing,
}

struct Entry {
    known: Known,
    /// The executable it last started, from the exec event in the file-event queue
    /// itself: that event holds the opened program, so it is right even when the
    /// process is long gone, and it is read before the process's writes.
    started: Option<String>,
    /// Start time and executable when read (only checked without the connector).
    identity: Option<(u64, Option<String>)>,
    exited: Option<Instant>,
}

impl Entry {
    fn new(known: Known) -> Entry {
        Entry {
            known,
            started: None,
            identity: None,
            exited: None,
        }
    }
}

/// The table of processes.
pub struct Writers {
    entries: HashMap<u32, Entry>,
    /// Whether the connector's events are arriving, complete: then a description
    /// is trusted without re-checking `/proc`.
    events_complete: bool,
    read: ReadProcess,
    identify: Identify,
}

impl Writers {
    pub fn new(read: ReadProcess, identify: Identify) -> Writers {
        Writers {
            entries: HashMap::new(),
            events_complete: false,
            read,
            identify,
        }
    }

    /// The connector is subscribed: from now on its events keep the table.
    pub fn events_started(&mut self) {
        self.entries.clear();
        self.events_complete = true;
    }

    /// The connector dropped events: any description may be stale (an exec among
    /// the lost), so all are forgotten; each process is read again on its next use.
    pub fn events_lost(&mut self) {
        self.entries.clear();
    }

    /// The connector failed: descriptions are checked against `/proc` before use.
    pub fn events_stopped(&mut self) {
        self.entries.clear();
        self.events_complete = false;
    }

    /// Whether descriptions are trusted without re-reading.
    pub fn events_complete(&self) -> bool {
        self.events_complete
    }

    /// Applies one process event, reading an exec'ing process from `/proc` now.
    pub fn on_event(&mut self, event: ProcEvent) {
        let described = match event {
            ProcEvent::Exec { pid } | ProcEvent::Uid { pid } => (self.read)(pid),
            _ => None,
        };
        self.apply(event, described);
    }

    /// Applies one process event; for an exec or uid change, `described` is the
    /// process as read from `/proc` just before (`None`: already gone), so the read
    /// can happen outside a lock around the table.
    pub fn apply(&mut self, event: ProcEvent, described: Option<Writer>) {
        match event {
            ProcEvent::Fork { parent, child } => {
                // The child's exec may have been seen first (two queues): keep it.
                let started = self
                    .entries
                    .get(&child)
                    .filter(|e| e.exited.is_none() && matches!(e.known, Known::Nothing))
                    .and_then(|e| e.started.clone());
                let mut entry = Entry::new(Known::Forked { parent });
                entry.started = started;
                self.insert(child, entry);
            }
            ProcEvent::Exec { pid } | ProcEvent::Uid { pid } => {
                // Read too late (already gone): keep what was known (its parent's
                // user); a zombie's read still has its user.
                let Some(writer) = described else { return };
                let started = self
                    .entries
                    .get(&pid)
                    .filter(|e| e.exited.is_none())
                    .and_then(|e| e.started.clone());
                let mut entry = Entry::new(Known::Read(writer));
                entry.started = started;
                self.insert(pid, entry);
            }
            ProcEvent::Exit { pid } => {
                if let Some(e) = self.entries.get_mut(&pid) {
                    e.exited = Some(Instant::now());
                }
            }
        }
    }

    /// `pid` started `exe` (its exec event in the file-event queue, read in order
    /// before the writes that follow it).
    pub fn started(&mut self, pid: u32, exe: String) {
        // Also onto an exited process: the two queues are read apart, so its exit
        // may be known before this event is read (a pid is not reused that soon).
        match self.entries.get_mut(&pid) {
            Some(e) => e.started = Some(exe),
            None => {
                let mut entry = Entry::new(Known::Nothing);
                entry.started = Some(exe);
                self.insert(pid, entry);
            }
        }
    }

    /// Who `pid` is: from the table, else read now. `None` when it is gone and was
    /// never described.
    pub fn lookup(&mut self, pid: u32) -> Option<Writer> {
        let started = self.entries.get(&pid).and_then(|e| e.started.clone());
        let mut w = self.describe(pid)?;
        if let Some(exe) = started {
            if w.exe.as_deref() != Some(exe.as_str()) {
                // Read before its exec, or inherited: the program it runs now is
                // the one its exec event opened; its arguments are unknown.
                w.exe = Some(exe);
                w.cmdline = None;
            }
        }
        Some(w)
    }

    /// The description held for `pid` (or read now), before the exec event's
    /// executable is laid over it.
    fn describe(&mut self, pid: u32) -> Option<Writer> {
        let trusted = match self.entries.get(&pid) {
            None => None,
            Some(e) if self.events_complete && e.identity.is_none() => match &e.known {
                Known::Read(w) => Some(w.clone()),
                Known::Forked { parent } => {
                    let parent = *parent;
                    // Alive: read it. Gone, or a zombie (no program left to read):
                    // it ran its parent's program, with its parent's arguments.
                    let w = match (self.read)(pid) {
                        Some(w) if w.exe.is_some() => Some(w),
                        zombie => self
                            .describe(parent)
                            .map(|mut w| {
                                w.pid = pid;
                                w
                            })
                            .or(zombie),
                    };
                    if let (Some(w), Some(e)) = (&w, self.entries.get_mut(&pid)) {
                        e.known = Known::Read(w.clone());
                    }
                    w
                }
                Known::Nothing => {
                    let w = (self.read)(pid);
                    if let (Some(w), Some(e)) = (&w, self.entries.get_mut(&pid)) {
                        e.known = Known::Read(w.clone());
                    }
                    return w.or(Some(Writer {
                        pid,
                        ..Writer::default()
                    }));
                }
            },
            Some(e) => match (&e.known, &e.identity) {
                (Known::Read(w), Some(id)) if (self.identify)(pid).as_ref() == Some(id) => {
                    Some(w.clone())
                }
                _ => None,
            },
        };
        if trusted.is_some() {
            return trusted;
        }
        let Some(w) = (self.read)(pid) else {
            // Gone, but its exec was seen: named by that.
            return self
                .entries
                .get(&pid)
                .filter(|e| e.started.is_some())
                .map(|_| Writer {
                    pid,
                    ..Writer::default()
                });
        };
        let identity = (!self.events_complete)
            .then(|| (self.identify)(pid))
            .flatten();
        if !self.events_complete && identity.is_none() {
            return Some(w); // exited meanwhile: nothing to check a later use against
        }
        let started = self.entries.get(&pid).and_then(|e| e.started.clone());
        let mut entry = Entry::new(Known::Read(w.clone()));
        entry.identity = identity;
        entry.started = started;
        self.insert(pid, entry);
        Some(w)
    }

    fn insert(&mut self, pid: u32, entry: Entry) {
        if self.entries.len() >= MAX_PROCESSES && !self.entries.contains_key(&pid) {
            self.entries
                .retain(|_, e| e.exited.is_none_or(|t| t.elapsed() < EXITED_KEPT));
            if self.entries.len() >= MAX_PROCESSES {
                self.entries.retain(|_, e| e.exited.is_none());
            }
            if self.entries.len() >= MAX_PROCESSES {
                self.entries.clear();
            }
        }
        self.entries.insert(pid, entry);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Start time, exe and uid of a running process.
    type Running = (u64, String, u32);

    /// A fake `/proc`: pid → what runs there; counts reads.
    #[derive(Clone, Default)]
    struct FakeProc {
        live: Arc<Mutex<HashMap<u32, Running>>>,
        reads: Arc<Mutex<usize>>,
    }

    impl FakeProc {
        fn run(&self, pid: u32, start: u64, exe: &str, uid: u32) {
            self.live
                .lock()
                .unwrap()
                .insert(pid, (start, exe.into(), uid));
        }
        fn exit(&self, pid: u32) {
            self.live.lock().unwrap().remove(&pid);
        }
        fn reads(&self) -> usize {
            *self.reads.lock().unwrap()
        }
        fn table(&self) -> Writers {
            let (a, b) = (self.clone(), self.clone());
            Writers::new(
                Box::new(move |pid| {
                    *a.reads.lock().unwrap() += 1;
                    let live = a.live.lock().unwrap();
                    live.get(&pid).map(|(_, exe, uid)| Writer {
                        pid,
                        exe: Some(exe.clone()),
                        cmdline: Some(exe.clone()),
                        uid: Some(*uid),
                        user: None,
                    })
                }),
                Box::new(move |pid| {
                    let live = b.live.lock().unwrap();
                    live.get(&pid).map(|(t, exe, _)| (*t, Some(exe.clone())))
                }),
            )
        }
    }

    fn exe(w: Option<Writer>) -> Option<String> {
        w.and_then(|w| w.exe)
    }

    #[test]
    fn a_program_that_exited_before_its_write_was_read_is_still_named() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(100, 1, "/usr/bin/bash", 1000);
        p.run(101, 2, "/usr/bin/bash", 1000);
        t.on_event(ProcEvent::Fork {
            parent: 100,
            child: 101,
        });
        p.run(101, 2, "/usr/bin/cp", 1000);
        t.on_event(ProcEvent::Exec { pid: 101 });
        // cp writes, exits and is reaped before its event is read.
        t.on_event(ProcEvent::Exit { pid: 101 });
        p.exit(101);
        let w = t.lookup(101).expect("described at its exec");
        assert_eq!(w.exe.as_deref(), Some("/usr/bin/cp"));
        assert_eq!((w.pid, w.uid), (101, Some(1000)));
    }

    #[test]
    fn a_program_start_names_a_writer_never_read() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(700, 1, "/usr/bin/bash", 1000);
        // The exec event of the file queue is read before the connector's fork: the
        // program is named, the user comes once the fork is known.
        t.started(701, "/usr/bin/cp".into());
        let w = t.lookup(701).expect("named by its start");
        assert_eq!((w.exe.as_deref(), w.uid), (Some("/usr/bin/cp"), None));
        t.apply(
            ProcEvent::Fork {
                parent: 700,
                child: 701,
            },
            None,
        );
        // Its exec was read too late (gone): what was known stays.
        t.apply(ProcEvent::Exec { pid: 701 }, None);
        t.apply(ProcEvent::Exit { pid: 701 }, None);
        let w = t.lookup(701).expect("named");
        assert_eq!(
            (w.pid, w.exe.as_deref(), w.cmdline.as_deref(), w.uid),
            (701, Some("/usr/bin/cp"), None, Some(1000)),
            "the program from its start, the user from its parent, arguments unknown"
        );
    }

    #[test]
    fn a_program_start_read_after_the_exit_keeps_what_the_exec_read() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(800, 1, "/usr/bin/bash", 0);
        let cp = Writer {
            pid: 801,
            exe: Some("/usr/bin/cp".into()),
            cmdline: Some("cp a /media/usb/a".into()),
            uid: Some(1000),
            user: None,
        };
        t.apply(
            ProcEvent::Fork {
                parent: 800,
                child: 801,
            },
            None,
        );
        t.apply(ProcEvent::Exec { pid: 801 }, Some(cp.clone()));
        t.apply(ProcEvent::Exit { pid: 801 }, None);
        t.started(801, "/usr/bin/cp".into());
        assert_eq!(t.lookup(801), Some(cp));
    }

    #[test]
    fn a_script_started_through_exec_is_named_by_the_program_that_runs_it() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(900, 1, "/usr/bin/dash", 0);
        assert_eq!(exe(t.lookup(900)).as_deref(), Some("/usr/bin/dash"));
        // `exec cp …` in the same process: its start is seen before the connector's
        // exec is read; the old arguments are not the new program's.
        t.started(900, "/usr/bin/cp".into());
        let w = t.lookup(900).unwrap();
        assert_eq!((w.exe.as_deref(), w.cmdline), (Some("/usr/bin/cp"), None));
    }

    #[test]
    fn a_subshell_that_never_execs_is_its_parents_program() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(200, 1, "/usr/bin/bash", 1000);
        t.on_event(ProcEvent::Fork {
            parent: 200,
            child: 201,
        });
        // `echo x > /media/usb/f` in a subshell: forked, wrote, exited, reaped.
        t.on_event(ProcEvent::Exit { pid: 201 });
        let w = t.lookup(201).expect("its parent's program");
        assert_eq!((w.pid, w.exe.as_deref()), (201, Some("/usr/bin/bash")));
    }

    #[test]
    fn a_forked_applet_read_as_a_zombie_is_its_parents_program() {
        // busybox's shell forks `cp` without an exec; read after it exited but before
        // it was reaped, /proc has its user but no program.
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(1000, 1, "/bin/busybox", 0);
        t.on_event(ProcEvent::Fork {
            parent: 1000,
            child: 1001,
        });
        let zombie = Writer {
            pid: 1001,
            uid: Some(0),
            ..Writer::default()
        };
        let mut t = Writers {
            read: Box::new(move |pid| {
                if pid == 1001 {
                    Some(zombie.clone())
                } else {
                    (t.read)(pid)
                }
            }),
            ..t
        };
        let w = t.lookup(1001).expect("named");
        assert_eq!((w.pid, w.exe.as_deref()), (1001, Some("/bin/busybox")));
    }

    #[test]
    fn with_events_complete_a_writer_of_many_files_is_read_once() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(300, 1, "/usr/bin/tar", 0);
        for _ in 0..1000 {
            assert_eq!(exe(t.lookup(300)).as_deref(), Some("/usr/bin/tar"));
        }
        assert_eq!(p.reads(), 1);
        // It execs another program: the event re-reads it.
        p.run(300, 1, "/usr/bin/gzip", 0);
        t.on_event(ProcEvent::Exec { pid: 300 });
        assert_eq!(exe(t.lookup(300)).as_deref(), Some("/usr/bin/gzip"));
        // It drops privileges: re-read.
        p.run(300, 1, "/usr/bin/gzip", 1000);
        t.on_event(ProcEvent::Uid { pid: 300 });
        assert_eq!(t.lookup(300).and_then(|w| w.uid), Some(1000));
    }

    #[test]
    fn a_reused_pid_is_a_new_process() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(400, 1, "/usr/bin/cp", 0);
        assert_eq!(exe(t.lookup(400)).as_deref(), Some("/usr/bin/cp"));
        t.on_event(ProcEvent::Exit { pid: 400 });
        p.exit(400);
        p.run(7, 1, "/usr/sbin/cron", 0);
        p.run(400, 9, "/usr/sbin/cron", 0);
        t.on_event(ProcEvent::Fork {
            parent: 7,
            child: 400,
        });
        assert_eq!(exe(t.lookup(400)).as_deref(), Some("/usr/sbin/cron"));
    }

    #[test]
    fn without_events_each_use_is_checked_against_the_process_start() {
        let p = FakeProc::default();
        let mut t = p.table();
        p.run(500, 1, "/usr/bin/cp", 0);
        assert_eq!(exe(t.lookup(500)).as_deref(), Some("/usr/bin/cp"));
        assert_eq!(exe(t.lookup(500)).as_deref(), Some("/usr/bin/cp"));
        assert_eq!(p.reads(), 1, "same start, same exe: the description holds");
        // The pid now belongs to another process (no event told us).
        p.run(500, 2, "/usr/bin/dd", 0);
        assert_eq!(exe(t.lookup(500)).as_deref(), Some("/usr/bin/dd"));
        // An exec in the same process changes the executable.
        p.run(500, 2, "/usr/bin/sh", 0);
        assert_eq!(exe(t.lookup(500)).as_deref(), Some("/usr/bin/sh"));
    }

    #[test]
    fn after_lost_events_processes_are_read_again() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(600, 1, "/usr/bin/cp", 0);
        assert_eq!(exe(t.lookup(600)).as_deref(), Some("/usr/bin/cp"));
        // The exec of dd in the same pid was among the dropped events.
        p.run(600, 1, "/usr/bin/dd", 0);
        t.events_lost();
        assert!(t.events_complete());
        assert_eq!(exe(t.lookup(600)).as_deref(), Some("/usr/bin/dd"));
        t.events_stopped();
        assert!(!t.events_complete());
        p.run(600, 1, "/usr/bin/sh", 0);
        assert_eq!(exe(t.lookup(600)).as_deref(), Some("/usr/bin/sh"));
    }

    #[test]
    fn the_table_is_bounded_and_drops_exited_processes_first() {
        let p = FakeProc::default();
        let mut t = p.table();
        t.events_started();
        p.run(1, 1, "/sbin/init", 0);
        for pid in 2..(MAX_PROCESSES as u32 + 2) {
            t.on_event(ProcEvent::Fork {
                parent: 1,
                child: pid,
            });
            if pid % 2 == 0 {
                t.on_event(ProcEvent::Exit { pid });
            }
        }
        assert!(t.len() <= MAX_PROCESSES);
        t.on_event(ProcEvent::Fork {
            parent: 1,
            child: 999_999,
        });
        assert!(t.len() <= MAX_PROCESSES);
        assert_eq!(exe(t.lookup(999_999)).as_deref(), Some("/sbin/init"));
    }
}
