//! MQTT payloads: signed batches of events, acknowledgements, commands, status.
//!
//! Every payload that carries authority (events, acks, commands) is a
//! [`SignedMessage`]: the JSON body as a string, the signer's certificate and an
//! ECDSA P-256 signature over a purpose label plus the body. The receiver checks the
//! certificate against the Weilan CA and the signature before it parses the body, so a
//! broker without topic ACLs cannot make one agent speak for another (see
//! [`crate::signing`]).
//!
//! Decoding is strict and bounded: [`decode`] refuses payloads above a size limit and
//! bodies with unknown fields, and every refusal is a [`DecodeError`] with a reason.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{Envelope, Event, EventKey};

/// Default upper bound for one MQTT payload (1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// What a signature is for; part of the signed bytes so a signature made for one
/// purpose can never be replayed as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    Batch,
    Ack,
    Command,
    Policy,
    Unlock,
    /// A compliance export's manifest (detached signature).
    Export,
    /// A door controller's [`DoorMessage`].
    #[serde(rename = "door-event")]
    DoorEvent,
    /// The collector's [`Presence`] (retained, and its last will).
    Presence,
    /// A journal bundle's manifest (`crate::bundle`), signed by the agent.
    Bundle,
}

impl Purpose {
    pub fn label(self) -> &'static str {
        match self {
            Purpose::Batch => "weilan/v1/batch",
            Purpose::Ack => "weilan/v1/ack",
            Purpose::Command => "weilan/v1/command",
            Purpose::Policy => "weilan/v1/policy",
            Purpose::Unlock => "weilan/v1/unlock",
            Purpose::Export => "weilan/v1/export",
            Purpose::DoorEvent => "weilan/v1/door-event",
            Purpose::Presence => "weilan/v1/presence",
            Purpose::Bundle => "weilan/v1/bundle",
        }
    }
}

/// Signature algorithm identifier written into every signed message.
pub const SIG_ALG: &str = "ecdsa-p256-sha256";

/// A body signed by an agent or the collector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedMessage {
    /// Envelope format version (1).
    pub v: u32,
    pub purpose: Purpose,
    /// Always [`SIG_ALG`].
    pub alg: String,
    /// Signer's X.509 certificate, DER, base64.
    pub cert: String,
    /// The signed JSON body, verbatim.
    pub body: String,
    /// Signature over `purpose.label() || 0x00 || body`, ASN.1 DER, base64.
    pub sig: String,
}

/// A batch of events from one agent (purpose `batch`).
///
/// `events` are the agent journal's record bytes, verbatim: the collector hashes
/// exactly those bytes to verify each record's `prev_hash` chain, so no JSON
/// canonicalisation is involved. A batch is a contiguous run `first..=last` of one
/// epoch; the ack names the same range.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch<'a> {
    pub agent_id: String,
    /// Agent-chosen id echoed in the [`Ack`].
    pub batch_id: u64,
    pub first: EventKey,
    pub last: EventKey,
    #[serde(borrow)]
    pub events: Vec<&'a RawValue>,
    /// The newest record the agent's journal held when it sent this batch: the
    /// collector judges a hole only once the agent has caught up (its report of the
    /// loss may come after a long backlog). Absent from agents before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<EventKey>,
}

/// Why the collector refused one event of an otherwise valid batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRejection {
    /// Index of the event in the batch.
    pub index: usize,
    pub key: Option<EventKey>,
    pub reason: String,
}

/// The collector's acknowledgement that a batch is durably committed (purpose `ack`).
/// Sent only after the database transaction committed: every event of `first..=last`
/// is stored (newly or before) or quarantined as invalid, so the agent may forget them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub agent_id: String,
    pub batch_id: u64,
    pub first: EventKey,
    pub last: EventKey,
    /// Events stored for the first time.
    pub stored: u32,
    /// Events already stored (re-sends).
    pub duplicates: u32,
    /// Events refused (and quarantined on the collector).
    pub rejected: Vec<EventRejection>,
}

/// A collector → agent command (purpose `command`). Executed by later capabilities;
/// the contract is fixed here so both sides agree on replay protection from day one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// The only agent that may execute it.
    pub agent_id: String,
    /// Strictly increasing per agent; the agent refuses any seq it has already seen.
    pub seq: u64,
    pub issued_at: jiff::Timestamp,
    pub expires_at: jiff::Timestamp,
    /// The rule or operator that caused it.
    pub reason: String,
    pub action: CommandAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CommandAction {
    BlockDevice {
        device_hash: String,
    },
    SetDeviceReadOnly {
        device_hash: String,
    },
    QuarantineFile {
        path: String,
        sha256: String,
    },
    KillProcess {
        pid: u32,
        exe: String,
    },
    RequestInventory,
    UpdatePolicy {
        version: String,
        policy_toml: String,
    },
    /// Deliver a temporary unlock token (itself signed, see [`UnlockToken`]).
    Unlock {
        token: SignedMessage,
    },
}

/// A temporary exception to the USB policy for one device on one agent (purpose
/// `unlock`, signed by the collector). The agent verifies it offline with the CA,
/// applies it between `not_before` and `not_after`, and never accepts the same
/// `token_id` twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlockToken {
    /// Random, unique: used tokens are remembered by id.
    pub token_id: String,
    /// The only agent that accepts it.
    pub agent_id: String,
    /// The device: its identity hash, or its serial with its `vid:pid` (all given must
    /// match). A serial alone is no identity — any stick can be programmed with it —
    /// so agents refuse a token that names nothing else.
    pub device_hash: Option<String>,
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vid_pid: Option<String>,
    /// `allow` or `read-only`.
    pub mode: String,
    pub not_before: jiff::Timestamp,
    pub not_after: jiff::Timestamp,
    /// Who asked and why (audited with every decision it makes).
    pub reason: String,
}

/// A fence policy pushed by the collector (purpose `policy`), retained on
/// [`crate::topics::POLICY`]. Agents validate it and keep their last good one if not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyPush {
    /// The label the policy file gives itself (`version = ...`), for people.
    pub version: String,
    /// The policy file, verbatim.
    pub policy_toml: String,
    /// The release number the collector gave this content: above every earlier one
    /// (at least the issue time in Unix seconds, so it keeps rising across a collector
    /// reinstall). An agent refuses a push whose serial is not above the one in force
    /// — a replayed or rolled-back policy — unless it is that very release again.
    #[serde(default)]
    pub serial: u64,
    /// When the collector released it (RFC 3339).
    #[serde(default)]
    pub issued_at: String,
    /// SHA-256 (hex) of `policy_toml`.
    #[serde(default)]
    pub sha256: String,
}

impl PolicyPush {
    /// SHA-256 (hex) of a policy text, as `sha256` carries it.
    pub fn digest(policy_toml: &str) -> String {
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            policy_toml.as_bytes(),
        ))
    }
}

/// Agent liveness as published on the status topic (retained). The offline form is the
/// MQTT last will, published by the broker, so it is unsigned and only a hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub agent_id: String,
    pub state: AgentState,
    pub agent_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Online,
    Offline,
}

/// Whether the collector is subscribed to the agents' events, published by the collector
/// (signed, retained) on its [`crate::topics::collector_presence`] topic once its subscriptions are in place,
/// and as its last will when it goes away. Batches published while no collector is
/// subscribed are dropped by the broker without a word, so an agent holds its batches
/// while the collector is offline and sends everything unacknowledged again as soon as
/// a new collector connection announces itself — rather than waiting for an ack timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Presence {
    pub state: AgentState,
    /// New for every connection of the collector to the broker (random).
    pub connection: u64,
    pub time: jiff::Timestamp,
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("payload is not valid JSON for {what}: {detail} (line {line}, column {column})")]
    Json {
        what: &'static str,
        detail: String,
        line: usize,
        column: usize,
    },
    #[error("unsupported {what} version {found}")]
    Version { what: &'static str, found: u32 },
    #[error("{0}")]
    Invalid(String),
}

/// Strictly decodes a size-bounded JSON payload into `T`.
pub fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| DecodeError::Json {
        what,
        detail: e.to_string(),
        line: e.line(),
        column: e.column(),
    })
}

/// Decodes a signed message envelope (the signature itself is checked by
/// [`crate::signing::Verifier`]).
pub fn decode_signed(bytes: &[u8], max: usize) -> Result<SignedMessage, DecodeError> {
    let msg: SignedMessage = decode("a signed message", bytes, max)?;
    if msg.v != 1 {
        return Err(DecodeError::Version {
            what: "signed message",
            found: msg.v,
        });
    }
    if msg.alg != SIG_ALG {
        return Err(DecodeError::Invalid(format!(
            "unsupported signature algorithm `{}`",
            msg.alg
        )));
    }
    Ok(msg)
}

/// Decodes a batch body (borrowing the raw event bytes from `body`).
pub fn decode_batch(body: &str, max: usize) -> Result<Batch<'_>, DecodeError> {
    if body.len() > max {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            max,
        });
    }
    serde_json::from_str(body).map_err(|e| DecodeError::Json {
        what: "an event batch",
        detail: e.to_string(),
        line: e.line(),
        column: e.column(),
    })
}

/// The most bytes of records an agent puts in one batch: well below the broker's and
/// collector's 1 MiB payload limit, with room for the signature and its certificate.
pub const MAX_BATCH_BYTES: usize = 768 * 1024;

/// The most events one batch may carry (the agent's `batch_max_events` cannot be
/// set higher). A batch over it is refused whole, before any event is looked at, so
/// one agent's oversized batch costs the collector one quarantine row, not a
/// stall of everyone's ingest.
pub const MAX_BATCH_EVENTS: usize = 4096;

/// Checks a decoded batch for internal consistency against the authenticated agent id.
pub fn check_batch(batch: &Batch<'_>, authenticated_agent: &str) -> Result<(), DecodeError> {
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(DecodeError::Invalid(format!(
            "batch of {} events; at most {MAX_BATCH_EVENTS}",
            batch.events.len()
        )));
    }
    if batch.agent_id != authenticated_agent {
        return Err(DecodeError::Invalid(format!(
            "batch claims agent `{}` but is signed by `{authenticated_agent}`",
            batch.agent_id
        )));
    }
    let span = batch.last.seq.checked_sub(batch.first.seq).map(|d| d + 1);
    if batch.first.epoch != batch.last.epoch || span != Some(batch.events.len() as u64) {
        return Err(DecodeError::Invalid(format!(
            "batch range {}..={} does not match its {} events",
            batch.first,
            batch.last,
            batch.events.len()
        )));
    }
    Ok(())
}

/// Checks one envelope of an authenticated batch; the error is the rejection reason.
pub fn check_envelope(env: &Envelope, authenticated_agent: &str) -> Result<(), String> {
    if env.schema != crate::event::SCHEMA_VERSION {
        return Err(format!("unsupported event schema {}", env.schema));
    }
    if env.event_id.agent_id != authenticated_agent {
        return Err(format!(
            "event id {} names another agent than the signer `{authenticated_agent}`",
            env.event_id
        ));
    }
    if env.event_id.key.seq == 0 {
        return Err("sequence numbers start at 1".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_and_malformed_payloads_are_refused_with_a_reason() {
        let err = decode::<Status>("status", &[b' '; 10], 5).unwrap_err();
        assert_eq!(err, DecodeError::TooLarge { size: 10, max: 5 });
        let err = decode::<Status>("status", b"{\"agent_id\":1}", 100).unwrap_err();
        assert!(matches!(err, DecodeError::Json { .. }), "{err}");
        let err = decode::<Status>(
            "status",
            br#"{"agent_id":"a","state":"online","agent_version":"1","extra":true}"#,
            1000,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    /// The measured stall: one 400 kB batch of 200 000 bogus events held everyone's
    /// ingest for 27 s. It is refused whole before any event is looked at.
    #[test]
    fn a_batch_of_too_many_events_is_refused_whole() {
        let events = vec!["{}"; 200_000].join(",");
        let body = format!(
            r#"{{"agent_id":"ws-1","batch_id":1,"first":{{"epoch":1,"seq":1}},"last":{{"epoch":1,"seq":200000}},"events":[{events}]}}"#
        );
        let batch = decode_batch(&body, 1 << 20).unwrap();
        let err = check_batch(&batch, "ws-1").unwrap_err();
        assert_eq!(
            err.to_string(),
            DecodeError::Invalid("batch of 200000 events; at most 4096".into()).to_string()
        );
    }

    #[test]
    fn commands_are_tagged_by_action() {
        let c = Command {
            agent_id: "a".into(),
            seq: 7,
            issued_at: jiff::Timestamp::UNIX_EPOCH,
            expires_at: jiff::Timestamp::UNIX_EPOCH,
            reason: "rule usb-unknown".into(),
            action: CommandAction::BlockDevice {
                device_hash: "ab".into(),
            },
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""action":"block-device""#), "{json}");
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), c);
    }
}

/// One event from a door controller (purpose `door-event`), published on
/// `weilan/v1/doors/{controller}/events`. Schema and signing recipe for third-party
/// controllers: `docs/protocol.md`, "Door controllers".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoorMessage {
    /// The controller's id: its certificate's common name.
    pub controller: String,
    /// Increases with every message the controller sends (never reused, also across
    /// restarts: a Unix-time-in-milliseconds counter will do). The collector refuses
    /// a sequence number not above the last one it stored: a replay.
    pub seq: u64,
    /// When the controller saw it.
    pub time: jiff::Timestamp,
    /// `access.badge` or `access.door`, with `source: "controller"`.
    pub event: Event,
}

impl DoorMessage {
    /// The event as the collector stores it: an event of the controller (epoch 0,
    /// `seq` as the sequence number, host role `door-controller`, the site of its
    /// badge or door). Call after [`check_door_message`].
    pub fn into_envelope(self) -> Envelope {
        let site = match &self.event {
            Event::AccessBadge(b) => Some(b.site.clone()),
            Event::AccessDoor(d) => Some(d.site.clone()),
            _ => None,
        };
        Envelope {
            schema: crate::event::SCHEMA_VERSION,
            event_id: crate::event::EventId {
                agent_id: self.controller,
                key: EventKey {
                    epoch: 0,
                    seq: self.seq,
                },
            },
            time: self.time,
            host_role: "door-controller".into(),
            site,
            prev_hash: crate::event::GENESIS_HASH.into(),
            event: self.event,
        }
    }
}

/// Checks a door message against the controller that signed it.
pub fn check_door_message(m: &DoorMessage, authenticated: &str) -> Result<(), String> {
    if m.controller != authenticated {
        return Err(format!(
            "message names controller `{}` but was signed by `{authenticated}`",
            m.controller
        ));
    }
    if m.seq == 0 {
        return Err("seq starts at 1".into());
    }
    let ok_name = |what: &str, v: &str| {
        if crate::topics::valid_agent_id(v) {
            Ok(())
        } else {
            Err(format!("{what} `{v}`: 1-64 letters, digits, `.`, `_`, `-`"))
        }
    };
    match &m.event {
        Event::AccessBadge(b) => {
            ok_name("event.data.site", &b.site)?;
            ok_name("event.data.reader", &b.reader)?;
            if b.id_hash.len() != 64
                || !b
                    .id_hash
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            {
                return Err("event.data.id_hash: 64 lower-case hex digits (HMAC-SHA256)".into());
            }
            if b.last4.is_empty()
                || b.last4.len() > 4
                || !b.last4.bytes().all(|c| c.is_ascii_digit())
            {
                return Err("event.data.last4: one to four digits".into());
            }
            if b.source != "controller" {
                return Err("event.data.source: must be `controller`".into());
            }
        }
        Event::AccessDoor(d) => {
            ok_name("event.data.site", &d.site)?;
            ok_name("event.data.door", &d.door)?;
            if !["opened", "closed", "held-open"].contains(&d.state.as_str()) {
                return Err(format!(
                    "event.data.state `{}`: opened, closed or held-open",
                    d.state
                ));
            }
            if d.source != "controller" {
                return Err("event.data.source: must be `controller`".into());
            }
        }
        other => {
            return Err(format!(
                "event.kind `{}`: a door controller sends access.badge or access.door",
                other.kind()
            ))
        }
    }
    Ok(())
}
