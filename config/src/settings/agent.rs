//! `agent.toml`: how one agent finds its collector, proves who it is, and what it watches.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::{LogSection, LogSettings};
use crate::load::{Validate, Validator};

/// The raw `agent.toml`.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// `[agent]`: the host and where the agent keeps its state.
    pub agent: AgentSection,
    /// `[collector]`: where to deliver events, and whom to trust.
    pub collector: CollectorLink,
    /// `[tls]`: this agent's client certificate; its common name *is* the agent id.
    pub tls: ClientTls,
    /// `[usb]`: the USB storage source.
    #[serde(default)]
    pub usb: UsbSection,
    /// `[files]`: files written onto exit points (removable media, network shares).
    #[serde(default)]
    pub files: FilesSection,
    /// `[network]`: outgoing transfers (sock_diag) and transfer tools (process events).
    #[serde(default)]
    pub network: NetworkSection,
    /// `[access]`: logins and privilege use on this host.
    #[serde(default)]
    pub access: AccessSection,
    /// `[door]`: badge readers and door contacts wired to this host (`door` role).
    #[serde(default)]
    pub door: DoorSection,
    /// `[heartbeat]`.
    #[serde(default)]
    pub heartbeat: HeartbeatSection,
    /// `[queues]`: bounds of the in-memory queues.
    #[serde(default)]
    pub queues: QueueSection,
    /// `[journal]`: the durable on-disk journal of captured events.
    #[serde(default)]
    pub journal: JournalSection,
    /// `[log]`.
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Role of this host: `workstation`, `server-room` or `door`. Travels with every event.
    #[serde(default = "default_role")]
    pub host_role: String,
    /// The site this host is at (a building, floor or server room, e.g. `hq-3f-dc`).
    /// Travels with every event; the collector matches it with the badge readers and
    /// doors of the same site. Required for the `server-room` and `door` roles.
    #[serde(default)]
    pub site: Option<String>,
    /// Directory for the agent's own state (epoch counter, journal). Root-only.
    pub state_dir: PathBuf,
    /// The fence policy file enforced on this host.
    pub policy: PathBuf,
    /// Host groups this host belongs to (policy rules can be limited to groups).
    #[serde(default)]
    pub groups: Vec<String>,
}

fn default_role() -> String {
    "workstation".into()
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorLink {
    /// Host name or address of the MQTT broker (embedded in the collector, or external).
    pub host: String,
    /// MQTT over TLS port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Name the broker's certificate must carry (checked regardless of `host`).
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The pinned Weilan CA (PEM). Only servers with a certificate from it are trusted.
    pub ca: PathBuf,
    /// The collector's enrollment port, where the agent renews its certificate at two
    /// thirds of its lifetime (on `host`); 0 turns renewal off.
    #[serde(default = "default_renew_port")]
    pub renew_port: u16,
    /// MQTT keep-alive in seconds; the broker publishes the last will after 1.5×.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Largest number of events in one signed batch.
    #[serde(default = "default_batch_max")]
    pub batch_max_events: usize,
    /// Longest time new events gather into a batch while earlier batches await their
    /// ack, in milliseconds (with nothing in flight an event is sent at once).
    #[serde(default = "default_linger")]
    pub batch_linger_ms: u64,
    /// Unacknowledged batches in flight before the agent waits for acks (1 to 32).
    #[serde(default = "default_window")]
    pub max_batches_in_flight: usize,
    /// Seconds to wait for the collector's ack before sending a batch again.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_secs: u64,
    /// After the broker connection drops, the first reconnect waits a random moment
    /// within this many seconds, so a fleet dropped at once by a broker restart does
    /// not come back in lockstep (0 to 300).
    #[serde(default = "default_reconnect_spread")]
    pub reconnect_spread_secs: u64,
    /// Most events sent per second, replay after an outage included, so a fleet
    /// reconnecting at once cannot flatten the collector.
    #[serde(default = "default_rate")]
    pub max_events_per_sec: u32,
}

fn default_rate() -> u32 {
    2000
}

fn default_port() -> u16 {
    8883
}
fn default_renew_port() -> u16 {
    crate::enroll::DEFAULT_PORT
}
fn default_server_name() -> String {
    "weilan-collector".into()
}
fn default_keep_alive() -> u64 {
    20
}
fn default_batch_max() -> usize {
    256
}
fn default_linger() -> u64 {
    50
}
fn default_window() -> usize {
    8
}
fn default_ack_timeout() -> u64 {
    30
}
fn default_reconnect_spread() -> u64 {
    10
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// Client certificate (PEM), issued by `weilan-collector pki issue-agent NAME`.
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8). Keep it 0600, root-owned.
    pub key: PathBuf,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsbSection {
    /// Watch USB devices and removable mounts.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Root of sysfs. Tests point this at a fake tree.
    #[serde(default = "default_sysfs")]
    pub sysfs_root: PathBuf,
    /// The mount table to watch.
    #[serde(default = "default_mountinfo")]
    pub mountinfo: PathBuf,
    /// Re-read the mount table at least this often (milliseconds), in addition to
    /// the kernel's change notification.
    #[serde(default = "default_mount_poll")]
    pub mount_poll_ms: u64,
    /// Where device nodes live (for reading filesystem labels).
    #[serde(default = "default_dev")]
    pub dev_root: PathBuf,
}

impl Default for UsbSection {
    fn default() -> Self {
        UsbSection {
            enabled: true,
            sysfs_root: default_sysfs(),
            mountinfo: default_mountinfo(),
            mount_poll_ms: default_mount_poll(),
            dev_root: default_dev(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_sysfs() -> PathBuf {
    "/sys".into()
}
fn default_mountinfo() -> PathBuf {
    "/proc/self/mountinfo".into()
}
fn default_mount_poll() -> u64 {
    2000
}
fn default_dev() -> PathBuf {
    "/dev".into()
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSection {
    /// Report files written onto USB mounts, network shares and `watch_mounts`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Extra mount points to treat as exit points.
    #[serde(default)]
    pub watch_mounts: Vec<PathBuf>,
    /// Kernel interface: `fanotify` (writer known; needs root outside a user
    /// namespace), `inotify` (writer unknown: events say `attribution: none`), or
    /// `auto` (fanotify, else inotify). Which file-system types are exit points is
    /// policy (`files.exit_fs_types` in policy.toml).
    #[serde(default = "default_files_backend")]
    pub backend: String,
    /// Files are hashed whole up to this many MiB (`hashed_bytes` below `size` in the
    /// event says a file was larger and its `sha256` covers only that prefix).
    #[serde(default = "default_hash_max")]
    pub hash_max_mib: u64,
    /// Files hashed and classified at once.
    #[serde(default = "default_file_workers")]
    pub workers: usize,
}

impl Default for FilesSection {
    fn default() -> Self {
        FilesSection {
            enabled: true,
            watch_mounts: Vec::new(),
            backend: default_files_backend(),
            hash_max_mib: default_hash_max(),
            workers: default_file_workers(),
        }
    }
}

fn default_files_backend() -> String {
    "auto".into()
}
fn default_hash_max() -> u64 {
    // 64 GiB: every file a stick can take is hashed whole (holes cost no I/O).
    65536
}
fn default_file_workers() -> usize {
    2
}

/// Validated `[files]`.
#[derive(Debug, Clone)]
pub struct FilesSettings {
    /// Where mounts and the USB devices behind them are read (the `[usb]` section's
    /// locations, whether or not the USB fence is enabled: exit points are found the
    /// same way).
    pub sysfs_root: PathBuf,
    pub mountinfo: PathBuf,
    pub mount_poll: Duration,
    pub watch_mounts: Vec<PathBuf>,
    pub backend: FilesBackend,
    pub hash_max_bytes: u64,
    pub workers: usize,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Report outgoing transfers and transfer tools. What is allowed is policy
    /// (`[network]` in policy.toml).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often each namespace's TCP counters are checked, in milliseconds; a
    /// namespace whose segment counters moved (or whose sockets closed) since its
    /// last read has its sockets read again. Connections that close between two
    /// polls are still reported from the kernel's socket-destroy notification (see
    /// docs/protocol.md for what a very short one can escape).
    #[serde(default = "default_net_poll_ms")]
    pub poll_ms: u64,
    /// Every namespace's sockets are read at least this often, in seconds, whether
    /// its counters moved or not: the safety net under the change detection.
    #[serde(default = "default_net_reconcile_secs")]
    pub reconcile_secs: u64,
    /// `all` (every network namespace a process on this host uses: containers,
    /// sandboxes) or `own` (only the agent's).
    #[serde(default = "default_net_namespaces")]
    pub namespaces: String,
    /// Watch process starts (the kernel's process connector) for transfer tools
    /// (`net.transfer_tool`).
    #[serde(default = "yes")]
    pub transfer_tools: bool,
    /// At most this many open files of a sending process are examined per event.
    #[serde(default = "default_net_max_open_files")]
    pub max_open_files: usize,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            enabled: true,
            poll_ms: default_net_poll_ms(),
            reconcile_secs: default_net_reconcile_secs(),
            namespaces: default_net_namespaces(),
            transfer_tools: true,
            max_open_files: default_net_max_open_files(),
        }
    }
}

fn default_net_poll_ms() -> u64 {
    500
}
fn default_net_reconcile_secs() -> u64 {
    300
}
fn default_net_namespaces() -> String {
    "all".into()
}
fn default_net_max_open_files() -> usize {
    256
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    /// Report logins, failed logins and sudo/su use (`access.*`).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `auto` (the journal where systemd runs, else the first auth log that exists,
    /// else `wtmp`: sessions only), `journal`, `auth-log` or `utmp`.
    #[serde(default = "default_access_from")]
    pub from: String,
    /// Auth log files, in order of preference.
    #[serde(default = "default_auth_logs")]
    pub auth_logs: Vec<PathBuf>,
    /// The login record (`utmp` source): sessions' start and end, terminal, remote host.
    #[serde(default = "default_wtmp")]
    pub wtmp: PathBuf,
    /// How often the auth log is read, in milliseconds.
    #[serde(default = "default_access_poll_ms")]
    pub poll_ms: u64,
}

impl Default for AccessSection {
    fn default() -> Self {
        AccessSection {
            enabled: true,
            from: default_access_from(),
            auth_logs: default_auth_logs(),
            wtmp: default_wtmp(),
            poll_ms: default_access_poll_ms(),
        }
    }
}

fn default_access_from() -> String {
    "auto".into()
}
fn default_auth_logs() -> Vec<PathBuf> {
    vec!["/var/log/auth.log".into(), "/var/log/secure".into()]
}
fn default_wtmp() -> PathBuf {
    "/var/log/wtmp".into()
}
fn default_access_poll_ms() -> u64 {
    500
}

#[derive(Debug, Clone, Default, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DoorSection {
    /// File holding the site's badge key: at least 16 bytes, the same file on every
    /// door agent of the site (one card, one hash), readable by root only. Card numbers
    /// are reported as HMAC-SHA256 under this key, never in clear.
    #[serde(default)]
    pub badge_key: Option<PathBuf>,
    /// Badge readers that present themselves as USB keyboards.
    #[serde(default)]
    pub readers: Vec<BadgeReaderSection>,
    /// Door contacts (reed switches) on GPIO lines.
    #[serde(default)]
    pub contacts: Vec<DoorContactSection>,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BadgeReaderSection {
    /// Name in events (`access.badge.reader`), e.g. the door it guards.
    pub name: String,
    /// `usb:VID:PID` in hex (the first keyboard-capable input device with that
    /// identity), or an input device path such as
    /// `/dev/input/by-path/platform-xhci-hcd.0-usb-0:1:1.0-event-kbd`.
    pub device: String,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DoorContactSection {
    /// Name in events (`access.door.door`).
    pub door: String,
    /// GPIO character device, e.g. `/dev/gpiochip0`.
    pub chip: PathBuf,
    /// Line offset on that chip (the BCM number on a Raspberry Pi's gpiochip0).
    pub line: u32,
    /// Line level that means the door is open: `high` (a normally-closed reed switch
    /// to ground with a pull-up, the usual wiring) or `low`.
    #[serde(default = "default_open_level")]
    pub open_level: String,
    /// `pull-up`, `pull-down`, `disabled` (external resistor) or `as-is`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// A level must last this long to count (contact bounce), in milliseconds.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// `access.door` `held-open` once the door stands open this long, in seconds.
    #[serde(default = "default_held_open_secs")]
    pub held_open_secs: u64,
}

fn default_open_level() -> String {
    "high".into()
}
fn default_bias() -> String {
    "pull-up".into()
}
fn default_debounce_ms() -> u64 {
    50
}
fn default_held_open_secs() -> u64 {
    120
}

/// Validated `[door]`.
#[derive(Debug, Clone)]
pub struct DoorSettings {
    pub badge_key: Option<PathBuf>,
    pub readers: Vec<BadgeReader>,
    pub contacts: Vec<DoorContact>,
}

/// How a badge reader is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderDevice {
    Usb { vendor: u16, product: u16 },
    Path(PathBuf),
}

#[derive(Debug, Clone)]
pub struct BadgeReader {
    pub name: String,
    pub device: ReaderDevice,
}

#[derive(Debug, Clone)]
pub struct DoorContact {
    pub door: String,
    pub chip: PathBuf,
    pub line: u32,
    pub open_high: bool,
    /// `pull-up`, `pull-down`, `disabled` or `as-is`.
    pub bias: String,
    pub debounce: Duration,
    pub held_open: Duration,
}

impl DoorSection {
    fn validate(&self, v: &mut Validator, site: Option<&str>) -> Option<DoorSettings> {
        if self.readers.is_empty() && self.contacts.is_empty() {
            return None;
        }
        if site.is_none() {
            v.error(
                "agent.site",
                "badge readers and door contacts need the site they guard",
            );
        }
        let mut readers = Vec::new();
        for (i, r) in self.readers.iter().enumerate() {
            if !crate::topics::valid_agent_id(&r.name) {
                v.error(
                    format!("door.readers[{i}].name"),
                    "1-64 characters of letters, digits, `.`, `_` and `-`",
                );
            }
            let device = if let Some(id) = r.device.strip_prefix("usb:") {
                let parsed = id.split_once(':').and_then(|(a, b)| {
                    Some((
                        u16::from_str_radix(a, 16).ok()?,
                        u16::from_str_radix(b, 16).ok()?,
                    ))
                });
                match parsed {
                    Some((vendor, product)) => ReaderDevice::Usb { vendor, product },
                    None => {
                        v.error(
                            format!("door.readers[{i}].device"),
                            format!(
                                "`{}`: expected usb:VID:PID in hex, e.g. usb:0c27:3bfa",
                                r.device
                            ),
                        );
                        continue;
                    }
                }
            } else if r.device.starts_with('/') {
                ReaderDevice::Path(PathBuf::from(&r.device))
            } else {
                v.error(
                    format!("door.readers[{i}].device"),
                    format!(
                        "`{}`: expected usb:VID:PID or an absolute /dev/input path",
                        r.device
                    ),
                );
                continue;
            };
            readers.push(BadgeReader {
                name: r.name.clone(),
                device,
            });
        }
        if !readers.is_empty() {
            match &self.badge_key {
                None => v.error(
                    "door.badge_key",
                    "badge readers need the site's badge key file",
                ),
                Some(p) => {
                    v.existing_file("door.badge_key", p);
                }
            }
        }
        let mut contacts = Vec::new();
        for (i, c) in self.contacts.iter().enumerate() {
            let at = |f: &str| format!("door.contacts[{i}].{f}");
            if !crate::topics::valid_agent_id(&c.door) {
                v.error(
                    at("door"),
                    "1-64 characters of letters, digits, `.`, `_` and `-`",
                );
            }
            v.one_of(&at("open_level"), &c.open_level, &["high", "low"]);
            let open_high = c.open_level != "low";
            v.one_of(
                &at("bias"),
                &c.bias,
                &["pull-up", "pull-down", "disabled", "as-is"],
            );
            v.range(&at("debounce_ms"), c.debounce_ms, 1, 5_000);
            v.range(&at("held_open_secs"), c.held_open_secs, 1, 86_400);
            contacts.push(DoorContact {
                door: c.door.clone(),
                chip: c.chip.clone(),
                line: c.line,
                open_high,
                bias: c.bias.clone(),
                debounce: Duration::from_millis(c.debounce_ms),
                held_open: Duration::from_secs(c.held_open_secs),
            });
        }
        Some(DoorSettings {
            badge_key: self.badge_key.clone(),
            readers,
            contacts,
        })
    }
}

/// The files source's kernel interface (`files.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilesBackend {
    /// fanotify (writers known), else inotify.
    Auto,
    Fanotify,
    Inotify,
}

impl FilesBackend {
    const NAMES: [(&'static str, FilesBackend); 3] = [
        ("auto", FilesBackend::Auto),
        ("fanotify", FilesBackend::Fanotify),
        ("inotify", FilesBackend::Inotify),
    ];
}

/// Where logins come from (`access.from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFrom {
    /// The journal where systemd runs, else the first auth log, else wtmp.
    Auto,
    Journal,
    AuthLog,
    /// wtmp: sessions only (no failures, no sudo).
    Utmp,
}

impl AccessFrom {
    const NAMES: [(&'static str, AccessFrom); 4] = [
        ("auto", AccessFrom::Auto),
        ("journal", AccessFrom::Journal),
        ("auth-log", AccessFrom::AuthLog),
        ("utmp", AccessFrom::Utmp),
    ];
}

/// `value`'s variant in `names`, or an error on `field` listing the choices.
fn closed_set<T: Copy>(
    v: &mut crate::load::Validator,
    field: &str,
    value: &str,
    names: &[(&str, T)],
) -> Option<T> {
    let choices: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
    v.one_of(field, value, &choices)
        .then(|| names.iter().find(|(n, _)| *n == value).map(|(_, t)| *t))
        .flatten()
}

/// Validated `[access]`.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    pub from: AccessFrom,
    pub auth_logs: Vec<PathBuf>,
    pub wtmp: PathBuf,
    pub poll: Duration,
}

/// Validated `[network]`.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    pub poll: Duration,
    /// Every namespace's sockets are dumped at least this often.
    pub reconcile: Duration,
    /// Every namespace (`true`) or only the agent's own.
    pub all_namespaces: bool,
    pub transfer_tools: bool,
    pub max_open_files: usize,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSection {
    /// Seconds between `agent.heartbeat` events.
    #[serde(default = "default_heartbeat")]
    pub interval_secs: u64,
}

impl Default for HeartbeatSection {
    fn default() -> Self {
        HeartbeatSection {
            interval_secs: default_heartbeat(),
        }
    }
}

fn default_heartbeat() -> u64 {
    30
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Capacity of the channel from sources to the recorder (events).
    #[serde(default = "default_pipeline")]
    pub pipeline: usize,
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            pipeline: default_pipeline(),
        }
    }
}

fn default_pipeline() -> usize {
    4096
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSection {
    /// Upper bound of the journal on disk, in MiB. Past it the oldest unacknowledged
    /// events are deleted and reported as `agent.events_lost`. The default holds
    /// 7 days offline at 100 events/s (60.5 M events at ~520 bytes ≈ 30 GiB); disk
    /// is only used as events wait.
    #[serde(default = "default_journal_max")]
    pub max_mib: u64,
    /// Size of one segment file, in MiB (the unit of deletion).
    #[serde(default = "default_segment")]
    pub segment_mib: u64,
    /// Acknowledged events kept for local replay (`weilan-agent journal --reset-acks`),
    /// in MiB; older acknowledged segments are deleted.
    #[serde(default = "default_retain")]
    pub retain_acked_mib: u64,
}

fn default_retain() -> u64 {
    64
}

impl Default for JournalSection {
    fn default() -> Self {
        JournalSection {
            max_mib: default_journal_max(),
            segment_mib: default_segment(),
            retain_acked_mib: default_retain(),
        }
    }
}

fn default_journal_max() -> u64 {
    32 * 1024
}
fn default_segment() -> u64 {
    16
}

/// Host roles an agent can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostRole {
    Workstation,
    ServerRoom,
    Door,
}

impl HostRole {
    pub fn as_str(self) -> &'static str {
        match self {
            HostRole::Workstation => "workstation",
            HostRole::ServerRoom => "server-room",
            HostRole::Door => "door",
        }
    }
}

/// How the agent delivers its journal to the collector: the `[collector]` table's
/// batching, flow control and reconnect settings, validated.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub keep_alive: Duration,
    pub batch_max_events: usize,
    pub batch_linger: Duration,
    pub max_batches_in_flight: usize,
    pub ack_timeout: Duration,
    /// The first reconnect after a drop waits a random moment within this.
    pub reconnect_spread: Duration,
    /// Most events sent per second (replay after an outage included).
    pub max_events_per_sec: u32,
}

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub host_role: HostRole,
    pub site: Option<String>,
    pub host_groups: Vec<String>,
    pub state_dir: PathBuf,
    pub policy: PathBuf,
    pub collector_host: String,
    pub collector_port: u16,
    /// Where certificate renewal goes (`None`: off).
    pub renew_port: Option<u16>,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub delivery: Delivery,
    pub usb: Option<UsbSettings>,
    pub files: Option<FilesSettings>,
    pub network: Option<NetworkSettings>,
    pub access: Option<AccessSettings>,
    /// Badge readers and door contacts; `None` when none is configured.
    pub door: Option<DoorSettings>,
    pub heartbeat: Duration,
    pub pipeline_capacity: usize,
    pub journal_max_bytes: u64,
    pub journal_segment_bytes: u64,
    pub journal_retain_acked_bytes: u64,
    pub log: LogSettings,
}

#[derive(Debug, Clone)]
pub struct UsbSettings {
    pub sysfs_root: PathBuf,
    pub mountinfo: PathBuf,
    pub mount_poll: Duration,
    pub dev_root: PathBuf,
}

impl CollectorLink {
    /// `[collector]`: where the broker is and how batches are sent; the CA file.
    fn check(&self, v: &mut Validator) -> std::path::PathBuf {
        if self.host.trim().is_empty() {
            v.error("collector.host", "must name the broker's host");
        }
        if self.port == 0 {
            v.error("collector.port", "0 is not a port");
        }
        if rustls_pki_types::ServerName::try_from(self.server_name.as_str()).is_err() {
            v.error(
                "collector.server_name",
                format!("`{}` is not a valid TLS server name", self.server_name),
            );
        }
        v.range("collector.keep_alive_secs", self.keep_alive_secs, 5, 3600);
        v.range(
            "collector.batch_max_events",
            self.batch_max_events,
            1,
            crate::wire::MAX_BATCH_EVENTS,
        );
        v.range("collector.batch_linger_ms", self.batch_linger_ms, 0, 60_000);
        // The collector serves each source's share of 64 waiting messages
        // (collector/src/fair.rs): 32 in flight plus their re-sends stay within it.
        v.range(
            "collector.max_batches_in_flight",
            self.max_batches_in_flight,
            1,
            32,
        );
        v.range("collector.ack_timeout_secs", self.ack_timeout_secs, 1, 3600);
        v.range(
            "collector.reconnect_spread_secs",
            self.reconnect_spread_secs,
            0,
            300,
        );
        v.range(
            "collector.max_events_per_sec",
            self.max_events_per_sec,
            1,
            1_000_000,
        );
        v.existing_file("collector.ca", &self.ca)
    }
}

/// Each of `paths` must be absolute (what the agent reads must not depend on the
/// directory it was started in).
fn all_absolute(v: &mut Validator, field: &str, paths: &[std::path::PathBuf], what: &str) {
    for (i, p) in paths.iter().enumerate() {
        if !p.is_absolute() {
            v.error(
                format!("{field}[{i}]"),
                format!("`{}` must be an absolute {what}", p.display()),
            );
        }
    }
}

impl FilesSection {
    /// `[files]`: limits, the backend, the mount points to watch (the mount table and sysfs are `[usb]`'s).
    fn validate(&self, v: &mut Validator, usb: &UsbSection) -> FilesSettings {
        v.range("files.hash_max_mib", self.hash_max_mib, 1, 1 << 20);
        v.range("files.workers", self.workers, 1, 64);
        let backend = closed_set(v, "files.backend", &self.backend, &FilesBackend::NAMES);
        all_absolute(v, "files.watch_mounts", &self.watch_mounts, "mount point");
        FilesSettings {
            sysfs_root: v.resolve(&usb.sysfs_root),
            mountinfo: v.resolve(&usb.mountinfo),
            mount_poll: Duration::from_millis(usb.mount_poll_ms),
            watch_mounts: self.watch_mounts.clone(),
            backend: backend.unwrap_or(FilesBackend::Auto),
            hash_max_bytes: self.hash_max_mib * 1024 * 1024,
            workers: self.workers,
        }
    }
}

impl NetworkSection {
    /// `[network]`: the poll interval, the namespaces to watch, open files per process.
    fn validate(&self, v: &mut Validator) -> NetworkSettings {
        v.range("network.poll_ms", self.poll_ms, 50, 60_000);
        v.range("network.reconcile_secs", self.reconcile_secs, 10, 86_400);
        v.range("network.max_open_files", self.max_open_files, 1, 65_536);
        v.one_of("network.namespaces", &self.namespaces, &["all", "own"]);
        NetworkSettings {
            poll: Duration::from_millis(self.poll_ms),
            reconcile: Duration::from_secs(self.reconcile_secs),
            all_namespaces: self.namespaces != "own",
            transfer_tools: self.transfer_tools,
            max_open_files: self.max_open_files,
        }
    }
}

impl AccessSection {
    /// `[access]`: where logins are read from, and the poll interval.
    fn validate(&self, v: &mut Validator) -> AccessSettings {
        v.range("access.poll_ms", self.poll_ms, 50, 60_000);
        let from = closed_set(v, "access.from", &self.from, &AccessFrom::NAMES);
        all_absolute(v, "access.auth_logs", &self.auth_logs, "path");
        AccessSettings {
            from: from.unwrap_or(AccessFrom::Auto),
            auth_logs: self.auth_logs.clone(),
            wtmp: self.wtmp.clone(),
            poll: Duration::from_millis(self.poll_ms),
        }
    }
}

impl Validate for AgentFile {
    type Valid = AgentSettings;

    fn validate(self, v: &mut Validator) -> Option<AgentSettings> {
        let host_role = match self.agent.host_role.as_str() {
            "workstation" => HostRole::Workstation,
            "server-room" => HostRole::ServerRoom,
            "door" => HostRole::Door,
            other => {
                v.error(
                    "agent.host_role",
                    format!("`{other}` is not `workstation`, `server-room` or `door`"),
                );
                HostRole::Workstation
            }
        };
        let site = self.agent.site.clone();
        match &site {
            Some(s) if !crate::topics::valid_agent_id(s) => v.error(
                "agent.site",
                format!("`{s}` must be 1-64 characters of letters, digits, `.`, `_` and `-`"),
            ),
            None if host_role != HostRole::Workstation => v.error(
                "agent.site",
                format!(
                    "a `{}` host needs its site (the badge readers and doors are matched by it)",
                    host_role.as_str()
                ),
            ),
            _ => {}
        }
        let state_dir = v.directory("agent.state_dir", &self.agent.state_dir);
        let policy = v.existing_file("agent.policy", &self.agent.policy);
        let c = self.collector;
        let ca = c.check(v);
        let cert = v.existing_file("tls.cert", &self.tls.cert);
        let key = v.existing_file("tls.key", &self.tls.key);
        if self.usb.enabled || self.files.enabled {
            v.range("usb.mount_poll_ms", self.usb.mount_poll_ms, 50, 600_000);
        }
        let usb = if self.usb.enabled {
            Some(UsbSettings {
                sysfs_root: v.resolve(&self.usb.sysfs_root),
                mountinfo: v.resolve(&self.usb.mountinfo),
                mount_poll: Duration::from_millis(self.usb.mount_poll_ms),
                dev_root: v.resolve(&self.usb.dev_root),
            })
        } else {
            None
        };
        let files = self
            .files
            .enabled
            .then(|| self.files.validate(v, &self.usb));
        let network = self.network.enabled.then(|| self.network.validate(v));
        let access = self.access.enabled.then(|| self.access.validate(v));
        let door = self.door.validate(v, site.as_deref());
        v.range(
            "heartbeat.interval_secs",
            self.heartbeat.interval_secs,
            1,
            3600,
        );
        v.range("queues.pipeline", self.queues.pipeline, 16, 1_000_000);
        v.range("journal.max_mib", self.journal.max_mib, 1, 16 * 1024 * 1024);
        v.range("journal.segment_mib", self.journal.segment_mib, 1, 1024);
        if self.journal.segment_mib > self.journal.max_mib {
            v.error("journal.segment_mib", "must not exceed journal.max_mib");
        }
        let log = self.log.validate(v);
        Some(AgentSettings {
            host_role,
            site,
            host_groups: self.agent.groups,
            state_dir,
            policy,
            collector_host: c.host,
            collector_port: c.port,
            renew_port: (c.renew_port != 0).then_some(c.renew_port),
            server_name: c.server_name,
            ca,
            cert,
            key,
            delivery: Delivery {
                keep_alive: Duration::from_secs(c.keep_alive_secs),
                batch_max_events: c.batch_max_events,
                batch_linger: Duration::from_millis(c.batch_linger_ms),
                max_batches_in_flight: c.max_batches_in_flight,
                ack_timeout: Duration::from_secs(c.ack_timeout_secs),
                reconnect_spread: Duration::from_secs(c.reconnect_spread_secs),
                max_events_per_sec: c.max_events_per_sec,
            },
            usb,
            files,
            network,
            access,
            door,
            heartbeat: Duration::from_secs(self.heartbeat.interval_secs),
            pipeline_capacity: self.queues.pipeline,
            journal_max_bytes: self.journal.max_mib * 1024 * 1024,
            journal_segment_bytes: self.journal.segment_mib * 1024 * 1024,
            journal_retain_acked_bytes: self.journal.retain_acked_mib * 1024 * 1024,
            log,
        })
    }
}
