//! Fair ingest: what the broker delivers is queued per source (the agent or door
//! controller its topic names) and taken round-robin, so one source's flood waits
//! behind itself and never in front of another agent's events. A group (one
//! transaction) takes one message per source, and each source has a rate quota in
//! payload bytes per second: a source over it is skipped (its messages wait, they are
//! not dropped) until its quota refills, so even validly signed, well-formed batches
//! cannot take more than their share of the collector's time.
//!
//! The collector reads from the broker as fast as it can into [`FairQueue`]. A source
//! holds at most [`PER_SOURCE_MESSAGES`] waiting messages — a Weilan agent has at most
//! `max_batches_in_flight` (8 by default, 32 at most) batches unacknowledged, so only a
//! source that ignores the protocol ever reaches it — and what comes beyond is refused
//! without being processed: counted per source ([`Refusals`], flushed to the
//! quarantine counts) and raised as `builtin.collector.source-flooding`. Messages of
//! one source keep their order (chain and gap checks rely on it).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Waiting messages one source may have; beyond it the source is flooding.
pub const PER_SOURCE_MESSAGES: usize = 64;

/// A message waiting for ingest.
#[derive(Debug)]
pub struct Waiting {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Per-source queues served round-robin.
#[derive(Debug, Default)]
pub struct FairQueue {
    queues: HashMap<String, VecDeque<Waiting>>,
    /// Sources with waiting messages, in serving order.
    turn: VecDeque<String>,
    waiting: usize,
    bytes: usize,
    /// Payload bytes per second each source may have processed (0: no quota).
    quota: f64,
    /// Sources' quota left (may go negative by one message) and when it was counted.
    buckets: HashMap<String, (f64, Instant)>,
    /// Sources whose message was put back because another collector was storing for
    /// them ([`FairQueue::put_back`]), and when to try them again.
    not_before: HashMap<String, Instant>,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub struct Flooding {
    pub source: String,
    pub bytes: usize,
}

impl FairQueue {
    /// A queue whose sources may each have `bytes_per_sec` of payload processed per
    /// second, with bursts up to one second's worth.
    pub fn with_quota(bytes_per_sec: usize) -> Self {
        FairQueue {
            quota: bytes_per_sec as f64,
            ..Default::default()
        }
    }

    /// The quota `source` has left at `now`.
    fn quota_left(&mut self, source: &str, now: Instant) -> f64 {
        if self.quota <= 0.0 {
            return f64::MAX;
        }
        let quota = self.quota;
        let (left, at) = self
            .buckets
            .entry(source.to_string())
            .or_insert((quota, now));
        *left = (*left + now.saturating_duration_since(*at).as_secs_f64() * quota).min(quota);
        *at = now;
        *left
    }

    /// Queues a message of `source`, or refuses it when the source already has
    /// [`PER_SOURCE_MESSAGES`] waiting.
    pub fn push(&mut self, source: String, msg: Waiting) -> Result<(), Flooding> {
        let queue = self.queues.entry(source.clone()).or_default();
        if queue.len() >= PER_SOURCE_MESSAGES {
            return Err(Flooding {
                source,
                bytes: msg.payload.len(),
            });
        }
        if queue.is_empty() {
            self.turn.push_back(source);
        }
        self.waiting += 1;
        self.bytes += msg.payload.len();
        queue.push_back(msg);
        Ok(())
    }

    /// Puts a message taken for a group back at the front of its source's queue,
    /// not to be taken again before `not_before`: another collector sharing the
    /// ingest was storing for that source (ingest.rs, `AgentTurns::Defer`). Its
    /// order among the source's messages is kept; it was admitted once and is never
    /// refused for flooding now; its quota is given back.
    pub fn put_back(&mut self, source: String, msg: Waiting, not_before: Instant) {
        if let Some((left, _)) = self.buckets.get_mut(&source) {
            *left += msg.payload.len() as f64;
        }
        let queue = self.queues.entry(source.clone()).or_default();
        if queue.is_empty() {
            self.turn.push_back(source.clone());
        }
        self.waiting += 1;
        self.bytes += msg.payload.len();
        queue.push_front(msg);
        self.not_before.insert(source, not_before);
    }

    /// The next message: the oldest of the source whose turn it is.
    pub fn pop(&mut self) -> Option<Waiting> {
        let source = self.turn.pop_front()?;
        let queue = self.queues.get_mut(&source)?;
        let msg = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&source);
        } else {
            self.turn.push_back(source);
        }
        self.waiting -= 1;
        self.bytes -= msg.payload.len();
        Some(msg)
    }

    /// The next group for one transaction: one message from each source in turn
    /// order whose quota is not spent (so a flooding source adds one message to a
    /// group, never a group's worth that another agent's batch would wait behind), up
    /// to `max_messages` and about `max_bytes` of payload. Empty when every waiting
    /// source is over its quota (ask again shortly).
    pub fn pop_group(
        &mut self,
        max_messages: usize,
        max_bytes: usize,
        now: Instant,
    ) -> Vec<Waiting> {
        let mut group = Vec::new();
        let mut bytes = 0;
        for _ in 0..self.turn.len() {
            if group.len() >= max_messages || bytes >= max_bytes {
                break;
            }
            let Some(source) = self.turn.front().cloned() else {
                break;
            };
            if self.quota_left(&source, now) <= 0.0 || self.put_back_until(&source, now) {
                // Over its quota, or put back a moment ago: its turn passes, its
                // messages wait.
                self.turn.rotate_left(1);
                continue;
            }
            let Some(msg) = self.pop() else { break };
            if self.quota > 0.0 {
                if let Some((left, _)) = self.buckets.get_mut(&source) {
                    *left -= msg.payload.len() as f64;
                }
            }
            bytes += msg.payload.len();
            group.push(msg);
        }
        // Sources with nothing waiting and a full quota need no bucket.
        if self.buckets.len() > 2 * self.queues.len() + 64 {
            let (queues, quota) = (&self.queues, self.quota);
            self.buckets.retain(|source, (left, at)| {
                queues.contains_key(source)
                    || *left + now.saturating_duration_since(*at).as_secs_f64() * quota < quota
            });
        }
        group
    }

    /// Whether `source` was put back and may not be taken yet.
    fn put_back_until(&mut self, source: &str, now: Instant) -> bool {
        match self.not_before.get(source) {
            Some(&until) if now < until => true,
            Some(_) => {
                self.not_before.remove(source);
                false
            }
            None => false,
        }
    }

    /// Messages waiting, all sources together.
    pub fn len(&self) -> usize {
        self.waiting
    }

    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }

    /// Payload bytes waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Refusals for flooding not yet written to the store: (messages, bytes) by source.
#[derive(Debug, Default)]
pub struct Refusals {
    pub by_source: HashMap<String, (u64, u64)>,
}

impl Refusals {
    pub fn note(&mut self, f: Flooding) {
        let e = self.by_source.entry(f.source).or_default();
        e.0 += 1;
        e.1 += f.bytes as u64;
    }

    pub fn take(&mut self) -> HashMap<String, (u64, u64)> {
        std::mem::take(&mut self.by_source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: &str) -> Waiting {
        Waiting {
            topic: tag.into(),
            payload: tag.as_bytes().to_vec(),
        }
    }

    #[test]
    fn sources_take_turns_and_keep_their_own_order() {
        let mut q = FairQueue::default();
        for i in 0..5 {
            q.push("flood".into(), msg(&format!("f{i}"))).unwrap();
        }
        q.push("quiet".into(), msg("q0")).unwrap();
        q.push("quiet".into(), msg("q1")).unwrap();
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).map(|m| m.topic).collect();
        assert_eq!(order, ["f0", "q0", "f1", "q1", "f2", "f3", "f4"]);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn a_message_put_back_waits_its_moment_and_keeps_its_place() {
        let mut q = FairQueue::default();
        q.push("ws-a".into(), msg("a0")).unwrap();
        q.push("ws-a".into(), msg("a1")).unwrap();
        q.push("ws-b".into(), msg("b0")).unwrap();
        let topics = |g: Vec<Waiting>| g.into_iter().map(|m| m.topic).collect::<Vec<_>>();
        let now = Instant::now();
        let mut group = q.pop_group(512, 1 << 20, now);
        assert_eq!(
            topics(group.iter().map(|m| msg(&m.topic)).collect()),
            ["a0", "b0"]
        );
        // Another collector stores for ws-a: a0 goes back, ahead of a1.
        let a0 = group.remove(0);
        let later = now + std::time::Duration::from_millis(5);
        q.put_back("ws-a".into(), a0, later);
        assert_eq!(q.len(), 2);
        assert!(
            q.pop_group(512, 1 << 20, now).is_empty(),
            "not before its moment"
        );
        assert_eq!(topics(q.pop_group(512, 1 << 20, later)), ["a0"]);
        assert_eq!(topics(q.pop_group(512, 1 << 20, later)), ["a1"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_group_takes_one_message_per_source() {
        let mut q = FairQueue::default();
        for i in 0..5 {
            q.push("flood".into(), msg(&format!("f{i}"))).unwrap();
        }
        q.push("quiet".into(), msg("q0")).unwrap();
        q.push("other".into(), msg("o0")).unwrap();
        let topics = |g: Vec<Waiting>| g.into_iter().map(|m| m.topic).collect::<Vec<_>>();
        let now = Instant::now();
        assert_eq!(topics(q.pop_group(512, 1 << 20, now)), ["f0", "q0", "o0"]);
        assert_eq!(topics(q.pop_group(512, 1 << 20, now)), ["f1"]);
        assert_eq!(topics(q.pop_group(1, 1 << 20, now)), ["f2"]);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn a_source_over_its_quota_waits_and_the_others_do_not() {
        // 100 bytes per second each; messages of 60 bytes.
        let mut q = FairQueue::with_quota(100);
        let big = |tag: &str| Waiting {
            topic: tag.into(),
            payload: vec![0; 60],
        };
        for i in 0..4 {
            q.push("flood".into(), big(&format!("f{i}"))).unwrap();
        }
        let t0 = Instant::now();
        let topics = |g: Vec<Waiting>| g.into_iter().map(|m| m.topic).collect::<Vec<_>>();
        assert_eq!(topics(q.pop_group(512, 1 << 20, t0)), ["f0"]);
        assert_eq!(topics(q.pop_group(512, 1 << 20, t0)), ["f1"]);
        // 120 of 100 bytes spent: the flood waits, a quiet source is served.
        q.push("quiet".into(), big("q0")).unwrap();
        assert_eq!(topics(q.pop_group(512, 1 << 20, t0)), ["q0"]);
        assert!(q.pop_group(512, 1 << 20, t0).is_empty());
        assert_eq!(q.len(), 2, "waiting, not dropped");
        // Half a second later its quota is back above zero.
        let later = t0 + std::time::Duration::from_millis(500);
        assert_eq!(topics(q.pop_group(512, 1 << 20, later)), ["f2"]);
    }

    #[test]
    fn a_source_beyond_its_share_is_refused_and_others_are_not() {
        let mut q = FairQueue::default();
        for i in 0..PER_SOURCE_MESSAGES {
            q.push("flood".into(), msg(&format!("f{i}"))).unwrap();
        }
        assert_eq!(
            q.push("flood".into(), msg("too many")),
            Err(Flooding {
                source: "flood".into(),
                bytes: 8
            })
        );
        q.push("quiet".into(), msg("q0")).unwrap();
        assert_eq!(q.len(), PER_SOURCE_MESSAGES + 1);
        // Once the flood's queue drains, it may queue again.
        q.pop();
        q.push("flood".into(), msg("later")).unwrap();
        let mut refusals = Refusals::default();
        refusals.note(Flooding {
            source: "flood".into(),
            bytes: 8,
        });
        refusals.note(Flooding {
            source: "flood".into(),
            bytes: 2,
        });
        assert_eq!(refusals.take()["flood"], (2, 10));
        assert!(refusals.take().is_empty());
    }
}
