//! The spine, end to end: a USB device appearing in a fake sysfs tree plus its kernel
//! uevent travels agent → MQTT/mTLS (embedded broker or Mosquitto) → collector →
//! SQLite and the alert log; TLS identity and bad input are refused.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use weilan_agent::source::usb::sysfs::fake::{add_stick, FakeStick};

const T: Duration = Duration::from_secs(30);

/// Plugs a fake stick and announces it the way the kernel does; waits for it in SQLite.
fn plug_and_expect_stored(
    w: &World,
    ns: &Netns,
    port: &str,
    serial: &str,
    diag: &dyn Fn() -> String,
) {
    let devpath = add_stick(
        &w.sysfs(),
        &FakeStick {
            port,
            vid: "0951",
            pid: "1666",
            serial,
            classes: &[0x08],
            disk: Some(("sdc", "8:32")),
        },
    );
    ns.send_uevent("add", &devpath, "usb", "usb_device");
    wait_for(
        "usb.attached in SQLite",
        T,
        || (w.attached_count(serial) > 0).then_some(()),
        diag,
    );
}

fn red_alerts_for(w: &World, serial: &str) -> Vec<serde_json::Value> {
    w.alert_lines()
        .into_iter()
        .filter(|a| a["level"] == "red" && a["details"]["event"]["serial"] == serial)
        .collect()
}

fn check_flow(w: &World, ns: &Netns, collector: &Proc, agent: &Proc) {
    let diag = || {
        format!(
            "--- collector\n{}\n--- agent\n{}",
            collector.log_text(),
            agent.log_text()
        )
    };
    wait_for(
        "agent.started stored",
        T,
        || (w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.started'") == 1).then_some(()),
        diag,
    );
    plug_and_expect_stored(w, ns, "1-4", "E2E-UNKNOWN-1", &diag);
    let alert = wait_for(
        "red alert line",
        T,
        || red_alerts_for(w, "E2E-UNKNOWN-1").into_iter().next(),
        diag,
    );
    assert_eq!(alert["agent_id"], AGENT);
    assert_eq!(alert["rule_id"], "builtin.usb.unknown-storage");
    assert!(alert["summary"].as_str().unwrap().contains("E2E-UNKNOWN-1"));
    let event_id = alert["event_ids"][0].as_str().unwrap().to_string();
    assert!(event_id.starts_with(&format!("{AGENT}:")), "{event_id}");
    // Stored once; the known stick present at start raised no alert.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w.attached_count("E2E-UNKNOWN-1"), 1, "{}", diag());
    assert_eq!(w.attached_count("E2E-KNOWN-1"), 1, "{}", diag());
    // (Red only: a yellow "outside working hours" joins it when the test runs at night.)
    assert_eq!(
        w.alert_lines()
            .iter()
            .filter(|a| a["level"] == "red")
            .count(),
        1,
        "only the unknown stick alerts red\n{}",
        diag()
    );
    let db = w.db();
    let stored_id: String = db
        .query_row(
            &for_engine(db.engine(), "SELECT event_id FROM events WHERE kind = 'usb.attached' AND json_extract(envelope, '$.event.data.serial') = 'E2E-UNKNOWN-1'"),
            params![],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored_id, event_id);
}

#[test]
fn usb_event_reaches_sqlite_and_red_alert_through_embedded_broker() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    w.write_policy(&["E2E-KNOWN-1"]);
    add_stick(
        &w.sysfs(),
        &FakeStick {
            port: "1-1",
            vid: "0781",
            pid: "5581",
            serial: "E2E-KNOWN-1",
            classes: &[0x08],
            disk: Some(("sda", "8:0")),
        },
    );
    let ns = Netns::create();
    let collector = w.start_collector(&ns, &w.collector_toml(false, ""));
    let agent = w.start_agent(&ns, &w.agent_toml(AGENT, "pki/ca.pem", ""), AGENT);
    check_flow(&w, &ns, &collector, &agent);

    // `weilan collector tail` shows it, red, with the agent id.
    let out = std::process::Command::new(weilan_bin())
        .args([
            "collector",
            "tail",
            "--no-follow",
            "--level",
            "red",
            "--file",
        ])
        .arg(w.path("alerts.jsonl"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("RED") && text.contains(AGENT) && text.contains("E2E-UNKNOWN-1"),
        "{text}"
    );

    // Orderly stop is reported.
    let mut agent = agent;
    agent.stop();
    wait_for(
        "agent.stopping stored",
        T,
        || {
            (w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.stopping'") == 1)
                .then_some(())
        },
        || agent.log_text(),
    );
}

/// The `mosquitto` binary, or a visible SKIPPED line.
fn mosquitto_or_skip() -> Option<std::path::PathBuf> {
    let found = which("mosquitto");
    require(
        "Mosquitto test needs the `mosquitto` binary (apt-get install mosquitto)",
        found.is_some(),
    );
    found
}

fn mosquitto_conf(w: &World) -> std::path::PathBuf {
    // The shipped ACL, never a retyped copy (a retyped one once lacked the policy lines).
    let acl = w.path("mosquitto.acl");
    fs::write(&acl, include_str!("../config/mosquitto/weilan.acl")).unwrap();
    let conf = w.path("mosquitto.conf");
    fs::write(
        &conf,
        format!(
            "user root\npersistence false\nlog_dest stderr\nlistener {BROKER_PORT} 127.0.0.1\n\
             cafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n\
             use_identity_as_username true\nacl_file {acl}\n",
            ca = w.pki.ca().display(),
            cert = w.pki.server().display(),
            key = w.pki.server_key().display(),
            acl = acl.display(),
        ),
    )
    .unwrap();
    conf
}

#[test]
fn usb_event_flows_through_mosquitto_with_acl_and_agents_cannot_impersonate() {
    if !netns_available() {
        return;
    }
    let Some(mosquitto) = mosquitto_or_skip() else {
        return;
    };
    let w = World::new();
    w.write_policy(&["E2E-KNOWN-1"]);
    add_stick(
        &w.sysfs(),
        &FakeStick {
            port: "1-1",
            vid: "0781",
            pid: "5581",
            serial: "E2E-KNOWN-1",
            classes: &[0x08],
            disk: Some(("sda", "8:0")),
        },
    );
    weilan_collector::pki::issue_agent(&w.pki, "ws-other").unwrap();
    let ns = Netns::create();
    let mut m = ns.command(mosquitto);
    m.arg("-c").arg(mosquitto_conf(&w));
    let broker = Proc::spawn(m, w.path("mosquitto.log"), "mosquitto");
    std::thread::sleep(Duration::from_millis(300));
    let collector = w.start_collector(&ns, &w.collector_toml(true, ""));
    let agent = w.start_agent(&ns, &w.agent_toml(AGENT, "pki/ca.pem", ""), AGENT);
    check_flow(&w, &ns, &collector, &agent);

    // ACL: ws-e2e publishes on ws-other's topic, then on its own status topic. A
    // subscriber with the collector's identity receives the second and never the first.
    let sub_tls = test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.collector(), &w.pki.collector_key())),
    );
    let pub_tls = test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.agent(AGENT), &w.pki.agent_key(AGENT))),
    );
    let (received, log) = {
        let ns_name = ns.name.clone();
        let _ = ns_name;
        with_mqtt_client(&ns, "acl-probe-sub", sub_tls, move |sub, mut sub_loop| {
            Box::pin(async move {
                connect(&mut sub_loop).await.expect("subscriber connects");
                sub.subscribe("weilan/v1/agents/+/#", rumqttc::QoS::AtLeastOnce)
                    .await
                    .unwrap();
                // Let the SUBACK arrive.
                loop {
                    if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) =
                        sub_loop.poll().await
                    {
                        break;
                    }
                }
                let (publisher, mut pub_loop) = {
                    let mut opts =
                        rumqttc::MqttOptions::new("acl-probe-pub", "127.0.0.1", BROKER_PORT);
                    opts.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(pub_tls),
                    ));
                    rumqttc::AsyncClient::new(opts, 16)
                };
                connect(&mut pub_loop).await.expect("publisher connects");
                publisher
                    .publish(
                        "weilan/v1/agents/ws-other/events",
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        b"FORGED".to_vec(),
                    )
                    .await
                    .unwrap();
                publisher
                    .publish(
                        format!("weilan/v1/agents/{AGENT}/status"),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        b"MARKER".to_vec(),
                    )
                    .await
                    .unwrap();
                drive_until_pubacks(&mut pub_loop, 2)
                    .await
                    .expect("pubacks");
                let mut received = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while tokio::time::Instant::now() < deadline {
                    tokio::select! {
                        ev = sub_loop.poll() => if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = ev {
                            received.push((p.topic.clone(), p.payload.to_vec()));
                            if p.payload.as_ref() == b"MARKER" { break; }
                        },
                        _ = pub_loop.poll() => {}
                    }
                }
                (received, String::new())
            })
        })
    };
    let _ = log;
    assert!(
        received.iter().any(|(_, p)| p == b"MARKER"),
        "allowed publish must arrive: {received:?}\n{}",
        broker.log_text()
    );
    assert!(
        !received.iter().any(|(_, p)| p == b"FORGED"),
        "an agent published on another agent's topic: {received:?}"
    );
}

#[test]
fn tls_refuses_missing_or_foreign_certificates_and_unpinned_collectors() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    let other = tempfile::tempdir().unwrap();
    let other_pki = weilan_collector::pki::PkiPaths::new(other.path());
    weilan_collector::pki::init(&other_pki, &["weilan-collector".into(), "127.0.0.1".into()])
        .unwrap();
    weilan_collector::pki::issue_agent(&other_pki, "intruder").unwrap();
    let ns = Netns::create();
    let collector = w.start_collector(&ns, &w.collector_toml(false, ""));
    std::thread::sleep(Duration::from_millis(500));

    let attempt = |tls| {
        with_mqtt_client(&ns, "probe", tls, |_c, mut el| {
            Box::pin(async move { connect(&mut el).await })
        })
    };
    // Positive control: a certificate from the Weilan CA connects.
    let ok = attempt(test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.agent(AGENT), &w.pki.agent_key(AGENT))),
    ));
    assert_eq!(ok, Ok(()), "{}", collector.log_text());
    // No client certificate.
    let none = attempt(test_client_tls(&w.pki.ca(), None));
    assert!(none.is_err(), "a client without a certificate connected");
    // A certificate from another CA.
    let foreign = attempt(test_client_tls(
        &w.pki.ca(),
        Some((
            &other_pki.agent("intruder"),
            &other_pki.agent_key("intruder"),
        )),
    ));
    assert!(
        foreign.is_err(),
        "a client with a foreign certificate connected"
    );

    // An agent with a valid certificate that pins another CA refuses the collector
    // and sends nothing.
    fs::copy(other_pki.ca(), w.path("other-ca.pem")).unwrap();
    let agent = w.start_agent(&ns, &w.agent_toml(AGENT, "other-ca.pem", ""), AGENT);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        w.count("SELECT COUNT(*) FROM events"),
        0,
        "{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(
        log.contains("MQTT connection failed") && log.to_lowercase().contains("certificate"),
        "{log}"
    );
}

#[test]
fn malformed_forged_and_oversized_payloads_are_quarantined_and_ingest_continues() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    weilan_collector::pki::issue_agent(&w.pki, "ws-other").unwrap();
    let ns = Netns::create();
    let mut collector = w.start_collector(
        &ns,
        &w.collector_toml(false, "[ingest]\nmax_payload_bytes = 65536\n"),
    );
    std::thread::sleep(Duration::from_millis(500));

    let signer = weilan_config::signing::Signer::from_pem_files(
        &w.pki.agent(AGENT),
        &w.pki.agent_key(AGENT),
    )
    .unwrap();
    let batch = |agent: &str| {
        serde_json::json!({"agent_id": agent, "batch_id": 1, "first": {"epoch": 1, "seq": 1},
            "last": {"epoch": 1, "seq": 1}, "events": []})
        .to_string()
    };
    let good = signer.sign(weilan_config::wire::Purpose::Batch, batch(AGENT));
    let mut forged = good.clone();
    forged.body = batch(AGENT).replace("\"batch_id\":1", "\"batch_id\":2");
    let impersonating = signer.sign(weilan_config::wire::Purpose::Batch, batch("ws-other"));
    let payloads: Vec<(String, Vec<u8>)> = vec![
        (
            format!("weilan/v1/agents/{AGENT}/events"),
            b"{not json".to_vec(),
        ),
        (
            format!("weilan/v1/agents/{AGENT}/events"),
            vec![b' '; 70_000],
        ),
        (
            format!("weilan/v1/agents/{AGENT}/events"),
            serde_json::to_vec(&forged).unwrap(),
        ),
        (
            format!("weilan/v1/agents/{AGENT}/events"),
            serde_json::to_vec(&impersonating).unwrap(),
        ),
    ];
    let tls = test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.agent(AGENT), &w.pki.agent_key(AGENT))),
    );
    publish_all(&ns, "garbage", tls.clone(), payloads);
    // Another agent's topic is closed to this certificate by the broker's ACL: the
    // publish never reaches the collector (Mosquitto drops the connection).
    let refused = publish_denied(
        &ns,
        AGENT,
        tls,
        "weilan/v1/agents/ws-other/events",
        serde_json::to_vec(&good).unwrap(),
    );
    assert!(
        refused.is_err(),
        "the broker kept the connection: {refused:?}"
    );
    println!("MEASURED a publish on another agent's topic: {refused:?}");
    let diag = || collector.log_text();
    wait_for(
        "4 quarantined payloads",
        T,
        || (w.count("SELECT COUNT(*) FROM quarantine") == 4).then_some(()),
        diag,
    );
    let reasons = quarantine_reasons(&w);
    assert!(reasons[0].contains("not valid JSON"), "{reasons:?}");
    assert!(reasons[1].contains("exceeds the limit"), "{reasons:?}");
    assert!(reasons[2].contains("signature"), "{reasons:?}");
    assert!(
        reasons[3].contains("claims agent `ws-other`"),
        "{reasons:?}"
    );
    assert_eq!(
        w.count("SELECT COUNT(*) FROM events WHERE agent_id = 'ws-other'"),
        0
    );
    assert!(
        collector.is_running(),
        "collector died: {}",
        collector.log_text()
    );

    // Ingest keeps working: a real agent's events are still stored.
    let agent = w.start_agent(&ns, &w.agent_toml(AGENT, "pki/ca.pem", ""), AGENT);
    wait_for(
        "agent.started stored after garbage",
        T,
        || (w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.started'") == 1).then_some(()),
        || format!("{}\n{}", collector.log_text(), agent.log_text()),
    );
}

/// A collector that cannot reach its broker says so as a red alert (it used to log
/// WARN lines only, while storing nothing): here an external broker that is not there.
#[test]
fn a_collector_that_cannot_reach_its_broker_raises_a_red_alert() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    let ns = Netns::create();
    let collector = w.start_collector(&ns, &w.collector_toml(true, "[enroll]\nenabled = false\n"));
    let alert = wait_for(
        "broker-unreachable alert",
        Duration::from_secs(60),
        || {
            w.alert_lines()
                .into_iter()
                .find(|a| a["rule_id"] == "builtin.collector.broker-unreachable")
        },
        || collector.log_text(),
    );
    assert_eq!(alert["level"], "red");
    let summary = alert["summary"].as_str().unwrap();
    assert!(
        summary.contains("127.0.0.1:8883") && summary.contains("Connection refused"),
        "{summary}"
    );
    println!("MEASURED broker unreachable: {summary}");
}

/// Revokes `id` with the CLI an admin uses; returns when it exited.
fn revoke(w: &World, id: &str) {
    let out = std::process::Command::new(weilan_bin())
        .args([
            "collector",
            "agents",
            "revoke",
            id,
            "--reason",
            "laptop stolen",
            "--dir",
        ])
        .arg(&w.pki.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Plugs a fake stick without waiting for it to be stored.
fn plug(w: &World, ns: &Netns, port: &str, serial: &str) {
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
}

/// `agents revoke` on a connected agent, embedded broker: the collector has the
/// broker read the new CRL and ends the agent's session; the agent's reconnects are
/// refused at the TLS handshake; nothing it records afterwards is stored.
#[test]
fn a_revoked_agent_is_disconnected_and_refused_by_the_embedded_broker() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    w.write_policy(&[]);
    let ns = Netns::create();
    let collector = w.start_collector(&ns, &w.collector_toml(false, ""));
    let agent = w.start_agent(&ns, &w.agent_toml(AGENT, "pki/ca.pem", ""), AGENT);
    let diag = || {
        format!(
            "--- collector\n{}\n--- agent\n{}",
            collector.log_text(),
            agent.log_text()
        )
    };
    plug_and_expect_stored(&w, &ns, "1-4", "BEFORE-REVOKE", &diag);
    let failures = |text: &str| text.matches("MQTT connection failed").count();
    let before = failures(&agent.log_text());
    let revoked_at = std::time::Instant::now();
    revoke(&w, AGENT);
    wait_for(
        "the revoked agent's session ended",
        Duration::from_secs(5),
        || (failures(&agent.log_text()) > before).then_some(()),
        diag,
    );
    let disconnected = revoked_at.elapsed();
    // Its next attempts are refused at the handshake, for the revoked certificate.
    wait_for(
        "a reconnect refused as revoked",
        Duration::from_secs(15),
        || {
            agent
                .log_text()
                .contains("CertificateRevoked")
                .then_some(())
        },
        diag,
    );
    println!(
        "MEASURED revoked agent disconnected {} ms after `agents revoke`; reconnect refused: CertificateRevoked",
        disconnected.as_millis()
    );
    // What it records from now on never reaches the store.
    plug(&w, &ns, "1-5", "AFTER-REVOKE");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(w.attached_count("AFTER-REVOKE"), 0, "{}", diag());
    assert_eq!(w.attached_count("BEFORE-REVOKE"), 1, "{}", diag());
    assert!(
        collector
            .log_text()
            .contains("revoked: its broker session was ended"),
        "{}",
        diag()
    );
}

/// An external broker that has not been given the new CRL yet still lets the revoked
/// certificate connect: the collector refuses what it signed and raises a red alert.
#[test]
fn a_revoked_certificate_is_refused_at_ingest_when_the_broker_lacks_the_crl() {
    if !netns_available() {
        return;
    }
    let Some(mosquitto) = mosquitto_or_skip() else {
        return;
    };
    let w = World::new();
    w.write_policy(&[]);
    let ns = Netns::create();
    let mut m = ns.command(mosquitto);
    m.arg("-c").arg(mosquitto_conf(&w));
    let _broker = Proc::spawn(m, w.path("mosquitto.log"), "mosquitto");
    std::thread::sleep(Duration::from_millis(300));
    let collector = w.start_collector(&ns, &w.collector_toml(true, ""));
    let agent = w.start_agent(&ns, &w.agent_toml(AGENT, "pki/ca.pem", ""), AGENT);
    let diag = || {
        format!(
            "--- collector\n{}\n--- agent\n{}",
            collector.log_text(),
            agent.log_text()
        )
    };
    plug_and_expect_stored(&w, &ns, "1-4", "BEFORE-REVOKE", &diag);
    revoke(&w, AGENT);
    plug(&w, &ns, "1-5", "AFTER-REVOKE");
    let alert = wait_for(
        "unenrolled-certificate alert for the revoked agent",
        T,
        || {
            w.alert_lines()
                .into_iter()
                .find(|a| a["rule_id"] == "builtin.integrity.unenrolled-certificate")
        },
        diag,
    );
    assert_eq!(alert["level"], "red");
    assert_eq!(alert["agent_id"], AGENT);
    assert_eq!(w.attached_count("AFTER-REVOKE"), 0, "{}", diag());
    println!(
        "MEASURED revoked certificate through a broker without the CRL: {}",
        alert["summary"]
    );
}
