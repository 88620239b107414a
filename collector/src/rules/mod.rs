//! Rules that turn stored events into alerts. For now one built-in rule; the rules
//! engine (CEL conditions, correlation, the indicator pack) replaces this module.
//!
//! Every alert names the rule that raised it, its level, the events it refers to and
//! a summary a person can act on.

use serde::{Deserialize, Serialize};
use weilan_config::event::{Envelope, Event};
use weilan_config::policy::Policy;

use crate::store::{Alert, Stored};

/// Alert levels: red (act now), yellow (look today), blue (for the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Blue,
    Yellow,
    Red,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Red => "red",
            Level::Yellow => "yellow",
            Level::Blue => "blue",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "red" => Some(Level::Red),
            "yellow" => Some(Level::Yellow),
            "blue" => Some(Level::Blue),
            _ => None,
        }
    }
}

/// Id of the built-in unknown-storage rule.
pub const UNKNOWN_USB_STORAGE: &str = "builtin.usb.unknown-storage";

/// Evaluates the built-in rules on newly stored events.
pub fn evaluate(policy: &Policy, stored: &[Stored<'_>]) -> Vec<Alert> {
    stored
        .iter()
        .filter_map(|s| {
            let e = s.envelope;
            unknown_usb_storage(policy, e)
                .or_else(|| events_lost(e))
                .or_else(|| enforcement_failed(e))
                .or_else(|| policy_rejected(e))
                .or_else(|| command_rejected(e))
        })
        .collect()
}

/// Id of the built-in events-lost rule.
pub const EVENTS_LOST: &str = "builtin.agent.events-lost";

fn events_lost(env: &Envelope) -> Option<Alert> {
    let Event::AgentEventsLost(l) = &env.event else {
        return None;
    };
    let range = match (l.first, l.last) {
        (Some(f), Some(t)) => format!(" ({f} to {t})"),
        _ => String::new(),
    };
    Some(Alert {
        alert_id: 0,
        time: jiff::Timestamp::now(),
        level: Level::Yellow,
        rule_id: EVENTS_LOST.into(),
        agent_id: env.event_id.agent_id.clone(),
        summary: format!(
            "Agent {} lost {} events{range} at stage {}: {}",
            env.event_id.agent_id, l.count, l.stage, l.reason
        ),
        event_ids: vec![env.event_id.to_string()],
        details: serde_json::json!({"count": l.count, "stage": l.stage, "first": l.first, "last": l.last}),
    })
}

fn unknown_usb_storage(policy: &Policy, env: &Envelope) -> Option<Alert> {
    let Event::UsbAttached(d) = &env.event else {
        return None;
    };
    if !d.is_mass_storage() || policy.known_device(d).is_some() {
        return None;
    }
    let name = [d.manufacturer.as_deref(), d.product.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    Some(Alert {
        alert_id: 0,
        time: jiff::Timestamp::now(),
        level: Level::Red,
        rule_id: UNKNOWN_USB_STORAGE.into(),
        agent_id: env.event_id.agent_id.clone(),
        summary: format!(
            "Unknown USB storage {}:{} serial {} ({}) on {} at port {}",
            d.vid,
            d.pid,
            d.serial.as_deref().unwrap_or("(none)"),
            if name.is_empty() { "no name" } else { &name },
            env.event_id.agent_id,
            d.port_path,
        ),
        event_ids: vec![env.event_id.to_string()],
        details: serde_json::json!({
            "vid": d.vid, "pid": d.pid, "serial": d.serial, "hash": d.hash,
            "manufacturer": d.manufacturer, "product": d.product,
            "port_path": d.port_path, "present_at_start": d.present_at_start,
            "policy_version": policy.version,
        }),
    })
}

/// Id of the built-in enforcement-failed rule.
pub const ENFORCEMENT_FAILED: &str = "builtin.usb.enforcement-failed";
/// Id of the built-in policy-rejected rule.
pub const POLICY_REJECTED: &str = "builtin.policy.rejected";

fn enforcement_failed(env: &Envelope) -> Option<Alert> {
    let Event::UsbDecision(d) = &env.event else {
        return None;
    };
    let error = d.error.as_ref()?;
    Some(Alert {
        alert_id: 0,
        time: jiff::Timestamp::now(),
        level: Level::Red,
        rule_id: ENFORCEMENT_FAILED.into(),
        agent_id: env.event_id.agent_id.clone(),
        summary: format!(
            "Could not enforce `{}` (rule {}) on USB {}:{} serial {} at {} on {}: {error}",
            d.target,
            d.rule_id,
            d.vid,
            d.pid,
            d.serial.as_deref().unwrap_or("(none)"),
            d.port_path,
            env.event_id.agent_id
        ),
        event_ids: vec![env.event_id.to_string()],
        details: serde_json::json!({"target": d.target, "rule_id": d.rule_id, "error": error, "actions": d.actions, "hash": d.hash}),
    })
}

fn policy_rejected(env: &Envelope) -> Option<Alert> {
    let Event::PolicyRejected(p) = &env.event else {
        return None;
    };
    Some(Alert {
        alert_id: 0,
        time: jiff::Timestamp::now(),
        level: Level::Yellow,
        rule_id: POLICY_REJECTED.into(),
        agent_id: env.event_id.agent_id.clone(),
        summary: format!(
            "Agent {} refused policy {} from {} ({} problems); it keeps enforcing {}",
            env.event_id.agent_id,
            p.version.as_deref().unwrap_or("(unnamed)"),
            p.source,
            p.errors.len(),
            p.kept
        ),
        event_ids: vec![env.event_id.to_string()],
        details: serde_json::json!({"errors": p.errors, "kept": p.kept}),
    })
}

/// Id of the built-in command-rejected rule.
pub const COMMAND_REJECTED: &str = "builtin.command.rejected";

fn command_rejected(env: &Envelope) -> Option<Alert> {
    let Event::CommandResult(r) = &env.event else {
        return None;
    };
    if r.status != "rejected" {
        return None;
    }
    Some(Alert {
        alert_id: 0,
        time: jiff::Timestamp::now(),
        level: Level::Yellow,
        rule_id: COMMAND_REJECTED.into(),
        agent_id: env.event_id.agent_id.clone(),
        summary: format!(
            "Agent {} refused a command ({}, seq {}): {} — forged, replayed or stale commands may mean someone is probing",
            env.event_id.agent_id,
            r.action.as_deref().unwrap_or("unreadable"),
            r.seq.map_or("?".to_string(), |s| s.to_string()),
            r.detail
        ),
        event_ids: vec![env.event_id.to_string()],
        details: serde_json::json!({"seq": r.seq, "action": r.action, "detail": r.detail}),
    })
}
