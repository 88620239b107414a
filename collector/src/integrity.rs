//! Integrity of each agent's event stream: the hash chain and sequence continuity.
//!
//! Every record names the SHA-256 of its predecessor's bytes (`prev_hash`). When an
//! event is stored, the link to its predecessor and to its successor (whichever is
//! already stored; batches may arrive out of order after re-sends) is checked; a
//! mismatch means a record was edited or replaced while buffered: a red alert.
//! Continuity is tracked per `(agent, epoch)` in `streams`: the highest contiguous
//! sequence and the highest seen. A hole that stays open longer than the grace period
//! (re-sends fill transient ones) is a gap alert, raised by [`open_gaps`].
//!
//! Every start of an agent is a new epoch whose first record, `agent.epoch_started`,
//! names its installation and the last record it had journaled (`previous`). From it
//! the collector tells a restart (nothing to report) from a re-installation (a new
//! installation id: yellow), a state restored from an older copy (it resumes from a
//! record before ones already stored: red) and a wiped journal (no `previous` for a
//! known installation: yellow); and it expects every record up to `previous`, so a
//! tail removed from the journal is a gap like any other. A key stored twice with
//! different bytes is never dropped as a duplicate: it is quarantined with a red alert.

use std::collections::{BTreeSet, HashSet};

use crate::db::{params, Sql, Tx};
use weilan_config::event::GENESIS_HASH;

use weilan_config::event::{EpochStarted, Event, EventKey};

use crate::rules::findings::{
    AGENT_REINSTALLED, AGENT_RESTORED, BAD_SIGNATURE, CHAIN_BREAK, JOURNAL_GAP, JOURNAL_RESET,
    KEY_REUSED,
};
use crate::rules::Finding;
use crate::store::{Incoming, StoreError};

fn finding(
    kind: &'static str,
    agent: &str,
    summary: String,
    ids: Vec<String>,
    details: serde_json::Value,
) -> Finding {
    Finding {
        kind,
        agent_id: agent.into(),
        summary,
        event_ids: ids,
        details,
    }
}

/// Checks the links of newly stored events and updates the streams they belong to.
pub fn check_new(
    tx: &Tx<'_>,
    agent: &str,
    events: &[Incoming<'_>],
    new: &[usize],
    now: &str,
) -> Result<Vec<Finding>, StoreError> {
    let mut alerts = Vec::new();
    // Each link (epoch, seq of the later record) is judged once.
    let mut judged: HashSet<(u64, u64)> = HashSet::new();
    let mut epochs: BTreeSet<u64> = BTreeSet::new();
    // The records stored by this batch, by key: a neighbour among them is compared
    // here rather than read back (a round trip per record on PostgreSQL).
    let stored_now: std::collections::HashMap<(u64, u64), &Incoming<'_>> = new
        .iter()
        .map(|&i| {
            let k = events[i].envelope.event_id.key;
            ((k.epoch, k.seq), &events[i])
        })
        .collect();
    for &i in new {
        let ev = &events[i];
        let key = ev.envelope.event_id.key;
        epochs.insert(key.epoch);
        // Link to the predecessor.
        if judged.insert((key.epoch, key.seq)) {
            let expected: Option<(String, String)> = if key.seq == 1 {
                Some((GENESIS_HASH.to_string(), "(start of epoch)".to_string()))
            } else {
                let prev = EventKey {
                    epoch: key.epoch,
                    seq: key.seq - 1,
                };
                match stored_now.get(&(prev.epoch, prev.seq)) {
                    Some(p) => Some(p.hash.to_string()),
                    None => crate::heartbeats::stored_hash(tx, agent, prev)?,
                }
                .map(|h| (h, format!("{agent}:{prev}")))
            };
            if let Some((hash, prev_id)) = expected {
                if hash != ev.envelope.prev_hash {
                    alerts.push(finding(
                        CHAIN_BREAK,
                        agent,
                        format!(
                            "Journal hash chain broken on {agent} before event {}: a buffered record was altered or replaced",
                            ev.envelope.event_id
                        ),
                        vec![prev_id.clone(), ev.envelope.event_id.to_string()],
                        serde_json::json!({"expected_prev_hash": hash, "prev_hash": ev.envelope.prev_hash}),
                    ));
                }
            }
        }
        // Link to a successor stored earlier.
        if judged.insert((key.epoch, key.seq + 1)) {
            let next: Option<(String, String)> = match stored_now.get(&(key.epoch, key.seq + 1)) {
                Some(n) => Some((
                    n.envelope.prev_hash.clone(),
                    n.envelope.event_id.to_string(),
                )),
                None => tx.query_opt(
                    "SELECT prev_hash, event_id FROM events WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3",
                    params![agent, key.epoch as i64, key.seq as i64 + 1],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?,
            };
            if let Some((prev_hash, next_id)) = next {
                if prev_hash != ev.hash {
                    alerts.push(finding(
                        CHAIN_BREAK,
                        agent,
                        format!(
                            "Journal hash chain broken on {agent} after event {}: a buffered record was altered or replaced",
                            ev.envelope.event_id
                        ),
                        vec![ev.envelope.event_id.to_string(), next_id],
                        serde_json::json!({"hash": ev.hash, "next_prev_hash": prev_hash}),
                    ));
                }
            }
        }
    }
    for epoch in epochs {
        update_stream(tx, agent, epoch, now, |seq| {
            stored_now.contains_key(&(epoch, seq as u64))
        })?;
    }
    for &i in new {
        let env = &events[i].envelope;
        if let Event::AgentEpochStarted(started) = &env.event {
            if env.event_id.key.seq == 1 {
                judge_epoch_start(tx, agent, env.event_id.key.epoch, started, now, &mut alerts)?;
            }
        }
    }
    Ok(alerts)
}

/// What the first record of an epoch says about the agent's history.
fn judge_epoch_start(
    tx: &Tx<'_>,
    agent: &str,
    epoch: u64,
    started: &EpochStarted,
    now: &str,
    alerts: &mut Vec<Finding>,
) -> Result<(), StoreError> {
    let known: Option<(i64, String)> = tx.query_opt(
        "SELECT epoch, installation FROM streams WHERE agent_id = ?1 AND epoch < ?2
               AND installation IS NOT NULL ORDER BY epoch DESC LIMIT 1",
        params![agent, epoch as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    tx.execute(
        "UPDATE streams SET installation = ?3 WHERE agent_id = ?1 AND epoch = ?2",
        params![agent, epoch as i64, started.installation],
    )?;
    let short = |id: &str| id.chars().take(8).collect::<String>();
    if let Some((_, old)) = known
        .as_ref()
        .filter(|(_, old)| *old != started.installation)
    {
        alerts.push(finding(
            AGENT_REINSTALLED,
            agent,
            format!(
                "Agent {agent} was re-installed or its state directory replaced (installation {} → {}, epoch {epoch}); \
                 its earlier records stay stored and its new ones are kept under new ids",
                short(old),
                short(&started.installation)
            ),
            vec![format!("{agent}:{epoch}:1")],
            serde_json::json!({"previous_installation": old, "installation": started.installation, "epoch": epoch}),
        ));
        return Ok(());
    }
    let Some(previous) = &started.previous else {
        let earlier: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM streams WHERE agent_id = ?1 AND epoch < ?2)",
            params![agent, epoch as i64],
            |r| r.get(0),
        )?;
        if earlier && !started.installation_new {
            alerts.push(finding(
                JOURNAL_RESET,
                agent,
                format!("Agent {agent} started epoch {epoch} with no record of its earlier journal: its journal and recorded head were deleted or reset"),
                vec![format!("{agent}:{epoch}:1")],
                serde_json::json!({"epoch": epoch}),
            ));
        }
        return Ok(());
    };
    let (pe, ps) = (previous.key.epoch as i64, previous.key.seq as i64);
    // Records stored after the point this epoch continues from: made by a run this
    // state has never seen, so the state was restored from an older copy.
    let later: Option<(i64, i64)> = tx.query_opt(
        "SELECT epoch, seq FROM events WHERE agent_id = ?1
               AND ((epoch = ?2 AND seq > ?3) OR (epoch > ?2 AND epoch < ?4))
             ORDER BY epoch DESC, seq DESC LIMIT 1",
        params![agent, pe, ps, epoch as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let compacted = crate::heartbeats::latest_compacted_between(tx, agent, previous.key, epoch)?;
    if let Some((le, ls)) = later.max(compacted) {
        alerts.push(finding(
            AGENT_RESTORED,
            agent,
            format!(
                "Agent {agent} resumed from {agent}:{pe}:{ps} although {agent}:{le}:{ls} was already stored: \
                 its state was restored from an older copy (VM snapshot or backup); what it recorded after that copy \
                 stays stored, and settings it held since (unlocks, policy) were rolled back on the host"
            ),
            vec![format!("{agent}:{epoch}:1"), format!("{agent}:{le}:{ls}")],
            serde_json::json!({"resumed_from": previous.key, "stored_until": {"epoch": le, "seq": ls}, "epoch": epoch}),
        ));
        return Ok(());
    }
    let stored = crate::heartbeats::stored_hash(tx, agent, previous.key)?;
    if stored.as_ref().is_some_and(|h| *h != previous.hash) {
        alerts.push(finding(
            CHAIN_BREAK,
            agent,
            format!("Agent {agent}'s epoch {epoch} continues from {agent}:{pe}:{ps}, but the record stored under that id has other contents"),
            vec![format!("{agent}:{pe}:{ps}"), format!("{agent}:{epoch}:1")],
            serde_json::json!({"expected_prev_hash": stored, "prev_hash": previous.hash}),
        ));
    }
    // Every record up to `previous` is expected: a tail removed is a gap.
    tx.execute(
        "INSERT INTO streams (agent_id, epoch, contiguous_to, max_seq, first_seen) VALUES (?1, ?2, 0, 0, ?3)
         ON CONFLICT DO NOTHING",
        params![agent, pe, now],
    )?;
    tx.execute(
        "UPDATE streams SET expected_to = ?3 WHERE agent_id = ?1 AND epoch = ?2 AND expected_to < ?3",
        params![agent, pe, ps],
    )?;
    update_stream(tx, agent, previous.key.epoch, now, |_| false)
}

/// Records whose key was already held. The same bytes are a re-send; other bytes
/// mean one key was used for two records (a clock set back across a restored state,
/// a cloned machine): the second is quarantined with a red alert, never dropped.
pub fn check_reused(
    tx: &Tx<'_>,
    agent: &str,
    events: &[Incoming<'_>],
    reused: &[usize],
) -> Result<Vec<Finding>, StoreError> {
    let mut alerts = Vec::new();
    for &i in reused {
        let ev = &events[i];
        let id = ev.envelope.event_id.to_string();
        let stored = crate::heartbeats::stored_hash(tx, agent, ev.envelope.event_id.key)?;
        let Some(stored) = stored.filter(|h| *h != ev.hash) else {
            continue;
        };
        crate::store::quarantine_in(
            tx,
            &weilan_config::topics::agent_topic(agent, weilan_config::topics::Channel::Events),
            &format!("event id {id} already held with other contents (sha256 {stored})"),
            ev.raw.as_bytes(),
        )?;
        alerts.push(finding(
            KEY_REUSED,
            agent,
            format!("Agent {agent} sent a second, different record under event id {id}; it was quarantined (the first stays stored)"),
            vec![id],
            serde_json::json!({"stored_hash": stored, "hash": ev.hash}),
        ));
    }
    Ok(alerts)
}

/// Moves the stream's contiguous run and highest sequence forward. `stored_now` says
/// whether a sequence was stored by the batch at hand (no need to read it back).
fn update_stream(
    tx: &Tx<'_>,
    agent: &str,
    epoch: u64,
    now: &str,
    stored_now: impl Fn(i64) -> bool,
) -> Result<(), StoreError> {
    let existing: Option<(i64, i64)> = tx.query_opt(
        "SELECT contiguous_to, expected_to FROM streams WHERE agent_id = ?1 AND epoch = ?2",
        params![agent, epoch as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (mut contiguous, expected_to) = match existing {
        Some(v) => v,
        None => {
            tx.execute(
                "INSERT INTO streams (agent_id, epoch, contiguous_to, max_seq, first_seen) VALUES (?1, ?2, 0, 0, ?3)",
                params![agent, epoch as i64, now],
            )?;
            (0, 0)
        }
    };
    while stored_now(contiguous + 1)
        || tx.exists(
            "SELECT 1 FROM events WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3",
            params![agent, epoch as i64, contiguous + 1],
        )?
    {
        contiguous += 1;
    }
    let max_seq: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE agent_id = ?1 AND epoch = ?2",
            params![agent, epoch as i64],
            |r| r.get::<i64>(0),
        )?
        .max(expected_to);
    if max_seq > contiguous {
        tx.execute(
            "UPDATE streams SET contiguous_to = ?3, max_seq = ?4, gap_since = COALESCE(gap_since, ?5)
             WHERE agent_id = ?1 AND epoch = ?2",
            params![agent, epoch as i64, contiguous, max_seq, now],
        )?;
    } else {
        tx.execute(
            "UPDATE streams SET contiguous_to = ?3, max_seq = ?4, gap_since = NULL
             WHERE agent_id = ?1 AND epoch = ?2",
            params![agent, epoch as i64, contiguous, max_seq],
        )?;
    }
    Ok(())
}

/// Records what a batch said about the agent's journal: its last key and the newest
/// record the agent held when sending it.
pub fn note_uplink_head(
    tx: &Tx<'_>,
    agent: &str,
    last: EventKey,
    head: Option<EventKey>,
    now: jiff::Timestamp,
) -> Result<(), StoreError> {
    let head = head.unwrap_or(last).max(last);
    tx.execute(
        "INSERT INTO uplink_heads (agent_id, last_epoch, last_seq, head_epoch, head_seq, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(agent_id) DO UPDATE SET last_epoch = ?2, last_seq = ?3, head_epoch = ?4,
            head_seq = ?5, at = ?6",
        params![
            agent,
            last.epoch as i64,
            last.seq as i64,
            head.epoch as i64,
            head.seq as i64,
            now.to_string()
        ],
    )?;
    Ok(())
}

/// How long a hole waits for an agent that never catches up on its backlog before
/// it is alerted anyway (its loss report may still be on the way).
const BACKLOG_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// Holes open longer than `grace`: one alert for each (red, or yellow when an
/// `agent.events_lost` event of the agent accounts for the missing range as damage).
/// A hole is due when the record after it arrived more than `grace` ago (re-sends
/// fill transient ones), or, for a tail only the next epoch announced, when the
/// stream's gap is that old — and the agent has caught up: its last batch held the
/// newest record it had, so its own report of the loss, which comes after whatever
/// was queued before it, has arrived. An agent that does not catch up within
/// `BACKLOG_PATIENCE` gets its holes alerted anyway. `gap_alerted_to` is how far
/// every record is stored or its hole alerted (the next check starts there).
pub fn open_gaps(
    conn: &mut crate::db::Conn,
    grace: std::time::Duration,
) -> Result<Vec<Finding>, StoreError> {
    let now = jiff::Timestamp::now();
    let ago = |d: std::time::Duration| {
        (now - jiff::SignedDuration::try_from(d).unwrap_or_default()).to_string()
    };
    let cutoff = ago(grace);
    let patience = ago(grace + BACKLOG_PATIENCE);
    let tx = conn.transaction()?;
    let streams: Vec<(String, i64, i64, i64, i64)> = tx.query_map(
        "SELECT agent_id, epoch, contiguous_to, max_seq, gap_alerted_to FROM streams
         WHERE gap_since IS NOT NULL AND gap_since <= ?1 AND max_seq > gap_alerted_to",
        params![cutoff],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    let mut alerts = Vec::new();
    for (agent, epoch, contiguous, max_seq, alerted_to) in streams {
        let caught_up: bool = tx
            .query_opt(
                "SELECT head_epoch < last_epoch OR (head_epoch = last_epoch AND head_seq <= last_seq)
                 FROM uplink_heads WHERE agent_id = ?1",
                params![agent],
                |r| r.get(0),
            )?
            .unwrap_or(true);
        // The stored records above the contiguous run, in order, with their arrival.
        let after: Vec<(i64, String)> = tx.query_map(
            "SELECT seq, received_at FROM events WHERE agent_id = ?1 AND epoch = ?2 AND seq > ?3 ORDER BY seq",
            params![agent, epoch, contiguous.max(alerted_to)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let due = |since: &str| (caught_up && *since <= *cutoff) || *since <= *patience;
        let mut holes: Vec<(i64, i64, bool)> = Vec::new();
        let mut expect = contiguous.max(alerted_to) + 1;
        for (seq, received_at) in &after {
            if *seq > expect {
                holes.push((expect, seq - 1, due(received_at)));
            }
            expect = seq + 1;
        }
        if max_seq >= expect {
            // Announced by the next epoch: open since the stream's gap opened.
            let since: Option<String> = tx.query_row(
                "SELECT gap_since FROM streams WHERE agent_id = ?1 AND epoch = ?2",
                params![agent, epoch],
                |r| r.get(0),
            )?;
            holes.push((expect, max_seq, since.as_deref().is_some_and(due)));
        }
        // Everything up to `done_to` is stored or alerted: the next check starts there,
        // so a long epoch with one old hole is not scanned again and again.
        let mut done_to = alerted_to;
        let mut waiting = false;
        for (from, to, due) in holes {
            if !due {
                waiting = true;
                break;
            }
            alerts.push(gap_finding(&tx, &agent, epoch, from, to)?);
            done_to = to;
        }
        if !waiting {
            let last_stored = after.last().map_or(0, |(s, _)| *s);
            done_to = done_to.max(last_stored);
        }
        if done_to > alerted_to {
            tx.execute(
                "UPDATE streams SET gap_alerted_to = ?3 WHERE agent_id = ?1 AND epoch = ?2",
                params![agent, epoch, done_to],
            )?;
        }
    }
    tx.commit()?;
    Ok(alerts)
}

/// The alert for one hole, red unless the agent reported it as damage.
fn gap_finding(
    tx: &Tx<'_>,
    agent: &str,
    epoch: i64,
    from: i64,
    to: i64,
) -> Result<Finding, StoreError> {
    // The agent's own report of the loss, if any: damage explains a gap, records
    // it found removed whole from its journal do not (deleted, not damaged).
    let reported: Option<String> = tx.query_opt(
        tx.pick(
            "SELECT json_extract(envelope, '$.event.data.stage') FROM events
             WHERE agent_id = ?1 AND kind = 'agent.events_lost'
               AND json_extract(envelope, '$.event.data.first.epoch') = ?2
               AND json_extract(envelope, '$.event.data.first.seq') <= ?3
               AND json_extract(envelope, '$.event.data.last.seq') >= ?4
             ORDER BY (json_extract(envelope, '$.event.data.stage') = 'journal-removed') LIMIT 1",
            "SELECT envelope::jsonb #>> '{event,data,stage}' FROM events
             WHERE agent_id = ?1 AND kind = 'agent.events_lost'
               AND (envelope::jsonb #>> '{event,data,first,epoch}')::bigint = ?2
               AND (envelope::jsonb #>> '{event,data,first,seq}')::bigint <= ?3
               AND (envelope::jsonb #>> '{event,data,last,seq}')::bigint >= ?4
             ORDER BY (envelope::jsonb #>> '{event,data,stage}') = 'journal-removed' LIMIT 1",
        ),
        params![agent, epoch, from, to],
        |r| r.get(0),
    )?;
    let explained = reported.as_deref().is_some_and(|s| s != "journal-removed");
    let why = match reported.as_deref() {
        Some("journal-removed") => {
            "the agent found them removed whole from its journal (deleted, not damaged)"
        }
        Some(_) => "the agent reported losing them (agent.events_lost)",
        None => "unexplained: records may have been deleted from the agent's journal",
    };
    Ok(finding(
        JOURNAL_GAP,
        agent,
        format!(
            "Events {agent}:{epoch}:{from} to {agent}:{epoch}:{to} ({} events) are missing; {why}",
            to - from + 1
        ),
        vec![],
        serde_json::json!({"epoch": epoch, "first_missing": from, "last_missing": to, "explained": explained}),
    ))
}

/// An alert for a payload on `agent`'s topic that failed verification.
/// A validly signed payload whose certificate was never enrolled (or was revoked).
pub fn unenrolled_certificate(agent: &str, reason: &str, sha256: &str) -> Finding {
    finding(
        crate::rules::findings::UNENROLLED_CERTIFICATE,
        agent,
        format!("A payload signed as {agent} was refused: {reason}; it was quarantined"),
        vec![],
        serde_json::json!({"reason": reason, "payload_sha256": sha256}),
    )
}

pub fn bad_signature(agent: &str, reason: &str, sha256: &str) -> Finding {
    finding(
        BAD_SIGNATURE,
        agent,
        format!("A payload on agent {agent}'s events topic failed verification ({reason}); it was quarantined"),
        vec![],
        serde_json::json!({"reason": reason, "payload_sha256": sha256}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use serde_json::json;
    use weilan_config::event::{record_hash, SCHEMA_VERSION};

    /// One agent's epoch as the agent would journal it.
    struct Epoch {
        epoch: u64,
        seq: u64,
        prev: String,
        heads: Vec<String>,
    }

    impl Epoch {
        fn new(epoch: u64) -> Self {
            Epoch {
                epoch,
                seq: 0,
                prev: GENESIS_HASH.into(),
                heads: vec![],
            }
        }
        fn records(&mut self, events: Vec<(&str, serde_json::Value)>) -> Vec<String> {
            events
                .into_iter()
                .map(|(kind, data)| {
                    self.seq += 1;
                    let raw = json!({
                        "schema": SCHEMA_VERSION, "event_id": format!("ws-1:{}:{}", self.epoch, self.seq),
                        "time": "2026-12-05T01:00:00Z", "host_role": "workstation", "prev_hash": self.prev,
                        "event": {"kind": kind, "data": data},
                    })
                    .to_string();
                    self.prev = record_hash(raw.as_bytes());
                    self.heads.push(self.prev.clone());
                    raw
                })
                .collect()
        }
        fn started(&mut self, installation: &str, previous: Option<(&Epoch, u64)>) -> Vec<String> {
            let previous = previous.map(|(e, seq)| {
                json!({"key": {"epoch": e.epoch, "seq": seq}, "hash": e.heads[seq as usize - 1]})
            });
            self.records(vec![(
                "agent.epoch_started",
                json!({"installation": installation, "installation_new": false, "previous": previous}),
            )])
        }
        fn heartbeats(&mut self, n: usize) -> Vec<String> {
            self.records(
                (0..n)
                    .map(|_| ("agent.stopping", json!({"reason": "filler"})))
                    .collect(),
            )
        }
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// Stores the records; returns the kinds of the findings they raised.
    fn store(s: &mut Store, raws: &[String]) -> Vec<&'static str> {
        let incoming: Vec<Incoming<'_>> =
            raws.iter().map(|r| Incoming::parse(r).unwrap()).collect();
        let (_, found) = s
            .in_transaction(|tx| {
                crate::ingest::store_batch_in(
                    tx,
                    "ws-1",
                    &incoming,
                    jiff::Timestamp::now(),
                    |_, _, found| Ok(found),
                )
            })
            .unwrap();
        found.iter().map(|f| f.kind).collect()
    }

    fn gaps(s: &mut Store) -> Vec<serde_json::Value> {
        open_gaps(s.conn(), std::time::Duration::ZERO)
            .unwrap()
            .into_iter()
            .map(|f| f.details)
            .collect()
    }

    /// A store, with what keeps it (its folder; its PostgreSQL database).
    fn fresh() -> (
        (tempfile::TempDir, Option<crate::db::testing::TempDatabase>),
        Store,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (location, postgres) = crate::db::testing::store_location(dir.path());
        let s = Store::open_at(&location).unwrap();
        ((dir, postgres), s)
    }

    #[test]
    fn a_record_altered_inside_one_batch_breaks_the_chain_once_at_its_successor() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        let mut batch = e1.started(A, None);
        batch.extend(e1.heartbeats(3));
        // Record 3 rewritten after the fact: it still links to record 2, so its own
        // link holds, but record 4 names the original's hash.
        batch[2] = batch[2].replace("filler", "forged");
        assert_eq!(store(&mut s, &batch), [CHAIN_BREAK]);
        // The same break across two batches (the successor stored first) is found too.
        let (_d2, mut s2) = fresh();
        let mut e2 = Epoch::new(200);
        let mut all = e2.started(A, None);
        all.extend(e2.heartbeats(3));
        all[2] = all[2].replace("filler", "forged");
        assert_eq!(store(&mut s2, &all[3..]), Vec::<&str>::new());
        assert_eq!(store(&mut s2, &all[..3]), [CHAIN_BREAK]);
    }

    #[test]
    fn a_restart_that_continues_from_the_last_stored_record_raises_nothing() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        let mut batch = e1.started(A, None);
        batch.extend(e1.heartbeats(4));
        assert!(store(&mut s, &batch).is_empty());
        let mut e2 = Epoch::new(200);
        let mut batch = e2.started(A, Some((&e1, 5)));
        batch.extend(e2.heartbeats(2));
        assert_eq!(store(&mut s, &batch), Vec::<&str>::new());
        assert!(gaps(&mut s).is_empty());
    }

    #[test]
    fn a_new_installation_is_reported_once_and_its_events_are_stored() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        let mut batch = e1.started(A, None);
        batch.extend(e1.heartbeats(4));
        store(&mut s, &batch);
        let mut e2 = Epoch::new(200);
        let mut batch = e2.started(B, None);
        batch.extend(e2.heartbeats(3));
        assert_eq!(store(&mut s, &batch), vec![AGENT_REINSTALLED]);
        assert_eq!(s.count_events().unwrap(), 9);
        let mut e3 = Epoch::new(300);
        assert!(
            store(&mut s, &e3.started(B, Some((&e2, 4)))).is_empty(),
            "the next restart of the new installation is quiet"
        );
    }

    #[test]
    fn resuming_from_before_stored_records_is_a_restore() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        let mut batch = e1.started(A, None);
        batch.extend(e1.heartbeats(9));
        store(&mut s, &batch);
        // The state directory was copied when the journal ended at 1:4.
        let mut e2 = Epoch::new(200);
        assert_eq!(
            store(&mut s, &e2.started(A, Some((&e1, 4)))),
            vec![AGENT_RESTORED]
        );
        // Also when the epochs after the copy are what is stored.
        let mut e3 = Epoch::new(300);
        store(&mut s, &e3.started(A, Some((&e2, 1))));
        let mut e4 = Epoch::new(400);
        assert_eq!(
            store(&mut s, &e4.started(A, Some((&e2, 1)))),
            vec![AGENT_RESTORED]
        );
    }

    #[test]
    fn a_wiped_journal_of_a_known_installation_is_a_reset() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        store(&mut s, &e1.started(A, None));
        let mut e2 = Epoch::new(200);
        assert_eq!(store(&mut s, &e2.started(A, None)), vec![JOURNAL_RESET]);
    }

    #[test]
    fn a_tail_the_next_epoch_names_but_never_arrived_is_a_gap() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        let mut batch = e1.started(A, None);
        batch.extend(e1.heartbeats(9));
        store(&mut s, &batch[..6]); // 1..=6 arrive; 7..=10 were cut from the journal
        let mut e2 = Epoch::new(200);
        assert!(store(&mut s, &e2.started(A, Some((&e1, 10)))).is_empty());
        let g = gaps(&mut s);
        assert_eq!(g.len(), 1, "{g:?}");
        assert_eq!(
            (
                &g[0]["epoch"],
                &g[0]["first_missing"],
                &g[0]["last_missing"]
            ),
            (&json!(100), &json!(7), &json!(10))
        );
    }

    #[test]
    fn every_hole_is_alerted_once_and_a_removal_is_not_explained_by_its_report() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        let mut batch = e1.started(A, None);
        batch.extend(e1.heartbeats(19)); // 1..=20
        let mut e2 = Epoch::new(200);
        let lost = |stage: &str, first: u64, last: u64| {
            (
                "agent.events_lost",
                json!({"count": last - first + 1, "stage": stage, "reason": "test",
                "first": {"epoch": 100, "seq": first}, "last": {"epoch": 100, "seq": last}}),
            )
        };
        let mut next = e2.started(A, Some((&e1, 20)));
        next.extend(e2.records(vec![lost("journal", 5, 5), lost("journal-removed", 12, 14)]));
        // 5 damaged, 12..=14 removed whole, 19..=20 never announced by a report.
        let kept: Vec<String> = batch
            .iter()
            .enumerate()
            .filter(|(i, _)| ![4, 11, 12, 13, 18, 19].contains(i))
            .map(|(_, r)| r.clone())
            .collect();
        store(&mut s, &kept);
        store(&mut s, &next);
        let g = gaps(&mut s);
        let got: Vec<(i64, i64, bool)> = g
            .iter()
            .map(|d| {
                (
                    d["first_missing"].as_i64().unwrap(),
                    d["last_missing"].as_i64().unwrap(),
                    d["explained"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, vec![(5, 5, true), (12, 14, false), (19, 20, false)]);
        assert!(gaps(&mut s).is_empty(), "each hole is alerted once");
    }

    #[test]
    fn a_hole_waits_until_the_agent_has_sent_its_backlog() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        let mut batch = e1.started(A, None);
        batch.extend(e1.heartbeats(9));
        batch.remove(4); // seq 5 missing
        store(&mut s, &batch);
        let head = |s: &mut Store, last: u64, head: (u64, u64)| {
            s.in_transaction(|tx| {
                note_uplink_head(
                    tx,
                    "ws-1",
                    EventKey {
                        epoch: 100,
                        seq: last,
                    },
                    Some(EventKey {
                        epoch: head.0,
                        seq: head.1,
                    }),
                    jiff::Timestamp::now(),
                )
            })
            .unwrap()
        };
        // The agent still holds a newer epoch (its report of the loss comes there).
        head(&mut s, 10, (200, 3));
        assert!(
            gaps(&mut s).is_empty(),
            "not judged while the backlog is on its way"
        );
        head(&mut s, 10, (100, 10));
        assert_eq!(gaps(&mut s).len(), 1, "judged once the agent caught up");
    }

    #[test]
    fn one_id_with_other_contents_is_quarantined_and_alerted_not_dropped() {
        let (_d, mut s) = fresh();
        let mut e1 = Epoch::new(100);
        let batch = e1.started(A, None);
        store(&mut s, &batch);
        assert!(store(&mut s, &batch).is_empty(), "a re-send is a duplicate");
        let mut other = Epoch::new(100);
        let forged = other.started(B, None);
        assert_eq!(store(&mut s, &forged), vec![KEY_REUSED]);
        assert_eq!(s.count_quarantine().unwrap(), 1);
        assert_eq!(s.count_events().unwrap(), 1);
    }
}
