//! The uplink: delivers the journal to the collector and applies its acknowledgements.
//!
//! Batches are contiguous runs of journal records, sent verbatim (the collector hashes
//! the same bytes to check the chain), signed with the agent's certificate key and
//! published with QoS 1 on the agent's `events` topic. A record is released only when a
//! *signed ack from the collector* names its range; after every (re)connect and after an
//! ack timeout, sending resumes at the oldest unacknowledged record, whatever the broker
//! says about sessions. Sending is rate-limited so a fleet that reconnects after an
//! outage cannot flatten the collector. Acks and commands are verified against the
//! pinned CA and must come from a collector certificate and name this agent.
//!
//! A broker drops what is published while no collector is subscribed, without telling
//! the publisher. So the uplink follows the collectors' signed presence
//! ([`wire::Presence`], retained): it holds batches while every collector it knows of
//! is offline, and sends everything unacknowledged again the moment a collector
//! connection it has not seen before announces itself — after a broker restart that
//! is seconds, not `ack_timeout`. With no presence at all (a broker that lost its
//! retained messages) it sends after [`PRESENCE_PATIENCE`] and relies on the timeout.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use weilan_config::mqtt::{self, SessionConfig, SessionEvent};
use weilan_config::signing::{Role, Signer, Verifier};
use weilan_config::topics::{self, Channel};
use weilan_config::wire::{self, Ack, AgentState, Batch, Purpose, Status};

use serde_json::value::RawValue;
use weilan_config::event::EventKey;

use crate::journal::{Journal, Position};
use crate::stats::AgentStats;

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

use weilan_config::wire::MAX_BATCH_BYTES;
/// Largest payload the agent accepts from the broker (acks and commands are small).
const MAX_INCOMING: usize = 256 * 1024;
/// How long after connecting the uplink waits for a collector's retained presence
/// before it sends anyway.
pub const PRESENCE_PATIENCE: Duration = Duration::from_secs(3);
/// Collectors whose presence is remembered (a fleet runs a handful).
const MAX_COLLECTORS: usize = 64;

/// What the uplink knows of the collectors' presence on the current connection.
#[derive(Default)]
struct Presences {
    /// Connection id of every collector last announced online (0: offline).
    collectors: std::collections::HashMap<String, u64>,
    /// Since when this connection is up.
    connected_at: Option<Instant>,
}

impl Presences {
    /// May batches be published now?
    fn may_send(&self) -> bool {
        let Some(at) = self.connected_at else {
            return false;
        };
        if self.collectors.values().any(|&c| c != 0) {
            return true;
        }
        // Nobody announced: after the patience, fall back to sending (the ack timeout
        // covers a broker that kept no presence); someone announced offline: hold.
        self.collectors.is_empty() && at.elapsed() >= PRESENCE_PATIENCE
    }

    /// How many collectors announced themselves online.
    fn online(&self) -> usize {
        self.collectors.values().filter(|&&c| c != 0).count()
    }

    /// Notes a presence; true when it is a collector connection not seen before
    /// (what was sent earlier may have reached no subscriber).
    fn note(&mut self, collector: &str, presence: &wire::Presence) -> bool {
        let connection = match presence.state {
            AgentState::Online => presence.connection.max(1),
            AgentState::Offline => 0,
        };
        if self.collectors.len() >= MAX_COLLECTORS && !self.collectors.contains_key(collector) {
            return false;
        }
        let before = self.collectors.insert(collector.to_string(), connection);
        connection != 0 && before != Some(connection)
    }
}

pub struct UplinkConfig {
    pub agent_id: String,
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub delivery: weilan_config::settings::agent::Delivery,
    /// How long to keep delivering after the agent was told to stop.
    pub drain_timeout: Duration,
}

/// New events gathering into a batch while earlier batches are in flight.
struct Linger {
    /// Send what gathered by then even if no ack came.
    until: tokio::time::Instant,
    /// Batches in flight when the gathering began; fewer means an ack came.
    in_flight: usize,
}

impl Linger {
    /// Gathering starts only while batches are in flight (and a linger is set).
    fn start(linger: Duration, in_flight: usize) -> Option<Linger> {
        (in_flight > 0 && !linger.is_zero()).then(|| Linger {
            until: tokio::time::Instant::now() + linger,
            in_flight,
        })
    }
}

struct InFlight {
    batch_id: u64,
    first: EventKey,
    last: EventKey,
    sent: Instant,
}

/// Token bucket: `rate` events per second, bursts up to one second's worth.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        RateLimit {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }
    fn available(&mut self) -> usize {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        self.tokens.max(0.0) as usize
    }
    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
    /// Time until `n` tokens are there.
    fn wait_for(&self, n: usize) -> Duration {
        let missing = (n as f64 - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / self.rate)
    }
}

/// What the uplink knows about the batches it sent.
struct Sending {
    cursor: Position,
    in_flight: VecDeque<InFlight>,
    next_batch_id: u64,
    limit: RateLimit,
}

pub struct Uplink {
    pub config: UplinkConfig,
    pub signer: Signer,
    /// Renewed identities (`renewal.rs`): the session restarts with each, and batches
    /// are signed with it from then on.
    pub identity_switches: mpsc::Receiver<crate::renewal::Switch>,
    pub verifier: Verifier,
    /// Verified policy bodies go to the policy manager.
    pub policy_pushes: mpsc::Sender<String>,
    /// Command payloads go to the command gate, which authenticates them.
    pub commands: mpsc::Sender<Vec<u8>>,
    pub journal: Arc<Mutex<Journal>>,
    pub notify: Arc<Notify>,
    pub stats: Arc<AgentStats>,
    /// Where `weilan-agent journal import-ack` drops ack bundles carried back from an
    /// air-gapped collector (`airgap.rs`); looked at every second.
    pub ack_drop: std::path::PathBuf,
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
    /// Runs until `drain` is cancelled and the journal is fully acknowledged (or the drain timeout
    /// passed). `drain` is cancelled after the recorder has stored the last event.
    /// The MQTT session with the current TLS identity.
    fn session(
        &self,
        stop: &CancellationToken,
    ) -> (
        rumqttc::AsyncClient,
        mpsc::Receiver<SessionEvent>,
        tokio::task::JoinHandle<()>,
    ) {
        let c = &self.config;
        mqtt::spawn(
            SessionConfig {
                client_id: c.agent_id.clone(),
                host: c.host.clone(),
                port: c.port,
                tls: c.tls.clone(),
                keep_alive: c.delivery.keep_alive,
                last_will: Some(LastWill::new(
                    topics::agent_topic(&c.agent_id, Channel::Status),
                    status_payload(&c.agent_id, AgentState::Offline),
                    QoS::AtLeastOnce,
                    true,
                )),
                max_packet: wire::DEFAULT_MAX_PAYLOAD,
                request_capacity: 64,
                max_inflight: 100,
                incoming_capacity: 256,
                subscriptions: vec![
                    topics::agent_topic(&c.agent_id, Channel::Acks),
                    topics::agent_topic(&c.agent_id, Channel::Commands),
                    topics::POLICY.to_string(),
                    topics::PRESENCE_FILTER.to_string(),
                ],
                reconnect_spread: c.delivery.reconnect_spread,
            },
            stop.clone(),
        )
    }

    pub async fn run(mut self, drain: CancellationToken) {
        let status_topic = topics::agent_topic(&self.config.agent_id, Channel::Status);
        let events_topic = topics::agent_topic(&self.config.agent_id, Channel::Events);
        let mut session_stop = CancellationToken::new();
        let (mut client, mut rx, mut session) = self.session(&session_stop);
        let mut connected = false;
        let mut presences = Presences::default();
        let mut draining: Option<tokio::time::Instant> = None;
        let mut ack_check = tokio::time::interval(Duration::from_secs(1));
        let mut sending = Sending {
            cursor: self.lock().resume_position(),
            in_flight: VecDeque::new(),
            // Random start: an ack that outlived a previous run can never match.
            next_batch_id: rand::random::<u32>() as u64 * 1_000_000,
            limit: RateLimit::new(self.config.delivery.max_events_per_sec),
        };
        let mut throttled: Option<tokio::time::Instant> = None;
        let mut lingering: Option<Linger> = None;
        loop {
            let c = &self.config;
            tokio::select! {
                Some(switch) = self.identity_switches.recv() => {
                    // A renewed certificate: a new session with it; what was in flight
                    // is sent again (signed with the new key) once it is up.
                    tracing::info!("reconnecting with the renewed certificate");
                    session_stop.cancel();
                    let _ = session.await;
                    self.config.tls = switch.tls;
                    self.signer = switch.signer;
                    session_stop = CancellationToken::new();
                    (client, rx, session) = self.session(&session_stop);
                    connected = false;
                    presences.connected_at = None;
                    continue;
                }
                ev = rx.recv() => match ev {
                    Some(SessionEvent::Connected) => {
                        connected = true;
                        // The retained presences arrive again right after subscribing;
                        // connection ids already known do not cause another re-send.
                        presences.connected_at = Some(Instant::now());
                        presences.collectors.retain(|_, c| *c != 0);
                        // Whatever was in flight may be lost with the old connection.
                        self.rewind(&mut sending);
                        let _ = client.try_publish(status_topic.clone(), QoS::AtLeastOnce, true,
                            status_payload(&c.agent_id, AgentState::Online));
                    }
                    Some(SessionEvent::Disconnected(_)) => {
                        connected = false;
                        presences.connected_at = None;
                    }
                    Some(SessionEvent::Message { topic, payload }) => {
                        if let Some(collector) = topics::parse_presence_topic(&topic) {
                            self.handle_presence(collector, &payload, &mut presences, &mut sending);
                        } else {
                            self.handle_incoming(&topic, &payload, &mut sending, presences.online());
                        }
                    }
                    None => break,
                },
                // Nagle for batches: with nothing in flight new events go at once (an
                // idle agent's event is not held back); with batches in flight they
                // gather until the next ack or the end of the linger, whichever comes
                // first, so batches grow with the load and the latency does not.
                _ = self.notify.notified() => {
                    lingering = lingering.or_else(|| Linger::start(c.delivery.batch_linger, sending.in_flight.len()));
                }
                _ = sleep_until_opt(lingering.as_ref().map(|l| l.until)) => lingering = None,
                _ = sleep_until_opt(throttled) => throttled = None,
                _ = ack_check.tick() => {
                    for ack in crate::airgap::take_dropped_acks(&self.ack_drop, &self.verifier, &c.agent_id) {
                        self.apply_ack(&ack, &mut sending);
                    }
                    let stale = sending.in_flight.front().is_some_and(|b| b.sent.elapsed() >= c.delivery.ack_timeout);
                    // Safety net: nothing in flight, yet the acknowledged watermark is
                    // behind the send cursor — records there were sent and never
                    // acknowledged, and no later ack or timeout will bring them back.
                    if !stale && connected && sending.in_flight.is_empty() && self.lock().resume_position() < sending.cursor {
                        tracing::warn!("records behind the send cursor were never acknowledged; sending again");
                        self.rewind(&mut sending);
                    }
                    if stale {
                        tracing::warn!(batches = sending.in_flight.len(), "no ack from the collector in time; sending again");
                        self.rewind(&mut sending);
                    }
                }
                _ = drain.cancelled(), if draining.is_none() => {
                    draining = Some(tokio::time::Instant::now() + c.drain_timeout);
                }
            }
            // An ack (or a rewind) freed the window: what gathered goes now.
            lingering = lingering.filter(|l| sending.in_flight.len() >= l.in_flight);
            if connected && throttled.is_none() && lingering.is_none() && presences.may_send() {
                throttled = self.send_batches(&client, &events_topic, &mut sending);
            }
            if let Some(deadline) = draining {
                let backlog = self.lock().unacked();
                if backlog == 0 || tokio::time::Instant::now() >= deadline {
                    if backlog > 0 {
                        tracing::info!(
                            backlog,
                            "stopping with unacknowledged events; they stay in the journal"
                        );
                    }
                    break;
                }
            }
        }
        let _ = client.try_publish(
            status_topic,
            QoS::AtLeastOnce,
            true,
            status_payload(&self.config.agent_id, AgentState::Offline),
        );
        session_stop.cancel();
        let _ = session.await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forget what is in flight and resume at the oldest unacknowledged record.
    fn rewind(&self, sending: &mut Sending) {
        sending.in_flight.clear();
        sending.cursor = self.lock().resume_position();
    }

    /// Sends batches while the window and the rate allow; returns when to try again
    /// if the rate limit stopped it.
    fn send_batches(
        &self,
        client: &AsyncClient,
        topic: &str,
        sending: &mut Sending,
    ) -> Option<tokio::time::Instant> {
        let c = &self.config;
        while sending.in_flight.len() < c.delivery.max_batches_in_flight {
            let tokens = sending.limit.available();
            if tokens == 0 {
                let wait = sending.limit.wait_for(
                    c.delivery
                        .batch_max_events
                        .min(c.delivery.max_events_per_sec as usize)
                        .max(1),
                );
                return Some(tokio::time::Instant::now() + wait.max(Duration::from_millis(10)));
            }
            let records = {
                // Read and mark as sent under one lock: from here on the cap must not
                // delete these records (they may be stored before their ack returns).
                let mut journal = self.lock();
                let records = journal.read(
                    sending.cursor,
                    c.delivery.batch_max_events.min(tokens),
                    MAX_BATCH_BYTES,
                );
                if let Some(last) = records.last() {
                    journal.mark_sent(last.end);
                }
                (records, journal.durable_head())
            };
            let (records, head) = records;
            let (Some(first), Some(last)) = (records.first(), records.last()) else {
                return None;
            };
            let raws: Vec<Box<RawValue>> = match records
                .iter()
                .map(|r| RawValue::from_string(r.json.clone()))
                .collect::<Result<_, _>>()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "journal record is not JSON; skipped");
                    sending.cursor = last.end;
                    continue;
                }
            };
            let batch_id = sending.next_batch_id;
            sending.next_batch_id += 1;
            let batch = Batch {
                agent_id: c.agent_id.clone(),
                batch_id,
                first: first.key,
                last: last.key,
                events: raws.iter().map(|r| r.as_ref()).collect(),
                head,
            };
            let body = match serde_json::to_string(&batch) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "batch not serializable");
                    return None;
                }
            };
            let signed = self.signer.sign(Purpose::Batch, body);
            let payload = match serde_json::to_vec(&signed) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "signed batch not serializable");
                    return None;
                }
            };
            if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                tracing::debug!(error = %e, "MQTT request queue full; batch will be sent again");
                return Some(tokio::time::Instant::now() + Duration::from_millis(50));
            }
            sending.limit.take(records.len());
            sending.cursor = last.end;
            sending.in_flight.push_back(InFlight {
                batch_id,
                first: first.key,
                last: last.key,
                sent: Instant::now(),
            });
            tracing::debug!(batch_id, events = records.len(), "batch sent");
        }
        None
    }

    /// A collector's presence: held batches go out when one is online, and everything
    /// unacknowledged is sent again when a collector connection is new.
    fn handle_presence(
        &self,
        collector: &str,
        payload: &[u8],
        presences: &mut Presences,
        sending: &mut Sending,
    ) {
        if payload.is_empty() {
            presences.collectors.remove(collector);
            return;
        }
        let presence = wire::decode_signed(payload, MAX_INCOMING)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                self.verifier
                    .verify(&m, Purpose::Presence, Role::Collector)
                    .map_err(|e| e.to_string())?;
                wire::decode::<wire::Presence>("a presence", m.body.as_bytes(), MAX_INCOMING)
                    .map_err(|e| e.to_string())
            });
        match presence {
            Ok(p) => {
                if presences.note(collector, &p) && !sending.in_flight.is_empty() {
                    tracing::info!(
                        collector,
                        batches = sending.in_flight.len(),
                        "a collector connected anew; sending everything unacknowledged again"
                    );
                    self.rewind(sending);
                } else if p.state == AgentState::Offline {
                    tracing::info!(collector, "collector offline; holding batches");
                }
                self.notify.notify_one();
            }
            Err(reason) => {
                tracing::warn!(collector, %reason, "refused an unauthenticated presence")
            }
        }
    }

    /// A verified ack for this agent: the journal's watermark moves, the batches it
    /// covers are no longer in flight.
    fn apply_ack(&self, ack: &Ack, sending: &mut Sending) {
        for r in &ack.rejected {
            tracing::error!(index = r.index, key = ?r.key, reason = %r.reason, "collector rejected an event (quarantined there)");
        }
        let mut journal = self.lock();
        journal.ack(ack.first, ack.last);
        self.stats
            .backlog
            .store(journal.unacked(), Ordering::Relaxed);
        drop(journal);
        sending.in_flight.retain(|b| {
            b.batch_id != ack.batch_id && !(ack.first <= b.first && b.last <= ack.last)
        });
    }

    /// An incoming policy, command or ack; `collectors_online` tells whether acks
    /// may come back out of order.
    fn handle_incoming(
        &self,
        topic: &str,
        payload: &[u8],
        sending: &mut Sending,
        collectors_online: usize,
    ) {
        if topic == topics::POLICY {
            let verified = wire::decode_signed(payload, 4 * 1024 * 1024)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    self.verifier
                        .verify(&m, Purpose::Policy, Role::Collector)
                        .map(|_| m.body)
                        .map_err(|e| e.to_string())
                });
            match verified {
                Ok(body) => {
                    if self.policy_pushes.try_send(body).is_err() {
                        tracing::warn!("policy update queue full; the retained policy arrives again on reconnect");
                    }
                }
                Err(reason) => tracing::warn!(%reason, "refused an unauthenticated policy"),
            }
            return;
        }
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
            Channel::Commands => {
                // Authentication, freshness and replay checks happen in the gate,
                // which also reports every refusal.
                if self.commands.try_send(payload.to_vec()).is_err() {
                    tracing::warn!(
                        "command queue full; command dropped (the collector may send it again)"
                    );
                }
                return;
            }
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
        // Only acks reach this point (commands went to the gate above).
        match wire::decode::<Ack>("an ack", body.as_bytes(), MAX_INCOMING) {
            Ok(ack) if ack.agent_id == self.config.agent_id => {
                self.apply_ack(&ack, sending);
                // One collector handles batches in the order the broker delivers
                // them, and one connection keeps that order: an ack that overtakes
                // an earlier batch means the earlier one was lost on the way (e.g.
                // published before the collector had subscribed). Send it again now
                // rather than after the ack timeout. Several collectors sharing the
                // ingest answer in their own time: there the ack timeout decides.
                if collectors_online <= 1 && sending.in_flight.iter().any(|b| b.last < ack.first) {
                    tracing::info!(
                        batch_id = ack.batch_id,
                        "an earlier batch was lost in transit; sending again"
                    );
                    self.rewind(sending);
                }
                self.stats.acked_batches.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(batch_id = ack.batch_id, first = %ack.first, last = %ack.last, duplicates = ack.duplicates, "batch acknowledged");
                self.notify.notify_one();
            }
            Ok(ack) => tracing::warn!(claimed = %ack.agent_id, "ack for another agent refused"),
            Err(e) => tracing::warn!(error = %e, "malformed ack refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(state: AgentState, connection: u64) -> wire::Presence {
        wire::Presence {
            state,
            connection,
            time: jiff::Timestamp::now(),
        }
    }

    #[test]
    fn batches_wait_for_a_collector_and_go_again_for_a_new_connection() {
        let mut p = Presences::default();
        assert!(!p.may_send(), "not connected");
        p.connected_at = Some(Instant::now());
        assert!(!p.may_send(), "no presence yet, patience not over");
        assert!(p.note("c", &presence(AgentState::Online, 7)), "first sight");
        assert!(p.may_send());
        assert!(
            !p.note("c", &presence(AgentState::Online, 7)),
            "known connection"
        );
        assert!(!p.note("c", &presence(AgentState::Offline, 0)));
        assert!(!p.may_send(), "the only collector is offline");
        assert!(
            p.note("c", &presence(AgentState::Online, 8)),
            "a new connection"
        );
        // A second collector going offline does not stop delivery to the first.
        assert!(!p.note("d", &presence(AgentState::Offline, 0)));
        assert!(p.may_send());
        // Nobody announced at all for the patience: send anyway.
        let mut silent = Presences {
            connected_at: Instant::now().checked_sub(PRESENCE_PATIENCE),
            ..Default::default()
        };
        assert!(silent.may_send());
        silent.note("c", &presence(AgentState::Offline, 0));
        assert!(!silent.may_send());
    }
}
