//! Heartbeat compaction: an agent's heartbeats, once old, stored as blocks of a few
//! bytes each instead of one 700-byte row each, and still verifiable record by record.
//!
//! A heartbeat every 30 s is 2 880 records per agent-day, most of a fleet's rows. Only
//! a few of its fields change from one to the next, so a block keeps the fields that
//! do not change once (`common`) and, per heartbeat, varint deltas of the others
//! ([`Entry`], postcard-encoded). From them the collector rebuilds each record's JSON
//! **byte for byte** as the agent journaled it (the same [`Envelope`] serialized the
//! same way), and so its SHA-256 and the hash chain through it:
//! - a heartbeat is only compacted when its rebuilt bytes equal the stored ones (an
//!   agent of another version that serializes differently keeps its rows);
//! - its `prev_hash` is stored only when it is not the hash of the entry before it in
//!   the block (another event came between), and `last_hash` closes the block, so
//!   an altered block fails to decode and names itself ([`StoreError::HeartbeatBlock`]).
//!
//! Only heartbeats inside the contiguous part of their stream (`streams.contiguous_to`)
//! and older than `[exports] heartbeats_compact_after_secs` are compacted; the watermark
//! `streams.heartbeats_compacted_to` makes each record examined once. Everything that
//! asked the `events` table for a record by key asks [`stored_hash`] too (re-sends are
//! still duplicates, a key reused with other bytes is still quarantined), and exports
//! merge the blocks' records back into their place ([`BlockCursor`]), so an export is
//! the same bytes before and after compaction.

use crate::db::{params, Conn, Sql, Tx};
use serde::{Deserialize, Serialize};
use weilan_config::event::{record_hash, Envelope, Event, EventId, EventKey, Heartbeat};

use crate::store::StoreError;

/// Heartbeats per block at most: a block is one row, decoded whole.
pub const MAX_BLOCK_ENTRIES: usize = 256;
/// Encoded entries per block at most (about 65 heartbeats of an idle agent): a block
/// row is then about 1.2 KB and three fill a 4 KB page. Rows of ~2 KB left half of
/// every page empty (measured: 33 bytes per heartbeat instead of ~20).
const MAX_BLOCK_ENTRY_BYTES: usize = 1_000;
/// A block spans at most this much receive time, so an export merging the blocks of
/// thousands of agents back into time order holds about one block per agent.
const MAX_BLOCK_SPAN_NS: i128 = 3_600 * 1_000_000_000;
/// Heartbeats examined per write transaction: ingest waits at most this long.
const PER_TRANSACTION: i64 = 2_000;

/// What every heartbeat of one block has in common.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    schema: u32,
    host_role: String,
    site: Option<String>,
    agent_version: String,
    policy_version: Option<String>,
}

/// One heartbeat of a block, relative to the entry before it (the first: to zero and
/// to the block's `first_seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    seq_step: u64,
    time_step_ns: i64,
    /// Receive time minus agent time.
    received_lag_ns: i64,
    uptime_step: i64,
    backlog: u64,
    dropped_total: u64,
    /// `None`: the hash of the entry before it in the block.
    prev_hash: Option<[u8; 32]>,
}

/// One heartbeat rebuilt from a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub received_at: String,
    pub agent_time: String,
    pub host_role: String,
    /// The record's JSON exactly as the agent journaled it.
    pub envelope: String,
    pub hash: String,
}

/// A stored block, as read from `heartbeat_blocks`.
#[derive(Debug, Clone)]
pub struct Block {
    pub agent_id: String,
    pub epoch: u64,
    pub first_seq: u64,
    first_received: String,
    common: String,
    entries: Vec<u8>,
    last_hash: String,
}

const BLOCK_COLUMNS: &str =
    "agent_id, epoch, first_seq, first_received, common, entries, last_hash";

impl Block {
    fn from_row(r: &crate::db::Row<'_>) -> Result<Block, crate::db::Error> {
        Ok(Block {
            agent_id: r.get(0)?,
            epoch: r.get::<i64>(1)? as u64,
            first_seq: r.get::<i64>(2)? as u64,
            first_received: r.get(3)?,
            common: r.get(4)?,
            entries: r.get(5)?,
            last_hash: r.get(6)?,
        })
    }

    fn error(&self, reason: impl Into<String>) -> StoreError {
        StoreError::HeartbeatBlock {
            block: format!("{}:{}:{}", self.agent_id, self.epoch, self.first_seq),
            reason: reason.into(),
        }
    }

    /// Rebuilds the block's heartbeats one at a time, in order.
    pub fn open(self) -> Result<OpenBlock, StoreError> {
        let common: Common = serde_json::from_str(&self.common)
            .map_err(|e| self.error(format!("common fields: {e}")))?;
        Ok(OpenBlock {
            cursor: Cursor::start(self.first_seq),
            common,
            offset: 0,
            index: 0,
            block: self,
        })
    }
}

/// A block being read: only its encoded entries and the running values are held.
#[derive(Debug)]
pub struct OpenBlock {
    block: Block,
    common: Common,
    cursor: Cursor,
    offset: usize,
    index: usize,
}

impl OpenBlock {
    /// The next heartbeat; after the last, a check that the block hashes to the
    /// `last_hash` it was stored with, failing with the block's name if it does not.
    pub fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        let b = &self.block;
        let rest = &b.entries[self.offset..];
        if rest.is_empty() {
            if self.cursor.last_hash.as_deref() != Some(b.last_hash.as_str()) {
                return Err(b.error(
                    "its heartbeats do not hash to the hash it was stored with: the block was altered",
                ));
            }
            return Ok(None);
        }
        self.index += 1;
        let (entry, tail) = postcard::take_from_bytes::<Entry>(rest)
            .map_err(|e| b.error(format!("entry {}: {e}", self.index)))?;
        self.offset = b.entries.len() - tail.len();
        let record = self
            .cursor
            .advance(&b.agent_id, b.epoch, &self.common, &entry)
            .ok_or_else(|| b.error(format!("entry {} is out of range", self.index)))?;
        Ok(Some(record))
    }

    pub fn agent_id(&self) -> &str {
        &self.block.agent_id
    }

    pub fn epoch(&self) -> u64 {
        self.block.epoch
    }

    /// Every heartbeat of the block, checked to the end.
    pub fn all(mut self) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        while let Some(r) = self.next_record()? {
            out.push(r);
        }
        Ok(out)
    }
}

/// The running values while a block's entries are decoded or encoded.
#[derive(Debug, Clone)]
struct Cursor {
    seq: u64,
    time_ns: i64,
    uptime: i64,
    last_hash: Option<String>,
}

impl Cursor {
    fn start(first_seq: u64) -> Cursor {
        Cursor {
            seq: first_seq,
            time_ns: 0,
            uptime: 0,
            last_hash: None,
        }
    }

    fn advance(&mut self, agent: &str, epoch: u64, c: &Common, e: &Entry) -> Option<Record> {
        let seq = self.seq.checked_add(e.seq_step)?;
        let time_ns = self.time_ns.checked_add(e.time_step_ns)?;
        let uptime = self.uptime.checked_add(e.uptime_step)?;
        let received_ns = time_ns.checked_add(e.received_lag_ns)?;
        let time = jiff::Timestamp::from_nanosecond(time_ns as i128).ok()?;
        let received = jiff::Timestamp::from_nanosecond(received_ns as i128).ok()?;
        let prev_hash = match (&e.prev_hash, &self.last_hash) {
            (Some(h), _) => hex::encode(h),
            (None, Some(h)) => h.clone(),
            (None, None) => return None,
        };
        let envelope = Envelope {
            schema: c.schema,
            event_id: EventId {
                agent_id: agent.to_string(),
                key: EventKey { epoch, seq },
            },
            time,
            host_role: c.host_role.clone(),
            site: c.site.clone(),
            prev_hash,
            event: Event::AgentHeartbeat(Heartbeat {
                agent_version: c.agent_version.clone(),
                uptime_secs: u64::try_from(uptime).ok()?,
                policy_version: c.policy_version.clone(),
                backlog: e.backlog,
                dropped_total: e.dropped_total,
            }),
        };
        let json = serde_json::to_string(&envelope).ok()?;
        let hash = record_hash(json.as_bytes());
        *self = Cursor {
            seq,
            time_ns,
            uptime,
            last_hash: Some(hash.clone()),
        };
        Some(Record {
            seq,
            received_at: received.to_string(),
            agent_time: time.to_string(),
            host_role: c.host_role.clone(),
            envelope: json,
            hash,
        })
    }
}

/// A block being filled by compaction.
struct Builder {
    agent: String,
    epoch: u64,
    first_seq: u64,
    common: Common,
    cursor: Cursor,
    entries: Vec<u8>,
    count: usize,
    first_received: String,
    first_received_ns: i128,
    last_received: String,
    /// Rows this block replaces.
    event_ids: Vec<String>,
}

/// One stored heartbeat row, a candidate for a block.
struct Row {
    seq: u64,
    received_at: String,
    hash: String,
    envelope: String,
}

/// What a heartbeat row becomes: its parts for an entry, or why it stays a row.
struct Parts {
    common: Common,
    time_ns: i64,
    received_ns: i64,
    received: jiff::Timestamp,
    uptime: i64,
    backlog: u64,
    dropped_total: u64,
    prev_hash: [u8; 32],
}

fn parts(row: &Row) -> Option<Parts> {
    let env: Envelope = serde_json::from_str(&row.envelope).ok()?;
    let Event::AgentHeartbeat(hb) = env.event else {
        return None;
    };
    let received: jiff::Timestamp = row.received_at.parse().ok()?;
    // The stored receive time must come back as the same text.
    if received.to_string() != row.received_at {
        return None;
    }
    Some(Parts {
        common: Common {
            schema: env.schema,
            host_role: env.host_role,
            site: env.site,
            agent_version: hb.agent_version,
            policy_version: hb.policy_version,
        },
        time_ns: i64::try_from(env.time.as_nanosecond()).ok()?,
        received_ns: i64::try_from(received.as_nanosecond()).ok()?,
        received,
        uptime: i64::try_from(hb.uptime_secs).ok()?,
        backlog: hb.backlog,
        dropped_total: hb.dropped_total,
        prev_hash: hex::decode(&env.prev_hash).ok()?.try_into().ok()?,
    })
}

impl Builder {
    fn new(agent: &str, epoch: u64, row: &Row, p: &Parts) -> Builder {
        Builder {
            agent: agent.to_string(),
            epoch,
            first_seq: row.seq,
            common: p.common.clone(),
            cursor: Cursor::start(row.seq),
            entries: Vec::new(),
            count: 0,
            first_received: row.received_at.clone(),
            first_received_ns: p.received.as_nanosecond(),
            last_received: row.received_at.clone(),
            event_ids: Vec::new(),
        }
    }

    /// Whether `row` may join this block (same fields, in receive order, room left).
    fn fits(&self, row: &Row, p: &Parts) -> bool {
        self.count < MAX_BLOCK_ENTRIES
            && self.entries.len() < MAX_BLOCK_ENTRY_BYTES
            && p.common == self.common
            && row.received_at >= self.last_received
            && p.received.as_nanosecond() - self.first_received_ns < MAX_BLOCK_SPAN_NS
    }

    /// Adds `row` if its rebuilt bytes are exactly the stored ones; `false` leaves it a row.
    fn push(&mut self, row: &Row, p: &Parts) -> bool {
        let follows = self.cursor.seq + 1 == row.seq
            && self.cursor.last_hash.as_deref() == Some(hex::encode(p.prev_hash).as_str());
        let entry = Entry {
            seq_step: row.seq - self.cursor.seq,
            time_step_ns: p.time_ns.wrapping_sub(self.cursor.time_ns),
            received_lag_ns: p.received_ns.wrapping_sub(p.time_ns),
            uptime_step: p.uptime.wrapping_sub(self.cursor.uptime),
            backlog: p.backlog,
            dropped_total: p.dropped_total,
            prev_hash: (!follows).then_some(p.prev_hash),
        };
        let mut next = self.cursor.clone();
        let Some(record) = next.advance(&self.agent, self.epoch, &self.common, &entry) else {
            return false;
        };
        if record.envelope != row.envelope
            || record.hash != row.hash
            || record.received_at != row.received_at
        {
            return false;
        }
        let Ok(bytes) = postcard::to_stdvec(&entry) else {
            return false;
        };
        self.entries.extend_from_slice(&bytes);
        self.cursor = next;
        self.count += 1;
        self.last_received = row.received_at.clone();
        self.event_ids
            .push(format!("{}:{}:{}", self.agent, self.epoch, row.seq));
        true
    }

    fn store(self, tx: &Tx<'_>) -> Result<usize, StoreError> {
        if self.count == 0 {
            return Ok(0);
        }
        let common = serde_json::to_string(&self.common).expect("plain struct serializes");
        tx.execute(
            "INSERT INTO heartbeat_blocks (agent_id, epoch, first_seq, last_seq, count, first_received,
                                           last_received, common, entries, last_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
            self.agent,
            self.epoch as i64,
            self.first_seq as i64,
            self.cursor.seq as i64,
            self.count as i64,
            self.first_received,
            self.last_received,
            common,
            self.entries,
            self.cursor.last_hash,
            ],
        )?;
        for id in &self.event_ids {
            tx.execute("DELETE FROM events WHERE event_id = ?1", params![id])?;
        }
        Ok(self.count)
    }
}

/// What one compaction run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Heartbeat rows replaced by block entries.
    pub heartbeats: u64,
    pub blocks: u64,
    /// Heartbeats that stay rows (their bytes cannot be rebuilt exactly).
    pub kept_as_rows: u64,
}

/// Compacts every heartbeat received before `cutoff` (RFC 3339) inside the contiguous
/// part of its stream, a few thousand per transaction so ingest is never held long.
pub fn compact(conn: &mut Conn, cutoff: &str) -> Result<Compacted, StoreError> {
    let mut done = Compacted::default();
    let streams: Vec<(String, i64)> = conn.query_map(
        "SELECT agent_id, epoch FROM streams WHERE contiguous_to > heartbeats_compacted_to",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    for (agent, epoch) in streams {
        match next_heartbeat(conn, &agent, epoch)? {
            // Nothing to examine up to `contiguous_to`: the watermark moves there.
            Next::None { contiguous_to } => {
                conn.execute(
                    "UPDATE streams SET heartbeats_compacted_to = ?3
                     WHERE agent_id = ?1 AND epoch = ?2 AND heartbeats_compacted_to < ?3",
                    params![agent, epoch, contiguous_to],
                )?;
            }
            Next::At(received) if received.as_str() >= cutoff => {}
            Next::At(_) => while compact_slice(conn, &agent, epoch, cutoff, &mut done)? {},
        }
    }
    Ok(done)
}

/// The first heartbeat a stream has past its watermark.
enum Next {
    None { contiguous_to: i64 },
    At(String),
}

/// Reads one row, without a write lock: the minute check costs little for the
/// thousands of streams whose next heartbeat is still too young.
fn next_heartbeat(conn: &Conn, agent: &str, epoch: i64) -> Result<Next, StoreError> {
    let (from, to): (i64, i64) = conn.query_row(
        "SELECT heartbeats_compacted_to, contiguous_to FROM streams WHERE agent_id = ?1 AND epoch = ?2",
        params![agent, epoch],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let received: Option<String> = conn.query_opt(
        "SELECT received_at FROM events
         WHERE agent_id = ?1 AND epoch = ?2 AND seq > ?3 AND seq <= ?4 AND kind = 'agent.heartbeat'
         ORDER BY seq LIMIT 1",
        params![agent, epoch, from, to],
        |r| r.get(0),
    )?;
    Ok(match received {
        Some(r) => Next::At(r),
        None => Next::None { contiguous_to: to },
    })
}

/// One transaction's worth of one stream; `true` while there may be more.
fn compact_slice(
    conn: &mut Conn,
    agent: &str,
    epoch: i64,
    cutoff: &str,
    done: &mut Compacted,
) -> Result<bool, StoreError> {
    let tx = conn.transaction()?;
    let (from, to): (i64, i64) = tx.query_row(
        "SELECT heartbeats_compacted_to, contiguous_to FROM streams WHERE agent_id = ?1 AND epoch = ?2",
        params![agent, epoch],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let rows: Vec<Row> = tx.query_map(
        "SELECT seq, received_at, hash, envelope FROM events
         WHERE agent_id = ?1 AND epoch = ?2 AND seq > ?3 AND seq <= ?4 AND kind = 'agent.heartbeat'
         ORDER BY seq LIMIT ?5",
        params![agent, epoch, from, to, PER_TRANSACTION],
        |r| {
            Ok(Row {
                seq: r.get::<i64>(0)? as u64,
                received_at: r.get(1)?,
                hash: r.get(2)?,
                envelope: r.get(3)?,
            })
        },
    )?;
    let full = rows.len() as i64 == PER_TRANSACTION;
    // Up to the first heartbeat still too young; nothing examined: up to `to` (the
    // range holds no heartbeat, or they all are).
    let young = rows.iter().position(|r| r.received_at.as_str() >= cutoff);
    let examined = &rows[..young.unwrap_or(rows.len())];
    let watermark = match (young, examined.last()) {
        (Some(_), Some(last)) => last.seq as i64,
        (Some(_), None) => from,
        (None, _) if full => rows.last().map_or(from, |r| r.seq as i64),
        (None, _) => to,
    };
    let mut block: Option<Builder> = None;
    for row in examined {
        let Some(p) = parts(row) else {
            done.kept_as_rows += 1;
            continue;
        };
        let mut b = match block.take() {
            Some(b) if b.fits(row, &p) => b,
            other => {
                if let Some(b) = other {
                    done.blocks += u64::from(b.count > 0);
                    done.heartbeats += b.store(&tx)? as u64;
                }
                Builder::new(agent, epoch as u64, row, &p)
            }
        };
        if !b.push(row, &p) {
            done.kept_as_rows += 1;
        }
        block = Some(b);
    }
    if let Some(b) = block {
        done.blocks += u64::from(b.count > 0);
        done.heartbeats += b.store(&tx)? as u64;
    }
    tx.execute(
        "UPDATE streams SET heartbeats_compacted_to = ?3 WHERE agent_id = ?1 AND epoch = ?2",
        params![agent, epoch, watermark],
    )?;
    tx.commit()?;
    Ok(full && young.is_none())
}

/// The block that would hold `agent:epoch:seq`, if any.
fn block_at(
    conn: &impl Sql,
    agent: &str,
    epoch: u64,
    seq: u64,
) -> Result<Option<Block>, StoreError> {
    Ok(conn.query_opt(
        &format!(
            "SELECT {BLOCK_COLUMNS} FROM heartbeat_blocks
             WHERE agent_id = ?1 AND epoch = ?2 AND first_seq <= ?3 AND last_seq >= ?3
             ORDER BY first_seq DESC LIMIT 1"
        ),
        params![agent, epoch as i64, seq as i64],
        Block::from_row,
    )?)
}

/// The SHA-256 of the record stored under `agent:epoch:seq` in a heartbeat block.
pub fn compacted_hash(
    conn: &impl Sql,
    agent: &str,
    key: EventKey,
) -> Result<Option<String>, StoreError> {
    let Some(block) = block_at(conn, agent, key.epoch, key.seq)? else {
        return Ok(None);
    };
    Ok(block
        .open()?
        .all()?
        .into_iter()
        .find(|r| r.seq == key.seq)
        .map(|r| r.hash))
}

/// The SHA-256 of the record stored under `agent:epoch:seq`, as a row or compacted.
pub fn stored_hash(
    conn: &impl Sql,
    agent: &str,
    key: EventKey,
) -> Result<Option<String>, StoreError> {
    let row: Option<String> = conn.query_opt(
        "SELECT hash FROM events WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3",
        params![agent, key.epoch as i64, key.seq as i64],
        |r| r.get(0),
    )?;
    match row {
        Some(h) => Ok(Some(h)),
        None => compacted_hash(conn, agent, key),
    }
}

/// Whether keys of a batch are held in a block: only keys at or below their stream's
/// compaction watermark can be, so a new record costs one lookup per epoch.
pub struct Held<'c, C: Sql> {
    conn: &'c C,
    watermarks: Vec<(String, u64, u64)>,
}

impl<'c, C: Sql> Held<'c, C> {
    pub fn new(conn: &'c C) -> Held<'c, C> {
        Held {
            conn,
            watermarks: Vec::new(),
        }
    }

    pub fn holds(&mut self, id: &EventId) -> Result<bool, StoreError> {
        let (agent, key) = (id.agent_id.as_str(), id.key);
        let known = self
            .watermarks
            .iter()
            .find(|(a, e, _)| a == agent && *e == key.epoch)
            .map(|w| w.2);
        let watermark = match known {
            Some(w) => w,
            None => {
                let w = compacted_to(self.conn, agent, key.epoch)?;
                self.watermarks.push((agent.to_string(), key.epoch, w));
                w
            }
        };
        Ok(key.seq <= watermark && compacted_hash(self.conn, agent, key)?.is_some())
    }
}

/// How far heartbeats of `agent`'s `epoch` may have been compacted (0: none).
fn compacted_to(conn: &impl Sql, agent: &str, epoch: u64) -> Result<u64, StoreError> {
    let to: Option<i64> = conn.query_opt(
        "SELECT heartbeats_compacted_to FROM streams WHERE agent_id = ?1 AND epoch = ?2",
        params![agent, epoch as i64],
        |r| r.get(0),
    )?;
    Ok(to.unwrap_or(0) as u64)
}

/// The highest key of `agent` held in a block with `(epoch, seq)` above `after` and
/// below epoch `before`: the restored-state check asks rows and blocks alike.
pub fn latest_compacted_between(
    conn: &impl Sql,
    agent: &str,
    after: EventKey,
    before_epoch: u64,
) -> Result<Option<(i64, i64)>, StoreError> {
    Ok(conn.query_opt(
        "SELECT epoch, last_seq FROM heartbeat_blocks WHERE agent_id = ?1
               AND ((epoch = ?2 AND last_seq > ?3) OR (epoch > ?2 AND epoch < ?4))
             ORDER BY epoch DESC, last_seq DESC LIMIT 1",
        params![
            agent,
            after.epoch as i64,
            after.seq as i64,
            before_epoch as i64
        ],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// Heartbeats held in blocks per agent (the fleet list counts them as events).
pub const COUNT_PER_AGENT_SQL: &str =
    "(SELECT CAST(COALESCE(SUM(h.count), 0) AS BIGINT) FROM heartbeat_blocks h WHERE h.agent_id = a.agent_id)";

/// Deletes the blocks whose every heartbeat was received before `cutoff`, in slices
/// so ingest is never held long; returns the heartbeats removed.
pub fn prune(conn: &impl Sql, cutoff: &str) -> Result<u64, StoreError> {
    let mut removed = 0u64;
    loop {
        let counts: Vec<i64> = conn.query_map(
            "DELETE FROM heartbeat_blocks WHERE block_id IN
               (SELECT block_id FROM heartbeat_blocks WHERE last_received < ?1 LIMIT 1000)
             RETURNING count",
            params![cutoff],
            |r| r.get(0),
        )?;
        if counts.is_empty() {
            return Ok(removed);
        }
        removed += counts.iter().sum::<i64>() as u64;
    }
}

mod merge;
pub use merge::{Keyed, Merge};

#[cfg(test)]
mod tests;
