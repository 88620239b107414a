//! Storage benchmark (not a test): database bytes per agent-day, before and after
//! heartbeat compaction (`collector/src/heartbeats/mod.rs`).
//!
//! `cargo bench --bench storage` (environment: `AGENTS` (20), `DAYS` (1),
//! `HEARTBEAT_SECS` (30, the agent's default), `EVENTS_PER_DAY` (200)).
//!
//! Two fleets of `AGENTS` agents over `DAYS` days: *idle* (heartbeats only) and *busy*
//! (the same heartbeats and `EVENTS_PER_DAY` other events per agent-day, of nine
//! kinds: USB, exports, refusals, transfers, logins, sudo). Each record is serialized
//! as the agent journals it and stored through ingest's own storage path
//! (`store_batch_in`: rows, chain and gap checks), one batch per heartbeat as an idle
//! agent sends them. Then the database is vacuumed and measured, every heartbeat is
//! compacted as the running collector does once they are old, and it is vacuumed and
//! measured again. Side by side: the records' own JSON lines and their `gzip -6`
//! size (what a compressed log of the same facts would take).

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use common::env_or;
use weilan_collector::store::{Incoming, Store};
use weilan_config::event::{record_hash, Envelope, Event, EventId, EventKey, Heartbeat};

/// Database size once vacuumed (bytes).
fn db_bytes(store: &mut Store) -> u64 {
    let conn = store.conn().sqlite().expect("a SQLite store");
    conn.execute_batch("VACUUM").unwrap();
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    let size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    (pages * size) as u64
}

struct Fleet {
    agents: usize,
    days: usize,
    heartbeat_secs: i64,
    events_per_day: usize,
}

struct Measured {
    heartbeats: u64,
    others: u64,
    json_bytes: u64,
    gzip_bytes: u64,
    before: u64,
    after: u64,
    compact_secs: f64,
}

/// The `i`th of an agent's other events (the mixed stream without its heartbeats).
fn other(i: u64) -> (&'static str, serde_json::Value) {
    let (kind, data) = common::mixed(i);
    if kind == "agent.heartbeat" {
        return common::mixed(i + 1);
    }
    (kind, data)
}

fn fill(dir: &Path, fleet: &Fleet) -> Measured {
    let mut store = Store::open(&dir.join("weilan.db")).unwrap();
    // The size does not depend on it; the fill would take minutes with it.
    store
        .conn()
        .sqlite()
        .expect("a SQLite store")
        .pragma_update(None, "synchronous", "OFF")
        .unwrap();
    let jsonl_path = dir.join("records.jsonl");
    let mut jsonl = std::io::BufWriter::new(std::fs::File::create(&jsonl_path).unwrap());
    let start = jiff::Timestamp::from_second(1_795_000_000).unwrap();
    let per_day = (86_400 / fleet.heartbeat_secs) as usize;
    let beats = per_day * fleet.days;
    let (mut heartbeats, mut others) = (0u64, 0u64);
    for a in 0..fleet.agents {
        let agent = format!("ws-{a:04}");
        let mut seq = 0u64;
        let mut prev = weilan_config::event::GENESIS_HASH.to_string();
        for i in 0..beats {
            let at = start
                + jiff::SignedDuration::from_millis(
                    fleet.heartbeat_secs * 1000 * i as i64 + 17 * a as i64,
                );
            let mut events = vec![Event::AgentHeartbeat(Heartbeat {
                agent_version: "0.1.0".into(),
                uptime_secs: (fleet.heartbeat_secs * i as i64) as u64,
                policy_version: Some("2026-11-30.1".into()),
                backlog: 0,
                dropped_total: 0,
            })];
            // The day's other events spread evenly over its heartbeats.
            let (d, k) = (i / per_day, (i % per_day) as u64);
            let spread = |k: u64| k * fleet.events_per_day as u64 / per_day as u64;
            for n in spread(k)..spread(k + 1) {
                let (kind, data) = other(d as u64 * fleet.events_per_day as u64 + n);
                let v = serde_json::json!({"kind": kind, "data": data});
                events.push(serde_json::from_value(v).unwrap());
            }
            let raws: Vec<String> = events
                .into_iter()
                .map(|event| {
                    seq += 1;
                    let env = Envelope {
                        schema: weilan_config::event::SCHEMA_VERSION,
                        event_id: EventId {
                            agent_id: agent.clone(),
                            key: EventKey {
                                epoch: 1_795_000_000_000,
                                seq,
                            },
                        },
                        time: at,
                        host_role: "workstation".into(),
                        site: None,
                        prev_hash: std::mem::take(&mut prev),
                        event,
                    };
                    let raw = serde_json::to_string(&env).unwrap();
                    prev = record_hash(raw.as_bytes());
                    raw
                })
                .collect();
            for r in &raws {
                jsonl.write_all(r.as_bytes()).unwrap();
                jsonl.write_all(b"\n").unwrap();
            }
            heartbeats += 1;
            others += raws.len() as u64 - 1;
            let incoming: Vec<Incoming<'_>> =
                raws.iter().map(|r| Incoming::parse(r).unwrap()).collect();
            let received = at + jiff::SignedDuration::from_millis(40);
            store
                .in_transaction(|tx| {
                    weilan_collector::ingest::store_batch_in(
                        tx,
                        &agent,
                        &incoming,
                        received,
                        |_, _, f| Ok(f),
                    )
                })
                .unwrap();
        }
    }
    jsonl.flush().unwrap();
    drop(jsonl);
    let json_bytes = std::fs::metadata(&jsonl_path).unwrap().len();
    let gz = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -6 -c {} | wc -c", jsonl_path.display()))
        .output()
        .unwrap();
    let gzip_bytes = String::from_utf8_lossy(&gz.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let before = db_bytes(&mut store);
    let t = Instant::now();
    let done = weilan_collector::heartbeats::compact(store.conn(), "9999-12-31T00:00:00Z").unwrap();
    let compact_secs = t.elapsed().as_secs_f64();
    assert_eq!(
        (done.heartbeats, done.kept_as_rows),
        (heartbeats, 0),
        "{done:?}"
    );
    let after = db_bytes(&mut store);
    Measured {
        heartbeats,
        others,
        json_bytes,
        gzip_bytes,
        before,
        after,
        compact_secs,
    }
}

fn main() {
    let agents = env_or("AGENTS", 20);
    let days = env_or("DAYS", 1);
    let heartbeat_secs = env_or("HEARTBEAT_SECS", 30) as i64;
    let events_per_day = env_or("EVENTS_PER_DAY", 200);
    println!(
        "storage: {agents} agents × {days} day(s), a heartbeat every {heartbeat_secs} s; \
         busy fleet: {events_per_day} other events per agent-day"
    );
    println!("fleet | heartbeats | other events | records' JSON | gzip -6 | database before | after compaction | smaller by | per agent-day before → after | compaction");
    for (name, per_day) in [("idle", 0), ("busy", events_per_day)] {
        let dir = tempfile::tempdir().unwrap();
        let fleet = Fleet {
            agents,
            days,
            heartbeat_secs,
            events_per_day: per_day,
        };
        let m = fill(dir.path(), &fleet);
        let agent_days = (agents * days) as f64;
        let mib = |b: u64| b as f64 / 1_048_576.0;
        println!(
            "{name} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} MiB | {:.1}× | {:.0} KiB → {:.1} KiB | {:.0} heartbeats/s",
            m.heartbeats,
            m.others,
            mib(m.json_bytes),
            mib(m.gzip_bytes),
            mib(m.before),
            mib(m.after),
            m.before as f64 / m.after as f64,
            m.before as f64 / agent_days / 1024.0,
            m.after as f64 / agent_days / 1024.0,
            m.heartbeats as f64 / m.compact_secs,
        );
        if per_day == 0 {
            println!(
                "idle: {:.0} bytes per stored heartbeat before, {:.1} after",
                m.before as f64 / m.heartbeats as f64,
                m.after as f64 / m.heartbeats as f64
            );
        }
    }
}
