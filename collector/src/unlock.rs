//! Signed commands to agents (with per-agent increasing sequence numbers), and
//! temporary unlock tokens.

use std::path::Path;
use std::time::Duration;

use crate::store::{CommandState, Store};

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
        let seq = send_command(
            settings,
            agent,
            CommandAction::Unlock { token: signed },
            &format!("unlock {}: {reason}", token.token_id),
            600,
        )?;
        summary.push_str(&format!("; sent as command {seq}"));
    }
    Ok(summary)
}

/// How long the command line waits for the running collector to publish a command.
const PUBLISH_WAIT: Duration = Duration::from_secs(15);

/// Signs `action` as a command for `agent` with the next sequence number and queues it
/// in the database; the running collector publishes it (see `store.rs`, migration 11,
/// for why the command line never connects as the collector). Returns the number once
/// the collector has sent it; an error naming the number when none did in time (the
/// command stays queued until it expires).
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
    let mut store =
        Store::open_at(&crate::db::Location::of(settings)).map_err(|e| e.to_string())?;
    let (seq, _) = sign_command(&mut store, &signer, agent, action, reason, valid_secs, true)
        .map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + PUBLISH_WAIT;
    loop {
        match store.command_state(agent, seq).map_err(|e| e.to_string())? {
            Some(CommandState::Sent) => return Ok(seq),
            Some(CommandState::Expired) => {
                return Err(format!("command {seq} expired before a collector sent it"))
            }
            _ if std::time::Instant::now() >= deadline => {
                return Err(format!(
                    "command {seq} is queued, but no running collector sent it within {} s \
                     (is weilan-collector running with this database?); it goes out when \
                     one starts, unless it has expired by then",
                    PUBLISH_WAIT.as_secs()
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Gives `action` for `agent` the next sequence number, signs it and records it in
/// the database (`queued` for the running collector to publish, else as sent by the
/// caller); returns the number and the MQTT payload.
pub fn sign_command(
    store: &mut Store,
    signer: &Signer,
    agent: &str,
    action: CommandAction,
    reason: &str,
    valid_secs: i64,
    queued: bool,
) -> Result<(u64, Vec<u8>), crate::store::StoreError> {
    let name = serde_json::to_value(&action)
        .ok()
        .and_then(|v| v["action"].as_str().map(str::to_string))
        .unwrap_or_default();
    let expires_at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(valid_secs.max(0));
    store.record_command(agent, &name, reason, expires_at, queued, |seq, now| {
        let command = Command {
            agent_id: agent.to_string(),
            seq,
            issued_at: now,
            expires_at,
            reason: reason.to_string(),
            action,
        };
        let body = serde_json::to_string(&command).unwrap_or_default();
        serde_json::to_vec(&signer.sign(Purpose::Command, body)).unwrap_or_default()
    })
}

/// The topic a queued command is published on.
pub fn command_topic(agent: &str) -> String {
    topics::agent_topic(agent, Channel::Commands)
}
