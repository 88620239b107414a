//! The event wire schema: a versioned [`Envelope`] around a closed [`Event`] enum.
//!
//! Every event an agent captures travels in an envelope that names the agent, the
//! agent's epoch (incremented each time the agent's sequence restarts) and a monotonic
//! sequence number. `(agent_id, epoch, seq)` is globally unique and totally ordered per
//! agent; [`EventId`] is its string form and the collector's primary key.
//!
//! Payload structs use `deny_unknown_fields`: the schema is ours, so an unknown field is
//! a bug or an attack, never something to ignore silently. New fields are added with a
//! schema version bump (see `docs/protocol.md`).

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Version of the envelope/event schema this build writes and accepts.
pub const SCHEMA_VERSION: u32 = 1;

/// Position of one event in an agent's stream: `(epoch, seq)`, totally ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventKey {
    /// A new one at every start of the agent: above the previous epoch and at least
    /// the start time in Unix milliseconds, so a re-installed agent or a restored state
    /// directory never reuses one.
    pub epoch: u64,
    /// Monotonic within an epoch, starting at 1.
    pub seq: u64,
}

impl fmt::Display for EventKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

/// Globally unique event identifier: `{agent_id}:{epoch}:{seq}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub agent_id: String,
    pub key: EventKey,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.agent_id, self.key)
    }
}

impl FromStr for EventId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.rsplitn(3, ':');
        let seq = parts.next().and_then(|p| p.parse().ok());
        let epoch = parts.next().and_then(|p| p.parse().ok());
        let agent = parts.next();
        match (agent, epoch, seq) {
            (Some(agent), Some(epoch), Some(seq)) if crate::topics::valid_agent_id(agent) => {
                Ok(EventId {
                    agent_id: agent.to_string(),
                    key: EventKey { epoch, seq },
                })
            }
            _ => Err(format!("`{s}` is not of the form agent:epoch:seq")),
        }
    }
}

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One captured event as it travels from agent to collector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema: u32,
    /// `{agent_id}:{epoch}:{seq}`; must agree with the fields below.
    pub event_id: EventId,
    /// Agent wall-clock time when the fact was observed.
    pub time: Timestamp,
    /// Host role of the agent (`workstation`, `server-room`, `door`), travels with every event.
    pub host_role: String,
    /// The site (building, floor, server room) the agent is at (`[agent] site`); the
    /// collector correlates a server-room host with the badge readers of its site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// SHA-256 (hex) of the previous record of this agent's journal, exactly as its
    /// JSON bytes were written and sent; 64 zeros for the first record of an epoch.
    /// Any edit or removal of a buffered record breaks this chain visibly.
    pub prev_hash: String,
    /// The fact itself.
    pub event: Event,
}

impl Envelope {
    pub fn kind(&self) -> &'static str {
        self.event.kind()
    }
}

/// The `prev_hash` of the first record of an epoch.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 (hex) of a record's JSON bytes: what the next record's `prev_hash` names.
pub fn record_hash(json: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, json))
}

/// The closed set of events. Serialized as `{"kind": "...", "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", deny_unknown_fields)]
pub enum Event {
    #[serde(rename = "usb.attached")]
    UsbAttached(UsbDevice),
    #[serde(rename = "usb.detached")]
    UsbDetached(UsbDetached),
    #[serde(rename = "volume.mounted")]
    VolumeMounted(Volume),
    #[serde(rename = "volume.unmounted")]
    VolumeUnmounted(Volume),
    #[serde(rename = "agent.started")]
    AgentStarted(AgentStarted),
    #[serde(rename = "agent.epoch_started")]
    AgentEpochStarted(EpochStarted),
    #[serde(rename = "agent.heartbeat")]
    AgentHeartbeat(Heartbeat),
    #[serde(rename = "agent.stopping")]
    AgentStopping(AgentStopping),
    #[serde(rename = "agent.events_lost")]
    AgentEventsLost(EventsLost),
    #[serde(rename = "agent.source_error")]
    AgentSourceError(SourceError),
    #[serde(rename = "usb.decision")]
    UsbDecision(UsbDecision),
    #[serde(rename = "policy.applied")]
    PolicyApplied(PolicyApplied),
    #[serde(rename = "policy.rejected")]
    PolicyRejected(PolicyRejected),
    #[serde(rename = "usb.unlock")]
    UsbUnlock(UsbUnlock),
    #[serde(rename = "command.result")]
    CommandResult(CommandResult),
    #[serde(rename = "file.exported")]
    FileExported(FileExported),
    #[serde(rename = "file.overflow")]
    FileOverflow(FileOverflow),
    #[serde(rename = "file.enforced")]
    FileEnforced(FileEnforced),
    #[serde(rename = "file.source_read")]
    FileSourceRead(FileSourceRead),
    #[serde(rename = "net.transfer")]
    NetTransfer(NetTransfer),
    #[serde(rename = "net.transfer_tool")]
    NetTransferTool(NetTransferTool),
    #[serde(rename = "net.enforced")]
    NetEnforced(NetEnforced),
    #[serde(rename = "access.login")]
    AccessLogin(AccessLogin),
    #[serde(rename = "access.logout")]
    AccessLogout(AccessLogout),
    #[serde(rename = "access.login_failed")]
    AccessLoginFailed(AccessLoginFailed),
    #[serde(rename = "access.privilege")]
    AccessPrivilege(AccessPrivilege),
    #[serde(rename = "access.badge")]
    AccessBadge(AccessBadge),
    #[serde(rename = "access.door")]
    AccessDoor(AccessDoor),
}

/// Every event kind's wire name (what a rule's `on` may name besides the
/// collector's own findings).
pub const KINDS: &[&str] = &[
    "usb.attached",
    "usb.detached",
    "volume.mounted",
    "volume.unmounted",
    "agent.started",
    "agent.epoch_started",
    "agent.heartbeat",
    "agent.stopping",
    "agent.events_lost",
    "agent.source_error",
    "usb.decision",
    "policy.applied",
    "policy.rejected",
    "usb.unlock",
    "command.result",
    "file.exported",
    "file.overflow",
    "file.enforced",
    "file.source_read",
    "net.transfer",
    "net.transfer_tool",
    "net.enforced",
    "access.login",
    "access.logout",
    "access.login_failed",
    "access.privilege",
    "access.badge",
    "access.door",
];

impl Event {
    /// The wire name of this event's kind, e.g. `usb.attached`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::UsbAttached(_) => "usb.attached",
            Event::UsbDetached(_) => "usb.detached",
            Event::VolumeMounted(_) => "volume.mounted",
            Event::VolumeUnmounted(_) => "volume.unmounted",
            Event::AgentStarted(_) => "agent.started",
            Event::AgentEpochStarted(_) => "agent.epoch_started",
            Event::AgentHeartbeat(_) => "agent.heartbeat",
            Event::AgentStopping(_) => "agent.stopping",
            Event::AgentEventsLost(_) => "agent.events_lost",
            Event::AgentSourceError(_) => "agent.source_error",
            Event::UsbDecision(_) => "usb.decision",
            Event::PolicyApplied(_) => "policy.applied",
            Event::PolicyRejected(_) => "policy.rejected",
            Event::UsbUnlock(_) => "usb.unlock",
            Event::CommandResult(_) => "command.result",
            Event::FileExported(_) => "file.exported",
            Event::FileOverflow(_) => "file.overflow",
            Event::FileEnforced(_) => "file.enforced",
            Event::FileSourceRead(_) => "file.source_read",
            Event::NetTransfer(_) => "net.transfer",
            Event::NetTransferTool(_) => "net.transfer_tool",
            Event::NetEnforced(_) => "net.enforced",
            Event::AccessLogin(_) => "access.login",
            Event::AccessLogout(_) => "access.logout",
            Event::AccessLoginFailed(_) => "access.login_failed",
            Event::AccessPrivilege(_) => "access.privilege",
            Event::AccessBadge(_) => "access.badge",
            Event::AccessDoor(_) => "access.door",
        }
    }
}

/// USB interface descriptor summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbInterface {
    /// Interface number within the active configuration (`bInterfaceNumber`).
    pub number: u8,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
}

/// A block device (disk or partition) that belongs to a USB device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDevice {
    /// Kernel name, e.g. `sda` or `sda1`.
    pub name: String,
    /// `major:minor`.
    pub dev: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// The kernel's `removable` flag for the disk.
    pub removable: bool,
    /// Whether the kernel reports the device read-only (`ro`).
    pub read_only: bool,
    /// Partitions of this disk (empty for partitions themselves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<BlockDevice>,
}

/// Full identity of one USB device, as read from sysfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbDevice {
    /// Kernel device name = bus/port path, e.g. `1-1.2`.
    pub port_path: String,
    pub busnum: u16,
    pub devnum: u16,
    /// Vendor id, 4 lowercase hex digits.
    pub vid: String,
    /// Product id, 4 lowercase hex digits.
    pub pid: String,
    /// `bcdDevice`, 4 hex digits.
    pub bcd_device: String,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    pub device_class: u8,
    pub interfaces: Vec<UsbInterface>,
    /// Negotiated speed in Mbit/s as the kernel reports it (`1.5`, `12`, `480`, `5000`...).
    pub speed: Option<String>,
    /// Whether the kernel currently authorizes the device.
    pub authorized: Option<bool>,
    /// Stable identity hash (SHA-256, hex) over vid, pid, serial, strings and raw descriptors.
    pub hash: String,
    /// Hash of the parent device (hub), if any.
    pub parent_hash: Option<String>,
    /// Block devices of a storage device (may be empty at the moment of attach).
    #[serde(default)]
    pub block_devices: Vec<BlockDevice>,
    /// True when the agent found the device at start rather than by a hot-plug uevent.
    pub present_at_start: bool,
}

impl UsbDevice {
    /// True when any interface is USB mass storage (class 0x08).
    pub fn is_mass_storage(&self) -> bool {
        self.device_class == 0x08 || self.interfaces.iter().any(|i| i.class == 0x08)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbDetached {
    pub port_path: String,
    /// Identity hash if the agent had seen the device attached.
    pub hash: Option<String>,
    pub vid: Option<String>,
    pub pid: Option<String>,
    pub serial: Option<String>,
}

/// A mount of a removable (USB) block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Block device name, e.g. `sda1`.
    pub block_device: String,
    /// `major:minor`.
    pub dev: String,
    pub mount_point: String,
    pub fs_type: String,
    pub read_only: bool,
    pub label: Option<String>,
    pub uuid: Option<String>,
    /// Port path of the USB device the volume lives on.
    pub usb_port_path: Option<String>,
    /// Identity hash of that USB device.
    pub usb_hash: Option<String>,
    pub usb_serial: Option<String>,
}

/// Host inventory, reported once at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStarted {
    pub agent_version: String,
    pub hostname: Option<String>,
    pub os: Option<String>,
    pub os_version: Option<String>,
    pub kernel: Option<String>,
    pub boot_time: Option<Timestamp>,
    /// Version string of the fence policy in force.
    pub policy_version: Option<String>,
}

/// The first record of every epoch (seq 1): which installation wrote it and where the
/// journal stood when it began, so the collector can tell a restart from a re-install
/// or a state restored from an older copy, and expect every record up to `previous`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochStarted {
    /// Random id made when the agent's state directory was first used; a new one means
    /// the agent was re-installed (or its state directory wiped).
    pub installation: String,
    /// The installation id was made at this start.
    pub installation_new: bool,
    /// The last record the agent had journaled before this epoch (from the journal or
    /// from its recorded head, whichever is further), if it had any.
    pub previous: Option<ChainHead>,
}

/// One record of an agent's chain: its key and the SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainHead {
    pub key: EventKey,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub agent_version: String,
    pub uptime_secs: u64,
    pub policy_version: Option<String>,
    /// Events captured but not yet acknowledged by the collector.
    pub backlog: u64,
    /// Events dropped since start (each drop was also reported as `agent.events_lost`).
    pub dropped_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStopping {
    /// Why the agent stops (`signal`, `error: ...`).
    pub reason: String,
}

/// Events that were captured or observed but could not be kept. Never silent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsLost {
    /// Number of events lost. For stage `journal-cap` the report is cumulative for the
    /// epoch: it counts every event the cap removed in this epoch so far, and a later
    /// report supersedes an earlier one (so a report removed by the cap loses nothing).
    pub count: u64,
    /// Where they were lost: `pipeline` (sources could not queue), `journal`
    /// (damaged records found at start), `journal-removed` (whole records found missing
    /// at start with no damaged bytes: deleted), `journal-cap`, `journal-full` (a full
    /// disk kept them out; one report per episode), `journal-write` (other write errors),
    /// `crash` (queued by sources but not journaled when the agent was killed; counted
    /// at the next start from the capture ledger).
    pub stage: String,
    pub reason: String,
    /// First and last lost key, where the lost events had been numbered.
    pub first: Option<EventKey>,
    pub last: Option<EventKey>,
    /// Set when this repeats a report the cap removed before delivery: the key that
    /// report had. A collector that holds that key already counts it once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reissue_of: Option<EventKey>,
}

/// A source failed and is being restarted; its facts for the gap may be missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceError {
    pub source: String,
    pub error: String,
    /// Seconds until the next restart attempt.
    pub restart_in_secs: u64,
}

/// What the USB fence decided for a device, why, and whether enforcing it worked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbDecision {
    pub port_path: String,
    pub vid: String,
    pub pid: String,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    pub hash: String,
    /// `allow`, `read-only`, `block` or `reject`.
    pub target: String,
    /// The rule that decided: a rule id, `implicit default`, `builtin.badusb`,
    /// `builtin.root-hub` or `unlock:<token id>`.
    pub rule_id: String,
    pub reason: String,
    /// What caused the decision: `attach`, `start`, `policy-change`, `time-window`,
    /// `block-device`, `mount`, `unlock`, `unlock-expired`.
    pub trigger: String,
    /// `enforce` or `audit` (decided and reported only).
    pub mode: String,
    /// What was done, in order (`authorized=0`, `remove=1`, `BLKROSET sdb`, ...).
    pub actions: Vec<String>,
    /// True when every action succeeded (always false in audit mode).
    pub enforced: bool,
    /// Why enforcement failed, if it did.
    pub error: Option<String>,
    pub policy_version: String,
    /// Microseconds from the kernel's uevent reaching the agent to the last
    /// enforcement write returning (hot-plug decisions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
}

/// A temporary unlock token was received: accepted (and in force until `not_after`),
/// refused, or expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbUnlock {
    pub token_id: String,
    /// `accepted`, `refused` or `expired`.
    pub status: String,
    pub device_hash: Option<String>,
    pub serial: Option<String>,
    pub mode: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    pub reason: String,
    /// Why it was refused.
    pub refusal: Option<String>,
    /// `command` (from the collector) or `file` (`weilan-agent unlock`).
    pub via: String,
}

/// What became of a command from the collector. Every command gets one: executed,
/// rejected (forged, replayed, expired, for another agent — with the reason) or
/// unsupported by this agent version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    /// The command's sequence number, when it could be read.
    pub seq: Option<u64>,
    /// The action, when it could be read (`block-device`, ...).
    pub action: Option<String>,
    /// `executed`, `rejected` or `unsupported`.
    pub status: String,
    pub detail: String,
}

/// What a content detector found: counts and masked samples, never the content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Classification {
    pub detector: String,
    pub count: usize,
    pub samples: Vec<String>,
}

/// One file written onto an exit point (removable media, network share): one event
/// per file, not per write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileExported {
    pub path: String,
    pub mount_point: String,
    pub fs_type: String,
    /// The mount's source (`/dev/sdb1`, `//server/share`, `host:/export`).
    pub mount_source: String,
    pub usb_serial: Option<String>,
    pub usb_hash: Option<String>,
    pub size: u64,
    pub sha256: Option<String>,
    /// Bytes hashed; less than `size` when the file exceeded the hashing limit.
    pub hashed_bytes: u64,
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub first_write: Timestamp,
    pub last_write: Timestamp,
    /// `fanotify` (writer known), `none` (inotify fallback or rescan: writer unknown).
    pub attribution: String,
    pub classification: Vec<Classification>,
    /// Why classification is partial or absent (`unsupported: pdf`, `truncated`, ...).
    pub classification_note: Option<String>,
    /// `removable`, `network` or `watched`: which kind of exit point this is.
    pub exit: String,
    /// What the policy decided for this file (`audit`, `quarantine`,
    /// `read-only-device`, `deny`) and the rule that decided it.
    pub action: String,
    pub rule_id: String,
    /// Files in sensitive source folders the writer read shortly before (its origin).
    #[serde(default)]
    pub origins: Vec<String>,
    /// Write-and-close rounds folded into this one event: a file rewritten again and
    /// again (each within 2 s of the previous) is reported once when the loop stops,
    /// with its final content and this count. Absent (0) for a file written once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rewrites: u64,
    /// The exit point went away (a stick pulled, a share unmounted) while the file was
    /// still open for writing: described as it was then, through the descriptor kept
    /// from its first write (or, if none, with what is known).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unclosed: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The agent enforced a file rule: a file quarantined, a device switched read-only,
/// or a copy refused while it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEnforced {
    /// `quarantine`, `read-only-device` or `deny`.
    pub action: String,
    pub rule_id: String,
    /// Detectors that made the rule match.
    pub matched: Vec<String>,
    /// The file on the exit point (for `deny`: the destination, when known).
    pub path: Option<String>,
    /// The classified source file (for `deny`).
    pub source_path: Option<String>,
    pub sha256: Option<String>,
    pub mount_point: Option<String>,
    pub usb_hash: Option<String>,
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub user: Option<String>,
    /// `done`, `requested` (handed to the USB fence, which reports `usb.decision`)
    /// or `failed`.
    pub outcome: String,
    pub error: Option<String>,
    /// Where the evidence copy is kept (quarantine), root-only on the agent.
    pub evidence: Option<String>,
    /// Human summary.
    pub detail: String,
}

/// A process read a file in a sensitive source folder (one event per process and
/// file within a few minutes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceRead {
    pub path: String,
    /// The sensitive folder it lies in.
    pub source: String,
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    /// Detectors that classified it (only computed when a `deny` rule needs it).
    pub classification: Vec<Classification>,
}

/// Bytes a process sent to one remote endpoint over a connection this host opened
/// (emitted when a connection to a destination that is not allowlisted crosses the
/// report threshold or a policy rule's threshold, and at its end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetTransfer {
    /// The process holding the socket; absent when the connection opened and closed
    /// between two polls and its process was never seen (see docs/protocol.md).
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    /// The socket owner's uid (from the kernel, also known for unattributed sockets).
    pub uid: Option<u32>,
    pub user: Option<String>,
    /// The process's ancestors, parent first (e.g. `ssh` ← `scp` ← `bash`).
    #[serde(default)]
    pub parents: Vec<ProcessRef>,
    /// `tcp` (UDP sockets carry no byte counters sock_diag can read: not measured,
    /// see docs/protocol.md).
    pub protocol: String,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    /// The allowlist entry (or the allowlisted host name) `remote_addr` matched.
    pub remote_host: Option<String>,
    /// Payload bytes the remote end acknowledged (TCP `bytes_acked` less the SYN;
    /// retransmissions are not counted twice).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    /// `threshold` (crossed the report threshold or a rule's, still open) or `closed`.
    pub phase: String,
    /// The destination matched the policy's allowlist.
    pub allowlisted: bool,
    /// Network namespace inode of the socket (containers and sandboxes have their own).
    #[serde(default)]
    pub netns: Option<u64>,
    /// Files the process had open that lie in a sensitive source or were classified.
    pub sensitive_files: Vec<NetOpenFile>,
    /// `audit`, `kill` or `block-destination`, and the policy rule that chose it.
    pub action: String,
    pub rule_id: String,
}

/// An ancestor of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRef {
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
}

/// A file a sending process had open, flagged because of where it lies or what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetOpenFile {
    pub path: String,
    /// The sensitive folder it lies in, if any.
    pub source: Option<String>,
    /// Detectors that classified it (files up to the classification limits).
    pub classification: Vec<Classification>,
}

/// The agent acted on a transfer (`kill`, `block-destination`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetEnforced {
    pub action: String,
    pub rule_id: String,
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub remote_addr: String,
    pub remote_port: u16,
    /// The action took effect (process gone; nftables element added).
    pub ok: bool,
    /// How it went: `SIGTERM`, `SIGKILL`, `already exited`, or the error.
    pub detail: String,
    /// For `block-destination`: when the kernel drops the block again.
    pub expires: Option<Timestamp>,
}

/// A known transfer tool (scp, rsync, curl -T, nc, rclone, ...) started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetTransferTool {
    pub pid: u32,
    /// The tool's name as recognised (`scp`, `curl`, ...).
    pub tool: String,
    pub exe: Option<String>,
    pub args: Vec<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
}

/// A login session started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogin {
    pub user: String,
    pub uid: Option<u32>,
    /// `console`, `ssh`, `tty` or `other`.
    pub method: String,
    pub tty: Option<String>,
    pub remote_addr: Option<String>,
    pub session_id: Option<String>,
    /// Where it was read: `journal`, `auth-log` or `utmp`.
    pub source: String,
}

/// A login session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogout {
    pub user: String,
    pub method: String,
    pub tty: Option<String>,
    pub session_id: Option<String>,
    pub source: String,
}

/// An authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLoginFailed {
    /// The user name tried (may not exist).
    pub user: String,
    pub method: String,
    pub remote_addr: Option<String>,
    pub reason: Option<String>,
    pub source: String,
}

/// Privileges raised with sudo or su.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPrivilege {
    /// Who asked.
    pub user: String,
    /// Whom they became (`root` mostly).
    pub target_user: String,
    /// `sudo` or `su`.
    pub tool: String,
    pub command: Option<String>,
    pub success: bool,
    pub tty: Option<String>,
    pub source: String,
}

/// A badge was presented at a reader (agent in `door` role, or a door controller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessBadge {
    /// The reader's configured name (e.g. `server-room-east`).
    pub reader: String,
    /// The site the reader guards (`[access] site`), used to correlate with hosts.
    pub site: String,
    /// HMAC-SHA256 of the card number under the site's badge key, hex. The raw number
    /// is never sent.
    pub id_hash: String,
    /// The card number's last four digits.
    pub last4: String,
    /// `hid-reader` (a USB keyboard-style reader on the agent) or `controller`.
    pub source: String,
}

/// A door's contact changed, or it has been open too long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessDoor {
    pub door: String,
    pub site: String,
    /// `opened`, `closed` or `held-open` (still open after the configured time).
    pub state: String,
    /// For `closed` and `held-open`: how long it has been open, in seconds.
    pub held_open_secs: Option<u64>,
    /// `gpio` or `controller`.
    pub source: String,
}

/// The kernel's file-event queue overflowed: some writes were not seen as they
/// happened. The exit points were rescanned for files modified since `since`; each
/// was reported as `file.exported` with `attribution: none` (writer unknown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOverflow {
    pub mount_points: Vec<String>,
    pub since: Timestamp,
    /// Files found by the rescan and reported.
    pub rescanned: u64,
    /// Entries walked (the walk stops at a bound and says so in `complete`).
    pub walked: u64,
    pub complete: bool,
}

/// A new fence policy is in force on this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyApplied {
    pub version: String,
    pub previous: Option<String>,
    /// `file` (the agent's settings) or `collector` (pushed over MQTT).
    pub source: String,
    /// The collector's release number of this policy (absent for a settings file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    /// SHA-256 (hex) of the policy text in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A policy was refused; the previous one stays in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRejected {
    pub version: Option<String>,
    pub source: String,
    /// Every problem, `file:line:column: field: message`.
    pub errors: Vec<String>,
    /// The version that stays in force.
    pub kept: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_lists_exactly_the_kinds_serde_knows() {
        // serde names every variant it knows when it meets an unknown one.
        let err = serde_json::from_str::<Event>(r#"{"kind":"no.such","data":{}}"#)
            .unwrap_err()
            .to_string();
        let listed: std::collections::BTreeSet<&str> = err
            .split('`')
            .skip(3) // "unknown variant `no.such`, expected one of `…`"
            .step_by(2)
            .collect();
        let ours: std::collections::BTreeSet<&str> = KINDS.iter().copied().collect();
        assert_eq!(listed, ours, "{err}");
        assert_eq!(ours.len(), KINDS.len(), "KINDS names a kind twice");
    }

    #[test]
    fn event_id_round_trips_and_allows_colons_only_as_separators() {
        let id: EventId = "ws-01:3:42".parse().unwrap();
        assert_eq!(id.agent_id, "ws-01");
        assert_eq!(id.key, EventKey { epoch: 3, seq: 42 });
        assert_eq!(id.to_string(), "ws-01:3:42");
        assert!("ws 01:3:42".parse::<EventId>().is_err());
        assert!("ws-01:x:42".parse::<EventId>().is_err());
        assert!("42".parse::<EventId>().is_err());
    }

    #[test]
    fn envelope_json_is_tagged_by_kind_and_rejects_unknown_fields() {
        let env = Envelope {
            schema: SCHEMA_VERSION,
            event_id: "a:1:1".parse().unwrap(),
            time: Timestamp::UNIX_EPOCH,
            host_role: "workstation".into(),
            site: None,
            prev_hash: GENESIS_HASH.into(),
            event: Event::AgentStopping(AgentStopping {
                reason: "signal".into(),
            }),
        };
        let json = serde_json::to_string(&env).unwrap();
        assert!(json.contains(r#""kind":"agent.stopping""#), "{json}");
        let back: Envelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back, env);
        let tampered = json.replace(r#""reason":"signal""#, r#""reason":"signal","x":1"#);
        assert!(serde_json::from_str::<Envelope>(&tampered).is_err());
        let unknown_kind = json.replace("agent.stopping", "agent.exploded");
        assert!(serde_json::from_str::<Envelope>(&unknown_kind).is_err());
    }
}
