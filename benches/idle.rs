//! Idle agent footprint on a host with many network namespaces and sockets (not a test).
//!
//! `cargo bench --bench idle` (as root; environment: `SECS` (60), `NAMESPACES` (10),
//! `SOCKETS` (1 000 in all)). Issue "Performance", goal 4.
//!
//! The host shape: `NAMESPACES` network namespaces, each with a process in it (as a
//! container would have) and `SOCKETS / NAMESPACES` idle loopback TCP sockets (half
//! client ends that sent 1 KiB, half accepted ends), besides the host's own namespace
//! and the bench's, where a real `weilan collector serve` and a real `weilan-agent run`
//! (the agent-only program the package installs; the shipped defaults: every source
//! on, the network source watching every namespace, USB on the real `/sys`) run and
//! stay connected.
//!
//! Measured for `SECS` after a 10 s settle, twice — the agent with the network source
//! on, then off — and in the same windows the peers: `usbguard-daemon` (empty rules;
//! this VM has no `/sys/bus/usb`, so it runs in a private mount namespace with an
//! empty one, as in `../shared/tools/peers`) and `auditd -n` (no rules). CPU is the
//! sum of every thread's on-CPU time (`/proc/PID/task/*/schedstat`, nanoseconds) over
//! the window, as a percentage of one core; RSS is `VmRSS` at the end and `VmHWM`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// On-CPU nanoseconds of every thread of `pid`.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `VmRSS` and `VmHWM` of `pid`, KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Daemon {
    name: &'static str,
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peers, configured as `../shared/tools/peers/idle_footprint.sh` does.
fn start_peers(dir: &Path) -> Vec<Daemon> {
    let mut out = Vec::new();
    if have("usbguard-daemon") {
        let conf = dir.join("usbguard-daemon.conf");
        let rules = dir.join("usbguard-rules.conf");
        std::fs::write(&rules, "").unwrap();
        std::fs::write(
            &conf,
            format!(
                "RuleFile={}\nImplicitPolicyTarget=allow\nPresentDevicePolicy=allow\n\
                 PresentControllerPolicy=keep\nInsertedDevicePolicy=apply-policy\nAuthorizedDefault=none\n\
                 RestoreControllerDeviceState=false\nDeviceManagerBackend=uevent\nIPCAllowedUsers=root\n\
                 IPCAllowedGroups=root\nDeviceRulesWithPort=false\nAuditBackend=FileAudit\n\
                 AuditFilePath={}\nHidePII=false\n",
                rules.display(),
                dir.join("usbguard-audit.log").display()
            ),
        )
        .unwrap();
        // usbguard refuses files others can read.
        for f in [&conf, &rules] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        let child = if Path::new("/sys/bus/usb").exists() {
            Command::new("usbguard-daemon")
                .args(["-k", "-P", "-c"])
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        } else {
            Command::new("unshare")
                .args(["-m", "sh", "-c"])
                .arg(
                    "mount --make-rprivate / && mount -t tmpfs tmpfs /sys/bus && \
                     mkdir -p /sys/bus/usb/devices /sys/bus/usb/drivers && \
                     exec usbguard-daemon -k -P -c \"$0\"",
                )
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        out.push(Daemon {
            name: "usbguard-daemon 1.1.2 (no rules)",
            child,
        });
    } else {
        println!("SKIPPED peer usbguard-daemon: not installed (apt-get install usbguard)");
    }
    if have("auditd") {
        let conf = std::fs::read_to_string("/etc/audit/auditd.conf").unwrap_or_default();
        let conf: String = conf
            .lines()
            .map(|l| {
                if l.starts_with("log_file") {
                    format!("log_file = {}", dir.join("audit.log").display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join("auditd.conf"), conf + "\n").unwrap();
        std::fs::set_permissions(
            dir.join("auditd.conf"),
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )
        .unwrap();
        let child = Command::new("auditd")
            .args(["-n", "-c"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        out.push(Daemon {
            name: "auditd 3.0.9 (no rules)",
            child,
        });
    } else {
        println!("SKIPPED peer auditd: not installed (apt-get install auditd)");
    }
    out
}

struct Sample {
    who: String,
    cpu_pct: f64,
    rss_mib: f64,
    hwm_mib: f64,
}

/// CPU and memory of each pid over one window of `secs`.
fn window(pids: &[(String, u32)], secs: u64) -> Vec<Sample> {
    let before: Vec<u64> = pids.iter().map(|(_, p)| cpu_ns(*p)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let elapsed = t0.elapsed().as_nanos() as f64;
    pids.iter()
        .zip(before)
        .map(|((who, pid), b)| {
            let (rss, hwm) = rss_kib(*pid);
            Sample {
                who: who.clone(),
                cpu_pct: cpu_ns(*pid).saturating_sub(b) as f64 / elapsed * 100.0,
                rss_mib: rss as f64 / 1024.0,
                hwm_mib: hwm as f64 / 1024.0,
            }
        })
        .collect()
}

fn main() {
    if !netns_available() {
        return;
    }
    let setting = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let secs = setting("SECS", 60);
    let namespaces = setting("NAMESPACES", 10) as usize;
    let sockets = setting("SOCKETS", 1000) as usize;
    let w = World::new();
    let home = Netns::create();
    let _collector =
        w.start_collector(&home, &w.collector_toml(false, "[log]\nlevel = \"warn\"\n"));

    // The host's shape: namespaces with a process and idle sockets in each.
    let mut others = Vec::new();
    let mut residents = Vec::new();
    let mut held = Vec::new();
    for _ in 0..namespaces {
        let ns = Netns::create();
        residents.push(Daemon {
            name: "resident",
            child: ns
                .command("sleep")
                .arg("7200")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        });
        held.extend(loopback_sockets(&ns, sockets / namespaces.max(1)));
        others.push(ns);
    }
    let peers = start_peers(w.dir.path());
    let processes = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count();
    println!(
        "host: {} cores; {namespaces} network namespaces with {} idle TCP sockets in all (a process in each), plus the host's and the bench's; {processes} processes",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        held.len(),
    );

    let mut rows: Vec<(String, Vec<Sample>)> = Vec::new();
    for (label, extra) in [
        ("network source on (defaults: every namespace)", ""),
        ("network source off", "[network]\nenabled = false\n"),
    ] {
        let config = w.path("agent-idle.toml");
        std::fs::create_dir_all(w.path("state-idle")).unwrap();
        std::fs::write(
            &config,
            format!(
                "[agent]\nstate_dir = \"state-idle\"\npolicy = \"policy.toml\"\n\
                 [collector]\nhost = \"127.0.0.1\"\nport = {BROKER_PORT}\nserver_name = \"weilan-collector\"\nca = \"pki/ca.pem\"\n\
                 [tls]\ncert = \"pki/agents/{AGENT}.pem\"\nkey = \"pki/agents/{AGENT}-key.pem\"\n\
                 [log]\nlevel = \"warn\"\n{extra}"
            ),
        )
        .unwrap();
        // The program the agent package installs (packaging/deb/build.sh): the
        // agent-only one, not the multi-call `weilan`.
        let mut c = home.command(env!("CARGO_BIN_EXE_weilan-agent"));
        c.args(["run", "--config"]).arg(&config);
        let mut agent = Proc::spawn(c, w.path("agent-idle.log"), "idle");
        std::thread::sleep(Duration::from_secs(10));
        assert!(agent.is_running(), "agent stopped: {}", agent.log_text());
        let mut pids = vec![(format!("weilan-agent, {label}"), agent.child.id())];
        pids.extend(peers.iter().map(|d| (d.name.to_string(), d.child.id())));
        let samples = window(&pids, secs);
        for s in &samples {
            println!(
                "  {}: CPU {:.4} % of one core over {secs} s; RSS {:.1} MiB (peak {:.1} MiB)",
                s.who, s.cpu_pct, s.rss_mib, s.hwm_mib
            );
        }
        rows.push((label.to_string(), samples));
        agent.stop();
    }
    println!("\n| who | CPU, % of one core | RSS | peak RSS |");
    println!("|---|---:|---:|---:|");
    for (_, samples) in &rows {
        for s in samples {
            println!(
                "| {} | {:.4} % | {:.1} MiB | {:.1} MiB |",
                s.who, s.cpu_pct, s.rss_mib, s.hwm_mib
            );
        }
    }
    drop(held);
    drop(residents);
}
