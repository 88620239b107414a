//! Fleet health: which agents report, and which went silent.
//!
//! Every stored event refreshes its agent's `last_event`; heartbeats (default every
//! 30 s) carry version, policy and backlog. An agent that stopped in order
//! (`agent.stopping`) is `stopped`; one whose broker connection died is `offline`
//! (MQTT last will). Either way, no event for `silent_after` raises one
//! "agent silent" alert until it is heard again — unless it stopped in order.

use std::time::Duration;

use crate::db::{params, Sql};
use weilan_config::event::{Envelope, Event};

use crate::rules::{findings, Finding};
use crate::store::{Store, StoreError};

/// Updates the agents table from newly stored events of one agent.
pub fn note_events(conn: &impl Sql, agent: &str, events: &[&Envelope]) -> Result<(), StoreError> {
    let now = jiff::Timestamp::now().to_string();
    let (mut version, mut policy, mut host, mut backlog, mut state) =
        (None, None, None, None, Some("online"));
    for env in events {
        match &env.event {
            Event::AgentStarted(s) => {
                version = Some(s.agent_version.clone());
                policy = s.policy_version.clone();
                host = s.hostname.clone();
                state = Some("online");
            }
            Event::AgentHeartbeat(h) => {
                version = Some(h.agent_version.clone());
                policy = h.policy_version.clone();
                backlog = Some(h.backlog as i64);
                state = Some("online");
            }
            Event::AgentStopping(_) => state = Some("stopped"),
            _ => {}
        }
    }
    conn.execute(
        "INSERT INTO agents (agent_id, first_seen, last_seen, last_event, state, agent_version, policy_version, hostname, backlog, silent_alerted)
         VALUES (?1, ?2, ?2, ?2, ?3, ?4, ?5, ?6, ?7, 0)
         ON CONFLICT(agent_id) DO UPDATE SET
           last_seen = excluded.last_seen,
           last_event = excluded.last_event,
           state = excluded.state,
           agent_version = COALESCE(?4, agents.agent_version),
           policy_version = COALESCE(?5, agents.policy_version),
           hostname = COALESCE(?6, agents.hostname),
           backlog = COALESCE(?7, agents.backlog),
           silent_alerted = 0",
        params![agent, now, state, version, policy, host, backlog],
    )?;
    Ok(())
}

/// Agents not heard from for `silent_after`: one alert each.
pub fn silent_agents(
    store: &mut Store,
    silent_after: Duration,
) -> Result<Vec<Finding>, StoreError> {
    let cutoff = (jiff::Timestamp::now()
        - jiff::SignedDuration::try_from(silent_after).unwrap_or_default())
    .to_string();
    let conn = store.conn();
    let tx = conn.transaction()?;
    let silent: Vec<(String, String, String)> = tx.query_map(
        "SELECT agent_id, COALESCE(last_event, last_seen), state FROM agents
         WHERE state != 'stopped' AND silent_alerted = 0 AND COALESCE(last_event, last_seen) <= ?1",
        params![cutoff],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let mut alerts = Vec::new();
    for (agent, last, state) in silent {
        alerts.push(Finding {
            kind: findings::AGENT_SILENT,
            agent_id: agent.clone(),
            summary: format!(
                "Agent {agent} has been silent since {last} (more than {} s; broker state: {state}); it may be stopped, frozen or cut off",
                silent_after.as_secs()
            ),
            event_ids: vec![],
            details: serde_json::json!({"last_event": last, "state": state, "silent_after_secs": silent_after.as_secs()}),
        });
        tx.execute(
            "UPDATE agents SET silent_alerted = 1 WHERE agent_id = ?1",
            params![&agent],
        )?;
    }
    tx.commit()?;
    Ok(alerts)
}

/// One row of `weilan-collector agents`.
#[derive(Debug, serde::Serialize)]
pub struct AgentRow {
    pub agent_id: String,
    pub state: String,
    pub last_event: Option<String>,
    pub agent_version: Option<String>,
    pub policy_version: Option<String>,
    pub hostname: Option<String>,
    pub backlog: Option<i64>,
    pub events: i64,
    /// When the agent's certificate (the latest valid one in the registry) ends.
    pub cert_expires: Option<String>,
}

pub fn list(store: &mut Store) -> Result<Vec<AgentRow>, StoreError> {
    let conn = store.conn();
    Ok(conn.query_map(&format!(
        "SELECT a.agent_id, a.state, a.last_event, a.agent_version, a.policy_version, a.hostname, a.backlog,
                (SELECT COUNT(*) FROM events e WHERE e.agent_id = a.agent_id) + {}
         FROM agents a ORDER BY a.agent_id",
        crate::heartbeats::COUNT_PER_AGENT_SQL
    ), params![], |r| {
        Ok(AgentRow {
            agent_id: r.get(0)?,
            state: r.get(1)?,
            last_event: r.get(2)?,
            agent_version: r.get(3)?,
            policy_version: r.get(4)?,
            hostname: r.get(5)?,
            backlog: r.get(6)?,
            events: r.get(7)?,
            cert_expires: None,
        })
    })?)
}
