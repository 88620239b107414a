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
}

impl Default for AgentStats {
    fn default() -> Self {
        AgentStats {
            started: Instant::now(),
            backlog: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
            acked_batches: AtomicU64::new(0),
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
}
