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
    /// Capacity of the channel to the consumer.
    pub incoming_capacity: usize,
    /// Topic filters to (re)subscribe after every connect.
    pub subscriptions: Vec<String>,
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
    eventloop.set_network_options(network);
    let (tx, rx) = mpsc::channel(cfg.incoming_capacity);
    let sub_client = client.clone();
    let handle = tokio::spawn(async move {
        let mut backoff = BACKOFF_MIN;
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = eventloop.poll() => ev,
            };
            let forward = match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = BACKOFF_MIN;
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
                    tracing::warn!(host = %cfg.host, port = cfg.port, error = %reason, retry_in_ms = backoff.as_millis() as u64, "MQTT connection failed");
                    if tx.send(SessionEvent::Disconnected(reason)).await.is_err() {
                        break;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
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
