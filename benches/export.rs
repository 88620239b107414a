//! Export benchmark (not a test): time and peak memory of `weilan collector export`
//! as the period grows, to show memory stays bounded.
//!
//! `cargo bench --bench export` (environment: `EVENTS`, comma-separated sizes,
//! default `1000000,10000000`; needs ~20 GB free for 10 million). For each size: a
//! fresh database (the collector's schema and indexes) filled with that many events
//! of 200 agents over 30 days (USB attach and decisions, exports — every tenth
//! classified —, transfers, heartbeats) and one alert per 100 events; then the real
//! CLI exports the whole period (zh-CN report) while its VmHWM is read from /proc.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::params;
use serde_json::json;
use weilan_collector::pki::{self, PkiPaths};

fn fill(db: &Path, n: u64) {
    weilan_collector::store::Store::open(db).unwrap();
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    let start = jiff::Timestamp::from_second(1_793_000_000).unwrap();
    let step_us = 30 * 86_400 * 1_000_000 / n as i64;
    let mut seq = vec![0u64; 200];
    let chunk = 200_000;
    let mut done = 0;
    while done < n {
        let tx = conn.transaction().unwrap();
        {
            let mut ev = tx
                .prepare(
                    "INSERT INTO events (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope, hash, prev_hash)
                     VALUES (?1, ?2, 1, ?3, ?4, ?5, ?5, 'workstation', ?6, '', '')",
                )
                .unwrap();
            let mut al = tx
                .prepare(
                    "INSERT INTO alerts (time, level, rule_id, agent_id, summary, event_ids, details, title, tags, key, count, last_seen)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, '{}', 'Unknown USB storage', '[\"NIST AU-6\"]', ?4, 1, ?1)",
                )
                .unwrap();
            for i in done..(done + chunk).min(n) {
                let a = (i % 200) as usize;
                seq[a] += 1;
                let agent = format!("ws-{a:03}");
                let t = (start + jiff::SignedDuration::from_micros(step_us * i as i64)).to_string();
                let (kind, data) = match i % 5 {
                    0 => (
                        "usb.attached",
                        json!({"vid": "0951", "pid": "1666", "serial": format!("S{}", i % 5000), "hash": format!("{:016x}", i % 5000)}),
                    ),
                    1 => (
                        "usb.decision",
                        json!({"vid": "0951", "pid": "1666", "serial": format!("S{}", i % 5000), "hash": format!("{:016x}", i % 5000), "target": if i % 3 == 0 { "allow" } else { "block" }, "rule_id": "implicit default"}),
                    ),
                    2 => (
                        "file.exported",
                        json!({"path": format!("/media/u/报告-{i}.docx"), "user": format!("user{}", i % 700), "size": 40_000 + i % 1000,
                        "classification": if i % 10 == 2 { json!([{"detector": "cn_id", "count": 1, "samples": ["1101**"]}]) } else { json!([]) },
                        "action": "audit", "rule_id": "files.default", "exit": "removable"}),
                    ),
                    3 => (
                        "net.transfer",
                        json!({"pid": 77, "exe": "/usr/bin/curl", "user": format!("user{}", i % 700), "remote_addr": "203.0.113.9", "remote_port": 443, "bytes_sent": 2_000_000}),
                    ),
                    _ => (
                        "agent.heartbeat",
                        json!({"agent_version": "0.1.0", "uptime_secs": i, "policy_version": "v1", "backlog": 0, "dropped_total": 0}),
                    ),
                };
                let id = format!("{agent}:1:{}", seq[a]);
                let envelope =
                    json!({"schema": 1, "event_id": id, "time": t, "host_role": "workstation",
                    "prev_hash": "0", "event": {"kind": kind, "data": data}})
                    .to_string();
                ev.execute(params![id, agent, seq[a] as i64, kind, t, envelope])
                    .unwrap();
                if i % 100 == 0 {
                    let level = ["red", "yellow", "blue"][(i / 100 % 3) as usize];
                    al.execute(params![
                        t,
                        level,
                        "builtin.usb.unknown-storage",
                        agent,
                        format!("Unknown USB storage on {agent}"),
                        format!("[\"{id}\"]")
                    ])
                    .unwrap();
                }
            }
        }
        tx.commit().unwrap();
        done = (done + chunk).min(n);
    }
    conn.execute(
        "INSERT INTO agents (agent_id, first_seen, last_seen, state) SELECT DISTINCT agent_id, '2020-01-01T00:00:00Z', '2020-01-01T00:00:00Z', 'online' FROM events",
        [],
    )
    .unwrap();
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn main() {
    weilan_config::tls::install_default_provider();
    let sizes: Vec<u64> = std::env::var("EVENTS")
        .unwrap_or_else(|_| "1000000,10000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for n in sizes {
        let dir =
            tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
                .unwrap();
        let root = dir.path();
        let pki_paths = PkiPaths::new(root.join("pki"));
        pki::init(&pki_paths, &["weilan-collector".into()]).unwrap();
        std::fs::write(root.join("policy.toml"), "version = \"bench\"\n").unwrap();
        std::fs::write(
            root.join("collector.toml"),
            "[broker]\nmode = \"external\"\n[tls]\nca = \"pki/ca.pem\"\nserver_cert = \"pki/server.pem\"\n\
             server_key = \"pki/server-key.pem\"\nclient_cert = \"pki/collector.pem\"\nclient_key = \"pki/collector-key.pem\"\n\
             [store]\npath = \"weilan.db\"\n[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n\
             [exports]\ndir = \"exports\"\n",
        )
        .unwrap();
        let t0 = Instant::now();
        fill(&root.join("weilan.db"), n);
        let fill_s = t0.elapsed().as_secs_f64();
        let db_bytes = std::fs::metadata(root.join("weilan.db")).unwrap().len();
        let out = root.join("export");
        let t1 = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_weilan"))
            .args(["collector", "export", "--config"])
            .arg(root.join("collector.toml"))
            .args([
                "--from",
                "2026-10-01T00:00:00Z",
                "--to",
                "2027-01-01T00:00:00Z",
                "--out",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut peak = 0;
        let status = loop {
            peak = peak.max(common::status_kib(pid, "VmHWM:"));
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let secs = t1.elapsed().as_secs_f64();
        assert!(status.success(), "export failed");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["counts"]["events"], n, "every event exported");
        println!(
            "{n} events (+{} alerts), database {:.2} GiB filled in {fill_s:.0} s: export {secs:.1} s = {:.0} events/s, peak RSS {:.1} MiB, output {:.2} GiB",
            manifest["counts"]["alerts"],
            db_bytes as f64 / (1u64 << 30) as f64,
            n as f64 / secs,
            peak as f64 / 1024.0,
            dir_bytes(&out) as f64 / (1u64 << 30) as f64
        );
    }
}
