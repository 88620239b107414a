//! Spine benchmark (not a test): collector ingest rate and agent idle footprint.
//!
//! `cargo bench --bench spine` (environment: `AGENTS`, `BATCHES`, `EVENTS`, `IDLE_SECS`).
//!
//! 1. Ingest: `AGENTS` simulated agents (real certificates, signed batches of `EVENTS`
//!    `usb.attached` events, up to 8 batches in flight each) publish through the
//!    embedded broker (TLS, client certificates) into a real `weilan collector serve`
//!    (SQLite, `synchronous = FULL`). Rate = events acknowledged / seconds from first
//!    publish to last ack — i.e. durably stored, not merely accepted by a broker.
//! 2. Peer, side by side in the same run: the same signed batches relayed by Mosquitto
//!    (TLS, client certificates) to one subscriber, no storage — the broker-only
//!    ceiling. Reported as a ratio.
//! 3. Agent idle: a real `weilan agent run` watching this host (real /sys, netlink,
//!    mountinfo) after 5 s of warm-up: RSS and CPU over `IDLE_SECS` seconds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    cpu_ticks, env_or, free_port, options, rss_kib, signed_batch, start_collector, tls, Killed,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use weilan_config::event::{Envelope, Event as WEvent, UsbDevice, UsbInterface};
use weilan_config::signing::Signer;

fn event(agent: &str, seq: u64) -> Envelope {
    common::envelope(
        agent,
        seq,
        WEvent::UsbAttached(UsbDevice {
            port_path: "1-2".into(),
            busnum: 1,
            devnum: (seq % 120) as u16,
            vid: "0951".into(),
            pid: "1666".into(),
            bcd_device: "0100".into(),
            serial: Some(format!("BENCH{seq:012}")),
            manufacturer: Some("Kingston".into()),
            product: Some("DataTraveler 3.0".into()),
            device_class: 0,
            interfaces: vec![UsbInterface {
                number: 0,
                class: 8,
                subclass: 6,
                protocol: 80,
            }],
            speed: Some("480".into()),
            authorized: Some(true),
            hash: "a".repeat(64),
            parent_hash: Some("b".repeat(64)),
            block_devices: vec![],
            present_at_start: false,
        }),
    )
}

/// Signed batch payloads for one agent: a hash-chained journal's worth of records.
fn payloads(signer: &Signer, agent: &str, batches: usize, per: usize) -> Vec<Vec<u8>> {
    let mut prev = weilan_config::event::GENESIS_HASH.to_string();
    (0..batches)
        .map(|b| {
            let events = (0..per)
                .map(|i| event(agent, (b * per + i + 1) as u64))
                .collect();
            signed_batch(signer, agent, b as u64 + 1, events, &mut prev)
        })
        .collect()
}

/// Publishes all batches of one agent with a window of 8 and waits for `done(n)`.
async fn publish_all(
    opts: MqttOptions,
    topic: String,
    batches: Vec<Vec<u8>>,
    ack_topic: Option<String>,
) -> Duration {
    let (client, mut el) = AsyncClient::new(opts, 64);
    loop {
        if let Ok(Event::Incoming(Packet::ConnAck(_))) = el.poll().await {
            break;
        }
    }
    if let Some(t) = &ack_topic {
        client.subscribe(t, QoS::AtLeastOnce).await.unwrap();
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = el.poll().await {
                break;
            }
        }
    }
    let total = batches.len();
    let start = Instant::now();
    let mut next = 0;
    let mut done = 0;
    let mut in_flight = 0;
    while done < total {
        while in_flight < 8 && next < total {
            client
                .try_publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    batches[next].clone(),
                )
                .unwrap();
            next += 1;
            in_flight += 1;
        }
        match el.poll().await {
            // With an ack topic, completion is the collector's ack; without, the broker's.
            Ok(Event::Incoming(Packet::Publish(_))) if ack_topic.is_some() => {
                done += 1;
                in_flight -= 1;
            }
            Ok(Event::Incoming(Packet::PubAck(_))) if ack_topic.is_none() => {
                done += 1;
                in_flight -= 1;
            }
            Ok(_) => {}
            Err(e) => panic!("publisher: {e}"),
        }
    }
    start.elapsed()
}

fn main() {
    weilan_config::tls::install_default_provider();
    let agents = env_or("AGENTS", 8);
    let batches = env_or("BATCHES", 50);
    let per = env_or("EVENTS", 100);
    let idle_secs = env_or("IDLE_SECS", 30) as u64;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let names: Vec<String> = (0..agents).map(|i| format!("bench-{i:03}")).collect();
    let port = free_port();
    let (pki_paths, collector) = start_collector(root, port, &names);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_weilan"));
    let signers: Vec<Signer> = names
        .iter()
        .map(|n| Signer::from_pem_files(&pki_paths.agent(n), &pki_paths.agent_key(n)).unwrap())
        .collect();
    let work: Vec<Vec<Vec<u8>>> = names
        .iter()
        .zip(&signers)
        .map(|(n, s)| payloads(s, n, batches, per))
        .collect();
    let bytes: usize = work.iter().flatten().map(Vec::len).sum();
    let total_events = agents * batches * per;
    let rt = tokio::runtime::Runtime::new().unwrap();

    let run = |port: u16, acks: bool, work: &Vec<Vec<Vec<u8>>>| {
        rt.block_on(async {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for (n, w) in names.iter().zip(work.clone()) {
                let t = tls(&pki_paths, &pki_paths.agent(n), &pki_paths.agent_key(n));
                let ack = acks.then(|| format!("weilan/v1/agents/{n}/acks"));
                tasks.push(tokio::spawn(publish_all(
                    options(n, port, t),
                    format!("weilan/v1/agents/{n}/events"),
                    w,
                    ack,
                )));
            }
            for t in tasks {
                t.await.unwrap();
            }
            start.elapsed()
        })
    };
    let collector_cpu0 = cpu_ticks(collector.0.id());
    let ours = run(port, true, &work);
    let collector_cpu = cpu_ticks(collector.0.id()) - collector_cpu0;
    let stored: i64 = rusqlite::Connection::open(root.join("weilan.db"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        stored as usize, total_events,
        "every event stored exactly once"
    );
    let ours_rate = total_events as f64 / ours.as_secs_f64();
    println!("ingest: {agents} agents x {batches} batches x {per} events = {total_events} events ({:.1} MiB signed JSON)", bytes as f64 / 1048576.0);
    println!(
        "  weilan (embedded broker -> SQLite FULL sync -> signed ack): {:.2} s, {:.0} events/s, collector CPU {:.2} s, collector RSS {} MiB",
        ours.as_secs_f64(),
        ours_rate,
        collector_cpu as f64 / 100.0,
        rss_kib(collector.0.id()) / 1024
    );

    // Peer: Mosquitto relaying the same payloads to one subscriber, no storage.
    if let Some(mosq) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .find(|p| Path::new(p).exists())
    {
        let mport = free_port();
        std::fs::write(
            root.join("mosquitto.conf"),
            format!(
                "user root\npersistence false\nlistener {mport} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
                 use_identity_as_username true\nset_tcp_nodelay true\nmax_queued_messages 0\nmax_inflight_messages 100\n",
                pki_paths.ca().display(),
                pki_paths.server().display(),
                pki_paths.server_key().display()
            ),
        )
        .unwrap();
        let m = Killed(
            Command::new(mosq)
                .arg("-c")
                .arg(root.join("mosquitto.conf"))
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(500));
        let sub_tls = tls(
            &pki_paths,
            &pki_paths.collector(),
            &pki_paths.collector_key(),
        );
        let expected = agents * batches;
        let sub = rt.spawn(async move {
            let (c, mut el) = AsyncClient::new(options("bench-sub", mport, sub_tls), 64);
            c.subscribe("weilan/v1/agents/+/events", QoS::AtLeastOnce)
                .await
                .unwrap();
            let mut got = 0;
            let mut ready = false;
            while got < expected {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => ready = true,
                    Ok(Event::Incoming(Packet::Publish(_))) => got += 1,
                    Ok(_) => {}
                    Err(e) => panic!("subscriber: {e}"),
                }
                let _ = ready;
            }
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(500));
        let mcpu0 = cpu_ticks(m.0.id());
        let start = Instant::now();
        let _ = run(mport, false, &work);
        let end = rt.block_on(sub).unwrap();
        let peer = end - start;
        let peer_rate = total_events as f64 / peer.as_secs_f64();
        println!(
            "  mosquitto relay to 1 subscriber, no storage (peer, same payloads): {:.2} s, {:.0} events/s, broker CPU {:.2} s",
            peer.as_secs_f64(),
            peer_rate,
            (cpu_ticks(m.0.id()) - mcpu0) as f64 / 100.0
        );
        println!(
            "  ratio weilan/mosquitto-relay: {:.2}",
            ours_rate / peer_rate
        );
    } else {
        println!("  peer skipped: mosquitto not installed");
    }
    drop(collector);

    // Agent idle footprint on this host.
    let state = root.join("agent-state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        root.join("agent.toml"),
        format!(
            "[agent]\nstate_dir = \"agent-state\"\npolicy = \"policy.toml\"\n[collector]\nhost = \"127.0.0.1\"\nport = {port}\nca = \"pki/ca.pem\"\n\
             [tls]\ncert = \"pki/agents/{n}.pem\"\nkey = \"pki/agents/{n}-key.pem\"\n[log]\nlevel = \"warn\"\n",
            n = names[0]
        ),
    )
    .unwrap();
    let port2 = port;
    let collector = Killed(
        Command::new(&bin)
            .args(["collector", "serve", "--config"])
            .arg(root.join("collector.toml"))
            .env("RUST_LOG", "off")
            .spawn()
            .unwrap(),
    );
    let _ = port2;
    std::thread::sleep(Duration::from_millis(500));
    let agent = Killed(
        Command::new(&bin)
            .args(["agent", "run", "--config"])
            .arg(root.join("agent.toml"))
            .env("RUST_LOG", "off")
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(5));
    let pid = agent.0.id();
    let cpu0 = cpu_ticks(pid);
    let mut peak = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(idle_secs) {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu = cpu_ticks(pid) - cpu0;
    println!(
        "agent idle ({idle_secs} s, connected, heartbeats every 30 s): RSS {:.1} MiB (peak), CPU {} ticks = {:.3} % of one core",
        peak as f64 / 1024.0,
        cpu,
        cpu as f64 / (idle_secs as f64 * 100.0) * 100.0
    );
    drop(agent);
    drop(collector);
}
