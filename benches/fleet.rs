//! Fleet load generator (not a test): `AGENTS` simulated agents, each with its own
//! enrolled certificate, over mutual TLS against a real `weilan collector serve`
//! (its embedded, supervised Mosquitto; SQLite with `synchronous = FULL`).
//!
//! `cargo bench --bench fleet` (environment: `AGENTS`, default 500; `BURST`, signed
//! batches per agent per burst, default 4; `EVENTS`, heartbeats per batch, default 1).
//!
//! 1. Connect: every agent connects at once (TLS with its client certificate) and
//!    subscribes to its acks: time to the last one, per-agent p50/p99.
//! 2. Burst: every agent publishes `BURST` batches at once (a window of 8 in
//!    flight): publish → signed ack latency p50/p99, batches never acknowledged
//!    within 60 s (lost), events the collector called duplicates.
//! 3. Reconnect storm: the collector's Mosquitto is killed; the collector restarts
//!    it and every agent reconnects on its own and sends `BURST` more batches: time
//!    until all are back, the same latency, loss and duplicate figures. Like the
//!    agent, a simulated agent sends a batch again after `ACK_TIMEOUT_SECS` (5)
//!    without its ack.
//! 4. The database: every event stored exactly once.
//!
//! Collector and broker RSS and CPU are printed after each phase.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_ticks, env_or, free_port, options, rss_kib, signed_batch, start_collector, tls};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::{Barrier, Notify};
use weilan_config::event::{Envelope, Event as WEvent, EventId, EventKey, Heartbeat};
use weilan_config::signing::Signer;

/// What one simulated agent measured.
#[derive(Default)]
struct Outcome {
    connect: Duration,
    acks: [Vec<Duration>; 2],
    lost: [usize; 2],
    duplicates: [u64; 2],
    resent: [usize; 2],
    reconnect: Option<Duration>,
}

fn heartbeat(agent: &str, seq: u64) -> Envelope {
    Envelope {
        schema: 1,
        event_id: EventId {
            agent_id: agent.into(),
            key: EventKey { epoch: 1, seq },
        },
        time: jiff::Timestamp::now(),
        host_role: "workstation".into(),
        site: None,
        prev_hash: String::new(),
        event: WEvent::AgentHeartbeat(Heartbeat {
            agent_version: "bench".into(),
            uptime_secs: seq,
            policy_version: Some("bench".into()),
            backlog: 0,
            dropped_total: 0,
        }),
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Publishes `batches` with a window of 8 and waits for their acks (60 s at most),
/// sending a batch again when its ack has not come within `ack_timeout` — as the
/// agent does (a broker that restarted drops what came before the collector was
/// back). Returns each batch's first publish → ack latency, how many never came,
/// events the collector called duplicates, and re-sends.
async fn burst(
    client: &AsyncClient,
    el: &mut rumqttc::EventLoop,
    topic: &str,
    batches: Vec<Vec<u8>>,
    first_id: u64,
    ack_timeout: Duration,
) -> (Vec<Duration>, usize, u64, usize) {
    let mut sent: HashMap<u64, (Instant, Instant)> = HashMap::new();
    let mut latencies = Vec::new();
    let mut duplicates = 0;
    let mut resent = 0;
    let total = batches.len();
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while latencies.len() < total && Instant::now() < deadline {
        for (id, (_, last)) in sent.iter_mut() {
            if last.elapsed() >= ack_timeout {
                let i = (*id - first_id) as usize;
                if client
                    .try_publish(topic, QoS::AtLeastOnce, false, batches[i].clone())
                    .is_ok()
                {
                    *last = Instant::now();
                    resent += 1;
                }
            }
        }
        while sent.len() < 8 && next < total {
            if client
                .try_publish(topic, QoS::AtLeastOnce, false, batches[next].clone())
                .is_err()
            {
                break;
            }
            sent.insert(first_id + next as u64, (Instant::now(), Instant::now()));
            next += 1;
        }
        match tokio::time::timeout(Duration::from_secs(1), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let Ok(signed) =
                    serde_json::from_slice::<weilan_config::wire::SignedMessage>(&p.payload)
                else {
                    continue;
                };
                let Ok(ack) = serde_json::from_str::<weilan_config::wire::Ack>(&signed.body) else {
                    continue;
                };
                if let Some((at, _)) = sent.remove(&ack.batch_id) {
                    latencies.push(at.elapsed());
                    duplicates += u64::from(ack.duplicates);
                }
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let lost = total - latencies.len();
    (latencies, lost, duplicates, resent)
}

/// Polls until connected, then subscribes to the acks; the time it took.
async fn connect(client: &AsyncClient, el: &mut rumqttc::EventLoop, acks: &str) -> Duration {
    let start = Instant::now();
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    client.subscribe(acks, QoS::AtLeastOnce).await.unwrap();
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    start.elapsed()
}

/// The `mosquitto` child of `parent`.
fn broker_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (name, rest) = stat.split_once(") ")?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && name.ends_with("(mosquitto")).then_some(pid)
    })
}

fn main() {
    weilan_config::tls::install_default_provider();
    let agents = env_or("AGENTS", 500);
    let per_burst = env_or("BURST", 4);
    let per_batch = env_or("EVENTS", 1);
    // What the agent waits for an ack before sending a batch again (its setting
    // `ack_timeout_secs`, default 30; the tests use 3).
    let ack_timeout = Duration::from_secs(env_or("ACK_TIMEOUT_SECS", 5) as u64);
    // Every agent holds a socket here and in the broker (children inherit the limit).
    let _ =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 65536, 65536);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let names: Vec<String> = (0..agents).map(|i| format!("fleet-{i:05}")).collect();
    let port = free_port();
    let t = Instant::now();
    let (pki, collector) = start_collector(root, port, &names);
    println!(
        "fleet: {agents} agents, certificates issued and enrolled in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let cpid = collector.0.id();
    let broker = broker_of(cpid).expect("the collector's mosquitto");
    let usage = |label: &str, cpu0: (u64, u64)| {
        let b = broker_of(cpid).unwrap_or(broker);
        println!(
            "  {label}: collector RSS {} MiB, CPU {:.2} s; broker RSS {} MiB, CPU {:.2} s",
            rss_kib(cpid) / 1024,
            (cpu_ticks(cpid) - cpu0.0) as f64 / 100.0,
            rss_kib(b) / 1024,
            cpu_ticks(b).saturating_sub(cpu0.1) as f64 / 100.0
        );
        (cpu_ticks(cpid), cpu_ticks(b))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let barrier = Arc::new(Barrier::new(agents + 1));
    let storm = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let start = Instant::now();
    for name in &names {
        let signer = Signer::from_pem_files(&pki.agent(name), &pki.agent_key(name)).unwrap();
        let mut opts = options(
            name,
            port,
            tls(&pki, &pki.agent(name), &pki.agent_key(name)),
        );
        opts.set_keep_alive(Duration::from_secs(20));
        let (name, barrier, storm) = (name.clone(), barrier.clone(), storm.clone());
        tasks.push(rt.spawn(async move {
            let mut prev = weilan_config::event::GENESIS_HASH.to_string();
            let mut seq = 0u64;
            let mut make = |n: usize, first_id: u64| -> Vec<Vec<u8>> {
                (0..n)
                    .map(|b| {
                        let events = (0..per_batch)
                            .map(|_| {
                                seq += 1;
                                heartbeat(&name, seq)
                            })
                            .collect();
                        signed_batch(&signer, &name, first_id + b as u64, events, &mut prev)
                    })
                    .collect()
            };
            let (topic, acks) = (
                format!("weilan/v1/agents/{name}/events"),
                format!("weilan/v1/agents/{name}/acks"),
            );
            let (client, mut el) = AsyncClient::new(opts, 64);
            let mut out = Outcome {
                connect: connect(&client, &mut el, &acks).await,
                ..Outcome::default()
            };
            barrier.wait().await; // everyone connected: the burst starts together
            let (l, lost, d, r) =
                burst(&client, &mut el, &topic, make(per_burst, 1), 1, ack_timeout).await;
            (out.acks[0], out.lost[0], out.duplicates[0], out.resent[0]) = (l, lost, d, r);
            barrier.wait().await;
            // The storm: the broker goes away; keep polling until it is back.
            let notified = storm.notified();
            notified.await;
            let t = Instant::now();
            out.reconnect = Some(connect(&client, &mut el, &acks).await.max(t.elapsed()));
            let second = make(per_burst, per_burst as u64 + 1);
            let (l, lost, d, r) = burst(
                &client,
                &mut el,
                &topic,
                second,
                per_burst as u64 + 1,
                ack_timeout,
            )
            .await;
            (out.acks[1], out.lost[1], out.duplicates[1], out.resent[1]) = (l, lost, d, r);
            out
        }));
    }
    let cpu0 = (cpu_ticks(cpid), cpu_ticks(broker));
    rt.block_on(barrier.wait());
    let connected = start.elapsed();
    let burst_start = Instant::now();
    rt.block_on(barrier.wait());
    let burst_took = burst_start.elapsed();
    let cpu1 = usage("after connect + burst", cpu0);
    // Kill the broker; the collector restarts it (BrokerNotice::Exited).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let storm_start = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    storm.notify_waiters();
    let outcomes: Vec<Outcome> = rt.block_on(async {
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await.unwrap());
        }
        v
    });
    let storm_took = storm_start.elapsed();
    let _ = usage("after the reconnect storm", cpu1);
    let mut connects: Vec<Duration> = outcomes.iter().map(|o| o.connect).collect();
    let mut reconnects: Vec<Duration> = outcomes.iter().filter_map(|o| o.reconnect).collect();
    println!(
        "  connect: all {agents} in {:.2} s; per agent p50 {} ms, p99 {} ms",
        connected.as_secs_f64(),
        percentile(&mut connects, 0.5).as_millis(),
        percentile(&mut connects, 0.99).as_millis()
    );
    for (i, label) in ["burst", "burst after the broker was killed"]
        .iter()
        .enumerate()
    {
        let mut lat: Vec<Duration> = outcomes.iter().flat_map(|o| o.acks[i].clone()).collect();
        let lost: usize = outcomes.iter().map(|o| o.lost[i]).sum();
        let dup: u64 = outcomes.iter().map(|o| o.duplicates[i]).sum();
        let resent: usize = outcomes.iter().map(|o| o.resent[i]).sum();
        let n = lat.len();
        println!(
            "  {label}: {n} of {} batches acknowledged, {lost} lost, {resent} sent again after {} s without ack, {dup} events already stored; publish→ack p50 {} ms, p99 {} ms",
            agents * per_burst,
            ack_timeout.as_secs(),
            percentile(&mut lat, 0.5).as_millis(),
            percentile(&mut lat, 0.99).as_millis()
        );
    }
    println!(
        "  first burst took {:.2} s; reconnect storm: all back p50 {} ms, p99 {} ms, everything acknowledged {:.2} s after the kill",
        burst_took.as_secs_f64(),
        percentile(&mut reconnects, 0.5).as_millis(),
        percentile(&mut reconnects, 0.99).as_millis(),
        storm_took.as_secs_f64()
    );
    let (stored, distinct): (i64, i64) = rusqlite::Connection::open(root.join("weilan.db"))
        .unwrap()
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events WHERE agent_id LIKE 'fleet-%'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let expected = (agents * per_burst * 2 * per_batch) as i64;
    for line in std::fs::read_to_string(root.join("alerts.jsonl"))
        .unwrap_or_default()
        .lines()
    {
        if !line.contains("agent-silent") {
            println!("  alert: {}", &line[..line.len().min(300)]);
        }
    }
    println!("  database: {stored} stored ({distinct} distinct) of {expected} sent");
    assert_eq!(
        (stored, distinct),
        (expected, expected),
        "0 lost, 0 duplicated"
    );
    drop(collector);
    peer_connect(&rt, root, &pki, &names);
}

/// Peer, same run: the same agents connecting at once to a bare Mosquitto (TLS,
/// client certificates, identity as user name; no ACL, no collector).
fn peer_connect(
    rt: &tokio::runtime::Runtime,
    root: &std::path::Path,
    pki: &weilan_collector::pki::PkiPaths,
    names: &[String],
) {
    let Some(mosq) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        println!("  peer skipped: mosquitto not installed");
        return;
    };
    let port = free_port();
    std::fs::write(
        root.join("peer.conf"),
        format!(
            "user root\npersistence false\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuse_identity_as_username true\nset_tcp_nodelay true\nmax_connections -1\n",
            pki.ca().display(),
            pki.server().display(),
            pki.server_key().display()
        ),
    )
    .unwrap();
    let m = common::Killed(
        std::process::Command::new(mosq)
            .arg("-c")
            .arg(root.join("peer.conf"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let mut times: Vec<Duration> = rt.block_on(async {
        let mut tasks = Vec::new();
        for name in names {
            let opts = options(name, port, tls(pki, &pki.agent(name), &pki.agent_key(name)));
            let acks = format!("weilan/v1/agents/{name}/acks");
            tasks.push(tokio::spawn(async move {
                let (client, mut el) = AsyncClient::new(opts, 64);
                let t = connect(&client, &mut el, &acks).await;
                // Keep the connection open until everyone is measured.
                tokio::spawn(async move {
                    let _client = client;
                    while el.poll().await.is_ok() {}
                });
                t
            }));
        }
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await.unwrap());
        }
        v
    });
    let all = start.elapsed();
    println!(
        "  peer, same run: bare Mosquitto (TLS, client certificates): all {} connected in {:.2} s; per agent p50 {} ms, p99 {} ms; broker RSS {} MiB",
        names.len(),
        all.as_secs_f64(),
        percentile(&mut times, 0.5).as_millis(),
        percentile(&mut times, 0.99).as_millis(),
        rss_kib(m.0.id()) / 1024
    );
}
