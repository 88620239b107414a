//! The USB fence: decides every device against the policy and enforces the verdict
//! locally — instantly and offline.
//!
//! The USB source reports facts ([`FenceFact`]); the fence asks the policy
//! ([`weilan_config::policy::usb::UsbPolicy::evaluate`], pure) and acts through a
//! [`UsbEnforcer`] (sysfs on Linux, a recorder in unit tests). Every decision, and every
//! enforcement action taken later (read-only block devices, remounts), is a
//! `usb.decision` event naming its rule and whether enforcing it worked.
//!
//! In `enforce` mode the fence first sets `authorized_default = 0` on every root hub
//! (default-deny): new devices come in unauthorized, no driver binds before the policy
//! has decided, and if the agent dies they stay that way (fail closed).

pub mod linux;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weilan_config::event::{Event, UsbDecision, UsbDevice, Volume};
use weilan_config::policy::usb::{is_root_hub, Context, Target, Verdict};
use weilan_config::policy::Policy;

use crate::source::usb::sysfs::Sysfs;
use crate::source::EventSink;

/// What the USB source tells the fence.
#[derive(Debug, Clone)]
pub enum FenceFact {
    /// A device appeared (hot-plug) or was found at start.
    Attached {
        dir: PathBuf,
        device: UsbDevice,
        at_start: bool,
        /// When the uevent reached the agent (hot-plug only), for the decision latency.
        seen: Option<std::time::Instant>,
    },
    Detached {
        dir: PathBuf,
    },
    /// A disk or partition of a USB device appeared.
    BlockAdded {
        usb_dir: PathBuf,
        block: String,
    },
    /// A volume of a USB device was mounted.
    Mounted {
        usb_dir: PathBuf,
        volume: Volume,
    },
}

/// Changes from outside the USB source.
#[derive(Debug, Clone)]
pub enum FenceControl {
    /// A new validated policy is in force.
    Policy(Arc<Policy>),
}

/// The kernel side of enforcement.
pub trait UsbEnforcer: Send + Sync {
    fn set_authorized_default(&mut self, hub_dir: &Path, allow: bool) -> Result<(), String>;
    fn authorize(&mut self, dev_dir: &Path, allow: bool) -> Result<(), String>;
    fn remove(&mut self, dev_dir: &Path) -> Result<(), String>;
    fn set_read_only(&mut self, block: &str) -> Result<(), String>;
    fn remount_read_only(&mut self, mount_point: &str) -> Result<(), String>;
}

struct Tracked {
    device: UsbDevice,
    verdict: Verdict,
    /// Whether the verdict was applied (false for `keep` at start and in audit mode).
    applied: bool,
}

pub struct Fence {
    policy: Arc<Policy>,
    host_groups: Vec<String>,
    sysfs: Sysfs,
    enforcer: Box<dyn UsbEnforcer>,
    sink: EventSink,
    devices: HashMap<PathBuf, Tracked>,
    /// How often verdicts are re-evaluated (time windows).
    recheck: Duration,
}

impl Fence {
    pub fn new(
        policy: Arc<Policy>,
        host_groups: Vec<String>,
        sysfs_root: &Path,
        enforcer: Box<dyn UsbEnforcer>,
        sink: EventSink,
    ) -> Self {
        let root = std::fs::canonicalize(sysfs_root).unwrap_or(sysfs_root.to_path_buf());
        Fence {
            policy,
            host_groups,
            sysfs: Sysfs::new(root),
            enforcer,
            sink,
            devices: HashMap::new(),
            recheck: Duration::from_secs(30),
        }
    }

    fn mode(&self) -> &'static str {
        if self.policy.usb.enforce {
            "enforce"
        } else {
            "audit"
        }
    }

    /// Default-deny on every root hub present (enforce mode).
    pub fn start(&mut self) {
        if !self.policy.usb.enforce {
            tracing::info!("USB fence in audit mode: decisions are reported, nothing is enforced");
            return;
        }
        let hubs = self.sysfs.usb_device_dirs().unwrap_or_default();
        for dir in hubs.iter().filter(|d| is_root_hub_dir(d)) {
            self.deny_by_default(dir);
        }
    }

    fn deny_by_default(&mut self, hub: &Path) {
        match self.enforcer.set_authorized_default(hub, false) {
            Ok(()) => {
                tracing::info!(hub = %hub.display(), "default-deny: new devices on this bus start unauthorized")
            }
            Err(e) => {
                tracing::error!(hub = %hub.display(), error = %e, "could not set default-deny on a root hub")
            }
        }
    }

    /// Runs until shutdown; facts and control messages are handled in order.
    pub async fn run(
        mut self,
        mut facts: mpsc::Receiver<FenceFact>,
        mut control: mpsc::Receiver<FenceControl>,
        shutdown: CancellationToken,
    ) {
        self.start();
        let mut tick = tokio::time::interval(self.recheck);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                f = facts.recv() => match f {
                    Some(f) => self.on_fact(f).await,
                    None => return,
                },
                c = control.recv() => match c {
                    Some(FenceControl::Policy(p)) => {
                        self.policy = p;
                        self.reevaluate("policy-change").await;
                    }
                    None => {}
                },
                _ = tick.tick() => self.reevaluate("time-window").await,
            }
        }
    }

    async fn emit(&self, decision: UsbDecision) {
        if !decision.enforced && decision.error.is_some() {
            tracing::error!(port = %decision.port_path, rule = %decision.rule_id, error = ?decision.error, "USB enforcement failed");
        } else {
            tracing::info!(port = %decision.port_path, target = %decision.target, rule = %decision.rule_id, trigger = %decision.trigger, "USB decision");
        }
        let _ = self.sink.emit(Event::UsbDecision(decision)).await;
    }

    pub async fn on_fact(&mut self, fact: FenceFact) {
        match fact {
            FenceFact::Attached {
                dir,
                device,
                at_start,
                seen,
            } => {
                if is_root_hub(&device) {
                    // Root hubs are never touched; a new one (a host controller
                    // appearing) gets default-deny like the others.
                    if self.policy.usb.enforce && !at_start {
                        self.deny_by_default(&dir);
                    }
                    return;
                }
                let trigger = if at_start { "start" } else { "attach" };
                let keep = at_start && !self.policy.usb.apply_at_start;
                let mut d = self.decide(&dir, device, trigger, !keep);
                d.latency_us = seen.map(|s| s.elapsed().as_micros() as u64);
                self.emit(d).await;
            }
            FenceFact::Detached { dir } => {
                self.devices.remove(&dir);
            }
            FenceFact::BlockAdded { usb_dir, block } => {
                let Some(t) = self.devices.get(&usb_dir) else {
                    return;
                };
                if t.verdict.target == Target::ReadOnly && t.applied && self.policy.usb.enforce {
                    let (device, verdict) = (t.device.clone(), t.verdict.clone());
                    let (actions, error) = self.read_only_block(&block);
                    let d = self.decision(&device, &verdict, "block-device", actions, error, true);
                    self.emit(d).await;
                }
            }
            FenceFact::Mounted { usb_dir, volume } => {
                let Some(t) = self.devices.get(&usb_dir) else {
                    return;
                };
                if t.verdict.target == Target::ReadOnly
                    && t.applied
                    && self.policy.usb.enforce
                    && !volume.read_only
                {
                    let (device, verdict) = (t.device.clone(), t.verdict.clone());
                    let mut actions = Vec::new();
                    let mut error = None;
                    // The block device first (in case the mount raced us), then the mount.
                    let (a, e) = self.read_only_block(&volume.block_device);
                    actions.extend(a);
                    error = error.or(e);
                    match self.enforcer.remount_read_only(&volume.mount_point) {
                        Ok(()) => actions.push(format!("remount {} read-only", volume.mount_point)),
                        Err(e) => error = Some(e),
                    }
                    let d = self.decision(&device, &verdict, "mount", actions, error, true);
                    self.emit(d).await;
                }
            }
        }
    }

    fn read_only_block(&mut self, block: &str) -> (Vec<String>, Option<String>) {
        match self.enforcer.set_read_only(block) {
            Ok(()) => (vec![format!("BLKROSET {block}")], None),
            Err(e) => (Vec::new(), Some(e)),
        }
    }

    /// Re-decides every tracked device; enforces and reports the ones that changed.
    async fn reevaluate(&mut self, trigger: &str) {
        let dirs: Vec<PathBuf> = self.devices.keys().cloned().collect();
        for dir in dirs {
            let Some(t) = self.devices.get(&dir) else {
                continue;
            };
            let verdict = self.policy.usb.evaluate(&t.device, &self.context());
            if verdict == t.verdict && t.applied == self.policy.usb.enforce {
                continue;
            }
            let device = t.device.clone();
            let d = self.decide(&dir, device, trigger, true);
            self.emit(d).await;
        }
    }

    fn context(&self) -> Context<'_> {
        Context {
            host_groups: &self.host_groups,
            now: jiff::Timestamp::now(),
        }
    }

    /// Decides, enforces (when `apply` and in enforce mode) and remembers.
    fn decide(&mut self, dir: &Path, device: UsbDevice, trigger: &str, apply: bool) -> UsbDecision {
        let verdict = self.policy.usb.evaluate(&device, &self.context());
        let enforce = apply && self.policy.usb.enforce;
        let (actions, error) = if enforce {
            self.enforce(dir, &device, verdict.target)
        } else if !apply {
            (
                vec!["kept as found (present_at_start = keep)".to_string()],
                None,
            )
        } else {
            (Vec::new(), None)
        };
        let d = self.decision(&device, &verdict, trigger, actions, error, enforce);
        self.devices.insert(
            dir.to_path_buf(),
            Tracked {
                device,
                verdict,
                applied: enforce,
            },
        );
        d
    }

    fn enforce(
        &mut self,
        dir: &Path,
        device: &UsbDevice,
        target: Target,
    ) -> (Vec<String>, Option<String>) {
        let mut actions = Vec::new();
        let step =
            |r: Result<(), String>, what: &str, actions: &mut Vec<String>| -> Option<String> {
                match r {
                    Ok(()) => {
                        actions.push(what.to_string());
                        None
                    }
                    Err(e) => Some(e),
                }
            };
        let error = match target {
            Target::Allow => step(
                self.enforcer.authorize(dir, true),
                "authorized=1",
                &mut actions,
            ),
            Target::Block => step(
                self.enforcer.authorize(dir, false),
                "authorized=0",
                &mut actions,
            ),
            Target::Reject => step(
                self.enforcer.authorize(dir, false),
                "authorized=0",
                &mut actions,
            )
            .or_else(|| step(self.enforcer.remove(dir), "remove=1", &mut actions)),
            Target::ReadOnly => {
                let mut err = step(
                    self.enforcer.authorize(dir, true),
                    "authorized=1",
                    &mut actions,
                );
                // Block devices already there (an allowed device turned read-only):
                // flag them now; new ones are flagged as they appear.
                for disk in &device.block_devices {
                    for name in
                        std::iter::once(&disk.name).chain(disk.partitions.iter().map(|p| &p.name))
                    {
                        if let Some(e) = step(
                            self.enforcer.set_read_only(name),
                            &format!("BLKROSET {name}"),
                            &mut actions,
                        ) {
                            err = err.or(Some(e));
                        }
                    }
                }
                err
            }
        };
        (actions, error)
    }

    fn decision(
        &self,
        device: &UsbDevice,
        verdict: &Verdict,
        trigger: &str,
        actions: Vec<String>,
        error: Option<String>,
        enforced_mode: bool,
    ) -> UsbDecision {
        UsbDecision {
            port_path: device.port_path.clone(),
            vid: device.vid.clone(),
            pid: device.pid.clone(),
            serial: device.serial.clone(),
            manufacturer: device.manufacturer.clone(),
            product: device.product.clone(),
            hash: device.hash.clone(),
            target: verdict.target.as_str().into(),
            rule_id: verdict.rule_id.clone(),
            reason: verdict.reason.clone(),
            trigger: trigger.into(),
            mode: self.mode().into(),
            enforced: enforced_mode && error.is_none(),
            actions,
            error,
            policy_version: self.policy.version.clone(),
            latency_us: None,
        }
    }
}

fn is_root_hub_dir(dir: &Path) -> bool {
    dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("usb") && n[3..].bytes().all(|b| b.is_ascii_digit()) && n.len() > 3
    })
}

#[cfg(test)]
mod tests;
