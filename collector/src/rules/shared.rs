//! Correlation windows shared by collectors that share the store
//! (`broker.shared_group`, issue "Beyond one box", item 2).
//!
//! The broker hands an agent's batches to any collector of the group, so a window
//! kept in one collector's memory would see only its share, and a threshold would be
//! reached late or never. For `count`, `sum` and `distinct` rules the window is kept
//! in `window_entries` (one row per rule, key, second and, for `distinct`, value) and
//! used like this within one evaluation (one agent's batch):
//!
//! - The first fact of a (rule, key) takes the key's turn and reads the window's rows
//!   once. A key that is the event's own agent is already held
//!   (`store::take_turns_for_agents`). Any other key is locked first, so that the read
//!   sees what the previous holder committed. Two groups that would wait on each
//!   other's keys are ended by the server's deadlock check; the batch that lost is
//!   rolled back to its savepoint, not acknowledged, and sent again by its agent.
//! - The batch's facts slide over those rows in memory, exactly as one collector
//!   would, because nobody else can change them while the turn is held.
//! - At the end, what the batch added is written back in one statement.
//!
//! That is two or three round trips per batch, not one per fact. Rows older than
//! their window are pruned on the leader (`Engine::prune_seen`).

use std::collections::{BTreeMap, HashMap};

use crate::db::{self, params, Sql, Tx};
use crate::store::StoreError;

use super::file::{Aggregate, Correlation};

/// At most this many event ids name a correlated alert's events.
const MAX_EVENT_IDS: usize = 100;

/// One window row: what it holds (stored and added now) and the first event it saw.
struct Entry {
    value: f64,
    added: f64,
    event_id: Option<String>,
}

/// A (rule, key)'s rows, read once per evaluation.
struct Loaded {
    fingerprint: String,
    /// The rows read are those with `at` above this.
    from: i64,
    rows: BTreeMap<(i64, String), Entry>,
}

/// A row to write back: (rule, key), fingerprint, (second, text), what it holds.
type Written<'a> = (&'a (String, String), &'a str, &'a (i64, String), &'a Entry);

/// The windows one evaluation touched; written back and forgotten at its end.
#[derive(Default)]
pub struct SharedWindows {
    windows: HashMap<(String, String), Loaded>,
}

/// One fact's contribution to a window.
pub struct Slide<'a> {
    pub rule_id: &'a str,
    pub key: &'a str,
    /// The agent whose event this is (its turn is already held).
    pub agent: &'a str,
    pub t: i64,
    /// The value summed (`sum`), or 1.
    pub number: f64,
    /// The value counted distinct (`distinct`), or empty.
    pub text: String,
    pub event_id: Option<&'a str>,
}

impl SharedWindows {
    /// Forgets windows an evaluation left (one whose transaction failed).
    pub fn clear(&mut self) {
        self.windows.clear();
    }

    /// Adds `s` to its window; returns the aggregate and the window's event ids when
    /// the threshold is reached.
    pub fn slide(
        &mut self,
        tx: &Tx<'_>,
        c: &Correlation,
        s: Slide<'_>,
    ) -> Result<Option<(f64, Vec<String>)>, StoreError> {
        let horizon = s.t - c.window_secs;
        let k = (s.rule_id.to_string(), s.key.to_string());
        if !self.windows.contains_key(&k) {
            if tx.engine() == db::Engine::Postgres && s.key != s.agent {
                tx.query_row(
                    "SELECT COUNT(pg_advisory_xact_lock(7486424, hashtext(?1)))",
                    params![format!("{}\u{1f}{}", s.rule_id, s.key)],
                    |r| r.get::<i64>(0),
                )?;
            }
            let loaded = Loaded {
                fingerprint: c.fingerprint.clone(),
                from: horizon,
                rows: BTreeMap::new(),
            };
            self.windows.insert(k.clone(), loaded);
            self.read(tx, &k, horizon, None)?;
        } else if let Some(from) = self
            .windows
            .get(&k)
            .map(|w| w.from)
            .filter(|f| horizon < *f)
        {
            // A fact older than the first one: its window reaches further back.
            self.read(tx, &k, horizon, Some(from))?;
        }
        let w = self.windows.get_mut(&k).expect("read above");
        w.from = w.from.min(horizon);
        let e = w.rows.entry((s.t, s.text)).or_insert_with(|| Entry {
            value: 0.0,
            added: 0.0,
            event_id: s.event_id.map(String::from),
        });
        e.value += s.number;
        e.added += s.number;
        let live = w.rows.range((horizon + 1, String::new())..);
        let (mut total, mut texts) = (0.0, std::collections::BTreeSet::new());
        let mut ids = Vec::new();
        for ((_, text), e) in live {
            total += e.value;
            texts.insert(text.as_str());
            if ids.len() < MAX_EVENT_IDS {
                ids.extend(e.event_id.clone());
            }
        }
        let reached = match c.aggregate {
            Aggregate::Distinct => texts.len() as f64,
            _ => total,
        };
        Ok((reached >= c.threshold).then_some((reached, ids)))
    }

    /// Reads the stored rows of window `k` with `at` in (`above`, `upto`] into it
    /// (a row added in this evaluation keeps what it added on top).
    fn read(
        &mut self,
        tx: &Tx<'_>,
        k: &(String, String),
        above: i64,
        upto: Option<i64>,
    ) -> Result<(), StoreError> {
        let w = self.windows.get_mut(k).expect("made by the caller");
        let rows: Vec<(i64, String, f64, Option<String>)> = tx.query_map(
            "SELECT at, text, value, event_id FROM window_entries
             WHERE rule_id = ?1 AND key = ?2 AND fingerprint = ?3 AND at > ?4 AND at <= ?5",
            params![k.0, k.1, w.fingerprint, above, upto.unwrap_or(i64::MAX)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        for (at, text, value, event_id) in rows {
            let e = w.rows.entry((at, text)).or_insert(Entry {
                value: 0.0,
                added: 0.0,
                event_id: None,
            });
            e.value = value + e.added;
            e.event_id = event_id.or(e.event_id.take());
        }
        Ok(())
    }

    /// Writes what this evaluation added, in one statement per 100 rows on
    /// PostgreSQL, and forgets the windows.
    pub fn flush(&mut self, tx: &Tx<'_>) -> Result<(), StoreError> {
        let windows = std::mem::take(&mut self.windows);
        let rows: Vec<Written<'_>> = windows
            .iter()
            .flat_map(|(k, w)| {
                w.rows
                    .iter()
                    .filter(|(_, e)| e.added != 0.0)
                    .map(move |(at, e)| (k, w.fingerprint.as_str(), at, e))
            })
            .collect();
        for chunk in rows.chunks(100) {
            let mut values: Vec<&dyn db::Param> = Vec::with_capacity(chunk.len() * 7);
            let mut tuples = Vec::with_capacity(chunk.len());
            for (n, ((rule, key), fingerprint, (at, text), e)) in chunk.iter().enumerate() {
                values.extend([
                    rule as &dyn db::Param,
                    key,
                    fingerprint,
                    at,
                    text,
                    &e.added,
                    &e.event_id,
                ]);
                let p: Vec<String> = (1..=7).map(|c| format!("?{}", n * 7 + c)).collect();
                tuples.push(format!("({})", p.join(", ")));
            }
            tx.execute(
                &format!(
                    "INSERT INTO window_entries (rule_id, key, fingerprint, at, text, value, event_id)
                     VALUES {}
                     ON CONFLICT (rule_id, key, at, text, fingerprint)
                     DO UPDATE SET value = window_entries.value + excluded.value",
                    tuples.join(", ")
                ),
                &values,
            )?;
        }
        Ok(())
    }
}

/// What one fact adds to a `count`, `sum` or `distinct` window: (number, text).
pub fn contribution(aggregate: Aggregate, number: f64, text: String) -> (f64, String) {
    match aggregate {
        Aggregate::Count => (1.0, String::new()),
        Aggregate::Distinct => (1.0, text),
        _ => (number, String::new()),
    }
}
