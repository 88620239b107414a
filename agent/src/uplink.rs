//! The uplink: delivers the outbox to the collector and applies its acknowledgements.
//!
//! Batches are signed with the agent's certificate key and published with QoS 1 on
//! the agent's `events` topic. An event leaves the outbox only when a *signed ack from
//! the collector* names it; after every (re)connect and after an ack timeout everything
//! unacknowledged is sent again. Acks and commands are verified against the pinned CA
//! and must come from a collector certificate and name this agent.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weilan_config::mqtt::{self, SessionConfig, SessionEvent};
use weilan_config::signing::{Role, Signer, Verifier};
use weilan_config::topics::{self, Channel};
use weilan_config::wire::{self, Ack, AgentState, Batch, Command, Purpose, Status};

use crate::outbox::Outbox;
use crate::stats::AgentStats;

/// Stay well below the broker's and collector's 1 MiB payload limit.
const MAX_BATCH_BYTES: usize = 768 * 1024;
/// Largest payload the agent accepts from the broker (acks and commands are small).
const MAX_INCOMING: usize = 256 * 1024;

pub struct UplinkConfig {
    pub agent_id: String,
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub keep_alive: Duration,
    pub batch_max_events: usize,
    pub batch_linger: Duration,
    pub max_batches_in_flight: usize,
    pub ack_timeout: Duration,
    /// How long to keep delivering after the agent was told to stop.
    pub drain_timeout: Duration,
}

pub struct Uplink {
    pub config: UplinkConfig,
    pub signer: Signer,
    pub verifier: Verifier,
    pub outbox: Arc<Mutex<Outbox>>,
    pub notify: Arc<Notify>,
    pub stats: Arc<AgentStats>,
}

fn status_payload(agent_id: &str, state: AgentState) -> Vec<u8> {
    serde_json::to_vec(&Status {
        agent_id: agent_id.to_string(),
        state,
        agent_version: crate::VERSION.into(),
    })
    .unwrap_or_default()
}

impl Uplink {
    /// Runs until `drain` is cancelled and the outbox is empty (or the drain timeout
    /// passed). `drain` is cancelled after the recorder has stored the last event.
    pub async fn run(self, drain: CancellationToken) {
        let c = &self.config;
        let status_topic = topics::agent_topic(&c.agent_id, Channel::Status);
        let events_topic = topics::agent_topic(&c.agent_id, Channel::Events);
        let session_stop = CancellationToken::new();
        let (client, mut rx, session) = mqtt::spawn(
            SessionConfig {
                client_id: c.agent_id.clone(),
                host: c.host.clone(),
                port: c.port,
                tls: c.tls.clone(),
                keep_alive: c.keep_alive,
                last_will: Some(LastWill::new(
                    status_topic.clone(),
                    status_payload(&c.agent_id, AgentState::Offline),
                    QoS::AtLeastOnce,
                    true,
                )),
                max_packet: wire::DEFAULT_MAX_PAYLOAD,
                request_capacity: 64,
                incoming_capacity: 256,
                subscriptions: vec![
                    topics::agent_topic(&c.agent_id, Channel::Acks),
                    topics::agent_topic(&c.agent_id, Channel::Commands),
                ],
            },
            session_stop.clone(),
        );
        let mut connected = false;
        let mut draining: Option<tokio::time::Instant> = None;
        let mut ack_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(SessionEvent::Connected) => {
                        connected = true;
                        // Whatever was in flight may be lost with the old connection.
                        self.lock().rewind();
                        let _ = client.try_publish(status_topic.clone(), QoS::AtLeastOnce, true,
                            status_payload(&c.agent_id, AgentState::Online));
                    }
                    Some(SessionEvent::Disconnected(_)) => connected = false,
                    Some(SessionEvent::Message { topic, payload }) => self.handle_incoming(&topic, &payload),
                    None => break,
                },
                _ = self.notify.notified() => {
                    if !c.batch_linger.is_zero() {
                        tokio::time::sleep(c.batch_linger).await;
                    }
                }
                _ = ack_check.tick() => {
                    let n = self.lock().expire(c.ack_timeout);
                    if n > 0 {
                        tracing::warn!(batches = n, "no ack from the collector in time; sending again");
                    }
                }
                _ = drain.cancelled(), if draining.is_none() => {
                    draining = Some(tokio::time::Instant::now() + c.drain_timeout);
                }
            }
            if connected {
                self.send_batches(&client, &events_topic);
            }
            if let Some(deadline) = draining {
                let empty = self.lock().is_empty();
                if empty || tokio::time::Instant::now() >= deadline {
                    if !empty {
                        tracing::warn!(backlog = self.lock().len(), "stopping with unacknowledged events (kept only in memory by this version)");
                    }
                    break;
                }
            }
        }
        let _ = client.try_publish(
            status_topic,
            QoS::AtLeastOnce,
            true,
            status_payload(&c.agent_id, AgentState::Offline),
        );
        session_stop.cancel();
        let _ = session.await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send_batches(&self, client: &AsyncClient, topic: &str) {
        let c = &self.config;
        loop {
            let mut outbox = self.lock();
            if outbox.batches_in_flight() >= c.max_batches_in_flight || !outbox.has_unsent() {
                return;
            }
            let mut max = c.batch_max_events;
            let (batch_id, events, body) = loop {
                let Some((batch_id, events)) = outbox.next_batch(max) else {
                    return;
                };
                let n = events.len();
                let batch = Batch {
                    agent_id: c.agent_id.clone(),
                    batch_id,
                    events,
                };
                let body = match serde_json::to_string(&batch) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "batch not serializable; events kept");
                        outbox.ack(batch_id, &[]);
                        return;
                    }
                };
                if body.len() > MAX_BATCH_BYTES && n > 1 {
                    outbox.ack(batch_id, &[]); // back to unsent, try a smaller batch
                    max = n / 2;
                    continue;
                }
                break (batch_id, batch.events, body);
            };
            drop(outbox);
            let signed = self.signer.sign(Purpose::Batch, body);
            let payload = match serde_json::to_vec(&signed) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "signed batch not serializable");
                    self.lock().ack(batch_id, &[]);
                    return;
                }
            };
            if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                tracing::debug!(error = %e, "MQTT request queue full; batch will be sent again");
                self.lock().ack(batch_id, &[]);
                return;
            }
            tracing::debug!(batch_id, events = events.len(), "batch sent");
        }
    }

    fn handle_incoming(&self, topic: &str, payload: &[u8]) {
        let Some((agent, channel)) = topics::parse_agent_topic(topic) else {
            tracing::warn!(%topic, "message on an unexpected topic ignored");
            return;
        };
        if agent != self.config.agent_id {
            tracing::warn!(%topic, "message for another agent ignored");
            return;
        }
        let purpose = match channel {
            Channel::Acks => Purpose::Ack,
            Channel::Commands => Purpose::Command,
            _ => return,
        };
        let verified = wire::decode_signed(payload, MAX_INCOMING)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                self.verifier
                    .verify(&m, purpose, Role::Collector)
                    .map(|_| m.body)
                    .map_err(|e| e.to_string())
            });
        let body = match verified {
            Ok(b) => b,
            Err(reason) => {
                tracing::warn!(%topic, %reason, "refused an unauthenticated message");
                return;
            }
        };
        match channel {
            Channel::Acks => match wire::decode::<Ack>("an ack", body.as_bytes(), MAX_INCOMING) {
                Ok(ack) if ack.agent_id == self.config.agent_id => {
                    for r in &ack.rejected {
                        tracing::error!(key = %r.key, reason = %r.reason, "collector rejected an event (quarantined there)");
                    }
                    let mut outbox = self.lock();
                    let n = outbox.ack(ack.batch_id, &ack.keys);
                    self.stats
                        .backlog
                        .store(outbox.len() as u64, Ordering::Relaxed);
                    drop(outbox);
                    self.stats.acked_batches.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        batch_id = ack.batch_id,
                        events = n,
                        duplicates = ack.duplicates,
                        "batch acknowledged"
                    );
                    self.notify.notify_one();
                }
                Ok(ack) => tracing::warn!(claimed = %ack.agent_id, "ack for another agent refused"),
                Err(e) => tracing::warn!(error = %e, "malformed ack refused"),
            },
            Channel::Commands => {
                match wire::decode::<Command>("a command", body.as_bytes(), MAX_INCOMING) {
                    Ok(cmd) => {
                        tracing::warn!(seq = cmd.seq, action = ?cmd.action, "command received; this agent version executes no commands yet")
                    }
                    Err(e) => tracing::warn!(error = %e, "malformed command refused"),
                }
            }
            _ => {}
        }
    }
}
