//! Host access, for real: an sshd (openssh-server) in a network namespace the test
//! creates logs to syslog; an rsyslogd the test starts writes the auth facility to a
//! file, as Debian's rsyslog writes /var/log/auth.log; the agent follows that file.
//! A failed ssh login (a key the server does not know), a successful one that runs
//! `sudo -u nobody true`, and its end must reach the collector as `access.*` events
//! with user, source address and outcome.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const CLIENT_ADDR: &str = "10.78.0.1";
const SERVER_ADDR: &str = "10.78.0.2";

/// The syslog socket the test's rsyslogd owns; removed when it stops.
struct Syslog(Proc);

impl Drop for Syslog {
    fn drop(&mut self) {
        self.0.stop();
        let _ = std::fs::remove_file("/dev/log");
    }
}

#[test]
fn ssh_logins_failures_and_sudo_are_reported_with_user_address_and_outcome() {
    if !netns_available() {
        return;
    }
    for p in ["sshd", "ssh", "rsyslogd", "sudo"] {
        if !require(&format!("access test needs `{p}`"), have(p)) {
            return;
        }
    }
    if !require(
        "access test needs /dev/log free (a system syslog already owns it here)",
        !std::path::Path::new("/dev/log").exists(),
    ) {
        return;
    }
    let w = World::new();
    let auth_log = w.path("auth.log");
    let conf = w.path("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "module(load=\"imuxsock\" SysSock.Name=\"/dev/log\")\nauth,authpriv.* {}\n",
            auth_log.display()
        ),
    )
    .unwrap();
    let mut rs = Command::new(which("rsyslogd").unwrap());
    rs.args(["-n", "-f"])
        .arg(&conf)
        .arg("-i")
        .arg(w.path("rsyslogd.pid"));
    let _syslog = Syslog(Proc::spawn(rs, w.path("rsyslogd.log"), "rsyslogd"));
    assert!(
        within(Duration::from_secs(10), || std::path::Path::new("/dev/log")
            .exists()
            .then_some(()))
        .is_some(),
        "rsyslogd did not open /dev/log: {}",
        std::fs::read_to_string(w.path("rsyslogd.log")).unwrap_or_default()
    );
    // The file exists before the agent starts, as /var/log/auth.log would.
    run_ok(Command::new("logger").args(["-p", "auth.info", "weilan access test starting"]));
    assert!(within(Duration::from_secs(10), || auth_log.exists().then_some(())).is_some());

    let home = Netns::create();
    let client = Netns::create();
    let server = Netns::create();
    link_namespaces(&client, CLIENT_ADDR, &server, SERVER_ADDR);
    // VERBOSE: OpenSSH logs a rejected key of a valid user only at this level.
    let (_sshd, key) = start_sshd(&w, &server, SERVER_ADDR, "LogLevel VERBOSE", true);

    let collector = w.collector_toml(false, "");
    let _c = w.start_collector(&home, &collector);
    let agent = w.agent_toml(
        AGENT,
        "pki/ca.pem",
        &format!(
            "[access]\nfrom = \"auth-log\"\nauth_logs = [\"{}\"]\npoll_ms = 200\n[network]\nenabled = false\n",
            auth_log.display()
        ),
    );
    let _a = w.start_agent(&home, &agent, AGENT);
    // A second agent reads the same logins from wtmp (the fallback without journal or
    // auth log): sshd appends a record for every session with a terminal.
    // sshd writes the logout record only where utmp exists, as it does on every booted
    // Debian (systemd-tmpfiles creates it); a bare container has neither file.
    for file in ["/var/log/wtmp", "/run/utmp"] {
        if !std::path::Path::new(file).exists() {
            run_ok(Command::new("install").args(["-m", "664", "-g", "utmp", "/dev/null", file]));
        }
    }
    const WTMP_AGENT: &str = "srv-wtmp";
    weilan_collector::pki::issue_agent(&w.pki, WTMP_AGENT).unwrap();
    let wtmp_agent = w.agent_toml(
        WTMP_AGENT,
        "pki/ca.pem",
        "[access]\nfrom = \"utmp\"\nwtmp = \"/var/log/wtmp\"\npoll_ms = 200\n[network]\nenabled = false\n",
    );
    let _b = w.start_agent(&home, &wtmp_agent, WTMP_AGENT);
    assert!(within(Duration::from_secs(20), || {
        (w.count("SELECT COUNT(DISTINCT agent_id) FROM events WHERE kind = 'agent.started'") == 2)
            .then_some(())
    })
    .is_some());
    assert!(within(Duration::from_secs(10), || client
        .command("ssh-keyscan")
        .arg(SERVER_ADDR)
        .output()
        .ok()
        .filter(|o| !o.stdout.is_empty()))
    .is_some());
    std::thread::sleep(Duration::from_millis(500));

    // A key the server does not know.
    let stranger = w.path("ssh/stranger");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&stranger),
    );
    let failed = client
        .command("ssh")
        .args(ssh_opts(&stranger))
        .arg(format!("root@{SERVER_ADDR}"))
        .arg("true")
        .status()
        .unwrap();
    assert!(!failed.success());
    // The right key, and privileges raised in the session.
    let ok = client
        .command("ssh")
        .args(ssh_opts(&key))
        .arg(format!("root@{SERVER_ADDR}"))
        .arg("sudo -n -u nobody true")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let event = |kind: &str, pred: &dyn Fn(&Value) -> bool| {
        within(Duration::from_secs(20), || {
            w.events(kind, "1", &[]).into_iter().find(|e| pred(e))
        })
        .unwrap_or_else(|| {
            panic!(
                "no {kind}; access events: {:#?}\nauth.log:\n{}",
                w.events("access.login", "1", &[]),
                std::fs::read_to_string(&auth_log).unwrap_or_default()
            )
        })
    };
    let f = event("access.login_failed", &|e| e["remote_addr"] == CLIENT_ADDR);
    assert_eq!(
        (
            f["user"].as_str(),
            f["method"].as_str(),
            f["source"].as_str()
        ),
        (Some("root"), Some("ssh"), Some("auth-log"))
    );
    assert_eq!(f["reason"], "publickey rejected");
    let l = event("access.login", &|e| e["remote_addr"] == CLIENT_ADDR);
    assert_eq!(
        (l["user"].as_str(), l["method"].as_str()),
        (Some("root"), Some("ssh"))
    );
    let p = event("access.privilege", &|e| e["target_user"] == "nobody");
    assert_eq!(
        (
            p["user"].as_str(),
            p["tool"].as_str(),
            p["success"].as_bool()
        ),
        (Some("root"), Some("sudo"), Some(true))
    );
    assert_eq!(p["command"], "/usr/bin/true");
    let o = event("access.logout", &|e| e["session_id"] == l["session_id"]);
    assert_eq!(o["user"], "root");
    eprintln!("MEASURED access: failed {f}\nlogin {l}\nprivilege {p}\nlogout {o}");

    // A session with a terminal (ssh -tt): recorded in wtmp, read by the second agent.
    let tty = client
        .command("ssh")
        .args(ssh_opts(&key))
        .arg("-tt")
        .arg(format!("root@{SERVER_ADDR}"))
        .arg("sleep 1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        tty.status.success(),
        "{}",
        String::from_utf8_lossy(&tty.stderr)
    );
    let from_wtmp = |kind: &str| {
        within(Duration::from_secs(20), || {
            w.events(
                kind,
                "json_extract(envelope, '$.event.data.source') = 'utmp'",
                &[],
            )
            .into_iter()
            .next()
        })
        .unwrap_or_else(|| {
            panic!(
                "no {kind} from wtmp; events: {:#?}",
                w.events("access.login", "1", &[])
            )
        })
    };
    let wl = from_wtmp("access.login");
    assert_eq!(
        (
            wl["user"].as_str(),
            wl["method"].as_str(),
            wl["remote_addr"].as_str()
        ),
        (Some("root"), Some("remote"), Some(CLIENT_ADDR)),
        "{wl}"
    );
    assert!(
        wl["tty"].as_str().is_some_and(|t| t.starts_with("pts/")),
        "{wl}"
    );
    let wo = from_wtmp("access.logout");
    assert_eq!(
        (wo["user"].as_str(), wo["session_id"].as_str()),
        (Some("root"), wl["session_id"].as_str()),
        "{wo}"
    );
    eprintln!("MEASURED wtmp: login {wl}\nlogout {wo}");
}

/// A door controller's signed message, as a third-party controller would build it
/// (docs/protocol.md, "Door controllers").
fn door_message(
    signer: &weilan_config::signing::Signer,
    controller: &str,
    seq: u64,
    event: Value,
) -> Vec<u8> {
    let body = serde_json::json!({
        "controller": controller, "seq": seq, "time": jiff::Timestamp::now().to_string(), "event": event,
    })
    .to_string();
    serde_json::to_vec(&signer.sign(weilan_config::wire::Purpose::DoorEvent, body)).unwrap()
}

#[test]
fn door_controllers_publish_signed_events_replays_and_impostors_are_refused() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    let (cert, key) = weilan_collector::pki::issue_door_controller(&w.pki, "ctl-east").unwrap();
    let hash =
        |card: &str| weilan_config::badge::card_hash(b"hq-dc badge key, 32 bytes long..", card);
    let roster = w.path("roster.csv");
    std::fs::write(&roster, "id_hash,name,department\n").unwrap();
    let ns = Netns::create();
    let collector = w.start_collector(
        &ns,
        &w.collector_toml(
            false,
            &format!(
                "[rules]\nroster = \"{}\"\nreload_check_secs = 1\n",
                roster.display()
            ),
        ),
    );
    std::thread::sleep(Duration::from_millis(500));
    let controller = weilan_config::signing::Signer::from_pem_files(&cert, &key).unwrap();
    let agent = weilan_config::signing::Signer::from_pem_files(
        &w.pki.agent(AGENT),
        &w.pki.agent_key(AGENT),
    )
    .unwrap();
    let badge = |card: &str, site: &str| {
        serde_json::json!({"kind": "access.badge", "data": {"reader": "east", "site": site,
            "id_hash": hash(card), "last4": &card[card.len() - 4..], "source": "controller"}})
    };
    let door = |site: &str| {
        serde_json::json!({"kind": "access.door", "data": {"door": "east", "site": site,
            "state": "opened", "held_open_secs": null, "source": "controller"}})
    };
    // Wang Fang joins the roster while the collector runs.
    std::fs::write(
        &roster,
        format!(
            "id_hash,name,department\n{},Wang Fang,IT\n",
            hash("0012345678")
        ),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let topic = "weilan/v1/doors/ctl-east/events";
    let resent = door_message(&controller, "ctl-east", 2, door("hq-dc"));
    let messages: Vec<(String, Vec<u8>)> = vec![
        (
            topic.into(),
            door_message(&controller, "ctl-east", 1, badge("0012345678", "hq-dc")),
        ),
        (topic.into(), resent.clone()),
        // No badge at the annex: red.
        (
            topic.into(),
            door_message(&controller, "ctl-east", 3, door("hq-annex")),
        ),
        // A card nobody issued: yellow.
        (
            topic.into(),
            door_message(&controller, "ctl-east", 4, badge("99990000", "hq-dc")),
        ),
        // A re-send of the very message (no ack seen): acknowledged, stored once.
        (topic.into(), resent),
        // Refused: another message under a seq already used (replay), signed by an
        // agent, and a kind a controller does not send.
        (
            topic.into(),
            door_message(&controller, "ctl-east", 2, door("hq-annex")),
        ),
        (
            topic.into(),
            door_message(&agent, "ctl-east", 6, door("hq-dc")),
        ),
        (
            topic.into(),
            door_message(
                &controller,
                "ctl-east",
                7,
                serde_json::json!({"kind": "agent.stopping", "data": {"reason": "signal"}}),
            ),
        ),
    ];
    let tls = test_client_tls(&w.pki.ca(), Some((&cert, &key)));
    // Every committed message is acknowledged to the controller, signed by the
    // collector; the refused ones are not.
    let acks = publish_collecting(
        &ns,
        "ctl-east",
        tls.clone(),
        "weilan/v1/doors/ctl-east/acks",
        messages,
        5,
    );
    let collector_verifier = weilan_config::signing::Verifier::from_ca_file(&w.pki.ca()).unwrap();
    let mut acked: Vec<(u64, u32, u32)> = acks
        .iter()
        .map(|payload| {
            let m = weilan_config::wire::decode_signed(payload, 1 << 20).unwrap();
            collector_verifier
                .verify(
                    &m,
                    weilan_config::wire::Purpose::Ack,
                    weilan_config::signing::Role::Collector,
                )
                .unwrap();
            let ack: weilan_config::wire::Ack = serde_json::from_str(&m.body).unwrap();
            assert_eq!((ack.agent_id.as_str(), ack.first), ("ctl-east", ack.last));
            (ack.last.seq, ack.stored, ack.duplicates)
        })
        .collect();
    acked.sort();
    assert_eq!(
        acked,
        [(1, 1, 0), (2, 0, 1), (2, 1, 0), (3, 1, 0), (4, 1, 0)],
        "seq, stored, duplicates"
    );
    // Another controller's topic is closed to this certificate by the broker's ACL.
    let denied = publish_denied(
        &ns,
        "ctl-east",
        tls,
        "weilan/v1/doors/ctl-west/events",
        door_message(&controller, "ctl-east", 5, door("hq-dc")),
    );
    assert!(
        denied.is_err(),
        "the broker kept the connection: {denied:?}"
    );
    let diag = || collector.log_text();
    wait_for(
        "3 refused messages",
        Duration::from_secs(30),
        || (w.count("SELECT COUNT(*) FROM quarantine") == 3).then_some(()),
        diag,
    );
    let reasons = quarantine_reasons(&w);
    assert!(
        reasons[0].contains("replayed or out of order: seq 2"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("signature") && reasons[1].contains("role"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("a door controller sends access.badge or access.door"),
        "{reasons:?}"
    );
    assert_eq!(
        w.count("SELECT COUNT(*) FROM events WHERE agent_id = 'ctl-east' AND host_role = 'door-controller'"),
        4
    );
    let alerts = wait_for(
        "door and roster alerts",
        Duration::from_secs(30),
        || {
            let a = w.alert_lines();
            (a.iter()
                .any(|a| a["rule_id"] == "builtin.access.unknown-badge"))
            .then_some(a)
        },
        diag,
    );
    let doors: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["rule_id"] == "builtin.access.door-without-badge")
        .collect();
    assert_eq!(
        doors.len(),
        1,
        "only the annex door opened without a badge: {alerts:#?}"
    );
    assert_eq!(doors[0]["level"], "red");
    assert!(
        doors[0]["summary"]
            .as_str()
            .unwrap()
            .contains("site hq-annex"),
        "{}",
        doors[0]
    );
    let unknown: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["rule_id"] == "builtin.access.unknown-badge")
        .collect();
    assert_eq!(
        unknown.len(),
        1,
        "Wang Fang's card is on the reloaded roster: {alerts:#?}"
    );
    assert!(
        unknown[0]["summary"].as_str().unwrap().contains("…0000"),
        "{}",
        unknown[0]
    );
    println!(
        "MEASURED door controller: 4 events stored, 4 refused ({reasons:?}), door-without-badge red for hq-annex only, unknown badge yellow for …0000 only"
    );
}
