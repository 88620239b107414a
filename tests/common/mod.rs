//! End-to-end harness: temp dirs with a real PKI, settings files, a private network
//! namespace per test (so brokers bind the real 8883 without clashing, and fake
//! uevents reach only this test's agent), real processes, and polling helpers.
//!
//! Every test that needs root, `ip` or a peer program (mosquitto) prints a visible
//! `SKIPPED:` line and returns when it is missing; CI installs all of them.
#![allow(dead_code)]

pub mod hosts;
pub mod mosquitto;
pub mod uplink;

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use weilan_collector::db::testing::TempDatabase;
pub use weilan_collector::db::{params, Conn, Engine, Location, Param, Sql};
use weilan_collector::pki::{self, PkiPaths};

pub const BROKER_PORT: u16 = 8883;

/// The fenced block after `marker` (an HTML comment such as
/// `<!-- postgres-test: database -->`) in the doc at `doc` (relative to the checkout).
pub fn doc_block(doc: &str, marker: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{doc}: {e}"));
    let after = text
        .split_once(marker)
        .unwrap_or_else(|| panic!("{doc} has no `{marker}`"))
        .1;
    let body = after
        .split_once("```")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .map(|(_, rest)| rest)
        .expect("a fenced block after the marker");
    body.split_once("```")
        .expect("the fenced block ends")
        .0
        .to_string()
}

/// Prints why a test is skipped, visibly, and returns false.
pub fn require(what: &str, ok: bool) -> bool {
    if !ok {
        eprintln!("SKIPPED: {what}");
        println!("SKIPPED: {what}");
    }
    ok
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn have(program: &str) -> bool {
    which(program).is_some()
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Root and iproute2: what every networked end-to-end test needs.
pub fn netns_available() -> bool {
    require("end-to-end test needs root (network namespaces)", is_root())
        && require("end-to-end test needs `ip` (iproute2)", have("ip"))
}

/// A network namespace with loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "wl-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        run_ok(Command::new("ip").args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"]));
        Netns { name }
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that has joined the namespace (sockets it opens live there).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).expect("open netns");
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// Broadcasts a kernel-format uevent on NETLINK_KOBJECT_UEVENT group 1 inside the
    /// namespace: exactly what the kernel sends when a device appears.
    pub fn send_uevent(&self, action: &str, devpath: &Path, subsystem: &str, devtype: &str) {
        static SEQ: AtomicU32 = AtomicU32::new(1000);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let devpath = devpath.display().to_string();
        let msg = format!(
            "{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0DEVTYPE={devtype}\0SEQNUM={seq}\0"
        );
        self.run_in(move || {
            use netlink_sys::{protocols::NETLINK_KOBJECT_UEVENT, Socket, SocketAddr};
            let mut s = Socket::new(NETLINK_KOBJECT_UEVENT).expect("uevent socket");
            s.bind_auto().expect("bind");
            s.send_to(msg.as_bytes(), &SocketAddr::new(0, 1), 0)
                .expect("send uevent");
        });
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process killed (SIGKILL) on drop; its stderr goes to a file for diagnosis.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf, name: &str) -> Proc {
        let err = fs::File::create(&log).expect("log file");
        cmd.stdout(Stdio::null()).stderr(err).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child,
            log,
            name: name.into(),
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(self.pid(), sig);
    }

    /// Peak resident set size (VmHWM) in KiB, while running.
    pub fn peak_rss_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait (orderly stop).
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `weilan` multi-call binary (`weilan agent ...`, `weilan collector ...`).
pub fn weilan_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weilan"))
}

/// Waits until `f` returns `Some`, or panics with `what` and `diag()`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    diag: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", diag());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A test's world: temp dir, PKI, policy, fake sysfs, settings files.
pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: PkiPaths,
    /// With `WEILAN_TEST_STORE=postgresql`: the collector's database, a PostgreSQL
    /// database of this test's own (dropped with it) instead of the SQLite file.
    pub postgres: Option<TempDatabase>,
}

/// The engine the end-to-end tests give the collector: PostgreSQL in the
/// `on_postgresql` binary (the same tests again, `tests/on_postgresql.rs`) or with
/// `WEILAN_TEST_STORE=postgresql`; SQLite otherwise. Without a PostgreSQL server the
/// PostgreSQL run of a test says `SKIPPED` and ends as passed (nextest runs each
/// test in a process of its own), unless `WEILAN_REQUIRE_POSTGRES` is set, as in CI.
pub fn postgres_for_this_run() -> Option<TempDatabase> {
    let in_postgresql_binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|name| name.starts_with("on_postgresql"));
    if !in_postgresql_binary && std::env::var("WEILAN_TEST_STORE").as_deref() != Ok("postgresql") {
        return None;
    }
    match TempDatabase::create("e2e") {
        Some(db) => Some(db),
        None => {
            // TempDatabase::create printed `SKIPPED: …` (and fails with
            // WEILAN_REQUIRE_POSTGRES); the SQLite binary runs this test.
            std::process::exit(0)
        }
    }
}

/// `condition`, written for SQLite, for PostgreSQL: `json_extract(envelope, '$.a.b')`
/// becomes the same field as text (test conditions compare it with text).
pub fn for_engine(engine: Engine, sql: &str) -> String {
    if engine == Engine::Sqlite {
        return sql.to_string();
    }
    // A field compared with numbers is a number to PostgreSQL too (text = 9001 is an
    // error there, and the query would find nothing).
    let numeric = regex::Regex::new(
        r"json_extract\(envelope,\s*'\$\.([A-Za-z0-9_.]+)'\)(\s*(?:=|<>|!=|>=|<=|>|<)\s*-?\d+\b|\s+IN\s*\(\s*-?\d+(?:\s*,\s*-?\d+)*\s*\))",
    )
    .unwrap();
    let sql = numeric.replace_all(sql, |c: &regex::Captures| {
        format!(
            "CAST((envelope::jsonb #>> '{{{}}}') AS BIGINT){}",
            c[1].replace('.', ","),
            &c[2]
        )
    });
    let re = regex::Regex::new(r"json_extract\(envelope,\s*'\$\.([A-Za-z0-9_.]+)'\)").unwrap();
    re.replace_all(&sql, |c: &regex::Captures| {
        format!("(envelope::jsonb #>> '{{{}}}')", c[1].replace('.', ","))
    })
    // A condition of `1` (every row) is an integer to PostgreSQL, not a truth value.
    .replace("(1)", "(TRUE)")
}

pub const AGENT: &str = "ws-e2e";

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiPaths::new(dir.path().join("pki"));
        pki::init(&pki, &["weilan-collector".into(), "127.0.0.1".into()]).expect("pki init");
        pki::issue_agent(&pki, AGENT).expect("issue agent");
        fs::create_dir_all(dir.path().join("sys")).unwrap();
        fs::write(dir.path().join("mountinfo"), "").unwrap();
        let w = World {
            dir,
            pki,
            postgres: postgres_for_this_run(),
        };
        w.write_policy(&[]);
        w
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn sysfs(&self) -> PathBuf {
        self.path("sys")
    }

    pub fn write_policy(&self, known_serials: &[&str]) {
        let mut p = String::from("version = \"e2e-1\"\n");
        for (i, s) in known_serials.iter().enumerate() {
            p.push_str(&format!(
                "[[usb.known_devices]]\nlabel = \"known {i}\"\nserial = \"{s}\"\n"
            ));
        }
        fs::write(self.path("policy.toml"), p).unwrap();
    }

    /// Collector settings; `external` points it at a broker on 127.0.0.1:8883.
    pub fn collector_toml(&self, external: bool, extra: &str) -> PathBuf {
        let mode = if external { "external" } else { "embedded" };
        let text = format!(
            "[broker]\nmode = \"{mode}\"\nlisten = \"127.0.0.1:{BROKER_PORT}\"\nhost = \"127.0.0.1\"\nport = {BROKER_PORT}\n\n\
             [tls]\nca = \"pki/ca.pem\"\nserver_cert = \"pki/server.pem\"\nserver_key = \"pki/server-key.pem\"\n\
             client_cert = \"pki/collector.pem\"\nclient_key = \"pki/collector-key.pem\"\n\n\
             [store]\npath = \"weilan.db\"\n{url}[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n{extra}\n",
            url = self.store_url_line()
        );
        let p = self.path("collector.toml");
        fs::write(&p, text).unwrap();
        p
    }

    /// Agent settings for `name` (its cert must exist), trusting `ca`.
    pub fn agent_toml(&self, name: &str, ca: &str, extra: &str) -> PathBuf {
        self.agent_toml_with(name, ca, "", extra)
    }

    /// Like [`World::agent_toml`], with extra `[collector]` keys.
    pub fn agent_toml_with(
        &self,
        name: &str,
        ca: &str,
        collector_extra: &str,
        extra: &str,
    ) -> PathBuf {
        fs::create_dir_all(self.path(&format!("state-{name}"))).unwrap();
        // Tests that provoke re-sends shorten it; 3 s keeps the others fast.
        let ack = std::env::var("WEILAN_TEST_ACK_TIMEOUT").unwrap_or_else(|_| "3".into());
        let ack = if collector_extra.contains("ack_timeout_secs") {
            String::new()
        } else {
            format!("ack_timeout_secs = {ack}")
        };
        let text = format!(
            "[agent]\nhost_role = \"workstation\"\nstate_dir = \"state-{name}\"\npolicy = \"policy.toml\"\n\n\
             [collector]\nhost = \"127.0.0.1\"\nport = {BROKER_PORT}\nserver_name = \"weilan-collector\"\nca = \"{ca}\"\n{ack}\n{collector_extra}\n\n\
             [tls]\ncert = \"pki/agents/{name}.pem\"\nkey = \"pki/agents/{name}-key.pem\"\n\n\
             [usb]\nsysfs_root = \"sys\"\nmountinfo = \"mountinfo\"\nmount_poll_ms = 200\ndev_root = \"dev\"\n{extra}\n"
        );
        let p = self.path(&format!("agent-{name}.toml"));
        fs::write(&p, text).unwrap();
        p
    }

    pub fn start_collector(&self, ns: &Netns, config: &Path) -> Proc {
        let mut c = ns.command(weilan_bin());
        c.args(["collector", "serve", "--config"]).arg(config);
        c.env("RUST_LOG", "info");
        Proc::spawn(c, self.path("collector.log"), "collector")
    }

    pub fn start_agent(&self, ns: &Netns, config: &Path, name: &str) -> Proc {
        let mut c = ns.command(weilan_bin());
        c.args(["agent", "run", "--config"]).arg(config);
        c.env("RUST_LOG", "info");
        Proc::spawn(c, self.path(&format!("agent-{name}.log")), name)
    }

    /// Starts an agent and waits (up to a minute) until the collector has stored its
    /// first events.
    pub fn start_agent_stored(&self, ns: &Netns, config: &Path, name: &str) -> Proc {
        let agent = self.start_agent(ns, config, name);
        wait_for(
            "agent up",
            Duration::from_secs(60),
            || (self.count("SELECT COUNT(*) FROM events") > 0).then_some(()),
            || agent.log_text(),
        );
        agent
    }

    /// `url = "…"` for `[store]` when the collector uses PostgreSQL.
    pub fn store_url_line(&self) -> String {
        self.postgres
            .as_ref()
            .map(|pg| format!("url = \"{}\"\n", pg.url()))
            .unwrap_or_default()
    }

    /// Where the collector's database is.
    pub fn store_location(&self) -> Location {
        match &self.postgres {
            Some(pg) => pg.location(),
            None => Location::Sqlite(self.path("weilan.db")),
        }
    }

    /// Whether the collector has created its database yet.
    pub fn db_exists(&self) -> bool {
        match &self.postgres {
            Some(_) => self
                .db()
                .exists(
                    "SELECT 1 FROM information_schema.tables WHERE table_name = 'weilan_schema' AND table_schema = current_schema()",
                    params![],
                )
                .unwrap_or(false),
            None => self.path("weilan.db").exists(),
        }
    }

    pub fn db(&self) -> Conn {
        Conn::open(&self.store_location()).expect("open db")
    }

    /// `SELECT COUNT(*) ...` on the collector's database (0 while it does not exist).
    pub fn count(&self, sql: &str) -> i64 {
        if !self.db_exists() {
            return 0;
        }
        let db = self.db();
        let sql = match db.engine() {
            Engine::Sqlite => sql.to_string(),
            // PostgreSQL's SUM is NUMERIC and a JSON field text: one integer either way.
            Engine::Postgres => {
                format!("SELECT CAST(({}) AS BIGINT)", for_engine(db.engine(), sql))
            }
        };
        db.query_row(&sql, params![], |r| r.get(0)).unwrap_or(0)
    }

    /// The `data` of stored events of `kind` that also satisfy `condition` (SQL over
    /// `envelope`, with `?2`, `?3`, ... bound to `params`), oldest first.
    pub fn events(&self, kind: &str, condition: &str, params: &[&str]) -> Vec<serde_json::Value> {
        if !self.db_exists() {
            return vec![];
        }
        let db = self.db();
        let sql = for_engine(
            db.engine(),
            &format!(
                "SELECT envelope FROM events WHERE kind = ?1 AND ({condition}) ORDER BY epoch, seq"
            ),
        );
        let mut all: Vec<&dyn Param> = vec![&kind];
        all.extend(params.iter().map(|p| p as &dyn Param));
        db.query_map(&sql, &all, |r| r.get::<String>(0))
            .map(|rows| {
                rows.into_iter()
                    .filter_map(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                    .map(|v| v["event"]["data"].clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn alert_lines(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.path("alerts.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// rustls client config for ad-hoc test clients (no server-name pinning needed:
/// the broker certificate names 127.0.0.1).
pub fn test_client_tls(
    ca: &Path,
    cert_key: Option<(&Path, &Path)>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(weilan_config::pem::load_cert(ca).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(weilan_config::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert_key {
        Some((c, k)) => builder
            .with_client_auth_cert(
                weilan_config::pem::load_certs(c).unwrap(),
                weilan_config::pem::load_key(k).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    std::sync::Arc::new(config)
}

/// Connects an MQTT client inside `ns` and runs `f` with it on a current-thread runtime.
pub fn with_mqtt_client<T: Send + 'static>(
    ns: &Netns,
    client_id: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    f: impl FnOnce(
            rumqttc::AsyncClient,
            rumqttc::EventLoop,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    let client_id = client_id.to_string();
    ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", BROKER_PORT);
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
            opts.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
            opts.set_keep_alive(Duration::from_secs(5));
            let (client, eventloop) = rumqttc::AsyncClient::new(opts, 64);
            f(client, eventloop).await
        })
    })
}

/// Polls the event loop until a ConnAck (Ok) or a connection error (Err).
pub async fn connect(eventloop: &mut rumqttc::EventLoop) -> Result<(), String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timeout".into()),
        }
    }
}

/// Connects with `tls` as `client_id` and publishes each (topic, payload) at QoS 1,
/// returning once the broker acknowledged them all.
pub fn publish_all(
    ns: &Netns,
    client_id: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    messages: Vec<(String, Vec<u8>)>,
) {
    let n = messages.len();
    with_mqtt_client(ns, client_id, tls, move |client, mut el| {
        Box::pin(async move {
            connect(&mut el).await.expect("connect");
            let publisher = spawn_publisher(client, messages);
            drive_until_pubacks(&mut el, n).await.expect("pubacks");
            publisher.await.unwrap();
        })
    });
}

/// Publishes each (topic, payload) at QoS 1 from a task of its own: more messages than
/// the request channel holds must not wait for an event loop nobody polls yet. The
/// task returns the client (dropping it would end the connection early).
fn spawn_publisher(
    client: rumqttc::AsyncClient,
    messages: Vec<(String, Vec<u8>)>,
) -> tokio::task::JoinHandle<rumqttc::AsyncClient> {
    tokio::spawn(async move {
        for (topic, p) in messages {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, p)
                .await
                .unwrap();
        }
        client
    })
}

/// Like [`publish_all`], subscribed first to `replies` (QoS 1): returns the payloads
/// that arrive there until `expected` have, or 30 s without one.
pub fn publish_collecting(
    ns: &Netns,
    client_id: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    replies: &str,
    messages: Vec<(String, Vec<u8>)>,
    expected: usize,
) -> Vec<Vec<u8>> {
    let replies = replies.to_string();
    with_mqtt_client(ns, client_id, tls, move |client, mut el| {
        Box::pin(async move {
            connect(&mut el).await.expect("connect");
            client
                .subscribe(replies, rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => break,
                    Ok(Ok(_)) => {}
                    other => panic!("no SUBACK: {other:?}"),
                }
            }
            let publisher = spawn_publisher(client, messages);
            let mut got = Vec::new();
            while got.len() < expected {
                match tokio::time::timeout(Duration::from_secs(30), el.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                        got.push(p.payload.to_vec())
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("connection lost after {} replies: {e}", got.len()),
                    Err(_) => break,
                }
            }
            drop(publisher.await.unwrap());
            got
        })
    })
}

/// Publishes one message on a topic the broker's ACL closes to this certificate and
/// returns how the broker answered: Mosquitto acknowledges and then drops the
/// connection (MQTT 3.1.1 has no "denied" code), so the message never reaches the
/// collector.
pub fn publish_denied(
    ns: &Netns,
    client_id: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), String> {
    let topic = topic.to_string();
    with_mqtt_client(ns, client_id, tls, move |client, mut el| {
        Box::pin(async move {
            connect(&mut el).await?;
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| e.to_string())?;
            // The PUBACK, then the connection's end (or a timeout if it stays up).
            drive_until_pubacks(&mut el, 2).await
        })
    })
}

/// Polls until the broker acknowledged `n` publishes (or errors).
pub async fn drive_until_pubacks(
    eventloop: &mut rumqttc::EventLoop,
    n: usize,
) -> Result<(), String> {
    let mut acks = 0;
    while acks < n {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("timeout after {acks} pubacks")),
        }
    }
    Ok(())
}

/// `last` key and record count of an agent's journal, via `weilan agent journal`.
pub fn journal_status(config: &Path) -> (u64, u64) {
    let out = Command::new(weilan_bin())
        .args(["agent", "journal", "--config"])
        .arg(config)
        .output()
        .expect("weilan agent journal");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
    };
    let last_seq = field("last")
        .and_then(|k| k.rsplit(':').next().and_then(|s| s.parse().ok()))
        .unwrap_or(0);
    let records = field("records").and_then(|r| r.parse().ok()).unwrap_or(0);
    (last_seq, records)
}

/// The agent's journal: last and acknowledged keys (epoch, seq), from
/// `weilan agent journal` ((0, 0) for none).
pub fn journal_keys(config: &Path) -> ((u64, u64), (u64, u64)) {
    let out = Command::new(weilan_bin())
        .args(["agent", "journal", "--config"])
        .arg(config)
        .output()
        .expect("weilan agent journal");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|k| {
                let (e, s) = k.trim().split_once(':')?;
                Some((e.parse().ok()?, s.parse().ok()?))
            })
            .unwrap_or((0, 0))
    };
    (key("last "), key("acked "))
}

/// A burst of `2 * pairs` USB events: a (non-storage, so reported at once) device
/// announced and removed `pairs` times, paced so the kernel socket never overflows.
pub fn usb_burst(ns: &Netns, sysfs: &Path, port: &str, serial: &str, pairs: usize) {
    usb_burst_paced(ns, sysfs, port, serial, pairs, 250);
}

/// [`usb_burst`] at `pairs_per_50ms` add/remove pairs every 50 ms.
pub fn usb_burst_paced(
    ns: &Netns,
    sysfs: &Path,
    port: &str,
    serial: &str,
    pairs: usize,
    pairs_per_50ms: usize,
) {
    use weilan_agent::source::usb::sysfs::fake::{add_stick, FakeStick};
    let devpath = add_stick(
        sysfs,
        &FakeStick {
            port,
            vid: "046d",
            pid: "c077",
            serial,
            classes: &[0x03],
            disk: None,
        },
    );
    let path = format!("/run/netns/{}", ns.name);
    let devpath = devpath.display().to_string();
    std::thread::spawn(move || {
        let f = fs::File::open(&path).expect("netns");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        use netlink_sys::{protocols::NETLINK_KOBJECT_UEVENT, Socket, SocketAddr};
        let mut s = Socket::new(NETLINK_KOBJECT_UEVENT).expect("socket");
        s.bind_auto().expect("bind");
        let dest = SocketAddr::new(0, 1);
        for i in 0..pairs {
            for action in ["add", "remove"] {
                let msg = format!(
                    "{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0SEQNUM={}\0",
                    i * 2
                );
                s.send_to(msg.as_bytes(), &dest, 0).expect("send");
            }
            if i % pairs_per_50ms == pairs_per_50ms - 1 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .join()
    .expect("burst thread");
}

impl World {
    /// Stored `usb.attached` events of the device with `serial`.
    pub fn attached_count(&self, serial: &str) -> i64 {
        self.count(&format!(
            "SELECT COUNT(*) FROM events WHERE kind = 'usb.attached' \
             AND json_extract(envelope, '$.event.data.serial') = '{serial}'"
        ))
    }

    /// Distinct stored USB events of the burst device `serial`.
    pub fn burst_count(&self, serial: &str) -> i64 {
        // `present_at_start` is a JSON boolean: 0/1 to SQLite, 'false'/'true' as text.
        let not_present = match &self.postgres {
            None => "COALESCE(json_extract(envelope, '$.event.data.present_at_start'), 0) = 0",
            Some(_) => {
                "COALESCE(json_extract(envelope, '$.event.data.present_at_start'), 'false') = 'false'"
            }
        };
        self.count(&format!(
            "SELECT COUNT(DISTINCT event_id) FROM events WHERE kind IN ('usb.attached', 'usb.detached') \
             AND json_extract(envelope, '$.event.data.serial') = '{serial}' AND {not_present}"
        ))
    }
}

/// Runs `weilan collector command --config CONFIG --agent AGENT --reason R ARGS…`
/// through `c` (a command for [`weilan_bin`], in a namespace or not); panics with
/// its stderr when it fails.
pub fn collector_command(mut c: Command, config: &str, agent: &str, args: &[&str]) {
    let out = c
        .args(["collector", "command", "--config", config, "--agent", agent])
        .args(["--reason", "test incident"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "collector command {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth pair between two namespaces: `wlc` with `client_addr`/24 in `client`, `wlb`
/// with `server_addr`/24 in `server` — addresses that exist only there.
pub fn link_namespaces(client: &Netns, client_addr: &str, server: &Netns, server_addr: &str) {
    let peer = format!("wls{}", std::process::id() % 100_000);
    run_ok(client.command("ip").args([
        "link",
        "add",
        "wlc",
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "netns",
        &server.name,
    ]));
    run_ok(
        server
            .command("ip")
            .args(["link", "set", &peer, "name", "wlb"]),
    );
    run_ok(
        client
            .command("ip")
            .args(["addr", "add", &format!("{client_addr}/24"), "dev", "wlc"]),
    );
    run_ok(
        server
            .command("ip")
            .args(["addr", "add", &format!("{server_addr}/24"), "dev", "wlb"]),
    );
    run_ok(client.command("ip").args(["link", "set", "wlc", "up"]));
    run_ok(server.command("ip").args(["link", "set", "wlb", "up"]));
}

/// sshd on `addr`:22 in `server` with a throw-away host key, accepting the returned
/// key for root; `extra` is appended to its configuration. Its log goes to syslog
/// when `syslog` (the access test reads it there), else to `sshd.log`.
pub fn start_sshd(
    w: &World,
    server: &Netns,
    addr: &str,
    extra: &str,
    syslog: bool,
) -> (Proc, PathBuf) {
    let dir = w.path("ssh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let key = dir.join("id_ed25519");
    for (k, t) in [(&key, "ed25519"), (&dir.join("host_key"), "ed25519")] {
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", t, "-N", "", "-f"])
                .arg(k),
        );
    }
    std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys")).unwrap();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {addr}\nPort 22\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
             StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n{extra}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut c = server.command(which("sshd").expect("sshd"));
    c.arg("-D");
    if !syslog {
        c.arg("-e");
    }
    c.arg("-f").arg(&config);
    let p = Proc::spawn(c, w.path("sshd.log"), "sshd");
    (p, key)
}

/// ssh options for the test's sshd: the key, no host-key prompts, no passwords.
pub fn ssh_opts(key: &Path) -> Vec<String> {
    vec![
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ]
}

/// docs/deployment.md §7's transfer-stick policy entry and the identity it registers:
/// (entry, vid, pid, serial).
pub fn transfer_stick_entry() -> (String, String, String, String) {
    let entry = doc_block("docs/deployment.md", "<!-- airgap-test: transfer-stick -->");
    let field = |name: &str| {
        entry
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("§7's transfer-stick entry has no {name}:\n{entry}"))
            .to_string()
    };
    let (vid, pid, serial) = (field("vid"), field("pid"), field("serial"));
    (entry, vid, pid, serial)
}

/// Asserts that `db` holds every agent's `kind` events exactly once, contiguous:
/// no (agent, epoch, seq) twice, `agents` agents, and for each as many as
/// `expected(agent)`.
pub fn assert_each_event_once(
    db: &Conn,
    kind: &str,
    agents: usize,
    expected: impl Fn(&str) -> i64,
) {
    let doubled: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM (SELECT agent_id, epoch, seq FROM events GROUP BY agent_id, epoch, seq HAVING COUNT(*) > 1) AS d",
            params![],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(doubled, 0, "events stored twice");
    let per_agent: Vec<(String, i64, i64)> = db
        .query_map(
            "SELECT agent_id, COUNT(DISTINCT seq), MAX(seq) - MIN(seq) + 1 FROM events WHERE kind = ?1 GROUP BY agent_id ORDER BY agent_id",
            params![kind],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(per_agent.len(), agents, "agents with {kind} events");
    for (agent, distinct, span) in &per_agent {
        let want = expected(agent);
        assert_eq!(
            (*distinct, *span),
            (want, want),
            "{agent}: contiguous, each once"
        );
    }
}

/// The docs/deployment.md shell block after `marker`, as written, with
/// `weilan-collector pki` and `broker-acl` run through this build, the CA host's
/// PKI directory at `pki_dir` and the broker's ACL at `acl`; run with `sh -e` in
/// `cwd`, which must succeed.
pub fn run_documented_pki_block(marker: &str, pki_dir: &str, acl: &Path, cwd: &Path) {
    let documented = doc_block("docs/deployment.md", marker);
    let bin = weilan_bin().display().to_string();
    let script = documented
        .replace("weilan-collector pki", &format!("{bin} collector pki"))
        .replace(
            "weilan-collector broker-acl",
            &format!("{bin} collector broker-acl"),
        )
        .replace("/etc/weilan/pki", pki_dir)
        .replace("/etc/mosquitto/weilan.acl", &acl.display().to_string());
    let out = Command::new("sh")
        .args(["-ec", &script])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `weilan collector ARGS…`, which must succeed; its standard output.
pub fn collector_cli(args: &[&str]) -> String {
    let out = Command::new(weilan_bin())
        .arg("collector")
        .args(args)
        .output()
        .expect("weilan collector");
    assert!(
        out.status.success(),
        "weilan collector {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout` (`None`
/// then; the caller says what was missing).
pub fn within<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A QEMU guest run by the scripts in tests/hil (boot with `run.sh`, commands with
/// `gexec.sh`); stopped when dropped.
pub struct Hil {
    pub out: PathBuf,
    pub run: PathBuf,
    pub scripts: PathBuf,
    started: Instant,
}

impl Hil {
    /// The guest build (`HIL_OUT`, default /tmp/weilan-hil) and a fresh run directory;
    /// `None` (with a visible SKIPPED line) when QEMU, the guest or the static agent
    /// is missing.
    pub fn prepared(what: &str) -> Option<Hil> {
        let out =
            PathBuf::from(std::env::var("HIL_OUT").unwrap_or_else(|_| "/tmp/weilan-hil".into()));
        let ready = have("qemu-system-x86_64")
            && out.join("initramfs.cpio.gz").exists()
            && out.join("vmlinuz").exists()
            && static_agent().exists();
        if !require(
            &format!("{what} needs QEMU, the guest and the static agent: run tests/hil/prepare.sh"),
            ready,
        ) {
            return None;
        }
        fs::create_dir_all("/tmp/weilan-hil-runs").unwrap();
        Some(Hil {
            run: tempfile::Builder::new()
                .prefix("run-")
                .tempdir_in("/tmp/weilan-hil-runs")
                .unwrap()
                .keep(),
            scripts: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hil"),
            out,
            started: Instant::now(),
        })
    }

    /// Prints a timestamped step line: the output a timed-out test leaves then names
    /// the step it was in.
    pub fn step(&self, what: &str) {
        println!("[{:6.1} s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Boots the guest (`run.sh --bg` with `args`). An emulated boot that is not ready
    /// within 90 s (seen once in CI, on a loaded host) is killed and tried once more,
    /// visibly; a second failure fails the test with run.sh's output.
    pub fn boot(&self, args: &[&str]) {
        let mut argv = vec!["--bg", "--boot-timeout", "90"];
        argv.extend_from_slice(args);
        for attempt in 1..=2 {
            self.step(&format!("booting the guest (attempt {attempt})"));
            let (rc, text) = self.sh("run.sh", &argv);
            if rc == 0 {
                self.step("guest ready");
                return;
            }
            assert!(rc == 124 && attempt == 1, "guest boot (exit {rc}): {text}");
            println!("RETRY: the guest was not ready within 90 s: {text}");
        }
    }

    pub fn script(&self, name: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(self.scripts.join(name));
        c.env("HIL_OUT", &self.out).env("HIL_RUN", &self.run);
        c
    }

    /// Runs a script; returns its exit status and output.
    pub fn sh(&self, name: &str, args: &[&str]) -> (i32, String) {
        self.step(&format!("{name} {}", args.join(" ")));
        let out = self.script(name).args(args).output().expect("script");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    pub fn gexec(&self, cmd: &str) -> (i32, String) {
        self.sh("gexec.sh", &["-t", "30", cmd])
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.run.join("share/out/agent.log")).unwrap_or_default()
    }
}

impl Drop for Hil {
    fn drop(&mut self) {
        let _ = self.script("stop.sh").arg("3").output();
        // A passed run's directory (copies of the agent and the sticks, ~100 MB) goes;
        // a failed one's stays for its logs.
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.run);
        }
    }
}

/// Starts a collector (embedded broker) on a free port of the host's loopback, which
/// the QEMU guest reaches as 10.0.2.2; returns it, the port and its settings file.
pub fn start_collector_for_guest(w: &World) -> (Proc, u16, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ccfg = w.collector_toml(false, "").to_string_lossy().into_owned();
    let text = fs::read_to_string(&ccfg)
        .unwrap()
        .replace(&BROKER_PORT.to_string(), &port.to_string());
    fs::write(&ccfg, text).unwrap();
    let mut c = Command::new(weilan_bin());
    c.args(["collector", "serve", "--config", &ccfg]);
    (
        Proc::spawn(c, w.path("collector.log"), "collector"),
        port,
        ccfg,
    )
}

/// The reasons of the quarantined payloads, oldest first.
pub fn quarantine_reasons(w: &World) -> Vec<String> {
    w.db()
        .query_map(
            "SELECT reason FROM quarantine ORDER BY id",
            params![],
            |r| r.get(0),
        )
        .unwrap()
}

/// The statically linked agent `tests/hil/prepare.sh` builds for the guest.
pub fn static_agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/hil/weilan-agent")
}

/// As `own_id` (whose certificate `tls` carries): connects with `victim`'s and with the
/// collector's client id and publishes on `victim`'s events topic each time (a
/// publish the ACL denies ends that connection); then, under its own id,
/// subscribes to every filter that could reach another agent's messages and listens
/// for `listen` (long enough for the first agent's 30 s heartbeat and its ack).
/// Returns what arrived.
pub fn probe_as_other_agent(
    ns: &Netns,
    tls: std::sync::Arc<rustls::ClientConfig>,
    victim: &'static str,
    own_id: &'static str,
    listen: Duration,
) -> Vec<(String, Vec<u8>)> {
    // Forged publishes, each in a session of its own (Mosquitto disconnects a client
    // that publishes where its ACL refuses): on the victim's events topic under the
    // victim's and the collector's client ids, and a retained "collector offline",
    // which would make every agent hold its batches.
    let victim_events = format!("weilan/v1/agents/{victim}/events");
    for (client_id, topic, retain) in [
        (victim, victim_events.clone(), false),
        ("weilan-collector", victim_events, false),
        (
            own_id,
            "weilan/v1/collectors/weilan-collector/presence".to_string(),
            true,
        ),
    ] {
        with_mqtt_client(ns, client_id, tls.clone(), move |client, mut eventloop| {
            Box::pin(async move {
                if let Err(e) = connect(&mut eventloop).await {
                    panic!("the probe could not connect as {client_id}: {e}");
                }
                let _ = client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, retain, b"FORGED".to_vec())
                    .await;
                let end = tokio::time::Instant::now() + Duration::from_secs(1);
                while let Ok(Ok(_)) = tokio::time::timeout_at(end, eventloop.poll()).await {}
            })
        });
    }
    with_mqtt_client(ns, own_id, tls, move |client, mut eventloop| {
        Box::pin(async move {
            let mut got = Vec::new();
            if let Err(e) = connect(&mut eventloop).await {
                panic!("the probe could not connect: {e}");
            }
            for filter in [
                "#".to_string(),
                "weilan/v1/#".into(),
                "weilan/v1/agents/+/events".into(),
                "weilan/v1/agents/+/status".into(),
                format!("weilan/v1/agents/{victim}/acks"),
                format!("weilan/v1/agents/{victim}/commands"),
                "weilan/v1/policy".into(),
                "weilan/v1/collectors/+/presence".into(),
            ] {
                let _ = client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await;
            }
            let end = tokio::time::Instant::now() + listen;
            while let Ok(ev) = tokio::time::timeout_at(end, eventloop.poll()).await {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        got.push((p.topic.clone(), p.payload.to_vec()))
                    }
                    Ok(_) => {}
                    Err(e) => panic!("the probe lost its connection: {e}"),
                }
            }
            got
        })
    })
}

/// `n` idle sockets in `ns`: n/2 loopback connections (client and accepted ends), each
/// client having sent 1 KiB. They live as long as the returned streams.
pub fn loopback_sockets(ns: &Netns, n: usize) -> Vec<std::net::TcpStream> {
    ns.run_in(move || {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut all = Vec::with_capacity(n);
        for _ in 0..n / 2 {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            let (s, _) = listener.accept().unwrap();
            c.write_all(&[7u8; 1024]).unwrap();
            all.push(c);
            all.push(s);
        }
        all
    })
}
