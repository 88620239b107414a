//! Outgoing transfers: which process sent how many bytes to where, and which files it
//! had open; and transfer tools as they start.
//!
//! Two sources share this module:
//! - [`NetSource`] polls every TCP socket (netlink sock_diag, `tcp_info` counters) in
//!   every network namespace where TCP segments moved since the last poll (see
//!   [`linux`]), follows each connection this host opened, and reports
//!   `net.transfer` when one to a destination outside the allowlist crosses the report
//!   threshold or a policy rule's threshold, and again at its end. Sockets destroyed
//!   between two polls are caught from the kernel's destroy notifications with their
//!   final counters. The network guard decides on each connection and acts on the
//!   verdict (`crate::guard::net`), through the [`FlowJudge`] the source is given.
//! - [`tools::ToolsSource`] reports `net.transfer_tool` when scp, rsync, curl -T, nc …
//!   start (the kernel's process connector).
//!
//! The tracking logic ([`Tracker`]) is platform-free and unit-tested against a fake
//! [`NetBackend`]; [`linux::LinuxNet`] is exercised end to end in `tests/network.rs`.

#[cfg(target_os = "linux")]
pub mod linux;
pub mod tools;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::watch;
use weilan_config::event::{Event, NetOpenFile, NetTransfer, ProcessRef};
use weilan_config::policy::network::{
    FlowFacts, NetAction, NetVerdict, NetworkPolicy, Scope, NETWORK_DEFAULT,
};
use weilan_config::policy::Policy;

use super::{BoxFuture, EventSink, Source, SourceContext, SourceError};
use crate::classify::Classifier;
use crate::procinfo::ProcessInfo;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    Other(u8),
}

impl TcpState {
    pub fn from_kernel(s: u8) -> Self {
        match s {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            o => TcpState::Other(o),
        }
    }
}

/// One TCP socket as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockFact {
    /// Network namespace inode.
    pub netns: u64,
    /// The kernel's socket cookie: stable for the socket's life, unique per namespace.
    pub cookie: u64,
    pub state: TcpState,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub uid: u32,
    /// 0 once the socket has no file (closed by its process, still finishing).
    pub inode: u64,
    /// `tcpi_bytes_acked`: payload the peer acknowledged.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Whether `tcp_info` came with it (a time-wait socket has none).
    pub has_counters: bool,
}

/// One poll's view.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sockets: Vec<SockFact>,
    /// Sockets destroyed since the previous poll, with their final counters.
    pub destroyed: Vec<SockFact>,
    /// Namespaces whose dump completed: a tracked connection of such a namespace that
    /// is not in `sockets` has closed.
    pub dumped: HashSet<u64>,
    /// Problems worth reporting (a namespace that could not be opened, a failed dump).
    pub errors: Vec<String>,
    /// Times the destroy notifications overflowed (some short connections unseen).
    pub destroy_overflows: u64,
}

/// Platform access for [`NetSource`]. Blocking; called from the source's own thread.
pub trait NetBackend: Send {
    /// What changed since the last call. A backend may leave out namespaces where
    /// nothing happened (they are then not in `dumped`), but never those in
    /// `recheck`: the tracker waits there for a connection to be seen closed.
    fn snapshot(&mut self, recheck: &HashSet<u64>) -> Snapshot;
    /// Which pid holds each socket inode (searching processes of `uids` only, or all).
    fn owners(&mut self, inodes: &HashSet<u64>, uids: Option<&HashSet<u32>>) -> HashMap<u64, u32>;
    fn process(&mut self, pid: u32) -> Option<ProcessInfo>;
    fn ancestors(&mut self, ppid: u32) -> Vec<ProcessRef>;
    fn open_files(&mut self, pid: u32, max: usize) -> Vec<PathBuf>;
}

/// Owner lookups per connection: the first searches processes of the socket's uid,
/// the second all processes (a socket handed to another user's process), then the
/// connection stays unattributed rather than cost a full `/proc` scan every poll.
const OWNER_ATTEMPTS: u8 = 2;

/// Tracked connections beyond this are not followed (counted and reported).
const MAX_TRACKED: usize = 262_144;

/// A process as events name it.
#[derive(Debug)]
struct ProcCtx {
    info: ProcessInfo,
    parents: Vec<ProcessRef>,
}

/// One connection this host opened.
#[derive(Debug)]
struct Conn {
    fact: SockFact,
    first_seen: Instant,
    pid: Option<u32>,
    proc: Option<Arc<ProcCtx>>,
    /// Bytes already added to the process and destination histories.
    counted: u64,
    reported: bool,
    /// Connection-scope rules that fired.
    fired: HashSet<String>,
    /// The verdict the last event carried.
    last: Option<NetVerdict>,
    files: Option<Vec<NetOpenFile>>,
    /// Owner lookups that found nothing (at most `OWNER_ATTEMPTS`).
    owner_attempts: u8,
    closed: bool,
    /// Seen only in a destroy notification.
    transient: bool,
    /// Since when no dump has shown it and no destroy notification came (see
    /// `VANISHED_GRACE`).
    unseen_since: Option<Instant>,
    /// Something the policy reads changed since it was last judged: new, bytes,
    /// process found, closed.
    dirty: bool,
}

/// How long a connection may be missing from the dumps with no destroy notification
/// before it is closed with its last counters. The kernel sends the notification when
/// the socket is freed (from a work queue, after its last queued packet is gone), which
/// can be after it left the hash tables, so a dump can miss a socket whose notification
/// only comes at a later poll; closing it at once reported the bytes of the poll before
/// (a 3 MiB upload as 2.76 MB) and the late notification then looked like a second,
/// unattributed connection.
const VANISHED_GRACE: Duration = Duration::from_secs(1);

/// Every connection is judged again at least this often, changed or not (a rule's
/// hours, names the resolver learnt); in between only those that changed are.
const JUDGE_ALL_EVERY: Duration = Duration::from_secs(30);

/// How long a connection closed without its destroy notification is remembered, so a
/// notification arriving later still is not taken for a new connection.
const VANISHED_MEMORY: Duration = Duration::from_secs(30);

/// Bytes sent over time, one entry per poll that added some.
#[derive(Debug, Default)]
struct History(VecDeque<(Instant, u64)>);

impl History {
    fn add(&mut self, at: Instant, bytes: u64) {
        if bytes > 0 {
            self.0.push_back((at, bytes));
        }
    }
    fn within(&self, now: Instant, window: Duration) -> u64 {
        self.0
            .iter()
            .rev()
            .take_while(|(t, _)| now.duration_since(*t) <= window)
            .map(|(_, b)| b)
            .sum()
    }
    fn prune(&mut self, now: Instant, keep: Duration) {
        while self
            .0
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > keep)
        {
            self.0.pop_front();
        }
    }
}

/// An action the policy asked for, to be carried out off the poll thread.
#[derive(Debug, Clone, PartialEq)]
pub struct NetActionRequest {
    pub verdict: NetVerdict,
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub remote: SocketAddr,
    /// The connection's network namespace: a block must be installed there (a
    /// container's traffic never passes the host namespace's output hook).
    pub netns: u64,
}

/// Decides on the connections the source follows and acts on the verdicts
/// (`crate::guard::net::NetGuard`).
pub trait FlowJudge: Send + Sync {
    /// The verdict on one connection's facts, if a rule matches (pure).
    fn decide(&self, policy: &NetworkPolicy, facts: &FlowFacts<'_>) -> Option<NetVerdict>;
    /// Carries a verdict out off the poll thread and records its `net.enforced`.
    fn act(&self, request: NetActionRequest, sink: EventSink);
}

/// What one poll produced.
#[derive(Debug, Default)]
pub struct TickOutput {
    pub events: Vec<Event>,
    pub actions: Vec<NetActionRequest>,
}

/// Everything the tracker needs besides the backend.
pub struct TrackerContext<'a> {
    pub policy: &'a Policy,
    /// The policy is not the one of the last tick: every connection is judged again.
    pub policy_changed: bool,
    /// Decides on each connection (the network guard).
    pub judge: &'a dyn FlowJudge,
    pub classifier: &'a Classifier,
    /// Allowlisted host names by the addresses they resolved to.
    pub resolved: &'a HashMap<IpAddr, Vec<String>>,
    pub now: Instant,
    pub time: Timestamp,
}

/// Follows connections across polls and turns them into events and actions.
pub struct Tracker {
    conns: HashMap<(u64, u64), Conn>,
    procs: HashMap<u32, Arc<ProcCtx>>,
    process_bytes: HashMap<(u32, u64), History>,
    destination_bytes: HashMap<IpAddr, History>,
    /// Process- and destination-scope rules that fired: (rule, key) → when.
    fired: HashMap<(String, String), Instant>,
    /// Endpoints that are never reported (the collector).
    implicit_allow: Vec<SocketAddr>,
    own_pid: u32,
    max_open_files: usize,
    /// Connections closed without a destroy notification, by when (`VANISHED_MEMORY`).
    vanished: HashMap<(u64, u64), Instant>,
    /// Connections not followed because `MAX_TRACKED` was reached.
    pub untracked: u64,
    /// When every connection was last judged.
    judged_all: Option<Instant>,
}

impl Tracker {
    pub fn new(own_pid: u32, implicit_allow: Vec<SocketAddr>, max_open_files: usize) -> Self {
        Tracker {
            conns: HashMap::new(),
            procs: HashMap::new(),
            process_bytes: HashMap::new(),
            destination_bytes: HashMap::new(),
            fired: HashMap::new(),
            implicit_allow,
            own_pid,
            max_open_files,
            vanished: HashMap::new(),
            untracked: 0,
            judged_all: None,
        }
    }

    /// Connections currently followed.
    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// Namespaces that must be dumped at the next poll: those of connections missing
    /// from a dump and not yet known closed (`VANISHED_GRACE`).
    pub fn awaiting_close(&self) -> HashSet<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.closed && c.unseen_since.is_some())
            .map(|(k, _)| k.0)
            .collect()
    }

    pub fn set_implicit_allow(&mut self, endpoints: Vec<SocketAddr>) {
        self.implicit_allow = endpoints;
    }

    /// Takes one poll's snapshot and decides what to report and do.
    pub fn tick(
        &mut self,
        snap: Snapshot,
        backend: &mut dyn NetBackend,
        cx: &TrackerContext<'_>,
    ) -> TickOutput {
        let now = cx.now;
        // Inbound connections (accepted on a listening port) are another host's
        // transfer to this one: not followed.
        let listening: HashSet<(u64, u16)> = snap
            .sockets
            .iter()
            .filter(|s| s.state == TcpState::Listen)
            .map(|s| (s.netns, s.local.port()))
            .collect();
        let outbound = |s: &SockFact| {
            !matches!(
                s.state,
                TcpState::Listen | TcpState::TimeWait | TcpState::Close | TcpState::SynRecv
            ) && s.remote.port() != 0
                && !listening.contains(&(s.netns, s.local.port()))
        };
        let mut present = HashSet::new();
        for s in snap.sockets.into_iter().filter(|s| outbound(s)) {
            let key = (s.netns, s.cookie);
            present.insert(key);
            self.observe(key, s, now, false);
        }
        for s in snap.destroyed {
            let key = (s.netns, s.cookie);
            if let Some(c) = self.conns.get_mut(&key) {
                if s.has_counters {
                    c.fact.bytes_sent = c.fact.bytes_sent.max(s.bytes_sent);
                    c.fact.bytes_received = c.fact.bytes_received.max(s.bytes_received);
                }
                c.closed = true;
                c.dirty = true;
            } else if self.vanished.contains_key(&key) {
                tracing::debug!(
                    cookie = s.cookie,
                    "late destroy notification of a closed connection"
                );
            } else if s.has_counters
                && s.remote.port() != 0
                && !listening.contains(&(s.netns, s.local.port()))
            {
                // Opened and closed between two polls (its state is now `Close`).
                self.observe(key, s, now, true);
            }
        }
        for (key, c) in self.conns.iter_mut() {
            if c.closed || !snap.dumped.contains(&key.0) {
                continue;
            }
            if present.contains(key) {
                c.unseen_since = None;
                continue;
            }
            let since = *c.unseen_since.get_or_insert(now);
            if now.duration_since(since) >= VANISHED_GRACE {
                c.closed = true;
                c.dirty = true;
                self.vanished.insert(*key, now);
            }
        }
        self.attribute(backend);

        // Histories first, so every rule sees this poll's bytes.
        for c in self.conns.values_mut() {
            let delta = c.fact.bytes_sent.saturating_sub(c.counted);
            if delta == 0 {
                continue;
            }
            c.counted = c.fact.bytes_sent;
            if let Some(p) = &c.proc {
                self.process_bytes
                    .entry((p.info.pid, p.info.start_ticks))
                    .or_default()
                    .add(now, delta);
            }
            self.destination_bytes
                .entry(c.fact.remote.ip())
                .or_default()
                .add(now, delta);
        }

        let mut out = TickOutput::default();
        let all = cx.policy_changed
            || self
                .judged_all
                .is_none_or(|at| now.duration_since(at) >= JUDGE_ALL_EVERY);
        if all {
            self.judged_all = Some(now);
        }
        let keys: Vec<(u64, u64)> = self
            .conns
            .iter()
            .filter(|(_, c)| all || c.dirty)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.evaluate(key, backend, cx, &mut out);
            if let Some(c) = self.conns.get_mut(&key) {
                c.dirty = false;
            }
        }
        self.conns.retain(|_, c| !c.closed);
        self.prune(cx);
        out
    }

    fn observe(&mut self, key: (u64, u64), s: SockFact, now: Instant, transient: bool) {
        if let Some(c) = self.conns.get_mut(&key) {
            if s.has_counters {
                c.dirty |= s.bytes_sent > c.fact.bytes_sent;
                c.fact.bytes_sent = c.fact.bytes_sent.max(s.bytes_sent);
                c.fact.bytes_received = c.fact.bytes_received.max(s.bytes_received);
            }
            c.dirty |= c.fact.state != s.state;
            c.fact.state = s.state;
            if s.inode != 0 {
                c.fact.inode = s.inode;
            }
            c.unseen_since = None;
            return;
        }
        if self.conns.len() >= MAX_TRACKED {
            self.untracked += 1;
            return;
        }
        self.conns.insert(
            key,
            Conn {
                fact: s,
                first_seen: now,
                pid: None,
                proc: None,
                counted: 0,
                reported: false,
                fired: HashSet::new(),
                last: None,
                files: None,
                owner_attempts: 0,
                closed: transient,
                transient,
                unseen_since: None,
                dirty: true,
            },
        );
    }

    /// Finds the process of every connection that has none yet (one `/proc` scan).
    fn attribute(&mut self, backend: &mut dyn NetBackend) {
        let pending: Vec<(u64, u32, u8)> = self
            .conns
            .values()
            .filter(|c| c.pid.is_none() && c.fact.inode != 0 && c.owner_attempts < OWNER_ATTEMPTS)
            .map(|c| (c.fact.inode, c.fact.uid, c.owner_attempts))
            .collect();
        if pending.is_empty() {
            return;
        }
        let inodes: HashSet<u64> = pending.iter().map(|(i, _, _)| *i).collect();
        let uids: HashSet<u32> = pending.iter().map(|(_, u, _)| *u).collect();
        let widen = pending.iter().any(|(_, _, attempts)| *attempts > 0);
        let owners = backend.owners(&inodes, (!widen).then_some(&uids));
        for c in self.conns.values_mut() {
            if c.pid.is_some() || c.fact.inode == 0 || c.owner_attempts >= OWNER_ATTEMPTS {
                continue;
            }
            let Some(&pid) = owners.get(&c.fact.inode) else {
                c.owner_attempts += 1;
                continue;
            };
            c.pid = Some(pid);
            c.dirty = true;
            let cached = self.procs.get(&pid).cloned();
            let ctx = match cached {
                Some(p) => Some(p),
                None => backend.process(pid).map(|info| {
                    let parents = backend.ancestors(info.ppid);
                    let p = Arc::new(ProcCtx { info, parents });
                    self.procs.insert(pid, p.clone());
                    p
                }),
            };
            c.proc = ctx;
        }
    }

    fn evaluate(
        &mut self,
        key: (u64, u64),
        backend: &mut dyn NetBackend,
        cx: &TrackerContext<'_>,
        out: &mut TickOutput,
    ) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        if c.pid == Some(self.own_pid) {
            return;
        }
        let net = &cx.policy.network;
        let remote = c.fact.remote;
        let implicit = self.implicit_allow.contains(&remote);
        let allow = if implicit {
            None
        } else {
            net.allow_match(remote.ip(), remote.port(), cx.resolved)
        };
        let allowlisted = implicit || allow.is_some();
        let proc_key = c.proc.as_ref().map(|p| (p.info.pid, p.info.start_ticks));
        let process_hist = proc_key.and_then(|k| self.process_bytes.get(&k));
        let dest_hist = self.destination_bytes.get(&remote.ip());
        let per_process = |w: Duration| process_hist.map_or(0, |h| h.within(cx.now, w));
        let per_destination = |w: Duration| dest_hist.map_or(0, |h| h.within(cx.now, w));
        let facts = FlowFacts {
            exe: c.proc.as_ref().and_then(|p| p.info.exe.as_deref()),
            user: c.proc.as_ref().and_then(|p| p.info.user.as_deref()),
            remote: remote.ip(),
            remote_port: remote.port(),
            allowlisted,
            connection_bytes: c.fact.bytes_sent,
            process_bytes: &per_process,
            destination_bytes: &per_destination,
            now: cx.time,
        };
        let verdict = if implicit {
            None
        } else {
            cx.judge.decide(net, &facts)
        };
        // A rule fires once per connection, or once per process / destination within
        // its window: remembered on the connection, or under a shared key.
        let shared_key = |v: &NetVerdict| match v.per {
            Scope::Connection => Some(None),
            Scope::Process => proc_key.map(|(p, s)| Some((v.rule_id.clone(), format!("p{p}:{s}")))),
            Scope::Destination => Some(Some((v.rule_id.clone(), format!("d{}", remote.ip())))),
        };
        let fresh = verdict.and_then(|v| match shared_key(&v)? {
            None => (!c.fired.contains(&v.rule_id)).then_some((v, None)),
            Some(k) => (!self.fired.contains_key(&k)).then_some((v, Some(k))),
        });
        let crossed = !allowlisted && !c.reported && c.fact.bytes_sent >= net.report_bytes;
        let closing_report = c.closed && (c.reported || crossed || fresh.is_some());
        if fresh.is_none() && !crossed && !closing_report {
            return;
        }
        let fresh = fresh.map(|(v, shared)| {
            if let Some(k) = shared {
                self.fired.insert(k, cx.now);
            }
            v
        });
        let max_files = self.max_open_files;
        let c = self.conns.get_mut(&key).expect("looked up above");
        if let Some(v) = &fresh {
            c.fired.insert(v.rule_id.clone());
            c.last = Some(v.clone());
        }
        let verdict = c.last.clone().unwrap_or(NetVerdict {
            action: NetAction::Audit,
            rule_id: NETWORK_DEFAULT.into(),
            block: Duration::ZERO,
            per: Scope::Connection,
        });
        if c.files.is_none() {
            c.files = Some(sensitive_files(backend, c, cx, max_files));
        }
        c.reported = true;
        let phase = if c.closed { "closed" } else { "threshold" };
        out.events.push(Event::NetTransfer(transfer_event(
            c,
            phase,
            &verdict,
            allowlisted,
            allow.and_then(|a| a.host.or(Some(a.name))),
            cx.now,
        )));
        if let Some(v) = fresh.filter(|v| v.action != NetAction::Audit) {
            out.actions.push(NetActionRequest {
                verdict: v,
                pid: c.pid,
                exe: c.proc.as_ref().and_then(|p| p.info.exe.clone()),
                remote,
                netns: c.fact.netns,
            });
        }
    }

    fn prune(&mut self, cx: &TrackerContext<'_>) {
        let keep = cx.policy.network.longest_window();
        for h in self.process_bytes.values_mut() {
            h.prune(cx.now, keep);
        }
        for h in self.destination_bytes.values_mut() {
            h.prune(cx.now, keep);
        }
        self.process_bytes.retain(|_, h| !h.0.is_empty());
        self.destination_bytes.retain(|_, h| !h.0.is_empty());
        let rules = &cx.policy.network.rules;
        self.fired.retain(|(rule, _), at| {
            rules
                .iter()
                .find(|r| r.id == *rule)
                .is_some_and(|r| cx.now.duration_since(*at) <= r.window)
        });
        self.vanished
            .retain(|_, at| cx.now.duration_since(*at) <= VANISHED_MEMORY);
        let live: HashSet<u32> = self.conns.values().filter_map(|c| c.pid).collect();
        self.procs.retain(|pid, _| live.contains(pid));
    }
}

/// Files the process (or an ancestor: `scp` reads, its `ssh` sends) has open that lie in
/// a sensitive source or are classified.
fn sensitive_files(
    backend: &mut dyn NetBackend,
    c: &Conn,
    cx: &TrackerContext<'_>,
    max: usize,
) -> Vec<NetOpenFile> {
    let Some(p) = &c.proc else { return Vec::new() };
    let files_policy = &cx.policy.files;
    let mut pids = vec![p.info.pid];
    pids.extend(p.parents.iter().take(3).map(|a| a.pid));
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    // Classifying is bounded per event: each file by the classifier's limits, and at
    // most this many files.
    let mut classify_budget = 16;
    for pid in pids {
        for path in backend.open_files(pid, max) {
            if !seen.insert(path.clone()) {
                continue;
            }
            let source = files_policy
                .sensitive_sources
                .iter()
                .find(|s| path.starts_with(s))
                .map(|s| s.display().to_string());
            let mut classification = Vec::new();
            if classify_budget > 0 {
                if let Ok(f) = std::fs::File::open(&path) {
                    classify_budget -= 1;
                    let (found, _) = cx.classifier.classify_file(f);
                    let counts = crate::classify::counts(&found);
                    let hits: HashSet<&str> =
                        files_policy.classified(&counts).into_iter().collect();
                    classification = found
                        .iter()
                        .filter(|f| hits.contains(f.detector.as_str()))
                        .cloned()
                        .collect();
                }
            }
            if source.is_some() || !classification.is_empty() {
                out.push(NetOpenFile {
                    path: path.display().to_string(),
                    source,
                    classification,
                });
            }
        }
    }
    out
}

fn transfer_event(
    c: &Conn,
    phase: &str,
    v: &NetVerdict,
    allowlisted: bool,
    remote_host: Option<String>,
    now: Instant,
) -> NetTransfer {
    let info = c.proc.as_ref().map(|p| &p.info);
    NetTransfer {
        pid: c.pid,
        exe: info.and_then(|i| i.exe.clone()),
        cmdline: info.and_then(|i| i.cmdline.clone()),
        uid: Some(c.fact.uid),
        user: info
            .and_then(|i| i.user.clone())
            .or_else(|| crate::procinfo::user_name(c.fact.uid)),
        parents: c
            .proc
            .as_ref()
            .map(|p| p.parents.clone())
            .unwrap_or_default(),
        protocol: "tcp".into(),
        local_addr: c.fact.local.ip().to_string(),
        local_port: c.fact.local.port(),
        remote_addr: c.fact.remote.ip().to_string(),
        remote_port: c.fact.remote.port(),
        remote_host,
        bytes_sent: c.fact.bytes_sent,
        bytes_received: c.fact.bytes_received,
        duration_ms: if c.transient {
            0
        } else {
            now.duration_since(c.first_seen).as_millis() as u64
        },
        phase: phase.into(),
        allowlisted,
        netns: Some(c.fact.netns),
        sensitive_files: c.files.clone().unwrap_or_default(),
        action: v.action.as_str().into(),
        rule_id: v.rule_id.clone(),
    }
}

// ---------------------------------------------------------------- the source

/// Settings of [`NetSource`].
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub poll: Duration,
    pub max_open_files: usize,
    /// The collector's host and port: its connection is never reported or acted on.
    pub collector: (String, u16),
}

/// Makes a backend for one run of the source.
pub type BackendFactory = Box<dyn Fn() -> Result<Box<dyn NetBackend>, String> + Send + Sync>;

pub struct NetSource {
    config: NetConfig,
    backend: Arc<BackendFactory>,
    judge: Arc<dyn FlowJudge>,
    policy: watch::Receiver<Arc<Policy>>,
}

impl NetSource {
    pub fn new(
        config: NetConfig,
        backend: BackendFactory,
        judge: Arc<dyn FlowJudge>,
        policy: watch::Receiver<Arc<Policy>>,
    ) -> Self {
        NetSource {
            config,
            backend: Arc::new(backend),
            judge,
            policy,
        }
    }
}

impl Source for NetSource {
    fn name(&self) -> &'static str {
        "network"
    }

    fn run<'a>(&'a mut self, ctx: &'a SourceContext) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let config = self.config.clone();
            let factory = self.backend.clone();
            let judge = self.judge.clone();
            let policy = self.policy.clone();
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || poll_loop(config, &factory, judge, policy, ctx))
                .await
                .map_err(|e| SourceError::Other(format!("network poller: {e}")))?
        })
    }
}

/// Allowlisted host names by address, shared with the resolver thread.
type ResolvedNames = Arc<Mutex<HashMap<IpAddr, Vec<String>>>>;

/// Resolves the allowlist's host names (and the collector's) every
/// `resolve_every`, off the poll thread: a slow resolver must not stall polling.
fn spawn_resolver(
    policy: watch::Receiver<Arc<Policy>>,
    collector: (String, u16),
    shutdown: tokio_util::sync::CancellationToken,
) -> (ResolvedNames, Arc<Mutex<Vec<SocketAddr>>>) {
    let names: ResolvedNames = Default::default();
    let collector_addrs: Arc<Mutex<Vec<SocketAddr>>> = Default::default();
    let (n, ca) = (names.clone(), collector_addrs.clone());
    let runtime = tokio::runtime::Handle::try_current().ok();
    let _ = std::thread::Builder::new()
        .name("weilan-resolve".into())
        .spawn(move || {
            // In the runtime, its sleeps last until the next round or shutdown.
            let _in_runtime = runtime.as_ref().map(|r| r.enter());
            while !shutdown.is_cancelled() {
                let p = policy.borrow().clone();
                let mut map: HashMap<IpAddr, Vec<String>> = HashMap::new();
                for host in p.network.hosts() {
                    match (host.as_str(), 0).to_socket_addrs() {
                        Ok(addrs) => {
                            for a in addrs {
                                map.entry(a.ip()).or_default().push(host.clone());
                            }
                        }
                        Err(e) => tracing::warn!(host = %host, error = %e, "allowlisted host did not resolve"),
                    }
                }
                *n.lock().unwrap_or_else(|e| e.into_inner()) = map;
                if let Ok(addrs) = (collector.0.as_str(), collector.1).to_socket_addrs() {
                    *ca.lock().unwrap_or_else(|e| e.into_inner()) = addrs.collect();
                }
                crate::source::sleep_unless_cancelled(&shutdown, p.network.resolve_every);
            }
        });
    (names, collector_addrs)
}

fn poll_loop(
    config: NetConfig,
    factory: &BackendFactory,
    judge: Arc<dyn FlowJudge>,
    policy: watch::Receiver<Arc<Policy>>,
    ctx: SourceContext,
) -> Result<(), SourceError> {
    let mut backend = factory().map_err(SourceError::Other)?;
    // The resolver ends with this run (a restarted source starts its own).
    let run = ctx.shutdown.child_token();
    let _end_resolver = run.clone().drop_guard();
    let (resolved, collector_addrs) = spawn_resolver(policy.clone(), config.collector.clone(), run);
    let mut tracker = Tracker::new(std::process::id(), Vec::new(), config.max_open_files);
    let mut classifier_for: Option<Arc<Policy>> = None;
    let mut classifier = Classifier::default();
    let mut reported_errors: HashMap<String, Instant> = HashMap::new();
    let mut reported_untracked = 0;
    let mut next = Instant::now();
    loop {
        if !crate::source::sleep_unless_cancelled(
            &ctx.shutdown,
            next.saturating_duration_since(Instant::now()),
        ) {
            return Ok(());
        }
        next += config.poll;
        if next < Instant::now() {
            next = Instant::now() + config.poll;
        }
        let p = policy.borrow().clone();
        let policy_changed = classifier_for.as_ref().is_none_or(|c| !Arc::ptr_eq(c, &p));
        if policy_changed {
            classifier = Classifier::from_policy(&p.files, Default::default());
            classifier_for = Some(p.clone());
        }
        tracker.set_implicit_allow(
            collector_addrs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        );
        let snap = backend.snapshot(&tracker.awaiting_close());
        let mut problems = snap.errors.clone();
        if tracker.untracked > reported_untracked {
            problems.push(format!(
                "{} connections not followed: more than {MAX_TRACKED} open at once",
                tracker.untracked
            ));
            reported_untracked = tracker.untracked;
        }
        for e in problems {
            // The same problem is reported at most every 10 minutes.
            let key: String = e.chars().filter(|c| !c.is_ascii_digit()).collect();
            if reported_errors
                .get(&key)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(600))
            {
                continue;
            }
            reported_errors.insert(key, Instant::now());
            ctx.sink.report_blocking("network", e, 0)?;
        }
        let names = resolved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let out = tracker.tick(
            snap,
            backend.as_mut(),
            &TrackerContext {
                policy: &p,
                policy_changed,
                judge: judge.as_ref(),
                classifier: &classifier,
                resolved: &names,
                now: Instant::now(),
                time: Timestamp::now(),
            },
        );
        for e in out.events {
            ctx.sink.emit_blocking(e)?;
        }
        for a in out.actions {
            judge.act(a, ctx.sink.clone());
        }
    }
}
