//! Retention benchmark (not a test): how long dropping a month of events takes, row by
//! row against a whole monthly partition (`collector/src/partitions.rs`).
//!
//! `cargo bench --bench retention` (environment: `EVENTS` (1 000 000), `AGENTS`
//! (200)). Needs a PostgreSQL server (`WEILAN_TEST_POSTGRES`, else the local socket,
//! as the tests use).
//!
//! `EVENTS` events of `AGENTS` agents, received evenly over 61 days from 1 September
//! (about half in September), each row the size of a stored USB event (~600 bytes of
//! envelope), are written straight into three stores with the collector's schema: a
//! SQLite file, and two PostgreSQL schemas whose `events` has the monthly partitions.
//! Then retention runs with a cutoff of 1 October 12:00, as `events_keep_days` would
//! put it: on SQLite, and on the first PostgreSQL store, deleting rows in slices as
//! retention did before the partitions (and still does on SQLite); on the second,
//! `retention` as shipped — September's partition detached and dropped, the half day
//! of October deleted in slices. Side by side in the same run: the time, the rows
//! removed, and how long one batch of 100 events takes to store right after.

mod common;

use std::time::Instant;

use common::env_or;
use weilan_collector::db::{params, Location, Sql};
use weilan_collector::store::Store;

const CUTOFF: &str = "2026-10-01T12:00:00Z";

/// The row filler: one statement, generating `events` rows on the server.
fn fill(store: &mut Store, events: usize, agents: usize) {
    let postgres = store.conn().engine() == weilan_collector::db::Engine::Postgres;
    let sql = if postgres {
        format!(
            "INSERT INTO events (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope, hash, prev_hash)
             SELECT 'ws-' || (i % {agents}) || ':1:' || i, 'ws-' || (i % {agents}), 1, i, 'usb.attached', t, t,
                    'workstation', repeat('{{\"usb\":\"x\"}}', 55), md5(i::text) || md5(i::text), md5((i - 1)::text) || md5((i - 1)::text)
               FROM (SELECT i, to_char(timestamp '2026-09-01' + make_interval(secs => i * (61.0 * 86400 / {events})),
                                       'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS t
                       FROM generate_series(1, {events}) AS i) g"
        )
    } else {
        format!(
            "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < {events})
             INSERT INTO events (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope, hash, prev_hash)
             SELECT 'ws-' || (i % {agents}) || ':1:' || i, 'ws-' || (i % {agents}), 1, i, 'usb.attached', t, t,
                    'workstation', replace(hex(zeroblob(55)), '00', '{{\"usb\":\"x\"}}'), hex(randomblob(32)), hex(randomblob(32))
               FROM (SELECT i, strftime('%Y-%m-%dT%H:%M:%SZ', '2026-09-01', '+' || (i * 61.0 * 86400 / {events}) || ' seconds') AS t
                       FROM g)"
        )
    };
    store.conn().execute_batch(&sql).unwrap();
}

/// Retention as before the partitions: rows before the cutoff, 10 000 at a time.
fn delete_rows(store: &mut Store) -> u64 {
    weilan_collector::export::schedule::delete_events_before(store.conn(), CUTOFF).unwrap()
}

/// Seconds to store one batch of 100 new events after retention (the table's
/// indexes as retention left them).
fn one_batch(store: &mut Store, events: usize) -> f64 {
    let started = Instant::now();
    store
        .in_transaction(|tx| {
            for i in 0..100 {
                let seq = (events + 1 + i) as i64;
                tx.execute(
                    "INSERT INTO events (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope, hash, prev_hash)
                     VALUES (?1, 'ws-new', 1, ?2, 'usb.attached', ?3, ?3, 'workstation', '{}', '', '')",
                    params![format!("ws-new:1:{seq}"), seq, "2026-10-31T23:00:00Z"],
                )?;
            }
            Ok(())
        })
        .unwrap();
    started.elapsed().as_secs_f64()
}

/// Bytes the events take on disk: SQLite's file (pages in use and free), PostgreSQL's
/// partitions with their indexes and TOAST.
fn events_bytes(store: &mut Store) -> i64 {
    let conn = store.conn();
    match conn.sqlite() {
        Some(sqlite) => sqlite
            .query_row(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                [],
                |r| r.get(0),
            )
            .unwrap(),
        None => conn
            .query_row(
                "SELECT CAST(COALESCE(sum(pg_total_relation_size(inhrelid)), 0) AS BIGINT)
                   FROM pg_inherits WHERE inhparent = to_regclass('events')",
                params![],
                |r| r.get(0),
            )
            .unwrap(),
    }
}

fn count(store: &mut Store) -> i64 {
    store
        .conn()
        .query_row("SELECT count(*) FROM events", params![], |r| r.get(0))
        .unwrap()
}

struct Run {
    store: &'static str,
    how: &'static str,
    fill_secs: f64,
    before: i64,
    removed: u64,
    secs: f64,
    after: i64,
    bytes_before: i64,
    bytes_after: i64,
    batch_ms: f64,
}

fn measure(
    name: &'static str,
    how: &'static str,
    location: &Location,
    events: usize,
    agents: usize,
    retain: impl FnOnce(&mut Store) -> u64,
) -> Run {
    let mut store = Store::open_at(location).unwrap();
    // September to November have partitions before the rows arrive, as a running
    // collector makes them ahead (no-op on SQLite).
    weilan_collector::partitions::maintain(store.conn(), "2026-09-01T00:00:00Z".parse().unwrap())
        .unwrap();
    let started = Instant::now();
    fill(&mut store, events, agents);
    let fill_secs = started.elapsed().as_secs_f64();
    if let Some(sqlite) = store.conn().sqlite() {
        sqlite
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
    } else {
        store
            .conn()
            .execute_batch("CHECKPOINT; ANALYZE events")
            .unwrap();
    }
    let before = count(&mut store);
    let bytes_before = events_bytes(&mut store);
    let started = Instant::now();
    let removed = retain(&mut store);
    let secs = started.elapsed().as_secs_f64();
    let after = count(&mut store);
    // What the disk holds once retention returns (no VACUUM: the space a row delete
    // frees is reused by later rows, not given back).
    if let Some(sqlite) = store.conn().sqlite() {
        sqlite
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
    }
    let bytes_after = events_bytes(&mut store);
    let batch_ms = one_batch(&mut store, events) * 1000.0;
    Run {
        store: name,
        how,
        fill_secs,
        before,
        removed,
        secs,
        after,
        bytes_before,
        bytes_after,
        batch_ms,
    }
}

fn main() {
    let events = env_or("EVENTS", 1_000_000);
    let agents = env_or("AGENTS", 200);
    let dir = tempfile::tempdir().unwrap();
    let Some(rows_pg) = weilan_collector::db::testing::TempDatabase::create("retention rows")
    else {
        return;
    };
    let parts_pg = weilan_collector::db::testing::TempDatabase::create("retention partitions")
        .expect("the server answered a moment ago");
    // One day kept, so the cutoff one day before `now` is CUTOFF.
    let settings = weilan_config::settings::collector::ExportSettings {
        dir: dir.path().join("exports"),
        language: "zh-CN".into(),
        timezone: jiff::tz::TimeZone::UTC,
        keep: 0,
        events_keep_days: 1,
        heartbeats_compact_after: None,
        schedules: Vec::new(),
    };
    let now: jiff::Timestamp = "2026-10-02T12:00:00Z".parse().unwrap();
    let runs = [
        measure(
            "SQLite",
            "rows deleted, 10 000 a slice",
            &Location::Sqlite(dir.path().join("weilan.db")),
            events,
            agents,
            delete_rows,
        ),
        measure(
            "PostgreSQL",
            "rows deleted, 10 000 a slice (before partitions)",
            &rows_pg.location(),
            events,
            agents,
            delete_rows,
        ),
        measure(
            "PostgreSQL",
            "`retention`: September's partition dropped, the rest in slices",
            &parts_pg.location(),
            events,
            agents,
            |store| {
                let removed =
                    weilan_collector::export::schedule::retention(store.conn(), &settings, now)
                        .unwrap();
                assert_eq!(
                    removed
                        .partitions
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>(),
                    ["events_y2026m09"],
                    "September dropped whole"
                );
                removed.events
            },
        ),
    ];
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\n{events} events of {agents} agents over 61 days from 2026-09-01; cutoff {CUTOFF}; {cores} cores\n"
    );
    println!("| store | retention | fill | events before | removed | time | events after | on disk before → after | next batch of 100 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mib = |b: i64| b as f64 / (1 << 20) as f64;
    for r in &runs {
        println!(
            "| {} | {} | {:.1} s | {} | {} | **{:.3} s** | {} | {:.0} → {:.0} MiB | {:.1} ms |",
            r.store,
            r.how,
            r.fill_secs,
            r.before,
            r.removed,
            r.secs,
            r.after,
            mib(r.bytes_before),
            mib(r.bytes_after),
            r.batch_ms
        );
        assert_eq!(
            r.before - r.removed as i64,
            r.after,
            "{} {}",
            r.store,
            r.how
        );
    }
    assert_eq!(
        runs[1].removed, runs[2].removed,
        "both ways remove the same events"
    );
}
