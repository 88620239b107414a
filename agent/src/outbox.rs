//! Events captured and not yet acknowledged by the collector.
//!
//! This is the in-memory outbox of the spine: bounded by a count, oldest dropped
//! first, every drop returned to the caller with its exact range so it is reported as
//! `agent.events_lost`. The durable journal (hash-chained segments on disk) replaces
//! it behind the same operations.
//!
//! Each event is either *unsent* or *in flight* in one batch. An ack removes the keys
//! it names; a reconnect or an ack timeout makes in-flight events unsent again, so
//! everything unacknowledged is re-sent no matter what the broker claims about sessions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use weilan_config::event::{Envelope, EventKey};

/// Events dropped to respect the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub count: u64,
    pub first: EventKey,
    pub last: EventKey,
}

#[derive(Debug)]
struct InFlight {
    keys: Vec<EventKey>,
    sent: Instant,
}

#[derive(Debug)]
pub struct Outbox {
    max_events: usize,
    events: BTreeMap<EventKey, Envelope>,
    unsent: BTreeSet<EventKey>,
    in_flight: HashMap<u64, InFlight>,
    next_batch_id: u64,
}

impl Outbox {
    pub fn new(max_events: usize) -> Self {
        Outbox {
            max_events: max_events.max(1),
            events: BTreeMap::new(),
            unsent: BTreeSet::new(),
            in_flight: HashMap::new(),
            // Batch ids only need to be unique within one agent run.
            next_batch_id: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    pub fn batches_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Adds an event; if the outbox is full, drops the oldest events first.
    pub fn append(&mut self, env: Envelope) -> Option<Dropped> {
        let mut dropped: Option<Dropped> = None;
        while self.events.len() >= self.max_events {
            let Some((key, _)) = self.events.pop_first() else {
                break;
            };
            self.unsent.remove(&key);
            dropped = Some(match dropped {
                None => Dropped {
                    count: 1,
                    first: key,
                    last: key,
                },
                Some(d) => Dropped {
                    count: d.count + 1,
                    first: d.first,
                    last: key,
                },
            });
        }
        let key = env.event_id.key;
        self.events.insert(key, env);
        self.unsent.insert(key);
        dropped
    }

    /// Takes up to `max` unsent events (oldest first) as a new in-flight batch.
    pub fn next_batch(&mut self, max: usize) -> Option<(u64, Vec<Envelope>)> {
        let keys: Vec<EventKey> = self.unsent.iter().take(max).copied().collect();
        if keys.is_empty() {
            return None;
        }
        let mut events = Vec::with_capacity(keys.len());
        for k in &keys {
            self.unsent.remove(k);
            if let Some(e) = self.events.get(k) {
                events.push(e.clone());
            }
        }
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        self.in_flight.insert(
            id,
            InFlight {
                keys,
                sent: Instant::now(),
            },
        );
        Some((id, events))
    }

    /// Forgets acknowledged events; returns how many were held.
    pub fn ack(&mut self, batch_id: u64, keys: &[EventKey]) -> usize {
        let mut n = 0;
        for k in keys {
            if self.events.remove(k).is_some() {
                n += 1;
            }
            self.unsent.remove(k);
        }
        if let Some(b) = self.in_flight.remove(&batch_id) {
            // Keys of the batch the ack did not name are sent again.
            for k in b.keys {
                if self.events.contains_key(&k) {
                    self.unsent.insert(k);
                }
            }
        }
        n
    }

    /// Everything in flight becomes unsent (after a reconnect).
    pub fn rewind(&mut self) {
        for (_, b) in self.in_flight.drain() {
            for k in b.keys {
                if self.events.contains_key(&k) {
                    self.unsent.insert(k);
                }
            }
        }
    }

    /// Batches without an ack for `timeout` become unsent; returns how many.
    pub fn expire(&mut self, timeout: Duration) -> usize {
        let now = Instant::now();
        let stale: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, b)| now.duration_since(b.sent) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            if let Some(b) = self.in_flight.remove(id) {
                for k in b.keys {
                    if self.events.contains_key(&k) {
                        self.unsent.insert(k);
                    }
                }
            }
        }
        stale.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weilan_config::event::{AgentStopping, Event};

    fn env(seq: u64) -> Envelope {
        Envelope {
            schema: 1,
            event_id: format!("a:1:{seq}").parse().unwrap(),
            time: jiff::Timestamp::UNIX_EPOCH,
            host_role: "workstation".into(),
            event: Event::AgentStopping(AgentStopping { reason: "t".into() }),
        }
    }
    fn key(seq: u64) -> EventKey {
        EventKey { epoch: 1, seq }
    }

    #[test]
    fn drops_oldest_with_exact_range_when_full() {
        let mut o = Outbox::new(3);
        for s in 1..=3 {
            assert_eq!(o.append(env(s)), None);
        }
        assert_eq!(
            o.append(env(4)),
            Some(Dropped {
                count: 1,
                first: key(1),
                last: key(1)
            })
        );
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn unacked_batches_are_resent_after_rewind_or_timeout() {
        let mut o = Outbox::new(10);
        for s in 1..=5 {
            o.append(env(s));
        }
        let (b1, e1) = o.next_batch(2).unwrap();
        assert_eq!(e1.len(), 2);
        let (_b2, e2) = o.next_batch(10).unwrap();
        assert_eq!(e2.len(), 3);
        assert!(o.next_batch(10).is_none());
        assert_eq!(o.ack(b1, &[key(1), key(2)]), 2);
        o.rewind();
        let (_, again) = o.next_batch(10).unwrap();
        assert_eq!(
            again.iter().map(|e| e.event_id.key.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(o.expire(Duration::ZERO), 1);
        assert!(o.has_unsent());
        // A partial ack leaves the rest to be sent again.
        let (b, _) = o.next_batch(10).unwrap();
        o.ack(b, &[key(3)]);
        assert_eq!(o.len(), 2);
        assert!(o.has_unsent());
    }
}
