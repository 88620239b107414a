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
        .filter_map(|s| unknown_usb_storage(policy, s.envelope).or_else(|| events_lost(s.envelope)))
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
