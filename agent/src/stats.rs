//! Counters shared between the agent's tasks (heartbeats report them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct AgentStats {
    started: Instant,
    /// Events captured and not yet acknowledged.
    pub backlog: AtomicU64,
    /// Events lost since start, all stages.
    pub dropped_total: AtomicU64,
    /// Batches acknowledged by the collector.
    pub acked_batches: AtomicU64,
    /// Milliseconds since start when the recorder loop last went round (watchdog).
    pub recorder_alive_ms: AtomicU64,
    /// Version of the fence policy in force (heartbeats report it).
    policy_version: std::sync::Mutex<String>,
}

impl Default for AgentStats {
    fn default() -> Self {
        AgentStats {
            started: Instant::now(),
            backlog: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
            acked_batches: AtomicU64::new(0),
            recorder_alive_ms: AtomicU64::new(0),
            policy_version: std::sync::Mutex::new(String::new()),
        }
    }
}

impl AgentStats {
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    pub fn policy_version(&self) -> String {
        self.policy_version
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    pub fn set_policy_version(&self, v: &str) {
        if let Ok(mut p) = self.policy_version.lock() {
            *p = v.to_string();
        }
    }

    /// The recorder calls this every round (at least once a second).
    pub fn touch_loop(&self) {
        self.recorder_alive_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long ago the recorder last went round.
    pub fn recorder_idle(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.recorder_alive_ms.load(Ordering::Relaxed)))
    }
}
