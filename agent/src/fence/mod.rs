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

#[cfg(target_os = "linux")]
pub mod linux;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weilan_config::event::{Event, UsbDecision, UsbDevice, UsbUnlock};
use weilan_config::policy::usb::{
    is_root_hub, Context, Target, Verdict, BUILTIN_BADUSB, BUILTIN_ROOT_HUB,
};
use weilan_config::policy::Policy;
use weilan_config::signing::Verifier;
use weilan_config::wire::{SignedMessage, UnlockToken};

use crate::unlock::{self, UnlockStore};

use crate::source::usb::sysfs::Sysfs;
use crate::source::EventSink;

pub use crate::source::usb::FenceFact;

/// Changes from outside the USB source.
#[derive(Debug, Clone)]
pub enum FenceControl {
    /// A new validated policy is in force.
    Policy(Arc<Policy>),
    /// An unlock token arrived (from a collector command); verified here.
    Unlock(SignedMessage),
    /// A verified collector command fixes a device's verdict (e.g. block it).
    Override {
        device_hash: String,
        target: Target,
        rule_id: String,
        reason: String,
    },
}

/// What the fence needs to accept unlock tokens.
pub struct UnlockSetup {
    pub verifier: Arc<Verifier>,
    pub agent_id: String,
    pub store: UnlockStore,
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
    /// For a read-only verdict: what does not hold yet (reported; retried).
    failing: Option<String>,
}

/// How often read-only devices are checked (drift undone, busy remounts retried).
const VERIFY_EVERY: Duration = Duration::from_millis(250);

/// A read-only step that failed, said plainly: what is still writable, and that it
/// is retried.
fn still_writable(error: &str, what: &str) -> String {
    format!(
        "{error} — {what} is still writable; retried every {} ms",
        VERIFY_EVERY.as_millis()
    )
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
    unlock: Option<UnlockSetup>,
    /// Accepted tokens still in force (or not yet).
    unlocks: Vec<UnlockToken>,
    /// Verdicts fixed by collector commands, by device hash (this run).
    overrides: HashMap<String, Verdict>,
    /// The mount table, to remount volumes already mounted when a device turns
    /// read-only (the block layer only warns about writes to a read-only device
    /// under a mounted file system; the mount itself must become read-only).
    mountinfo: Option<PathBuf>,
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
            unlock: None,
            unlocks: Vec::new(),
            overrides: HashMap::new(),
            mountinfo: None,
        }
    }

    /// Lets the fence remount volumes already mounted when their device turns read-only.
    pub fn with_mountinfo(mut self, mountinfo: PathBuf) -> Self {
        self.mountinfo = Some(mountinfo);
        self
    }

    /// Lets the fence accept temporary unlock tokens.
    pub fn with_unlocks(mut self, setup: UnlockSetup) -> Self {
        self.unlock = Some(setup);
        self
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
        // Before any device is decided: unlocks accepted before a restart still hold.
        self.restore_unlocks().await;
        let mut tick = tokio::time::interval(self.recheck);
        tick.tick().await;
        let mut incoming = tokio::time::interval(Duration::from_secs(1));
        let mut verify = tokio::time::interval(VERIFY_EVERY);
        verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let boundary = self.next_unlock_boundary();
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
                    Some(FenceControl::Unlock(msg)) => self.accept_token(msg, "command").await,
                    Some(FenceControl::Override { device_hash, target, rule_id, reason }) => {
                        self.overrides.insert(device_hash, Verdict { target, rule_id, reason });
                        self.reevaluate("command").await;
                    }
                    None => {}
                },
                _ = tick.tick() => self.reevaluate("time-window").await,
                _ = verify.tick(), if self.holds_read_only() => self.verify_read_only().await,
                _ = incoming.tick(), if self.unlock.is_some() => {
                    let dropped = self.unlock.as_ref().map(|u| u.store.take_incoming()).unwrap_or_default();
                    for msg in dropped {
                        self.accept_token(msg, "file").await;
                    }
                }
                _ = sleep_until_opt(boundary) => self.unlock_boundary().await,
            }
        }
    }

    /// The verdict for `d`: built-in protections, then collector commands, then unlock
    /// tokens in force, then the policy's rules and default.
    fn verdict(&self, d: &UsbDevice) -> Verdict {
        let v = self.policy.usb.evaluate(d, &self.context());
        if v.rule_id == BUILTIN_BADUSB || v.rule_id == BUILTIN_ROOT_HUB {
            return v;
        }
        if let Some(o) = self.overrides.get(&d.hash) {
            return o.clone();
        }
        let now = jiff::Timestamp::now();
        let token = self.unlocks.iter().find(|t| {
            t.not_before <= now
                && now < t.not_after
                && t.device_hash.as_ref().is_none_or(|h| *h == d.hash)
                && t.serial
                    .as_ref()
                    .is_none_or(|s| d.serial.as_ref() == Some(s))
                && t.vid_pid
                    .as_ref()
                    .is_none_or(|vp| vp.eq_ignore_ascii_case(&format!("{}:{}", d.vid, d.pid)))
        });
        match token {
            Some(t) => Verdict {
                target: if t.mode == "read-only" {
                    Target::ReadOnly
                } else {
                    Target::Allow
                },
                rule_id: format!("unlock:{}", t.token_id),
                reason: format!("temporary unlock until {} ({})", t.not_after, t.reason),
            },
            None => v,
        }
    }

    async fn accept_token(&mut self, msg: SignedMessage, via: &str) {
        let Some(setup) = &self.unlock else { return };
        let claimed: Option<UnlockToken> = serde_json::from_str(&msg.body).ok();
        let result = unlock::verify(&setup.verifier, &msg, &setup.agent_id).and_then(|t| {
            if setup.store.used().contains(&t.token_id) {
                Err(format!("token {} was already used", t.token_id))
            } else {
                setup
                    .store
                    .mark_used(&t.token_id)
                    .map_err(|e| format!("cannot record the token as used: {e}"))
                    .map(|()| t)
            }
        });
        let (token, status, refusal) = match result {
            Ok(t) => (Some(t), "accepted", None),
            Err(why) => (claimed, "refused", Some(why)),
        };
        match &refusal {
            Some(why) => tracing::warn!(%why, via, "unlock token refused"),
            None => tracing::info!(via, "unlock token accepted"),
        }
        self.emit_unlock(token.as_ref(), status, refusal, via).await;
        if let (Some(t), "accepted") = (token, status) {
            if let Some(setup) = &self.unlock {
                if let Err(e) = setup.store.save_active(&msg, &t.token_id) {
                    tracing::error!(error = %e, token = %t.token_id, "unlock not kept on disk: a restart would end it early");
                }
            }
            self.unlocks.push(t);
            self.reevaluate("unlock").await;
        }
    }

    /// Takes back the unlocks accepted before a restart: verified again (signature,
    /// agent, window); one that expired meanwhile is reported as expired.
    async fn restore_unlocks(&mut self) {
        let Some(setup) = &self.unlock else { return };
        let (store, verifier, agent_id) = (
            setup.store.clone(),
            setup.verifier.clone(),
            setup.agent_id.clone(),
        );
        for msg in store.active() {
            let claimed: Option<UnlockToken> = serde_json::from_str(&msg.body).ok();
            match unlock::verify(&verifier, &msg, &agent_id) {
                Ok(t) => {
                    tracing::info!(token = %t.token_id, until = %t.not_after, "unlock restored after a restart");
                    self.emit_unlock(Some(&t), "restored", None, "restart")
                        .await;
                    self.unlocks.push(t);
                }
                Err(why) => {
                    if let Some(t) = &claimed {
                        store.remove_active(&t.token_id);
                    }
                    self.emit_unlock(claimed.as_ref(), "expired", Some(why), "restart")
                        .await;
                }
            }
        }
    }

    async fn emit_unlock(
        &self,
        t: Option<&UnlockToken>,
        status: &str,
        refusal: Option<String>,
        via: &str,
    ) {
        let e = UsbUnlock {
            token_id: t.map_or("(unreadable)".into(), |t| t.token_id.clone()),
            status: status.into(),
            device_hash: t.and_then(|t| t.device_hash.clone()),
            serial: t.and_then(|t| t.serial.clone()),
            mode: t.map_or(String::new(), |t| t.mode.clone()),
            not_before: t.map_or(jiff::Timestamp::UNIX_EPOCH, |t| t.not_before),
            not_after: t.map_or(jiff::Timestamp::UNIX_EPOCH, |t| t.not_after),
            reason: t.map_or(String::new(), |t| t.reason.clone()),
            refusal,
            via: via.into(),
        };
        let _ = self.sink.emit(Event::UsbUnlock(e)).await;
    }

    /// The next moment a token starts or ends.
    fn next_unlock_boundary(&self) -> Option<tokio::time::Instant> {
        let now = jiff::Timestamp::now();
        self.unlocks
            .iter()
            .flat_map(|t| [t.not_before, t.not_after])
            .filter(|b| *b > now)
            .min()
            .map(|b| {
                let wait = b.duration_since(now).unsigned_abs();
                tokio::time::Instant::now() + wait + Duration::from_millis(5)
            })
    }

    async fn unlock_boundary(&mut self) {
        let now = jiff::Timestamp::now();
        let (expired, live): (Vec<_>, Vec<_>) =
            self.unlocks.drain(..).partition(|t| t.not_after <= now);
        self.unlocks = live;
        for t in &expired {
            if let Some(setup) = &self.unlock {
                setup.store.remove_active(&t.token_id);
            }
            self.emit_unlock(Some(t), "expired", None, "timer").await;
        }
        let trigger = if expired.is_empty() {
            "unlock"
        } else {
            "unlock-expired"
        };
        self.reevaluate(trigger).await;
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
                        Err(e) => error = Some(still_writable(&e, &volume.mount_point)),
                    }
                    if let Some(t) = self.devices.get_mut(&usb_dir) {
                        t.failing = error.clone();
                    }
                    let d = self.decision(&device, &verdict, "mount", actions, error, true);
                    self.emit(d).await;
                }
            }
        }
    }

    fn holds_read_only(&self) -> bool {
        self.policy.usb.enforce
            && self
                .devices
                .values()
                .any(|t| t.applied && t.verdict.target == Target::ReadOnly)
    }

    /// Checks that every read-only device still is: its disk and partitions flagged,
    /// its volumes mounted read-only. What drifted (root re-enabling writes) is
    /// re-applied; what failed (a remount refused while a file is open for writing) is
    /// retried. Each change — re-applied, still failing, holding again — is one
    /// `usb.decision` (trigger `verify`) saying plainly what holds.
    async fn verify_read_only(&mut self) {
        let dirs: Vec<PathBuf> = self
            .devices
            .iter()
            .filter(|(_, t)| t.applied && t.verdict.target == Target::ReadOnly)
            .map(|(d, _)| d.clone())
            .collect();
        for dir in dirs {
            let Ok(now) = self.sysfs.read_device(&dir, false) else {
                continue; // unplugged: the source reports it
            };
            let mut actions = Vec::new();
            let mut failures = Vec::new();
            for b in now
                .block_devices
                .iter()
                .flat_map(|d| std::iter::once(d).chain(d.partitions.iter()))
                .filter(|b| !b.read_only)
            {
                match self.enforcer.set_read_only(&b.name) {
                    Ok(()) => actions.push(format!(
                        "BLKROSET {} again (writes had been re-enabled)",
                        b.name
                    )),
                    Err(e) => failures.push(still_writable(&e, &b.name)),
                }
            }
            let was_failing = self.devices.get(&dir).and_then(|t| t.failing.clone());
            for mount_point in self.mounted_rw(&now) {
                match self.enforcer.remount_read_only(&mount_point) {
                    // A retry that now succeeds, or a mount made writable again.
                    Ok(())
                        if was_failing
                            .as_deref()
                            .is_some_and(|f| f.contains(&mount_point)) =>
                    {
                        actions.push(format!("remount {mount_point} read-only"))
                    }
                    Ok(()) => actions.push(format!(
                        "remount {mount_point} read-only again (it had been made writable)"
                    )),
                    Err(e) => failures.push(still_writable(&e, &mount_point)),
                }
            }
            let Some(t) = self.devices.get_mut(&dir) else {
                continue;
            };
            let failing = (!failures.is_empty()).then(|| failures.join("; "));
            let report = !actions.is_empty() || failing != t.failing;
            let recovered = failing.is_none() && t.failing.is_some();
            t.failing = failing.clone();
            if !report {
                continue;
            }
            if recovered && actions.is_empty() {
                actions.push("read-only holds again".into());
            }
            let error = failing.clone();
            tracing::warn!(dir = %dir.display(), ?actions, ?error, "read-only enforcement checked");
            let (device, verdict) = (t.device.clone(), t.verdict.clone());
            let d = self.decision(&device, &verdict, "verify", actions, error, true);
            self.emit(d).await;
        }
    }

    /// Mount points of `device`'s volumes that are mounted read-write now.
    fn mounted_rw(&self, device: &UsbDevice) -> Vec<String> {
        let Some(path) = &self.mountinfo else {
            return Vec::new();
        };
        let names: Vec<&str> = device
            .block_devices
            .iter()
            .flat_map(|d| std::iter::once(&d.name).chain(d.partitions.iter().map(|p| &p.name)))
            .map(String::as_str)
            .collect();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        crate::source::usb::mounts::parse(&text)
            .into_values()
            .filter(|m| {
                !m.read_only
                    && Path::new(&m.source)
                        .file_name()
                        .is_some_and(|n| names.iter().any(|b| n == *b))
            })
            .map(|m| m.mount_point)
            .collect()
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
            let verdict = self.verdict(&t.device);
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
        let verdict = self.verdict(&device);
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
                failing: d
                    .error
                    .clone()
                    .filter(|_| verdict.target == Target::ReadOnly),
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
                // flag them now; new ones are flagged as they appear. Read afresh: the
                // identity kept since attach predates its disks.
                let now = self
                    .sysfs
                    .read_device(dir, false)
                    .unwrap_or_else(|_| device.clone());
                for disk in &now.block_devices {
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
                for mount_point in self.mounted_rw(&now) {
                    if let Some(e) = step(
                        self.enforcer.remount_read_only(&mount_point),
                        &format!("remount {mount_point} read-only"),
                        &mut actions,
                    ) {
                        err = err.or(Some(still_writable(&e, &mount_point)));
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

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn is_root_hub_dir(dir: &Path) -> bool {
    dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("usb") && n[3..].bytes().all(|b| b.is_ascii_digit()) && n.len() > 3
    })
}

#[cfg(test)]
mod tests;
