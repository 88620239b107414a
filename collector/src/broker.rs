//! The embedded broker: a Mosquitto that the collector configures, starts, watches,
//! restarts and stops (`[broker] mode = "embedded"`).
//!
//! Why Mosquitto rather than an in-process broker is recorded in `ARCHITECTURE.md`
//! ("The broker"): it enforces what a fleet needs and an in-process broker measured
//! here did not (identity = certificate CN, client id bound to it, per-identity topic
//! ACLs, a CRL, non-blocking TLS handshakes, no loss under a burst), and the embedded
//! mode then runs exactly the ACL shipped for an external Mosquitto
//! (`config/mosquitto/weilan.acl`, compiled in and written out unchanged), so one
//! access model is tested once for both.
//!
//! The generated `mosquitto.conf`, the ACL copy and Mosquitto's persistence live in
//! `<database directory>/broker/`; the broker writes its log to its stderr, which is
//! read here: every line goes to `tracing` (target `mosquitto`), and the lines that
//! say a client was refused (an oversized packet, descriptors exhausted) become
//! [`BrokerNotice`]s that the collector raises as alerts. Mosquitto is started with
//! a parent-death signal, so a collector killed with -9 does not leave it holding
//! the port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The ACL shipped for external Mosquitto installs, byte for byte.
pub const SHIPPED_ACL: &str = include_str!("../../config/mosquitto/weilan.acl");

/// The shipped ACL for a group of collectors sharing the ingest
/// (`broker.shared_group`): the collector's block once more for each further
/// collector named (`pki issue-collector`), under its own user and presence topic.
/// With no further names it is the shipped ACL, byte for byte.
pub fn acl_for_collectors(further: &[String]) -> Result<String, String> {
    const FIRST: &str = "user weilan-collector\n";
    let block = SHIPPED_ACL
        .find(FIRST)
        .map(|at| &SHIPPED_ACL[at..])
        .ok_or("the shipped ACL has no `user weilan-collector` block")?;
    let mut acl = SHIPPED_ACL.to_string();
    for name in further {
        let valid = name
            .strip_prefix("weilan-collector-")
            .is_some_and(|rest| !rest.is_empty())
            && weilan_config::topics::valid_agent_id(name);
        if !valid {
            return Err(format!(
                "`{name}` is not a collector name (`weilan-collector-` and letters, digits, `.`, `_`, `-`)"
            ));
        }
        acl.push_str(&format!(
            "\n# The further collector `{name}` (pki issue-collector).\n"
        ));
        acl.push_str(&block.replace(FIRST, &format!("user {name}\n")).replace(
            "collectors/weilan-collector/",
            &format!("collectors/{name}/"),
        ));
    }
    Ok(acl)
}

/// The block `acl_for_districts` adds for one district: it writes only its own
/// forwarded batches and reads only its own acks from the province.
fn district_block(name: &str) -> String {
    format!(
        "\n# The district `{name}` (pki issue-district): forwards its agents' batches and\n\
         # reads the province's acks, nothing else.\n\
         user {name}\n\
         topic write weilan/v1/federation/{name}/batches/+\n\
         topic read weilan/v1/federation/{name}/acks\n"
    )
}

/// `acl` with a block for each district named (`pki issue-district`), for the
/// province's broker (federation, docs/deployment.md §12).
pub fn acl_for_districts(mut acl: String, districts: &[String]) -> Result<String, String> {
    for name in districts {
        if !weilan_config::settings::federation::valid_district_name(name) {
            return Err(format!(
                "`{name}` is not a district name (`weilan-district-` and letters, digits, `.`, `_`, `-`)"
            ));
        }
        acl.push_str(&district_block(name));
    }
    Ok(acl)
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: {0}")]
    Start(String),
    #[error("embedded broker: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the embedded broker is to be: everything its configuration is made from.
#[derive(Debug, Clone)]
pub struct BrokerSpec {
    /// The `mosquitto` executable.
    pub mosquitto: PathBuf,
    /// Where the generated configuration, the ACL and the persistence file go.
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// The largest MQTT packet anyone may send (bigger: refused, sender disconnected).
    pub max_packet: usize,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CRL `weilan-collector agents revoke` writes.
    pub crl: PathBuf,
    /// Districts forwarding to this province (`[[federation.districts]]`): each
    /// gets its block in the ACL.
    pub districts: Vec<String>,
}

impl BrokerSpec {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("mosquitto.conf")
    }
    pub fn acl_path(&self) -> PathBuf {
        self.dir.join("weilan.acl")
    }

    /// The configuration file's text. `user` is the account the collector runs as:
    /// Mosquitto started by root would otherwise switch to `mosquitto`, which cannot
    /// read the collector's keys.
    pub fn render(&self, user: &str) -> String {
        let path = |p: &Path| p.display().to_string();
        let mut dir = path(&self.dir);
        if !dir.ends_with('/') {
            dir.push('/');
        }
        format!(
            "# Generated by weilan-collector from collector.toml at every start; edits are lost.\n\
             # The access model is config/mosquitto/weilan.acl, unchanged (acl_file below).\n\
             per_listener_settings false\n\
             user {user}\n\
             listener {port} {host}\n\
             max_connections {max_connections}\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             crlfile {crl}\n\
             use_identity_as_username true\n\
             use_username_as_clientid true\n\
             acl_file {acl}\n\
             set_tcp_nodelay true\n\
             max_packet_size {max_packet}\n\
             max_queued_messages 0\n\
             persistence true\n\
             persistence_location {dir}\n\
             autosave_interval 60\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             log_timestamp false\n\
             connection_messages true\n",
            port = self.listen.port(),
            host = self.listen.ip(),
            max_connections = self.max_connections,
            ca = path(&self.ca),
            cert = path(&self.cert),
            key = path(&self.key),
            crl = path(&self.crl),
            acl = path(&self.acl_path()),
            max_packet = self.max_packet,
        )
    }

    /// Writes the configuration and the ACL (mode 0600, owned by the caller).
    fn write_files(&self, user: &str) -> Result<(), BrokerError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BrokerError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        for (path, text) in [
            (self.config_path(), self.render(user)),
            (
                self.acl_path(),
                acl_for_districts(SHIPPED_ACL.to_string(), &self.districts)
                    .map_err(BrokerError::Start)?,
            ),
        ] {
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }
}

/// What the broker's log says that security staff must see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerNotice {
    /// A client was refused or disconnected for what it sent.
    Refused { client: String, reason: String },
    /// The broker cannot take more connections: its descriptor limit is reached.
    OutOfDescriptors,
    /// The broker process ended unexpectedly and is being restarted.
    Exited { status: String, restarts: u64 },
}

/// Reads one line of Mosquitto's log (without timestamp) for a notice.
pub fn notice_of(line: &str) -> Option<BrokerNotice> {
    if let Some(rest) = line.strip_prefix("Client ") {
        if let Some(client) = rest.strip_suffix(" disconnected due to oversize packet.") {
            return Some(BrokerNotice::Refused {
                client: client.to_string(),
                reason: "oversize packet (larger than max_packet_size)".into(),
            });
        }
    }
    if line.contains("socket count has been exceeded") || line.contains("Too many open files") {
        return Some(BrokerNotice::OutOfDescriptors);
    }
    None
}

/// The running broker. Dropping it does not stop it: cancel the shutdown token and
/// await [`SupervisedBroker::stopped`].
pub struct SupervisedBroker {
    pub listen: SocketAddr,
    pid: Arc<AtomicI32>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a start may take before it is a failure (a port still held by a broker
/// that is shutting down is tried again meanwhile).
const START_TIMEOUT: Duration = Duration::from_secs(10);

impl SupervisedBroker {
    /// Writes the configuration, starts Mosquitto and returns once it listens (or the
    /// reason it cannot). From then on a broker that exits is restarted (1 s, then up
    /// to 10 s apart) until `shutdown`, each exit reported as a notice.
    /// `stopping` is the collector's own shutdown: a broker that exits once it is
    /// cancelled (systemd signals the whole unit at once) is not restarted or reported.
    pub async fn start(
        spec: BrokerSpec,
        shutdown: CancellationToken,
        stopping: CancellationToken,
        notices: mpsc::Sender<BrokerNotice>,
    ) -> Result<SupervisedBroker, BrokerError> {
        if !spec.mosquitto.is_file() {
            return Err(BrokerError::Start(format!(
                "{} not found: the embedded broker is Debian's mosquitto (apt-get install mosquitto), or set [broker] mosquitto",
                spec.mosquitto.display()
            )));
        }
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "root".into());
        spec.write_files(&user)?;
        let pid = Arc::new(AtomicI32::new(0));
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let child = loop {
            let last_failure = match launch(&spec, notices.clone()).await {
                Ok(child) => break child,
                Err(log) => log,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(BrokerError::Start(format!(
                    "mosquitto did not start on {}: {}",
                    spec.listen, last_failure
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        tracing::info!(listen = %spec.listen, pid = child.id().unwrap_or(0), config = %spec.config_path().display(), "embedded broker (mosquitto) listening: TLS with client certificates, identity = certificate name, topic ACLs");
        pid.store(child.id().unwrap_or(0) as i32, Ordering::SeqCst);
        let listen = spec.listen;
        let task = tokio::spawn(supervise(
            spec,
            child,
            pid.clone(),
            shutdown,
            stopping,
            notices,
        ));
        Ok(SupervisedBroker { listen, pid, task })
    }

    /// Makes Mosquitto read its CRL (and ACL) again: SIGHUP, handled in its own time
    /// (a revoked certificate is refused within moments).
    pub fn reload(&self) {
        let pid = self.pid.load(Ordering::SeqCst);
        if pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
    }

    /// Waits until the broker has stopped after the shutdown token was cancelled
    /// (it saves its persistence file first).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Starts one Mosquitto process and waits for its "running" line. On failure
/// returns the lines it logged.
#[allow(unsafe_code)] // one prctl between fork and exec; see SAFETY below.
async fn launch(
    spec: &BrokerSpec,
    notices: mpsc::Sender<BrokerNotice>,
) -> Result<tokio::process::Child, String> {
    let mut cmd = tokio::process::Command::new(&spec.mosquitto);
    cmd.arg("-c")
        .arg(spec.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // systemd's notification socket is the collector's: Mosquitto would announce
        // itself there too (refused by NotifyAccess=main, and logged).
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .kill_on_drop(true);
    // A collector killed with -9 must not leave its broker holding the port: the
    // kernel sends Mosquitto SIGTERM when the spawning thread (a runtime worker, which
    // lives as long as the collector) ends. (util-linux `setpriv --pdeathsig` fails
    // under the unit's empty capability bounding set.)
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // prctl(2), which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGTERM))
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let running = tokio::time::timeout(START_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            log_line(&line);
            let up = line.contains(" running");
            seen.push(line);
            if up {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !running {
        let _ = child.kill().await;
        return Err(seen.join(" | "));
    }
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            log_line(&line);
            if let Some(n) = notice_of(&line) {
                if notices.try_send(n).is_err() {
                    tracing::warn!(%line, "broker notice not raised: the collector is behind");
                }
            }
        }
    });
    Ok(child)
}

fn log_line(line: &str) {
    if line.starts_with("Error") || line.contains("OpenSSL Error") {
        tracing::info!(target: "mosquitto", "{line}");
    } else if line.starts_with("Warning: ACL pattern") || line.starts_with("New connection") {
        tracing::debug!(target: "mosquitto", "{line}");
    } else if line.starts_with("Warning") || notice_of(line).is_some() {
        tracing::warn!(target: "mosquitto", "{line}");
    } else {
        tracing::info!(target: "mosquitto", "{line}");
    }
}

async fn supervise(
    spec: BrokerSpec,
    mut child: tokio::process::Child,
    pid: Arc<AtomicI32>,
    shutdown: CancellationToken,
    stopping: CancellationToken,
    notices: mpsc::Sender<BrokerNotice>,
) {
    let mut restarts = 0u64;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                // Signalled together with the collector (systemctl stop): not a crash.
                let grace = tokio::time::timeout(Duration::from_secs(1), stopping.cancelled()).await;
                if shutdown.is_cancelled() || grace.is_ok() {
                    tracing::info!(%status, "embedded broker stopped with the collector");
                    break;
                }
                restarts += 1;
                tracing::error!(%status, restarts, "embedded broker exited; restarting it");
                let _ = notices.try_send(BrokerNotice::Exited { status, restarts });
                pid.store(0, Ordering::SeqCst);
                let mut backoff = Duration::from_secs(1);
                child = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    match launch(&spec, notices.clone()).await {
                        Ok(c) => break c,
                        Err(log) => {
                            tracing::error!(%log, "embedded broker did not restart; trying again");
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                };
                pid.store(child.id().unwrap_or(0) as i32, Ordering::SeqCst);
            }
            _ = shutdown.cancelled() => {
                // SIGTERM: Mosquitto saves its persistence file and exits.
                if let Some(id) = child.id() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(id as i32), nix::sys::signal::Signal::SIGTERM);
                }
                match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                    Ok(_) => tracing::info!("embedded broker stopped"),
                    Err(_) => {
                        tracing::warn!("embedded broker did not stop within 10 s; killed");
                        let _ = child.kill().await;
                    }
                }
                break;
            }
        }
    }
}

/// Ends the MQTT session that `id` holds, by connecting once as `id` with a
/// ten-minute certificate minted for it (`pki::session_breaker`): the broker binds
/// the client id to the certificate's name, so this connection replaces the older
/// one, and it then leaves with a clean DISCONNECT. Used after a revocation, once the
/// broker has the new CRL, so that the revoked certificate cannot come back.
pub async fn end_session(
    pki: &crate::pki::PkiPaths,
    host: &str,
    port: u16,
    server_name: &str,
    id: &str,
) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};
    let (cert, key) = crate::pki::session_breaker(pki, id).map_err(|e| e.to_string())?;
    let tls = weilan_config::tls::client_config_with(&pki.ca(), vec![cert], key, server_name)
        .map_err(|e| e.to_string())?;
    let mut opts = MqttOptions::new(id, host, port);
    opts.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(10))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK within 5 s".to_string())?;
    connected?;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_and_descriptor_lines_become_notices() {
        assert_eq!(
            notice_of("Client ws-a disconnected due to oversize packet."),
            Some(BrokerNotice::Refused {
                client: "ws-a".into(),
                reason: "oversize packet (larger than max_packet_size)".into()
            })
        );
        assert_eq!(
            notice_of("Unable to accept new connection, system socket count has been exceeded. Try increasing \"ulimit -n\" or equivalent."),
            Some(BrokerNotice::OutOfDescriptors)
        );
        assert_eq!(
            notice_of("New client connected from 127.0.0.1:1 as ws-a (p2, c1, k60, u'ws-a')."),
            None
        );
        assert_eq!(notice_of("Client ws-a disconnected."), None);
    }

    #[test]
    fn the_generated_configuration_binds_identity_and_uses_the_shipped_acl() {
        let spec = BrokerSpec {
            mosquitto: "/usr/sbin/mosquitto".into(),
            dir: "/var/lib/weilan-collector/broker".into(),
            listen: "0.0.0.0:8883".parse().unwrap(),
            max_connections: 10_000,
            max_packet: 1_114_112,
            ca: "/etc/weilan/pki/ca.pem".into(),
            cert: "/etc/weilan/pki/server.pem".into(),
            key: "/etc/weilan/pki/server-key.pem".into(),
            crl: "/etc/weilan/pki/crl.pem".into(),
            districts: vec![],
        };
        let conf = spec.render("weilan");
        for line in [
            "user weilan",
            "listener 8883 0.0.0.0",
            "require_certificate true",
            "crlfile /etc/weilan/pki/crl.pem",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "acl_file /var/lib/weilan-collector/broker/weilan.acl",
            "max_packet_size 1114112",
            "max_connections 10000",
            "persistence_location /var/lib/weilan-collector/broker/",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line} missing:\n{conf}");
        }
        // The same access model as an external Mosquitto: the shipped file.
        assert!(SHIPPED_ACL.contains("pattern write weilan/v1/agents/%u/events"));
        assert!(!conf.contains("allow_anonymous true"));
    }

    #[test]
    fn further_collectors_get_the_collectors_block_under_their_own_names() {
        assert_eq!(acl_for_collectors(&[]).unwrap(), SHIPPED_ACL);
        let acl = acl_for_collectors(&["weilan-collector-b".into()]).unwrap();
        assert!(acl.starts_with(SHIPPED_ACL));
        let added = &acl[SHIPPED_ACL.len()..];
        assert!(added.contains("\nuser weilan-collector-b\n"), "{added}");
        assert!(added.contains("topic read weilan/v1/agents/+/events\n"));
        assert!(added.contains("topic write weilan/v1/collectors/weilan-collector-b/presence"));
        assert!(
            !added.contains("collectors/weilan-collector/presence"),
            "a further collector must not write the first's presence: {added}"
        );
        for bad in [
            "weilan-collector",
            "weilan-collector-",
            "ws-01",
            "weilan-collector-b/#",
        ] {
            assert!(acl_for_collectors(&[bad.into()]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_embedded_broker_writes_a_block_for_each_district_it_serves() {
        let dir = tempfile::tempdir().unwrap();
        let spec = BrokerSpec {
            mosquitto: "/usr/sbin/mosquitto".into(),
            dir: dir.path().join("broker"),
            listen: "127.0.0.1:8883".parse().unwrap(),
            max_connections: 10,
            max_packet: 1 << 20,
            ca: "/etc/weilan/pki/ca.pem".into(),
            cert: "/etc/weilan/pki/server.pem".into(),
            key: "/etc/weilan/pki/server-key.pem".into(),
            crl: "/etc/weilan/pki/crl.pem".into(),
            districts: vec!["weilan-district-east".into()],
        };
        spec.write_files("root").unwrap();
        let acl = std::fs::read_to_string(spec.acl_path()).unwrap();
        assert!(acl.starts_with(SHIPPED_ACL));
        assert!(acl.ends_with(&district_block("weilan-district-east")));
    }

    #[test]
    fn a_district_gets_only_its_own_federation_topics() {
        let acl = acl_for_districts(SHIPPED_ACL.into(), &["weilan-district-east".into()]).unwrap();
        let added = &acl[SHIPPED_ACL.len()..];
        let rules: Vec<&str> = added
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert_eq!(
            rules,
            [
                "user weilan-district-east",
                "topic write weilan/v1/federation/weilan-district-east/batches/+",
                "topic read weilan/v1/federation/weilan-district-east/acks",
            ]
        );
        for bad in [
            "weilan-district-",
            "ws-01",
            "weilan-district-a/#",
            "weilan-collector-b",
        ] {
            assert!(
                acl_for_districts(String::new(), &[bad.into()]).is_err(),
                "{bad} accepted"
            );
        }
    }
}
