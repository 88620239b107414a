//! The Linux network backend: netlink sock_diag dumps (TCP over IPv4 and IPv6, with
//! `tcp_info` byte counters) and the kernel's socket-destroy notifications, in every
//! network namespace a process on this host uses (and every one `ip netns` names);
//! owners and open files from `/proc`.
//!
//! A sock_diag socket answers for the namespace it was created in, so the agent opens
//! one pair per namespace from a short-lived thread that entered it (`setns` affects the
//! calling thread only). Pairs of namespaces no process uses any more are closed, or
//! the agent would keep them alive.
//!
//! A dump walks the kernel's whole TCP hash table (262 144 buckets here, shared by every
//! namespace) whatever few sockets a namespace has: ~1.3 ms per family. So a namespace
//! is dumped only when something in it changed: the packet counters of its interfaces
//! (`/proc/net/dev`, one `pread` of a file kept open: ~5 µs, against ~12 µs for
//! `/proc/net/snmp`'s TCP counters) moved, a socket of it was destroyed, or the tracker
//! asked (a connection it waits to see close); and at least every `reconcile` whatever
//! happened. No TCP byte leaves or is acknowledged without a packet through one of the
//! namespace's interfaces (loopback included), so a namespace whose counters stand
//! still has nothing new to count. Namespaces are looked for every `DISCOVER_EVERY`,
//! not every poll.
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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

/// How often namespaces that appeared or went are looked for (a `/proc` walk).
const DISCOVER_EVERY: Duration = Duration::from_secs(2);

/// A namespace's packet counters: received and sent, over all its interfaces.
type Activity = (u64, u64);

/// One namespace's sockets: a dump socket and a destroy listener; and its counters.
struct NsHandle {
    dump: Socket,
    destroy: Socket,
    seq: u32,
    /// The namespace's `/proc/net/dev`, opened from inside it (the file stays bound
    /// to the namespace it was opened in). `None` if it could not be opened: then the
    /// namespace is dumped every poll, as before change detection.
    counters: Option<std::fs::File>,
    /// When the last dump was, and the counters read just before it.
    last_dump: Option<(Instant, Option<Activity>)>,
}

impl NsHandle {
    /// Opens both sockets, and the counters, in the calling thread's namespace.
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
            counters: std::fs::File::open("/proc/thread-self/net/dev").ok(),
            last_dump: None,
        })
    }

    /// Opens the pair inside the network namespace `ns_file` (`/proc/PID/ns/net`, or
    /// a name under `/run/netns`) refers to.
    fn open_in(ns_file: &Path) -> Result<Self, String> {
        let ns = std::fs::File::open(ns_file).map_err(|e| format!("{}: {e}", ns_file.display()))?;
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

    /// The namespace's packet counters now, if they can be read.
    fn activity(&self) -> Option<Activity> {
        // Room for ~100 interfaces; a namespace with more is dumped every poll.
        let mut buf = [0u8; 16384];
        let n = self.counters.as_ref()?.read_at(&mut buf, 0).ok()?;
        if n == buf.len() {
            return None;
        }
        packets(std::str::from_utf8(&buf[..n]).ok()?)
    }

    /// Whether the namespace must be dumped: never dumped, due for reconciliation,
    /// counters unreadable or moved since the last dump.
    fn changed(&self, now: Instant, reconcile: Duration, activity: Option<Activity>) -> bool {
        match self.last_dump {
            None => true,
            Some((at, before)) => {
                now.duration_since(at) >= reconcile || activity.is_none() || before != activity
            }
        }
    }

    /// Every TCP socket of one address family.
    fn dump(
        &mut self,
        rx: &mut [u8],
        family: u8,
        netns: u64,
        out: &mut Vec<SockFact>,
    ) -> Result<(), String> {
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
    fn drain(&mut self, rx: &mut [u8], netns: u64, out: &mut Vec<SockFact>) -> Result<(), String> {
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

/// Packets received and sent over every interface, from the text of `/proc/net/dev`
/// (two header lines, then `name: rx_bytes rx_packets … (8 receive fields) tx_bytes
/// tx_packets …`).
fn packets(dev: &str) -> Option<Activity> {
    let mut total = (0u64, 0u64);
    for line in dev.lines().skip(2) {
        let (_, fields) = line.split_once(':')?;
        let f: Vec<&str> = fields.split_whitespace().collect();
        total.0 = total.0.wrapping_add(f.get(1)?.parse().ok()?);
        total.1 = total.1.wrapping_add(f.get(9)?.parse().ok()?);
    }
    Some(total)
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
    /// Every namespace is dumped at least this often.
    reconcile: Duration,
    /// When namespaces were last looked for.
    discovered: Option<Instant>,
    /// Receive buffer, shared by every namespace: a dump answers in datagrams of up
    /// to ~32 KiB, a drain in as many notifications as fit.
    rx: Vec<u8>,
}

impl LinuxNet {
    /// Opens the agent's own namespace (which must work: without it there is no
    /// source); others are opened as processes are found in them.
    pub fn new(all_namespaces: bool, reconcile: Duration) -> Result<Self, String> {
        let own_ns = procinfo::own_net_namespace().ok_or("/proc/self/ns/net is unreadable")?;
        let own = NsHandle::open().map_err(|e| format!("sock_diag socket: {e}"))?;
        Ok(LinuxNet {
            all_namespaces,
            own_ns,
            handles: HashMap::from([(own_ns, own)]),
            failed: HashMap::new(),
            reconcile,
            discovered: None,
            rx: vec![0u8; 256 << 10],
        })
    }

    /// Opens namespaces that appeared; closes those no process uses any more, after
    /// taking their last destroy notifications.
    fn refresh_namespaces(&mut self, snap: &mut Snapshot) {
        if !self.all_namespaces {
            return;
        }
        let now = Instant::now();
        if self
            .discovered
            .is_some_and(|t| now.duration_since(t) < DISCOVER_EVERY)
        {
            return;
        }
        self.discovered = Some(now);
        let live = procinfo::net_namespaces();
        let gone: Vec<u64> = self
            .handles
            .keys()
            .filter(|ns| **ns != self.own_ns && !live.contains_key(ns))
            .copied()
            .collect();
        for ns in gone {
            if let Some(mut h) = self.handles.remove(&ns) {
                if let Err(e) = h.drain(&mut self.rx, ns, &mut snap.destroyed) {
                    snap.destroy_overflows += 1;
                    snap.errors.push(format!("netns {ns}: {e}"));
                }
                tracing::info!(netns = ns, "network namespace gone");
            }
        }
        self.failed.retain(|ns, _| live.contains_key(ns));
        for (ns, file) in live {
            if self.handles.contains_key(&ns) || self.failed.get(&ns).is_some_and(|t| *t > now) {
                continue;
            }
            match NsHandle::open_in(&file) {
                Ok(h) => {
                    tracing::info!(netns = ns, file = %file.display(), "watching network namespace");
                    self.handles.insert(ns, h);
                }
                Err(e) => {
                    snap.errors
                        .push(format!("network namespace {ns} ({}): {e}", file.display()));
                    self.failed.insert(ns, now + Duration::from_secs(60));
                }
            }
        }
    }
}

impl NetBackend for LinuxNet {
    fn snapshot(&mut self, recheck: &HashSet<u64>) -> Snapshot {
        let mut snap = Snapshot::default();
        self.refresh_namespaces(&mut snap);
        let now = Instant::now();
        let rx = &mut self.rx;
        for (&ns, h) in self.handles.iter_mut() {
            // Drain first: a socket destroyed before the dump must not look like one
            // that vanished without its final counters.
            let before = snap.destroyed.len();
            if let Err(e) = h.drain(rx, ns, &mut snap.destroyed) {
                snap.destroy_overflows += 1;
                snap.errors.push(format!("netns {ns}: {e}"));
            }
            // Read before the dump: anything after it moves them again, and the next
            // poll dumps again.
            let activity = h.activity();
            let closed_some = snap.destroyed.len() > before;
            if !(closed_some || recheck.contains(&ns) || h.changed(now, self.reconcile, activity)) {
                continue;
            }
            let mut sockets = Vec::new();
            let dumped = h
                .dump(rx, AF_INET, ns, &mut sockets)
                .and_then(|()| h.dump(rx, AF_INET6, ns, &mut sockets));
            match dumped {
                Ok(()) => {
                    h.last_dump = Some((now, activity));
                    snap.dumped.insert(ns);
                    snap.sockets.extend(sockets);
                }
                Err(e) => snap.errors.push(format!("netns {ns}: {e}")),
            }
            // And after: a socket destroyed during the dump is missing from it, and its
            // notification is its final count (the tracker waits a poll for any later).
            if let Err(e) = h.drain(rx, ns, &mut snap.destroyed) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_counters_are_summed_over_interfaces() {
        let dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  123456     789    0    0    0     0          0         0   123456     789    0    0    0     0       0          0
  eth0: 9999999   10001    0    0    0     0          0         0  5555555    2002    0    0    0     0       0          0
";
        assert_eq!(packets(dev), Some((789 + 10001, 789 + 2002)));
        // A line that does not parse makes the counters unknown (the namespace is
        // then dumped), never zero.
        assert_eq!(packets("h\nh\n  lo: 1 2 3\n"), None);
    }

    /// The real kernel: a fresh network namespace is dumped at the first poll, not
    /// again while nothing moves, again once a connection sends, and whenever the
    /// tracker asks.
    #[test]
    fn a_namespace_is_dumped_only_when_its_packets_move() {
        let outcome = std::thread::spawn(|| {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return None;
            }
            // Loopback up, from this thread's namespace (a child inherits it).
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            if !up.is_ok_and(|s| s.success()) {
                return None;
            }
            let mut net = LinuxNet::new(false, Duration::from_secs(3600)).unwrap();
            let none = HashSet::new();
            let mut dumps = vec![!net.snapshot(&none).dumped.is_empty()];
            dumps.push(!net.snapshot(&none).dumped.is_empty());
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (_server, _) = listener.accept().unwrap();
            std::io::Write::write_all(&mut client, &[1u8; 4096]).unwrap();
            let moved = net.snapshot(&none);
            dumps.push(!moved.dumped.is_empty());
            let seen = moved
                .sockets
                .iter()
                .any(|s| s.local == client.local_addr().unwrap() && s.bytes_sent > 0);
            // Quiet again once the last ACKs are in.
            let quiet = (0..50).any(|_| {
                std::thread::sleep(Duration::from_millis(100));
                net.snapshot(&none).dumped.is_empty()
            });
            let own = net.own_ns;
            let asked = !net.snapshot(&HashSet::from([own])).dumped.is_empty();
            Some((dumps, seen, quiet, asked))
        })
        .join()
        .unwrap();
        let Some((dumps, seen, quiet, asked)) = outcome else {
            eprintln!("SKIPPED: cannot create a network namespace here (needs root)");
            return;
        };
        assert_eq!(
            dumps,
            [true, false, true],
            "first poll, quiet poll, after sending"
        );
        assert!(
            seen,
            "the dump after sending shows the connection with its bytes"
        );
        assert!(quiet, "no dump once nothing moves");
        assert!(asked, "a namespace the tracker asks for is dumped");
    }
}
