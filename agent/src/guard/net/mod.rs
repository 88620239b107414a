//! The network guard: decides on each connection the network source follows, with
//! the pure policy ([`NetworkPolicy::decide`]), and carries a verdict out through a
//! [`NetEnforcer`] — ending the sending process, blocking the destination with
//! nftables (`guard::net::linux`), a recording double in its unit tests — each
//! action reported as one `net.enforced` naming its rule and whether it worked.
//!
//! The source keeps what is observation: which connections exist, their bytes over
//! time, who owns them, which rule already fired for a connection, process or
//! destination (so a verdict is acted on once per its scope).

#[cfg(target_os = "linux")]
pub mod linux;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use weilan_config::event::{Event, NetEnforced};
use weilan_config::policy::network::{FlowFacts, NetAction, NetVerdict, NetworkPolicy};

use crate::source::net::{FlowJudge, NetActionRequest};
use crate::source::EventSink;

/// How the network guard acts on the host. The test double records the calls.
pub trait NetEnforcer: Send + Sync {
    /// Ends `pid` if it still runs `exe`.
    fn kill(&self, pid: u32, exe: &str) -> Result<String, String>;
    /// Rejects traffic from network namespace `netns` to `addr` for `duration`.
    fn block(
        &self,
        netns: u64,
        addr: IpAddr,
        duration: Duration,
        rule_id: &str,
    ) -> Result<String, String>;
}

/// Decides with the policy and acts through its enforcer.
pub struct NetGuard {
    enforcer: Arc<dyn NetEnforcer>,
}

impl NetGuard {
    pub fn new(enforcer: Arc<dyn NetEnforcer>) -> Self {
        NetGuard { enforcer }
    }
}

impl FlowJudge for NetGuard {
    fn decide(&self, policy: &NetworkPolicy, facts: &FlowFacts<'_>) -> Option<NetVerdict> {
        policy.decide(facts)
    }

    /// Carries out one action on its own thread (a kill waits up to 2 s) and reports it.
    fn act(&self, a: NetActionRequest, sink: EventSink) {
        let enforcer = self.enforcer.clone();
        let _ = std::thread::Builder::new()
            .name("weilan-net-act".into())
            .spawn(move || {
                let event = carry_out(&a, enforcer.as_ref());
                tracing::info!(action = %event.action, rule = %event.rule_id, ok = event.ok, detail = %event.detail, "network action");
                let _ = sink.emit_blocking(Event::NetEnforced(event));
            });
    }
}

/// Carries out one request and says how it went.
pub fn carry_out(a: &NetActionRequest, enforcer: &dyn NetEnforcer) -> NetEnforced {
    match a.verdict.action {
        NetAction::Audit => enforced_event(a, true, "audit only".into(), None),
        NetAction::Kill => {
            let result = match (a.pid, &a.exe) {
                (Some(pid), Some(exe)) => enforcer.kill(pid, exe),
                _ => Err("the sending process is unknown (it closed the connection before a poll saw it)".into()),
            };
            match result {
                Ok(d) => enforced_event(a, true, d, None),
                Err(e) => enforced_event(a, false, e, None),
            }
        }
        NetAction::BlockDestination => {
            let expires = Timestamp::now().checked_add(a.verdict.block).ok();
            match enforcer.block(a.netns, a.remote.ip(), a.verdict.block, &a.verdict.rule_id) {
                Ok(d) => enforced_event(a, true, d, expires),
                Err(e) => enforced_event(a, false, e, None),
            }
        }
    }
}

/// `net.enforced` for an action that was carried out.
fn enforced_event(
    a: &NetActionRequest,
    ok: bool,
    detail: String,
    expires: Option<Timestamp>,
) -> NetEnforced {
    NetEnforced {
        action: a.verdict.action.as_str().into(),
        rule_id: a.verdict.rule_id.clone(),
        pid: a.pid,
        exe: a.exe.clone(),
        remote_addr: a.remote.ip().to_string(),
        remote_port: a.remote.port(),
        ok,
        detail,
        expires,
    }
}

#[cfg(test)]
mod tests;
