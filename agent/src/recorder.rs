//! The recorder: numbers every observed event and puts it in the outbox.
//!
//! It is the single writer of the agent's event stream, so `(epoch, seq)` is gapless
//! and ordered. It also turns drop counters into `agent.events_lost` events: losses
//! upstream (sources that could not queue) and in the outbox (bound reached).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use weilan_config::event::{Envelope, Event, EventId, EventKey, EventsLost, SCHEMA_VERSION};

use crate::outbox::{Dropped, Outbox};
use crate::source::Observed;
use crate::stats::AgentStats;

pub struct Recorder {
    pub agent_id: String,
    pub epoch: u64,
    pub host_role: &'static str,
    pub outbox: Arc<Mutex<Outbox>>,
    pub notify: Arc<Notify>,
    pub stats: Arc<AgentStats>,
    /// Events sources could not queue (shared with every `EventSink`).
    pub source_drops: Arc<AtomicU64>,
    next_seq: u64,
    reported_source_drops: u64,
}

impl Recorder {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        agent_id: String,
        epoch: u64,
        host_role: &'static str,
        outbox: Arc<Mutex<Outbox>>,
        notify: Arc<Notify>,
        stats: Arc<AgentStats>,
        source_drops: Arc<AtomicU64>,
    ) -> Self {
        Recorder {
            agent_id,
            epoch,
            host_role,
            outbox,
            notify,
            stats,
            source_drops,
            next_seq: 1,
            reported_source_drops: 0,
        }
    }

    /// Runs until the pipeline closes (all sources stopped), then returns.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Observed>) {
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                obs = rx.recv() => match obs {
                    Some(obs) => {
                        self.record(obs);
                        self.report_source_drops();
                    }
                    None => break,
                },
                _ = check.tick() => self.report_source_drops(),
            }
        }
        self.report_source_drops();
    }

    /// Numbers and stores one event.
    pub fn record(&mut self, obs: Observed) {
        let key = EventKey {
            epoch: self.epoch,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        let env = Envelope {
            schema: SCHEMA_VERSION,
            event_id: EventId {
                agent_id: self.agent_id.clone(),
                key,
            },
            time: obs.time,
            host_role: self.host_role.to_string(),
            event: obs.event,
        };
        let dropped = {
            let mut o = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            let d = o.append(env);
            self.stats.backlog.store(o.len() as u64, Ordering::Relaxed);
            d
        };
        self.notify.notify_one();
        if let Some(d) = dropped {
            self.report_outbox_drop(d);
        }
    }

    fn report_outbox_drop(&mut self, d: Dropped) {
        self.stats
            .dropped_total
            .fetch_add(d.count, Ordering::Relaxed);
        tracing::error!(count = d.count, first = %d.first, last = %d.last, "outbox full: oldest events dropped");
        self.record(Observed {
            time: jiff::Timestamp::now(),
            event: Event::AgentEventsLost(EventsLost {
                count: d.count,
                stage: "outbox".into(),
                reason: "the outbox bound was reached while the collector was unreachable".into(),
                first: Some(d.first),
                last: Some(d.last),
            }),
        });
    }

    fn report_source_drops(&mut self) {
        let total = self.source_drops.load(Ordering::Relaxed);
        let new = total - self.reported_source_drops;
        if new == 0 {
            return;
        }
        self.reported_source_drops = total;
        self.stats.dropped_total.fetch_add(new, Ordering::Relaxed);
        tracing::error!(count = new, "sources dropped events: pipeline full");
        self.record(Observed {
            time: jiff::Timestamp::now(),
            event: Event::AgentEventsLost(EventsLost {
                count: new,
                stage: "pipeline".into(),
                reason: "a source could not queue events (pipeline full)".into(),
                first: None,
                last: None,
            }),
        });
    }
}
