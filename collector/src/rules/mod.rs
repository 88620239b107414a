//! The rules engine: TOML rule files with CEL conditions, correlation over sliding
//! windows, suppression, and actions (notify sinks, signed commands to agents).
//!
//! Rule sets come from the built-in indicator pack (`builtin/*.toml`, compiled into
//! the binary) and the operator's directory, which is re-read when it changes; a set
//! with any error is refused whole and the previous one stays active. Facts are the
//! newly stored agent events and the collector's own findings (journal gaps, chain
//! breaks, bad signatures, silent agents, invalid policy or rule files), so every
//! alert — whoever detected it — is levelled, suppressed and acted on by a rule.
//! See `docs/rules.md`.

pub mod engine;
pub mod file;
pub mod reads;
pub mod shared;
#[cfg(test)]
mod tests;

pub use engine::{CommandRequest, Engine, Fact, Finding, Outcome, RuleSet};

pub use crate::alert_model::Level;

/// The built-in indicator pack, in load order.
pub const BUILTIN: &[(&str, &str)] = &[
    ("builtin/usb.toml", include_str!("builtin/usb.toml")),
    ("builtin/files.toml", include_str!("builtin/files.toml")),
    ("builtin/network.toml", include_str!("builtin/network.toml")),
    ("builtin/access.toml", include_str!("builtin/access.toml")),
    ("builtin/fleet.toml", include_str!("builtin/fleet.toml")),
];

/// Kinds of the collector's own findings (facts that are not agent events).
pub mod findings {
    pub const CHAIN_BREAK: &str = "collector.chain_break";
    pub const JOURNAL_GAP: &str = "collector.journal_gap";
    pub const JOURNAL_RESET: &str = "collector.journal_reset";
    /// A new epoch names another installation id than the agent's earlier ones.
    pub const AGENT_REINSTALLED: &str = "collector.agent_reinstalled";
    /// A new epoch continues from a record older than ones already stored.
    pub const AGENT_RESTORED: &str = "collector.agent_restored";
    /// One event id arrived twice with different contents.
    pub const KEY_REUSED: &str = "collector.key_reused";
    pub const BAD_SIGNATURE: &str = "collector.bad_signature";
    pub const AGENT_SILENT: &str = "collector.agent_silent";
    pub const POLICY_INVALID: &str = "collector.policy_invalid";
    pub const RULES_INVALID: &str = "collector.rules_invalid";
    pub const ROSTER_INVALID: &str = "collector.roster_invalid";
    pub const RULES_OVERFLOW: &str = "collector.rules_overflow";
    pub const SINK_FAILURES: &str = "collector.sink_failures";
    pub const EXPORT_CAUGHT_UP: &str = "collector.export_caught_up";
    pub const EXPORT_FAILED: &str = "collector.export_failed";
    /// The collector's own MQTT connection has failed for longer than
    /// `BROKER_UNREACHABLE_AFTER`: no agent event is being received.
    pub const BROKER_UNREACHABLE: &str = "collector.broker_unreachable";
    /// A payload signed with a certificate the CA issued but the registry does not
    /// hold (never enrolled, or revoked).
    pub const UNENROLLED_CERTIFICATE: &str = "collector.unenrolled_certificate";
    /// An enrollment was refused (token reused, expired or forged; id taken...).
    pub const ENROLLMENT_REFUSED: &str = "collector.enrollment_refused";
    /// The broker refused or disconnected a client for what it sent (an oversized
    /// packet), or ran out of descriptors.
    pub const BROKER_REFUSED: &str = "collector.broker_refused";
    /// The embedded broker process ended unexpectedly (and was restarted).
    pub const BROKER_RESTARTED: &str = "collector.broker_restarted";
    /// A source had more messages waiting than its share; the excess was refused.
    pub const SOURCE_FLOODING: &str = "collector.source_flooding";
    /// An enrolled certificate ends within 14 days.
    pub const CERTIFICATE_EXPIRING: &str = "collector.certificate_expiring";
    /// A district's batches have waited too long for the province's ack (federation).
    pub const FEDERATION_BACKLOG: &str = "collector.federation_backlog";

    /// Every finding kind (what a rule's `on` may name besides agent events).
    pub const ALL: &[&str] = &[
        CHAIN_BREAK,
        JOURNAL_GAP,
        JOURNAL_RESET,
        AGENT_REINSTALLED,
        AGENT_RESTORED,
        KEY_REUSED,
        BAD_SIGNATURE,
        AGENT_SILENT,
        POLICY_INVALID,
        RULES_INVALID,
        ROSTER_INVALID,
        RULES_OVERFLOW,
        SINK_FAILURES,
        EXPORT_CAUGHT_UP,
        EXPORT_FAILED,
        BROKER_UNREACHABLE,
        UNENROLLED_CERTIFICATE,
        ENROLLMENT_REFUSED,
        BROKER_REFUSED,
        BROKER_RESTARTED,
        SOURCE_FLOODING,
        CERTIFICATE_EXPIRING,
        FEDERATION_BACKLOG,
    ];
}
