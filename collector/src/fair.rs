//! Fair ingest: what the broker delivers is queued per source (the agent or door
//! controller its topic names) and taken round-robin, so one source's flood waits
//! behind itself and never in front of another agent's events.
//!
//! The collector reads from the broker as fast as it can into [`FairQueue`]. A source
//! holds at most [`PER_SOURCE_MESSAGES`] waiting messages — a Weilan agent has at most
//! `max_batches_in_flight` (8 by default, 32 at most) batches unacknowledged, so only a
//! source that ignores the protocol ever reaches it — and what comes beyond is refused
//! without being processed: counted per source ([`Refusals`], flushed to the
//! quarantine counts) and raised as `builtin.collector.source-flooding`. Messages of
//! one source keep their order (chain and gap checks rely on it).

use std::collections::{HashMap, VecDeque};

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
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub struct Flooding {
    pub source: String,
    pub bytes: usize,
}

impl FairQueue {
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
