//! Outgoing transfers, for real: a collector and an agent run in one network
//! namespace; the "workstation" whose programs send is a second namespace (as a
//! container would be: the agent finds it through /proc); the servers live in a third,
//! joined to the second by a veth pair with private addresses that exist only in these
//! namespaces. `curl -T`, `scp`, `sftp`, `rsync` (over a local sshd) and `nc` send
//! known payloads; each must arrive at the collector as a `net.transfer` naming the
//! process and destination, with the byte count within 5 % of the payload. Then the
//! policy acts: a transfer over its threshold is killed, another destination is
//! blocked with nftables, and the test sees both transfers stop.
//!
//! The transfer-tool watch (process connector) is exercised in the test's own
//! namespace, where the kernel offers it.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CLIENT_ADDR: &str = "10.77.0.1";
const SERVER_ADDR: &str = "10.77.0.2";

/// A TCP sink on several ports (each connection's byte count is printed when it
/// ends) and an HTTP server that accepts PUT uploads.
const SERVERS_PY: &str = r#"
import http.server, socketserver, sys, threading

class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        n = 0
        while True:
            b = self.request.recv(1 << 16)
            if not b:
                break
            n += len(b)
        print(f"sink {self.server.server_address[1]} {n}", file=sys.stderr, flush=True)

class Put(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        left = int(self.headers["Content-Length"])
        while left > 0:
            b = self.rfile.read(min(left, 1 << 16))
            if not b:
                break
            left -= len(b)
        self.send_response(201)
        self.end_headers()
    def log_message(self, *a):
        pass

class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True

host = sys.argv[1]
for port in map(int, sys.argv[2:]):
    srv = Threaded((host, port), Sink)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
http_srv = Threaded((host, 8080), Put)
http_srv.serve_forever()
"#;

fn payload(w: &World, name: &str, bytes: usize) -> std::path::PathBuf {
    let p = w.path(name);
    let mut data = vec![0u8; bytes];
    // Incompressible, so no transport can shrink it.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut data).unwrap();
    std::fs::write(&p, data).unwrap();
    p
}

/// The closed `net.transfer` to `port` whose process is `exe_name` (and whose parent
/// is `parent`, when given), once stored.
fn closed_transfer(w: &World, port: u16, exe_name: &str, parent: Option<&str>) -> Value {
    let found = within(Duration::from_secs(30), || {
        w.events(
            "net.transfer",
            &format!("json_extract(envelope, '$.event.data.phase') = 'closed' AND json_extract(envelope, '$.event.data.remote_port') = {port} AND json_extract(envelope, '$.event.data.remote_addr') = ?2"),
            &[SERVER_ADDR],
        )
        .into_iter()
        .find(|t| {
            t["exe"].as_str().is_some_and(|e| e.ends_with(exe_name))
                && parent.is_none_or(|p| {
                    t["parents"][0]["exe"].as_str().is_some_and(|e| e.ends_with(p))
                })
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "no closed net.transfer by {exe_name} ({parent:?}) to port {port}; stored: {:#?}",
            w.events("net.transfer", "1", &[])
        )
    })
}

fn within_5_percent(t: &Value, payload: usize) {
    let sent = t["bytes_sent"].as_u64().unwrap() as f64;
    let ratio = sent / payload as f64;
    assert!(
        (1.0..=1.05).contains(&ratio),
        "bytes_sent {sent} vs payload {payload} (ratio {ratio:.4}) in {t:#}"
    );
}

fn run_client(cmd: &mut Command) {
    let out = cmd.output().expect("spawn client");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn transfers_are_measured_per_process_and_destination_and_policy_stops_them() {
    if !netns_available() {
        return;
    }
    for p in [
        "sshd", "ssh", "scp", "sftp", "rsync", "curl", "nc", "python3", "tc",
    ] {
        if !require(&format!("network test needs `{p}`"), have(p)) {
            return;
        }
    }
    let w = World::new();
    let home = Netns::create(); // collector + agent
    let client = Netns::create(); // the workstation's programs
    let server = Netns::create();
    link_namespaces(&client, CLIENT_ADDR, &server, SERVER_ADDR);

    let secret = w.path("finance");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(
        w.path("policy.toml"),
        format!(
            r#"version = "net-1"
[files]
sensitive_sources = ["{secret}"]

[network]
report_bytes = 65536

[[network.allow]]
name = "backup-server"
cidrs = ["{SERVER_ADDR}/32"]
ports = [9300]

[[network.allow]]
name = "local-proxy"
hosts = ["localhost"]
ports = [9002]

[[network.rules]]
id = "no-bulk-nc"
description = "nc may not push more than 1 MiB to port 9100"
action = "kill"
processes = ["nc", "nc.openbsd"]
ports = [9100]
min_bytes = 1048576

[[network.rules]]
id = "fence-9200"
action = "block-destination"
ports = [9200]
min_bytes = 1048576
block_secs = 120
"#,
            secret = secret.display()
        ),
    )
    .unwrap();
    let mut servers = server.command("python3");
    servers.args([
        "-c",
        SERVERS_PY,
        SERVER_ADDR,
        "9000",
        "9100",
        "9200",
        "9300",
    ]);
    let servers = Proc::spawn(servers, w.path("servers.log"), "servers");
    let mut loopback = client.command("python3");
    loopback.args(["-c", SERVERS_PY, "127.0.0.1", "9001", "9002"]);
    let _loopback = Proc::spawn(loopback, w.path("loopback.log"), "loopback");
    let (_sshd, key) = start_sshd(&w, &server, SERVER_ADDR, "", false);

    let collector = w.collector_toml(false, "");
    let _c = w.start_collector(&home, &collector);
    let agent = w.agent_toml(AGENT, "pki/ca.pem", "[network]\npoll_ms = 200\n");
    let _a = w.start_agent(&home, &agent, AGENT);
    assert!(
        within(Duration::from_secs(20), || (w.count(
            "SELECT COUNT(*) FROM events WHERE kind = 'agent.started'"
        ) > 0)
            .then_some(()))
        .is_some(),
        "the agent did not start"
    );
    // The servers listen once these ports answer.
    assert!(within(Duration::from_secs(10), || {
        client
            .command("nc")
            .args(["-z", SERVER_ADDR, "22"])
            .status()
            .ok()
            .filter(|s| s.success())
            .and(
                client
                    .command("nc")
                    .args(["-z", SERVER_ADDR, "8080"])
                    .status()
                    .ok(),
            )
            .filter(|s| s.success())
    })
    .is_some());
    // The link runs at 16 Mbit/s, like an office uplink rather than an in-memory
    // veth: a 4 MiB upload takes ~2 s. (A connection that opens, sends and closes
    // within one poll interval is reported at its end without its process — see
    // docs/protocol.md.)
    // tbf drops packets larger than its bucket: loopback's 64 KiB MTU would stall.
    run_ok(
        client
            .command("ip")
            .args(["link", "set", "lo", "mtu", "1500"]),
    );
    for dev in ["wlc", "lo"] {
        run_ok(client.command("tc").args([
            "qdisc", "replace", "dev", dev, "root", "tbf", "rate", "16mbit", "burst", "64kbit",
            "latency", "400ms",
        ]));
    }
    // Let the agent find the client namespace (it looks at every poll).
    std::thread::sleep(Duration::from_millis(600));

    let mut measured = Vec::new();
    // curl -T over HTTP.
    let up = payload(&w, "curl.bin", 3 << 20);
    run_client(
        client
            .command("curl")
            .args(["-sS", "-f", "-H", "Expect:", "-T"])
            .arg(&up)
            .arg(format!("http://{SERVER_ADDR}:8080/upload")),
    );
    let t = closed_transfer(&w, 8080, "/curl", None);
    within_5_percent(&t, 3 << 20);
    assert_eq!(t["allowlisted"], false);
    measured.push(("curl -T", t));

    // scp: the socket belongs to ssh, whose parent is scp. The file comes from the
    // sensitive folder: the event names it (scp holds it open while ssh sends).
    let up = payload(&w, "finance/budget.bin", 4 << 20);
    let mut scp = client.command("scp");
    scp.args(ssh_opts(&key)).arg(&up).arg(format!(
        "root@{SERVER_ADDR}:{}",
        w.path("scp.out").display()
    ));
    run_client(&mut scp);
    let t = closed_transfer(&w, 22, "/ssh", Some("/scp"));
    within_5_percent(&t, 4 << 20);
    let files = t["sensitive_files"].as_array().unwrap();
    assert!(
        files.iter().any(|f| f["path"] == up.display().to_string()
            && f["source"] == secret.display().to_string()),
        "{t:#}"
    );
    measured.push(("scp", t));

    // sftp, batch mode.
    let up = payload(&w, "sftp.bin", 4 << 20);
    let batch = w.path("sftp.batch");
    std::fs::write(
        &batch,
        format!("put {} {}\n", up.display(), w.path("sftp.out").display()),
    )
    .unwrap();
    let mut sftp = client.command("sftp");
    sftp.args(ssh_opts(&key))
        .arg("-b")
        .arg(&batch)
        .arg(format!("root@{SERVER_ADDR}"));
    run_client(&mut sftp);
    let t = closed_transfer(&w, 22, "/ssh", Some("/sftp"));
    within_5_percent(&t, 4 << 20);
    measured.push(("sftp", t));

    // rsync over ssh.
    let up = payload(&w, "rsync.bin", 4 << 20);
    let mut rsync = client.command("rsync");
    rsync
        .arg("-e")
        .arg(format!("ssh {}", ssh_opts(&key).join(" ")))
        .arg(&up)
        .arg(format!(
            "root@{SERVER_ADDR}:{}",
            w.path("rsync.out").display()
        ));
    run_client(&mut rsync);
    let t = closed_transfer(&w, 22, "/ssh", Some("/rsync"));
    within_5_percent(&t, 4 << 20);
    measured.push(("rsync", t));

    // nc to the other namespace, and nc over loopback inside the client namespace.
    let up = payload(&w, "nc.bin", 2 << 20);
    run_client(
        client
            .command("sh")
            .arg("-c")
            .arg(format!("nc -N {SERVER_ADDR} 9000 < {}", up.display())),
    );
    let t = closed_transfer(&w, 9000, "/nc.openbsd", None);
    within_5_percent(&t, 2 << 20);
    measured.push(("nc", t));
    run_client(
        client
            .command("sh")
            .arg("-c")
            .arg(format!("nc -N 127.0.0.1 9001 < {}", up.display())),
    );
    let t = within(Duration::from_secs(30), || {
        w.events("net.transfer", "json_extract(envelope, '$.event.data.remote_port') = 9001 AND json_extract(envelope, '$.event.data.phase') = 'closed'", &[]).pop()
    })
    .unwrap_or_else(|| {
        panic!(
            "no closed loopback transfer; loopback server: {}; transfers: {:#?}",
            _loopback.log_text(),
            w.events("net.transfer", "1", &[]).iter().map(|t| (t["remote_addr"].clone(), t["remote_port"].clone(), t["phase"].clone(), t["bytes_sent"].clone(), t["exe"].clone())).collect::<Vec<_>>()
        )
    });
    assert_eq!(t["remote_addr"], "127.0.0.1");
    within_5_percent(&t, 2 << 20);
    measured.push(("nc loopback", t));

    // Allowlisted by a host name the agent resolved (localhost): not reported.
    run_client(
        client
            .command("sh")
            .arg("-c")
            .arg(format!("nc -N 127.0.0.1 9002 < {}", up.display())),
    );
    assert!(within(Duration::from_secs(10), || _loopback
        .log_text()
        .contains(&format!("sink 9002 {}", 2 << 20))
        .then_some(()))
    .is_some());

    // The allowlisted destination is not reported (but the sink got the bytes).
    run_client(
        client
            .command("sh")
            .arg("-c")
            .arg(format!("nc -N {SERVER_ADDR} 9300 < {}", up.display())),
    );
    assert!(within(Duration::from_secs(10), || servers
        .log_text()
        .contains(&format!("sink 9300 {}", 2 << 20))
        .then_some(()))
    .is_some());
    std::thread::sleep(Duration::from_millis(800));
    assert!(w
        .events(
            "net.transfer",
            "json_extract(envelope, '$.event.data.remote_port') IN (9300, 9002)",
            &[]
        )
        .is_empty());

    for (what, t) in &measured {
        eprintln!(
            "MEASURED {what}: exe {} bytes_sent {} duration {} ms",
            t["exe"], t["bytes_sent"], t["duration_ms"]
        );
    }

    // Policy: the link at 4 Mbit/s, so the threshold is crossed mid-transfer.
    run_ok(client.command("tc").args([
        "qdisc", "replace", "dev", "wlc", "root", "tbf", "rate", "4mbit", "burst", "32kbit",
        "latency", "400ms",
    ]));
    let started = Instant::now();
    let mut nc: Child = client
        .command("sh")
        .arg("-c")
        .arg(format!("exec nc {SERVER_ADDR} 9100 < /dev/zero"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status =
        within(Duration::from_secs(30), || nc.try_wait().unwrap()).expect("nc was not stopped");
    let stopped_after = started.elapsed();
    assert!(!status.success(), "nc ended on its own: {status:?}");
    let killed = within(Duration::from_secs(10), || {
        w.events(
            "net.enforced",
            "json_extract(envelope, '$.event.data.rule_id') = 'no-bulk-nc'",
            &[],
        )
        .pop()
    })
    .expect("net.enforced for the kill");
    assert_eq!(killed["action"], "kill");
    assert_eq!(killed["ok"], true, "{killed:#}");
    let t = within(Duration::from_secs(10), || {
        w.events("net.transfer", "json_extract(envelope, '$.event.data.rule_id') = 'no-bulk-nc' AND json_extract(envelope, '$.event.data.phase') = 'threshold'", &[]).pop()
    })
    .expect("the threshold event naming the rule");
    assert_eq!(t["action"], "kill");
    let received = within(Duration::from_secs(10), || {
        servers.log_text().lines().find_map(|l| {
            l.strip_prefix("sink 9100 ")
                .map(|n| n.parse::<u64>().unwrap())
        })
    })
    .expect("the sink saw the connection end");
    // 4 Mbit/s for the ~30 s nc would otherwise have run: far less arrived.
    assert!(
        received < 8 << 20,
        "{received} bytes arrived after the kill"
    );
    eprintln!(
        "MEASURED kill: stopped after {stopped_after:?}, {received} bytes arrived, detail {}",
        killed["detail"]
    );

    if !require("block-destination needs `nft` (nftables)", have("nft")) {
        return;
    }
    let started = Instant::now();
    let mut blocked: Child = client
        .command("sh")
        .arg("-c")
        .arg(format!("exec nc {SERVER_ADDR} 9200 < /dev/zero"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = within(Duration::from_secs(30), || blocked.try_wait().unwrap())
        .expect("the blocked transfer did not stop");
    let stopped_after = started.elapsed();
    let e = within(Duration::from_secs(10), || {
        w.events(
            "net.enforced",
            "json_extract(envelope, '$.event.data.rule_id') = 'fence-9200'",
            &[],
        )
        .pop()
    })
    .expect("net.enforced for the block");
    assert_eq!(
        (e["action"].as_str(), e["ok"].as_bool()),
        (Some("block-destination"), Some(true)),
        "{e:#}"
    );
    assert!(e["expires"].is_string());
    let set = client
        .command("nft")
        .args(["list", "set", "inet", "weilan", "blocked4"])
        .output()
        .unwrap();
    let set = String::from_utf8_lossy(&set.stdout);
    assert!(
        set.contains(SERVER_ADDR) && set.contains("expires"),
        "{set}"
    );
    // A new connection to the blocked destination is refused at once.
    let again = client
        .command("nc")
        .args(["-z", "-w", "2", SERVER_ADDR, "9200"])
        .status()
        .unwrap();
    assert!(!again.success());
    eprintln!(
        "MEASURED block: stopped after {stopped_after:?} ({status:?}); set: {}",
        set.lines()
            .find(|l| l.contains(SERVER_ADDR))
            .unwrap_or("")
            .trim()
    );
}

/// Transfer tools as they start, from the kernel's process connector (available in
/// the initial network namespace, where this test runs the source in-process).
#[test]
fn transfer_tools_are_reported_as_they_start() {
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;
    use weilan_agent::source::net::tools::{ExecWatch, ProcConnector, ToolsSource};
    use weilan_agent::source::{EventSink, Observed, Source, SourceContext};
    use weilan_config::event::Event;

    if !require("transfer-tool test needs root", is_root())
        || !require(
            "transfer-tool test needs curl and nc",
            have("curl") && have("nc"),
        )
    {
        return;
    }
    if let Err(e) = ProcConnector::open() {
        eprintln!("SKIPPED: the process connector is not available here: {e:?}");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, mut rx) = mpsc::channel::<Observed>(4096);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext {
        sink: EventSink::new(tx, Arc::new(AtomicU64::new(0))),
        shutdown: shutdown.clone(),
    };
    let mut source = ToolsSource::new(Box::new(|| {
        ProcConnector::open().map(|w| Box::new(w) as Box<dyn ExecWatch>)
    }));
    let task = rt.spawn(async move { source.run(&ctx).await.map_err(|e| e.to_string()) });
    std::thread::sleep(Duration::from_millis(300));
    // A listener that never accepts keeps the clients alive while they are looked at.
    let hold = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hold.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.xlsx");
    std::fs::write(&file, b"x").unwrap();
    let mut spawned = vec![
        Command::new("curl")
            .args(["-sS", "-m", "5", "-T"])
            .arg(&file)
            .arg(format!("http://127.0.0.1:{port}/"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        Command::new("nc")
            .args(["-w", "5", "127.0.0.1", &port.to_string()])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap(),
        // A download is not a transfer tool.
        Command::new("curl")
            .args(["-sS", "-m", "5", "-o", "/dev/null"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ];
    let pids: Vec<u32> = spawned.iter().map(|c| c.id()).collect();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && seen.len() < 2 {
        if let Ok(Some(o)) =
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), rx.recv()).await })
        {
            if let Event::NetTransferTool(t) = o.event {
                if pids.contains(&t.pid) {
                    seen.push(t);
                }
            }
        }
    }
    for c in &mut spawned {
        let _ = c.kill();
        let _ = c.wait();
    }
    shutdown.cancel();
    rt.block_on(task).unwrap().unwrap();
    let tools: Vec<(&str, u32)> = seen.iter().map(|t| (t.tool.as_str(), t.pid)).collect();
    assert!(tools.contains(&("curl", pids[0])), "{seen:#?}");
    assert!(tools.contains(&("nc", pids[1])), "{seen:#?}");
    assert!(
        !tools.iter().any(|(_, p)| *p == pids[2]),
        "a download was reported: {seen:#?}"
    );
    let curl = seen.iter().find(|t| t.pid == pids[0]).unwrap();
    assert!(curl.args.iter().any(|a| a == "-T") && curl.user.as_deref() == Some("root"));
    drop(hold);
}
