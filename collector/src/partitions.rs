//! Monthly partitions of `events` on PostgreSQL (issue "Beyond one box", item 4).
//!
//! A fleet's year of events is billions of rows; deleting a month of them row by row
//! rewrites every index page and leaves the table to vacuum. PostgreSQL partitions
//! `events` by the month of `received_at` (migration 15), so retention detaches and
//! drops a month whole ([`drop_older_than`]) once every row of it is past
//! `events_keep_days`; the month that straddles the cutoff keeps its rows deleted in
//! slices (export/schedule.rs). The signed monthly exports are the archive: dropping a
//! month leaves every export's chain verifiable (export/tests.rs).
//!
//! [`maintain`] creates this month's partition and the next [`MONTHS_AHEAD`] ones, at
//! every start and on the leader's export tick; a row no partition takes (a collector
//! clock far ahead, a collector off for months) lands in `events_default` and is moved
//! into a partition of its own month the next time. Bounds are `YYYY-MM-01`: every
//! stored time of that month (`2026-12-01T00:00:00.5Z`) sorts after it as text, the
//! last instant of the month before sorts before it. SQLite keeps one table.

use crate::db::{self, params, Conn, Sql};

/// What went wrong keeping the partitions.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("database: {0}")]
    Sql(#[from] db::Error),
    #[error("partition {name} of events: bounds not understood: {expr}")]
    Bounds { name: String, expr: String },
}

/// Months after the current one that have a partition before any row needs it.
pub const MONTHS_AHEAD: i8 = 2;

/// One partition of `events`, as the catalogue describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub bounds: Bounds,
}

/// Which `received_at` values a partition takes: `[from, to)`, `None` unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bounds {
    Range {
        from: Option<String>,
        to: Option<String>,
    },
    Default,
}

impl Bounds {
    /// `FOR VALUES FROM ('2026-12-01') TO ('2027-01-01')`, `FROM (MINVALUE) …`,
    /// `DEFAULT` (`pg_get_expr` of `relpartbound`).
    fn parse(expr: &str) -> Option<Bounds> {
        if expr.trim() == "DEFAULT" {
            return Some(Bounds::Default);
        }
        let inner = expr.trim().strip_prefix("FOR VALUES FROM (")?;
        let (from, to) = inner.strip_suffix(')')?.split_once(") TO (")?;
        let value = |v: &str| match v {
            "MINVALUE" | "MAXVALUE" => Some(None),
            quoted => Some(Some(
                quoted.strip_prefix('\'')?.strip_suffix('\'')?.to_string(),
            )),
        };
        Some(Bounds::Range {
            from: value(from)?,
            to: value(to)?,
        })
    }

    fn overlaps(&self, lo: &str, hi: &str) -> bool {
        match self {
            Bounds::Default => false,
            Bounds::Range { from, to } => {
                from.as_deref().is_none_or(|f| f < hi) && to.as_deref().is_none_or(|t| t > lo)
            }
        }
    }
}

/// The partitions of `events` (none on SQLite, or before migration 15).
pub fn list(conn: &impl Sql) -> Result<Vec<Partition>, PartitionError> {
    if conn.engine() != db::Engine::Postgres {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, String)> = conn.query_map(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = to_regclass('events') ORDER BY c.relname",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    rows.into_iter()
        .map(|(name, expr)| match Bounds::parse(&expr) {
            Some(bounds) => Ok(Partition { name, bounds }),
            None => Err(PartitionError::Bounds { name, expr }),
        })
        .collect()
}

/// The first day of `date`'s month, `months` later.
fn month_start(date: jiff::civil::Date, months: i8) -> jiff::civil::Date {
    let first = date.first_of_month();
    first
        .checked_add(jiff::Span::new().months(months))
        .unwrap_or(first)
}

fn partition_name(month: jiff::civil::Date) -> String {
    format!("events_y{:04}m{:02}", month.year(), month.month())
}

/// Creates the missing partitions: this month's (UTC), the next [`MONTHS_AHEAD`], and
/// one for each month that has rows waiting in `events_default`, moving those rows
/// into it. One collector at a time (an advisory lock); returns the names created.
pub fn maintain(conn: &mut Conn, now: jiff::Timestamp) -> Result<Vec<String>, PartitionError> {
    if conn.engine() != db::Engine::Postgres {
        return Ok(Vec::new());
    }
    let tx = conn.transaction()?;
    // A short lock wait: ingest holds the table only for a group's commit, and a
    // partition not created now is created on the next tick (rows wait in default).
    tx.execute_batch("SELECT pg_advisory_xact_lock(7486425); SET LOCAL lock_timeout = '10s'")?;
    let existing = list(&tx)?;
    let has_default = existing.iter().any(|p| p.bounds == Bounds::Default);
    let today = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    let mut months: std::collections::BTreeSet<jiff::civil::Date> = (0..=MONTHS_AHEAD)
        .map(|ahead| month_start(today, ahead))
        .collect();
    if has_default {
        let waiting: Vec<String> = tx.query_map(
            "SELECT DISTINCT substr(received_at, 1, 7) FROM events_default",
            params![],
            |r| r.get(0),
        )?;
        // A time that is not `YYYY-MM…` stays in default; retention deletes it by row.
        months.extend(
            waiting
                .iter()
                .filter_map(|m| format!("{m}-01").parse::<jiff::civil::Date>().ok()),
        );
    }
    let mut created = Vec::new();
    for month in months {
        let (lo, hi) = (month.to_string(), month_start(month, 1).to_string());
        if existing.iter().any(|p| p.bounds.overlaps(&lo, &hi)) {
            continue;
        }
        let name = partition_name(month);
        // Made beside the table, filled from default, then attached: attaching checks
        // that default holds nothing of this month any more.
        let mut sql =
            format!("CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);");
        if has_default {
            sql.push_str(&format!(
                "INSERT INTO {name} SELECT * FROM events_default WHERE received_at >= '{lo}' AND received_at < '{hi}';
                 DELETE FROM events_default WHERE received_at >= '{lo}' AND received_at < '{hi}';"
            ));
        }
        sql.push_str(&format!(
            "ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ('{lo}') TO ('{hi}');"
        ));
        tx.execute_batch(&sql)?;
        created.push(name);
    }
    tx.commit()?;
    if !created.is_empty() {
        tracing::info!(partitions = ?created, "monthly partitions of events created");
    }
    Ok(created)
}

/// A partition retention dropped, and how many events it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub name: String,
    pub events: u64,
}

/// Detaches and drops every partition whose rows are all received before `cutoff`
/// (its upper bound at or before it). Each in its own transaction with a short lock
/// wait; one that cannot take its lock now is left for the next run (and the rows
/// past the cutoff in it are deleted by the caller's slices meanwhile).
pub fn drop_older_than(conn: &mut Conn, cutoff: &str) -> Result<Vec<Dropped>, PartitionError> {
    let mut dropped = Vec::new();
    for partition in list(&*conn)? {
        let Bounds::Range { to: Some(to), .. } = &partition.bounds else {
            continue;
        };
        if to.as_str() > cutoff {
            continue;
        }
        let name = &partition.name;
        let tx = conn.transaction()?;
        tx.execute_batch("SET LOCAL lock_timeout = '10s'")?;
        let events: i64 =
            tx.query_row(&format!("SELECT count(*) FROM {name}"), params![], |r| {
                r.get(0)
            })?;
        let detached = tx.execute_batch(&format!(
            "ALTER TABLE events DETACH PARTITION {name}; DROP TABLE {name};"
        ));
        match detached.and_then(|()| tx.commit()) {
            Ok(()) => {
                tracing::info!(
                    partition = name,
                    events,
                    "retention dropped a month of events"
                );
                dropped.push(Dropped {
                    name: name.clone(),
                    events: events as u64,
                });
            }
            Err(e) => {
                tracing::warn!(partition = name, error = %e, "partition not dropped now; retried on the next run");
            }
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Incoming, Store};

    /// `n` records of agent `ws-p`, epoch 1, chained from the genesis hash.
    fn records(n: u64) -> Vec<String> {
        let mut prev = weilan_config::event::GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let raw = serde_json::json!({
                    "schema": weilan_config::event::SCHEMA_VERSION, "event_id": format!("ws-p:1:{seq}"),
                    "time": "2026-03-15T01:00:00Z", "host_role": "workstation", "prev_hash": prev,
                    "event": {"kind": "agent.stopping", "data": {"reason": "filler"}},
                })
                .to_string();
                prev = weilan_config::event::record_hash(raw.as_bytes());
                raw
            })
            .collect()
    }

    /// Stores `raws` as one batch received at `at`; returns (new, duplicates).
    fn store(s: &mut Store, raws: &[String], at: &str) -> (usize, u32) {
        let incoming: Vec<Incoming<'_>> =
            raws.iter().map(|r| Incoming::parse(r).unwrap()).collect();
        let (out, ()) = s
            .in_transaction(|tx| {
                crate::ingest::store_batch_in(
                    tx,
                    "ws-p",
                    &incoming,
                    at.parse().unwrap(),
                    |_, _, _| Ok(()),
                )
            })
            .unwrap();
        (out.new.len(), out.duplicates)
    }

    fn count(s: &mut Store, table: &str) -> i64 {
        s.conn()
            .query_row(&format!("SELECT count(*) FROM {table}"), params![], |r| {
                r.get(0)
            })
            .unwrap()
    }

    #[test]
    fn a_month_waits_in_default_moves_into_its_partition_and_is_dropped_whole() {
        let Some(pg) = crate::db::testing::TempDatabase::create("monthly partitions") else {
            return;
        };
        let mut s = Store::open_at(&pg.location()).unwrap();
        // A fresh database: this month and the next two, and default; nothing older.
        let now = jiff::Timestamp::now();
        let names: Vec<String> = list(s.conn())
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        let this_month =
            partition_name(month_start(now.to_zoned(jiff::tz::TimeZone::UTC).date(), 0));
        assert!(
            names.contains(&this_month) && names.contains(&"events_default".to_string()),
            "{names:?}"
        );
        assert_eq!(names.len(), 1 + 1 + MONTHS_AHEAD as usize, "{names:?}");
        // March 2026 has no partition: its rows wait in default, and are all kept.
        let raws = records(30);
        assert_eq!(store(&mut s, &raws, "2026-03-15T02:00:00Z"), (30, 0));
        assert_eq!(count(&mut s, "events_default"), 30);
        // The same batch again, received in another month: nothing stored twice, though
        // the key of a partitioned table cannot see across months.
        assert_eq!(store(&mut s, &raws[..10], &now.to_string()), (0, 10));
        assert_eq!(store(&mut s, &raws[..10], "2026-03-15T02:00:01Z"), (0, 10));
        assert_eq!(count(&mut s, "events"), 30);
        // The next maintenance gives March a partition and moves its rows there.
        let created = maintain(s.conn(), "2026-03-20T00:00:00Z".parse().unwrap()).unwrap();
        assert!(
            created.contains(&"events_y2026m03".to_string()),
            "{created:?}"
        );
        assert_eq!(
            (
                count(&mut s, "events_default"),
                count(&mut s, "events_y2026m03")
            ),
            (0, 30)
        );
        assert!(maintain(s.conn(), "2026-03-20T00:00:00Z".parse().unwrap())
            .unwrap()
            .is_empty());
        // Retention: a cutoff inside April drops March whole, and nothing else.
        let dropped = drop_older_than(s.conn(), "2026-04-02T00:00:00Z").unwrap();
        assert_eq!(
            dropped,
            vec![Dropped {
                name: "events_y2026m03".into(),
                events: 30
            }]
        );
        assert_eq!(count(&mut s, "events"), 0);
        let names: Vec<String> = list(s.conn())
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert!(
            !names.contains(&"events_y2026m03".to_string())
                && names.contains(&"events_y2026m04".to_string()),
            "{names:?}"
        );
        // A later month's partition, still in use, is not dropped.
        assert!(drop_older_than(s.conn(), "2026-04-30T00:00:00Z")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bounds_are_read_as_the_catalogue_writes_them() {
        assert_eq!(
            Bounds::parse("FOR VALUES FROM ('2026-12-01') TO ('2027-01-01')"),
            Some(Bounds::Range {
                from: Some("2026-12-01".into()),
                to: Some("2027-01-01".into())
            })
        );
        assert_eq!(
            Bounds::parse("FOR VALUES FROM (MINVALUE) TO ('2027-01-01')"),
            Some(Bounds::Range {
                from: None,
                to: Some("2027-01-01".into())
            })
        );
        assert_eq!(Bounds::parse("DEFAULT"), Some(Bounds::Default));
        assert_eq!(Bounds::parse("FOR VALUES IN ('a')"), None);
    }

    #[test]
    fn month_bounds_take_every_time_of_their_month_and_no_other() {
        let month = "2026-12-17".parse::<jiff::civil::Date>().unwrap();
        let (lo, hi) = (
            month_start(month, 0).to_string(),
            month_start(month, 1).to_string(),
        );
        assert_eq!((lo.as_str(), hi.as_str()), ("2026-12-01", "2027-01-01"));
        let december = Bounds::Range {
            from: Some(lo.clone()),
            to: Some(hi.clone()),
        };
        for inside in [
            "2026-12-01T00:00:00Z",
            "2026-12-01T00:00:00.5Z",
            "2026-12-31T23:59:59.999Z",
        ] {
            assert!(lo.as_str() <= inside && inside < hi.as_str(), "{inside}");
        }
        for outside in ["2026-11-30T23:59:59.999999999Z", "2027-01-01T00:00:00Z"] {
            assert!(
                !(lo.as_str() <= outside && outside < hi.as_str()),
                "{outside}"
            );
        }
        assert!(december.overlaps("2026-12-01", "2027-01-01"));
        assert!(!december.overlaps("2027-01-01", "2027-02-01"));
        assert!(!december.overlaps("2026-11-01", "2026-12-01"));
        let before = Bounds::Range {
            from: None,
            to: Some("2026-12-01".into()),
        };
        assert!(before.overlaps("2026-11-01", "2026-12-01"));
        assert!(!before.overlaps("2026-12-01", "2027-01-01"));
        assert_eq!(partition_name(month_start(month, 1)), "events_y2027m01");
    }
}
