//! Compaction, lookups by key, rebuilt bytes and retention of heartbeat blocks,
//! through ingest's own storage path.

use super::*;
use crate::db::{params, Sql};
use crate::rules::findings::{CHAIN_BREAK, KEY_REUSED};
use crate::store::{Incoming, Store};
use weilan_config::event::{GENESIS_HASH, SCHEMA_VERSION};

/// One agent's journal, serialized as the agent serializes it.
struct Journal {
    seq: u64,
    prev: String,
}

const T0: i64 = 1_795_000_000; // 2026-11-18

impl Journal {
    fn new() -> Journal {
        Journal {
            seq: 0,
            prev: GENESIS_HASH.to_string(),
        }
    }

    fn record(&mut self, at: i64, event: Event) -> String {
        self.seq += 1;
        let env = Envelope {
            schema: SCHEMA_VERSION,
            event_id: EventId {
                agent_id: "ws-1".into(),
                key: EventKey {
                    epoch: 7,
                    seq: self.seq,
                },
            },
            time: jiff::Timestamp::from_millisecond(at * 1000 + 123).unwrap(),
            host_role: "workstation".into(),
            site: Some("3F".into()),
            prev_hash: std::mem::take(&mut self.prev),
            event,
        };
        let raw = serde_json::to_string(&env).unwrap();
        self.prev = record_hash(raw.as_bytes());
        raw
    }

    fn heartbeat(&mut self, at: i64, policy: &str) -> String {
        self.record(
            at,
            Event::AgentHeartbeat(Heartbeat {
                agent_version: "0.1.0".into(),
                uptime_secs: (at - T0) as u64,
                policy_version: Some(policy.into()),
                backlog: (at % 7) as u64,
                dropped_total: 2,
            }),
        )
    }

    fn stopping(&mut self, at: i64) -> String {
        self.record(
            at,
            Event::AgentStopping(weilan_config::event::AgentStopping {
                reason: "signal".into(),
            }),
        )
    }
}

/// Stores `raws` as ingest does, received at `at` (Unix seconds); the findings' kinds.
fn ingest(s: &mut Store, raws: &[String], at: i64) -> Vec<&'static str> {
    let incoming: Vec<Incoming<'_>> = raws.iter().map(|r| Incoming::parse(r).unwrap()).collect();
    let received = jiff::Timestamp::from_millisecond(at * 1000 + 456).unwrap();
    let (_, found) = s
        .in_transaction(|tx| {
            crate::ingest::store_batch_in(tx, "ws-1", &incoming, received, |_, _, f| Ok(f))
        })
        .unwrap();
    found.iter().map(|f| f.kind).collect()
}

fn cutoff(at: i64) -> String {
    jiff::Timestamp::from_second(at).unwrap().to_string()
}

/// Three hours of heartbeats every 30 s (policy v7, then v8), an event after every
/// 50th, one batch each; returns every batch.
fn three_hours(s: &mut Store, j: &mut Journal) -> Vec<Vec<String>> {
    let mut batches = Vec::new();
    for i in 0..360 {
        let at = T0 + 30 * i;
        let mut batch = vec![j.heartbeat(at, if i < 200 { "v7" } else { "v8" })];
        if i % 50 == 49 {
            batch.push(j.stopping(at));
        }
        assert!(ingest(s, &batch, at).is_empty());
        batches.push(batch);
    }
    batches
}

/// What keeps a test's store: its folder, and its PostgreSQL database if any.
type Kept = (tempfile::TempDir, Option<crate::db::testing::TempDatabase>);

/// A fresh database holding [`three_hours`] of one agent.
fn stored_three_hours() -> (Kept, Store, Journal, Vec<Vec<String>>) {
    let dir = tempfile::tempdir().unwrap();
    let (location, postgres) = crate::db::testing::store_location(dir.path());
    let mut s = Store::open_at(&location).unwrap();
    let mut j = Journal::new();
    let batches = three_hours(&mut s, &mut j);
    ((dir, postgres), s, j, batches)
}

fn rows(s: &mut Store, kind: &str) -> i64 {
    s.conn()
        .query_row(
            "SELECT COUNT(*) FROM events WHERE kind = ?1",
            params![kind],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn old_heartbeats_become_blocks_that_rebuild_every_record_byte_for_byte() {
    let (_dir, mut s, _, batches) = stored_three_hours();
    let all = s.count_events().unwrap();
    assert_eq!(all, 360 + 7);

    // Two hours are old enough: 240 heartbeats; the rest stay rows. (Receive times
    // end in .456 s, and RFC 3339 text compares `.` before `Z`: cutoffs fall between.)
    let done = compact(s.conn(), &cutoff(T0 + 2 * 3600 - 10)).unwrap();
    assert_eq!((done.heartbeats, done.kept_as_rows), (240, 0), "{done:?}");
    // About 1 KB of entries each, and split at the policy change (checked below).
    assert!(done.blocks >= 4, "{done:?}");
    assert_eq!(rows(&mut s, "agent.heartbeat"), 120);
    assert_eq!(
        s.count_events().unwrap(),
        all,
        "nothing lost, nothing counted twice"
    );

    // Every compacted record comes back as the bytes that were stored.
    let blocks: Vec<Block> = s
        .conn()
        .query_map(
            &format!("SELECT {BLOCK_COLUMNS} FROM heartbeat_blocks ORDER BY first_seq"),
            params![],
            Block::from_row,
        )
        .unwrap();
    for b in &blocks {
        assert!(
            b.entries.len() < MAX_BLOCK_ENTRY_BYTES + 100,
            "{}",
            b.entries.len()
        );
    }
    let per_block: Vec<Vec<Record>> = blocks
        .into_iter()
        .map(|b| b.open().unwrap().all().unwrap())
        .collect();
    for records in &per_block {
        let policies: std::collections::BTreeSet<bool> = records
            .iter()
            .map(|r| r.envelope.contains("\"v7\""))
            .collect();
        assert_eq!(policies.len(), 1, "one policy version per block");
        let at = |r: &Record| r.received_at.parse::<jiff::Timestamp>().unwrap();
        let span = at(records.last().unwrap()).duration_since(at(&records[0]));
        assert!(span < jiff::SignedDuration::from_hours(1), "{span}");
    }
    let rebuilt: Vec<Record> = per_block.into_iter().flatten().collect();
    let originals: Vec<&String> = batches.iter().take(240).map(|b| &b[0]).collect();
    assert_eq!(rebuilt.len(), 240);
    for (r, raw) in rebuilt.iter().zip(originals) {
        assert_eq!(&r.envelope, raw);
        assert_eq!(r.hash, record_hash(raw.as_bytes()));
    }
    assert_eq!(rebuilt[0].received_at, "2026-11-18T11:06:40.456Z");

    // The same cutoff again: the next heartbeat is too young, nothing is read.
    assert_eq!(
        compact(s.conn(), &cutoff(T0 + 2 * 3600 - 10)).unwrap(),
        Compacted::default()
    );
    // Later runs pick up where the last stopped.
    let done = compact(s.conn(), &cutoff(T0 + 4 * 3600)).unwrap();
    assert_eq!((done.heartbeats, done.kept_as_rows), (120, 0), "{done:?}");
    assert_eq!(rows(&mut s, "agent.heartbeat"), 0);
    assert_eq!(rows(&mut s, "agent.stopping"), 7, "other events stay rows");
    // Nothing left to examine: the watermark reaches the end of the stream, so the
    // stream is not looked at again until it grows.
    let (to, watermark): (i64, i64) = s
        .conn()
        .query_row(
            "SELECT contiguous_to, heartbeats_compacted_to FROM streams WHERE agent_id = 'ws-1'",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((watermark, to), (367, 367));
}

#[test]
fn compacted_keys_are_still_held_resent_reused_and_chained() {
    let (_dir, mut s, j, batches) = stored_three_hours();
    let later = T0 + 5 * 3600;
    compact(s.conn(), &cutoff(later)).unwrap();
    assert_eq!(rows(&mut s, "agent.heartbeat"), 0);
    let all = s.count_events().unwrap();

    // A re-sent batch is duplicates: nothing stored, nothing alerted.
    assert!(ingest(&mut s, &batches[10], later).is_empty());
    assert_eq!(s.count_events().unwrap(), all);
    assert_eq!(rows(&mut s, "agent.heartbeat"), 0);

    // Other bytes under a compacted key: quarantined as a reused key.
    let mut other = Journal {
        seq: 10,
        prev: j.prev.clone(),
    };
    let forged = other.heartbeat(T0 + 999, "v7");
    assert_eq!(ingest(&mut s, &[forged], later), vec![KEY_REUSED]);
    assert_eq!(s.count_events().unwrap(), all);

    // The next record links to the last heartbeat, compacted: a wrong link breaks.
    let last = EventKey {
        epoch: 7,
        seq: j.seq,
    };
    assert_eq!(
        stored_hash(s.conn(), "ws-1", last).unwrap(),
        Some(j.prev.clone())
    );
    let mut wrong = Journal {
        seq: j.seq,
        prev: "ab".repeat(32),
    };
    assert_eq!(
        ingest(&mut s, &[wrong.stopping(later)], later),
        vec![CHAIN_BREAK]
    );
}

#[test]
fn the_record_after_a_compacted_heartbeat_links_to_it() {
    let (_dir, mut s, mut j, _) = stored_three_hours();
    let later = T0 + 5 * 3600;
    compact(s.conn(), &cutoff(later)).unwrap();
    assert_eq!(rows(&mut s, "agent.heartbeat"), 0);
    assert!(ingest(&mut s, &[j.stopping(later)], later).is_empty());
}

#[test]
fn a_heartbeat_that_cannot_be_rebuilt_exactly_stays_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let (location, _postgres) = crate::db::testing::store_location(dir.path());
    let mut s = Store::open_at(&location).unwrap();
    let mut j = Journal::new();
    let mut raws = Vec::new();
    for i in 0..4 {
        let raw = j.heartbeat(T0 + 30 * i, "v7");
        // The second written with its fields in another order (another serializer).
        let raw = if i == 1 {
            let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
            let again = v.to_string();
            assert_ne!(again, raw);
            j.prev = record_hash(again.as_bytes());
            again
        } else {
            raw
        };
        raws.push(raw);
    }
    // Hashes were chained over the bytes as sent: re-chain the later ones.
    let mut j2 = Journal::new();
    let mut chained = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        if i == 1 {
            let mut v: serde_json::Value = serde_json::from_str(raw).unwrap();
            v["prev_hash"] = j2.prev.clone().into();
            let again = v.to_string();
            j2.seq += 1;
            j2.prev = record_hash(again.as_bytes());
            chained.push(again);
        } else {
            chained.push(j2.heartbeat(T0 + 30 * i as i64, "v7"));
        }
    }
    assert!(ingest(&mut s, &chained, T0 + 200).is_empty());
    let done = compact(s.conn(), &cutoff(T0 + 3600)).unwrap();
    assert_eq!((done.heartbeats, done.kept_as_rows), (3, 1), "{done:?}");
    assert_eq!(rows(&mut s, "agent.heartbeat"), 1);
    // The one after the row names it explicitly: all three rebuild.
    for seq in [1, 3, 4] {
        let want = record_hash(chained[seq as usize - 1].as_bytes());
        assert_eq!(
            compacted_hash(s.conn(), "ws-1", EventKey { epoch: 7, seq }).unwrap(),
            Some(want)
        );
    }
}

#[test]
fn retention_drops_whole_blocks_received_before_the_cutoff() {
    let (_dir, mut s, _, _) = stored_three_hours();
    compact(s.conn(), &cutoff(T0 + 4 * 3600)).unwrap();
    let blocks = |s: &mut Store| -> i64 {
        s.conn()
            .query_row("SELECT COUNT(*) FROM heartbeat_blocks", params![], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let held = |s: &mut Store| -> i64 {
        s.conn()
            .query_row(
                "SELECT CAST(SUM(count) AS BIGINT) FROM heartbeat_blocks",
                params![],
                |r| r.get(0),
            )
            .unwrap()
    };
    let (before, all) = (blocks(&mut s), held(&mut s));
    let limit = cutoff(T0 + 3600 - 10);
    let removed = prune(s.conn(), &limit).unwrap();
    // Whole blocks: those that end before the cutoff, not the one that straddles it.
    assert!(removed > 0 && removed < 120, "{removed}");
    assert_eq!(held(&mut s), all - removed as i64);
    assert!(blocks(&mut s) < before);
    let ended: i64 = s
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM heartbeat_blocks WHERE last_received < ?1",
            params![&limit],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(ended, 0);
    // The first heartbeat received after the cutoff (the 121st, after two other
    // events) is still held, in the block that straddles the cutoff.
    let first_after = EventKey {
        epoch: 7,
        seq: 121 + 2,
    };
    assert!(stored_hash(s.conn(), "ws-1", first_after)
        .unwrap()
        .is_some());
    assert_eq!(prune(s.conn(), &limit).unwrap(), 0);
}
