//! Which collector does the fleet's once-only work.
//!
//! Several collectors may share the ingest (`broker.shared_group`, PostgreSQL):
//! each stores the batches the broker hands it, but the fleet checks (silent agents,
//! unfilled gaps, expiring certificates), the scheduled exports and retention, the
//! journal-bundle imports and the commands the command line queued must run once per
//! fleet, not once per collector. The leader is whichever collector holds a
//! PostgreSQL session advisory lock on its own connection: the server releases it
//! when that connection ends, so a collector killed with SIGKILL hands the duties on
//! within one look of another. On SQLite there is one collector, always the leader.

use std::time::{Duration, Instant};

use crate::db::{self, params, Conn, Location, Sql};

/// The advisory lock's first key; the second is the schema's name, so that
/// separate stores in one database (as the tests make) each have a leader.
const LEADER_LOCK: i32 = 7486422;

/// How long an answer holds before the connection is asked again.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// This collector's claim to the fleet's once-only duties.
pub struct Leadership {
    location: Location,
    /// The connection that holds the lock (PostgreSQL), opened on first look.
    conn: Option<Conn>,
    leading: bool,
    looked: Option<Instant>,
}

impl Leadership {
    pub fn new(location: Location) -> Leadership {
        Leadership {
            location,
            conn: None,
            leading: false,
            looked: None,
        }
    }

    /// Whether this collector leads now: keeps the lock while its connection lives,
    /// takes it when free. Blocks on PostgreSQL (call off the async runtime).
    pub fn leads(&mut self) -> bool {
        if matches!(self.location, Location::Sqlite(_)) {
            return true;
        }
        if self.looked.is_some_and(|t| t.elapsed() < LOOK_EVERY) {
            return self.leading;
        }
        self.looked = Some(Instant::now());
        let was = self.leading;
        self.leading = match self.look() {
            Ok(leading) => leading,
            Err(e) => {
                // A broken connection no longer holds the lock: the server released it.
                tracing::warn!(error = %e, "leadership not known; the fleet's duties wait for the database");
                self.conn = None;
                false
            }
        };
        match (was, self.leading) {
            (false, true) => tracing::info!(
                "this collector leads: fleet checks, scheduled exports, imports and queued commands run here"
            ),
            (true, false) => tracing::warn!("this collector no longer leads the fleet's duties"),
            _ => {}
        }
        self.leading
    }

    fn look(&mut self) -> Result<bool, db::Error> {
        if self.conn.is_none() {
            self.conn = Some(Conn::open(&self.location)?);
        }
        let conn = self.conn.as_mut().expect("opened above");
        if self.leading {
            // Held for as long as this session lives: asking proves it does.
            conn.query_row("SELECT 1", params![], |r| r.get::<i64>(0))?;
            return Ok(true);
        }
        conn.query_row(
            "SELECT CAST(pg_try_advisory_lock(?1, hashtext(current_schema())) AS INTEGER)",
            params![LEADER_LOCK],
            |r| r.get::<i64>(0),
        )
        .map(|took| took == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_always_leads() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Leadership::new(Location::Sqlite(dir.path().join("w.db")));
        assert!(l.leads());
    }

    #[test]
    fn one_postgres_session_leads_and_another_takes_over_when_it_ends() {
        let Some(db) = crate::db::testing::TempDatabase::create("leader") else {
            return;
        };
        let mut first = Leadership::new(db.location());
        let mut second = Leadership::new(db.location());
        assert!(first.leads(), "the first to ask leads");
        assert!(!second.leads(), "the lock is held by the first");
        drop(first);
        // The server frees the lock when its backend for the first session has gone,
        // a moment after the client closed; the second's answer is kept for a second.
        let deadline = Instant::now() + Duration::from_secs(10);
        let took_over = loop {
            second.looked = None;
            if second.leads() {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            took_over,
            "the second takes over when the first's session ends"
        );
    }
}
