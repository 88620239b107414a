//! The MQTT session both programs use: rumqttc over mutual TLS, driven in its own
//! task with reconnect backoff (rumqttc reconnects immediately on every poll, which
//! would spin against a broker that is down).
//!
//! Incoming messages and connection changes are forwarded on a bounded channel; when
//! the consumer is slow the task stops reading from the broker (back-pressure, not
//! loss). Publishing goes through [`rumqttc::AsyncClient`]; callers use `try_publish`
//! so they can never deadlock against a task that is itself waiting on them.
//!
//! Delivery guarantees do not rest on MQTT sessions: rumqttc drops in-flight QoS 1
//! messages when a broker has no session for it, so Weilan re-sends everything that
//! was not acknowledged *by the collector* after every reconnect.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How to connect.
#[derive(Clone)]
pub struct SessionConfig {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub keep_alive: Duration,
    pub last_will: Option<LastWill>,
    /// Largest MQTT packet accepted or sent.
    pub max_packet: usize,
    /// Capacity of rumqttc's request channel.
    pub request_capacity: usize,
    /// QoS 1 publishes sent and not yet PUBACKed by the broker; beyond it requests
    /// wait in the request channel. The collector answers every batch with an ack:
    /// with rumqttc's default of 100 its acks queued up behind a broker busy with a
    /// reconnect storm, the request channel filled and 24 014 acks were dropped
    /// (`benches/fleet.rs`), each costing its agent an ack timeout.
    pub max_inflight: u16,
    /// Capacity of the channel to the consumer.
    pub incoming_capacity: usize,
    /// Topic filters to (re)subscribe after every connect.
    pub subscriptions: Vec<String>,
    /// The first reconnect after a dropped connection waits a random moment within
    /// this (agents: a fleet must not come back in lockstep; the collector: zero).
    pub reconnect_spread: Duration,
}

/// What the session reports to its owner.
#[derive(Debug)]
pub enum SessionEvent {
    /// Connected (or reconnected) and subscribed.
    Connected,
    /// The connection failed or dropped; the session retries after a backoff.
    Disconnected(String),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// When to try connecting again. A broker restart drops a whole fleet at the same
/// instant, and Mosquitto listens with a backlog of 100: 5 000 agents retrying in
/// lockstep overflow it (the kernel drops their SYNs and retransmits them 1, 3, 7 s
/// later), each abandoned handshake still costs the broker, and it never catches up
/// (`benches/fleet.rs`: 3 705 of 5 000 back after 140 s). So the first attempt after a
/// connection that was up waits a random moment within `spread`, and failures after
/// that back off exponentially with jitter.
#[derive(Debug, Clone)]
pub struct Reconnect {
    spread: Duration,
    backoff: Duration,
    was_up: bool,
}

impl Reconnect {
    pub fn new(spread: Duration) -> Self {
        Reconnect {
            spread,
            backoff: BACKOFF_MIN,
            was_up: false,
        }
    }

    /// The connection is up.
    pub fn connected(&mut self) {
        self.backoff = BACKOFF_MIN;
        self.was_up = true;
    }

    /// The delay before the next attempt, after a failure or a dropped connection.
    pub fn next_delay(&mut self) -> Duration {
        if std::mem::take(&mut self.was_up) && !self.spread.is_zero() {
            return self.spread.mul_f64(rand::random::<f64>());
        }
        let delay = self.backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        delay
    }
}

/// Seconds a connection attempt (TCP, TLS, CONNACK) may take.
pub const CONNECT_TIMEOUT_SECS: u64 = 10;

/// Starts the session task. It ends when `shutdown` is cancelled (after a clean
/// DISCONNECT) or when the receiver is dropped.
pub fn spawn(
    cfg: SessionConfig,
    shutdown: CancellationToken,
) -> (AsyncClient, mpsc::Receiver<SessionEvent>, JoinHandle<()>) {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(cfg.max_packet, cfg.max_packet)
        .set_request_channel_capacity(cfg.request_capacity)
        .set_inflight(cfg.max_inflight)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            cfg.tls.clone(),
        )));
    if let Some(will) = cfg.last_will.clone() {
        opts.set_last_will(will);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, cfg.request_capacity);
    // Small MQTT packets (a batch, an ack) must leave at once: with Nagle and the
    // peer's delayed ACK each waited ~40 ms a hop (crate-notes: publish→ack p50
    // 49 ms without, 4.9 ms with).
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    eventloop.set_network_options(network);
    let (tx, rx) = mpsc::channel(cfg.incoming_capacity);
    let sub_client = client.clone();
    let handle = tokio::spawn(async move {
        let mut reconnect = Reconnect::new(cfg.reconnect_spread);
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = eventloop.poll() => ev,
            };
            let forward = match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    reconnect.connected();
                    tracing::info!(host = %cfg.host, port = cfg.port, code = ?ack.code, "MQTT connected");
                    for filter in &cfg.subscriptions {
                        if let Err(e) = sub_client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                            tracing::warn!(%filter, error = %e, "subscribe request not queued");
                        }
                    }
                    Some(SessionEvent::Connected)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => Some(SessionEvent::Message {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                }),
                Ok(_) => None,
                Err(e) => {
                    let reason = e.to_string();
                    let delay = reconnect.next_delay();
                    tracing::warn!(host = %cfg.host, port = cfg.port, error = %reason, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed");
                    if tx.send(SessionEvent::Disconnected(reason)).await.is_err() {
                        break;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    None
                }
            };
            if let Some(ev) = forward {
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
        }
        // Flush what the owner queued before shutdown (e.g. a final status), then leave.
        let _ = sub_client.try_disconnect();
        let flush = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    });
    (client, rx, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_connection_is_retried_within_the_spread_then_with_backoff() {
        let spread = Duration::from_secs(10);
        let mut r = Reconnect::new(spread);
        // Never connected: backoff from the start.
        let first = r.next_delay();
        assert!(
            first <= BACKOFF_MIN && first >= BACKOFF_MIN / 2,
            "{first:?}"
        );
        r.connected();
        let spread_delays: Vec<Duration> = (0..200)
            .map(|_| {
                let mut r = r.clone();
                r.next_delay()
            })
            .collect();
        assert!(spread_delays.iter().all(|d| *d <= spread));
        // Spread out, not in lockstep.
        assert!(spread_delays.iter().any(|d| *d < spread / 4));
        assert!(spread_delays.iter().any(|d| *d > spread * 3 / 4));
        let _ = r.next_delay();
        // Then backoff, doubling up to the ceiling.
        let later: Vec<Duration> = (0..10).map(|_| r.next_delay()).collect();
        assert!(later[0] <= BACKOFF_MIN);
        assert!(later[9] <= BACKOFF_MAX && later[9] >= BACKOFF_MAX / 2);
    }
}
