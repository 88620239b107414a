//! Tracker logic against a fake backend, and the Linux backend against the kernel.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use weilan_config::event::{Event, NetTransfer, ProcessRef};
use weilan_config::policy::network::NetAction;
use weilan_config::policy::Policy;

use super::*;
use crate::procinfo::ProcessInfo;

const NS: u64 = 4026531840;

#[derive(Default)]
struct FakeNet {
    next: Snapshot,
    owners: HashMap<u64, u32>,
    procs: HashMap<u32, ProcessInfo>,
    files: HashMap<u32, Vec<PathBuf>>,
    owner_calls: usize,
}

impl NetBackend for FakeNet {
    fn snapshot(&mut self, _recheck: &HashSet<u64>) -> Snapshot {
        std::mem::take(&mut self.next)
    }
    fn owners(&mut self, inodes: &HashSet<u64>, _uids: Option<&HashSet<u32>>) -> HashMap<u64, u32> {
        self.owner_calls += 1;
        self.owners
            .iter()
            .filter(|(i, _)| inodes.contains(i))
            .map(|(i, p)| (*i, *p))
            .collect()
    }
    fn process(&mut self, pid: u32) -> Option<ProcessInfo> {
        self.procs.get(&pid).cloned()
    }
    fn ancestors(&mut self, ppid: u32) -> Vec<ProcessRef> {
        self.procs
            .get(&ppid)
            .map(|p| {
                vec![ProcessRef {
                    pid: p.pid,
                    exe: p.exe.clone(),
                    cmdline: p.cmdline.clone(),
                }]
            })
            .unwrap_or_default()
    }
    fn open_files(&mut self, pid: u32, _max: usize) -> Vec<PathBuf> {
        self.files.get(&pid).cloned().unwrap_or_default()
    }
}

fn proc_info(pid: u32, ppid: u32, exe: &str) -> ProcessInfo {
    ProcessInfo {
        pid,
        exe: Some(exe.into()),
        cmdline: Some(exe.rsplit('/').next().unwrap().into()),
        uid: Some(1000),
        user: Some("alice".into()),
        ppid,
        start_ticks: 100 + pid as u64,
    }
}

fn sock(cookie: u64, local: &str, remote: &str, state: u8, sent: u64) -> SockFact {
    SockFact {
        netns: NS,
        cookie,
        state: TcpState::from_kernel(state),
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        uid: 1000,
        inode: cookie + 9000,
        bytes_sent: sent,
        bytes_received: 10,
        has_counters: true,
    }
}

fn policy(extra: &str) -> Policy {
    weilan_config::policy::parse(
        &format!("version = \"t1\"\n[network]\nreport_bytes = 1000\n{extra}"),
        "policy.toml",
    )
    .unwrap()
}

struct Harness {
    tracker: Tracker,
    net: FakeNet,
    policy: Policy,
    classifier: Classifier,
    resolved: HashMap<std::net::IpAddr, Vec<String>>,
    start: Instant,
    /// Decides as the guard does; what it is asked to act on is in `TickOutput`.
    judge: PolicyOnly,
}

/// The guard's decision (the pure policy), no hands: the tracker's actions are
/// read from its output.
/// The policy's verdicts, counted.
#[derive(Default)]
struct PolicyOnly(std::sync::atomic::AtomicUsize);

impl FlowJudge for PolicyOnly {
    fn decide(
        &self,
        policy: &weilan_config::policy::network::NetworkPolicy,
        facts: &weilan_config::policy::network::FlowFacts<'_>,
    ) -> Option<weilan_config::policy::network::NetVerdict> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        policy.decide(facts)
    }
    fn act(&self, request: NetActionRequest, _sink: EventSink) {
        panic!("the tracker acts only through its output: {request:?}")
    }
}

impl Harness {
    fn new(policy: Policy) -> Self {
        let mut net = FakeNet::default();
        net.procs.insert(50, proc_info(50, 1, "/usr/bin/bash"));
        net.procs.insert(60, proc_info(60, 50, "/usr/bin/scp"));
        net.procs.insert(61, proc_info(61, 60, "/usr/bin/ssh"));
        net.procs
            .insert(70, proc_info(70, 50, "/usr/bin/nc.openbsd"));
        Harness {
            tracker: Tracker::new(4242, Vec::new(), 64),
            net,
            policy,
            classifier: Classifier::default(),
            resolved: HashMap::new(),
            start: Instant::now(),
            judge: PolicyOnly::default(),
        }
    }

    /// One poll at `secs` after start, seeing `sockets` and `destroyed`.
    fn poll(&mut self, secs: u64, sockets: Vec<SockFact>, destroyed: Vec<SockFact>) -> TickOutput {
        self.net.next = Snapshot {
            sockets,
            destroyed,
            dumped: HashSet::from([NS]),
            ..Default::default()
        };
        let cx = TrackerContext {
            policy: &self.policy,
            policy_changed: false,
            judge: &self.judge,
            classifier: &self.classifier,
            resolved: &self.resolved,
            now: self.start + Duration::from_secs(secs),
            time: jiff::Timestamp::now(),
        };
        self.tracker
            .tick(std::mem::take(&mut self.net.next), &mut self.net, &cx)
    }
}

fn transfers(out: &TickOutput) -> Vec<&NetTransfer> {
    out.events
        .iter()
        .filter_map(|e| match e {
            Event::NetTransfer(t) => Some(t),
            _ => None,
        })
        .collect()
}

#[test]
fn a_connection_is_reported_at_the_threshold_and_at_its_end() {
    let mut h = Harness::new(policy(""));
    h.net.owners.insert(9001, 61);
    let listener = sock(99, "0.0.0.0:22", "0.0.0.0:0", 10, 0);
    // Below the threshold: nothing.
    let out = h.poll(
        0,
        vec![
            sock(1, "10.0.0.1:40000", "192.0.2.9:22", 1, 999),
            listener.clone(),
        ],
        vec![],
    );
    assert!(out.events.is_empty());
    let out = h.poll(
        1,
        vec![
            sock(1, "10.0.0.1:40000", "192.0.2.9:22", 1, 5000),
            listener.clone(),
        ],
        vec![],
    );
    let t = transfers(&out);
    assert_eq!(t.len(), 1);
    let t = t[0];
    assert_eq!(
        (t.phase.as_str(), t.bytes_sent, t.pid),
        ("threshold", 5000, Some(61))
    );
    assert_eq!(t.exe.as_deref(), Some("/usr/bin/ssh"));
    assert_eq!(
        t.parents[0].exe.as_deref(),
        Some("/usr/bin/scp"),
        "the parent chain names scp"
    );
    assert_eq!(
        (t.action.as_str(), t.rule_id.as_str()),
        ("audit", "network.default")
    );
    assert_eq!(
        (t.remote_addr.as_str(), t.remote_port, t.allowlisted),
        ("192.0.2.9", 22, false)
    );
    assert_eq!(t.duration_ms, 1000);
    // Still open, more bytes: no new event.
    let out = h.poll(
        2,
        vec![
            sock(1, "10.0.0.1:40000", "192.0.2.9:22", 1, 9000),
            listener.clone(),
        ],
        vec![],
    );
    assert!(out.events.is_empty());
    // Destroyed with its final counters.
    let out = h.poll(
        3,
        vec![listener],
        vec![sock(1, "10.0.0.1:40000", "192.0.2.9:22", 7, 12_345)],
    );
    let t = transfers(&out);
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].phase.as_str(), t[0].bytes_sent), ("closed", 12_345));
    assert_eq!(h.tracker.tracked(), 0);
    // The owner lookup ran once: a known socket is not looked up again.
    assert_eq!(h.net.owner_calls, 1);
}

#[test]
fn inbound_allowlisted_and_own_connections_are_not_reported() {
    let mut h = Harness::new(policy(
        "[[network.allow]]\nname = \"corp\"\ncidrs = [\"10.1.0.0/16\"]\n",
    ));
    h.net.owners.insert(9002, 4242); // the agent's own socket
    h.net.owners.insert(9003, 70);
    h.tracker
        .set_implicit_allow(vec!["192.0.2.50:8883".parse().unwrap()]);
    let out = h.poll(
        0,
        vec![
            sock(1, "10.0.0.1:22", "198.51.100.1:50000", 1, 1 << 20), // accepted on :22
            sock(99, "0.0.0.0:22", "0.0.0.0:0", 10, 0),
            sock(2, "10.0.0.1:40001", "192.0.2.77:443", 1, 1 << 20), // the agent
            sock(3, "10.0.0.1:40002", "10.1.2.3:443", 1, 1 << 20),   // allowlisted
            sock(4, "10.0.0.1:40003", "192.0.2.50:8883", 1, 1 << 20), // the collector
        ],
        vec![],
    );
    assert!(out.events.is_empty(), "{:?}", out.events);
}

#[test]
fn a_connection_missing_from_a_dump_waits_a_poll_for_its_destroy_notification() {
    let mut h = Harness::new(policy(""));
    h.net.owners.insert(9001, 61);
    let c = |sent| sock(1, "10.0.0.1:40000", "192.0.2.9:80", 1, sent);
    assert_eq!(transfers(&h.poll(0, vec![c(2_000_000)], vec![])).len(), 1);
    // Gone from the dump, its notification not yet sent by the kernel: not closed yet.
    assert!(transfers(&h.poll(1, vec![], vec![])).is_empty());
    // The notification arrives a poll later with the final count: one closed event.
    let out = h.poll(2, vec![], vec![c(3_145_838)]);
    let t = transfers(&out);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(
        (t[0].phase.as_str(), t[0].bytes_sent, t[0].pid),
        ("closed", 3_145_838, Some(61))
    );
    assert_eq!(h.tracker.tracked(), 0);
}

#[test]
fn a_connection_whose_notification_never_comes_closes_with_its_last_count_once() {
    let mut h = Harness::new(policy(""));
    h.net.owners.insert(9001, 61);
    let c = |sent| sock(1, "10.0.0.1:40000", "192.0.2.9:80", 1, sent);
    assert_eq!(transfers(&h.poll(0, vec![c(2_000_000)], vec![])).len(), 1);
    assert!(transfers(&h.poll(1, vec![], vec![])).is_empty());
    let out = h.poll(2, vec![], vec![]);
    let t = transfers(&out);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(
        (t[0].phase.as_str(), t[0].bytes_sent),
        ("closed", 2_000_000)
    );
    // A notification later still is not a second connection.
    assert!(transfers(&h.poll(3, vec![], vec![c(3_000_000)])).is_empty());
    // Back in a dump after one miss (a dump that raced the socket): still one connection.
    let d = |sent| sock(2, "10.0.0.1:40001", "192.0.2.9:80", 1, sent);
    assert_eq!(transfers(&h.poll(4, vec![d(2_000_000)], vec![])).len(), 1);
    assert!(transfers(&h.poll(5, vec![], vec![])).is_empty());
    assert!(transfers(&h.poll(6, vec![d(2_500_000)], vec![])).is_empty());
    assert!(transfers(&h.poll(7, vec![], vec![])).is_empty());
    assert_eq!(h.tracker.tracked(), 1);
}

#[test]
fn a_connection_seen_only_when_destroyed_is_reported_without_a_process() {
    let mut h = Harness::new(policy(""));
    let mut s = sock(5, "10.0.0.1:40005", "192.0.2.9:9000", 7, 4 << 20);
    s.inode = 0;
    let out = h.poll(0, vec![], vec![s.clone()]);
    let t = transfers(&out);
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].phase.as_str(), t[0].pid, t[0].uid),
        ("closed", None, Some(1000))
    );
    assert_eq!(t[0].bytes_sent, 4 << 20);
    // A destroyed socket without counters (time-wait) is not a transfer.
    s.has_counters = false;
    s.cookie = 6;
    assert!(h.poll(1, vec![], vec![s]).events.is_empty());
}

#[test]
fn a_kill_rule_fires_once_and_names_itself() {
    let mut h = Harness::new(policy(
        "[[network.rules]]\nid = \"no-nc\"\naction = \"kill\"\nprocesses = [\"nc.openbsd\"]\nmin_bytes = 2000\n",
    ));
    h.net.owners.insert(9007, 70);
    let c = |sent| sock(7, "10.0.0.1:40007", "192.0.2.9:9000", 1, sent);
    // The report threshold (1000) comes first: audited by the default.
    let out = h.poll(0, vec![c(1500)], vec![]);
    assert_eq!(transfers(&out)[0].rule_id, "network.default");
    assert!(out.actions.is_empty());
    let out = h.poll(1, vec![c(2500)], vec![]);
    let t = transfers(&out);
    assert_eq!(
        (t[0].action.as_str(), t[0].rule_id.as_str()),
        ("kill", "no-nc")
    );
    assert_eq!(out.actions.len(), 1);
    let a = &out.actions[0];
    assert_eq!(
        (a.pid, a.exe.as_deref()),
        (Some(70), Some("/usr/bin/nc.openbsd"))
    );
    assert_eq!(a.verdict.action, NetAction::Kill);
    // Still running: the rule does not fire again.
    let out = h.poll(2, vec![c(9000)], vec![]);
    assert!(out.actions.is_empty() && out.events.is_empty());
    // Its end (missing from the dumps for a second, no destroy notification) carries
    // the rule.
    assert!(h.poll(3, vec![], vec![]).events.is_empty());
    let out = h.poll(4, vec![], vec![]);
    assert_eq!(transfers(&out)[0].rule_id, "no-nc");
}

#[test]
fn process_and_destination_rules_count_over_connections_within_their_window() {
    let mut h = Harness::new(policy(
        "[[network.rules]]\nid = \"bulk\"\naction = \"block-destination\"\nper = \"destination\"\nwindow_secs = 60\nmin_bytes = 3000\nblock_secs = 30\n",
    ));
    h.net.owners.insert(9010, 70);
    h.net.owners.insert(9011, 70);
    // Two connections of 900 bytes each to one destination: below 3000.
    let a = |sent| sock(10, "10.0.0.1:40010", "192.0.2.9:80", 1, sent);
    let b = |sent| sock(11, "10.0.0.1:40011", "192.0.2.9:81", 1, sent);
    assert!(h.poll(0, vec![a(900), b(900)], vec![]).events.is_empty());
    // Together 3100 within the window: the destination rule fires once, for one of them.
    let out = h.poll(1, vec![a(1600), b(1500)], vec![]);
    assert_eq!(out.actions.len(), 1, "{:?}", out.actions);
    assert_eq!(out.actions[0].verdict.rule_id, "bulk");
    assert_eq!(out.actions[0].verdict.block, Duration::from_secs(30));
    // Bytes older than the window no longer count.
    let mut h = Harness::new(policy(
        "[[network.rules]]\nid = \"bulk\"\naction = \"audit\"\nper = \"process\"\nwindow_secs = 10\nmin_bytes = 3000\n",
    ));
    h.net.owners.insert(9010, 70);
    h.net.owners.insert(9011, 70);
    let quiet = |o: &TickOutput| transfers(o).iter().all(|t| t.rule_id != "bulk");
    assert!(quiet(&h.poll(0, vec![a(2000)], vec![])));
    assert!(
        quiet(&h.poll(30, vec![a(2000), b(1500)], vec![])),
        "2000 bytes 30 s ago are outside 10 s"
    );
    let out = h.poll(31, vec![a(2000), b(3100)], vec![]);
    assert!(transfers(&out).iter().any(|t| t.rule_id == "bulk"));
}

#[test]
fn open_files_in_sensitive_sources_are_attached() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    let held = secret.join("budget.xlsx");
    std::fs::write(&held, b"not really a spreadsheet").unwrap();
    let plain = dir.path().join("notes.txt");
    std::fs::write(&plain, b"nothing here").unwrap();
    let classified = dir.path().join("ids.txt");
    std::fs::write(&classified, "客户 11010519491231002X 张三\n").unwrap();
    let mut h = Harness::new(policy(&format!(
        "[files]\nsensitive_sources = [\"{}\"]\n",
        secret.display()
    )));
    h.net.owners.insert(9001, 61);
    // ssh sends; scp (its parent) holds the files.
    h.net
        .files
        .insert(60, vec![held.clone(), plain, classified.clone()]);
    let out = h.poll(
        0,
        vec![sock(1, "10.0.0.1:40000", "192.0.2.9:22", 1, 5000)],
        vec![],
    );
    let files = &transfers(&out)[0].sensitive_files;
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0].path, held.display().to_string());
    assert_eq!(files[0].source.as_deref(), Some(secret.to_str().unwrap()));
    assert_eq!(files[1].path, classified.display().to_string());
    assert_eq!(files[1].classification[0].detector, "prc-resident-id");
}

/// The real kernel interface: a loopback transfer is seen with its byte count while
/// open, and its destroy notification carries the final count.
#[test]
fn linux_backend_counts_a_loopback_transfer() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: sock_diag destroy notifications need root");
        return;
    }
    use std::io::{Read, Write};
    let mut backend = linux::LinuxNet::new(false, Duration::from_secs(300)).expect("sock_diag");
    let none = HashSet::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut n = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k,
            }
        }
    });
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(&vec![7u8; 1_234_567]).unwrap();
    client.flush().unwrap();
    let mut seen = None;
    for _ in 0..50 {
        // A poll where nothing moved dumps nothing: keep what the last dump showed.
        let snap = backend.snapshot(&none);
        if let Some(s) = snap
            .sockets
            .into_iter()
            .find(|s| s.local == local && s.remote == addr)
        {
            seen = Some(s);
        }
        if seen.as_ref().is_some_and(|s| s.bytes_sent >= 1_234_567) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = seen.expect("the client socket is in the dump");
    assert_eq!(seen.bytes_sent, 1_234_567);
    assert_ne!(seen.inode, 0);
    let me = crate::procinfo::socket_owners(&HashSet::from([seen.inode]), None);
    assert_eq!(me.get(&seen.inode), Some(&std::process::id()));
    drop(client);
    assert_eq!(reader.join().unwrap(), 1_234_567);
    let mut destroyed = None;
    for _ in 0..50 {
        let snap = backend.snapshot(&none);
        destroyed = snap.destroyed.into_iter().find(|s| s.cookie == seen.cookie);
        if destroyed.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let d = destroyed.expect("a destroy notification for the client socket");
    assert!(d.has_counters);
    // The acknowledged FIN may add one.
    assert!(
        d.bytes_sent >= 1_234_567 && d.bytes_sent <= 1_234_568,
        "{}",
        d.bytes_sent
    );
}

#[test]
fn an_unfindable_owner_is_looked_for_twice_then_left_alone() {
    let mut h = Harness::new(policy(""));
    // No process holds inode 9008 (say, a socket of a kernel service).
    for t in 0..10 {
        h.poll(
            t,
            vec![sock(8, "10.0.0.1:40008", "192.0.2.9:443", 1, 10)],
            vec![],
        );
    }
    assert_eq!(
        h.net.owner_calls, 2,
        "first by uid, then among all processes"
    );
}

#[test]
fn only_connections_that_changed_are_judged_between_full_rounds() {
    let mut h = Harness::new(policy(""));
    h.net.owners.insert(9001, 61);
    let decided = |h: &Harness| h.judge.0.load(std::sync::atomic::Ordering::Relaxed);
    let idle = sock(1, "10.0.0.5:40000", "203.0.113.7:22", 1, 100);
    let busy = |bytes| sock(2, "10.0.0.5:40001", "203.0.113.8:22", 1, bytes);
    h.poll(0, vec![idle.clone(), busy(100)], vec![]);
    assert_eq!(decided(&h), 2, "the first tick judges every connection");
    h.poll(1, vec![idle.clone(), busy(5000)], vec![]);
    assert_eq!(decided(&h), 3, "then only the one whose bytes moved");
    h.poll(2, vec![idle.clone(), busy(5000)], vec![]);
    assert_eq!(decided(&h), 3, "nothing moved, nothing judged");
    h.poll(40, vec![idle, busy(5000)], vec![]);
    assert_eq!(
        decided(&h),
        5,
        "every connection again after JUDGE_ALL_EVERY"
    );
}
