//! Integrity of each agent's event stream: the hash chain and sequence continuity.
//!
//! Every record names the SHA-256 of its predecessor's bytes (`prev_hash`). When an
//! event is stored, the link to its predecessor and to its successor (whichever is
//! already stored; batches may arrive out of order after re-sends) is checked; a
//! mismatch means a record was edited or replaced while buffered: a red alert.
//! Continuity is tracked per `(agent, epoch)` in `streams`: the highest contiguous
//! sequence and the highest seen. A hole that stays open longer than the grace period
//! (re-sends fill transient ones) is a gap alert, raised by [`open_gaps`]. A new epoch
//! for a known agent means its journal started over: a yellow alert.

use std::collections::{BTreeSet, HashSet};

use rusqlite::{params, OptionalExtension, Transaction};
use weilan_config::event::GENESIS_HASH;

use crate::rules::findings::{BAD_SIGNATURE, CHAIN_BREAK, JOURNAL_GAP, JOURNAL_RESET};
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
    tx: &Transaction<'_>,
    agent: &str,
    events: &[Incoming<'_>],
    new: &[usize],
    now: &str,
) -> Result<Vec<Finding>, StoreError> {
    let mut alerts = Vec::new();
    // Each link (epoch, seq of the later record) is judged once.
    let mut judged: HashSet<(u64, u64)> = HashSet::new();
    let mut epochs: BTreeSet<u64> = BTreeSet::new();
    for &i in new {
        let ev = &events[i];
        let key = ev.envelope.event_id.key;
        epochs.insert(key.epoch);
        // Link to the predecessor.
        if judged.insert((key.epoch, key.seq)) {
            let expected: Option<(String, String)> = if key.seq == 1 {
                Some((GENESIS_HASH.to_string(), "(start of epoch)".to_string()))
            } else {
                tx.query_row(
                    "SELECT hash, event_id FROM events WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3",
                    params![agent, key.epoch as i64, key.seq as i64 - 1],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
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
            let next: Option<(String, String)> = tx
                .query_row(
                    "SELECT prev_hash, event_id FROM events WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3",
                    params![agent, key.epoch as i64, key.seq as i64 + 1],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
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
        update_stream(tx, agent, epoch, now, &mut alerts)?;
    }
    Ok(alerts)
}

fn update_stream(
    tx: &Transaction<'_>,
    agent: &str,
    epoch: u64,
    now: &str,
    alerts: &mut Vec<Finding>,
) -> Result<(), StoreError> {
    let existing: Option<(i64, i64)> = tx
        .query_row(
            "SELECT contiguous_to, max_seq FROM streams WHERE agent_id = ?1 AND epoch = ?2",
            params![agent, epoch as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (mut contiguous, _) = match existing {
        Some(v) => v,
        None => {
            let previous: Option<i64> = tx
                .query_row(
                    "SELECT MAX(epoch) FROM streams WHERE agent_id = ?1 AND epoch < ?2",
                    params![agent, epoch as i64],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            if let Some(prev) = previous {
                alerts.push(finding(
                    JOURNAL_RESET,
                    agent,
                    format!("Agent {agent} started a new journal (epoch {prev} → {epoch}): its buffered state was lost or reset"),
                    vec![],
                    serde_json::json!({"previous_epoch": prev, "epoch": epoch}),
                ));
            }
            tx.execute(
                "INSERT INTO streams (agent_id, epoch, contiguous_to, max_seq, first_seen) VALUES (?1, ?2, 0, 0, ?3)",
                params![agent, epoch as i64, now],
            )?;
            (0, 0)
        }
    };
    {
        let mut exists = tx.prepare_cached(
            "SELECT 1 FROM events WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3",
        )?;
        while exists.exists(params![agent, epoch as i64, contiguous + 1])? {
            contiguous += 1;
        }
    }
    let max_seq: i64 = tx.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM events WHERE agent_id = ?1 AND epoch = ?2",
        params![agent, epoch as i64],
        |r| r.get(0),
    )?;
    if max_seq > contiguous {
        tx.execute(
            "UPDATE streams SET contiguous_to = ?3, max_seq = ?4, gap_since = COALESCE(gap_since, ?5)
             WHERE agent_id = ?1 AND epoch = ?2",
            params![agent, epoch as i64, contiguous, max_seq, now],
        )?;
    } else {
        tx.execute(
            "UPDATE streams SET contiguous_to = ?3, max_seq = ?4, gap_since = NULL, gap_alerted = 0
             WHERE agent_id = ?1 AND epoch = ?2",
            params![agent, epoch as i64, contiguous, max_seq],
        )?;
    }
    Ok(())
}

/// Gaps open longer than `grace`: one alert each (red, or yellow when an
/// `agent.events_lost` event of the agent accounts for the missing range).
pub fn open_gaps(
    conn: &mut rusqlite::Connection,
    grace: std::time::Duration,
) -> Result<Vec<Finding>, StoreError> {
    let cutoff = (jiff::Timestamp::now()
        - jiff::SignedDuration::try_from(grace).unwrap_or_default())
    .to_string();
    let tx = conn.transaction()?;
    let gaps: Vec<(String, i64, i64)> = {
        let mut st = tx.prepare(
            "SELECT agent_id, epoch, contiguous_to FROM streams
             WHERE gap_since IS NOT NULL AND gap_since <= ?1 AND gap_alerted = 0",
        )?;
        let rows = st.query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut alerts = Vec::new();
    for (agent, epoch, contiguous) in gaps {
        let next: i64 = tx.query_row(
            "SELECT MIN(seq) FROM events WHERE agent_id = ?1 AND epoch = ?2 AND seq > ?3",
            params![agent, epoch, contiguous],
            |r| r.get(0),
        )?;
        let (from, to) = (contiguous + 1, next - 1);
        let explained: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM events WHERE agent_id = ?1 AND kind = 'agent.events_lost'
               AND json_extract(envelope, '$.event.data.first.epoch') = ?2
               AND json_extract(envelope, '$.event.data.first.seq') <= ?3
               AND json_extract(envelope, '$.event.data.last.seq') >= ?4)",
            params![agent, epoch, from, to],
            |r| r.get(0),
        )?;
        let why = if explained {
            "the agent reported losing them (agent.events_lost)"
        } else {
            "unexplained: records may have been deleted from the agent's journal"
        };
        alerts.push(finding(
            JOURNAL_GAP,
            &agent,
            format!("Events {agent}:{epoch}:{from} to {agent}:{epoch}:{to} ({} events) are missing; {why}", to - from + 1),
            vec![],
            serde_json::json!({"epoch": epoch, "first_missing": from, "last_missing": to, "explained": explained}),
        ));
        tx.execute(
            "UPDATE streams SET gap_alerted = 1 WHERE agent_id = ?1 AND epoch = ?2",
            params![agent, epoch],
        )?;
    }
    tx.commit()?;
    Ok(alerts)
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
