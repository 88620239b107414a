//! The command gate: every collector → agent command is authenticated, bound to this
//! agent, fresh, and never executed twice, before anything acts on it.
//!
//! Checks, in order: signature by a collector certificate of the pinned CA (purpose
//! `command`), addressee, expiry, and a sequence number above every one seen before
//! (persisted, synced, before execution: a replay after a restart is refused too).
//! Every command — executed or refused — yields a `command.result` event.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weilan_config::event::{CommandResult, Event};
use weilan_config::policy::usb::Target;
use weilan_config::signing::{Role, Verifier};
use weilan_config::wire::{self, Command, CommandAction, Purpose};

use crate::fence::FenceControl;
use crate::source::EventSink;

pub struct CommandGate {
    pub agent_id: String,
    pub verifier: Arc<Verifier>,
    /// `state_dir/command-seq`: the highest sequence number accepted.
    pub seq_file: PathBuf,
    pub sink: EventSink,
    pub fence: Option<mpsc::Sender<FenceControl>>,
    pub policy_version: Arc<crate::stats::AgentStats>,
    /// The policy in force (the evidence store for `quarantine-file`).
    pub policy: tokio::sync::watch::Receiver<Arc<weilan_config::policy::Policy>>,
}

fn action_name(a: &CommandAction) -> &'static str {
    match a {
        CommandAction::BlockDevice { .. } => "block-device",
        CommandAction::SetDeviceReadOnly { .. } => "set-device-read-only",
        CommandAction::QuarantineFile { .. } => "quarantine-file",
        CommandAction::KillProcess { .. } => "kill-process",
        CommandAction::RequestInventory => "request-inventory",
        CommandAction::UpdatePolicy { .. } => "update-policy",
        CommandAction::Unlock { .. } => "unlock",
    }
}

impl CommandGate {
    fn last_seq(&self) -> u64 {
        std::fs::read_to_string(&self.seq_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn store_seq(&self, seq: u64) -> std::io::Result<()> {
        crate::state::replace_file(&self.seq_file, format!("{seq}\n").as_bytes(), 0o600)
    }

    pub async fn run(self, mut rx: mpsc::Receiver<Vec<u8>>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                p = rx.recv() => match p {
                    Some(payload) => {
                        let result = self.handle(&payload).await;
                        match result.status.as_str() {
                            "executed" => tracing::info!(seq = ?result.seq, action = ?result.action, "command executed"),
                            _ => tracing::warn!(seq = ?result.seq, action = ?result.action, status = %result.status, detail = %result.detail, "command not executed"),
                        }
                        let _ = self.sink.emit(Event::CommandResult(result)).await;
                    }
                    None => return,
                },
            }
        }
    }

    async fn handle(&self, payload: &[u8]) -> CommandResult {
        let rejected = |seq, action: Option<&str>, detail: String| CommandResult {
            seq,
            action: action.map(str::to_string),
            status: "rejected".into(),
            detail,
        };
        let msg = match wire::decode_signed(payload, 256 * 1024) {
            Ok(m) => m,
            Err(e) => return rejected(None, None, e.to_string()),
        };
        // What the command claims, for the record even if it is refused.
        let claimed: Option<Command> = serde_json::from_str(&msg.body).ok();
        let (cseq, cact) = (
            claimed.as_ref().map(|c| c.seq),
            claimed.as_ref().map(|c| action_name(&c.action)),
        );
        if let Err(e) = self
            .verifier
            .verify(&msg, Purpose::Command, Role::Collector)
        {
            return rejected(cseq, cact, format!("signature: {e}"));
        }
        let cmd: Command = match wire::decode("a command", msg.body.as_bytes(), 256 * 1024) {
            Ok(c) => c,
            Err(e) => return rejected(None, None, e.to_string()),
        };
        let action = action_name(&cmd.action);
        if cmd.agent_id != self.agent_id {
            return rejected(
                Some(cmd.seq),
                Some(action),
                format!("addressed to agent `{}`", cmd.agent_id),
            );
        }
        if cmd.expires_at <= jiff::Timestamp::now() {
            return rejected(
                Some(cmd.seq),
                Some(action),
                format!("expired at {}", cmd.expires_at),
            );
        }
        let last = self.last_seq();
        if cmd.seq <= last {
            return rejected(
                Some(cmd.seq),
                Some(action),
                format!("replayed: sequence {} is not above {last}", cmd.seq),
            );
        }
        if let Err(e) = self.store_seq(cmd.seq) {
            return rejected(
                Some(cmd.seq),
                Some(action),
                format!("cannot record the sequence number: {e}"),
            );
        }
        self.execute(cmd, action).await
    }

    /// Carries out a command that passed every check; its result.
    async fn execute(&self, cmd: Command, action: &'static str) -> CommandResult {
        let done = |detail: String| CommandResult {
            seq: Some(cmd.seq),
            action: Some(action.to_string()),
            status: "executed".into(),
            detail,
        };
        let to_fence = |c: FenceControl| async {
            match &self.fence {
                Some(f) => f
                    .send(c)
                    .await
                    .map_err(|_| "the USB fence is not running".to_string()),
                None => Err("the USB fence is off on this agent".to_string()),
            }
        };
        let outcome = match cmd.action {
            CommandAction::BlockDevice { device_hash } => to_fence(FenceControl::Override {
                device_hash: device_hash.to_ascii_lowercase(),
                target: Target::Block,
                rule_id: format!("command:{}", cmd.seq),
                reason: cmd.reason.clone(),
            })
            .await
            .map(|()| {
                done(format!(
                    "device {device_hash} blocked until the policy says otherwise"
                ))
            }),
            CommandAction::SetDeviceReadOnly { device_hash } => to_fence(FenceControl::Override {
                device_hash: device_hash.to_ascii_lowercase(),
                target: Target::ReadOnly,
                rule_id: format!("command:{}", cmd.seq),
                reason: cmd.reason.clone(),
            })
            .await
            .map(|()| done(format!("device {device_hash} set read-only"))),
            CommandAction::Unlock { token } => to_fence(FenceControl::Unlock(token))
                .await
                .map(|()| done("token handed to the USB fence (see usb.unlock)".into())),
            CommandAction::QuarantineFile { path, sha256 } => {
                let evidence = self.policy.borrow().files.evidence_dir.clone();
                let about = serde_json::json!({
                    "original_path": path,
                    "command_seq": cmd.seq,
                    "reason": cmd.reason,
                });
                let target = path.clone();
                tokio::task::spawn_blocking(move || {
                    crate::guard::files::linux::quarantine(
                        std::path::Path::new(&target),
                        &evidence,
                        about,
                        Some(&sha256),
                    )
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map(|(kept, _)| {
                    done(format!(
                        "{path} moved into the evidence store as {}",
                        kept.display()
                    ))
                })
            }
            CommandAction::KillProcess { pid, exe } => {
                tokio::task::spawn_blocking(move || crate::procinfo::terminate(pid, &exe))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                    .map(done)
            }
            CommandAction::RequestInventory => {
                let inv =
                    crate::source::host::inventory(Some(self.policy_version.policy_version()));
                let _ = self.sink.emit(Event::AgentStarted(inv)).await;
                Ok(done("inventory reported as agent.started".into()))
            }
            other @ CommandAction::UpdatePolicy { .. } => {
                return CommandResult {
                    seq: Some(cmd.seq),
                    action: Some(action_name(&other).to_string()),
                    status: "unsupported".into(),
                    detail: "this agent version does not execute this action".into(),
                }
            }
        };
        outcome.unwrap_or_else(|e| CommandResult {
            seq: Some(cmd.seq),
            action: Some(action.to_string()),
            status: "rejected".into(),
            detail: e,
        })
    }
}
