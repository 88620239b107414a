//! Server-room access on a real kernel: in a QEMU guest a door board agent (`door`
//! role) holds a badge reader — a USB HID keyboard emulated with the in-guest gadget
//! (dummy_hcd + usb_f_hid, read through the guest's own usbhid/hid-generic/evdev) —
//! and a server-room agent watches USB storage, both at site `hq-dc` and both
//! delivering over mutual TLS to a collector on the host. Checked:
//!
//! - a swiped card arrives as `access.badge` with the keyed hash and last four
//!   digits, and the raw number is nowhere in the collector's database or alert log;
//! - while the agent holds the reader, another reader of the same input device (as
//!   the console's keyboard handler is) receives nothing; once the agent is gone the
//!   same reader does receive the keys (so the check can fail);
//! - a stick plugged into the server-room host with nobody badged in raises the red
//!   `builtin.usb.server-room` naming the host and the site; after a badge-in, a
//!   second stick does not.
//!
//! Prepare once with `tests/hil/prepare.sh` (CI's `.ci/run` does); without the guest or
//! the static agent the test prints `SKIPPED:` and passes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);
const SITE: &str = "hq-dc";
const SERVER: &str = "srv-dc-1";
const DOOR: &str = "door-dc-east";
const BADGE_KEY: &str = "hq-dc badge key, 32 bytes long..";
const CARD: &str = "0012345678";

/// The server-room host enforces: unknown sticks are blocked, the site's badge reader
/// model is allowed (it is a keyboard; a default-deny would refuse it too).
const POLICY: &str = r#"
version = "hil-access-1"
[usb]
mode = "enforce"
default_target = "block"
present_at_start = "apply"

[[usb.rules]]
id = "badge-readers"
target = "allow"
vid_pid = ["0c27:3bfa"]
"#;

fn agent_toml(name: &str, role: &str, port: u16, extra: &str) -> String {
    format!(
        "[agent]\nhost_role = \"{role}\"\nsite = \"{SITE}\"\nstate_dir = \"/root/state-{name}\"\npolicy = \"/hil/files/policy.toml\"\n\
         [collector]\nhost = \"10.0.2.2\"\nport = {port}\nca = \"/hil/files/ca.pem\"\nack_timeout_secs = 5\n\
         [tls]\ncert = \"/hil/files/{name}.pem\"\nkey = \"/hil/files/{name}-key.pem\"\n\
         [heartbeat]\ninterval_secs = 5\n[log]\nlevel = \"info\"\n{extra}"
    )
}

fn expected_hash(card: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, BADGE_KEY.as_bytes());
    hex::encode(ring::hmac::sign(&key, card.as_bytes()).as_ref())
}

fn server_room_alerts(w: &World, serial: &str) -> Vec<serde_json::Value> {
    w.alert_lines()
        .into_iter()
        .filter(|a| {
            a["rule_id"] == "builtin.usb.server-room"
                && a["details"]["event"]["serial"].as_str() == Some(serial)
        })
        .collect()
}

#[test]
fn badge_reader_and_server_room_correlation_on_a_real_kernel() {
    let Some(hil) = Hil::prepared("real-kernel server-room access test") else {
        return;
    };
    let w = World::new();
    for name in [SERVER, DOOR] {
        weilan_collector::pki::issue_agent(&w.pki, name).expect("issue agent");
    }
    std::fs::write(w.path("policy.toml"), POLICY).unwrap();
    let (collector, port, _) = start_collector_for_guest(&w);

    let stage = w.path("guest");
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::copy(w.pki.ca(), stage.join("ca.pem")).unwrap();
    std::fs::copy(w.path("policy.toml"), stage.join("policy.toml")).unwrap();
    for name in [SERVER, DOOR] {
        std::fs::copy(w.pki.agent(name), stage.join(format!("{name}.pem"))).unwrap();
        std::fs::copy(w.pki.agent_key(name), stage.join(format!("{name}-key.pem"))).unwrap();
    }
    std::fs::write(stage.join("badge.key"), BADGE_KEY).unwrap();
    std::fs::write(
        stage.join("server.toml"),
        agent_toml(
            SERVER,
            "server-room",
            port,
            "[network]\nenabled = false\n[access]\nenabled = false\n",
        ),
    )
    .unwrap();
    std::fs::write(
        stage.join("door.toml"),
        agent_toml(
            DOOR,
            "door",
            port,
            "[usb]\nenabled = false\n[files]\nenabled = false\n[network]\nenabled = false\n[access]\nenabled = false\n\
             [door]\nbadge_key = \"/root/badge.key\"\n[[door.readers]]\nname = \"dc-east\"\ndevice = \"usb:0c27:3bfa\"\n",
        ),
    )
    .unwrap();
    let mut args: Vec<String> = vec!["--gadget".into()];
    let mut put = |p: &Path| {
        args.push("--put".into());
        args.push(p.display().to_string());
    };
    for f in [
        "ca.pem",
        "policy.toml",
        "badge.key",
        "server.toml",
        "door.toml",
        &format!("{SERVER}.pem"),
        &format!("{SERVER}-key.pem"),
        &format!("{DOOR}.pem"),
        &format!("{DOOR}-key.pem"),
    ] {
        put(&stage.join(f));
    }
    put(&static_agent());
    put(&hil.scripts.join("guest-badge-reader.sh"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    hil.boot(&argv);
    let (rc, text) = hil.gexec(
        "cp /hil/files/badge.key /root/badge.key && chmod 600 /root/badge.key && cd /root && \
         (/hil/files/weilan-agent run --config /hil/files/server.toml >/hil/out/server.log 2>&1 &) && \
         (/hil/files/weilan-agent run --config /hil/files/door.toml >/hil/out/door.log 2>&1 &)",
    );
    assert_eq!(rc, 0, "agents start: {text}");
    let guest_logs = || {
        let read = |n: &str| {
            std::fs::read_to_string(hil.run.join("share/out").join(n)).unwrap_or_default()
        };
        format!(
            "--- server (guest)\n{}\n--- door (guest)\n{}\n--- collector\n{}",
            read("server.log"),
            read("door.log"),
            collector.log_text()
        )
    };
    wait_for(
        "agent.started from both guest agents",
        T,
        || {
            (w.count("SELECT COUNT(DISTINCT agent_id) FROM events WHERE kind = 'agent.started'")
                == 2)
                .then_some(())
        },
        guest_logs,
    );
    let stick = hil.out.join("stick1.img").display().to_string();

    // 1. A stick with nobody badged in: red, naming the host and the site.
    let (rc, text) = hil.sh("gplug.sh", &[&stick, "NOBADGE-1", "--copy", "--nowait"]);
    assert_eq!(rc, 0, "gadget bound: {text}");
    let red = wait_for(
        "red alert for the stick plugged with nobody badged in",
        T,
        || server_room_alerts(&w, "NOBADGE-1").into_iter().next(),
        guest_logs,
    );
    assert_eq!(red["level"], "red", "{red}");
    assert_eq!(red["agent_id"], SERVER, "{red}");
    let summary = red["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("server-room host {SERVER} at site {SITE}")),
        "{summary}"
    );
    println!("MEASURED no badge: red alert: {summary}");

    // 2. The badge reader: plugged, allowed by the policy, held by the door agent.
    let (rc, node) = hil.gexec("sh /hil/files/guest-badge-reader.sh plug");
    assert_eq!(rc, 0, "badge reader gadget: {node}\n{}", guest_logs());
    let node = node.trim().lines().last().unwrap().to_string();
    wait_for(
        "the door agent holds the reader",
        T,
        || {
            std::fs::read_to_string(hil.run.join("share/out/door.log"))
                .unwrap_or_default()
                .contains("badge reader grabbed")
                .then_some(())
        },
        guest_logs,
    );
    // Another reader of the same device, started before the swipe: it stands for the
    // console's keyboard handler, which the grab shuts out the same way.
    let (rc, text) = hil.gexec(&format!(
        "(cat {node} > /tmp/spy.bin &) ; sleep 0.3; echo started"
    ));
    assert_eq!(rc, 0, "{text}");
    let (rc, text) = hil.gexec(&format!("sh /hil/files/guest-badge-reader.sh swipe {CARD}"));
    assert_eq!(rc, 0, "swipe: {text}");
    let badge = wait_for(
        "access.badge from the door agent",
        T,
        || w.events("access.badge", "1 = 1", &[]).into_iter().next(),
        guest_logs,
    );
    assert_eq!(
        badge["id_hash"].as_str(),
        Some(expected_hash(CARD).as_str()),
        "{badge}"
    );
    assert_eq!(
        (
            badge["last4"].as_str(),
            badge["site"].as_str(),
            badge["reader"].as_str(),
            badge["source"].as_str()
        ),
        (
            Some("5678"),
            Some(SITE),
            Some("dc-east"),
            Some("hid-reader")
        ),
        "{badge}"
    );
    let (_, spy) = hil.gexec("wc -c < /tmp/spy.bin");
    assert_eq!(
        spy.trim(),
        "0",
        "key presses reached another reader of {node} while grabbed"
    );
    println!("MEASURED badge: access.badge last4 5678, hash matches, another reader of {node} got 0 bytes");

    // 3. After the badge-in, a second stick: stored, judged by the rules, no red.
    let (rc, text) = hil.sh("gplug.sh", &[&stick, "BADGED-1", "--copy", "--nowait"]);
    assert_eq!(rc, 0, "gadget bound: {text}");
    wait_for(
        "the second stick's other alert (unknown storage), so the rules have run on it",
        T,
        || {
            w.alert_lines().into_iter().find(|a| {
                a["rule_id"] == "builtin.usb.unknown-storage"
                    && a["details"]["event"]["serial"].as_str() == Some("BADGED-1")
            })
        },
        guest_logs,
    );
    assert!(
        server_room_alerts(&w, "BADGED-1").is_empty(),
        "a stick plugged after a badge-in must not raise the red alert"
    );
    println!("MEASURED badge-in then plug: no builtin.usb.server-room alert");

    // 4. The raw card number never reached the collector.
    let db = std::fs::read(w.path("weilan.db")).unwrap();
    let alerts = std::fs::read(w.path("alerts.jsonl")).unwrap_or_default();
    for (what, bytes) in [("database", &db), ("alert log", &alerts)] {
        assert!(
            !bytes.windows(CARD.len()).any(|win| win == CARD.as_bytes()),
            "the raw card number is in the collector's {what}"
        );
    }

    // 5. Control: with the door agent gone (grab released) the same reader sees keys.
    let (rc, text) = hil.gexec(
        "kill $(pidof weilan-agent | tr ' ' '\\n' | while read p; do grep -q door.toml /proc/$p/cmdline && echo $p; done); sleep 1; \
         sh /hil/files/guest-badge-reader.sh swipe 999; sleep 0.5; wc -c < /tmp/spy.bin"
    );
    assert_eq!(rc, 0, "{text}");
    let seen: u64 = text.trim().lines().last().unwrap().trim().parse().unwrap();
    assert!(
        seen > 0,
        "without the grab the other reader must see the keys: {text}"
    );
    println!("MEASURED control: without the agent's grab the other reader got {seen} bytes");
}
