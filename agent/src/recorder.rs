//! The recorder: the single writer of the agent's event stream.
//!
//! It runs on a blocking thread, takes what the sources queued, appends it to the
//! journal and makes it durable with one `fdatasync` per group (group commit): an
//! event counts as captured only once it is on disk. It also turns every loss into an
//! `agent.events_lost` event with its exact count and range: sources that could not
//! queue, records the journal cap pushed out, and damage found when the journal opened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use weilan_config::event::{
    Envelope, EpochStarted, Event, EventId, EventKey, EventsLost, GENESIS_HASH, SCHEMA_VERSION,
};

use crate::journal::{Journal, Lost};
use crate::source::Observed;
use crate::stats::AgentStats;

/// Largest group appended before one sync.
const GROUP_MAX: usize = 1024;

pub struct Recorder {
    pub agent_id: String,
    pub host_role: &'static str,
    /// `[agent] site`, stamped on every event.
    pub site: Option<String>,
    pub journal: Arc<Mutex<Journal>>,
    pub notify: Arc<Notify>,
    pub stats: Arc<AgentStats>,
    /// Events sources could not queue (shared with every `EventSink`).
    pub source_drops: Arc<AtomicU64>,
    reported_source_drops: u64,
    /// Where the recorder counts what it accounted for (see `ledger`).
    pub ledger: Option<Arc<crate::ledger::CaptureLedger>>,
}

impl Recorder {
    pub fn new(
        agent_id: String,
        host_role: &'static str,
        site: Option<String>,
        journal: Arc<Mutex<Journal>>,
        notify: Arc<Notify>,
        stats: Arc<AgentStats>,
        source_drops: Arc<AtomicU64>,
    ) -> Self {
        Recorder {
            agent_id,
            host_role,
            site,
            journal,
            notify,
            stats,
            source_drops,
            reported_source_drops: 0,
            ledger: None,
        }
    }

    /// Runs until the pipeline closes (all sources stopped). Call from a blocking
    /// thread (`spawn_blocking`): it waits on the channel and on the disk.
    ///
    /// The epoch's first record is `started` (seq 1), then what the journal found lost
    /// when it opened, then whatever the sources queued.
    pub fn run_blocking(
        mut self,
        mut rx: mpsc::Receiver<Observed>,
        started: EpochStarted,
        recovered: Vec<Lost>,
    ) {
        let handle = tokio::runtime::Handle::current();
        let mut group: Vec<Observed> = std::iter::once(Observed {
            time: jiff::Timestamp::now(),
            event: Event::AgentEpochStarted(started),
        })
        .chain(recovered.into_iter().map(lost_event))
        .collect();
        let stall_file = std::env::var_os(STALL_FAULT).map(std::path::PathBuf::from);
        // Of the group: events taken from the pipeline, and pipeline drops reported.
        let (mut taken, mut drops) = (0u64, 0u64);
        loop {
            if !group.is_empty() || self.unjournaled() {
                self.commit(std::mem::take(&mut group), false);
                self.accounted(std::mem::take(&mut taken), std::mem::take(&mut drops));
            }
            if let Some(f) = stall_file.as_deref() {
                stall_while_exists(f);
            }
            self.stats.touch_loop();
            let first = handle
                .block_on(async { tokio::time::timeout(Duration::from_secs(1), rx.recv()).await });
            match first {
                Ok(Some(obs)) => {
                    group.push(obs);
                    taken += 1;
                    while group.len() < GROUP_MAX {
                        match rx.try_recv() {
                            Ok(obs) => {
                                group.push(obs);
                                taken += 1;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {} // idle: just report drops and keep the watchdog fed
            }
            if let Some((obs, n)) = self.source_drop_event() {
                group.push(obs);
                drops += n;
            }
        }
        if let Some((obs, n)) = self.source_drop_event() {
            group.push(obs);
            drops += n;
        }
        if !group.is_empty() || self.unjournaled() {
            self.commit(group, true);
            self.accounted(taken, drops);
        }
    }

    /// The pipeline events and drop counts of a committed group are now in the
    /// journal (or counted by it as kept out): the capture ledger forgets them.
    fn accounted(&self, taken: u64, drops: u64) {
        if let Some(l) = &self.ledger {
            l.accounted(taken);
            l.drops_reported(drops);
        }
    }

    /// Events a full disk kept out are waiting to be reported.
    fn unjournaled(&self) -> bool {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unjournaled()
            > 0
    }

    /// Appends a group and syncs it; losses it causes are appended too.
    ///
    /// While the disk is full nothing is written: the group is counted in the journal's
    /// in-place counter. Once there is room again (or at the last commit, after giving
    /// up the reserve) the first record written is the one report of that count.
    fn commit(&mut self, group: Vec<Observed>, last: bool) {
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let mut queue: std::collections::VecDeque<Observed> = group.into();
        let mut report_pending = false;
        if journal.unjournaled() > 0 {
            if last {
                journal.release_reserve();
            }
            if last || journal.has_room() {
                if let Some(lost) = journal.unjournaled_report() {
                    tracing::warn!(
                        count = lost.count,
                        "disk has room again: reporting the events it kept out"
                    );
                    queue.push_front(lost_event(lost));
                    report_pending = true;
                }
            } else {
                let n = queue.len() as u64;
                journal.count_unjournaled(n);
                self.stats.dropped_total.fetch_add(n, Ordering::Relaxed);
                drop(journal);
                return;
            }
        }
        let mut failed = 0u64;
        while let Some(obs) = queue.pop_front() {
            let env = Envelope {
                schema: SCHEMA_VERSION,
                event_id: EventId {
                    agent_id: self.agent_id.clone(),
                    key: EventKey { epoch: 0, seq: 0 }, // set by the journal
                },
                time: obs.time,
                host_role: self.host_role.to_string(),
                site: self.site.clone(),
                prev_hash: GENESIS_HASH.into(), // set by the journal
                event: obs.event,
            };
            match journal.append(env) {
                Err(e) if e.is_disk_full() => {
                    // This and everything after it in the group are kept out. A report
                    // of the earlier count that did not fit is not a new loss: that
                    // count stays as it is.
                    let was_report = std::mem::take(&mut report_pending);
                    let n = queue.len() as u64 + u64::from(!was_report);
                    tracing::error!(error = %e, count = n, "disk full under the journal: counting events until there is room");
                    journal.count_unjournaled(n);
                    self.stats.dropped_total.fetch_add(n, Ordering::Relaxed);
                    queue.clear();
                }
                Ok(losses) => {
                    if std::mem::take(&mut report_pending) {
                        // The report is durable before its count is forgotten.
                        match journal.sync() {
                            Ok(()) => journal.unjournaled_reported(),
                            Err(e) => {
                                tracing::error!(error = %e, "report of a full disk not synced; its count is kept")
                            }
                        }
                    }
                    for lost in losses {
                        if lost.stage == "journal-cap" {
                            self.stats
                                .dropped_total
                                .fetch_add(lost.count, Ordering::Relaxed);
                            tracing::error!(count = lost.count, first = ?lost.first, last = ?lost.last, "journal cap reached: oldest unacknowledged events deleted");
                        }
                        queue.push_back(lost_event(lost));
                    }
                }
                Err(e) => {
                    failed += 1;
                    tracing::error!(error = %e, "event could not be journaled");
                }
            }
        }
        if failed > 0 {
            self.stats
                .dropped_total
                .fetch_add(failed, Ordering::Relaxed);
            // Try to leave a trace of the failure itself (the disk may have recovered).
            let _ = journal.append(Envelope {
                schema: SCHEMA_VERSION,
                event_id: EventId {
                    agent_id: self.agent_id.clone(),
                    key: EventKey { epoch: 0, seq: 0 },
                },
                time: jiff::Timestamp::now(),
                host_role: self.host_role.to_string(),
                site: self.site.clone(),
                prev_hash: GENESIS_HASH.into(),
                event: lost_event(Lost {
                    reissue_of: None,
                    stage: "journal-write".into(),
                    count: failed,
                    first: None,
                    last: None,
                    reason: "journal write failed (disk full or I/O error)".into(),
                })
                .event,
            });
        }
        if let Err(e) = journal.sync() {
            tracing::error!(error = %e, "journal sync failed; events stay unsent until a sync succeeds");
        }
        self.stats
            .backlog
            .store(journal.unacked(), Ordering::Relaxed);
        drop(journal);
        self.notify.notify_one();
    }

    fn source_drop_event(&mut self) -> Option<(Observed, u64)> {
        let total = self.source_drops.load(Ordering::Relaxed);
        let new = total - self.reported_source_drops;
        if new == 0 {
            return None;
        }
        self.reported_source_drops = total;
        self.stats.dropped_total.fetch_add(new, Ordering::Relaxed);
        tracing::error!(count = new, "sources dropped events: pipeline full");
        Some((
            lost_event(Lost {
                reissue_of: None,
                stage: "pipeline".into(),
                count: new,
                first: None,
                last: None,
                reason: "a source could not queue events (pipeline full)".into(),
            }),
            new,
        ))
    }
}

fn lost_event(l: Lost) -> Observed {
    Observed {
        time: jiff::Timestamp::now(),
        event: Event::AgentEventsLost(EventsLost {
            count: l.count,
            stage: l.stage,
            reason: l.reason,
            first: l.first,
            last: l.last,
            reissue_of: l.reissue_of,
        }),
    }
}

/// Fault injection for the systemd watchdog test (`tests/systemd_guest.rs`): with
/// `WEILAN_FAULT_STALL_RECORDER=PATH` set, the recording loop hangs while `PATH`
/// exists — as it would on a hung disk — so the watchdog keep-alives stop and systemd
/// must kill and restart the agent. Unset (always, outside that test) it costs nothing.
pub const STALL_FAULT: &str = "WEILAN_FAULT_STALL_RECORDER";

fn stall_while_exists(path: &std::path::Path) {
    if path.exists() {
        tracing::warn!(path = %path.display(), "fault injection: recorder loop stalled");
        while path.exists() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
