//! Rules benchmark (not a test): rule-evaluation throughput and alert latency.
//!
//! `cargo bench --bench rules` (environment: `EVENTS` (100 000), `SAMPLES` (200)).
//!
//! 1. Throughput, in process: the collector's rules engine with every built-in rule
//!    (the count is printed) over a mixed stream of ten event kinds (USB attach and decisions, exports
//!    plain and classified, refusals, transfers to 1 000 destinations, transfer
//!    tools, failed logins, sudo, heartbeats), in batches of 100 per SQLite
//!    transaction with the events inserted as ingest does (`synchronous = FULL`,
//!    WAL). Side by side in the same run: the same stream with no rules, so the
//!    difference is what the rules cost.
//! 2. Alert latency, end to end: a real `weilan collector serve` (embedded broker,
//!    TLS, client certificates); a simulated agent publishes one unknown USB stick per
//!    signed batch and waits for its alert line in `alerts.jsonl` (polled every
//!    0.2 ms). Reported: ingest receiving the event (`events.received_at`) → line on
//!    disk, and publish → line on disk.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{env_or, free_port, key, options, signed_batch, start_collector, tls};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::json;
use weilan_collector::rules::{Engine, Fact};
use weilan_collector::store::{insert_batch, Incoming, Store};
use weilan_config::event::{record_hash, Envelope};
use weilan_config::signing::Signer;

fn envelope(agent: &str, seq: u64, kind: &str, data: serde_json::Value) -> Envelope {
    serde_json::from_value(json!({
        "schema": weilan_config::event::SCHEMA_VERSION,
        "event_id": format!("{agent}:1:{seq}"),
        "time": jiff::Timestamp::now().to_string(),
        "host_role": "workstation",
        "prev_hash": weilan_config::event::GENESIS_HASH,
        "event": {"kind": kind, "data": data},
    }))
    .unwrap()
}

/// Event `seq` of the mixed stream (`common::mixed`).
fn mixed(agent: &str, seq: u64) -> Envelope {
    let (kind, data) = common::mixed(seq);
    envelope(agent, seq, kind, data)
}

/// The shipped example policy (the rules' device checks read it).
fn example_policy() -> weilan_config::policy::Policy {
    weilan_config::load::load_str::<weilan_config::policy::PolicyFile>(
        weilan_config::examples::POLICY_TOML,
        std::path::Path::new("policy.toml"),
        PathBuf::from("."),
    )
    .unwrap()
}

/// Stores and evaluates `events` in batches of 100; returns (seconds, alerts).
fn throughput(engine: &mut Engine, store: &mut Store, events: &[Envelope]) -> (f64, u64) {
    let policy = example_policy();
    let start = Instant::now();
    let mut alerts = 0;
    for chunk in events.chunks(100) {
        let now = jiff::Timestamp::now();
        let raws: Vec<String> = chunk
            .iter()
            .map(|e| serde_json::to_string(e).unwrap())
            .collect();
        let out = store
            .in_transaction(|tx| {
                // Stored exactly as ingest stores a batch.
                let incoming: Vec<Incoming<'_>> = chunk
                    .iter()
                    .zip(&raws)
                    .map(|(e, raw)| Incoming {
                        envelope: e.clone(),
                        raw,
                        hash: record_hash(raw.as_bytes()),
                    })
                    .collect();
                insert_batch(tx, &incoming, &now.to_string(), |_| Ok(false))?;
                let facts: Vec<Fact> = chunk.iter().map(Fact::from_envelope).collect();
                engine.evaluate(tx, &policy, &facts, now)
            })
            .unwrap();
        alerts += out.alerts.len() as u64;
    }
    (start.elapsed().as_secs_f64(), alerts)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    weilan_config::tls::install_default_provider();
    let n = env_or("EVENTS", 100_000) as u64;
    let samples = env_or("SAMPLES", 200) as u64;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // 1. Throughput: all built-in rules vs none, same stream, same store settings.
    // (`PURE_ONLY=1`: only part 2, for profiling the evaluation alone.)
    let events: Vec<Envelope> = (1..=n).map(|s| mixed("bench-rules", s)).collect();
    if std::env::var_os("PURE_ONLY").is_none() {
        with_storage(&events, n);
    }
    pure_evaluation(&events, n);
    if samples == 0 {
        return;
    }
    latency(root, samples);
}

/// A store for part 1: the SQLite file `path`, or with `STORE=postgresql` a fresh
/// database on the test server (`WEILAN_TEST_POSTGRES`), kept while the guard lives.
fn open_store(
    path: &std::path::Path,
) -> (Store, Option<weilan_collector::db::testing::TempDatabase>) {
    if std::env::var("STORE").as_deref() == Ok("postgresql") {
        let db = weilan_collector::db::testing::TempDatabase::create("bench")
            .expect("STORE=postgresql needs a PostgreSQL server");
        let store = Store::open_at(&db.location()).unwrap();
        println!("  (store: PostgreSQL, {})", db.location());
        return (store, Some(db));
    }
    (Store::open(path).unwrap(), None)
}

/// Part 1: the stream stored and evaluated, with all built-in rules and with none.
fn with_storage(events: &[Envelope], n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut with_rules = Engine::new(true, None).unwrap();
    let rules = with_rules.rule_set().rules().count();
    let (mut store, _kept) = open_store(&root.join("rules.db"));
    let (t_rules, alerts) = throughput(&mut with_rules, &mut store, events);
    let mut no_rules = Engine::new(false, None).unwrap();
    let (mut store0, _kept0) = open_store(&root.join("plain.db"));
    let (t_plain, _) = throughput(&mut no_rules, &mut store0, events);
    let s = &with_rules.stats;
    println!("rules: {rules} built-in rules, {n} mixed events (10 kinds), batches of 100 per transaction");
    println!(
        "  with rules: {:.0} events/s ({:.2} s), {} evaluations ({:.1} per event), {} matches, {} alerts raised, {} repeats suppressed, {} errors",
        n as f64 / t_rules, t_rules, s.evaluations, s.evaluations as f64 / n as f64, s.matches, alerts, s.suppressed, s.errors
    );
    println!(
        "  no rules (store only): {:.0} events/s ({:.2} s)",
        n as f64 / t_plain,
        t_plain
    );
    println!(
        "  rules cost {:.1} µs per event; throughput ratio with/without rules {:.2}",
        (t_rules - t_plain) * 1e6 / n as f64,
        t_plain / t_rules
    );
}

/// Part 2 (issue "Performance", goal 3): evaluation alone.
fn pure_evaluation(events: &[Envelope], n: u64) {
    // 2. Pure evaluation (issue "Performance", goal 3): the same stream as facts
    // built beforehand, through the rules alone, on one thread, with an in-memory
    // database for the rules' own state (suppression, correlation, alerts) and no
    // event rows.
    let facts: Vec<Fact> = events.iter().map(Fact::from_envelope).collect();
    let mut pure = Engine::new(true, None).unwrap();
    let mut memory = Store::open(std::path::Path::new(":memory:")).unwrap();
    let policy = example_policy();
    let start = Instant::now();
    for chunk in facts.chunks(100) {
        let now = jiff::Timestamp::now();
        memory
            .in_transaction(|tx| pure.evaluate(tx, &policy, chunk, now))
            .unwrap();
    }
    let t_pure = start.elapsed().as_secs_f64();
    println!(
        "  pure evaluation (facts prebuilt, in-memory state, one thread): {:.0} events/s = {:.1} µs per event, {} errors",
        n as f64 / t_pure,
        t_pure * 1e6 / n as f64,
        pure.stats.errors
    );
}

/// Part 3: alert latency through a real collector.
fn latency(root: &std::path::Path, samples: u64) {
    // 3. Latency through a real collector.
    let agent = "bench-latency";
    let port = free_port();
    let (pki_paths, _collector) = start_collector(root, port, &[agent.to_string()]);
    let signer =
        Signer::from_pem_files(&pki_paths.agent(agent), &pki_paths.agent_key(agent)).unwrap();
    let alerts_path = root.join("alerts.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let published: Vec<(u64, jiff::Timestamp, std::time::SystemTime)> = rt.block_on(async {
        let t = tls(
            &pki_paths,
            &pki_paths.agent(agent),
            &pki_paths.agent_key(agent),
        );
        let (client, mut el) = AsyncClient::new(options(agent, port, t), 64);
        loop {
            if let Ok(Event::Incoming(Packet::ConnAck(_))) = el.poll().await {
                break;
            }
        }
        let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
        let mut prev = weilan_config::event::GENESIS_HASH.to_string();
        let mut reader: Option<BufReader<std::fs::File>> = None;
        let mut out = Vec::new();
        for seq in 1..=samples {
            let mut e = envelope(
                agent,
                seq,
                "usb.attached",
                common::usb(format!("{seq:064x}")),
            );
            e.event_id.key = key(seq);
            let payload = signed_batch(&signer, agent, seq, vec![e], &mut prev);
            let sent = jiff::Timestamp::now();
            client
                .publish(
                    format!("weilan/v1/agents/{agent}/events"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
            // Wait for this stick's red line (a yellow outside-hours line may come too).
            let deadline = Instant::now() + Duration::from_secs(10);
            let seen = loop {
                if reader.is_none() {
                    reader = std::fs::File::open(&alerts_path).ok().map(BufReader::new);
                }
                let mut found = None;
                if let Some(r) = reader.as_mut() {
                    let mut line = String::new();
                    while r.read_line(&mut line).unwrap_or(0) > 0 {
                        if !line.ends_with('\n') {
                            // Half-written: read it again whole.
                            let back = line.len() as i64;
                            r.seek_relative(-back).unwrap();
                            break;
                        }
                        if line.contains(&format!("\"{agent}:1:{seq}\""))
                            && line.contains("unknown-storage")
                        {
                            found = Some(std::time::SystemTime::now());
                        }
                        line.clear();
                    }
                }
                if let Some(t) = found {
                    break t;
                }
                assert!(Instant::now() < deadline, "no alert line for event {seq}");
                tokio::time::sleep(Duration::from_micros(200)).await;
            };
            out.push((seq, sent, seen));
        }
        driver.abort();
        out
    });
    let db = rusqlite::Connection::open(root.join("weilan.db")).unwrap();
    let mut from_ingest = Vec::new();
    let mut from_publish = Vec::new();
    for (seq, sent, seen) in &published {
        let received: String = db
            .query_row(
                "SELECT received_at FROM events WHERE event_id = ?1",
                [format!("{agent}:1:{seq}")],
                |r| r.get(0),
            )
            .unwrap();
        let received: jiff::Timestamp = received.parse().unwrap();
        let seen = jiff::Timestamp::try_from(*seen).unwrap();
        from_ingest.push(seen.duration_since(received).as_secs_f64() * 1000.0);
        from_publish.push(seen.duration_since(*sent).as_secs_f64() * 1000.0);
    }
    from_ingest.sort_by(f64::total_cmp);
    from_publish.sort_by(f64::total_cmp);
    println!("alert latency, {samples} unknown sticks one at a time through a real collector:");
    for (name, v) in [
        ("ingest received → line on disk", &from_ingest),
        ("agent publish → line on disk", &from_publish),
    ] {
        println!(
            "  {name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
}
