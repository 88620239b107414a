//! Alert sinks besides the alert log: syslog (RFC 5424, the alert as JSON), CEF
//! (ArcSight Common Event Format inside an RFC 5424 message) over UDP, TCP or TLS,
//! and webhooks (HTTP POST of the alert as JSON).
//!
//! Each sink has its own thread and a bounded queue: a slow or dead SIEM never holds
//! up ingest. A full queue drops the alert (it stays in the database and the alert
//! log) and counts it; a delivery that fails after retries is counted too. The
//! collector reports both as a `collector.sink_failures` finding, i.e. an alert in
//! the alert log, which does not depend on any sink.

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use weilan_config::settings::collector::{SinkKind, SinkSettings, Transport};

use crate::rules::{findings, Finding, Level};
use crate::store::Alert;

/// Delivery counters of one sink.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub sent: AtomicU64,
    /// Deliveries that failed after retries.
    pub failed: AtomicU64,
    /// Alerts dropped because the queue was full.
    pub dropped: AtomicU64,
}

struct Sink {
    name: String,
    min_level: Option<Level>,
    /// Taken at shutdown ([`Sinks::drain`]): the thread then delivers what is queued
    /// and ends.
    tx: std::sync::Mutex<Option<SyncSender<Alert>>>,
    /// Alerts queued and not yet taken by the delivery thread.
    queued: Arc<AtomicU64>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<SinkStats>,
    /// failed + dropped already reported.
    reported: AtomicU64,
}

/// The configured sinks.
#[derive(Default)]
pub struct Sinks {
    sinks: Vec<Sink>,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink {name}: {message}")]
    Setup { name: String, message: String },
}

impl Sinks {
    /// Starts one delivery thread per sink.
    pub fn start(settings: &[SinkSettings]) -> Result<Sinks, SinkError> {
        let mut sinks = Vec::new();
        for s in settings {
            let deliver = Delivery::new(s).map_err(|message| SinkError::Setup {
                name: s.name.clone(),
                message,
            })?;
            let (tx, rx) = sync_channel(s.queue);
            let stats = Arc::new(SinkStats::default());
            let thread_stats = stats.clone();
            let queued = Arc::new(AtomicU64::new(0));
            let thread_queued = queued.clone();
            let name = s.name.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sink-{}", s.name))
                .spawn(move || run(name, deliver, rx, thread_stats, thread_queued))
                .map_err(|e| SinkError::Setup {
                    name: s.name.clone(),
                    message: e.to_string(),
                })?;
            sinks.push(Sink {
                name: s.name.clone(),
                min_level: s.min_level.as_deref().and_then(Level::parse),
                tx: std::sync::Mutex::new(Some(tx)),
                queued,
                thread: std::sync::Mutex::new(Some(thread)),
                stats,
                reported: AtomicU64::new(0),
            });
        }
        Ok(Sinks { sinks })
    }

    /// Queues new alerts: to every sink whose minimum level they reach, and the
    /// `notify` ones to the sinks their rule named (all when it named none).
    pub fn dispatch(&self, alerts: &[Alert], notify: &[(Alert, Vec<String>)]) {
        for sink in &self.sinks {
            let by_level = alerts
                .iter()
                .filter(|a| sink.min_level.is_some_and(|m| a.level >= m));
            let by_rule = notify
                .iter()
                .filter(|(a, names)| {
                    (names.is_empty() || names.contains(&sink.name))
                        && sink.min_level.is_none_or(|m| a.level < m)
                })
                .map(|(a, _)| a);
            let tx = sink.tx.lock().unwrap_or_else(|e| e.into_inner());
            for a in by_level.chain(by_rule) {
                let sent = match tx.as_ref() {
                    Some(tx) => tx.try_send(a.clone()),
                    None => Err(TrySendError::Disconnected(a.clone())),
                };
                match sent {
                    Ok(()) => {
                        sink.queued.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                        let n = sink.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::warn!(sink = %sink.name, alert_id = a.alert_id, dropped_total = n, "sink queue full; alert not sent there (it is in the database and the alert log)");
                    }
                }
            }
        }
    }

    /// At shutdown: no more alerts are queued; each sink delivers what it holds, for
    /// at most `within` in all. What is still queued then is said by sink (those
    /// alerts are in the database and the alert log, not lost).
    pub fn drain(&self, within: Duration) -> Vec<(String, u64)> {
        for sink in &self.sinks {
            sink.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        let deadline = std::time::Instant::now() + within;
        let mut left = Vec::new();
        for sink in &self.sinks {
            let mut slot = sink.thread.lock().unwrap_or_else(|e| e.into_inner());
            while slot.as_ref().is_some_and(|t| !t.is_finished())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            if slot.as_ref().is_some_and(|t| t.is_finished()) {
                if let Some(t) = slot.take() {
                    let _ = t.join();
                }
            }
            let queued = sink.queued.load(Ordering::Relaxed);
            if queued > 0 {
                tracing::warn!(sink = %sink.name, alerts = queued, "stopping: alerts not delivered to this sink (they are in the database and the alert log)");
                left.push((sink.name.clone(), queued));
            }
        }
        left
    }

    /// Counters by sink name.
    pub fn stats(&self) -> Vec<(&str, &SinkStats)> {
        self.sinks
            .iter()
            .map(|s| (s.name.as_str(), &*s.stats))
            .collect()
    }

    /// A finding for failures and drops since the last call.
    pub fn take_failures(&self) -> Option<Finding> {
        let mut parts = Vec::new();
        let mut details = serde_json::Map::new();
        for s in &self.sinks {
            let failed = s.stats.failed.load(Ordering::Relaxed);
            let dropped = s.stats.dropped.load(Ordering::Relaxed);
            let total = failed + dropped;
            let before = s.reported.swap(total, Ordering::Relaxed);
            if total > before {
                parts.push(format!(
                    "{}: {} not delivered ({failed} failed, {dropped} dropped in total)",
                    s.name,
                    total - before
                ));
                details.insert(
                    s.name.clone(),
                    serde_json::json!({"failed": failed, "dropped": dropped, "new": total - before}),
                );
            }
        }
        (!parts.is_empty()).then(|| Finding {
            kind: findings::SINK_FAILURES,
            agent_id: "(collector)".into(),
            summary: format!(
                "Alerts did not reach their sinks — {}; they are in the database and the alert log",
                parts.join("; ")
            ),
            event_ids: vec![],
            details: serde_json::Value::Object(details),
        })
    }
}

fn run(
    name: String,
    mut deliver: Delivery,
    rx: Receiver<Alert>,
    stats: Arc<SinkStats>,
    queued: Arc<AtomicU64>,
) {
    while let Ok(alert) = rx.recv() {
        let mut last_error = String::new();
        let mut ok = false;
        for attempt in 0..3u32 {
            match deliver.send(&alert) {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    last_error = e;
                    deliver.reset();
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
            }
        }
        queued.fetch_sub(1, Ordering::Relaxed);
        if ok {
            stats.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            let n = stats.failed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(sink = %name, alert_id = alert.alert_id, error = %last_error, failed_total = n, "alert not delivered to sink");
        }
    }
}

enum Conn {
    None,
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

struct Delivery {
    kind: SinkKind,
    conn: Conn,
    tls: Option<Arc<rustls::ClientConfig>>,
    http: Option<ureq::Agent>,
    formatter: syslog::Formatter5424,
}

impl Delivery {
    fn new(s: &SinkSettings) -> Result<Delivery, String> {
        let (tls, http) = match &s.kind {
            SinkKind::Syslog {
                transport: Transport::Tls { ca, .. },
                ..
            } => (
                Some(weilan_config::tls::server_auth_config(ca).map_err(|e| e.to_string())?),
                None,
            ),
            SinkKind::Webhook { ca, .. } => {
                let certs: Vec<ureq::tls::Certificate<'static>> =
                    weilan_config::pem::load_certs(ca)?
                        .into_iter()
                        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                        .collect();
                let tls = ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .unversioned_rustls_crypto_provider(weilan_config::tls::provider())
                    .build();
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .tls_config(tls)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .max_redirects(0)
                    .build()
                    .into();
                (None, Some(agent))
            }
            _ => (None, None),
        };
        Ok(Delivery {
            kind: s.kind.clone(),
            conn: Conn::None,
            tls,
            http,
            formatter: syslog::Formatter5424 {
                facility: syslog::Facility::LOG_AUTH,
                hostname: None,
                process: "weilan-collector".into(),
                pid: std::process::id(),
            },
        })
    }

    fn reset(&mut self) {
        self.conn = Conn::None;
    }

    fn send(&mut self, alert: &Alert) -> Result<(), String> {
        match self.kind.clone() {
            SinkKind::Webhook { url, .. } => {
                let agent = self.http.as_ref().ok_or("no HTTP client")?;
                let response = agent
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .send(serde_json::to_vec(alert).unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                // A redirect is not a delivery (and is not followed: alerts must not
                // be sent on to wherever a receiver points).
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {}", response.status()))
                }
            }
            SinkKind::Syslog {
                cef,
                address,
                transport,
            } => {
                let line = self.syslog_line(alert, cef)?;
                self.connect(&address, &transport)?;
                let e = |e: std::io::Error| e.to_string();
                match &mut self.conn {
                    Conn::Udp(s) => s.send(&line).map(|_| ()).map_err(e),
                    // Octet counting (RFC 6587 3.4.1, required for TLS by RFC 5425).
                    Conn::Tcp(s) => s
                        .write_all(&framed(&line))
                        .and_then(|()| s.flush())
                        .map_err(e),
                    Conn::Tls(s) => s
                        .write_all(&framed(&line))
                        .and_then(|()| s.flush())
                        .map_err(e),
                    Conn::None => Err("not connected".into()),
                }
            }
        }
    }

    fn connect(&mut self, address: &str, transport: &Transport) -> Result<(), String> {
        if !matches!(self.conn, Conn::None) {
            return Ok(());
        }
        let e = |e: std::io::Error| format!("{address}: {e}");
        let tcp = || -> Result<TcpStream, String> {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(address)
                .map_err(e)?
                .next()
                .ok_or_else(|| format!("{address}: no address"))?;
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(e)?;
            s.set_write_timeout(Some(Duration::from_secs(5)))
                .map_err(e)?;
            Ok(s)
        };
        self.conn = match transport {
            Transport::Udp => {
                let bind = if address.starts_with('[') {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                };
                let s = UdpSocket::bind(bind).map_err(e)?;
                s.connect(address).map_err(e)?;
                Conn::Udp(s)
            }
            Transport::Tcp => Conn::Tcp(tcp()?),
            Transport::Tls { server_name, .. } => {
                let name = rustls_pki_types::ServerName::try_from(server_name.clone())
                    .map_err(|e| e.to_string())?;
                let config = self.tls.clone().ok_or("no TLS configuration")?;
                let conn =
                    rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
                let mut stream = rustls::StreamOwned::new(conn, tcp()?);
                // Handshake now, so a certificate problem is reported as such.
                while stream.conn.is_handshaking() {
                    stream
                        .conn
                        .complete_io(&mut stream.sock)
                        .map_err(|e| format!("{address}: TLS: {e}"))?;
                }
                Conn::Tls(Box::new(stream))
            }
        };
        Ok(())
    }

    fn syslog_line(&self, alert: &Alert, cef: bool) -> Result<Vec<u8>, String> {
        let severity = match alert.level {
            Level::Red => syslog::Severity::LOG_ALERT,
            Level::Yellow => syslog::Severity::LOG_WARNING,
            Level::Blue => syslog::Severity::LOG_NOTICE,
        };
        let mut sd: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> =
            std::collections::BTreeMap::new();
        sd.insert(
            "weilan@32473".into(),
            [
                ("alert_id".to_string(), alert.alert_id.to_string()),
                ("rule".to_string(), alert.rule_id.clone()),
                ("level".to_string(), alert.level.as_str().to_string()),
                ("agent".to_string(), alert.agent_id.clone()),
            ]
            .into_iter()
            .collect(),
        );
        let msg = if cef {
            cef_line(alert)
        } else {
            serde_json::to_string(alert).unwrap_or_default()
        };
        let mut out = Vec::new();
        syslog::LogFormat::format(
            &self.formatter,
            &mut out,
            severity,
            (alert.alert_id.max(0) as u32, sd, msg),
        )
        .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

fn framed(line: &[u8]) -> Vec<u8> {
    let mut out = format!("{} ", line.len()).into_bytes();
    out.extend_from_slice(line);
    out
}

/// `CEF:0|Weilan|weilan-collector|VERSION|rule|title|severity|extension`.
pub fn cef_line(a: &Alert) -> String {
    let header = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('|', "\\|")
            .replace(['\r', '\n'], " ")
    };
    let ext = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('=', "\\=")
            .replace('\r', "\\r")
            .replace('\n', "\\n")
    };
    let severity = match a.level {
        Level::Red => 10,
        Level::Yellow => 6,
        Level::Blue => 3,
    };
    let title = if a.title.is_empty() {
        &a.rule_id
    } else {
        &a.title
    };
    format!(
        "CEF:0|Weilan|weilan-collector|{}|{}|{}|{severity}|rt={} dhost={} msg={} cs1Label=level cs1={} cs2Label=events cs2={} cn1Label=alert_id cn1={} cnt={}",
        header(crate::VERSION),
        header(&a.rule_id),
        header(title),
        a.time.as_millisecond(),
        ext(&a.agent_id),
        ext(&a.summary),
        a.level.as_str(),
        ext(&a.event_ids.join(",")),
        a.alert_id,
        a.count,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;

    fn alert(level: Level) -> Alert {
        Alert {
            alert_id: 7,
            time: jiff::Timestamp::now(),
            level,
            rule_id: "builtin.usb.unknown-storage".into(),
            title: "Unknown USB storage".into(),
            tags: vec!["NIST AU-6".into()],
            agent_id: "ws-1".into(),
            key: "ws-1".into(),
            summary: "Unknown USB storage a=b|c on ws-1".into(),
            event_ids: vec!["ws-1:1:3".into()],
            count: 1,
            last_seen: jiff::Timestamp::now(),
            update: false,
            details: serde_json::json!({}),
        }
    }

    fn sink(name: &str, kind: SinkKind, min_level: Option<&str>) -> SinkSettings {
        SinkSettings {
            name: name.into(),
            kind,
            min_level: min_level.map(str::to_string),
            queue: 16,
        }
    }

    /// Reads one octet-counted frame.
    fn frame(r: &mut impl BufRead) -> String {
        let mut len = Vec::new();
        r.read_until(b' ', &mut len).unwrap();
        let n: usize = std::str::from_utf8(&len).unwrap().trim().parse().unwrap();
        let mut buf = vec![0; n];
        r.read_exact(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn wait_sent(sinks: &Sinks, name: &str, n: u64) {
        for _ in 0..200 {
            let (_, s) = sinks.stats().into_iter().find(|(s, _)| *s == name).unwrap();
            if s.sent.load(Ordering::Relaxed) + s.failed.load(Ordering::Relaxed) >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("sink {name} did not finish {n} deliveries");
    }

    #[test]
    fn syslog_over_udp_carries_the_alert_as_rfc5424_json() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let address = server.local_addr().unwrap().to_string();
        let sinks = Sinks::start(&[sink(
            "s",
            SinkKind::Syslog {
                cef: false,
                address,
                transport: Transport::Udp,
            },
            Some("yellow"),
        )])
        .unwrap();
        // Blue is below the sink's level and was not notified: not sent.
        sinks.dispatch(&[alert(Level::Blue), alert(Level::Red)], &[]);
        let mut buf = [0u8; 8192];
        let n = server.recv(&mut buf).unwrap();
        let line = String::from_utf8_lossy(&buf[..n]).to_string();
        // <PRI>1: facility auth (4) × 8 + alert (1) = 33.
        assert!(line.starts_with("<33>1 "), "{line}");
        assert!(line.contains("weilan-collector"), "{line}");
        assert!(line.contains(r#"[weilan@32473 agent="ws-1" alert_id="7" level="red" rule="builtin.usb.unknown-storage"]"#), "{line}");
        let json = &line[line.find('{').unwrap()..];
        let back: Alert = serde_json::from_str(json).unwrap();
        assert_eq!(back.alert_id, 7);
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            server.recv(&mut buf).is_err(),
            "the blue alert was not sent"
        );
    }

    #[test]
    fn cef_over_tcp_is_octet_counted_and_escaped() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = server.local_addr().unwrap().to_string();
        let sinks = Sinks::start(&[sink(
            "siem",
            SinkKind::Syslog {
                cef: true,
                address,
                transport: Transport::Tcp,
            },
            None,
        )])
        .unwrap();
        // No min_level: only alerts of rules that notify (this sink or all sinks).
        let a = alert(Level::Yellow);
        sinks.dispatch(
            std::slice::from_ref(&a),
            &[
                (a.clone(), vec!["other".into()]),
                (a.clone(), vec!["siem".into()]),
                (a.clone(), vec![]),
            ],
        );
        let (conn, _) = server.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(conn);
        let first = frame(&mut r);
        let cef = &first[first.find("CEF:").unwrap()..];
        assert!(cef.starts_with(&format!("CEF:0|Weilan|weilan-collector|{}|builtin.usb.unknown-storage|Unknown USB storage|6|", crate::VERSION)), "{cef}");
        assert!(
            cef.contains(r"msg=Unknown USB storage a\=b|c on ws-1"),
            "{cef}"
        );
        assert!(
            cef.contains("cs2=ws-1:1:3") && cef.contains("cn1=7"),
            "{cef}"
        );
        let second = frame(&mut r);
        assert!(second.contains("CEF:0|"), "{second}");
        wait_sent(&sinks, "siem", 2);
        assert_eq!(
            sinks.stats()[0].1.sent.load(Ordering::Relaxed),
            2,
            "the notify naming another sink is not sent here"
        );
    }

    #[test]
    fn syslog_over_tls_verifies_the_server_against_the_ca() {
        weilan_config::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::PkiPaths::new(dir.path());
        crate::pki::init(&pki, &["localhost".into()]).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(weilan_config::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                weilan_config::pem::load_certs(&pki.server()).unwrap(),
                weilan_config::pem::load_key(&pki.server_key()).unwrap(),
            )
            .unwrap();
        let config = Arc::new(config);
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let rogue = server.try_clone().unwrap();
        let rogue_config = config.clone();
        let got = std::thread::spawn(move || {
            let (tcp, _) = server.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut r = BufReader::new(rustls::StreamOwned::new(conn, tcp));
            frame(&mut r)
        });
        let sinks = Sinks::start(&[sink(
            "tls",
            SinkKind::Syslog {
                cef: false,
                address: format!("localhost:{port}"),
                transport: Transport::Tls {
                    ca: pki.ca(),
                    server_name: "localhost".into(),
                },
            },
            Some("blue"),
        )])
        .unwrap();
        sinks.dispatch(&[alert(Level::Red)], &[]);
        let line = got.join().unwrap();
        assert!(
            line.starts_with("<33>1 ") && line.contains(r#""alert_id":7"#),
            "{line}"
        );
        // A server whose certificate does not chain to the CA is refused and counted.
        let other = tempfile::tempdir().unwrap();
        let other_pki = crate::pki::PkiPaths::new(other.path());
        crate::pki::init(&other_pki, &["localhost".into()]).unwrap();
        let strict = Sinks::start(&[sink(
            "strict",
            SinkKind::Syslog {
                cef: false,
                address: format!("localhost:{port}"),
                transport: Transport::Tls {
                    ca: other_pki.ca(),
                    server_name: "localhost".into(),
                },
            },
            Some("blue"),
        )])
        .unwrap();
        // The same server, whose certificate the strict sink's CA did not issue.
        std::thread::spawn(move || {
            for _ in 0..3 {
                let (mut tcp, _) = rogue.accept().unwrap();
                let mut conn = rustls::ServerConnection::new(rogue_config.clone()).unwrap();
                let _ = conn.complete_io(&mut tcp);
            }
        });
        strict.dispatch(&[alert(Level::Red)], &[]);
        wait_sent(&strict, "strict", 1);
        assert_eq!(strict.stats()[0].1.failed.load(Ordering::Relaxed), 1);
    }

    /// A webhook sink (minimum level red) posting to a local listener; the PKI
    /// directory must outlive the sinks.
    fn webhook() -> (TcpListener, tempfile::TempDir, Sinks) {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://127.0.0.1:{}/hook",
            server.local_addr().unwrap().port()
        );
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::PkiPaths::new(dir.path());
        crate::pki::init(&pki, &["localhost".into()]).unwrap();
        let sinks = Sinks::start(&[sink(
            "hook",
            SinkKind::Webhook { url, ca: pki.ca() },
            Some("red"),
        )])
        .unwrap();
        (server, dir, sinks)
    }

    #[test]
    fn webhook_posts_the_alert_json() {
        let (server, _pki, sinks) = webhook();
        let got = std::thread::spawn(move || {
            let (mut conn, _) = server.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&l);
                if l == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            (head, String::from_utf8(body).unwrap())
        });
        sinks.dispatch(&[alert(Level::Red)], &[]);
        let (head, body) = got.join().unwrap();
        assert!(head.starts_with("POST /hook HTTP/1.1"), "{head}");
        let back: Alert = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (back.alert_id, back.rule_id.as_str()),
            (7, "builtin.usb.unknown-storage")
        );
        wait_sent(&sinks, "hook", 1);
        assert_eq!(sinks.stats()[0].1.sent.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_webhook_redirect_is_not_followed_and_counts_as_a_failure() {
        let (server, _pki, sinks) = webhook();
        std::thread::spawn(move || {
            for _ in 0..3 {
                let (mut conn, _) = server.accept().unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(
                    b"HTTP/1.1 302 Found\r\nlocation: http://192.0.2.1/steal\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        sinks.dispatch(&[alert(Level::Red)], &[]);
        wait_sent(&sinks, "hook", 1);
        let st = &sinks.stats()[0].1;
        assert_eq!(
            (
                st.sent.load(Ordering::Relaxed),
                st.failed.load(Ordering::Relaxed)
            ),
            (0, 1)
        );
    }

    #[test]
    fn failures_and_drops_are_counted_and_become_a_finding() {
        // Nothing listens on this port: every delivery fails after its retries.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = sink(
            "dead",
            SinkKind::Syslog {
                cef: false,
                address: format!("127.0.0.1:{port}"),
                transport: Transport::Tcp,
            },
            Some("blue"),
        );
        s.queue = 1;
        let sinks = Sinks::start(&[s]).unwrap();
        let many: Vec<Alert> = (0..20).map(|_| alert(Level::Red)).collect();
        sinks.dispatch(&many, &[]);
        let st = &sinks.stats()[0].1;
        let dropped = st.dropped.load(Ordering::Relaxed);
        assert!(
            dropped >= 18,
            "queue of 1: most of 20 dropped, got {dropped}"
        );
        wait_sent(&sinks, "dead", 20 - dropped);
        let f = sinks.take_failures().expect("a finding");
        assert_eq!(f.kind, findings::SINK_FAILURES);
        assert!(
            f.summary.contains("dead: 20 not delivered"),
            "{}",
            f.summary
        );
        assert!(sinks.take_failures().is_none(), "reported once");
    }
    #[test]
    fn at_shutdown_a_sink_delivers_what_it_holds_and_says_what_it_could_not() {
        // Five alerts dispatched and drain() called at once: all five arrive before
        // drain() returns, and it reports nothing left.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let sinks = Sinks::start(&[sink(
            "tcp",
            SinkKind::Syslog {
                cef: false,
                address: format!("127.0.0.1:{port}"),
                transport: Transport::Tcp,
            },
            Some("blue"),
        )])
        .unwrap();
        let alerts: Vec<Alert> = (0..5).map(|_| alert(Level::Red)).collect();
        sinks.dispatch(&alerts, &[]);
        let got = std::thread::spawn(move || {
            let (tcp, _) = server.accept().unwrap();
            let mut r = BufReader::new(tcp);
            (0..5).map(|_| frame(&mut r)).count()
        });
        assert_eq!(sinks.drain(Duration::from_secs(30)), Vec::new());
        assert_eq!(got.join().unwrap(), 5);
        // Nothing is queued after drain: a late alert is counted as dropped.
        sinks.dispatch(&[alert(Level::Red)], &[]);
        assert_eq!(sinks.stats()[0].1.dropped.load(Ordering::Relaxed), 1);

        // A sink whose destination refuses (each alert is retried for over a second):
        // what it still holds when the time is up is said by name.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = closed.local_addr().unwrap().port();
        drop(closed);
        let dead = Sinks::start(&[sink(
            "dead",
            SinkKind::Syslog {
                cef: false,
                address: format!("127.0.0.1:{dead_port}"),
                transport: Transport::Tcp,
            },
            Some("blue"),
        )])
        .unwrap();
        dead.dispatch(&alerts, &[]);
        let left = dead.drain(Duration::ZERO);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].0, "dead");
        assert!(left[0].1 >= 1 && left[0].1 <= 5, "{left:?}");
    }
}
