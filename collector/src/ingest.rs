//! Ingest: authenticate, decode, validate, store, alert, acknowledge.
//!
//! For an events message the order is fixed: size bound → signed-message decode →
//! certificate and signature check (the signer's certificate CN must be the agent id
//! in the topic) → batch decode → per-event checks → one durable transaction with
//! the alerts the new events raise → alert log → signed ack. Anything refused is
//! counted, logged with its reason and kept in the quarantine table; the collector
//! never stops for bad input.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use weilan_config::event::{Event, EventKey};
use weilan_config::policy::Policy;
use weilan_config::signing::{Role, Signer, Verifier};
use weilan_config::topics::{self, Channel};
use weilan_config::wire::{self, Ack, Batch, EventRejection, Purpose, SignedMessage, Status};

use crate::alerts::AlertLog;
use crate::rules;
use crate::store::Store;

/// Counters, logged periodically and used by tests and benchmarks.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub messages: AtomicU64,
    pub events_stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub alerts: AtomicU64,
}

/// What to send back after a message.
pub struct Reply {
    pub topic: String,
    pub payload: Vec<u8>,
}

pub struct Ingest {
    pub store: Arc<Mutex<Store>>,
    pub alerts: Mutex<AlertLog>,
    pub policy: Policy,
    pub verifier: Verifier,
    pub signer: Signer,
    pub max_payload: usize,
    pub stats: IngestStats,
}

impl Ingest {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses a payload: counted, logged, quarantined.
    fn refuse(&self, topic: &str, reason: &str, payload: &[u8]) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%topic, %reason, size = payload.len(), "payload refused and quarantined");
        if let Err(e) = self.store().quarantine(topic, reason, payload) {
            tracing::error!(error = %e, "could not quarantine a refused payload");
        }
    }

    /// Handles one MQTT message; returns the ack to publish, if any.
    pub fn process(&self, topic: &str, payload: &[u8]) -> Option<Reply> {
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        match topics::parse_agent_topic(topic) {
            Some((agent, Channel::Events)) => self.process_batch(agent, topic, payload),
            Some((agent, Channel::Status)) => {
                self.process_status(agent, topic, payload);
                None
            }
            Some(_) => None,
            None => {
                self.refuse(topic, "not a Weilan agent topic", payload);
                None
            }
        }
    }

    fn process_status(&self, agent: &str, topic: &str, payload: &[u8]) {
        match wire::decode::<Status>("a status", payload, 4096) {
            Ok(s) if s.agent_id == agent => {
                let state = match s.state {
                    wire::AgentState::Online => "online",
                    wire::AgentState::Offline => "offline",
                };
                tracing::info!(agent_id = agent, state, "agent status");
                if let Err(e) =
                    self.store()
                        .touch_agent(agent, Some(state), Some(&s.agent_version), None, None)
                {
                    tracing::error!(error = %e, "could not record agent status");
                }
            }
            Ok(s) => self.refuse(
                topic,
                &format!("status names agent `{}`", s.agent_id),
                payload,
            ),
            Err(e) => self.refuse(topic, &e.to_string(), payload),
        }
    }

    fn process_batch(&self, agent: &str, topic: &str, payload: &[u8]) -> Option<Reply> {
        let signed: SignedMessage = match wire::decode_signed(payload, self.max_payload) {
            Ok(m) => m,
            Err(e) => {
                self.refuse(topic, &e.to_string(), payload);
                return None;
            }
        };
        let identity = match self.verifier.verify(&signed, Purpose::Batch, Role::Agent) {
            Ok(id) => id,
            Err(e) => {
                self.refuse(topic, &format!("signature: {e}"), payload);
                return None;
            }
        };
        if identity.common_name != agent {
            self.refuse(
                topic,
                &format!(
                    "signed by agent `{}` but published on the topic of `{agent}`",
                    identity.common_name
                ),
                payload,
            );
            return None;
        }
        let batch: Batch =
            match wire::decode("an event batch", signed.body.as_bytes(), self.max_payload) {
                Ok(b) => b,
                Err(e) => {
                    self.refuse(topic, &e.to_string(), payload);
                    return None;
                }
            };
        if let Err(e) = wire::check_batch(&batch, agent) {
            self.refuse(topic, &e.to_string(), payload);
            return None;
        }
        let mut valid = Vec::with_capacity(batch.events.len());
        let mut rejected = Vec::new();
        for env in batch.events {
            match wire::check_envelope(&env, agent) {
                Ok(()) => valid.push(env),
                Err(reason) => {
                    let one = serde_json::to_vec(&env).unwrap_or_default();
                    self.refuse(topic, &format!("event {}: {reason}", env.event_id), &one);
                    rejected.push(EventRejection {
                        key: env.event_id.key,
                        reason,
                    });
                }
            }
        }
        let result = self
            .store()
            .store_batch(&valid, jiff::Timestamp::now(), |stored| {
                rules::evaluate(&self.policy, stored)
            });
        let (outcome, alerts) = match result {
            Ok(r) => r,
            Err(e) => {
                // Not acknowledged: the agent keeps the events and sends them again.
                tracing::error!(agent_id = agent, error = %e, "batch not stored; no ack");
                return None;
            }
        };
        self.stats
            .events_stored
            .fetch_add(outcome.new.len() as u64, Ordering::Relaxed);
        self.stats
            .duplicates
            .fetch_add(outcome.duplicates as u64, Ordering::Relaxed);
        self.note_agent(agent, &valid, &outcome.new);
        if !alerts.is_empty() {
            self.stats
                .alerts
                .fetch_add(alerts.len() as u64, Ordering::Relaxed);
            for a in &alerts {
                tracing::warn!(level = a.level.as_str(), rule = %a.rule_id, agent_id = %a.agent_id, summary = %a.summary, "alert");
            }
            let mut log = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = log.write(&alerts) {
                tracing::error!(path = %log.path().display(), error = %e, "alert log write failed (alerts are in the database)");
            }
        }
        let mut keys: Vec<EventKey> = outcome.held;
        keys.extend(rejected.iter().map(|r| r.key));
        let ack = Ack {
            agent_id: agent.to_string(),
            batch_id: batch.batch_id,
            keys,
            duplicates: outcome.duplicates,
            rejected,
        };
        let body = serde_json::to_string(&ack).ok()?;
        let payload = serde_json::to_vec(&self.signer.sign(Purpose::Ack, body)).ok()?;
        Some(Reply {
            topic: topics::agent_topic(agent, Channel::Acks),
            payload,
        })
    }

    fn note_agent(&self, agent: &str, events: &[weilan_config::event::Envelope], new: &[usize]) {
        let mut version = None;
        let mut policy = None;
        let mut host = None;
        for &i in new {
            match &events[i].event {
                Event::AgentStarted(s) => {
                    version = Some(s.agent_version.clone());
                    policy = s.policy_version.clone();
                    host = s.hostname.clone();
                }
                Event::AgentHeartbeat(h) => {
                    version = Some(h.agent_version.clone());
                    policy = h.policy_version.clone();
                }
                _ => {}
            }
        }
        if let Err(e) = self.store().touch_agent(
            agent,
            None,
            version.as_deref(),
            policy.as_deref(),
            host.as_deref(),
        ) {
            tracing::error!(error = %e, "could not record agent");
        }
    }
}

/// Shared handle used by the serve loop.
pub type SharedIngest = Arc<Ingest>;
