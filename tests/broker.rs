//! The embedded broker against a hostile certificate holder: a workstation user with
//! their own valid agent certificate (the insider Weilan watches) tries to read, write
//! and take over other agents' topics, floods the broker and the collector, and holds
//! silent connections open. Another agent must notice nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use weilan_agent::source::usb::sysfs::fake::{add_stick, FakeStick};

const T: Duration = Duration::from_secs(30);
const HOSTILE: &str = "ws-hostile";

/// Plugs a fake stick on the agent's machine, announces it as the kernel does, and
/// returns how long its event took from capture to stored.
fn plug_and_time(
    w: &World,
    ns: &Netns,
    port: &str,
    serial: &str,
    diag: &dyn Fn() -> String,
) -> Duration {
    let devpath = add_stick(
        &w.sysfs(),
        &FakeStick {
            port,
            vid: "0951",
            pid: "1666",
            serial,
            classes: &[0x08],
            disk: None,
        },
    );
    ns.send_uevent("add", &devpath, "usb", "usb_device");
    wait_for(
        &format!("{serial} stored"),
        T,
        || (w.attached_count(serial) > 0).then_some(()),
        diag,
    );
    // From the agent's capture (after the storage settle time) to the collector's
    // commit, on the one clock of this machine.
    let db = w.db();
    let ms: f64 = db
        .query_row(
            &for_engine(
                db.engine(),
                db.pick(
                    "SELECT (julianday(received_at) - julianday(agent_time)) * 86400000.0 FROM events \
                     WHERE kind = 'usb.attached' AND json_extract(envelope, '$.event.data.serial') = ?1",
                    "SELECT CAST(EXTRACT(EPOCH FROM (CAST(received_at AS timestamptz) - CAST(agent_time AS timestamptz))) * 1000 AS FLOAT8) \
                     FROM events WHERE kind = 'usb.attached' AND json_extract(envelope, '$.event.data.serial') = ?1",
                ),
            ),
            params![serial],
            |r| r.get(0),
        )
        .unwrap();
    Duration::from_micros((ms.max(0.0) * 1000.0) as u64)
}

fn hostile_tls(w: &World) -> std::sync::Arc<rustls::ClientConfig> {
    test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.agent(HOSTILE), &w.pki.agent_key(HOSTILE))),
    )
}

struct Setup {
    w: World,
    ns: Netns,
    collector: Proc,
    agent: Proc,
}

impl Setup {
    fn new() -> Setup {
        let w = World::new();
        w.write_policy(&[]);
        weilan_collector::pki::issue_agent(&w.pki, HOSTILE).unwrap();
        let ns = Netns::create();
        let collector = w.start_collector(&ns, &w.collector_toml(false, ""));
        let agent = w.start_agent(&ns, &w.agent_toml(AGENT, "pki/ca.pem", ""), AGENT);
        let s = Setup {
            w,
            ns,
            collector,
            agent,
        };
        wait_for(
            "agent.started stored",
            T,
            || {
                (s.w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.started'") == 1)
                    .then_some(())
            },
            || s.diag(),
        );
        s
    }

    fn diag(&self) -> String {
        format!(
            "--- collector\n{}\n--- agent\n{}",
            self.collector.log_text(),
            self.agent.log_text()
        )
    }
}

/// Topic ACLs and the identity-bound client id, as Mosquitto enforces them in the
/// embedded broker: the hostile certificate subscribes to every filter that could
/// carry the agent's traffic while the agent's events are stored and acknowledged,
/// publishes on the agent's topic, and connects with the agent's and the collector's
/// client ids.
#[test]
fn agents_cannot_read_write_or_take_over_each_others_topics() {
    if !netns_available() {
        return;
    }
    let s = Setup::new();
    // The agent's traffic during the probe: a stick, its event, its ack.
    let probe = {
        let tls = hostile_tls(&s.w);
        let ns = &s.ns;
        std::thread::scope(|scope| {
            let handle = scope
                .spawn(|| probe_as_other_agent(ns, tls, AGENT, HOSTILE, Duration::from_secs(8)));
            std::thread::sleep(Duration::from_secs(3));
            plug_and_time(&s.w, ns, "1-4", "DURING-PROBE", &|| s.diag());
            handle.join().unwrap()
        })
    };
    let collector_connections = s.collector.log_text().matches("MQTT connected").count();
    println!(
        "MEASURED embedded broker: the hostile certificate received {} messages on topics {:?} while {AGENT}'s event was stored and acknowledged",
        probe.len(),
        probe.iter().map(|(t, _)| t.as_str()).collect::<std::collections::BTreeSet<_>>()
    );
    let foreign: Vec<_> = probe
        .iter()
        .filter(|(t, _)| t.starts_with("weilan/v1/agents/"))
        .collect();
    assert!(
        foreign.is_empty(),
        "read another agent's traffic: {foreign:?}\n{}",
        s.diag()
    );
    assert!(
        probe.iter().any(|(t, _)| t == "weilan/v1/policy"),
        "an agent must read the policy: {probe:?}"
    );
    // It reads the collector's presence, and its forged one was refused.
    let presence: Vec<_> = probe
        .iter()
        .filter(|(t, _)| t.starts_with("weilan/v1/collectors/"))
        .collect();
    assert!(
        !presence.is_empty() && presence.iter().all(|(_, p)| p.as_slice() != b"FORGED"),
        "presence seen by an agent: {presence:?}"
    );
    // Its publishes on the agent's topic never reached the collector.
    assert_eq!(
        s.w.count("SELECT COUNT(*) FROM quarantine"),
        0,
        "{}",
        s.diag()
    );
    // Neither the agent's nor the collector's session was taken over: one connection
    // each since the start.
    assert_eq!(
        collector_connections,
        1,
        "the collector reconnected\n{}",
        s.diag()
    );
    assert_eq!(
        s.agent.log_text().matches("MQTT connected").count(),
        1,
        "the agent was disconnected\n{}",
        s.diag()
    );
}

/// Oversized messages (a 10 MiB publish, a 2 MiB retained status) are refused by the
/// broker and raised as alerts naming the sender; a 200 000-event batch and a flood of
/// garbage are refused and counted by the collector. Meanwhile the other agent's
/// events keep being stored, and its quarantined evidence is not erased.
#[test]
fn a_hostile_agent_cannot_delay_or_erase_another_agents_evidence() {
    if !netns_available() {
        return;
    }
    let s = Setup::new();
    let (w, ns) = (&s.w, &s.ns);
    // The agent's own quarantined evidence, from before the flood.
    let agent_tls = test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.agent(AGENT), &w.pki.agent_key(AGENT))),
    );
    publish_all(
        ns,
        AGENT,
        agent_tls,
        vec![(
            format!("weilan/v1/agents/{AGENT}/events"),
            b"{evidence".to_vec(),
        )],
    );
    wait_for(
        "the agent's quarantined payload",
        T,
        || {
            (w.count(&format!(
                "SELECT COUNT(*) FROM quarantine WHERE source = '{AGENT}'"
            )) == 1)
                .then_some(())
        },
        || s.diag(),
    );

    // Publishing under the agent's name took its session over: the agent comes back
    // within its reconnect spread (`reconnect_spread_secs`) before the flood starts.
    std::thread::sleep(Duration::from_millis(500));
    wait_for(
        "the agent to be connected again",
        T,
        || {
            let log = s.agent.log_text();
            let up = log.rfind("MQTT connected");
            (up.is_some() && up > log.rfind("MQTT connection failed")).then_some(())
        },
        || s.diag(),
    );
    let signer = weilan_config::signing::Signer::from_pem_files(
        &w.pki.agent(HOSTILE),
        &w.pki.agent_key(HOSTILE),
    )
    .unwrap();
    let events: Vec<serde_json::Value> = (0..200_000).map(|_| serde_json::json!({})).collect();
    let huge_batch = signer.sign(
        weilan_config::wire::Purpose::Batch,
        serde_json::json!({"agent_id": HOSTILE, "batch_id": 1, "first": {"epoch": 1, "seq": 1},
            "last": {"epoch": 1, "seq": 200000}, "events": events})
        .to_string(),
    );
    let huge_batch = serde_json::to_vec(&huge_batch).unwrap();
    let events_topic = format!("weilan/v1/agents/{HOSTILE}/events");
    let status_topic = format!("weilan/v1/agents/{HOSTILE}/status");

    let flood_started = Instant::now();
    let sampled = std::sync::atomic::AtomicBool::new(false);
    let flood_sent = std::sync::atomic::AtomicUsize::new(0);
    let (latencies, outcomes) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let mut outcomes = Vec::new();
            // 10 MiB on its own events topic.
            outcomes.push((
                "10 MiB publish",
                publish_denied(
                    ns,
                    HOSTILE,
                    hostile_tls(w),
                    &events_topic,
                    vec![b'x'; 10 << 20],
                ),
            ));
            // 2 MiB retained on its status topic.
            let retained = with_mqtt_client(ns, HOSTILE, hostile_tls(w), {
                let topic = status_topic.clone();
                move |client, mut el| {
                    Box::pin(async move {
                        connect(&mut el).await?;
                        client
                            .publish(topic, rumqttc::QoS::AtLeastOnce, true, vec![b'r'; 2 << 20])
                            .await
                            .map_err(|e| e.to_string())?;
                        drive_until_pubacks(&mut el, 1).await
                    })
                }
            });
            outcomes.push(("2 MiB retained", retained));
            // Until the other agent's samples are taken: rounds of 500 garbage
            // payloads and one signed batch of 200 000 events (more than the 1 000
            // payloads kept per source after the second round).
            let mut sent = 0usize;
            while !sampled.load(std::sync::atomic::Ordering::SeqCst) {
                let mut round: Vec<(String, Vec<u8>)> = (0..500)
                    .map(|i| (events_topic.clone(), format!("{{garbage {i}").into_bytes()))
                    .collect();
                round.push((events_topic.clone(), huge_batch.clone()));
                sent += round.len();
                publish_all(ns, HOSTILE, hostile_tls(w), round);
            }
            flood_sent.store(sent, std::sync::atomic::Ordering::SeqCst);
            outcomes.push((
                "rounds of 500 garbage payloads + a 200k-event batch",
                Ok(()),
            ));
            outcomes
        });
        let mut latencies = Vec::new();
        for i in 0..8 {
            latencies.push(plug_and_time(
                w,
                ns,
                &format!("1-{}", i + 2),
                &format!("DURING-FLOOD-{i}"),
                &|| s.diag(),
            ));
            std::thread::sleep(Duration::from_millis(250));
        }
        sampled.store(true, std::sync::atomic::Ordering::SeqCst);
        (latencies, flood.join().unwrap())
    });
    println!("MEASURED flood outcomes (broker side): {outcomes:?}");
    assert!(outcomes[0].1.is_err(), "a 10 MiB publish was accepted");
    assert!(
        outcomes[1].1.is_err(),
        "a 2 MiB retained publish was accepted"
    );

    // Everything the collector refused is counted by source, capped per source.
    wait_for(
        "the hostile flood quarantined",
        Duration::from_secs(60),
        || {
            let sent = flood_sent.load(std::sync::atomic::Ordering::SeqCst) as i64;
            (w.count(&format!(
                "SELECT COALESCE(SUM(refused), 0) FROM quarantine_counts WHERE source = '{HOSTILE}'"
            )) == sent)
                .then_some(())
        },
        || s.diag(),
    );
    let mut sorted = latencies.clone();
    sorted.sort();
    println!(
        "MEASURED {AGENT}'s capture→stored during the flood ({} s): {:?} (max {} ms)",
        flood_started.elapsed().as_secs(),
        latencies.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        sorted.last().unwrap().as_millis()
    );
    assert!(
        *sorted.last().unwrap() <= Duration::from_secs(1),
        "another agent's events waited more than 1 s: {latencies:?}\n{}",
        s.diag()
    );
    assert_eq!(
        w.count(&format!(
            "SELECT COUNT(*) FROM quarantine WHERE source = '{AGENT}'"
        )),
        1,
        "the flood erased another agent's evidence"
    );
    let reasons: Vec<String> = w
        .db()
        .query_map(
            &format!(
                "SELECT reason FROM quarantine WHERE source = '{HOSTILE}' AND reason LIKE '%batch of%'"
            ),
            params![],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        reasons.iter().any(|r| r.contains("batch of 200000 events")),
        "{reasons:?}"
    );
    // The broker's refusals are alerts naming the sender.
    let refused = wait_for(
        "broker-refused alert",
        T,
        || {
            w.alert_lines()
                .into_iter()
                .find(|a| a["rule_id"] == "builtin.collector.broker-refused")
        },
        || s.diag(),
    );
    assert_eq!(refused["agent_id"], HOSTILE);
    assert_eq!(refused["level"], "yellow");
    println!(
        "MEASURED broker-refused alert: {} (count {})",
        refused["summary"], refused["count"]
    );
    let flooding = wait_for(
        "source-flooding alert",
        T,
        || {
            w.alert_lines()
                .into_iter()
                .find(|a| a["rule_id"] == "builtin.collector.source-flooding")
        },
        || s.diag(),
    );
    assert_eq!(flooding["agent_id"], HOSTILE);
    println!("MEASURED source-flooding alert: {}", flooding["summary"]);
    // `weilan-collector quarantine` counts every refusal by source, beyond the 1 000
    // payloads it keeps per source.
    let out = std::process::Command::new(weilan_bin())
        .args(["collector", "quarantine", "--json", "--config"])
        .arg(w.path("collector.toml"))
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let row = |source: &str| {
        rows.iter()
            .find(|r| r["source"] == source)
            .unwrap_or_else(|| panic!("{source} not listed: {rows:?}"))
            .clone()
    };
    println!("MEASURED quarantine by source: {rows:?}");
    let sent = flood_sent.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(row(HOSTILE)["refused"], sent as u64, "{rows:?}");
    assert_eq!(row(HOSTILE)["kept"], 1000, "{rows:?}");
    assert_eq!(row(AGENT)["kept"], 1, "{rows:?}");
}

/// 100 TCP connections that never start TLS (a port scan, a stuck health check) do
/// not hold up a real agent's connection.
#[test]
fn silent_connections_do_not_delay_an_agent() {
    if !netns_available() {
        return;
    }
    let s = Setup::new();
    let silent: Vec<std::net::TcpStream> = s.ns.run_in(|| {
        (0..100)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", BROKER_PORT)).unwrap())
            .collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    let tls = test_client_tls(
        &s.w.pki.ca(),
        Some((&s.w.pki.agent(HOSTILE), &s.w.pki.agent_key(HOSTILE))),
    );
    let took = with_mqtt_client(&s.ns, HOSTILE, tls, |_client, mut el| {
        Box::pin(async move {
            let started = Instant::now();
            connect(&mut el).await.map(|()| started.elapsed())
        })
    });
    println!("MEASURED TLS + MQTT connect with 100 silent TCP connections open: {took:?}");
    let took = took.unwrap_or_else(|e| panic!("{e}\n{}", s.diag()));
    assert!(took <= Duration::from_secs(1), "{took:?}");
    drop(silent);
}

/// A retained message on an agent's status topic that is not a valid status (here
/// 100 kB, under the packet limit) is refused and deleted from the broker: a collector
/// that restarts (and with it the embedded broker, which keeps retained messages on
/// disk) does not receive it again.
#[test]
fn an_invalid_retained_status_is_deleted_from_the_broker() {
    if !netns_available() {
        return;
    }
    let mut s = Setup::new();
    let status_topic = format!("weilan/v1/agents/{HOSTILE}/status");
    let parked = with_mqtt_client(&s.ns, HOSTILE, hostile_tls(&s.w), {
        let topic = status_topic.clone();
        move |client, mut el| {
            Box::pin(async move {
                connect(&mut el).await?;
                client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, true, vec![b'r'; 100_000])
                    .await
                    .map_err(|e| e.to_string())?;
                drive_until_pubacks(&mut el, 1).await
            })
        }
    });
    assert!(parked.is_ok(), "{parked:?}");
    let refused = |w: &World| {
        w.count(&format!(
            "SELECT COUNT(*) FROM quarantine WHERE topic = '{status_topic}'"
        ))
    };
    wait_for(
        "the status refused",
        T,
        || (refused(&s.w) == 1).then_some(()),
        || s.diag(),
    );
    // Deleted: after a restart of collector and broker, it is not delivered again.
    std::thread::sleep(Duration::from_secs(1));
    s.collector.stop();
    s.collector = s.w.start_collector(&s.ns, &s.w.path("collector.toml"));
    wait_for(
        "the agent back after the restart",
        T,
        || (s.agent.log_text().matches("MQTT connected").count() >= 2).then_some(()),
        || s.diag(),
    );
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "MEASURED invalid retained status: refused {} time(s) across a collector and broker restart",
        refused(&s.w)
    );
    assert_eq!(
        refused(&s.w),
        1,
        "the retained status came back\n{}",
        s.diag()
    );
}
