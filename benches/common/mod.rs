//! Helpers the benchmarks share: a simulated agent's MQTT connection (real TLS client
//! certificate) and its signed, hash-chained batches; process bookkeeping.
#![allow(dead_code)] // each bench uses its own subset

use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use weilan_collector::pki::PkiPaths;
use weilan_config::event::{Envelope, EventKey};
use weilan_config::signing::Signer;
use weilan_config::wire::{Batch, Purpose};

pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The mutual-TLS client configuration agents use, for a simulated agent.
pub fn tls(pki: &PkiPaths, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    weilan_config::tls::client_config(&pki.ca(), cert, key, "weilan-collector").unwrap()
}

pub fn options(id: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_max_packet_size(2 << 20, 2 << 20);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o
}

/// Signs a batch of hash-chained records; `prev` carries the chain across batches.
pub fn signed_batch(
    signer: &Signer,
    agent: &str,
    batch_id: u64,
    events: Vec<Envelope>,
    prev: &mut String,
) -> Vec<u8> {
    let first = events[0].event_id.key;
    let last = events[events.len() - 1].event_id.key;
    let raws: Vec<Box<serde_json::value::RawValue>> = events
        .into_iter()
        .map(|mut e| {
            e.prev_hash = prev.clone();
            let json = serde_json::to_string(&e).unwrap();
            *prev = weilan_config::event::record_hash(json.as_bytes());
            serde_json::value::RawValue::from_string(json).unwrap()
        })
        .collect();
    let batch = Batch {
        agent_id: agent.into(),
        batch_id,
        first,
        last,
        events: raws.iter().map(|r| r.as_ref()).collect(),
        head: Some(last),
    };
    let body = serde_json::to_string(&batch).unwrap();
    serde_json::to_vec(&signer.sign(Purpose::Batch, body)).unwrap()
}

/// An event of `agent` at sequence `seq` of epoch 1, made now (chained by [`signed_batch`]).
pub fn envelope(agent: &str, seq: u64, event: weilan_config::event::Event) -> Envelope {
    Envelope {
        schema: 1,
        event_id: weilan_config::event::EventId {
            agent_id: agent.into(),
            key: key(seq),
        },
        time: jiff::Timestamp::now(),
        host_role: "workstation".into(),
        site: None,
        prev_hash: String::new(),
        event,
    }
}

/// A file written to a USB stick, as the files source reports it (audit), with the
/// classifier's findings (none: a plain file).
pub fn exported(
    agent: &str,
    seq: u64,
    classification: Vec<weilan_config::event::Classification>,
) -> Envelope {
    let now = jiff::Timestamp::now();
    envelope(
        agent,
        seq,
        weilan_config::event::Event::FileExported(weilan_config::event::FileExported {
            path: format!("/media/stick/report-{seq}.xlsx"),
            mount_point: "/media/stick".into(),
            fs_type: "vfat".into(),
            mount_source: "/dev/sdb1".into(),
            usb_serial: Some("BENCH-STICK".into()),
            usb_hash: Some("c2a1e1f0".into()),
            size: 48_213,
            sha256: Some(format!("{:064x}", seq)),
            hashed_bytes: 48_213,
            pid: Some(4242),
            exe: Some("/usr/bin/cp".into()),
            cmdline: Some("cp report.xlsx /media/stick/".into()),
            uid: Some(1000),
            user: Some("clerk".into()),
            first_write: now,
            last_write: now,
            attribution: "fanotify".into(),
            classification,
            classification_note: None,
            exit: "removable".into(),
            action: "audit".into(),
            rule_id: "implicit default".into(),
            origins: vec![],
            rewrites: 0,
            unclosed: false,
        }),
    )
}

pub fn key(seq: u64) -> EventKey {
    EventKey { epoch: 1, seq }
}

/// A PKI with the given agents and a real `weilan collector serve` on `port` under
/// `root` (embedded broker, SQLite, alert log); returns the PKI and the process.
pub fn start_collector(root: &Path, port: u16, agents: &[String]) -> (PkiPaths, Killed) {
    start_collector_with(
        root,
        agents,
        &format!("[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n"),
    )
}

/// [`start_collector`] with its own `[broker]` section (e.g. an external broker).
pub fn start_collector_with(root: &Path, agents: &[String], broker: &str) -> (PkiPaths, Killed) {
    let pki_paths = PkiPaths::new(root.join("pki"));
    weilan_collector::pki::init(&pki_paths, &["weilan-collector".into(), "127.0.0.1".into()])
        .unwrap();
    for n in agents {
        weilan_collector::pki::issue_agent(&pki_paths, n).unwrap();
    }
    std::fs::write(root.join("policy.toml"), "version = \"bench\"\n").unwrap();
    std::fs::write(
        root.join("collector.toml"),
        format!(
            "{broker}[tls]\nca = \"pki/ca.pem\"\nserver_cert = \"pki/server.pem\"\n\
             server_key = \"pki/server-key.pem\"\nclient_cert = \"pki/collector.pem\"\nclient_key = \"pki/collector-key.pem\"\n\
             [store]\npath = \"weilan.db\"\n[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n[log]\nlevel = \"{level}\"\n",
            level = std::env::var("COLLECTOR_LOG_LEVEL").unwrap_or("warn".into())
        ),
    )
    .unwrap();
    let collector = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_weilan"))
            .args(["collector", "serve", "--config"])
            .arg(root.join("collector.toml"))
            .env(
                "RUST_LOG",
                std::env::var("COLLECTOR_LOG_LEVEL").unwrap_or("warn".into()),
            )
            .stdout(std::process::Stdio::null())
            // `COLLECTOR_LOG=path`: keep the collector's (and its broker's) log there.
            .stderr(match std::env::var_os("COLLECTOR_LOG") {
                Some(path) => std::fs::File::create(path).unwrap().into(),
                None => std::process::Stdio::null(),
            })
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(800));
    (pki_paths, collector)
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`); 0 once the process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

pub fn usb(hash: String) -> serde_json::Value {
    serde_json::json!({"port_path": "1-1", "busnum": 1, "devnum": 5, "vid": "abcd", "pid": "1234",
        "bcd_device": "0100", "serial": "S-1", "manufacturer": "Acme", "product": "Stick",
        "device_class": 0, "interfaces": [{"number": 0, "class": 8, "subclass": 6, "protocol": 80}],
        "speed": "480", "authorized": false, "hash": hash, "parent_hash": null,
        "block_devices": [], "present_at_start": false})
}

/// Kind and data of event `seq` of a mixed stream of ten kinds: USB attach and
/// decisions, exports plain and classified, refusals, transfers to 1 000
/// destinations, transfer tools, failed logins, sudo, heartbeats.
pub fn mixed(seq: u64) -> (&'static str, serde_json::Value) {
    let now = jiff::Timestamp::now().to_string();
    let exported = |classified: bool| {
        serde_json::json!({"path": format!("/media/s/{seq}.docx"), "mount_point": "/media/s", "fs_type": "vfat",
            "mount_source": "/dev/sdb1", "usb_serial": "S-1", "usb_hash": "h1", "size": 40_000 + seq,
            "sha256": format!("{seq:064x}"), "hashed_bytes": 40_000, "pid": 42, "exe": "/usr/bin/cp",
            "cmdline": "cp", "uid": 1000, "user": "bob", "first_write": now, "last_write": now,
            "attribution": "fanotify",
            "classification": if classified { serde_json::json!([{"detector": "cn_id", "count": 2, "samples": ["1101**"]}]) } else { serde_json::json!([]) },
            "classification_note": null, "exit": "removable", "action": "audit",
            "rule_id": "files.default", "origins": []})
    };
    let (kind, data) = match seq % 10 {
        0 => ("usb.attached", usb(format!("{:064x}", seq % 50))),
        1 => (
            "usb.decision",
            serde_json::json!({"port_path": "1-1", "vid": "abcd", "pid": "1234", "serial": "S-1",
            "manufacturer": "Acme", "product": "Stick", "hash": format!("{:064x}", seq % 50), "target": "block",
            "rule_id": "implicit default", "reason": "r", "trigger": "attach", "mode": "enforce",
            "actions": [], "enforced": true, "error": null, "policy_version": "v1"}),
        ),
        2 => ("file.exported", exported(false)),
        3 => ("file.exported", exported(true)),
        4 => (
            "net.transfer",
            serde_json::json!({"pid": 77, "exe": "/usr/bin/curl", "cmdline": "curl -T x",
            "uid": 1000, "user": "bob", "protocol": "tcp", "local_addr": "192.0.2.10", "local_port": 40000,
            "remote_addr": format!("198.51.{}.{}", (seq / 10 % 1000) / 250, (seq / 10 % 1000) % 250),
            "remote_port": 443, "remote_host": null, "bytes_sent": 2_000_000, "bytes_received": 300,
            "duration_ms": 900, "phase": "closed", "allowlisted": false, "sensitive_files": [],
            "action": "audit", "rule_id": "net.default"}),
        ),
        5 => (
            "access.login_failed",
            serde_json::json!({"user": "root", "method": "ssh", "remote_addr": "192.0.2.66",
            "reason": "bad password", "source": "journal"}),
        ),
        6 => (
            "access.privilege",
            serde_json::json!({"user": "bob", "target_user": "root", "tool": "sudo",
            "command": "/bin/bash", "success": true, "tty": "pts/0", "source": "journal"}),
        ),
        7 => (
            "agent.heartbeat",
            serde_json::json!({"agent_version": "0.1.0", "uptime_secs": seq, "policy_version": "v1",
            "backlog": 0, "dropped_total": 0}),
        ),
        8 => (
            "file.enforced",
            serde_json::json!({"action": "deny", "rule_id": "no-secrets-out", "matched": ["cn_id"],
            "path": "/media/s/x", "source_path": "/srv/secret/x", "sha256": null, "mount_point": "/media/s",
            "usb_hash": "h1", "pid": 42, "exe": "/usr/bin/cp", "user": "bob", "outcome": "done",
            "error": null, "evidence": null, "detail": "refused"}),
        ),
        _ => (
            "net.transfer_tool",
            serde_json::json!({"pid": 9, "tool": "scp", "exe": "/usr/bin/scp",
            "args": ["scp", "x", "e:/tmp"], "uid": 1000, "user": "bob"}),
        ),
    };
    (kind, data)
}
