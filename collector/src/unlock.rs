//! Signed commands to agents (with per-agent increasing sequence numbers), and
//! temporary unlock tokens.

use std::path::Path;
use std::time::Duration;

use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use weilan_config::mqtt::{self, SessionConfig, SessionEvent};
use weilan_config::settings::collector::CollectorSettings;
use weilan_config::signing::Signer;
use weilan_config::topics::{self, Channel};
use weilan_config::wire::{Command, CommandAction, Purpose, UnlockToken};

/// Issues a token; writes it to `out`, sends it when `send`; returns a summary.
#[allow(clippy::too_many_arguments)]
pub fn issue(
    settings: &CollectorSettings,
    agent: &str,
    hash: Option<String>,
    serial: Option<String>,
    vid_pid: Option<String>,
    mode: &str,
    valid_secs: u64,
    reason: &str,
    out: Option<&Path>,
    send: bool,
) -> Result<String, String> {
    if !weilan_config::topics::valid_agent_id(agent) {
        return Err(format!("`{agent}` is not an agent id"));
    }
    if hash.is_none() && serial.is_none() {
        return Err("name the device: --hash, or --serial with --vid-pid".into());
    }
    if hash.is_none() && vid_pid.is_none() {
        return Err("a serial alone is not a device's identity (a clone with another vid:pid would be unlocked): give --vid-pid with --serial, or --hash".into());
    }
    let vid_pid = vid_pid.map(|v| v.to_ascii_lowercase());
    if let Some(vp) = &vid_pid {
        let ok = vp.split_once(':').is_some_and(|(v, p)| {
            [v, p]
                .iter()
                .all(|x| x.len() == 4 && x.chars().all(|c| c.is_ascii_hexdigit()))
        });
        if !ok {
            return Err(format!("--vid-pid `{vp}` is not VVVV:PPPP (hex)"));
        }
    }
    if !matches!(mode, "allow" | "read-only") {
        return Err(format!("--mode `{mode}` is not allow or read-only"));
    }
    if out.is_none() && !send {
        return Err("give --out FILE and/or --send".into());
    }
    let signer = Signer::from_pem_files(&settings.client_cert, &settings.client_key)
        .map_err(|e| e.to_string())?;
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| "no randomness")?;
    let now = jiff::Timestamp::now();
    let token = UnlockToken {
        token_id: hex::encode(id),
        agent_id: agent.to_string(),
        device_hash: hash.map(|h| h.to_ascii_lowercase()),
        serial,
        vid_pid,
        mode: mode.to_string(),
        not_before: now,
        not_after: now + jiff::SignedDuration::from_secs(valid_secs as i64),
        reason: reason.to_string(),
    };
    let body = serde_json::to_string(&token).map_err(|e| e.to_string())?;
    let signed = signer.sign(Purpose::Unlock, body);
    let mut summary = format!(
        "token {} for agent {agent}: {mode} until {}",
        token.token_id, token.not_after
    );
    if let Some(path) = out {
        let bytes = serde_json::to_vec_pretty(&signed).map_err(|e| e.to_string())?;
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        summary.push_str(&format!("; written to {}", path.display()));
    }
    if send {
        let command = Command {
            agent_id: agent.to_string(),
            seq: now.as_millisecond() as u64,
            issued_at: now,
            expires_at: now + jiff::SignedDuration::from_secs(600),
            reason: format!("unlock {}: {reason}", token.token_id),
            action: CommandAction::Unlock { token: signed },
        };
        let body = serde_json::to_string(&command).map_err(|e| e.to_string())?;
        let payload =
            serde_json::to_vec(&signer.sign(Purpose::Command, body)).map_err(|e| e.to_string())?;
        send_once(
            settings,
            &topics::agent_topic(agent, Channel::Commands),
            payload,
        )?;
        summary.push_str("; sent");
    }
    Ok(summary)
}

/// Signs `action` as a command for `agent` with the next sequence number, sends it,
/// and returns the number.
pub fn send_command(
    settings: &CollectorSettings,
    agent: &str,
    action: CommandAction,
    reason: &str,
    valid_secs: i64,
) -> Result<u64, String> {
    if !weilan_config::topics::valid_agent_id(agent) {
        return Err(format!("`{agent}` is not an agent id"));
    }
    let signer = Signer::from_pem_files(&settings.client_cert, &settings.client_key)
        .map_err(|e| e.to_string())?;
    let mut store = crate::store::Store::open(&settings.store_path).map_err(|e| e.to_string())?;
    let (seq, payload) = sign_command(&mut store, &signer, agent, action, reason, valid_secs)
        .map_err(|e| e.to_string())?;
    send_once(
        settings,
        &topics::agent_topic(agent, Channel::Commands),
        payload,
    )?;
    Ok(seq)
}

/// Gives `action` for `agent` the next sequence number (recorded in the database)
/// and signs it; returns the number and the MQTT payload.
pub fn sign_command(
    store: &mut crate::store::Store,
    signer: &Signer,
    agent: &str,
    action: CommandAction,
    reason: &str,
    valid_secs: i64,
) -> Result<(u64, Vec<u8>), crate::store::StoreError> {
    let name = serde_json::to_value(&action)
        .ok()
        .and_then(|v| v["action"].as_str().map(str::to_string))
        .unwrap_or_default();
    let seq = store.next_command_seq(agent, &name, reason)?;
    let now = jiff::Timestamp::now();
    let command = Command {
        agent_id: agent.to_string(),
        seq,
        issued_at: now,
        expires_at: now + jiff::SignedDuration::from_secs(valid_secs),
        reason: reason.to_string(),
        action,
    };
    let body = serde_json::to_string(&command).unwrap_or_default();
    let payload = serde_json::to_vec(&signer.sign(Purpose::Command, body)).unwrap_or_default();
    Ok((seq, payload))
}

fn send_once(settings: &CollectorSettings, topic: &str, payload: Vec<u8>) -> Result<(), String> {
    let tls = weilan_config::tls::client_config(
        &settings.ca,
        &settings.client_cert,
        &settings.client_key,
        &settings.server_name,
    )
    .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let stop = CancellationToken::new();
        let (client, mut rx, task) = mqtt::spawn(
            SessionConfig {
                client_id: format!("{}-cli-{}", settings.client_id, std::process::id()),
                host: settings.broker_host.clone(),
                port: settings.broker_port,
                tls,
                keep_alive: Duration::from_secs(10),
                last_will: None,
                max_packet: 1 << 20,
                request_capacity: 8,
                max_inflight: 8,
                incoming_capacity: 8,
                subscriptions: vec![],
                reconnect_spread: Duration::ZERO,
            },
            stop.clone(),
        );
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(ev) = rx.recv().await {
                if matches!(ev, SessionEvent::Connected) {
                    return true;
                }
            }
            false
        })
        .await;
        if connected != Ok(true) {
            stop.cancel();
            let _ = task.await;
            return Err(format!(
                "could not reach the broker at {}:{}",
                settings.broker_host, settings.broker_port
            ));
        }
        client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| e.to_string())?;
        // Let the publish go out before the orderly disconnect.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
        let _ = task.await;
        Ok(())
    })
}
