//! Durability benchmark (not a test): journal append throughput and latency,
//! end-to-end capture→commit latency under load (to the commit, seen by a reader of
//! the collector's database, and to ingest's receipt), and catch-up after an outage.
//!
//! `cargo bench --bench durability` (as root: it uses a network namespace, like the
//! end-to-end tests). Environment: `RATE` (events/s for the latency run, default 1000),
//! `SECS` (its length, default 10), `OFFLINE` (events buffered offline, default 100000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use weilan_agent::journal::{Journal, JournalConfig};
use weilan_config::event::{AgentStopping, Envelope, Event, EventId, EventKey};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn sample_env() -> Envelope {
    Envelope {
        schema: 1,
        event_id: EventId {
            agent_id: "bench".into(),
            key: EventKey { epoch: 0, seq: 0 },
        },
        time: jiff::Timestamp::now(),
        host_role: "workstation".into(),
        site: None,
        prev_hash: String::new(),
        event: Event::AgentStopping(AgentStopping {
            reason: "x".repeat(400),
        }),
    }
}

fn journal_bench() {
    println!(
        "journal append (fdatasync per group commit, ext4 on /tmp's device, ~560-byte records):"
    );
    for (group, total) in [(1usize, 3000usize), (16, 20_000), (256, 100_000)] {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(JournalConfig {
            dir: dir.path().join("journal"),
            state_dir: dir.path().to_path_buf(),
            segment_bytes: 16 << 20,
            max_bytes: 1 << 34,
            retain_acked_bytes: 0,
        })
        .unwrap();
        let mut commit_lat = Vec::new();
        let start = Instant::now();
        let mut done = 0;
        while done < total {
            let t = Instant::now();
            for _ in 0..group {
                j.append(sample_env()).unwrap();
            }
            j.sync().unwrap();
            commit_lat.push(t.elapsed().as_secs_f64() * 1e6);
            done += group;
        }
        let secs = start.elapsed().as_secs_f64();
        commit_lat.sort_by(f64::total_cmp);
        println!(
            "  group {group:>3}: {:>8.0} events/s; commit (append {group} + sync) p50 {:.0} µs, p99 {:.0} µs",
            done as f64 / secs,
            pct(&commit_lat, 0.5),
            pct(&commit_lat, 0.99)
        );
    }
}

fn latencies(w: &World) -> Vec<f64> {
    let mut v: Vec<f64> = w
        .db()
        .query_map(
            "SELECT agent_time, received_at FROM events WHERE kind IN ('usb.attached','usb.detached')",
            params![],
            |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
        )
        .unwrap()
        .into_iter()
        .filter_map(|(a, b)| {
            let a: jiff::Timestamp = a.parse().ok()?;
            let b: jiff::Timestamp = b.parse().ok()?;
            Some(b.duration_since(a).as_secs_f64() * 1000.0)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn e2e_latency(rate: u64, secs: u64) {
    let w = World::new();
    let ns = Netns::create();
    // One agent stands for a fleet's whole rate here, so its per-source share is
    // raised above the default 4 MiB/s (about 3 700 of these events per second).
    let collector = w.start_collector(
        &ns,
        &w.collector_toml(
            false,
            "[ingest]\nmax_bytes_per_source_per_sec = 33554432\n[log]\nlevel = \"warn\"\n",
        ),
    );
    let cfg = w.agent_toml_with(
        AGENT,
        "pki/ca.pem",
        "max_events_per_sec = 100000",
        "[log]\nlevel = \"warn\"\n",
    );
    let _agent = w.start_agent_stored(&ns, &cfg, AGENT);
    let pairs = (rate * secs / 2) as usize;
    // rate events/s = rate/2 pairs/s = rate/40 pairs per 50 ms.
    let per_tick = ((rate / 40).max(1)) as usize;
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (db, watching) = (w.path("weilan.db"), watching.clone());
        std::thread::spawn(move || commit_latencies(&db, &watching))
    };
    let start = Instant::now();
    usb_burst_paced(&ns, &w.sysfs(), "1-9", "LAT", pairs, per_tick);
    let sent_in = start.elapsed();
    wait_for(
        "all stored",
        Duration::from_secs(120),
        || (w.burst_count("LAT") == (pairs * 2) as i64).then_some(()),
        || collector.log_text(),
    );
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let committed = watcher.join().unwrap();
    let received = latencies(&w);
    let offered = (pairs * 2) as f64 / sent_in.as_secs_f64();
    for (what, lat) in [
        ("capture→committed (a reader sees the row)", &committed),
        ("capture→received (ingest's received_at)", &received),
    ] {
        println!(
            "end-to-end {what} at {offered:.0} events/s offered for {:.1} s ({} events, agent and collector on one 2-core host): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            sent_in.as_secs_f64(),
            lat.len(),
            pct(lat, 0.5),
            pct(lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN)
        );
    }
}

/// Capture → commit, for every USB event: a reader polls the collector's database
/// every millisecond for new rows (in WAL mode a row is visible to another connection
/// exactly when its transaction committed) and takes now − the agent's event time.
fn commit_latencies(db: &std::path::Path, watching: &std::sync::atomic::AtomicBool) -> Vec<f64> {
    let conn = loop {
        if let Ok(c) =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        {
            break c;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // One agent's events commit in its sequence order; its index finds the new ones.
    let mut last = (-1i64, -1i64);
    let mut v = Vec::new();
    while watching.load(std::sync::atomic::Ordering::Relaxed) {
        let now = jiff::Timestamp::now();
        let Ok(mut st) = conn.prepare_cached(
            "SELECT epoch, seq, agent_time, kind FROM events
             WHERE agent_id = ?1 AND (epoch, seq) > (?2, ?3) ORDER BY epoch, seq",
        ) else {
            // The schema is not there yet.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let rows: Vec<(i64, i64, String, String)> = st
            .query_map(rusqlite::params![AGENT, last.0, last.1], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map(|rows| rows.filter_map(|r| r.ok()).collect())
            .unwrap_or_default();
        for (epoch, seq, agent_time, kind) in rows {
            last = (epoch, seq);
            if kind != "usb.attached" && kind != "usb.detached" {
                continue;
            }
            if let Ok(t) = agent_time.parse::<jiff::Timestamp>() {
                v.push(now.duration_since(t).as_secs_f64() * 1000.0);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    v.sort_by(f64::total_cmp);
    v
}

fn catch_up(offline: u64, limit: u64) {
    let w = World::new();
    let ns = Netns::create();
    let cfg = w.agent_toml_with(
        AGENT,
        "pki/ca.pem",
        &format!("max_events_per_sec = {limit}"),
        "[log]\nlevel = \"warn\"\n",
    );
    let agent = w.start_agent(&ns, &cfg, AGENT);
    wait_for(
        "agent up",
        Duration::from_secs(60),
        || (journal_status(&cfg).0 >= 2).then_some(()),
        || agent.log_text(),
    );
    let base = journal_status(&cfg).0;
    usb_burst(&ns, &w.sysfs(), "1-9", "OFF", (offline / 2) as usize);
    wait_for(
        "captured",
        Duration::from_secs(300),
        || (journal_status(&cfg).0 >= base + offline).then_some(()),
        || agent.log_text(),
    );
    let start = Instant::now();
    let collector = w.start_collector(&ns, &w.collector_toml(false, "[log]\nlevel = \"warn\"\n"));
    wait_for(
        "caught up",
        Duration::from_secs(900),
        || (w.burst_count("OFF") == offline as i64).then_some(()),
        || collector.log_text(),
    );
    let secs = start.elapsed().as_secs_f64();
    println!(
        "catch-up after an outage: {offline} buffered events delivered and stored in {secs:.1} s = {:.0} events/s (agent limit {limit}/s); agent peak RSS {} MiB",
        offline as f64 / secs,
        agent.peak_rss_kib() / 1024
    );
}

fn main() {
    weilan_config::tls::install_default_provider();
    journal_bench();
    if !netns_available() {
        return;
    }
    e2e_latency(env_or("RATE", 1000), env_or("SECS", 10));
    let offline = env_or("OFFLINE", 100_000);
    catch_up(offline, 1_000_000);
    catch_up(offline.min(20_000), 2000);
}
