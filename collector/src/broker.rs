//! The embedded MQTT broker (rumqttd), listening with TLS and required client
//! certificates from the Weilan CA.
//!
//! Why rumqttd, and what it lacks (topic ACLs), is recorded in `ARCHITECTURE.md`:
//! identity and integrity do not depend on the broker, because every event batch is
//! signed by the agent's certificate key and every ack/command by the collector's.
//! Its router keeps messages in memory; segments are bounded here so a flood cannot
//! grow it without limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: {0}")]
    Start(String),
}

pub struct EmbeddedBroker {
    pub listen: SocketAddr,
}

/// Starts the broker on its own threads. Returns once the listener is bound, or the
/// error that prevented it.
pub fn start_embedded(
    listen: SocketAddr,
    max_connections: usize,
    max_payload: usize,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<EmbeddedBroker, BrokerError> {
    // Fail early and clearly when the port is taken: rumqttd would only log it.
    std::net::TcpListener::bind(listen)
        .map_err(|e| BrokerError::Start(format!("cannot listen on {listen}: {e}")))?;
    let mut v4 = HashMap::new();
    v4.insert(
        "tls".to_string(),
        ServerSettings {
            name: "weilan-tls".into(),
            listen,
            tls: Some(TlsConfig::Rustls {
                capath: Some(ca.display().to_string()),
                certpath: cert.display().to_string(),
                keypath: key.display().to_string(),
            }),
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: max_payload,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            // Per topic: at most 4 segments of 4 MiB held in memory.
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
                let _ = tx.send(e.to_string());
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    // rumqttd binds on its own thread and only logs a failure; give it a moment to
    // report one. (No probe connection: rumqttd logs every non-TLS connect as an error.)
    match rx.recv_timeout(std::time::Duration::from_millis(100)) {
        Ok(e) => Err(BrokerError::Start(e)),
        Err(_) => {
            tracing::info!(%listen, "embedded MQTT broker listening (TLS, client certificates required)");
            Ok(EmbeddedBroker { listen })
        }
    }
}
