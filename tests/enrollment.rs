//! Enrollment and the registry, end to end: a real collector and real agents in a
//! network namespace. One token enrolls one agent (key made on the agent, certificate
//! from the collector, events stored); the same token again, an expired one and forged
//! ones are refused and alerted; an enrolled id is not taken over without an admin's
//! `--replace`; a certificate the CA signed for a name never enrolled is refused and
//! raises a red alert.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn enroll_create(w: &World, args: &[&str]) -> Vec<String> {
    let out = Command::new(weilan_bin())
        .args(["collector", "enroll", "create", "--dir"])
        .arg(w.pki.dir.as_path())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `weilan-agent enroll` inside the namespace; (success, output).
fn agent_enroll(ns: &Netns, token: &str, id: &str, dir: &Path) -> (bool, String) {
    let out = ns
        .command(weilan_bin())
        .args([
            "agent",
            "enroll",
            "--collector",
            "127.0.0.1:8884",
            "--token",
            token,
            "--id",
            id,
            "--dir",
        ])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Agent settings using the certificate files in `dir` (as enrollment writes them).
fn agent_toml_for(w: &World, id: &str, dir: &Path) -> std::path::PathBuf {
    let cfg = w.agent_toml(id, "pki/ca.pem", "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("cert = \"pki/agents/{id}.pem\"\nkey = \"pki/agents/{id}-key.pem\""),
        &format!(
            "cert = \"{}\"\nkey = \"{}\"",
            dir.join("agent.pem").display(),
            dir.join("agent-key.pem").display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn started(w: &World, id: &str) -> i64 {
    w.count(&format!(
        "SELECT COUNT(*) FROM events WHERE agent_id = '{id}' AND kind = 'agent.started'"
    ))
}

fn alerts_of(w: &World, rule: &str) -> Vec<serde_json::Value> {
    w.alert_lines()
        .into_iter()
        .filter(|a| a["rule_id"] == rule)
        .collect()
}

#[test]
fn one_token_enrolls_one_agent_and_everything_else_is_refused() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    let ns = Netns::create();
    let collector = w.start_collector(
        &ns,
        // One-day certificates: inside the 14-day warning from the start.
        &w.collector_toml(
            false,
            "[enroll]\nlisten = \"127.0.0.1:8884\"\ncert_days = 1\n",
        ),
    );
    let diag = || collector.log_text();
    let tokens = enroll_create(&w, &["--count", "2", "--ttl", "1h", "--group", "finance"]);
    assert_eq!(tokens.len(), 2);
    // The tokens file keeps digests only.
    let stored = std::fs::read_to_string(w.pki.dir.join("enroll-tokens.jsonl")).unwrap();
    let secret = tokens[0].split('.').nth(2).unwrap();
    assert!(!stored.contains(secret), "a token secret was stored");
    wait_for(
        "enrollment listening",
        T,
        || {
            collector
                .log_text()
                .contains("enrollment listening")
                .then_some(())
        },
        diag,
    );

    // 1 token → 1 agent: key made here (0600), certificate for the id asked.
    let dir = w.path("ws-new-pki");
    let (ok, out) = agent_enroll(&ns, &tokens[0], "ws-new", &dir);
    assert!(ok, "{out}\n{}", diag());
    assert!(
        out.contains("enrolled as `ws-new` (groups finance)"),
        "{out}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("agent-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::read(dir.join("ca.pem")).unwrap(),
        std::fs::read(w.pki.ca()).unwrap()
    );
    let agent = w.start_agent(&ns, &agent_toml_for(&w, "ws-new", &dir), "ws-new");
    wait_for(
        "the enrolled agent's events",
        T,
        || (started(&w, "ws-new") == 1).then_some(()),
        || format!("{}\n--- agent\n{}", diag(), agent.log_text()),
    );

    // A certificate within 14 days of its end: a yellow alert, and `agents` shows when.
    let expiring = wait_for(
        "certificate-expiring alert",
        T,
        || alerts_of(&w, "builtin.fleet.certificate-expiring").pop(),
        diag,
    );
    assert_eq!(
        (expiring["level"].as_str(), expiring["agent_id"].as_str()),
        (Some("yellow"), Some("ws-new"))
    );
    let out = Command::new(weilan_bin())
        .args(["collector", "agents", "--json", "--config"])
        .arg(w.path("collector.toml"))
        .output()
        .unwrap();
    let row: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["agent_id"] == "ws-new")
        .expect("ws-new listed");
    let ends: jiff::Timestamp = row["cert_expires"].as_str().unwrap().parse().unwrap();
    let left = ends.duration_since(jiff::Timestamp::now());
    assert!(
        left > jiff::SignedDuration::from_hours(23) && left < jiff::SignedDuration::from_hours(25),
        "{row}"
    );

    // The same token again, an expired one, forged ones: refused, each said why.
    let (ok, out) = agent_enroll(&ns, &tokens[0], "ws-again", &w.path("x1"));
    assert!(!ok && out.contains("token already used"), "{out}");
    let expiring = enroll_create(&w, &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out) = agent_enroll(&ns, &expiring[0], "ws-late", &w.path("x2"));
    assert!(!ok && out.contains("token expired"), "{out}");
    let mut parts: Vec<String> = tokens[1].split('.').map(str::to_string).collect();
    parts[2] = "A".repeat(43); // same id, another secret (32 zero bytes)
    let (ok, out) = agent_enroll(&ns, &parts.join("."), "ws-forged", &w.path("x3"));
    assert!(!ok && out.contains("wrong token secret"), "{out}");
    parts[1] = "0123456789abcdef".into(); // an id never made
    let (ok, out) = agent_enroll(&ns, &parts.join("."), "ws-forged", &w.path("x4"));
    assert!(!ok && out.contains("unknown token"), "{out}");
    // A token of another collector's CA is not even answered by this one's TLS.
    let mut other_ca = tokens[1].split('.').map(str::to_string).collect::<Vec<_>>();
    other_ca[3] = "A".repeat(43);
    let (ok, out) = agent_enroll(&ns, &other_ca.join("."), "ws-x", &w.path("x5"));
    assert!(
        !ok && out.contains("did not present the CA the token names"),
        "{out}"
    );

    // An enrolled id is not taken over with a plain token, only with an admin's
    // `--replace` token, which revokes the old certificate.
    let (ok, out) = agent_enroll(&ns, &tokens[1], "ws-new", &w.path("x6"));
    assert!(!ok && out.contains("enrolled already"), "{out}");
    let replace = enroll_create(&w, &["--replace", "ws-new"]);
    let (ok, out) = agent_enroll(&ns, &replace[0], "ws-new", &w.path("ws-new-2"));
    assert!(ok, "{out}");

    let refused = wait_for(
        "enrollment-refused alerts",
        T,
        || {
            let a = alerts_of(&w, "builtin.collector.enrollment-refused");
            (a.len()
                + a.iter()
                    .map(|x| x["count"].as_u64().unwrap_or(1) as usize - 1)
                    .sum::<usize>()
                >= 5)
                .then_some(a)
        },
        diag,
    );
    println!(
        "MEASURED enrollment refusals alerted: {:?}",
        refused
            .iter()
            .map(|a| a["summary"].as_str().unwrap_or(""))
            .collect::<Vec<_>>()
    );
    drop(agent);

    // A certificate the CA signed for a name never enrolled (issued from a copy of the
    // PKI, as with a leaked CA key): its agent's batches are refused, red alert.
    let rogue_pki = w.path("rogue-pki");
    std::fs::create_dir_all(&rogue_pki).unwrap();
    for f in ["ca.pem", "ca-key.pem"] {
        std::fs::copy(w.pki.dir.join(f), rogue_pki.join(f)).unwrap();
    }
    let rogue = weilan_collector::pki::PkiPaths::new(&rogue_pki);
    let (cert, key) = weilan_collector::pki::issue_agent(&rogue, "ws-rogue").unwrap();
    let rogue_dir = w.path("ws-rogue-pki");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    std::fs::copy(cert, rogue_dir.join("agent.pem")).unwrap();
    std::fs::copy(key, rogue_dir.join("agent-key.pem")).unwrap();
    let rogue_agent = w.start_agent(&ns, &agent_toml_for(&w, "ws-rogue", &rogue_dir), "ws-rogue");
    let alert = wait_for(
        "unenrolled-certificate alert",
        T,
        // The replaced `ws-new` may have sent a heartbeat under its revoked
        // certificate before it was stopped: that is alerted by the same rule,
        // rightly, so the rogue's alert is looked for by name.
        || {
            alerts_of(&w, "builtin.integrity.unenrolled-certificate")
                .into_iter()
                .find(|a| a["agent_id"] == "ws-rogue")
        },
        || format!("{}\n--- agent\n{}", diag(), rogue_agent.log_text()),
    );
    assert_eq!(alert["level"], "red");
    assert_eq!(alert["agent_id"], "ws-rogue");
    assert_eq!(
        started(&w, "ws-rogue"),
        0,
        "nothing of the rogue agent is stored"
    );
    assert!(w.count("SELECT COUNT(*) FROM quarantine") >= 1);
    // Every refusal is counted and shown by source.
    let out = Command::new(weilan_bin())
        .args(["collector", "quarantine", "--json", "--config"])
        .arg(w.path("collector.toml"))
        .output()
        .unwrap();
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let rogue_row = listed
        .iter()
        .find(|r| r["source"] == "ws-rogue")
        .unwrap_or_else(|| panic!("ws-rogue not listed: {listed:?}"));
    assert!(rogue_row["refused"].as_i64().unwrap() >= 1, "{rogue_row}");
    assert!(
        rogue_row["last_reason"]
            .as_str()
            .unwrap()
            .contains("not enrolled"),
        "{rogue_row}"
    );

    // The replaced certificate of ws-new is revoked in the registry and in the CRL the
    // embedded broker reads: the old agent is refused at the handshake.
    let old = w.start_agent(&ns, &agent_toml_for(&w, "ws-new", &dir), "ws-new");
    wait_for(
        "the replaced certificate refused",
        T,
        || old.log_text().contains("CertificateRevoked").then_some(()),
        || format!("{}\n--- agent\n{}", diag(), old.log_text()),
    );
    assert_eq!(
        started(&w, "ws-new"),
        1,
        "only the first run of ws-new was stored"
    );
}

/// A certificate with a one-hour lifetime, 6 s before its two-thirds point: the agent
/// renews it then over the enrollment port, authenticated by it, and switches its
/// session and signatures to the new one in the middle of a 10 s burst of events;
/// nothing is lost. The collector records the renewal.
#[test]
fn a_one_hour_certificate_is_renewed_without_losing_an_event() {
    if !netns_available() {
        return;
    }
    const BURST: &str = "RENEW-BURST";
    let w = World::new();
    w.write_policy(&[]);
    let now = time::OffsetDateTime::now_utc();
    weilan_collector::pki::issue_agent_valid(
        &w.pki,
        "ws-renew",
        // Two thirds of the hour are over 6 s from now.
        now - time::Duration::minutes(40) + time::Duration::seconds(6),
        now + time::Duration::minutes(20) + time::Duration::seconds(6),
    )
    .unwrap();
    let ns = Netns::create();
    let collector = w.start_collector(
        &ns,
        &w.collector_toml(false, "[enroll]\nlisten = \"127.0.0.1:8884\"\n"),
    );
    wait_for(
        "enrollment listening",
        T,
        || {
            collector
                .log_text()
                .contains("enrollment listening")
                .then_some(())
        },
        || collector.log_text(),
    );
    let agent = w.start_agent(
        &ns,
        &w.agent_toml_with("ws-renew", "pki/ca.pem", "renew_port = 8884", ""),
        "ws-renew",
    );
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
        || (started(&w, "ws-renew") == 1).then_some(()),
        diag,
    );
    // Events recorded before, during and after the switch (10 s of them).
    {
        let sysfs = w.sysfs();
        let ns = &ns;
        std::thread::scope(|scope| {
            let h = scope.spawn(move || usb_burst_paced(ns, &sysfs, "1-9", BURST, 5000, 25));
            wait_for(
                "certificate renewed",
                T,
                || {
                    agent
                        .log_text()
                        .contains("certificate renewed")
                        .then_some(())
                },
                diag,
            );
            h.join().unwrap();
        });
    }
    let expected = 10_000;
    wait_for(
        "every burst event stored",
        Duration::from_secs(60),
        || (w.burst_count(BURST) == expected).then_some(()),
        || format!("stored {}\n{}", w.burst_count(BURST), diag()),
    );
    let renewed = w.path("state-ws-renew/identity/agent.pem");
    let der = weilan_config::pem::load_cert(&renewed).unwrap();
    let (_, not_after) = weilan_config::signing::validity(&der).unwrap();
    let days = (not_after - jiff::Timestamp::now().as_second()) / 86_400;
    let registry = std::fs::read_to_string(w.pki.dir.join("registry.jsonl")).unwrap();
    println!(
        "MEASURED renewal: 1-hour certificate renewed at its two-thirds point (during a 10 s burst) for {days} days; {} of {expected} burst events stored; reconnects {}",
        w.burst_count(BURST),
        agent.log_text().matches("MQTT connected").count()
    );
    assert!(days >= 800, "{days}");
    assert!(registry.contains("renewal of "), "{registry}");
    assert!(
        agent
            .log_text()
            .contains("reconnecting with the renewed certificate"),
        "{}",
        diag()
    );
    // Nothing signed by either certificate was refused.
    assert_eq!(w.count("SELECT COUNT(*) FROM quarantine"), 0, "{}", diag());
    // The next start uses the renewed certificate.
    drop(agent);
    let again = w.start_agent(
        &ns,
        &w.agent_toml_with("ws-renew", "pki/ca.pem", "renew_port = 8884", ""),
        "ws-renew",
    );
    wait_for(
        "the renewed certificate used at start",
        T,
        || {
            again
                .log_text()
                .contains("using the renewed certificate")
                .then_some(())
        },
        || again.log_text(),
    );
}
