//! The Linux network backend: netlink sock_diag dumps (TCP over IPv4 and IPv6, with
//! `tcp_info` byte counters) and the kernel's socket-destroy notifications, in every
//! network namespace a process on this host uses; owners and open files from `/proc`.
//!
//! A sock_diag socket answers for the namespace it was created in, so the agent opens
//! one pair per namespace from a short-lived thread that entered it (`setns` affects the
//! calling thread only). Pairs of namespaces no process uses any more are closed, or
//! the agent would keep them alive.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{
    nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NlAddr};
use weilan_config::event::ProcessRef;

use super::{NetBackend, Snapshot, SockFact, TcpState};
use crate::procinfo::{self, ProcessInfo};

/// Multicast groups of `sock_diag` destroy notifications (`SKNLGRP_*`).
const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
const SKNLGRP_INET6_TCP_DESTROY: u32 = 3;

/// Receive buffer for destroy notifications: ~12 000 notifications between two polls.
const DESTROY_RCVBUF: usize = 4 << 20;

/// One namespace's sockets: a dump socket and a destroy listener.
struct NsHandle {
    dump: Socket,
    destroy: Socket,
    seq: u32,
    /// Receive buffer, kept: a dump answers in datagrams of up to ~32 KiB.
    rx: Vec<u8>,
}

impl NsHandle {
    /// Opens both sockets in the calling thread's namespace.
    fn open() -> std::io::Result<Self> {
        let mut dump = Socket::new(NETLINK_SOCK_DIAG)?;
        dump.bind_auto()?;
        dump.connect(&NlAddr::new(0, 0))?;
        let mut destroy = Socket::new(NETLINK_SOCK_DIAG)?;
        destroy.bind_auto()?;
        let fd = &destroy;
        // Root may exceed rmem_max; without it the default buffer overflows after a
        // few hundred closes in one poll interval.
        if nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::RcvBufForce, &DESTROY_RCVBUF)
            .is_err()
        {
            let _ = nix::sys::socket::setsockopt(
                fd,
                nix::sys::socket::sockopt::RcvBuf,
                &DESTROY_RCVBUF,
            );
        }
        destroy.add_membership(SKNLGRP_INET_TCP_DESTROY)?;
        destroy.add_membership(SKNLGRP_INET6_TCP_DESTROY)?;
        destroy.set_non_blocking(true)?;
        Ok(NsHandle {
            dump,
            destroy,
            seq: 0,
            rx: vec![0u8; 256 << 10],
        })
    }

    /// Opens the pair inside the network namespace `pid` lives in.
    fn open_in(pid: u32) -> Result<Self, String> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| format!("/proc/{pid}/ns/net: {e}"))?;
        std::thread::Builder::new()
            .name("weilan-netns".into())
            .spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns: {e}"))?;
                NsHandle::open().map_err(|e| format!("sock_diag socket: {e}"))
            })
            .map_err(|e| format!("thread: {e}"))?
            .join()
            .map_err(|_| "the namespace thread panicked".to_string())?
    }

    /// Every TCP socket of one address family.
    fn dump(&mut self, family: u8, netns: u64, out: &mut Vec<SockFact>) -> Result<(), String> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO,
                states: StateFlags::all(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf[..]);
        self.dump
            .send(&buf, 0)
            .map_err(|e| format!("sock_diag request: {e}"))?;
        let rx = &mut self.rx;
        loop {
            let n = self
                .dump
                .recv(&mut &mut rx[..], 0)
                .map_err(|e| format!("sock_diag dump: {e}"))?;
            let mut end = None;
            for_each_payload(&rx[..n], |payload| match payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    out.push(fact(&r, netns));
                    true
                }
                NetlinkPayload::Done(_) => {
                    end = Some(Ok(()));
                    false
                }
                NetlinkPayload::Error(e) => {
                    end = Some(Err(format!("sock_diag: {e}")));
                    false
                }
                _ => true,
            })
            .map_err(|e| format!("sock_diag message: {e}"))?;
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Destroy notifications queued since the last call; `Err` when the kernel had to
    /// drop some (the receive buffer overflowed).
    fn drain(&mut self, netns: u64, out: &mut Vec<SockFact>) -> Result<(), String> {
        let rx = &mut self.rx;
        let mut overflowed = false;
        loop {
            match self.destroy.recv(&mut &mut rx[..], 0) {
                Ok(n) => {
                    // A message that does not parse ends this datagram, not the drain.
                    let _ = for_each_payload(&rx[..n], |payload| {
                        if let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) =
                            payload
                        {
                            out.push(fact(&r, netns));
                        }
                        true
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => overflowed = true,
                Err(e) => return Err(format!("sock_diag destroy listener: {e}")),
            }
        }
        if overflowed {
            Err("socket-destroy notifications overflowed the receive buffer".into())
        } else {
            Ok(())
        }
    }
}

/// Hands each netlink message of one datagram to `f` until `f` returns false; a
/// message that does not parse ends the walk with its error.
fn for_each_payload(
    datagram: &[u8],
    mut f: impl FnMut(NetlinkPayload<SockDiagMessage>) -> bool,
) -> Result<(), String> {
    let mut off = 0;
    while off < datagram.len() {
        let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&datagram[off..])
            .map_err(|e| e.to_string())?;
        let len = msg.header.length as usize;
        if !f(msg.payload) || len == 0 {
            break;
        }
        off += (len + 3) & !3;
    }
    Ok(())
}

/// Reads a `u64` of `struct tcp_info` at the field's offset, if the kernel's struct
/// is long enough to have it (older kernels send a shorter one).
fn tcp_info_u64(info: &[u8], offset: usize) -> Option<u64> {
    let b = info.get(offset..offset + 8)?;
    Some(u64::from_ne_bytes(b.try_into().ok()?))
}

fn fact(r: &InetResponse, netns: u64) -> SockFact {
    let h = &r.header;
    let id = &h.socket_id;
    let mut bytes_acked = 0;
    let mut bytes_received = 0;
    let mut has_info = false;
    for nla in &r.nlas {
        if let Nla::TcpInfo(info) = nla {
            has_info = true;
            bytes_acked =
                tcp_info_u64(info, std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked))
                    .unwrap_or(0);
            bytes_received = tcp_info_u64(
                info,
                std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received),
            )
            .unwrap_or(0);
        }
    }
    // `tcpi_bytes_acked` counts the SYN's sequence number too; the payload is one
    // less (a FIN, once acknowledged, adds one again: within one byte).
    let bytes_acked = bytes_acked.saturating_sub(1);
    SockFact {
        netns,
        cookie: u64::from_ne_bytes(id.cookie),
        state: TcpState::from_kernel(h.state),
        local: SocketAddr::new(unmap(id.source_address), id.source_port),
        remote: SocketAddr::new(unmap(id.destination_address), id.destination_port),
        uid: h.uid,
        inode: h.inode as u64,
        bytes_sent: bytes_acked,
        bytes_received,
        has_counters: has_info,
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as the IPv4 address they are.
fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

/// The real backend.
pub struct LinuxNet {
    all_namespaces: bool,
    own_ns: u64,
    handles: HashMap<u64, NsHandle>,
    /// Namespaces that could not be opened, and when to try again.
    failed: HashMap<u64, Instant>,
}

impl LinuxNet {
    /// Opens the agent's own namespace (which must work: without it there is no
    /// source); others are opened as processes are found in them.
    pub fn new(all_namespaces: bool) -> Result<Self, String> {
        let own_ns = procinfo::own_net_namespace().ok_or("/proc/self/ns/net is unreadable")?;
        let own = NsHandle::open().map_err(|e| format!("sock_diag socket: {e}"))?;
        Ok(LinuxNet {
            all_namespaces,
            own_ns,
            handles: HashMap::from([(own_ns, own)]),
            failed: HashMap::new(),
        })
    }

    /// Opens namespaces that appeared; closes those no process uses any more, after
    /// taking their last destroy notifications.
    fn refresh_namespaces(&mut self, snap: &mut Snapshot) {
        if !self.all_namespaces {
            return;
        }
        let live = procinfo::net_namespaces();
        let gone: Vec<u64> = self
            .handles
            .keys()
            .filter(|ns| **ns != self.own_ns && !live.contains_key(ns))
            .copied()
            .collect();
        for ns in gone {
            if let Some(mut h) = self.handles.remove(&ns) {
                if let Err(e) = h.drain(ns, &mut snap.destroyed) {
                    snap.destroy_overflows += 1;
                    snap.errors.push(format!("netns {ns}: {e}"));
                }
                tracing::info!(netns = ns, "network namespace gone");
            }
        }
        self.failed.retain(|ns, _| live.contains_key(ns));
        let now = Instant::now();
        for (ns, pid) in live {
            if self.handles.contains_key(&ns) || self.failed.get(&ns).is_some_and(|t| *t > now) {
                continue;
            }
            match NsHandle::open_in(pid) {
                Ok(h) => {
                    tracing::info!(netns = ns, pid, "watching network namespace");
                    self.handles.insert(ns, h);
                }
                Err(e) => {
                    snap.errors
                        .push(format!("network namespace {ns} (pid {pid}): {e}"));
                    self.failed.insert(ns, now + Duration::from_secs(60));
                }
            }
        }
    }
}

impl NetBackend for LinuxNet {
    fn snapshot(&mut self) -> Snapshot {
        let mut snap = Snapshot::default();
        self.refresh_namespaces(&mut snap);
        for (&ns, h) in self.handles.iter_mut() {
            // Drain first: a socket destroyed before the dump must not look like one
            // that vanished without its final counters.
            if let Err(e) = h.drain(ns, &mut snap.destroyed) {
                snap.destroy_overflows += 1;
                snap.errors.push(format!("netns {ns}: {e}"));
            }
            let mut sockets = Vec::new();
            let dumped = h
                .dump(AF_INET, ns, &mut sockets)
                .and_then(|()| h.dump(AF_INET6, ns, &mut sockets));
            match dumped {
                Ok(()) => {
                    snap.dumped.insert(ns);
                    snap.sockets.extend(sockets);
                }
                Err(e) => snap.errors.push(format!("netns {ns}: {e}")),
            }
            // And after: a socket destroyed during the dump is missing from it, and its
            // notification is its final count (the tracker waits a poll for any later).
            if let Err(e) = h.drain(ns, &mut snap.destroyed) {
                snap.destroy_overflows += 1;
                snap.errors.push(format!("netns {ns}: {e}"));
            }
        }
        snap
    }

    fn owners(&mut self, inodes: &HashSet<u64>, uids: Option<&HashSet<u32>>) -> HashMap<u64, u32> {
        procinfo::socket_owners(inodes, uids)
    }

    fn process(&mut self, pid: u32) -> Option<ProcessInfo> {
        procinfo::process(pid)
    }

    fn ancestors(&mut self, ppid: u32) -> Vec<ProcessRef> {
        procinfo::ancestors(ppid, 8)
    }

    fn open_files(&mut self, pid: u32, max: usize) -> Vec<PathBuf> {
        procinfo::open_files(pid, max)
    }
}
