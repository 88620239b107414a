//! Certificate renewal. At two thirds of its certificate's lifetime the agent makes a
//! new key, asks the collector's enrollment port for a certificate (authenticated by
//! the current one: `enroll::renew`), keeps the pair in `state_dir/identity/` (key
//! 0600) and hands it to the uplink, which reconnects and signs with it from then on;
//! events wait in the journal meanwhile, so nothing is lost. A failed attempt is logged
//! and retried (10 s, doubling to 1 h). At start the renewed pair is used when it is
//! for the same agent and lasts longer than the configured one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weilan_config::signing::Signer;

/// The first retry after a failed renewal; then doubling, up to an hour.
const RETRY_FIRST: Duration = Duration::from_secs(10);

/// A certificate and its key on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The new identity the uplink switches to.
pub struct Switch {
    pub tls: Arc<rustls::ClientConfig>,
    pub signer: Signer,
}

pub struct RenewalConfig {
    pub agent_id: String,
    /// `host:port` of the collector's enrollment listener.
    pub collector: String,
    pub server_name: String,
    pub ca: PathBuf,
    pub state_dir: PathBuf,
}

/// Where a renewed identity is kept.
pub fn renewed(state_dir: &Path) -> Identity {
    let dir = state_dir.join("identity");
    Identity {
        cert: dir.join("agent.pem"),
        key: dir.join("agent-key.pem"),
    }
}

/// (not before, not after) of the first certificate in a PEM file.
fn validity(cert: &Path) -> Option<(i64, i64)> {
    let der = weilan_config::pem::load_cert(cert).ok()?;
    weilan_config::signing::validity(&der).ok()
}

/// The identity to use: the renewed one when it is for `agent_id` and ends later
/// than the configured one, else the configured one.
pub fn in_force(configured: Identity, state_dir: &Path, agent_id: &str) -> Identity {
    let renewed = renewed(state_dir);
    let usable = Signer::from_pem_files(&renewed.cert, &renewed.key)
        .is_ok_and(|s| s.identity().common_name == agent_id);
    match (usable, validity(&renewed.cert), validity(&configured.cert)) {
        (true, Some((_, new_end)), Some((_, old_end))) if new_end > old_end => renewed,
        _ => configured,
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed: at two
/// thirds of its lifetime.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 2 / 3
}

/// Renews `current` when its time comes, then the renewed one when its time comes,
/// until `shutdown`. Each renewal is sent to the uplink through `switch`.
pub async fn run(
    cfg: RenewalConfig,
    mut current: Identity,
    switch: mpsc::Sender<Switch>,
    shutdown: CancellationToken,
) {
    let mut backoff = RETRY_FIRST;
    loop {
        let Some((not_before, not_after)) = validity(&current.cert) else {
            tracing::error!(cert = %current.cert.display(), "certificate unreadable; no renewal");
            return;
        };
        let due = renew_at(not_before, not_after);
        let now = jiff::Timestamp::now().as_second();
        if due > now {
            tracing::info!(
                renew_at = %jiff::Timestamp::from_second(due).map(|t| t.to_string()).unwrap_or_default(),
                "certificate renewal scheduled"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs((due - now) as u64)) => {}
            }
        }
        let attempt = {
            let (collector, ca, id) = (cfg.collector.clone(), cfg.ca.clone(), cfg.agent_id.clone());
            let cur = current.clone();
            tokio::task::spawn_blocking(move || {
                crate::enroll::renew(&collector, &ca, &cur.cert, &cur.key, &id)
            })
            .await
        };
        let renewed_id = match attempt {
            Ok(Ok(r)) => store(&cfg, &r).map(|id| (id, r.not_after)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match renewed_id.and_then(|(id, end)| switch_to(&cfg, &id).map(|s| (id, s, end))) {
            Ok((id, s, end)) => {
                tracing::info!(
                    not_after = %jiff::Timestamp::from_second(end).map(|t| t.to_string()).unwrap_or_default(),
                    cert = %id.cert.display(),
                    "certificate renewed"
                );
                if switch.send(s).await.is_err() {
                    return;
                }
                current = id;
                backoff = RETRY_FIRST;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_secs = backoff.as_secs(), "certificate renewal failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(3600));
            }
        }
    }
}

/// Writes the renewed pair (key first, 0600; each replaced atomically).
fn store(cfg: &RenewalConfig, r: &crate::enroll::Renewed) -> Result<Identity, String> {
    let id = renewed(&cfg.state_dir);
    if let Some(dir) = id.cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    crate::state::replace_file(&id.key, r.key_pem.as_bytes(), 0o600)
        .map_err(|e| format!("{}: {e}", id.key.display()))?;
    crate::state::replace_file(&id.cert, r.cert_pem.as_bytes(), 0o644)
        .map_err(|e| format!("{}: {e}", id.cert.display()))?;
    Ok(id)
}

fn switch_to(cfg: &RenewalConfig, id: &Identity) -> Result<Switch, String> {
    let tls = weilan_config::tls::client_config(&cfg.ca, &id.cert, &id.key, &cfg.server_name)
        .map_err(|e| e.to_string())?;
    let signer = Signer::from_pem_files(&id.cert, &id.key).map_err(|e| e.to_string())?;
    Ok(Switch { tls, signer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_two_thirds_of_the_lifetime() {
        assert_eq!(renew_at(0, 3600), 2400);
        assert_eq!(renew_at(1_000, 1_000 + 825 * 86_400), 1_000 + 550 * 86_400);
    }

    #[test]
    fn the_configured_identity_is_used_until_a_longer_renewed_one_exists() {
        let dir = tempfile::tempdir().unwrap();
        let configured = Identity {
            cert: dir.path().join("missing.pem"),
            key: dir.path().join("missing-key.pem"),
        };
        assert_eq!(in_force(configured.clone(), dir.path(), "ws-1"), configured);
    }
}
