//! Exports read events in `received_at` order; this merges the heartbeats of the
//! period's blocks back into that order, opening a block only when the merge reaches
//! its first receive time.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use crate::db::{params, Sql};

use super::{Block, OpenBlock, Record, BLOCK_COLUMNS};
use crate::store::StoreError;

/// The order exports read events in: `received_at, agent_id, epoch, seq`, compared as
/// SQLite compares them (text bytewise, integers).
type MergeKey = (String, String, i64, i64);

/// A rebuilt heartbeat with the agent and key it belongs to.
#[derive(Debug)]
pub struct Keyed {
    pub agent_id: String,
    pub epoch: u64,
    pub record: Record,
}

/// The next heartbeat of an open block.
struct Head {
    key: MergeKey,
    record: Record,
    block: OpenBlock,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

/// Blocks read per query while merging.
const PAGE: i64 = 256;

/// The heartbeats of a period's blocks, in export order, for merging with the rows:
/// blocks are opened only when the merge reaches their first receive time, so about
/// one block per agent is held at a time.
pub struct Merge<'c, C: Sql> {
    conn: &'c C,
    sql: String,
    from: String,
    to: String,
    scope_param: Option<String>,
    pending: VecDeque<Block>,
    after: MergeKey,
    exhausted: bool,
    open: BinaryHeap<Reverse<Head>>,
}

impl<'c, C: Sql> Merge<'c, C> {
    /// `scope` is the export's SQL restricting `agent_id` (with `?3`).
    pub fn new(
        conn: &'c C,
        from: &str,
        to: &str,
        scope: &str,
        scope_param: Option<&str>,
    ) -> Merge<'c, C> {
        Merge {
            conn,
            sql: format!(
                "SELECT {BLOCK_COLUMNS} FROM heartbeat_blocks
                 WHERE last_received >= ?1 AND first_received < ?2 AND ({scope})
                   AND (first_received, agent_id, epoch, first_seq) > (?4, ?5, ?6, ?7)
                 ORDER BY first_received, agent_id, epoch, first_seq LIMIT {PAGE}"
            ),
            from: from.to_string(),
            to: to.to_string(),
            scope_param: scope_param.map(str::to_string),
            pending: VecDeque::new(),
            after: (String::new(), String::new(), i64::MIN, i64::MIN),
            exhausted: false,
            open: BinaryHeap::new(),
        }
    }

    fn refill(&mut self) -> Result<(), StoreError> {
        if !self.pending.is_empty() || self.exhausted {
            return Ok(());
        }
        let a = &self.after;
        let page: Vec<Block> = self.conn.query_map(
            &self.sql,
            params![self.from, self.to, self.scope_param, a.0, a.1, a.2, a.3],
            Block::from_row,
        )?;
        self.exhausted = (page.len() as i64) < PAGE;
        if let Some(b) = page.last() {
            self.after = (
                b.first_received.clone(),
                b.agent_id.clone(),
                b.epoch as i64,
                b.first_seq as i64,
            );
        }
        self.pending.extend(page);
        Ok(())
    }

    /// Opens every block that starts at or before `received`.
    fn open_upto(&mut self, received: &str) -> Result<(), StoreError> {
        loop {
            self.refill()?;
            match self.pending.front() {
                Some(b) if b.first_received.as_str() <= received => {
                    let block = self.pending.pop_front().expect("front exists").open()?;
                    self.push_next(block)?;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Queues the block's next heartbeat inside the period (skipping earlier ones).
    fn push_next(&mut self, mut block: OpenBlock) -> Result<(), StoreError> {
        while let Some(record) = block.next_record()? {
            if record.received_at < self.from {
                continue;
            }
            if record.received_at >= self.to {
                return Ok(());
            }
            let key = (
                record.received_at.clone(),
                block.agent_id().to_string(),
                block.epoch() as i64,
                record.seq as i64,
            );
            self.open.push(Reverse(Head { key, record, block }));
            return Ok(());
        }
        Ok(())
    }

    fn pop(&mut self) -> Result<Option<Keyed>, StoreError> {
        let Some(Reverse(head)) = self.open.pop() else {
            return Ok(None);
        };
        let out = Keyed {
            agent_id: head.block.agent_id().to_string(),
            epoch: head.block.epoch(),
            record: head.record,
        };
        self.push_next(head.block)?;
        Ok(Some(out))
    }

    /// The next heartbeat that sorts before the row `(received_at, agent_id, epoch, seq)`.
    pub fn next_before(
        &mut self,
        received_at: &str,
        agent_id: &str,
        epoch: i64,
        seq: i64,
    ) -> Result<Option<Keyed>, StoreError> {
        self.open_upto(received_at)?;
        match self.open.peek() {
            Some(Reverse(h))
                if (h.key.0.as_str(), h.key.1.as_str(), h.key.2, h.key.3)
                    < (received_at, agent_id, epoch, seq) =>
            {
                self.pop()
            }
            _ => Ok(None),
        }
    }

    /// The next heartbeat once every row has been read.
    pub fn next_remaining(&mut self) -> Result<Option<Keyed>, StoreError> {
        loop {
            self.refill()?;
            let Some(start) = self.pending.front().map(|b| b.first_received.clone()) else {
                return self.pop();
            };
            let starts_first = match self.open.peek() {
                Some(Reverse(h)) => start <= h.key.0,
                None => true,
            };
            if !starts_first {
                return self.pop();
            }
            self.open_upto(&start)?;
        }
    }
}
