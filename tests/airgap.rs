//! A host with no network at all (a 涉密 computer): its journal goes to the collector
//! on a stick as a signed bundle and the acknowledgements come back the same way —
//! with the real agent and collector, in two network namespaces with no route
//! between them, through the commands docs/deployment.md gives.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(180);
const BURST: &str = "AIRGAP-1";
/// Add/remove pairs of the burst: 3 records each (attached, decision, detached),
/// so over 10 000 records with the agent's own.
const PAIRS: usize = 3_334;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn agent_journal(config: &Path, args: &[&str]) -> (bool, String) {
    run(Command::new(weilan_bin())
        .args(["agent", "journal", "--config"])
        .arg(config)
        .args(args))
}

/// `weilan collector import` of `bundles`; their ack bundles land beside them.
fn collector_import(config: &Path, bundles: &[PathBuf]) -> (bool, String) {
    run(Command::new(weilan_bin())
        .args(["collector", "import", "--config"])
        .arg(config)
        .args(bundles)
        .args(["--wait-secs", "120"]))
}

/// The sum of the number after `label ` over a command's output lines.
fn total(text: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains(label))
        .map(|l| figure(l, label))
        .sum()
}

/// The files in `dir` ending in `.ext`, by name.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    found.sort();
    found
}

/// The number after `label ` in a command's output.
fn figure(text: &str, label: &str) -> u64 {
    text.split(label)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_end_matches([',', ';']).parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in {text}"))
}

/// A copy of the bundle with one record of batch line 3 changed (the burst's serial
/// in it), and the key of that record.
fn tampered_copy(bundle: &Path, to: &Path) -> String {
    let text = std::fs::read_to_string(bundle).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let signed: weilan_config::wire::SignedMessage = serde_json::from_str(&lines[2]).unwrap();
    let batch = weilan_config::wire::decode_batch(&signed.body, 1 << 22).unwrap();
    let (index, raw) = batch
        .events
        .iter()
        .enumerate()
        .find(|(_, e)| e.get().contains(BURST))
        .expect("a burst record in line 3");
    assert!(
        index + 1 < batch.events.len(),
        "not the batch's last record"
    );
    let env: weilan_config::event::Envelope = serde_json::from_str(raw.get()).unwrap();
    // The same record with another serial: still valid JSON, still a valid event.
    let escaped = serde_json::to_string(raw.get()).unwrap();
    let escaped = &escaped[1..escaped.len() - 1];
    let altered = escaped.replacen(BURST, "AIRGAP-X", 1);
    lines[2] = lines[2].replacen(escaped, &altered, 1);
    assert_ne!(lines[2], text.lines().nth(2).unwrap());
    std::fs::write(to, lines.join("\n") + "\n").unwrap();
    env.event_id.key.to_string()
}

/// The export refuses a directory that is not on a USB stick, and a stick the policy
/// does not register; docs/deployment.md §7's policy entry registers it. The stick is
/// a fake USB device (sysfs) that the directory's file system is made to belong to.
fn only_onto_a_registered_stick(w: &World, agent_cfg: &Path, stick: &Path) {
    use std::os::unix::fs::MetadataExt;
    use weilan_agent::source::usb::sysfs::fake::{add_stick, FakeStick};
    let export = |dir: &Path| agent_journal(agent_cfg, &["export", "--out", dir.to_str().unwrap()]);
    let (ok, out) = export(stick);
    assert!(!ok && out.contains("is not on a USB stick"), "{out}");
    let (documented, vid, pid, serial) = transfer_stick_entry();
    add_stick(
        &w.sysfs(),
        &FakeStick {
            port: "1-7",
            vid: &vid,
            pid: &pid,
            serial: &serial,
            classes: &[0x08],
            disk: Some(("sdz", "250:0")),
        },
    );
    let dev = std::fs::metadata(stick).unwrap().dev();
    let majmin = format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let disk = std::fs::canonicalize(w.sysfs().join("dev/block/250:0")).unwrap();
    std::os::unix::fs::symlink(disk, w.sysfs().join("dev/block").join(majmin)).unwrap();
    let (ok, out) = export(stick);
    assert!(
        !ok && out.contains("is not a registered transfer stick"),
        "{out}"
    );
    let mut policy = std::fs::read_to_string(w.path("policy.toml")).unwrap();
    policy.push_str(&format!("\n{documented}\n"));
    std::fs::write(w.path("policy.toml"), policy).unwrap();
    // Registered: the export that follows goes ahead.
}

#[test]
fn an_offline_host_journal_goes_by_stick_is_stored_once_and_its_acks_come_back() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    // Two namespaces and no link: the agent cannot reach any broker.
    let (host, office) = (Netns::create(), Netns::create());
    let collector_cfg = w.collector_toml(false, "");
    let agent_cfg = w.agent_toml(
        AGENT,
        "pki/ca.pem",
        "[journal]\nsegment_mib = 1\nretain_acked_mib = 0\n",
    );
    let agent = w.start_agent(&host, &agent_cfg, AGENT);
    let base = wait_for(
        "agent.started journaled",
        T,
        || {
            let (last, _) = journal_status(&agent_cfg);
            (last >= 2).then_some(last)
        },
        || agent.log_text(),
    );
    usb_burst(&host, &w.sysfs(), "1-9", BURST, PAIRS);
    wait_for(
        "the burst journaled",
        T,
        || (journal_status(&agent_cfg).0 >= base + 3 * PAIRS as u64).then_some(()),
        || {
            format!(
                "{:?}\n{}",
                journal_status(&agent_cfg),
                agent
                    .log_text()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        },
    );
    let ((epoch, _), _) = journal_keys(&agent_cfg);

    // On the host: the journal onto the stick, in bundles of at most about 2 MiB.
    let stick = w.path("stick");
    std::fs::create_dir_all(&stick).unwrap();
    only_onto_a_registered_stick(&w, &agent_cfg, &stick);
    let (ok, out) = agent_journal(
        &agent_cfg,
        &["export", "--out", stick.to_str().unwrap(), "--max-mib", "2"],
    );
    assert!(ok, "{out}");
    println!("MEASURED {out}");
    assert!(
        out.starts_with("onto the registered transfer stick `transfer stick` (allowed by rule `transfer-stick`;"),
        "{out}"
    );
    let records = total(&out, "exported");
    assert!(records > 10_000, "{out}");
    let bundles = files(&stick, "bundle");
    assert!(bundles.len() >= 2, "split into several bundles: {out}");
    assert_eq!(
        bundles.len(),
        out.lines().filter(|l| l.starts_with("exported")).count()
    );

    let collector = w.start_collector(&office, &collector_cfg);
    let diag = || format!("{}\n--- agent\n{}", collector.log_text(), agent.log_text());

    // A bundle altered on the way: refused whole, the record named, nothing stored.
    let tampered = w.path("tampered.bundle");
    let altered_key = tampered_copy(&bundles[0], &tampered);
    let (ok, out) = collector_import(&collector_cfg, std::slice::from_ref(&tampered));
    assert!(!ok, "{out}");
    assert!(
        out.contains("line 3") && out.contains(&format!("record {altered_key}")),
        "the refusal names the line and the record {altered_key}: {out}\n{}",
        diag()
    );
    println!("MEASURED tampered bundle: {}", out.trim());
    assert_eq!(w.count("SELECT COUNT(*) FROM events"), 0, "{}", diag());
    assert!(!w.path("tampered.acks").exists());
    let alert = wait_for(
        "integrity alert for the altered bundle",
        T,
        || {
            w.alert_lines()
                .into_iter()
                .find(|a| a["agent_id"] == AGENT && a["level"] == "red")
        },
        diag,
    );
    println!("MEASURED alert: {}", alert["summary"]);

    // The bundles as written: every record stored once, chain intact, acks back.
    let (ok, out) = collector_import(&collector_cfg, &bundles);
    assert!(ok, "{out}\n{}", diag());
    println!("MEASURED {out}");
    assert_eq!(total(&out, "; stored"), records, "{out}");
    assert_eq!(
        w.count(&format!(
            "SELECT COUNT(DISTINCT event_id) FROM events WHERE agent_id = '{AGENT}'"
        )),
        records as i64
    );
    assert_eq!(w.burst_count(BURST), 2 * PAIRS as i64);
    let chain_alerts: Vec<_> = w
        .alert_lines()
        .into_iter()
        .filter(|a| {
            let r = a["rule_id"].as_str().unwrap_or("");
            r.contains("chain") || r.contains("gap")
        })
        .collect();
    assert!(chain_alerts.is_empty(), "{chain_alerts:?}");
    let acks = files(&stick, "acks");
    assert_eq!(acks.len(), bundles.len());

    // The same bundles again (a replay, or imported twice): nothing stored twice.
    let (ok, out) = collector_import(&collector_cfg, &bundles);
    assert!(ok, "{out}");
    assert_eq!(total(&out, "; stored"), 0, "{out}");
    assert_eq!(total(&out, "already stored"), records, "{out}");
    assert_eq!(
        w.count(&format!(
            "SELECT COUNT(*) FROM events WHERE agent_id = '{AGENT}'"
        )),
        records as i64
    );

    // Back on the host: the acks trim the journal of the running agent.
    let (_, before) = journal_status(&agent_cfg);
    let mut args = vec!["import-ack"];
    args.extend(acks.iter().map(|a| a.to_str().unwrap()));
    let (ok, out) = agent_journal(&agent_cfg, &args);
    assert!(ok, "{out}");
    println!("MEASURED {}", out.trim());
    let acked = wait_for(
        "the acks applied",
        T,
        || {
            let (_, (e, s)) = journal_keys(&agent_cfg);
            (e == epoch && s >= records).then_some(s)
        },
        || agent.log_text(),
    );
    let (_, after) = journal_status(&agent_cfg);
    println!("MEASURED journal records before the acks {before}, after {after} (acked to {epoch}:{acked})");
    assert!(
        after < before / 2,
        "acknowledged segments deleted: {before} → {after}"
    );
    // A journal bundle is no ack bundle: refused on the host, its line named.
    let (ok, out) = agent_journal(&agent_cfg, &["import-ack", tampered.to_str().unwrap()]);
    assert!(!ok && out.contains("line 1"), "{out}");
    // The next export starts after what was acknowledged.
    let (ok, out) = agent_journal(&agent_cfg, &["export", "--out", stick.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("nothing to export") || !out.contains(&format!("({epoch}:1..")),
        "{out}"
    );
}
