//! `collector.toml`: the broker, the database, the alert log and the PKI files.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::{LogSection, LogSettings};
use crate::load::{Validate, Validator};

/// The raw `collector.toml`.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorFile {
    /// `[broker]`: embedded MQTT broker, or an external one (Mosquitto, EMQX).
    pub broker: BrokerSection,
    /// `[tls]`: CA, the broker's server certificate, the collector's client certificate.
    pub tls: CollectorTls,
    /// `[store]`: the SQLite database.
    pub store: StoreSection,
    /// `[alerts]`: the JSON-lines alert log security staff watch.
    pub alerts: AlertsSection,
    /// `[policy]`: the fence policy (known devices, ...).
    pub policy: PolicySection,
    /// `[ingest]`.
    #[serde(default)]
    pub ingest: IngestSection,
    /// `[fleet]`: agent health and stream integrity checks.
    #[serde(default)]
    pub fleet: FleetSection,
    /// `[rules]`: the rule directory (CEL rules, hot-reloaded) and the built-in pack.
    #[serde(default)]
    pub rules: RulesSection,
    /// `[[sinks]]`: where alerts go besides the alert log (syslog, CEF, webhook).
    #[serde(default)]
    pub sinks: Vec<SinkSection>,
    /// `[exports]`: scheduled, signed compliance exports and retention.
    #[serde(default)]
    pub exports: ExportsSection,
    /// `[enroll]`: where agents enroll with a one-time token.
    #[serde(default)]
    pub enroll: EnrollSection,
    /// `[federation]`: forward to a province collector, or accept from districts.
    #[serde(default)]
    pub federation: super::federation::FederationSection,
    /// `[log]`.
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RulesSection {
    /// Directory of `*.toml` rule files, re-read when a file changes (optional).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Load the built-in indicator pack first (its rules can be replaced or switched
    /// off by id from the directory).
    #[serde(default = "yes")]
    pub builtin: bool,
    /// How often the directory (and the roster) is checked for changes.
    #[serde(default = "default_reload_check")]
    pub reload_check_secs: u64,
    /// Badge roster, CSV `id_hash,name,department` (`person` in rules; reloaded
    /// when it changes). `weilan-collector roster hash --key FILE` makes the hashes.
    #[serde(default)]
    pub roster: Option<PathBuf>,
}

impl Default for RulesSection {
    fn default() -> Self {
        RulesSection {
            dir: None,
            builtin: true,
            reload_check_secs: default_reload_check(),
            roster: None,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_reload_check() -> u64 {
    2
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportsSection {
    /// Where scheduled exports go, one directory each (`daily-2026-11-21`, ...);
    /// default `exports` beside the database. Created when the first export is made.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Report language: `zh-CN` or `en`.
    #[serde(default = "default_language")]
    pub language: String,
    /// IANA time zone of schedules and of days in reports.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Exports kept per schedule, newest first (0: all). Their manifest hashes stay
    /// in the database either way.
    #[serde(default)]
    pub keep: u32,
    /// Raw events older than this many days are deleted (0: never). PCI DSS 10.5.1
    /// asks for 12 months; China's Cybersecurity Law for at least 6.
    #[serde(default = "default_events_keep_days")]
    pub events_keep_days: u32,
    /// Heartbeats received this many seconds ago or earlier are stored as compact
    /// blocks (about 12 bytes each instead of a 700-byte row; still in the hash chain
    /// and in every export, byte for byte). 0: never.
    #[serde(default = "default_heartbeats_compact_after")]
    pub heartbeats_compact_after_secs: u64,
    /// `[[exports.schedules]]`.
    #[serde(default)]
    pub schedules: Vec<ScheduleSection>,
}

impl Default for ExportsSection {
    fn default() -> Self {
        ExportsSection {
            dir: None,
            language: default_language(),
            timezone: default_timezone(),
            keep: 0,
            events_keep_days: default_events_keep_days(),
            heartbeats_compact_after_secs: default_heartbeats_compact_after(),
            schedules: Vec::new(),
        }
    }
}

fn default_language() -> String {
    "zh-CN".into()
}
fn default_timezone() -> String {
    "Asia/Shanghai".into()
}
fn default_events_keep_days() -> u32 {
    365
}
fn default_heartbeats_compact_after() -> u64 {
    3_600
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// Name, also the prefix of its export directories.
    pub name: String,
    /// `day`, `week` (Monday to Monday) or `month`: the period exported.
    pub every: String,
    /// Local time (`HH:MM`) after which the previous period is exported.
    #[serde(default = "default_at")]
    pub at: String,
    /// Only these agents (default: all).
    #[serde(default)]
    pub agents: Vec<String>,
    /// Only agents of this group (`[agent_groups]` in the rule files).
    #[serde(default)]
    pub group: Option<String>,
}

fn default_at() -> String {
    "01:00".into()
}

/// How often a schedule exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    Day,
    Week,
    Month,
}

/// A validated schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleSettings {
    pub name: String,
    pub every: Every,
    pub at: jiff::civil::Time,
    pub agents: Option<Vec<String>>,
    pub group: Option<String>,
}

/// Validated `[exports]`.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub dir: PathBuf,
    pub language: String,
    pub timezone: jiff::tz::TimeZone,
    pub keep: u32,
    pub events_keep_days: u32,
    /// `None`: heartbeats are never compacted.
    pub heartbeats_compact_after: Option<std::time::Duration>,
    pub schedules: Vec<ScheduleSettings>,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSection {
    /// Name used by rules' `notify` actions and in counters.
    pub name: String,
    /// `syslog` (RFC 5424, the alert as JSON), `cef` (ArcSight CEF in an RFC 5424
    /// message) or `webhook` (HTTP POST of the alert as JSON).
    #[serde(rename = "type")]
    pub kind: String,
    /// syslog/cef: `host:port`.
    #[serde(default)]
    pub address: Option<String>,
    /// syslog/cef: `udp`, `tcp` (octet-counted frames, RFC 6587) or `tls` (RFC 5425).
    #[serde(default)]
    pub transport: Option<String>,
    /// webhook: `http://` or `https://` URL.
    #[serde(default)]
    pub url: Option<String>,
    /// tls and https: CA certificate (PEM) the server must chain to; default the Weilan CA.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// tls: the name the server's certificate must carry; default the address's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Every alert at or above this level goes here; without it only alerts of rules
    /// with a `notify` action do.
    #[serde(default)]
    pub min_level: Option<String>,
    /// Alerts waiting for this sink; beyond it they are dropped and counted.
    #[serde(default = "default_sink_queue")]
    pub queue: usize,
}

fn default_sink_queue() -> usize {
    1024
}

/// A validated sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSettings {
    pub name: String,
    pub kind: SinkKind,
    /// Minimum level for every alert (`red`, `yellow`, `blue`).
    pub min_level: Option<String>,
    pub queue: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    Syslog {
        cef: bool,
        address: String,
        transport: Transport,
    },
    Webhook {
        url: String,
        ca: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls { ca: PathBuf, server_name: String },
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// `embedded` (in-process broker, TLS with client certificates) or `external`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Embedded mode: address to listen on for MQTT over TLS.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Embedded mode: most concurrent connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Embedded mode: the Mosquitto executable the collector runs as its broker.
    #[serde(default = "default_mosquitto")]
    pub mosquitto: PathBuf,
    /// External mode: broker host.
    #[serde(default = "default_host")]
    pub host: String,
    /// External mode: broker TLS port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Name the broker's certificate must carry (the collector connects as a client too).
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// MQTT client id of the collector's own connection.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Several collectors share the ingest: each subscribes as a member of this
    /// MQTT shared-subscription group (`$share/<group>/…`), so the broker hands each
    /// agent message to one of them. External broker and PostgreSQL store only.
    #[serde(default)]
    pub shared_group: Option<String>,
}

fn default_mode() -> String {
    "embedded".into()
}
fn default_listen() -> String {
    "0.0.0.0:8883".into()
}
fn default_max_connections() -> usize {
    10_000
}
fn default_mosquitto() -> PathBuf {
    "/usr/sbin/mosquitto".into()
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    8883
}
fn default_server_name() -> String {
    "weilan-collector".into()
}
fn default_client_id() -> String {
    "weilan-collector".into()
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorTls {
    /// The Weilan CA certificate (PEM).
    pub ca: PathBuf,
    /// Embedded broker's server certificate and key (PEM).
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The collector's own client certificate and key (signs acks and commands).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// SQLite database file (WAL mode; created and migrated on start). With `url`,
    /// its folder still holds the collector's local files (the import spool).
    pub path: PathBuf,
    /// A PostgreSQL database instead of the SQLite file (`postgresql://user@host/db`):
    /// for fleets, and for several collectors sharing one database.
    #[serde(default)]
    pub url: Option<String>,
}

/// `store.url`, when given, names PostgreSQL.
fn validate_store_url(url: Option<&str>, v: &mut crate::load::Validator) {
    if let Some(url) = url {
        if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
            v.error(
                "store.url",
                "must be a PostgreSQL URL, `postgresql://user@host/database` (leave it out for the SQLite file `store.path`)",
            );
        }
    }
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    /// JSON-lines alert log, one alert per line.
    pub path: PathBuf,
    /// Start a new file when the log would grow past this many MiB (0: never).
    #[serde(default = "default_rotate_mib")]
    pub rotate_mib: u64,
    /// Start a new file when the current one is this many hours old (0: never).
    #[serde(default = "default_rotate_hours")]
    pub rotate_hours: u64,
    /// Rotated files kept (`alerts.jsonl.1` is the newest); older ones are deleted.
    #[serde(default = "default_rotate_keep")]
    pub keep: u32,
}

fn default_rotate_mib() -> u64 {
    64
}
fn default_rotate_hours() -> u64 {
    24
}
fn default_rotate_keep() -> u32 {
    30
}

/// When the alert log starts a new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertRotation {
    /// 0: never by size.
    pub max_bytes: u64,
    /// 0: never by age.
    pub max_age_secs: u64,
    pub keep: u32,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// The fence policy file (`policy.toml`).
    pub path: PathBuf,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    /// Largest accepted MQTT payload in bytes; larger ones are refused and quarantined.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Received messages waiting for the database, beyond which the collector stops
    /// reading from the broker (back-pressure, not loss: agents re-send unacked batches).
    #[serde(default = "default_ingest_queue")]
    pub queue: usize,
    /// Payload bytes per second one agent or door controller may have processed
    /// (bursts up to one second's worth); beyond it its messages wait their turn, so
    /// one certificate holder cannot take more than its share of the collector.
    /// An agent at its default 2 000 events/s sends about 1.4 MB/s.
    #[serde(default = "default_source_quota")]
    pub max_bytes_per_source_per_sec: usize,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection {
            max_payload_bytes: default_max_payload(),
            queue: default_ingest_queue(),
            max_bytes_per_source_per_sec: default_source_quota(),
        }
    }
}

fn default_source_quota() -> usize {
    4 * 1024 * 1024
}

fn default_max_payload() -> usize {
    crate::wire::DEFAULT_MAX_PAYLOAD
}
fn default_ingest_queue() -> usize {
    256
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// An agent with no event for this long raises an "agent silent" alert. Agents send
    /// a heartbeat every 30 s by default; 80 s plus the 5 s check keeps the worst case
    /// (an agent frozen right after a heartbeat) under 90 s while a single late
    /// heartbeat does not alert.
    #[serde(default = "default_silent")]
    pub silent_after_secs: u64,
    /// A hole in an agent's event sequence is alerted once it stays open this long
    /// (re-sends after an ack timeout fill transient ones).
    #[serde(default = "default_gap_grace")]
    pub gap_grace_secs: u64,
    /// How often the checks run.
    #[serde(default = "default_check")]
    pub check_interval_secs: u64,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollSection {
    /// Accept enrollments (`weilan-agent enroll --collector HOST --token T`).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Address for enrollment over TLS (the broker's server certificate).
    #[serde(default = "default_enroll_listen")]
    pub listen: String,
    /// Lifetime of the certificates enrollment issues.
    #[serde(default = "default_cert_days")]
    pub cert_days: u32,
}

impl Default for EnrollSection {
    fn default() -> Self {
        EnrollSection {
            enabled: true,
            listen: default_enroll_listen(),
            cert_days: default_cert_days(),
        }
    }
}

fn default_enroll_listen() -> String {
    "0.0.0.0:8884".into()
}
fn default_cert_days() -> u32 {
    825
}

impl Default for FleetSection {
    fn default() -> Self {
        FleetSection {
            silent_after_secs: default_silent(),
            gap_grace_secs: default_gap_grace(),
            check_interval_secs: default_check(),
        }
    }
}

fn default_silent() -> u64 {
    80
}
fn default_gap_grace() -> u64 {
    120
}
fn default_check() -> u64 {
    5
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerMode {
    Embedded {
        listen: SocketAddr,
        max_connections: usize,
        mosquitto: PathBuf,
    },
    External,
}

/// Validated collector settings.
#[derive(Debug, Clone)]
pub struct CollectorSettings {
    pub broker: BrokerMode,
    /// Where the collector's own MQTT client connects (the embedded listener or the
    /// external broker).
    pub broker_host: String,
    pub broker_port: u16,
    pub server_name: String,
    pub client_id: String,
    /// `broker.shared_group`: one of several collectors sharing the ingest.
    pub shared_group: Option<String>,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub store_path: PathBuf,
    /// `store.url`: PostgreSQL instead of the SQLite file at `store_path`.
    pub store_url: Option<String>,
    pub alerts_path: PathBuf,
    pub alerts_rotation: AlertRotation,
    pub policy_path: PathBuf,
    pub max_payload_bytes: usize,
    pub ingest_queue: usize,
    /// Payload bytes per second per source (`ingest.max_bytes_per_source_per_sec`).
    pub source_quota: usize,
    pub silent_after: std::time::Duration,
    pub gap_grace: std::time::Duration,
    pub fleet_check_interval: std::time::Duration,
    /// Rule directory, if any.
    pub rules_dir: Option<PathBuf>,
    pub rules_builtin: bool,
    pub rules_reload_check: std::time::Duration,
    /// Badge roster file, if any.
    pub roster: Option<PathBuf>,
    pub sinks: Vec<SinkSettings>,
    pub exports: ExportSettings,
    /// Where enrollment listens, if enabled.
    pub enroll_listen: Option<SocketAddr>,
    /// Days the certificates enrollment issues are valid.
    pub enroll_cert_days: u32,
    /// `[federation]`: district (upstream) or province (districts) or neither.
    pub federation: super::federation::FederationSettings,
    pub log: LogSettings,
}

/// `[broker]`: embedded (its listen address, connection cap, Mosquitto) or
/// external; the host and port the collector connects to; the TLS name and client id.
fn validate_broker(
    b: &BrokerSection,
    store_url: Option<&str>,
    v: &mut Validator,
) -> (BrokerMode, String, u16) {
    let broker = match b.mode.as_str() {
        "embedded" => match b.listen.parse::<SocketAddr>() {
            Ok(listen) => {
                v.range("broker.max_connections", b.max_connections, 1, 1_000_000);
                let mosquitto = b.mosquitto.clone();
                if !mosquitto.is_file() {
                    v.error(
                        "broker.mosquitto",
                        format!(
                            "`{}` not found: the embedded broker is Mosquitto (`apt-get install mosquitto`)",
                            mosquitto.display()
                        ),
                    );
                }
                let host = if listen.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    listen.ip().to_string()
                };
                (
                    BrokerMode::Embedded {
                        listen,
                        max_connections: b.max_connections,
                        mosquitto,
                    },
                    host,
                    listen.port(),
                )
            }
            Err(_) => {
                v.error(
                    "broker.listen",
                    format!("`{}` is not an address:port", b.listen),
                );
                (BrokerMode::External, b.host.clone(), b.port)
            }
        },
        "external" => (BrokerMode::External, b.host.clone(), b.port),
        other => {
            v.error(
                "broker.mode",
                format!("`{other}` is not `embedded` or `external`"),
            );
            (BrokerMode::External, b.host.clone(), b.port)
        }
    };
    if rustls_pki_types::ServerName::try_from(b.server_name.as_str()).is_err() {
        v.error(
            "broker.server_name",
            format!("`{}` is not a valid TLS server name", b.server_name),
        );
    }
    if b.client_id.is_empty() || b.client_id.len() > 128 {
        v.error("broker.client_id", "must be 1 to 128 characters");
    }
    if let Some(group) = &b.shared_group {
        validate_shared_group(group, &broker.0, store_url, v);
    }
    broker
}

/// `broker.shared_group`: a plain name (it becomes a topic level), on an external
/// broker (the embedded one serves one collector), with a store the collectors share.
fn validate_shared_group(
    group: &str,
    mode: &BrokerMode,
    store_url: Option<&str>,
    v: &mut crate::load::Validator,
) {
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if group.is_empty() || group.len() > 64 || !group.chars().all(plain) {
        v.error(
            "broker.shared_group",
            format!("`{group}` must be 1 to 64 letters, digits, `-` or `_`"),
        );
    }
    if !matches!(mode, BrokerMode::External) {
        v.error(
            "broker.shared_group",
            "needs mode = \"external\": the collectors of a group meet on one broker",
        );
    }
    if store_url.is_none() {
        v.error(
            "broker.shared_group",
            "needs [store] url: the collectors of a group share one PostgreSQL database",
        );
    }
}

/// `[[sinks]]`: each named once, of a kind it can be, with its own settings checked;
/// a TLS sink trusts `ca` (the Weilan CA) unless it names its own.
fn validate_sinks(
    raw: Vec<SinkSection>,
    ca: &std::path::Path,
    v: &mut Validator,
) -> Vec<SinkSettings> {
    let mut sinks = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("sinks[{i}].{f}");
        if s.name.is_empty() || sinks.iter().any(|o: &SinkSettings| o.name == s.name) {
            v.error(
                at("name"),
                format!("`{}` must be a unique, non-empty name", s.name),
            );
        }
        if let Some(l) = &s.min_level {
            if !matches!(l.as_str(), "red" | "yellow" | "blue") {
                v.error(at("min_level"), format!("`{l}` is not red, yellow or blue"));
            }
        }
        v.range(&at("queue"), s.queue, 1, 1_000_000);
        let sink_ca = match &s.ca {
            Some(p) => v.existing_file(&at("ca"), p),
            None => ca.to_path_buf(),
        };
        let kind = match s.kind.as_str() {
            "syslog" | "cef" => {
                let address = s.address.clone().unwrap_or_default();
                let host = address
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']).to_string());
                if host.is_none()
                    || address
                        .rsplit_once(':')
                        .is_some_and(|(_, p)| p.parse::<u16>().is_err())
                {
                    v.error(at("address"), format!("`{address}` is not host:port"));
                }
                let transport = match s.transport.as_deref().unwrap_or("udp") {
                    "udp" => Transport::Udp,
                    "tcp" => Transport::Tcp,
                    "tls" => {
                        let server_name = s.server_name.clone().or(host).unwrap_or_default();
                        if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
                            v.error(
                                at("server_name"),
                                format!("`{server_name}` is not a TLS server name"),
                            );
                        }
                        Transport::Tls {
                            ca: sink_ca.clone(),
                            server_name,
                        }
                    }
                    other => {
                        v.error(at("transport"), format!("`{other}` is not udp, tcp or tls"));
                        Transport::Udp
                    }
                };
                SinkKind::Syslog {
                    cef: s.kind == "cef",
                    address,
                    transport,
                }
            }
            "webhook" => {
                let url = s.url.clone().unwrap_or_default();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    v.error(
                        at("url"),
                        format!("`{url}` is not an http:// or https:// URL"),
                    );
                }
                SinkKind::Webhook { url, ca: sink_ca }
            }
            other => {
                v.error(
                    at("type"),
                    format!("`{other}` is not syslog, cef or webhook"),
                );
                continue;
            }
        };
        sinks.push(SinkSettings {
            name: s.name,
            kind,
            min_level: s.min_level,
            queue: s.queue,
        });
    }
    sinks
}

/// `[exports]`: where exports go (beside the database by default), their language,
/// time zone and schedules.
fn validate_exports(
    e: ExportsSection,
    store_path: &std::path::Path,
    v: &mut Validator,
) -> ExportSettings {
    let exports_dir = match &e.dir {
        Some(d) => v.directory("exports.dir", d),
        None => store_path
            .parent()
            .map(|p| p.join("exports"))
            .unwrap_or_else(|| PathBuf::from("exports")),
    };
    v.range(
        "exports.heartbeats_compact_after_secs",
        e.heartbeats_compact_after_secs,
        0,
        31 * 86_400,
    );
    if !matches!(e.language.as_str(), "zh-CN" | "en") {
        v.error(
            "exports.language",
            format!("`{}` is not zh-CN or en", e.language),
        );
    }
    let timezone = jiff::tz::TimeZone::get(&e.timezone).unwrap_or_else(|_| {
        v.error(
            "exports.timezone",
            format!("`{}` is not an IANA time zone", e.timezone),
        );
        jiff::tz::TimeZone::UTC
    });
    let mut schedules: Vec<ScheduleSettings> = Vec::new();
    for (i, s) in e.schedules.into_iter().enumerate() {
        let at = |f: &str| format!("exports.schedules[{i}].{f}");
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || schedules.iter().any(|o| o.name == s.name)
        {
            v.error(
                at("name"),
                format!(
                    "`{}` must be a unique name of letters, digits, - and _",
                    s.name
                ),
            );
        }
        let every = match s.every.as_str() {
            "day" => Every::Day,
            "week" => Every::Week,
            "month" => Every::Month,
            other => {
                v.error(at("every"), format!("`{other}` is not day, week or month"));
                Every::Day
            }
        };
        let time = s.at.parse::<jiff::civil::Time>().unwrap_or_else(|_| {
            v.error(at("at"), format!("`{}` is not a time of day (HH:MM)", s.at));
            jiff::civil::Time::midnight()
        });
        if !s.agents.is_empty() && s.group.is_some() {
            v.error(at("group"), "give agents or a group, not both");
        }
        schedules.push(ScheduleSettings {
            name: s.name,
            every,
            at: time,
            agents: (!s.agents.is_empty()).then_some(s.agents),
            group: s.group,
        });
    }
    ExportSettings {
        dir: exports_dir,
        language: e.language,
        timezone,
        keep: e.keep,
        events_keep_days: e.events_keep_days,
        heartbeats_compact_after: (e.heartbeats_compact_after_secs > 0)
            .then(|| std::time::Duration::from_secs(e.heartbeats_compact_after_secs)),
        schedules,
    }
}

impl Validate for CollectorFile {
    type Valid = CollectorSettings;

    fn validate(self, v: &mut Validator) -> Option<CollectorSettings> {
        let b = self.broker;
        let (broker, host, port) = validate_broker(&b, self.store.url.as_deref(), v);
        let t = self.tls;
        let ca = v.existing_file("tls.ca", &t.ca);
        let enroll_listen = if self.enroll.enabled {
            match self.enroll.listen.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    v.error(
                        "enroll.listen",
                        format!("`{}` is not an address:port", self.enroll.listen),
                    );
                    None
                }
            }
        } else {
            None
        };
        v.range("enroll.cert_days", self.enroll.cert_days as usize, 1, 3650);
        // Enrollment serves TLS with the broker's server certificate too.
        let (server_cert, server_key) =
            if matches!(broker, BrokerMode::Embedded { .. }) || enroll_listen.is_some() {
                (
                    v.existing_file("tls.server_cert", &t.server_cert),
                    v.existing_file("tls.server_key", &t.server_key),
                )
            } else {
                (v.resolve(&t.server_cert), v.resolve(&t.server_key))
            };
        let client_cert = v.existing_file("tls.client_cert", &t.client_cert);
        let client_key = v.existing_file("tls.client_key", &t.client_key);
        let store_path = v.creatable_file("store.path", &self.store.path);
        validate_store_url(self.store.url.as_deref(), v);
        let alerts_path = v.creatable_file("alerts.path", &self.alerts.path);
        v.range("alerts.rotate_mib", self.alerts.rotate_mib, 0, 1 << 20);
        v.range("alerts.rotate_hours", self.alerts.rotate_hours, 0, 24 * 366);
        v.range("alerts.keep", self.alerts.keep, 1, 10_000);
        let policy_path = v.existing_file("policy.path", &self.policy.path);
        v.range(
            "ingest.max_payload_bytes",
            self.ingest.max_payload_bytes,
            1024,
            64 * 1024 * 1024,
        );
        v.range("ingest.queue", self.ingest.queue, 1, 100_000);
        v.range(
            "ingest.max_bytes_per_source_per_sec",
            self.ingest.max_bytes_per_source_per_sec,
            64 * 1024,
            1 << 30,
        );
        v.range(
            "fleet.silent_after_secs",
            self.fleet.silent_after_secs,
            1,
            86_400,
        );
        v.range("fleet.gap_grace_secs", self.fleet.gap_grace_secs, 0, 86_400);
        v.range(
            "fleet.check_interval_secs",
            self.fleet.check_interval_secs,
            1,
            3600,
        );
        let rules_dir = self.rules.dir.as_ref().map(|d| v.directory("rules.dir", d));
        let roster = self
            .rules
            .roster
            .as_ref()
            .map(|p| v.existing_file("rules.roster", p));
        v.range(
            "rules.reload_check_secs",
            self.rules.reload_check_secs,
            1,
            3600,
        );
        let sinks = validate_sinks(self.sinks, &ca, v);
        let exports = validate_exports(self.exports, &store_path, v);
        let federation = self.federation.validate(v);
        let log = self.log.validate(v);
        Some(CollectorSettings {
            broker,
            broker_host: host,
            broker_port: port,
            server_name: b.server_name,
            client_id: b.client_id,
            shared_group: b.shared_group,
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
            store_path,
            store_url: self.store.url.clone(),
            alerts_path,
            alerts_rotation: AlertRotation {
                max_bytes: self.alerts.rotate_mib * 1024 * 1024,
                max_age_secs: self.alerts.rotate_hours * 3600,
                keep: self.alerts.keep,
            },
            policy_path,
            max_payload_bytes: self.ingest.max_payload_bytes,
            ingest_queue: self.ingest.queue,
            source_quota: self.ingest.max_bytes_per_source_per_sec,
            silent_after: std::time::Duration::from_secs(self.fleet.silent_after_secs),
            gap_grace: std::time::Duration::from_secs(self.fleet.gap_grace_secs),
            fleet_check_interval: std::time::Duration::from_secs(self.fleet.check_interval_secs),
            rules_dir,
            rules_builtin: self.rules.builtin,
            rules_reload_check: std::time::Duration::from_secs(self.rules.reload_check_secs),
            roster,
            sinks,
            exports,
            enroll_listen,
            enroll_cert_days: self.enroll.cert_days,
            federation,
            log,
        })
    }
}
