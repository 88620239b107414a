//! Network source overhead: agent CPU with 100, 1 000 and 10 000 open TCP sockets
//! (not a test).
//!
//! `cargo bench --bench net_overhead` (as root: network namespace). In a fresh
//! namespace this process opens N sockets (N/2 loopback connections: client and
//! accepted ends, each client having sent 1 KiB), then, side by side in one run:
//!
//! - a real `weilan agent` with `[network] enabled = false` (the baseline: USB, files
//!   and heartbeat sources on their fake trees),
//! - the same agent with the network source polling every 500 ms (the default) and
//!   every 200 ms, watching its own namespace,
//! - the peer: `ss -tinp` (iproute2) run every 500 ms — the same dump with byte
//!   counters and owning processes, as a script polling `ss` would get them.
//!
//! Each is measured for `SECS` (default 20) seconds after a 4 s warm-up: CPU seconds
//! (utime + stime from `/proc/PID/stat`; for `ss`, `getrusage(RUSAGE_CHILDREN)`),
//! as a percentage of one core; agent peak RSS (VmHWM). `SOCKETS=100,1000` overrides
//! the sizes.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// utime + stime of `pid` in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / clk_tck()
}

fn children_cpu_secs() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

struct Row {
    sockets: usize,
    who: String,
    cpu_pct: f64,
    rss_mib: f64,
}

fn measure_agent(w: &World, ns: &Netns, name: &str, network: &str, secs: u64) -> (f64, f64) {
    let config = w.agent_toml(AGENT, "pki/ca.pem", network);
    let mut agent = w.start_agent(ns, &config, name);
    std::thread::sleep(Duration::from_secs(4));
    let pid = agent.child.id();
    let c0 = cpu_secs(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let c1 = cpu_secs(pid);
    let elapsed = t0.elapsed().as_secs_f64();
    let rss = agent.peak_rss_kib() as f64 / 1024.0;
    agent.stop();
    ((c1 - c0) / elapsed * 100.0, rss)
}

fn measure_ss(ns: &Netns, secs: u64) -> f64 {
    ns.run_in(move || {
        let c0 = children_cpu_secs();
        let t0 = Instant::now();
        let mut next = t0;
        while t0.elapsed() < Duration::from_secs(secs) {
            let status = Command::new("ss")
                .arg("-tinp")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("ss");
            assert!(status.success());
            next += Duration::from_millis(500);
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        (children_cpu_secs() - c0) / t0.elapsed().as_secs_f64() * 100.0
    })
}

fn main() {
    if !netns_available() || !require("the side-by-side peer `ss` (iproute2)", have("ss")) {
        return;
    }
    let secs = std::env::var("SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let sizes: Vec<usize> = std::env::var("SOCKETS")
        .unwrap_or_else(|_| "100,1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // Each socket is a descriptor of this process.
    let need = sizes.iter().max().copied().unwrap_or(0) as u64 + 1024;
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("open-file limit");
    assert!(
        need <= hard,
        "{need} descriptors needed, the hard limit is {hard}"
    );
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, need, hard)
        .expect("raise the open-file limit");

    let w = World::new();
    let ns = Netns::create();
    let _collector = w.start_collector(&ns, &w.collector_toml(false, "[log]\nlevel = \"warn\"\n"));
    std::thread::sleep(Duration::from_secs(2));
    let mut rows = Vec::new();
    for &n in &sizes {
        let sockets = loopback_sockets(&ns, n);
        eprintln!("{n} sockets open");
        for (who, network) in [
            ("agent, network off", "[network]\nenabled = false\n"),
            (
                "agent, poll 500 ms",
                "[network]\npoll_ms = 500\nnamespaces = \"own\"\n",
            ),
            (
                "agent, poll 200 ms",
                "[network]\npoll_ms = 200\nnamespaces = \"own\"\n",
            ),
        ] {
            let (cpu_pct, rss_mib) = measure_agent(&w, &ns, AGENT, network, secs);
            eprintln!("{n} {who}: {cpu_pct:.2} % CPU, {rss_mib:.1} MiB");
            rows.push(Row {
                sockets: n,
                who: who.into(),
                cpu_pct,
                rss_mib,
            });
        }
        let cpu_pct = measure_ss(&ns, secs);
        eprintln!("{n} ss -tinp every 500 ms: {cpu_pct:.2} % CPU");
        rows.push(Row {
            sockets: n,
            who: "`ss -tinp` every 500 ms".into(),
            cpu_pct,
            rss_mib: 0.0,
        });
        drop(sockets);
    }
    println!("\n| sockets | who | CPU (% of one core) | network source alone | vs `ss -tinp` | peak RSS |");
    println!("|---:|---|---:|---:|---:|---:|");
    for n in &sizes {
        let at = |who: &str| {
            rows.iter()
                .find(|r| r.sockets == *n && r.who.starts_with(who))
        };
        let base = at("agent, network off").map(|r| r.cpu_pct).unwrap_or(0.0);
        let ss = at("`ss").map(|r| r.cpu_pct).unwrap_or(f64::NAN);
        for r in rows.iter().filter(|r| r.sockets == *n) {
            let alone = if r.who.starts_with("agent, poll") {
                format!("{:.2} %", r.cpu_pct - base)
            } else {
                "".into()
            };
            let ratio = if r.who.starts_with("agent, poll 500") {
                format!("{:.2}×", (r.cpu_pct - base) / ss)
            } else {
                "".into()
            };
            let rss = if r.rss_mib > 0.0 {
                format!("{:.1} MiB", r.rss_mib)
            } else {
                "".into()
            };
            println!(
                "| {} | {} | {:.2} % | {alone} | {ratio} | {rss} |",
                r.sockets, r.who, r.cpu_pct
            );
        }
    }
}
