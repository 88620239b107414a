//! The documented deployment, as a new IT department would follow it: every
//! `deployment-test` command block of docs/deployment.md runs verbatim, in order, on
//! fresh hosts (`common::hosts`: a collector host and a workstation), with the shipped
//! units, settings, policy and Mosquitto files. Then the fleet must work: the agent's
//! events stored, a policy change applied by the agent, no "broker unreachable"
//! alert; through Mosquitto also one steady collector connection for 60 s and an ACL
//! that keeps one workstation out of another's topics and session.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::hosts::{doc_step, doc_steps, Host};
use common::*;

const AGENT_ID: &str = "ws-finance-01";
const OTHER_ID: &str = "ws-finance-02";
/// A third certificate, never revoked: the control for the revocation check.
const THIRD_ID: &str = "ws-finance-03";

struct Fleet {
    _dir: tempfile::TempDir,
    ns: Netns,
    release: PathBuf,
    collector: Host,
    workstation: Host,
}

impl Fleet {
    fn diag(&self) -> String {
        format!(
            "=== collector host\n{}\n=== workstation\n{}\n=== mosquitto\n{}",
            self.collector.service_logs(),
            self.workstation.service_logs(),
            std::fs::read_to_string(self.mosquitto_log()).unwrap_or_default()
        )
    }

    fn step(&self, host: &Host, name: &str, cwd: &Path) {
        host.run(cwd, name, &doc_step(name));
    }

    fn mosquitto_log(&self) -> PathBuf {
        self.collector.path("/var/log/mosquitto/mosquitto.log")
    }

    fn count(&self, sql: &str) -> i64 {
        self.collector
            .sql("/var/lib/weilan-collector/weilan.db", sql)
            .unwrap_or(0)
    }

    fn alerts(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.collector.path("/var/log/weilan/alerts.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls `f` until it holds or `timeout` passes.
    fn within(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        f()
    }

    /// Collector connections Mosquitto logged (its log names the user of each).
    fn mosquitto_connections(&self, user: &str) -> usize {
        std::fs::read_to_string(self.mosquitto_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("New client connected") && l.contains(&format!("u'{user}'")))
            .count()
    }
}

/// The documented steps up to a running agent. `mosquitto`: the external-broker
/// section too. `acl_edit`: a change made to the installed ACL before Mosquitto
/// starts (to show the checks can fail).
fn deploy(mosquitto: bool, acl_edit: Option<&str>) -> Option<Fleet> {
    if !netns_available()
        || !require("deployment test needs nsenter and unshare (util-linux)", have("nsenter"))
        || !require(
            "deployment test needs systemd-sysusers and systemd-tmpfiles (the systemd package)",
            have("systemd-sysusers") && have("systemd-tmpfiles"),
        )
        || (mosquitto
            && !require(
                "Mosquitto walk-through needs Debian's mosquitto package (apt-get install mosquitto)",
                Path::new("/etc/mosquitto/mosquitto.conf").exists() && have("mosquitto"),
            ))
    {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    // A release directory: the two programs as the packages carry them (the
    // multi-call binary as the collector, the agent-only one as the agent) and the
    // repository's config/.
    let release = dir.path().join("release");
    std::fs::create_dir_all(&release).unwrap();
    std::os::unix::fs::symlink(weilan_bin(), release.join("weilan-collector")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_weilan-agent"),
        release.join("weilan-agent"),
    )
    .unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    std::os::unix::fs::symlink(&config, release.join("config")).unwrap();
    let ns = Netns::create();
    let collector = Host::new(&ns, dir.path(), "collector");
    let workstation = Host::new(&ns, dir.path(), "workstation");
    // Name resolution, as the site's DNS would give it.
    workstation.run(
        Path::new("/"),
        "hosts",
        "echo '127.0.0.1 collector.example.internal' >> /etc/hosts",
    );
    let fleet = Fleet {
        _dir: dir,
        ns,
        release,
        collector,
        workstation,
    };
    let c = &fleet.collector;
    fleet.step(c, "collector-install", &fleet.release);
    fleet.step(c, "collector-pki", &fleet.release);
    fleet.step(c, "collector-start", &fleet.release);
    if mosquitto {
        let mut script = doc_step("mosquitto");
        if let Some(edit) = acl_edit {
            // Before Mosquitto (re)starts, as an operator's edit would be.
            script = script.replace(
                "systemctl restart mosquitto\n",
                &format!("{edit}\nsystemctl restart mosquitto\n"),
            );
        }
        c.run(&fleet.release, "mosquitto", &script);
    }
    let token_output = c.run(
        &fleet.release,
        "collector-enroll-token",
        &doc_step("collector-enroll-token"),
    );
    let token = token_output
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    // A second workstation's certificate, issued by hand, for the ACL probes.
    c.run(
        &fleet.release,
        "second agent",
        &format!(
            "weilan-collector pki issue-agent {OTHER_ID} --dir /etc/weilan/pki && \
             weilan-collector pki issue-agent {THIRD_ID} --dir /etc/weilan/pki"
        ),
    );
    // The operator hands the token to the workstation.
    fleet.workstation.run_with(
        &fleet.release,
        "workstation-install",
        &doc_step("workstation-install"),
        &[("TOKEN", &token)],
    );
    Some(fleet)
}

/// The agent's events reach the database.
fn events_arrive(f: &Fleet) -> Result<(), String> {
    let sql = format!(
        "SELECT COUNT(*) FROM events WHERE agent_id = '{AGENT_ID}' AND kind = 'agent.started'"
    );
    if f.within(Duration::from_secs(30), || f.count(&sql) >= 1) {
        Ok(())
    } else {
        Err("no agent.started of the workstation was stored".into())
    }
}

/// The documented policy change reaches the agent, which applies it.
fn policy_reaches_agent(f: &Fleet, timeout: Duration) -> Result<(), String> {
    f.step(&f.collector, "collector-policy-change", &f.release);
    let sql = format!(
        "SELECT COUNT(*) FROM events WHERE agent_id = '{AGENT_ID}' AND kind = 'policy.applied' \
         AND json_extract(envelope, '$.event.data.version') = 'example-2' \
         AND json_extract(envelope, '$.event.data.source') = 'collector'"
    );
    if f.within(timeout, || f.count(&sql) == 1) {
        Ok(())
    } else {
        Err("the agent never applied policy example-2 from the collector".into())
    }
}

fn no_broker_alert(f: &Fleet) {
    let bad: Vec<_> = f
        .alerts()
        .into_iter()
        .filter(|a| a["rule_id"] == "builtin.collector.broker-unreachable")
        .collect();
    assert!(bad.is_empty(), "{bad:?}\n{}", f.diag());
}

/// The workstation's journal: (last, acked) as `epoch:seq` text, read on the host.
fn workstation_journal(f: &Fleet) -> (String, String) {
    let text = f
        .workstation
        .run(Path::new("/"), "journal", "weilan-agent journal");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or("-")
            .to_string()
    };
    (field("last"), field("acked"))
}

/// Section 7's policy entry for the transfer stick, added to the collector's policy
/// (as §3 changes it) and applied by the agent before it goes offline.
fn register_transfer_stick(f: &Fleet) {
    let (entry, ..) = transfer_stick_entry();
    f.collector.run(
        Path::new("/"),
        "register the transfer stick",
        &format!(
            "sed -i 's/^version = .*/version = \"example-3\"/' /etc/weilan/policy.toml\n\
             cat >> /etc/weilan/policy.toml <<'EOF'\n\n{entry}\nEOF\n"
        ),
    );
    let sql = format!(
        "SELECT COUNT(*) FROM events WHERE agent_id = '{AGENT_ID}' AND kind = 'policy.applied' \
         AND json_extract(envelope, '$.event.data.version') = 'example-3'"
    );
    assert!(
        f.within(Duration::from_secs(30), || f.count(&sql) == 1),
        "the agent never applied the policy with the transfer stick\n{}",
        f.diag()
    );
}

/// This machine has no USB bus: in the workstation's own mount namespace, the file
/// system at /media is made to belong to a USB stick with the identity §7 registers
/// (a tmpfs over the empty /sys/kernel/debug holds the device; /sys/dev/block gets a
/// copy of its links plus one from /media's device to the stick's disk).
fn plug_fake_transfer_stick(ws: &Host) {
    let (_, vid, pid, serial) = transfer_stick_entry();
    let script = format!(
        "set -e\n\
         d=/sys/kernel/debug/usb9/9-7\n\
         mount -t tmpfs weilan-fake-usb /sys/kernel/debug\n\
         mkdir -p \"$d/9-7:1.0/host9/target9:0:0/9:0:0:0/block/sdz\"\n\
         echo {vid} > $d/idVendor; echo {pid} > $d/idProduct; echo {serial} > $d/serial\n\
         echo 9 > $d/busnum; echo 7 > $d/devnum; echo 00 > $d/bDeviceClass; echo 480 > $d/speed\n\
         echo 08 > \"$d/9-7:1.0/bInterfaceClass\"; echo 06 > \"$d/9-7:1.0/bInterfaceSubClass\"\n\
         echo 50 > \"$d/9-7:1.0/bInterfaceProtocol\"; echo 00 > \"$d/9-7:1.0/bInterfaceNumber\"\n\
         rm -rf /run/weilan-devblock && cp -a /sys/dev/block /run/weilan-devblock\n\
         mount -t tmpfs weilan-fake-devblock /sys/dev/block\n\
         cp -a /run/weilan-devblock/. /sys/dev/block/\n\
         ln -s \"$d/9-7:1.0/host9/target9:0:0/9:0:0:0/block/sdz\" /sys/dev/block/$(mountpoint -d /media)\n",
    );
    ws.run(Path::new("/"), "fake transfer stick", &script);
}

/// Section 7's steps, verbatim: the workstation's unacknowledged records go to the
/// collector on a "stick" (a tmpfs each host mounts at /media, copied across), are
/// stored once, and the acks come back and are applied at the agent's next start.
fn offline_round_trip(f: &Fleet) {
    let (c, ws) = (&f.collector, &f.workstation);
    register_transfer_stick(f);
    c.run(
        Path::new("/"),
        "stop collector",
        "systemctl stop weilan-collector",
    );
    // A restart journals a new epoch's first records, which nobody acknowledges.
    ws.run(
        Path::new("/"),
        "restart agent",
        "systemctl restart weilan-agent",
    );
    let journaled = f.within(Duration::from_secs(30), || {
        let (last, acked) = workstation_journal(f);
        last != "-" && last != acked
    });
    assert!(journaled, "{:?}\n{}", workstation_journal(f), f.diag());
    ws.run(Path::new("/"), "stop agent", "systemctl stop weilan-agent");
    let (last, _) = workstation_journal(f);
    for host in [c, ws] {
        host.run(
            Path::new("/"),
            "stick",
            "mount -t tmpfs tmpfs /media && mkdir /media/weilan-transfer",
        );
    }
    plug_fake_transfer_stick(ws);
    f.step(ws, "offline-export", &f.release);
    let carry = |from: &Host, to: &Host, ext: &str| {
        for e in std::fs::read_dir(from.path("/media/weilan-transfer")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == ext) {
                std::fs::copy(
                    &p,
                    to.path("/media/weilan-transfer")
                        .join(p.file_name().unwrap()),
                )
                .unwrap();
            }
        }
    };
    carry(ws, c, "bundle");
    c.run(
        Path::new("/"),
        "start collector",
        "systemctl start weilan-collector",
    );
    let imported = c.run(&f.release, "offline-import", &doc_step("offline-import"));
    println!("MEASURED {}", imported.trim());
    assert!(imported.contains("; stored "), "{imported}");
    carry(c, ws, "acks");
    f.step(ws, "offline-ack", &f.release);
    ws.run(
        Path::new("/"),
        "start agent",
        "systemctl start weilan-agent",
    );
    let key = |k: &str| -> (u64, u64) {
        k.split_once(':')
            .and_then(|(e, s)| Some((e.parse().ok()?, s.parse().ok()?)))
            .unwrap_or((0, 0))
    };
    // The agent took the acks from the stick (its log says so; over the network the
    // same records would only come back as duplicates).
    let applied = f.within(Duration::from_secs(30), || {
        ws.service_logs()
            .contains("acknowledgements from an ack bundle")
            && key(&workstation_journal(f).1) >= key(&last)
    });
    assert!(
        applied,
        "acked at least up to the exported {last}: {:?}\n{}",
        workstation_journal(f),
        f.diag()
    );
    let twice = f.count(&format!(
        "SELECT COUNT(*) - COUNT(DISTINCT event_id) FROM events WHERE agent_id = '{AGENT_ID}'"
    ));
    assert_eq!(twice, 0);
}

#[test]
fn documented_deployment_with_the_embedded_broker_works() {
    let Some(f) = deploy(false, None) else {
        return;
    };
    events_arrive(&f).unwrap_or_else(|e| panic!("{e}\n{}", f.diag()));
    policy_reaches_agent(&f, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", f.diag()));
    // The collector runs as `weilan` and reads the keys `pki init` made as root.
    let user = f.collector.run(
        Path::new("/"),
        "service user",
        "ps -o user= -p $(cat /run/weilan-test-units/weilan-collector.pid)",
    );
    assert_eq!(user.trim(), "weilan", "{}", f.diag());
    no_broker_alert(&f);
    offline_round_trip(&f);
}

#[test]
fn documented_deployment_through_the_shipped_mosquitto_config_works() {
    let Some(f) = deploy(true, None) else {
        return;
    };
    let started = Instant::now();
    events_arrive(&f).unwrap_or_else(|e| panic!("{e}\n{}", f.diag()));
    policy_reaches_agent(&f, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", f.diag()));

    // The ACL and the identity-bound client id, probed by a second workstation's
    // certificate: it subscribes to everything, publishes on the first agent's
    // topic, and connects with the first agent's and the collector's client ids.
    let ca = f.collector.path("/etc/weilan/pki/ca.pem");
    let cert = f
        .collector
        .path(&format!("/etc/weilan/pki/agents/{OTHER_ID}.pem"));
    let key = f
        .collector
        .path(&format!("/etc/weilan/pki/agents/{OTHER_ID}-key.pem"));
    let listen = Duration::from_secs(58).saturating_sub(started.elapsed());
    let tls = weilan_config::tls::client_config(&ca, &cert, &key, "weilan-collector").unwrap();
    let received = probe_as_other_agent(&f.ns, tls, AGENT_ID, OTHER_ID, listen);
    // What the first agent sent meanwhile (its heartbeats), which the probe must not
    // have seen.
    let heartbeats = f.count(&format!(
        "SELECT COUNT(*) FROM events WHERE agent_id = '{AGENT_ID}' AND kind = 'agent.heartbeat'"
    ));
    println!("MEASURED the probe received {} messages; {AGENT_ID} stored {heartbeats} heartbeats meanwhile", received.len());
    assert!(heartbeats >= 1, "{}", f.diag());
    let foreign: Vec<_> = received
        .iter()
        .filter(|(t, _)| t.starts_with("weilan/v1/agents/"))
        .collect();
    assert!(
        foreign.is_empty(),
        "{OTHER_ID} received other agents' messages: {foreign:?}\n{}",
        f.diag()
    );
    assert!(
        received.iter().any(|(t, _)| t == "weilan/v1/policy"),
        "an agent must read the policy: {received:?}\n{}",
        f.diag()
    );
    // The collector's presence is readable; the probe's forged retained "offline"
    // never replaced it.
    let presence: Vec<_> = received
        .iter()
        .filter(|(t, _)| t.starts_with("weilan/v1/collectors/"))
        .collect();
    assert!(
        !presence.is_empty() && presence.iter().all(|(_, p)| p.as_slice() != b"FORGED"),
        "presence seen by an agent: {presence:?}\n{}",
        f.diag()
    );
    let forged = f.count("SELECT COUNT(*) FROM quarantine")
        + f.count(&format!(
            "SELECT COUNT(*) FROM events WHERE agent_id = '{AGENT_ID}' AND envelope LIKE '%FORGED%'"
        ));
    assert_eq!(
        forged,
        0,
        "a publish on another agent's topic got through\n{}",
        f.diag()
    );

    // One steady collector connection for 60 s (no reconnect loop), and neither the
    // first agent nor the collector was taken over by the probe's client ids.
    let wait = Duration::from_secs(60).saturating_sub(started.elapsed());
    std::thread::sleep(wait);
    let collector_connections = f.mosquitto_connections("weilan-collector");
    let agent_connections = f.mosquitto_connections(AGENT_ID);
    println!(
        "MEASURED mosquitto over {} s: collector connections {collector_connections}, {AGENT_ID} connections {agent_connections}",
        started.elapsed().as_secs()
    );
    assert_eq!(collector_connections, 1, "{}", f.diag());
    assert_eq!(agent_connections, 1, "{}", f.diag());
    no_broker_alert(&f);

    // Revocation through the CRL: the documented step, then the revoked certificate
    // is refused at the TLS handshake (the same certificate connected for the probes
    // above), while another one still connects.
    // A session the revoked certificate holds while it is revoked: the collector ends
    // it (a connection under the same name replaces it), and the CRL keeps it out.
    let held = {
        let tls = weilan_config::tls::client_config(&ca, &cert, &key, "weilan-collector").unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = &f.ns;
        std::thread::scope(|scope| {
            let h = scope.spawn(move || {
                with_mqtt_client(netns, OTHER_ID, tls, move |_client, mut el| {
                    Box::pin(async move {
                        connect(&mut el)
                            .await
                            .expect("the soon revoked agent connects");
                        let _ = ready_tx.send(());
                        let end = tokio::time::Instant::now() + Duration::from_secs(15);
                        while let Ok(Ok(_)) = tokio::time::timeout_at(end, el.poll()).await {}
                        Instant::now()
                    })
                })
            });
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("held session up");
            let revoked_at = Instant::now();
            f.step(&f.collector, "revoke", &f.release);
            let dropped = h.join().unwrap();
            dropped.saturating_duration_since(revoked_at)
        })
    };
    println!(
        "MEASURED Mosquitto: a session held by the revoked certificate ended {} ms after `agents revoke`",
        held.as_millis()
    );
    assert!(
        held <= Duration::from_secs(5),
        "the revoked certificate's session lasted {held:?}\n{}",
        f.diag()
    );
    // `reload` is a SIGHUP that Mosquitto handles in its own time: the CRL takes hold
    // within moments, measured here.
    let revoked_at = Instant::now();
    let mut refused = try_connect(&f.ns, &ca, &cert, &key);
    while refused.is_ok() && revoked_at.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        refused = try_connect(&f.ns, &ca, &cert, &key);
    }
    println!(
        "MEASURED after `agents revoke` + reload: {OTHER_ID} refused after {} ms -> {refused:?}",
        revoked_at.elapsed().as_millis()
    );
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRevoked")),
        "a revoked certificate still connects 5 s after the reload: {refused:?}\n{}",
        f.diag()
    );
    assert!(
        try_connect(
            &f.ns,
            &ca,
            &f.collector
                .path(&format!("/etc/weilan/pki/agents/{THIRD_ID}.pem")),
            &f.collector
                .path(&format!("/etc/weilan/pki/agents/{THIRD_ID}-key.pem")),
        )
        .is_ok(),
        "an unrevoked certificate must still connect\n{}",
        f.diag()
    );
}

/// Connects with a certificate (as an agent connects) and disconnects.
fn try_connect(ns: &Netns, ca: &Path, cert: &Path, key: &Path) -> Result<(), String> {
    let tls = weilan_config::tls::client_config(ca, cert, key, "weilan-collector").unwrap();
    with_mqtt_client(ns, "probe", tls, |_client, mut eventloop| {
        Box::pin(async move { connect(&mut eventloop).await })
    })
}

/// The same walk-through with the ACL's policy lines removed (the documented ACL of
/// the previous release): the checks above must catch it.
#[test]
fn mosquitto_acl_without_its_policy_lines_is_caught() {
    let Some(f) = deploy(
        true,
        Some("sed -i '/weilan\\/v1\\/policy/d' /etc/mosquitto/weilan.acl"),
    ) else {
        return;
    };
    let outcome =
        events_arrive(&f).and_then(|()| policy_reaches_agent(&f, Duration::from_secs(20)));
    println!("MEASURED without the policy ACL lines: {outcome:?}");
    assert!(
        outcome.is_err(),
        "the walk-through passed without the policy ACL lines\n{}",
        f.diag()
    );
}

/// Every block the documentation marks for this test is one the walk-throughs run:
/// a new documented step cannot be left untested.
#[test]
fn every_marked_documentation_step_is_run() {
    let run = [
        "collector-install",
        "collector-pki",
        "collector-start",
        "collector-enroll-token",
        "workstation-install",
        "collector-policy-change",
        "mosquitto",
        "revoke",
        "offline-export",
        "offline-import",
        "offline-ack",
    ];
    let mut documented = doc_steps();
    documented.sort();
    let mut ran = run.map(str::to_string).to_vec();
    ran.sort();
    assert_eq!(documented, ran);
    for step in run {
        assert!(!doc_step(step).trim().is_empty(), "{step}");
    }
}
