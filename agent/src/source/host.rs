//! The host source: inventory at start (`agent.started`) and heartbeats.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use weilan_config::event::{AgentStarted, Event, Heartbeat};

use super::{BoxFuture, Source, SourceContext, SourceError};
use crate::stats::AgentStats;

pub struct HostSource {
    pub heartbeat: Duration,
    pub policy_version: Option<String>,
    pub stats: Arc<AgentStats>,
    started: bool,
}

impl HostSource {
    pub fn new(
        heartbeat: Duration,
        policy_version: Option<String>,
        stats: Arc<AgentStats>,
    ) -> Self {
        HostSource {
            heartbeat,
            policy_version,
            stats,
            started: false,
        }
    }
}

/// What `sysinfo` knows about this host.
pub fn inventory(policy_version: Option<String>) -> AgentStarted {
    let boot = sysinfo::System::boot_time().ok();
    AgentStarted {
        agent_version: crate::VERSION.into(),
        hostname: sysinfo::System::host_name().ok(),
        os: sysinfo::System::name().ok(),
        os_version: sysinfo::System::os_version().ok(),
        kernel: sysinfo::System::kernel_version().ok(),
        boot_time: boot
            .filter(|b| *b > 0)
            .and_then(|b| Timestamp::from_second(b as i64).ok()),
        policy_version,
    }
}

impl Source for HostSource {
    fn name(&self) -> &'static str {
        "host"
    }

    fn run<'a>(&'a mut self, ctx: &'a SourceContext) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            if !self.started {
                ctx.sink
                    .emit(Event::AgentStarted(inventory(self.policy_version.clone())))
                    .await?;
                self.started = true;
            }
            let mut tick = tokio::time::interval(self.heartbeat);
            tick.tick().await; // the first tick is immediate; agent.started said hello
            loop {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => {
                        let hb = Heartbeat {
                            agent_version: crate::VERSION.into(),
                            uptime_secs: self.stats.uptime().as_secs(),
                            policy_version: Some(self.stats.policy_version()),
                            backlog: self.stats.backlog(),
                            dropped_total: self.stats.dropped_total(),
                        };
                        ctx.sink.emit(Event::AgentHeartbeat(hb)).await?;
                    }
                }
            }
        })
    }
}
