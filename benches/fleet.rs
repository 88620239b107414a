//! Fleet load generator (not a test): `AGENTS` simulated agents, each with its own
//! enrolled certificate, over mutual TLS against a real `weilan collector serve`
//! (its embedded, supervised Mosquitto with the shipped ACL; SQLite with
//! `synchronous = FULL`).
//!
//! `cargo bench --bench fleet`, environment (defaults in brackets):
//! `AGENTS` [5000], `RATE` events/s for the whole fleet [5000], `CLUSTER` events per
//! burst of one agent [5] (a copy of several files, a login with its privilege
//! change), `HEARTBEAT_SECS` [30, the agent's default], `STEADY_SECS` [300],
//! `AFTER_SECS` load kept up after the broker was killed [60], `ACK_TIMEOUT_SECS` [30],
//! `SPREAD_SECS` [10, the agent's `reconnect_spread_secs`], `LINGER_MS` [50, the agent's
//! `batch_linger_ms`], `KILL` [1; 0 keeps the broker running], `BROKER` [embedded;
//! `external`: a Mosquitto of its own with the shipped config/mosquitto/ files, the
//! collector in external mode]. Each simulated agent runs the
//! agent's own MQTT session (`weilan_config::mqtt::spawn`).
//!
//! 1. Connect: every agent connects at once (TLS with its client certificate) and
//!    subscribes to its acks and to the collectors' presence.
//! 2. Steady load: each agent makes clusters of `CLUSTER` events (`file.exported`)
//!    at random moments so that the fleet makes `RATE` events/s, plus a heartbeat
//!    every `HEARTBEAT_SECS`; like the agent it gathers what waits into batches
//!    every 50 ms (signed, hash-chained), keeps 8 in flight, and forgets an event only
//!    when the signed ack names it. Latency is event creation → ack received (the ack
//!    is sent after the commit, so this bounds capture → stored from above).
//! 3. Reconnect storm: the collector's Mosquitto is killed while the load goes on;
//!    the collector restarts it, every agent reconnects on its own, and re-sends what
//!    was not acknowledged when a collector announces itself (or after the ack
//!    timeout): time until all are back and until every backlog is drained.
//! 4. The database: every event generated stored exactly once.
//!
//! Collector and broker RSS and CPU are sampled every 10 s.

mod common;
#[path = "../tests/common/mosquitto.rs"]
mod mosquitto;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{
    cpu_ticks, env_or, envelope, exported, free_port, options, rss_kib, signed_batch,
    start_collector, tls,
};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::Barrier;
use weilan_config::event::{Envelope, Event as WEvent, Heartbeat};
use weilan_config::signing::Signer;

/// What one simulated agent measured.
#[derive(Default)]
struct Outcome {
    connect: Duration,
    /// Creation → ack, ms, for events made before / after the broker was killed.
    latency_ms: [Vec<u32>; 2],
    /// Events acknowledged more than 1 s after creation, by the 30-s window (since
    /// the start) they were created in: when the slow ones happened.
    slow_by_window: std::collections::BTreeMap<u64, u64>,
    generated: u64,
    acked: u64,
    duplicates: u64,
    resent_after_presence: u64,
    resent_after_timeout: u64,
    /// Signed acks received.
    acks: u64,
    /// Kill → connected again.
    reconnect: Option<Duration>,
    /// Kill → nothing made before the kill still unacknowledged.
    drained: Option<Duration>,
}

struct Plan {
    rate_per_agent: f64,
    cluster: usize,
    heartbeat: Duration,
    ack_timeout: Duration,
    generate_until: OnceLock<Instant>,
    killed_at: OnceLock<Instant>,
    stop: AtomicBool,
    /// The agents' `reconnect_spread_secs` (`SPREAD_SECS`).
    spread: Duration,
    /// The agents' `batch_linger_ms` (`LINGER_MS`).
    linger: Duration,
    /// When the run started (for `Outcome::slow_by_window`).
    started: Instant,
}

fn heartbeat(agent: &str, seq: u64) -> Envelope {
    envelope(
        agent,
        seq,
        WEvent::AgentHeartbeat(Heartbeat {
            agent_version: "bench".into(),
            uptime_secs: seq,
            policy_version: Some("bench".into()),
            backlog: 0,
            dropped_total: 0,
        }),
    )
}

/// A batch sent and not yet acknowledged.
struct Unacked {
    batch_id: u64,
    payload: Vec<u8>,
    created: Vec<Instant>,
    sent: Option<Instant>,
}

/// Notes a collector presence (as the agent does, without the signature check);
/// `None` if it is not one, else whether it announces a connection not seen before.
fn note_presence(
    topic: &str,
    payload: &[u8],
    presences: &mut HashMap<String, u64>,
) -> Option<bool> {
    let collector = weilan_config::topics::parse_presence_topic(topic)?;
    let signed: weilan_config::wire::SignedMessage = serde_json::from_slice(payload).ok()?;
    let presence: weilan_config::wire::Presence = serde_json::from_str(&signed.body).ok()?;
    let c = match presence.state {
        weilan_config::wire::AgentState::Online => presence.connection.max(1),
        weilan_config::wire::AgentState::Offline => 0,
    };
    Some(presences.insert(collector.to_string(), c) != Some(c) && c != 0)
}

/// One simulated agent: the agent's own MQTT session (`weilan_config::mqtt::spawn`:
/// its subscriptions, last will, reconnect spread and backoff, connect timeout,
/// TCP_NODELAY), and the uplink's rules (`agent/src/uplink.rs`): a window of 8,
/// batches held while no collector is online, everything unacknowledged sent again
/// on reconnect, on a new collector connection, or after the ack timeout.
async fn agent(
    name: String,
    signer: Signer,
    tls: Arc<rustls::ClientConfig>,
    port: u16,
    plan: Arc<Plan>,
    start: Arc<Barrier>,
) -> Outcome {
    use weilan_config::mqtt::{SessionConfig, SessionEvent};
    use weilan_config::topics::{self, Channel};
    let events_topic = topics::agent_topic(&name, Channel::Events);
    let status = |state| {
        serde_json::to_vec(&weilan_config::wire::Status {
            agent_id: name.clone(),
            state,
            agent_version: "bench".into(),
        })
        .unwrap()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let (client, mut rx, session) = weilan_config::mqtt::spawn(
        SessionConfig {
            client_id: name.clone(),
            host: "127.0.0.1".into(),
            port,
            tls,
            keep_alive: Duration::from_secs(20),
            last_will: Some(rumqttc::LastWill::new(
                topics::agent_topic(&name, Channel::Status),
                status(weilan_config::wire::AgentState::Offline),
                QoS::AtLeastOnce,
                true,
            )),
            max_packet: weilan_config::wire::DEFAULT_MAX_PAYLOAD,
            request_capacity: 64,
            max_inflight: 100,
            incoming_capacity: 256,
            subscriptions: vec![
                topics::agent_topic(&name, Channel::Acks),
                topics::agent_topic(&name, Channel::Commands),
                topics::POLICY.to_string(),
                topics::PRESENCE_FILTER.to_string(),
            ],
            reconnect_spread: plan.spread,
        },
        stop.clone(),
    );
    let mut out = Outcome::default();
    let t = Instant::now();
    let mut presences: HashMap<String, u64> = HashMap::new();
    while let Some(ev) = rx.recv().await {
        if matches!(ev, SessionEvent::Connected) {
            break;
        }
    }
    out.connect = t.elapsed();
    let _ = client.try_publish(
        topics::agent_topic(&name, Channel::Status),
        QoS::AtLeastOnce,
        true,
        status(weilan_config::wire::AgentState::Online),
    );
    // Wait for the others (the retained presence arrives meanwhile).
    let wait = start.wait();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            _ = &mut wait => break,
            Some(ev) = rx.recv() => if let SessionEvent::Message { topic, payload } = ev {
                let _ = note_presence(&topic, &payload, &mut presences);
            }
        }
    }
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_rng(&mut rand::rng());
    let mut prev = weilan_config::event::GENESIS_HASH.to_string();
    let mut seq = 0u64;
    let mut batch_id = 0u64;
    let mut pending: VecDeque<(Envelope, Instant)> = VecDeque::new();
    let mut unacked: VecDeque<Unacked> = VecDeque::new();
    // Batches of `unacked` sent on this connection (the front ones).
    let mut in_flight = 0usize;
    let cluster_every = Duration::from_secs_f64(plan.cluster as f64 / plan.rate_per_agent);
    let now = Instant::now();
    let mut next_cluster = now + cluster_every.mul_f64(rand::Rng::random::<f64>(&mut rng));
    let mut next_heartbeat = now + plan.heartbeat.mul_f64(rand::Rng::random::<f64>(&mut rng));
    let mut connected = true;
    let mut connected_at = Instant::now();
    let mut linger = tokio::time::interval(plan.linger);
    loop {
        let now = Instant::now();
        let generating = plan.generate_until.get().is_none_or(|&end| now < end);
        if generating {
            while next_cluster <= now {
                for _ in 0..plan.cluster {
                    seq += 1;
                    pending.push_back((exported(&name, seq, vec![]), next_cluster));
                }
                // Exponential gaps: bursts arrive at random, `rate` on average.
                let u: f64 = rand::Rng::random_range(&mut rng, 1e-9..1.0);
                next_cluster += cluster_every.mul_f64(-u.ln());
            }
            while next_heartbeat <= now {
                seq += 1;
                pending.push_back((heartbeat(&name, seq), next_heartbeat));
                next_heartbeat += plan.heartbeat;
            }
        } else if pending.is_empty() && unacked.is_empty() {
            break;
        }
        if plan.stop.load(Ordering::Relaxed) {
            break;
        }
        while !pending.is_empty() {
            let take: Vec<(Envelope, Instant)> = pending.drain(..pending.len().min(100)).collect();
            out.generated += take.len() as u64;
            batch_id += 1;
            let created = take.iter().map(|(_, c)| *c).collect();
            let payload = signed_batch(
                &signer,
                &name,
                batch_id,
                take.into_iter().map(|(e, _)| e).collect(),
                &mut prev,
            );
            unacked.push_back(Unacked {
                batch_id,
                payload,
                created,
                sent: None,
            });
        }
        if let (Some(k), None) = (plan.killed_at.get(), out.drained) {
            let before_kill = |c: &Instant| c < k;
            if !unacked.iter().any(|u| u.created.iter().any(before_kill))
                && !pending.iter().any(|(_, c)| before_kill(c))
            {
                out.drained = Some(k.elapsed());
            }
        }
        let may_send = connected
            && (presences.values().any(|&c| c != 0)
                || (presences.is_empty() && connected_at.elapsed() >= Duration::from_secs(3)));
        if may_send {
            if unacked
                .front()
                .and_then(|u| u.sent)
                .is_some_and(|s| in_flight > 0 && s.elapsed() >= plan.ack_timeout)
            {
                out.resent_after_timeout += in_flight as u64;
                in_flight = 0;
            }
            while in_flight < 8 && in_flight < unacked.len() {
                let u = &mut unacked[in_flight];
                if client
                    .try_publish(&events_topic, QoS::AtLeastOnce, false, u.payload.clone())
                    .is_err()
                {
                    break;
                }
                u.sent = Some(Instant::now());
                in_flight += 1;
            }
        }
        tokio::select! {
            _ = linger.tick() => {}
            ev = rx.recv() => match ev {
                Some(SessionEvent::Connected) => {
                    connected = true;
                    connected_at = Instant::now();
                    presences.retain(|_, c| *c != 0);
                    in_flight = 0;
                    let _ = client.try_publish(
                        topics::agent_topic(&name, Channel::Status),
                        QoS::AtLeastOnce,
                        true,
                        status(weilan_config::wire::AgentState::Online),
                    );
                    if let (Some(k), None) = (plan.killed_at.get(), out.reconnect) {
                        out.reconnect = Some(k.elapsed());
                    }
                }
                Some(SessionEvent::Disconnected(_)) => {
                    connected = false;
                    in_flight = 0;
                }
                Some(SessionEvent::Message { topic, payload }) => {
                    if let Some(new_connection) = note_presence(&topic, &payload, &mut presences) {
                        if new_connection && in_flight > 0 {
                            out.resent_after_presence += in_flight as u64;
                            in_flight = 0;
                        }
                        continue;
                    }
                    let Ok(signed) = serde_json::from_slice::<weilan_config::wire::SignedMessage>(&payload) else { continue };
                    let Ok(ack) = serde_json::from_str::<weilan_config::wire::Ack>(&signed.body) else { continue };
                    if let Some(i) = unacked.iter().position(|u| u.batch_id == ack.batch_id) {
                        let u = unacked.remove(i).expect("found");
                        out.acks += 1;
                        if i < in_flight {
                            in_flight -= 1;
                        }
                        let now = Instant::now();
                        let killed = plan.killed_at.get();
                        for c in u.created {
                            let phase = usize::from(killed.is_some_and(|k| c >= *k));
                            let ms = now.duration_since(c).as_millis() as u32;
                            out.latency_ms[phase].push(ms);
                            if ms > 1000 {
                                let window = c.saturating_duration_since(plan.started).as_secs() / 30 * 30;
                                *out.slow_by_window.entry(window).or_default() += 1;
                            }
                        }
                        out.acked += u64::from(ack.stored) + u64::from(ack.duplicates);
                        out.duplicates += u64::from(ack.duplicates);
                    }
                }
                None => break,
            }
        }
    }
    stop.cancel();
    let _ = session.await;
    out
}

fn percentile_ms(v: &mut [u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
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
    let agents = env_or("AGENTS", 5000);
    let rate = env_or("RATE", 5000);
    let steady = Duration::from_secs(env_or("STEADY_SECS", 300) as u64);
    let after = Duration::from_secs(env_or("AFTER_SECS", 60) as u64);
    let plan = Arc::new(Plan {
        rate_per_agent: rate as f64 / agents as f64,
        cluster: env_or("CLUSTER", 5).max(1),
        heartbeat: Duration::from_secs(env_or("HEARTBEAT_SECS", 30) as u64),
        ack_timeout: Duration::from_secs(env_or("ACK_TIMEOUT_SECS", 30) as u64),
        generate_until: OnceLock::new(),
        killed_at: OnceLock::new(),
        stop: AtomicBool::new(false),
        spread: Duration::from_secs(env_or("SPREAD_SECS", 10) as u64),
        linger: Duration::from_millis(env_or("LINGER_MS", 50) as u64),
        started: Instant::now(),
    });
    // Every agent holds a socket here and in the broker (children inherit the limit).
    let _ =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 65536, 65536);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let names: Vec<String> = (0..agents).map(|i| format!("fleet-{i:05}")).collect();
    let port = free_port();
    let t = Instant::now();
    // `BROKER=external`: the shipped config/mosquitto/ files in a Mosquitto of its own
    // (restarted by the bench after the kill, as systemd would), the collector in
    // external mode; otherwise the collector's embedded, supervised Mosquitto.
    let external = std::env::var("BROKER").is_ok_and(|b| b == "external");
    let (pki, collector) = if external {
        common::start_collector_with(
            root,
            &names,
            &format!("[broker]\nmode = \"external\"\nhost = \"127.0.0.1\"\nport = {port}\n"),
        )
    } else {
        start_collector(root, port, &names)
    };
    let external_conf =
        external.then(|| mosquitto::shipped_conf(root, &pki, port, &mosquitto::shipped_acl()));
    let start_external = |conf: &std::path::Path| {
        common::Killed(
            std::process::Command::new("mosquitto")
                .arg("-c")
                .arg(conf)
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("mosquitto"),
        )
    };
    let mut external_broker = external_conf.as_deref().map(start_external);
    println!(
        "fleet: {agents} agents, {rate} events/s in clusters of {}, heartbeat every {} s, broker {}; certificates issued and enrolled in {:.1} s",
        plan.cluster,
        plan.heartbeat.as_secs(),
        if external { "external Mosquitto with the shipped config/mosquitto/ files" } else { "embedded (the collector's Mosquitto)" },
        t.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let cpid = collector.0.id();
    let broker_pid = |external_broker: &Option<common::Killed>| match external_broker {
        Some(b) => Some(b.0.id()),
        None => broker_of(cpid),
    };
    let broker = broker_pid(&external_broker).expect("the broker");
    let current_broker = std::sync::atomic::AtomicU32::new(broker);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Arc::new(Barrier::new(agents + 1));
    let mut tasks = Vec::new();
    let connect_start = Instant::now();
    for name in &names {
        let signer = Signer::from_pem_files(&pki.agent(name), &pki.agent_key(name)).unwrap();
        tasks.push(rt.spawn(agent(
            name.clone(),
            signer,
            tls(&pki, &pki.agent(name), &pki.agent_key(name)),
            port,
            plan.clone(),
            start.clone(),
        )));
    }
    rt.block_on(start.wait());
    let connected = connect_start.elapsed();
    println!(
        "  connect: all {agents} in {:.2} s",
        connected.as_secs_f64()
    );
    // Steady load; usage sampled every 10 s.
    let sample = |label: &str, since: Instant, cpu0: (u64, u64)| -> (u64, u64) {
        let b = if external {
            current_broker.load(Ordering::Relaxed)
        } else {
            broker_of(cpid).unwrap_or(broker)
        };
        let secs = since.elapsed().as_secs_f64();
        let (c, bc) = (cpu_ticks(cpid), cpu_ticks(b));
        println!(
            "  {label:>6} t={secs:>5.0} s: collector RSS {:>4} MiB, CPU {:>3.0} %; broker RSS {:>4} MiB, CPU {:>3.0} %",
            rss_kib(cpid) / 1024,
            c.saturating_sub(cpu0.0) as f64 / 10.0,
            rss_kib(b) / 1024,
            bc.saturating_sub(cpu0.1) as f64 / 10.0,
        );
        (c, bc)
    };
    let load_start = Instant::now();
    let mut cpu = (cpu_ticks(cpid), cpu_ticks(broker));
    while load_start.elapsed() < steady {
        std::thread::sleep(
            Duration::from_secs(10).min(steady.saturating_sub(load_start.elapsed())),
        );
        cpu = sample("steady", load_start, cpu);
    }
    // Kill the broker; the collector restarts it (BrokerNotice::Exited).
    let kill = env_or("KILL", 1) == 1;
    let killed = Instant::now();
    if kill {
        let _ = plan.killed_at.set(killed);
        let _ = plan.generate_until.set(killed + after);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(broker as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        if let Some(conf) = &external_conf {
            drop(external_broker.take());
            std::thread::sleep(Duration::from_secs(1));
            external_broker = Some(start_external(conf));
            current_broker.store(broker_pid(&external_broker).unwrap_or(0), Ordering::Relaxed);
        }
    } else {
        let _ = plan.generate_until.set(killed);
    }
    let finished = rt.spawn(async move {
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await.unwrap());
        }
        v
    });
    while !finished.is_finished() && killed.elapsed() < after + Duration::from_secs(120) {
        std::thread::sleep(Duration::from_secs(10));
        cpu = sample(if kill { "storm" } else { "drain" }, load_start, cpu);
    }
    plan.stop.store(true, Ordering::Relaxed);
    let outcomes: Vec<Outcome> = rt.block_on(finished).unwrap();
    let mut connects: Vec<Duration> = outcomes.iter().map(|o| o.connect).collect();
    println!(
        "  connect: per agent p50 {} ms, p99 {} ms",
        percentile(&mut connects, 0.5).as_millis(),
        percentile(&mut connects, 0.99).as_millis()
    );
    let generated: u64 = outcomes.iter().map(|o| o.generated).sum();
    let acked: u64 = outcomes.iter().map(|o| o.acked).sum();
    let duplicates: u64 = outcomes.iter().map(|o| o.duplicates).sum();
    let by_presence: u64 = outcomes.iter().map(|o| o.resent_after_presence).sum();
    let by_timeout: u64 = outcomes.iter().map(|o| o.resent_after_timeout).sum();
    for (i, label) in ["steady load", "after the broker was killed"]
        .iter()
        .enumerate()
    {
        let mut lat: Vec<u32> = outcomes
            .iter()
            .flat_map(|o| o.latency_ms[i].iter().copied())
            .collect();
        println!(
            "  {label}: {} events acknowledged; creation → ack p50 {} ms, p99 {} ms, max {} ms",
            lat.len(),
            percentile_ms(&mut lat, 0.5),
            percentile_ms(&mut lat, 0.99),
            lat.iter().max().copied().unwrap_or(0)
        );
    }
    let mut slow: std::collections::BTreeMap<u64, u64> = Default::default();
    for o in &outcomes {
        for (w, n) in &o.slow_by_window {
            *slow.entry(*w).or_default() += n;
        }
    }
    println!(
        "  acked more than 1 s after creation, by 30-s window of creation (s since start: events): {}",
        if slow.is_empty() {
            "none".to_string()
        } else {
            slow.iter().map(|(w, n)| format!("{w}: {n}")).collect::<Vec<_>>().join(", ")
        }
    );
    let steady_events: usize = outcomes.iter().map(|o| o.latency_ms[0].len()).sum();
    let mut acks: Vec<u64> = outcomes.iter().map(|o| o.acks).collect();
    acks.sort_unstable();
    println!(
        "  signed acks received per agent: min {}, median {}, total {}",
        acks[0],
        acks[acks.len() / 2],
        acks.iter().sum::<u64>()
    );
    println!(
        "  steady rate: {:.0} events/s over {} s",
        steady_events as f64 / steady.as_secs_f64(),
        steady.as_secs()
    );
    let mut reconnects: Vec<Duration> = outcomes.iter().filter_map(|o| o.reconnect).collect();
    let mut drained: Vec<Duration> = outcomes.iter().filter_map(|o| o.drained).collect();
    println!(
        "  reconnect storm: {} of {agents} back, p50 {} ms, p99 {} ms, last {} ms; backlog drained p99 {} ms, last {} ms ({} agents); batches re-sent on the collector's presence {by_presence}, after the ack timeout {by_timeout}",
        reconnects.len(),
        percentile(&mut reconnects, 0.5).as_millis(),
        percentile(&mut reconnects, 0.99).as_millis(),
        reconnects.iter().max().copied().unwrap_or_default().as_millis(),
        percentile(&mut drained, 0.99).as_millis(),
        drained.iter().max().copied().unwrap_or_default().as_millis(),
        drained.len()
    );
    let (stored, distinct): (i64, i64) = rusqlite::Connection::open(root.join("weilan.db"))
        .unwrap()
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events WHERE agent_id LIKE 'fleet-%'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    println!(
        "  database: {stored} stored ({distinct} distinct) of {generated} generated; {acked} acknowledged, {duplicates} of them re-sends the collector already held"
    );
    let mut alerts: HashMap<String, usize> = HashMap::new();
    for line in std::fs::read_to_string(root.join("alerts.jsonl"))
        .unwrap_or_default()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        *alerts
            .entry(v["rule_id"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    println!("  alerts by rule: {alerts:?}");
    assert_eq!(
        (stored, distinct),
        (generated as i64, generated as i64),
        "0 lost, 0 stored twice"
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
