//! The district's side of federation (federation/): sends `federation_outbox` to the province, in
//! order, and deletes a batch only when the province's signed ack for it arrives.
//!
//! At most `window` batches are out at once. A batch not acknowledged within
//! `ack_timeout`, and every batch after a reconnect, is sent again from the oldest
//! (go-back-N): the province stores nothing twice, so a re-send costs bandwidth,
//! never correctness. Only the district collector that leads (leader.rs) holds the
//! province session: the broker binds the client id to the district's certificate,
//! so two collectors of one district would take the session from each other.
//! When the oldest batch has waited longer than `backlog_alert`, a yellow
//! `collector.federation_backlog` finding is raised once, until the queue drains.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use weilan_config::mqtt::{self, SessionConfig, SessionEvent};
use weilan_config::settings::federation::Upstream;
use weilan_config::signing::{Role, Verifier};
use weilan_config::topics;
use weilan_config::wire::{self, Ack, Purpose};

use crate::federation::{self, BatchKey, Queued};
use crate::ingest::{Ingest, Reply};
use crate::rules::{findings, Finding};

/// Errors starting the forwarder (bad files named in `[federation.upstream]`).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("federation.upstream: {0}")]
    Signing(#[from] weilan_config::signing::SigningError),
    #[error("federation.upstream: {0}")]
    Tls(#[from] weilan_config::tls::TlsError),
    #[error("federation.upstream.cert: {0}")]
    Identity(String),
}

/// Counters, for the log and tests.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub sent: std::sync::atomic::AtomicU64,
    pub acknowledged: std::sync::atomic::AtomicU64,
}

/// Forwards the district's stored batches to the province.
pub struct Forwarder {
    ingest: Arc<Ingest>,
    settings: Upstream,
    /// This district's name: the common name of its certificate from the province.
    district: String,
    session: SessionConfig,
    /// Verifies the province collector's acks (the province's CA).
    province: Verifier,
    /// Publishes replies of raised findings on the district's own broker.
    local: rumqttc::AsyncClient,
    pub stats: Arc<ForwardStats>,
}

/// Batches of one agent out at once, at most: the province takes up to
/// `fair::PER_SOURCE_MESSAGES` (64) waiting per agent and refuses more as flooding;
/// an agent itself keeps at most 32 unacknowledged.
const PER_AGENT_IN_FLIGHT: usize = 32;

/// What to do with one queued batch now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Send {
    /// Sent and not yet acknowledged.
    AlreadyOut,
    /// Its agent has `PER_AGENT_IN_FLIGHT` out (it waits, in order), or the window
    /// is full.
    Hold,
    Now,
}

/// For `queued` (oldest first), which to send now: at most `room`, at most
/// `PER_AGENT_IN_FLIGHT` of one agent out at once; an agent at its limit holds only
/// its own later batches back, never another agent's.
fn plan_sends(queued: &[Queued], out: &HashMap<BatchKey, Instant>, room: usize) -> Vec<Send> {
    let mut per_agent: HashMap<&str, usize> = HashMap::new();
    for k in out.keys() {
        *per_agent.entry(k.agent.as_str()).or_default() += 1;
    }
    let mut sending = 0;
    queued
        .iter()
        .map(|q| {
            if out.contains_key(&q.key) {
                return Send::AlreadyOut;
            }
            let n = per_agent.entry(q.key.agent.as_str()).or_default();
            if sending >= room || *n >= PER_AGENT_IN_FLIGHT {
                return Send::Hold;
            }
            *n += 1;
            sending += 1;
            Send::Now
        })
        .collect()
}

/// Batches out and not yet acknowledged: when each was sent.
#[derive(Default)]
struct InFlight {
    sent: HashMap<BatchKey, Instant>,
    /// The newest outbox row sent since the window was last reset.
    after: i64,
}

impl Forwarder {
    pub fn new(
        ingest: Arc<Ingest>,
        settings: Upstream,
        max_payload: usize,
        local: rumqttc::AsyncClient,
    ) -> Result<Forwarder, UpstreamError> {
        let der = weilan_config::pem::load_cert(&settings.cert)
            .map_err(|e| UpstreamError::Identity(format!("{}: {e}", settings.cert.display())))?;
        let identity =
            weilan_config::signing::subject_identity(&der).map_err(UpstreamError::Identity)?;
        if identity.role != Role::District {
            return Err(UpstreamError::Identity(format!(
                "`{}` is not a district certificate (weilan-collector pki issue-district)",
                identity.common_name
            )));
        }
        let district = identity.common_name;
        let tls = weilan_config::tls::client_config(
            &settings.ca,
            &settings.cert,
            &settings.key,
            &settings.server_name,
        )?;
        let session = SessionConfig {
            client_id: district.clone(),
            host: settings.host.clone(),
            port: settings.port,
            tls,
            keep_alive: Duration::from_secs(20),
            last_will: None,
            max_packet: max_payload * 2 + 64 * 1024,
            request_capacity: settings.window * 2 + 64,
            max_inflight: settings.window.min(u16::MAX as usize) as u16,
            incoming_capacity: settings.window * 2 + 64,
            subscriptions: vec![topics::federation_acks(&district)],
            reconnect_spread: Duration::ZERO,
        };
        Ok(Forwarder {
            province: Verifier::from_ca_file(&settings.ca)?,
            ingest,
            settings,
            district,
            session,
            local,
            stats: Arc::default(),
        })
    }

    pub fn district(&self) -> &str {
        &self.district
    }

    /// Runs until `shutdown`: holds the province session while this collector leads.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut backlog_tick = tokio::time::interval(Duration::from_secs(10));
        let mut backlog_alerted = false;
        while !shutdown.is_cancelled() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if !self.leads().await {
                continue;
            }
            tracing::info!(district = %self.district, province = %format!("{}:{}", self.settings.host, self.settings.port), "forwarding to the province");
            let stop = CancellationToken::new();
            let (client, mut rx, session) = mqtt::spawn(self.session.clone(), stop.clone());
            let mut connected = false;
            let mut flight = InFlight::default();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    ev = rx.recv() => match ev {
                        Some(SessionEvent::Connected) => {
                            tracing::info!(district = %self.district, "connected to the province");
                            connected = true;
                            flight = InFlight::default();
                        }
                        Some(SessionEvent::Disconnected(reason)) => {
                            if connected {
                                tracing::warn!(district = %self.district, %reason, "province link down; batches wait in the outbox");
                            }
                            connected = false;
                        }
                        Some(SessionEvent::Message { topic, payload }) => self.on_ack(&topic, &payload, &mut flight).await,
                        None => break,
                    },
                    _ = tick.tick() => {
                        if !self.leads().await {
                            tracing::info!(district = %self.district, "no longer leading; another collector forwards");
                            break;
                        }
                        if connected {
                            self.send(&client, &mut flight).await;
                        }
                    }
                    _ = backlog_tick.tick() => self.check_backlog(&mut backlog_alerted).await,
                }
            }
            stop.cancel();
            let _ = session.await;
        }
    }

    async fn leads(&self) -> bool {
        let ingest = self.ingest.clone();
        tokio::task::spawn_blocking(move || ingest.leads())
            .await
            .unwrap_or(false)
    }

    /// Re-sends from the oldest when an ack is overdue; then fills the window.
    async fn send(&self, client: &rumqttc::AsyncClient, flight: &mut InFlight) {
        let overdue = flight
            .sent
            .values()
            .any(|at| at.elapsed() > self.settings.ack_timeout);
        if overdue {
            tracing::warn!(district = %self.district, out = flight.sent.len(), "province ack overdue; sending again from the oldest batch");
            *flight = InFlight::default();
        }
        let room = self.settings.window.saturating_sub(flight.sent.len());
        if room == 0 {
            return;
        }
        let ingest = self.ingest.clone();
        let after = flight.after;
        // Rows already out come again (they follow a row held back for its agent).
        let limit = room + flight.sent.len();
        let queued = tokio::task::spawn_blocking(move || {
            federation::queued_after(&*ingest.store().conn(), after, limit)
        })
        .await;
        let queued: Vec<Queued> = match queued {
            Ok(Ok(q)) => q,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "federation outbox not read");
                return;
            }
            Err(_) => return,
        };
        let topic_of = |agent: &str| topics::federation_batches(&self.district, agent);
        // `after` moves only over rows that are out: a row held back is read again.
        let mut contiguous = true;
        let plan = plan_sends(&queued, &flight.sent, room);
        for (q, step) in queued.into_iter().zip(plan) {
            match step {
                Send::AlreadyOut => {}
                Send::Hold => {
                    contiguous = false;
                    continue;
                }
                Send::Now => {
                    if client
                        .try_publish(topic_of(&q.key.agent), QoS::AtLeastOnce, false, q.payload)
                        .is_err()
                    {
                        // The session's request channel is full: the rest waits for
                        // the next tick.
                        break;
                    }
                    flight.sent.insert(q.key, Instant::now());
                    self.stats
                        .sent
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            if contiguous {
                flight.after = q.outbox_id;
            }
        }
    }

    /// The province's signed ack: the batch leaves the outbox.
    async fn on_ack(&self, topic: &str, payload: &[u8], flight: &mut InFlight) {
        if topic != topics::federation_acks(&self.district) {
            return;
        }
        let ack = match self.verified_ack(payload) {
            Ok(ack) => ack,
            Err(reason) => {
                tracing::warn!(district = %self.district, %reason, "ack from the province refused");
                return;
            }
        };
        let key = BatchKey {
            agent: ack.agent_id.clone(),
            epoch: ack.first.epoch,
            first_seq: ack.first.seq,
            last_seq: ack.last.seq,
        };
        if !ack.rejected.is_empty() {
            tracing::warn!(
                district = %self.district,
                agent_id = %ack.agent_id,
                first = %ack.first,
                last = %ack.last,
                rejected = ack.rejected.len(),
                reason = %ack.rejected[0].reason,
                "the province refused events of a forwarded batch (see its alerts)"
            );
        }
        flight.sent.remove(&key);
        let ingest = self.ingest.clone();
        let done = tokio::task::spawn_blocking(move || {
            federation::acknowledged(&*ingest.store().conn(), &key)
        })
        .await;
        match done {
            Ok(Ok(_)) => {
                self.stats
                    .acknowledged
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "acknowledged batch not removed; it is sent again")
            }
            Err(_) => {}
        }
    }

    /// An ack signed by a collector of the province's CA, for one of our batches.
    fn verified_ack(&self, payload: &[u8]) -> Result<Ack, String> {
        let signed = wire::decode_signed(payload, 1 << 20).map_err(|e| e.to_string())?;
        self.province
            .verify(&signed, Purpose::Ack, Role::Collector)
            .map_err(|e| format!("signature: {e}"))?;
        serde_json::from_str(&signed.body).map_err(|e| format!("not an ack: {e}"))
    }

    /// The yellow finding when the oldest queued batch is older than `backlog_alert`.
    async fn check_backlog(&self, alerted: &mut bool) {
        let ingest = self.ingest.clone();
        let Ok(Ok((waiting, oldest))) =
            tokio::task::spawn_blocking(move || federation::backlog(&*ingest.store().conn())).await
        else {
            return;
        };
        let age = oldest
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| jiff::Timestamp::now().duration_since(t))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or_default();
        if age <= self.settings.backlog_alert {
            *alerted = false;
            return;
        }
        if std::mem::replace(alerted, true) {
            return;
        }
        let finding = backlog_finding(&self.district, &self.settings, waiting, age);
        let ingest = self.ingest.clone();
        let replies = tokio::task::spawn_blocking(move || ingest.raise(vec![finding]))
            .await
            .unwrap_or_default();
        publish_local(&self.local, replies);
    }
}

/// The finding for a backlog that has waited too long.
fn backlog_finding(district: &str, settings: &Upstream, waiting: u64, age: Duration) -> Finding {
    Finding {
        kind: findings::FEDERATION_BACKLOG,
        agent_id: String::new(),
        summary: format!(
            "{waiting} batches have waited {} min for the province ({}:{}) to acknowledge them; they stay queued and are sent when it answers (district `{district}`)",
            age.as_secs() / 60,
            settings.host,
            settings.port
        ),
        event_ids: vec![],
        details: serde_json::json!({
            "district": district,
            "province": format!("{}:{}", settings.host, settings.port),
            "batches": waiting,
            "oldest_secs": age.as_secs(),
        }),
    }
}

fn publish_local(client: &rumqttc::AsyncClient, replies: Vec<Reply>) {
    for r in replies {
        if let Err(e) = client.try_publish(r.topic, QoS::AtLeastOnce, r.retain, r.payload) {
            tracing::error!(error = %e, "reply of a federation finding not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(agents: &[(&str, u64)]) -> Vec<Queued> {
        let mut id = 0;
        let mut out = Vec::new();
        for (agent, n) in agents {
            for seq in 1..=*n {
                id += 1;
                out.push(Queued {
                    outbox_id: id,
                    key: BatchKey {
                        agent: agent.to_string(),
                        epoch: 1,
                        first_seq: seq,
                        last_seq: seq,
                    },
                    payload: vec![],
                });
            }
        }
        out
    }

    #[test]
    fn an_agent_at_its_limit_holds_back_only_its_own_batches() {
        let rows = queued(&[("ws-a", 40), ("ws-b", 3)]);
        let plan = plan_sends(&rows, &HashMap::new(), 256);
        let now = |agent: &str| {
            rows.iter()
                .zip(&plan)
                .filter(|(q, s)| q.key.agent == agent && **s == Send::Now)
                .count()
        };
        assert_eq!((now("ws-a"), now("ws-b")), (PER_AGENT_IN_FLIGHT, 3));
        // In order: the first 32 of ws-a, the rest held.
        assert!(plan[..PER_AGENT_IN_FLIGHT].iter().all(|s| *s == Send::Now));
        assert!(plan[PER_AGENT_IN_FLIGHT..40]
            .iter()
            .all(|s| *s == Send::Hold));
        // Those out are not sent again; the window bounds what is sent.
        let out: HashMap<BatchKey, Instant> = rows[..PER_AGENT_IN_FLIGHT]
            .iter()
            .map(|q| (q.key.clone(), Instant::now()))
            .collect();
        let plan = plan_sends(&rows, &out, 2);
        assert!(plan[..PER_AGENT_IN_FLIGHT]
            .iter()
            .all(|s| *s == Send::AlreadyOut));
        assert_eq!(
            &plan[PER_AGENT_IN_FLIGHT..],
            &[
                [Send::Hold; 8].as_slice(),
                &[Send::Now, Send::Now, Send::Hold]
            ]
            .concat()[..]
        );
    }
}
