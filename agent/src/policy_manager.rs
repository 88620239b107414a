//! Which fence policy is in force, and changing it safely.
//!
//! At start the agent enforces the last policy the collector pushed and it accepted
//! (`state_dir/policy-last-good.toml`), else the policy file named in its settings —
//! so it keeps enforcing the organisation's latest policy while the collector is
//! unreachable. A pushed policy (signed by the collector, verified by the uplink) is
//! validated in full; only a valid one replaces the policy in force, is persisted as
//! the last good one and reported as `policy.applied`. An invalid one is reported as
//! `policy.rejected` with every error, and changes nothing.
//!
//! Pushes are ordered: each carries the collector's release serial and the SHA-256
//! of its text. A push whose serial is not above the one in force is refused and
//! reported — a replayed old policy (anyone who recorded a signed push could otherwise
//! roll every agent back) — unless it is the release in force itself (the retained
//! message seen again after a reconnect). The serial in force survives restarts in
//! `state_dir/policy-last-good.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use weilan_config::event::{Event, PolicyApplied, PolicyRejected};
use weilan_config::policy::Policy;
use weilan_config::wire::{self, PolicyPush};

use crate::fence::FenceControl;
use crate::source::EventSink;
use crate::stats::AgentStats;

const LAST_GOOD: &str = "policy-last-good.toml";
const LAST_GOOD_RELEASE: &str = "policy-last-good.json";

/// Which collector release is in force: serial and text digest (serial 0: the
/// settings' own file, before any push).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Release {
    pub serial: u64,
    pub sha256: String,
}

/// The policy to start with, where it came from (`collector` or `file`), and its
/// release.
pub fn initial(
    state_dir: &Path,
    file: &Path,
) -> Result<(Policy, &'static str, Release), weilan_config::ConfigErrors> {
    let last_good = state_dir.join(LAST_GOOD);
    if last_good.exists() {
        match weilan_config::load_file::<weilan_config::policy::PolicyFile>(&last_good) {
            Ok(p) => {
                let release = std::fs::read(state_dir.join(LAST_GOOD_RELEASE))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                return Ok((p, "collector", release));
            }
            Err(e) => {
                tracing::error!(error = %e, "last good policy unreadable; using the settings' policy file")
            }
        }
    }
    weilan_config::load_file::<weilan_config::policy::PolicyFile>(file)
        .map(|p| (p, "file", Release::default()))
}

pub struct PolicyManager {
    pub state_dir: PathBuf,
    pub current: String,
    /// The release in force; pushes at or below it are refused.
    pub release: Release,
    /// The last push refused, so that a retained replay seen again at every reconnect
    /// is reported once per run, not once per reconnect.
    pub last_refused: Option<Release>,
    pub fence: Option<mpsc::Sender<FenceControl>>,
    /// Where the sources that follow the policy (files) watch it.
    pub policy_watch: watch::Sender<Arc<Policy>>,
    pub sink: EventSink,
    pub stats: Arc<AgentStats>,
}

impl PolicyManager {
    /// Handles verified policy bodies from the collector until shutdown.
    pub async fn run(mut self, mut pushes: mpsc::Receiver<String>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                body = pushes.recv() => match body {
                    Some(b) => self.handle(&b).await,
                    None => return,
                },
            }
        }
    }

    async fn handle(&mut self, body: &str) {
        let push: PolicyPush = match wire::decode("a policy push", body.as_bytes(), 4 * 1024 * 1024)
        {
            Ok(p) => p,
            Err(e) => {
                self.reject(None, vec![e.to_string()]).await;
                return;
            }
        };
        let pushed = Release {
            serial: push.serial,
            sha256: PolicyPush::digest(&push.policy_toml),
        };
        if pushed == self.release {
            return; // the retained message, seen again after a reconnect
        }
        if self.last_refused.as_ref() == Some(&pushed) {
            return; // refused and reported already
        }
        if !push.sha256.is_empty() && push.sha256 != pushed.sha256 {
            let detail = format!(
                "the policy text does not match its digest {} (it is {})",
                push.sha256, pushed.sha256
            );
            self.refuse(&push, pushed, detail).await;
            return;
        }
        if push.serial <= self.release.serial {
            let detail = format!(
                "replayed or rolled-back policy: release {} ({}) is not above release {} in force ({})",
                push.serial, push.version, self.release.serial, self.current
            );
            self.refuse(&push, pushed, detail).await;
            return;
        }
        let name = format!("collector policy {}", push.version);
        match weilan_config::policy::parse(&push.policy_toml, &name) {
            Ok(p) if p.version != push.version => {
                self.reject(
                    Some(push.version.clone()),
                    vec![format!("the body says version `{}`", p.version)],
                )
                .await;
            }
            Ok(p) => {
                let release_json = serde_json::to_string(&pushed).unwrap_or_default();
                if let Err(e) = persist(&self.state_dir.join(LAST_GOOD), &push.policy_toml)
                    .and_then(|()| persist(&self.state_dir.join(LAST_GOOD_RELEASE), &release_json))
                {
                    tracing::error!(error = %e, "could not keep the new policy on disk; enforcing it anyway");
                }
                self.release = pushed.clone();
                let previous = std::mem::replace(&mut self.current, p.version.clone());
                self.stats.set_policy_version(&p.version);
                tracing::info!(version = %p.version, %previous, "policy from the collector applied");
                let p = Arc::new(p);
                self.policy_watch.send_replace(p.clone());
                if let Some(f) = &self.fence {
                    let _ = f.send(FenceControl::Policy(p)).await;
                }
                let _ = self
                    .sink
                    .emit(Event::PolicyApplied(PolicyApplied {
                        version: self.current.clone(),
                        previous: Some(previous),
                        source: "collector".into(),
                        serial: Some(pushed.serial),
                        sha256: Some(pushed.sha256),
                    }))
                    .await;
            }
            Err(errors) => {
                let list = errors
                    .to_string()
                    .lines()
                    .skip(1)
                    .map(|l| l.trim().to_string())
                    .collect();
                self.reject(Some(push.version), list).await;
            }
        }
    }

    /// Refuses an out-of-order push (reported once per distinct push).
    async fn refuse(&mut self, push: &PolicyPush, pushed: Release, detail: String) {
        self.last_refused = Some(pushed);
        self.reject(Some(push.version.clone()), vec![detail]).await;
    }

    async fn reject(&self, version: Option<String>, errors: Vec<String>) {
        tracing::error!(?version, errors = errors.len(), kept = %self.current, "policy from the collector refused");
        let _ = self
            .sink
            .emit(Event::PolicyRejected(PolicyRejected {
                version,
                source: "collector".into(),
                errors,
                kept: self.current.clone(),
            }))
            .await;
    }
}

fn persist(path: &Path, text: &str) -> std::io::Result<()> {
    crate::state::replace_file(path, text.as_bytes(), 0o600)
}
