//! What an alert is made of — levels, the collector's own findings, alerts as stored
//! and logged — in a module that imports nothing else of the crate, so the rules,
//! the store, ingest and the exports can all speak of them without depending on
//! each other.

use serde::{Deserialize, Serialize};

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

/// Something the collector itself found (not an agent event).
#[derive(Debug, Clone)]
pub struct Finding {
    /// One of `crate::rules::findings`.
    pub kind: &'static str,
    pub agent_id: String,
    pub summary: String,
    pub event_ids: Vec<String>,
    pub details: serde_json::Value,
}

/// An alert as stored and as written to the alert log.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Alert {
    pub alert_id: i64,
    /// When it was raised.
    pub time: jiff::Timestamp,
    pub level: Level,
    /// The rule that raised it (see `weilan-collector rules`).
    pub rule_id: String,
    #[serde(default)]
    pub title: String,
    /// Compliance references and labels of the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    pub agent_id: String,
    /// The rule's correlation/suppression key (by default the agent id).
    #[serde(default)]
    pub key: String,
    pub summary: String,
    /// The events that triggered it (the first 100).
    pub event_ids: Vec<String>,
    /// Times the rule fired for this key while the alert was suppressing repeats.
    #[serde(default = "one")]
    pub count: u64,
    #[serde(default = "jiff::Timestamp::now")]
    pub last_seen: jiff::Timestamp,
    /// This line updates an earlier one with the same `alert_id` (count, last seen).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub update: bool,
    pub details: serde_json::Value,
}

fn one() -> u64 {
    1
}
