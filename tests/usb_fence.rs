//! The USB fence end to end on a fake sysfs tree: a real agent (enforce mode, real
//! netlink uevents in a private namespace) writes `authorized_default`, `authorized`
//! and `remove`; the collector pushes policy versions; an invalid push is refused,
//! reported and never replaces the last good policy, which survives a restart offline.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use weilan_agent::source::usb::sysfs::fake::{add_stick, FakeStick};

const T: Duration = Duration::from_secs(60);

fn policy(version: &str, allowed: &[&str], rejected: &[&str]) -> String {
    let list = |l: &[&str]| {
        l.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut p =
        format!("version = \"{version}\"\n[usb]\nmode = \"enforce\"\ndefault_target = \"block\"\n");
    if !allowed.is_empty() {
        p.push_str(&format!(
            "[[usb.rules]]\nid = \"allow-list\"\ntarget = \"allow\"\nserial = [{}]\nvid_pid = [\"0781:5581\"]\n",
            list(allowed)
        ));
    }
    if !rejected.is_empty() {
        p.push_str(&format!(
            "[[usb.rules]]\nid = \"reject-list\"\ntarget = \"reject\"\nserial = [{}]\n",
            list(rejected)
        ));
    }
    p
}

/// Adds a storage stick to the fake tree and announces it with a real uevent.
fn hot_plug(
    ns: &Netns,
    sys: &std::path::Path,
    port: &str,
    (vid, pid): (&str, &str),
    serial: &str,
) -> std::path::PathBuf {
    let stick = add_stick(
        sys,
        &FakeStick {
            port,
            vid,
            pid,
            serial,
            classes: &[8],
            disk: None,
        },
    );
    ns.send_uevent("add", &stick, "usb", "usb_device");
    stick
}

fn decision(w: &World, serial: &str, trigger: &str) -> Option<serde_json::Value> {
    w.events(
        "usb.decision",
        "json_extract(envelope, '$.event.data.serial') = ?2 AND json_extract(envelope, '$.event.data.trigger') = ?3",
        &[serial, trigger],
    )
    .pop()
}

/// The retained message on the policy topic, as any subscriber (a recorder) gets it.
fn retained_policy(w: &World, ns: &Netns) -> Vec<u8> {
    let tls = test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.collector(), &w.pki.collector_key())),
    );
    with_mqtt_client(ns, "policy-recorder", tls, |c, mut el| {
        Box::pin(async move {
            connect(&mut el).await.expect("connect");
            c.subscribe(weilan_config::topics::POLICY, rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            loop {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = el.poll().await {
                    return p.payload.to_vec();
                }
            }
        })
    })
}

/// Publishes `payload` on the policy topic, retained, as the collector would.
fn publish_policy(w: &World, ns: &Netns, payload: Vec<u8>) {
    let tls = test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.collector(), &w.pki.collector_key())),
    );
    with_mqtt_client(ns, "policy-pusher", tls, move |c, mut el| {
        Box::pin(async move {
            connect(&mut el).await.expect("connect");
            c.publish(
                weilan_config::topics::POLICY,
                rumqttc::QoS::AtLeastOnce,
                true,
                payload,
            )
            .await
            .unwrap();
            drive_until_pubacks(&mut el, 1).await.expect("puback");
        })
    });
}

/// Waits for the policy-rejected alert about `version`: its own line, or — when an
/// earlier refusal's alert is still in its suppression window — that alert's update
/// counting `nth` refusals.
fn policy_rejected_alert(w: &World, version: &str, nth: u64, diag: impl Fn() -> String) {
    let refused = format!("refused policy {version} ");
    wait_for(
        "policy-rejected alert",
        T,
        || {
            w.alert_lines().into_iter().find(|a| {
                a["rule_id"] == "builtin.policy.rejected"
                    && (a["summary"].as_str().is_some_and(|s| s.contains(&refused)) && nth == 1
                        || a["count"].as_u64().is_some_and(|c| c >= nth))
            })
        },
        diag,
    );
}

fn event_data(w: &World, kind: &str, version: &str) -> Option<serde_json::Value> {
    w.events(
        kind,
        "json_extract(envelope, '$.event.data.version') = ?2",
        &[version],
    )
    .pop()
}

#[test]
fn fence_enforces_on_a_fake_tree_and_follows_pushed_policy() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    fs::write(w.path("policy.toml"), policy("v1", &[], &["EVIL-1"])).unwrap();
    let sys = w.sysfs();
    let present = add_stick(
        &sys,
        &FakeStick {
            port: "1-1",
            vid: "0781",
            pid: "5581",
            serial: "FAKE-1",
            classes: &[8],
            disk: None,
        },
    );
    let hub = sys.join("devices/pci0000:00/0000:00:14.0/usb1");
    let attr = |devpath: &std::path::Path, a: &str| {
        fs::read_to_string(sys.join(devpath.strip_prefix("/").unwrap()).join(a)).unwrap_or_default()
    };
    let ns = Netns::create();
    let collector = w.start_collector(&ns, &w.collector_toml(false, ""));
    let cfg = w.agent_toml(AGENT, "pki/ca.pem", "");
    let mut agent = w.start_agent(&ns, &cfg, AGENT);
    let diag = || {
        format!(
            "--- agent\n{}\n--- collector\n{}",
            agent.log_text(),
            collector.log_text()
        )
    };

    // Start: default-deny on the root hub, the present stick decided by the implicit default.
    let d = wait_for(
        "start decision",
        T,
        || decision(&w, "FAKE-1", "start"),
        diag,
    );
    assert_eq!(
        (
            d["target"].as_str(),
            d["rule_id"].as_str(),
            d["enforced"].as_bool()
        ),
        (Some("block"), Some("implicit default"), Some(true)),
        "{d}"
    );
    assert_eq!(
        fs::read_to_string(hub.join("authorized_default")).unwrap(),
        "0"
    );
    assert_eq!(attr(&present, "authorized"), "0");

    // Hot-plug through a real uevent: a rejected serial is deauthorized and removed.
    let evil = hot_plug(&ns, &sys, "1-2", ("abcd", "0001"), "EVIL-1");
    let d = wait_for(
        "reject decision",
        T,
        || decision(&w, "EVIL-1", "attach"),
        diag,
    );
    assert_eq!(
        (d["target"].as_str(), d["rule_id"].as_str()),
        (Some("reject"), Some("reject-list"))
    );
    assert_eq!(
        (
            attr(&evil, "authorized").as_str(),
            attr(&evil, "remove").as_str()
        ),
        ("0", "1")
    );
    assert!(
        d["latency_us"].as_u64().is_some(),
        "hot-plug decisions carry their latency: {d}"
    );

    // Record the collector's signed v1 push, as anyone on the network could.
    wait_for(
        "v1 from the collector",
        T,
        || {
            w.events(
                "policy.applied",
                "json_extract(envelope, '$.event.data.source') = 'collector'",
                &[],
            )
            .pop()
        },
        diag,
    );
    let recorded_v1 = retained_policy(&w, &ns);

    // The collector's policy file changes: the new version reaches the agent and the
    // present device is re-decided.
    fs::write(
        w.path("policy.toml"),
        policy("v2", &["FAKE-1"], &["EVIL-1"]),
    )
    .unwrap();
    let applied = wait_for(
        "policy v2 applied",
        T,
        || event_data(&w, "policy.applied", "v2"),
        diag,
    );
    assert_eq!(
        (applied["source"].as_str(), applied["previous"].as_str()),
        (Some("collector"), Some("v1"))
    );
    let d = wait_for(
        "re-decision",
        T,
        || decision(&w, "FAKE-1", "policy-change"),
        diag,
    );
    assert_eq!(
        (
            d["target"].as_str(),
            d["rule_id"].as_str(),
            d["policy_version"].as_str()
        ),
        (Some("allow"), Some("allow-list"), Some("v2"))
    );
    assert_eq!(attr(&present, "authorized"), "1");

    // Replaying the recorded v1 push (validly signed, older release) rolls nothing back:
    // refused, reported, alerted; v2 stays.
    publish_policy(&w, &ns, recorded_v1);
    let replay = wait_for(
        "replayed v1 refused",
        T,
        || event_data(&w, "policy.rejected", "v1"),
        diag,
    );
    assert!(
        replay["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("replayed or rolled-back policy: release"),
        "{replay}"
    );
    assert_eq!(replay["kept"], "v2");
    assert_eq!(attr(&present, "authorized"), "1", "still enforcing v2");

    // The file edited without touching its `version` label: still a new release that
    // the agent applies (it used to be published and ignored).
    let v2_serial = applied["serial"]
        .as_u64()
        .expect("a collector release has a serial");
    let edited_at = std::time::Instant::now();
    fs::write(
        w.path("policy.toml"),
        policy("v2", &["FAKE-1", "FAKE-2"], &["EVIL-1"]),
    )
    .unwrap();
    let edited = wait_for(
        "edited v2 applied within 10 s",
        Duration::from_secs(10),
        || {
            w.events(
                "policy.applied",
                &format!("json_extract(envelope, '$.event.data.version') = 'v2' AND json_extract(envelope, '$.event.data.serial') > {v2_serial}"),
                &[],
            )
            .pop()
        },
        diag,
    );
    println!(
        "MEASURED policy edited without a version change: applied by the agent after {} ms (release {} -> {})",
        edited_at.elapsed().as_millis(),
        v2_serial,
        edited["serial"]
    );
    policy_rejected_alert(&w, "v1", 1, diag);

    // An invalid policy pushed (validly signed, newer release) is refused with every
    // error; v2 stays.
    let signer =
        weilan_config::signing::Signer::from_pem_files(&w.pki.collector(), &w.pki.collector_key())
            .unwrap();
    let bad_text = "version = \"v3-bad\"\n[usb]\nmode = \"loud\"\n[[usb.rules]]\nid = \"x\"\ntarget = \"explode\"\n";
    let bad = weilan_config::wire::PolicyPush {
        version: "v3-bad".into(),
        policy_toml: bad_text.into(),
        serial: edited["serial"].as_u64().unwrap() + 1,
        issued_at: jiff::Timestamp::now().to_string(),
        sha256: weilan_config::wire::PolicyPush::digest(bad_text),
    };
    let payload = serde_json::to_vec(&signer.sign(
        weilan_config::wire::Purpose::Policy,
        serde_json::to_string(&bad).unwrap(),
    ))
    .unwrap();
    publish_policy(&w, &ns, payload);
    let rejected = wait_for(
        "policy rejected",
        T,
        || event_data(&w, "policy.rejected", "v3-bad"),
        diag,
    );
    let errors = rejected["errors"].as_array().unwrap();
    assert!(errors.len() >= 2, "all errors listed: {rejected}");
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("usb.mode")),
        "{rejected}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("usb.rules[0].target")),
        "{rejected}"
    );
    assert_eq!(rejected["kept"], "v2");
    assert_eq!(attr(&present, "authorized"), "1", "still enforcing v2");
    policy_rejected_alert(&w, "v3-bad", 2, diag);

    // Offline restart: the agent enforces the last good policy (v2), not its file.
    drop(collector);
    agent.stop();
    fs::write(w.path("policy.toml"), policy("v1", &[], &["EVIL-1"])).unwrap(); // the agent's own file
    fs::write(present_attr_path(&sys, &present), "0").unwrap(); // as after a reboot with default-deny
    let agent = w.start_agent(&ns, &cfg, AGENT);
    wait_for(
        "re-authorized by the last good policy",
        T,
        || (attr(&present, "authorized") == "1").then_some(()),
        || agent.log_text(),
    );
    println!("fence on a fake tree: default-deny, block, reject+remove, policy v2 pushed and applied, v3-bad refused, v2 kept across an offline restart");
}

fn present_attr_path(sys: &std::path::Path, devpath: &std::path::Path) -> std::path::PathBuf {
    sys.join(devpath.strip_prefix("/").unwrap())
        .join("authorized")
}

/// A collector and an agent in a private namespace, with one fake stick present.
struct FenceWorld {
    w: World,
    ns: Netns,
    stick: std::path::PathBuf,
    collector_cfg: std::path::PathBuf,
    agent_cfg: std::path::PathBuf,
    collector: Proc,
    agent: Proc,
}

impl FenceWorld {
    fn start(policy_text: &str, serial: &str) -> FenceWorld {
        Self::start_with(policy_text, serial, "")
    }

    /// Like [`FenceWorld::start`], with extra collector settings.
    fn start_with(policy_text: &str, serial: &str, collector_extra: &str) -> FenceWorld {
        let w = World::new();
        fs::write(w.path("policy.toml"), policy_text).unwrap();
        let stick = add_stick(
            &w.sysfs(),
            &FakeStick {
                port: "1-1",
                vid: "0781",
                pid: "5581",
                serial,
                classes: &[8],
                disk: None,
            },
        );
        let ns = Netns::create();
        let collector_cfg = w.collector_toml(false, collector_extra);
        let collector = w.start_collector(&ns, &collector_cfg);
        let agent_cfg = w.agent_toml(AGENT, "pki/ca.pem", "");
        let agent = w.start_agent(&ns, &agent_cfg, AGENT);
        FenceWorld {
            w,
            ns,
            stick,
            collector_cfg,
            agent_cfg,
            collector,
            agent,
        }
    }

    /// A sysfs attribute of the fake stick.
    fn authorized(&self) -> String {
        fs::read_to_string(
            self.w
                .sysfs()
                .join(self.stick.strip_prefix("/").unwrap())
                .join("authorized"),
        )
        .unwrap_or_default()
    }

    fn diag(&self) -> String {
        format!(
            "--- agent\n{}\n--- collector\n{}",
            self.agent.log_text(),
            self.collector.log_text()
        )
    }
}

fn unlock_events(w: &World, status: &str) -> Vec<serde_json::Value> {
    w.events(
        "usb.unlock",
        "json_extract(envelope, '$.event.data.status') = ?2",
        &[status],
    )
}

#[test]
fn temporary_unlock_tokens_are_bound_single_use_and_expire() {
    if !netns_available() {
        return;
    }
    let mut fw = FenceWorld::start(&policy("u1", &[], &[]), "LOCKED-1");
    let (w, ns) = (&fw.w, &fw.ns);
    weilan_collector::pki::issue_agent(&w.pki, "ws-other").unwrap();
    let authorized = || fw.authorized();
    let (ccfg, cfg) = (fw.collector_cfg.clone(), fw.agent_cfg.clone());
    let diag = || fw.diag();
    wait_for(
        "blocked at start",
        T,
        || decision(w, "LOCKED-1", "start"),
        diag,
    );
    assert_eq!(authorized(), "0");

    let weilan = |args: &[&str]| {
        let out = std::process::Command::new(weilan_bin())
            .args(args)
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
    };
    let ccfg = ccfg.to_string_lossy().into_owned();
    let cfg = cfg.to_string_lossy().into_owned();
    let token = w.path("token.json").to_string_lossy().into_owned();

    // A serial alone is no identity: the collector will not issue such a token, and
    // the agent refuses one (signed all the same).
    let serial_only = w.path("serial-only.json").to_string_lossy().into_owned();
    let (ok, text) = weilan(&[
        "collector",
        "unlock",
        "--config",
        &ccfg,
        "--agent",
        AGENT,
        "--serial",
        "LOCKED-1",
        "--reason",
        "x",
        "--out",
        &serial_only,
    ]);
    assert!(
        !ok && text.contains("a serial alone is not a device's identity"),
        "{text}"
    );
    let signer =
        weilan_config::signing::Signer::from_pem_files(&w.pki.collector(), &w.pki.collector_key())
            .unwrap();
    let now = jiff::Timestamp::now();
    let bare = weilan_config::wire::UnlockToken {
        token_id: "5e1a10ee".into(),
        agent_id: AGENT.into(),
        device_hash: None,
        serial: Some("LOCKED-1".into()),
        vid_pid: None,
        mode: "allow".into(),
        not_before: now,
        not_after: now + jiff::SignedDuration::from_secs(60),
        reason: "serial only".into(),
    };
    let signed = signer.sign(
        weilan_config::wire::Purpose::Unlock,
        serde_json::to_string(&bare).unwrap(),
    );
    fs::write(&serial_only, serde_json::to_vec(&signed).unwrap()).unwrap();
    let (ok, text) = weilan(&["agent", "unlock", "--config", &cfg, "--token", &serial_only]);
    assert!(
        !ok && text.contains("a serial alone is not a device's identity"),
        "{text}"
    );

    // Offline path: issued to a file, handed to the agent with `weilan agent unlock`.
    let (ok, text) = weilan(&[
        "collector",
        "unlock",
        "--config",
        &ccfg,
        "--agent",
        AGENT,
        "--serial",
        "LOCKED-1",
        "--vid-pid",
        "0781:5581",
        "--seconds",
        "8",
        "--reason",
        "ticket 42: auditor copy",
        "--out",
        &token,
    ]);
    assert!(ok, "{text}");
    let (ok, text) = weilan(&["agent", "unlock", "--config", &cfg, "--token", &token]);
    assert!(ok, "{text}");
    let d = wait_for("unlocked", T, || decision(w, "LOCKED-1", "unlock"), diag);
    assert!(d["rule_id"].as_str().unwrap().starts_with("unlock:"), "{d}");
    assert_eq!(d["target"], "allow");
    assert_eq!(authorized(), "1");
    assert!(
        d["reason"].as_str().unwrap().contains("ticket 42"),
        "the use is audited with its reason: {d}"
    );

    // A clone with the same serial and another vid:pid is not unlocked.
    hot_plug(ns, &w.sysfs(), "1-3", ("abcd", "0001"), "LOCKED-1");
    let clone = wait_for(
        "the clone decided",
        T,
        || decision(w, "LOCKED-1", "attach"),
        diag,
    );
    assert_eq!(
        (
            clone["target"].as_str(),
            clone["rule_id"].as_str(),
            clone["vid"].as_str()
        ),
        (Some("block"), Some("implicit default"), Some("abcd")),
        "{clone}"
    );

    // Single use: the same token again is refused (by the CLI, and by the agent).
    let (ok, text) = weilan(&["agent", "unlock", "--config", &cfg, "--token", &token]);
    assert!(!ok && text.contains("already used"), "{text}");

    // Bound to one agent: a token for another agent is refused.
    let other = w.path("other.json").to_string_lossy().into_owned();
    let (ok, _) = weilan(&[
        "collector",
        "unlock",
        "--config",
        &ccfg,
        "--agent",
        "ws-other",
        "--serial",
        "LOCKED-1",
        "--vid-pid",
        "0781:5581",
        "--reason",
        "x",
        "--out",
        &other,
    ]);
    assert!(ok);
    let (ok, text) = weilan(&["agent", "unlock", "--config", &cfg, "--token", &other]);
    assert!(!ok && text.contains("is for agent `ws-other`"), "{text}");

    // A forged token (body edited after signing) is refused.
    let mut forged: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&token).unwrap()).unwrap();
    forged["body"] = serde_json::Value::String(
        forged["body"]
            .as_str()
            .unwrap()
            .replace("LOCKED-1", "OTHER-9"),
    );
    let forged_path = w.path("forged.json");
    fs::write(&forged_path, forged.to_string()).unwrap();
    let (ok, text) = weilan(&[
        "agent",
        "unlock",
        "--config",
        &cfg,
        "--token",
        forged_path.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("signature"), "{text}");

    // Expiry: on time, the device falls back to the policy (block).
    let d = wait_for(
        "expired",
        T,
        || decision(w, "LOCKED-1", "unlock-expired"),
        diag,
    );
    assert_eq!(
        (d["target"].as_str(), d["rule_id"].as_str()),
        (Some("block"), Some("implicit default"))
    );
    assert_eq!(authorized(), "0");
    assert_eq!(unlock_events(w, "expired").len(), 1);

    // Online path: sent by the collector as a signed command; read-only this time.
    let out = ns
        .command(weilan_bin())
        .args([
            "collector",
            "unlock",
            "--config",
            &ccfg,
            "--agent",
            AGENT,
            "--serial",
            "LOCKED-1",
            "--vid-pid",
            "0781:5581",
            "--mode",
            "read-only",
            "--seconds",
            "60",
            "--reason",
            "ticket 43",
            "--send",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "unlocked by command",
        T,
        || {
            unlock_events(w, "accepted")
                .into_iter()
                .find(|e| e["via"] == "command")
        },
        diag,
    );
    wait_for(
        "read-only by unlock",
        T,
        || decision(w, "LOCKED-1", "unlock").filter(|d| d["target"] == "read-only"),
        diag,
    );
    assert_eq!(authorized(), "1");

    // An agent restarted inside the window keeps the unlock (it used to be lost).
    fw.agent.stop();
    fw.agent = fw.w.start_agent(&fw.ns, &fw.agent_cfg, AGENT);
    let w = &fw.w;
    let diag = || fw.diag();
    wait_for(
        "unlock restored after the restart",
        T,
        || unlock_events(w, "restored").pop(),
        diag,
    );
    let d = wait_for(
        "decided by the restored unlock at start",
        T,
        || {
            w.events(
                "usb.decision",
                "json_extract(envelope, '$.event.data.serial') = ?2 \
                 AND json_extract(envelope, '$.event.data.trigger') = 'start' \
                 AND json_extract(envelope, '$.event.data.rule_id') LIKE 'unlock:%'",
                &["LOCKED-1"],
            )
            .pop()
        },
        diag,
    );
    assert_eq!(d["target"], "read-only", "{d}");
    println!("unlock tokens: offline file and online command applied, reuse/other-agent/forged/serial-only refused, a clone not unlocked, kept across a restart, expiry on time");
}

/// Waits for the fence's decision to block `serial` on a command, and checks it.
fn blocked_by_command(w: &World, serial: &str, diag: impl Fn() -> String) -> serde_json::Value {
    let d = wait_for(
        "blocked by command",
        T,
        || decision(w, serial, "command"),
        diag,
    );
    assert_eq!(d["target"], "block", "{d}");
    assert!(
        d["rule_id"].as_str().unwrap().starts_with("command:"),
        "{d}"
    );
    d
}

/// The first executed command's result, once it is there.
fn executed_result(w: &World, diag: impl Fn() -> String) -> serde_json::Value {
    wait_for(
        "command.result executed",
        T,
        || {
            command_results(w)
                .into_iter()
                .find(|r| r["status"] == "executed")
        },
        diag,
    )
}

fn command_results(w: &World) -> Vec<serde_json::Value> {
    w.events("command.result", "1", &[])
}

#[test]
fn commands_are_authenticated_fresh_and_never_replayed() {
    if !netns_available() {
        return;
    }
    let fw = FenceWorld::start(&policy("c1", &["CMD-1"], &[]), "CMD-1");
    let (w, ns) = (&fw.w, &fw.ns);
    let authorized = || fw.authorized();
    let diag = || fw.diag();
    let d = wait_for(
        "allowed at start",
        T,
        || decision(w, "CMD-1", "start"),
        diag,
    );
    assert_eq!(authorized(), "1");
    let hash = d["hash"].as_str().unwrap().to_string();

    // A valid block command from the collector blocks the device.
    send_command(&fw, &["block-device", "--hash", &hash]);
    blocked_by_command(w, "CMD-1", diag);
    assert_eq!(authorized(), "0");
    let executed = executed_result(w, diag);
    let used_seq = executed["seq"].as_u64().unwrap();
    // The command went out through the running collector: the command line never
    // connected as `weilan-collector`, which would have taken the collector's
    // session over and, through its last will, told the agent nobody listens.
    let (collector_log, agent_log) = (fw.collector.log_text(), fw.agent.log_text());
    assert_eq!(
        collector_log
            .matches("collector subscribed to agent topics")
            .count(),
        1,
        "the collector kept its one broker session:\n{collector_log}"
    );
    assert!(
        !agent_log.contains("collector offline"),
        "the agent never heard the collector go offline:\n{agent_log}"
    );

    // Forged, replayed, expired, misaddressed, agent-signed: all refused, each reported.
    let collector_signer =
        weilan_config::signing::Signer::from_pem_files(&w.pki.collector(), &w.pki.collector_key())
            .unwrap();
    let agent_signer = weilan_config::signing::Signer::from_pem_files(
        &w.pki.agent(AGENT),
        &w.pki.agent_key(AGENT),
    )
    .unwrap();
    let now = jiff::Timestamp::now();
    let cmd = |agent: &str, seq: u64, expires: jiff::Timestamp| {
        serde_json::to_string(&weilan_config::wire::Command {
            agent_id: agent.into(),
            seq,
            issued_at: now,
            expires_at: expires,
            reason: "test".into(),
            action: weilan_config::wire::CommandAction::SetDeviceReadOnly {
                device_hash: hash.clone(),
            },
        })
        .unwrap()
    };
    let later = now + jiff::SignedDuration::from_secs(600);
    let earlier = now - jiff::SignedDuration::from_secs(1);
    let purpose = weilan_config::wire::Purpose::Command;
    let mut forged = collector_signer.sign(purpose, cmd(AGENT, used_seq + 10, later));
    forged.body = forged.body.replace("\"test\"", "\"tampered\"");
    let cases = [
        (
            "replayed",
            collector_signer.sign(purpose, cmd(AGENT, used_seq, later)),
        ),
        ("signature", forged),
        (
            "expired",
            collector_signer.sign(purpose, cmd(AGENT, used_seq + 20, earlier)),
        ),
        (
            "addressed to agent `ws-other`",
            collector_signer.sign(purpose, cmd("ws-other", used_seq + 30, later)),
        ),
        (
            "signature",
            agent_signer.sign(purpose, cmd(AGENT, used_seq + 40, later)),
        ),
    ];
    let expected: Vec<&str> = cases.iter().map(|(why, _)| *why).collect();
    let payloads: Vec<Vec<u8>> = cases
        .iter()
        .map(|(_, m)| serde_json::to_vec(m).unwrap())
        .collect();
    let n = payloads.len();
    let tls = test_client_tls(
        &w.pki.ca(),
        Some((&w.pki.collector(), &w.pki.collector_key())),
    );
    let topic = format!("weilan/v1/agents/{AGENT}/commands");
    with_mqtt_client(ns, "attacker", tls, move |c, mut el| {
        Box::pin(async move {
            connect(&mut el).await.expect("connect");
            for p in payloads {
                c.publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, p)
                    .await
                    .unwrap();
            }
            drive_until_pubacks(&mut el, n).await.expect("pubacks");
        })
    });
    let rejected = wait_for(
        "five rejections",
        T,
        || {
            let r: Vec<_> = command_results(w)
                .into_iter()
                .filter(|r| r["status"] == "rejected")
                .collect();
            (r.len() == 5).then_some(r)
        },
        diag,
    );
    for (r, why) in rejected.iter().zip(expected) {
        assert!(
            r["detail"].as_str().unwrap().contains(why),
            "expected `{why}`: {r}"
        );
    }
    // None of them changed anything: the device is still blocked by the real command.
    assert_eq!(authorized(), "0");
    assert!(decision(w, "CMD-1", "command").is_some_and(|d| d["target"] == "block"));
    println!("commands: a valid block command executed; replayed, forged, expired, misaddressed and agent-signed commands refused and reported");
}

const BLOCKING_RULE: &str = r#"
[[rule]]
id = "site.block-rule-sticks"
title = "Sticks named RULE-* are blocked by the collector"
level = "red"
tags = ["test"]
on = ["usb.attached"]
condition = "event.data.serial != null && event.data.serial.startsWith('RULE-')"
key = "agent.id + '/' + event.data.hash"
summary = "blocking {event.data.serial} on {agent.id}"
[[rule.actions]]
type = "block-device"
target = "event.data.hash"
valid = "2m"
"#;

#[test]
fn rules_hot_reload_refuses_a_broken_file_and_a_rule_blocks_a_device() {
    if !netns_available() {
        return;
    }
    let fw = FenceWorld::start_with(
        &policy("r1", &["CMD-1", "RULE-2"], &[]),
        "CMD-1",
        "[rules]\ndir = \"rules\"\nreload_check_secs = 1\n",
    );
    let (w, ns) = (&fw.w, &fw.ns);
    let diag = || fw.diag();
    wait_for(
        "allowed at start",
        T,
        || decision(w, "CMD-1", "start"),
        diag,
    );
    let rules = w.path("rules");
    fs::create_dir_all(&rules).unwrap();

    // 1. A good rule file is picked up while the collector runs.
    fs::write(rules.join("site.toml"), BLOCKING_RULE).unwrap();
    wait_for(
        "rule set reloaded",
        T,
        || {
            fw.collector
                .log_text()
                .contains("rule set reloaded")
                .then_some(())
        },
        diag,
    );

    // 2. A broken edit is refused with file:line, and the rules in force stay.
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(
        rules.join("site.toml"),
        BLOCKING_RULE.replace("startsWith('RULE-')", "startsWith('RULE-') &&"),
    )
    .unwrap();
    let refused = wait_for(
        "rules-invalid alert",
        T,
        || {
            w.alert_lines()
                .into_iter()
                .find(|a| a["rule_id"] == "builtin.collector.rules-invalid")
        },
        diag,
    );
    let summary = refused["summary"].as_str().unwrap();
    let line = BLOCKING_RULE
        .lines()
        .position(|l| l.starts_with("condition"))
        .unwrap()
        + 1;
    assert!(
        summary.contains(&format!("site.toml:{line}:")) && summary.contains("CEL"),
        "{summary}"
    );

    // 3. The old rule still acts: a RULE-* stick (allowed by the policy) is blocked by
    //    a signed command the rule sent, executed by the real agent on the fake tree.
    let stick = hot_plug(ns, &w.sysfs(), "1-3", ("0781", "5581"), "RULE-2");
    let allowed = wait_for(
        "allowed by policy",
        T,
        || decision(w, "RULE-2", "attach"),
        diag,
    );
    assert_eq!(allowed["target"], "allow", "{allowed}");
    let blocked = blocked_by_command(w, "RULE-2", diag);
    assert!(
        blocked["reason"]
            .as_str()
            .unwrap()
            .contains("rule site.block-rule-sticks"),
        "{blocked}"
    );
    assert_eq!(
        fs::read_to_string(present_attr_path(&w.sysfs(), &stick)).unwrap_or_default(),
        "0"
    );
    let alert = w
        .alert_lines()
        .into_iter()
        .find(|a| a["rule_id"] == "site.block-rule-sticks")
        .expect("the rule's alert");
    assert_eq!(alert["summary"], "blocking RULE-2 on ws-e2e");
    let executed = executed_result(w, diag);
    assert_eq!(executed["action"], "block-device");

    // 4. An invalid policy file on the collector is a finding the rules alert on.
    fs::write(
        w.path("policy.toml"),
        "version = \"r2\"\n[usb]\nmode = \"sometimes\"\n",
    )
    .unwrap();
    let invalid = wait_for(
        "policy-invalid alert",
        T,
        || {
            w.alert_lines()
                .into_iter()
                .find(|a| a["rule_id"] == "builtin.collector.policy-invalid")
        },
        diag,
    );
    assert!(
        invalid["summary"]
            .as_str()
            .unwrap()
            .contains("agents keep policy r1"),
        "{invalid}"
    );
    println!("rules: a broken edit refused at {summary:.80}...; the previous rule blocked RULE-2 by a signed command");
}

fn send_command(fw: &FenceWorld, args: &[&str]) {
    collector_command(
        fw.ns.command(weilan_bin()),
        fw.collector_cfg.to_str().unwrap(),
        AGENT,
        args,
    );
}

/// The `n`-th command.result (in arrival order) once it is there.
fn nth_result(fw: &FenceWorld, n: usize) -> serde_json::Value {
    wait_for(
        "command.result",
        T,
        || command_results(&fw.w).into_iter().nth(n),
        || fw.diag(),
    )
}

#[test]
fn quarantine_and_kill_commands_check_what_they_act_on() {
    if !netns_available() {
        return;
    }
    let evidence = tempfile::tempdir().unwrap();
    let text = format!(
        "{}[files]\nevidence_dir = \"{}\"\n",
        policy("q1", &["CMD-1"], &[]),
        evidence.path().join("store").display()
    );
    let fw = FenceWorld::start(&text, "CMD-1");
    let diag = || fw.diag();
    wait_for("agent up", T, || decision(&fw.w, "CMD-1", "start"), diag);
    let victim = fw.w.path("secret.txt");
    fs::write(&victim, "机密 report\n").unwrap();
    let sha = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        "机密 report\n".as_bytes(),
    ));
    let path = victim.to_str().unwrap();

    // A stale hash (the file changed since the alert): refused, the file stays.
    send_command(
        &fw,
        &[
            "quarantine-file",
            "--path",
            path,
            "--sha256",
            &"0".repeat(64),
        ],
    );
    let r = nth_result(&fw, 0);
    assert_eq!(
        (r["status"].as_str(), r["action"].as_str()),
        (Some("rejected"), Some("quarantine-file")),
        "{r}"
    );
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .contains("changed since it was judged"),
        "{r}"
    );
    assert!(victim.exists());

    // The right hash: moved into the evidence store (0600 copy, same content).
    send_command(&fw, &["quarantine-file", "--path", path, "--sha256", &sha]);
    let r = nth_result(&fw, 1);
    assert_eq!(r["status"], "executed", "{r}");
    assert!(!victim.exists(), "the file left its place");
    let kept: Vec<_> = fs::read_dir(evidence.path().join("store"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_none_or(|e| e != "json"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(fs::read_to_string(&kept[0]).unwrap(), "机密 report\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&kept[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // kill-process: a pid that runs something else is left alone; the named one ends.
    let mut child = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    send_command(
        &fw,
        &["kill-process", "--pid", &pid, "--exe", "/usr/bin/not-sleep"],
    );
    let r = nth_result(&fw, 2);
    assert_eq!(r["status"], "rejected", "{r}");
    assert!(child.try_wait().unwrap().is_none(), "still running");
    send_command(
        &fw,
        &[
            "kill-process",
            "--pid",
            &pid,
            "--exe",
            exe.to_str().unwrap(),
        ],
    );
    let r = nth_result(&fw, 3);
    assert_eq!(r["status"], "executed", "{r}");
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    println!("commands: quarantine-file refused a stale hash and kept the right file as evidence; kill-process refused a wrong executable and ended the right one");
}
