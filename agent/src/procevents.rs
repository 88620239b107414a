//! The kernel's process connector (netlink, `linux/cn_proc.h`): forks, execs, uid
//! changes and exits of every process, as they happen.
//!
//! Two users: the transfer-tools source (which programs start) and the files source,
//! which keeps a table of who each process is from these events so that a file written
//! by a process that has exited by the time its event is read (a short `cp`) is still
//! attributed, without a permission event on every open.
//!
//! The one crate wrapping it (`cnproc` 0.2) loops forever on an error message and
//! hides overflows, so the few fixed-layout messages are read here over `netlink-sys`;
//! an overflow (`ENOBUFS`: the kernel dropped messages) is returned, never hidden.
//! Parsing ([`parse`]) is pure and unit-tested.

use std::os::fd::{AsFd, BorrowedFd};

use netlink_sys::protocols::NETLINK_CONNECTOR;
use netlink_sys::{Socket, SocketAddr as NlAddr};

/// Process-connector constants (`linux/cn_proc.h`, `linux/connector.h`).
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_FORK: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
const PROC_EVENT_UID: u32 = 4;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
/// `struct proc_event`: what, cpu, timestamp_ns, then the event's own fields.
const EVENT_FIELDS: usize = NLMSG_HDRLEN + CN_MSG_LEN + 16;

/// One process event. Pids are thread-group ids (what `getpid()` returns); events of
/// threads other than a group's leader are not returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// `child` was forked from `parent` (it runs the parent's program until it execs).
    Fork { parent: u32, child: u32 },
    /// `pid` started a new program.
    Exec { pid: u32 },
    /// `pid` changed its user ids.
    Uid { pid: u32 },
    /// `pid` exited.
    Exit { pid: u32 },
}

/// The process event in one connector message, if it is one this module reads.
pub fn parse(msg: &[u8]) -> Option<ProcEvent> {
    let u32_at = |o: usize| {
        msg.get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("four bytes")))
    };
    if u32_at(NLMSG_HDRLEN)? != CN_IDX_PROC || u32_at(NLMSG_HDRLEN + 4)? != CN_VAL_PROC {
        return None;
    }
    let field = |i: usize| u32_at(EVENT_FIELDS + 4 * i);
    let leader = |pid: u32, tgid: u32| (pid == tgid).then_some(tgid);
    match u32_at(NLMSG_HDRLEN + CN_MSG_LEN)? {
        // fork: parent_pid, parent_tgid, child_pid, child_tgid
        PROC_EVENT_FORK => Some(ProcEvent::Fork {
            parent: field(1)?,
            child: leader(field(2)?, field(3)?)?,
        }),
        // exec, uid, exit: process_pid, process_tgid, …
        PROC_EVENT_EXEC => Some(ProcEvent::Exec {
            pid: leader(field(0)?, field(1)?)?,
        }),
        PROC_EVENT_UID => Some(ProcEvent::Uid {
            pid: leader(field(0)?, field(1)?)?,
        }),
        PROC_EVENT_EXIT => Some(ProcEvent::Exit {
            pid: leader(field(0)?, field(1)?)?,
        }),
        _ => None,
    }
}

/// Why the process connector could not be opened.
#[derive(Debug)]
pub enum ExecOpenError {
    /// Not available where the agent runs (outside the initial network namespace the
    /// kernel refuses the connector): said once, not retried.
    Unavailable(String),
    Failed(String),
}

impl std::fmt::Display for ExecOpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExecOpenError::Unavailable(e) | ExecOpenError::Failed(e) => f.write_str(e),
        }
    }
}

/// A subscription to the kernel's process connector.
pub struct ProcConnector {
    sock: Socket,
    buf: Vec<u8>,
}

impl ProcConnector {
    /// Subscribes (root in the initial namespaces). Blocking reads ([`Self::recv`])
    /// wait at most 200 ms.
    pub fn open() -> Result<Self, ExecOpenError> {
        let fail = |what: &str, e: std::io::Error| {
            let msg = format!("process connector {what}: {e}");
            if e.raw_os_error() == Some(libc::ECONNREFUSED)
                || e.raw_os_error() == Some(libc::EPROTONOSUPPORT)
            {
                ExecOpenError::Unavailable(format!(
                    "{msg} (the kernel offers it in the initial network namespace only)"
                ))
            } else {
                ExecOpenError::Failed(msg)
            }
        };
        let mut sock = Socket::new(NETLINK_CONNECTOR).map_err(|e| fail("socket", e))?;
        sock.bind(&NlAddr::new(0, CN_IDX_PROC))
            .map_err(|e| fail("bind", e))?;
        let fd = &sock;
        let _ = nix::sys::socket::setsockopt(
            fd,
            nix::sys::socket::sockopt::RcvBufForce,
            &(4usize << 20),
        );
        nix::sys::socket::setsockopt(
            fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 200_000),
        )
        .map_err(|e| fail("timeout", std::io::Error::from(e)))?;
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + CN_MSG_LEN + 4);
        let total = (NLMSG_HDRLEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        sock.send_to(&msg, &NlAddr::new(0, 0), 0)
            .map_err(|e| fail("listen", e))?;
        Ok(ProcConnector {
            sock,
            buf: vec![0u8; 64 << 10],
        })
    }

    /// Reads one datagram's events into `out`: waits up to 200 ms when `wait`, else
    /// returns at once when none is queued. `Ok(true)` when the kernel dropped
    /// messages since the last read.
    pub fn recv(&mut self, wait: bool, out: &mut Vec<ProcEvent>) -> Result<bool, String> {
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        match self.sock.recv(&mut &mut self.buf[..], flags) {
            Ok(n) => {
                let mut off = 0;
                while off + NLMSG_HDRLEN <= n {
                    let len =
                        u32::from_ne_bytes(self.buf[off..off + 4].try_into().expect("four bytes"))
                            as usize;
                    if len < NLMSG_HDRLEN || off + len > n {
                        break;
                    }
                    out.extend(parse(&self.buf[off..off + len]));
                    off += (len + 3) & !3;
                }
                Ok(false)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(true),
            Err(e) => Err(format!("process connector: {e}")),
        }
    }
}

/// Puts the calling thread ahead of ordinary work (nice −20): a thread that must read
/// a process while it still exists is woken first even when every core is busy.
/// Needs `CAP_SYS_NICE`; without it the thread keeps its priority (the error says so).
pub fn hurry_this_thread() -> std::io::Result<()> {
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -20) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl AsFd for ProcConnector {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connector message as the kernel lays it out.
    fn message(what: u32, fields: &[u32]) -> Vec<u8> {
        let mut m = vec![0u8; EVENT_FIELDS];
        m[16..20].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m[20..24].copy_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m[36..40].copy_from_slice(&what.to_ne_bytes());
        for f in fields {
            m.extend_from_slice(&f.to_ne_bytes());
        }
        m
    }

    #[test]
    fn connector_messages_are_read_by_layout() {
        assert_eq!(
            parse(&message(PROC_EVENT_EXEC, &[4242, 4242])),
            Some(ProcEvent::Exec { pid: 4242 })
        );
        assert_eq!(
            parse(&message(PROC_EVENT_FORK, &[10, 10, 11, 11])),
            Some(ProcEvent::Fork {
                parent: 10,
                child: 11
            })
        );
        assert_eq!(
            parse(&message(PROC_EVENT_UID, &[7, 7, 1000, 1000])),
            Some(ProcEvent::Uid { pid: 7 })
        );
        assert_eq!(
            parse(&message(PROC_EVENT_EXIT, &[9, 9, 0, 17, 1, 1])),
            Some(ProcEvent::Exit { pid: 9 })
        );
        // GID changes and other kinds are not read; nor are cut-off messages.
        assert_eq!(parse(&message(0x40, &[7, 7, 1000, 1000])), None);
        assert_eq!(parse(&message(PROC_EVENT_EXEC, &[4242, 4242])[..50]), None);
    }

    #[test]
    fn threads_are_not_processes() {
        // A thread (pid ≠ tgid) starting, exiting or changing ids is not a process event.
        assert_eq!(parse(&message(PROC_EVENT_FORK, &[10, 10, 12, 10])), None);
        assert_eq!(
            parse(&message(PROC_EVENT_EXIT, &[12, 10, 0, 0, 1, 1])),
            None
        );
        assert_eq!(parse(&message(PROC_EVENT_UID, &[12, 10, 0, 0])), None);
        // A fork from a non-leader thread is a process whose parent is the group.
        assert_eq!(
            parse(&message(PROC_EVENT_FORK, &[12, 10, 13, 13])),
            Some(ProcEvent::Fork {
                parent: 10,
                child: 13
            })
        );
    }

    #[test]
    fn messages_of_other_connectors_are_ignored() {
        let mut m = message(PROC_EVENT_EXEC, &[1, 1]);
        m[16..20].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(parse(&m), None);
    }
}
