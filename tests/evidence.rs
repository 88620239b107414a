//! Evidence without holes, end to end (collector, embedded broker, agent):
//! - an agent re-installed under the same id (state directory wiped) and one whose
//!   state directory was restored from an older copy are each reported once, every
//!   event of every run is stored (none deduplicated away), and no agent looks silent;
//! - damage to an offline agent's journal (a flipped bit, records removed from the
//!   middle, records cut off its end) is counted exactly, each hole raises its alert,
//!   and every intact record after the damage is delivered.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);
const BURST: &str = "EVIDENCE-1";

/// These tests run an agent and a collector; one at a time on two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Setup {
    w: World,
    ns: Netns,
    collector_cfg: PathBuf,
    agent_cfg: PathBuf,
}

fn setup(journal: &str) -> Setup {
    let w = World::new();
    let ns = Netns::create();
    let collector_cfg = w.collector_toml(
        false,
        "[fleet]\nsilent_after_secs = 6\ngap_grace_secs = 1\ncheck_interval_secs = 1\n",
    );
    let agent_cfg = w.agent_toml(
        AGENT,
        "pki/ca.pem",
        &format!("[heartbeat]\ninterval_secs = 1\n{journal}"),
    );
    Setup {
        w,
        ns,
        collector_cfg,
        agent_cfg,
    }
}

/// [`setup`] with heartbeats an hour apart: a burst is all that happens.
fn setup_quiet() -> Setup {
    let s = setup("");
    let text = fs::read_to_string(&s.agent_cfg).unwrap();
    // No network or login sources either: they watch the whole host (every network
    // namespace, the host's wtmp), where tests running beside this one log in and
    // connect, and their events would mix with the counted burst.
    fs::write(
        &s.agent_cfg,
        text.replace("interval_secs = 1", "interval_secs = 3600")
            + "\n[network]\nenabled = false\n\n[access]\nenabled = false\n",
    )
    .unwrap();
    s
}

/// The burst's stored records (attached, the fence's decision, detached) matching
/// the SQL `condition`.
fn burst_records(w: &World, condition: &str) -> u64 {
    w.count(&format!(
        "SELECT COUNT(*) FROM events WHERE ({condition}) AND COALESCE(json_extract(envelope, '$.event.data.serial'), \
         json_extract(envelope, '$.event.data.device.serial')) = '{BURST}'"
    )) as u64
}

fn diag<'a>(procs: &'a [&'a Proc]) -> impl Fn() -> String + 'a {
    move || {
        procs
            .iter()
            .map(|p| {
                let log = p.log_text();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- {}\n{}",
                    p.name,
                    lines[lines.len().saturating_sub(30)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Per epoch of the agent: (epoch, events stored, highest seq stored), oldest first.
fn epochs(w: &World) -> Vec<(i64, i64, i64)> {
    if !w.db_exists() {
        return vec![];
    }
    w.db()
        .query_map(
            "SELECT epoch, COUNT(*), MAX(seq) FROM events WHERE agent_id = ?1 GROUP BY epoch ORDER BY epoch",
            params![AGENT],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

/// Waits until the agent's `n`th epoch has at least `min` events stored.
fn wait_epoch(w: &World, n: usize, min: i64, procs: &[&Proc]) {
    wait_for(
        &format!("epoch #{n} with {min} events stored"),
        T,
        || {
            let e = epochs(w);
            (e.len() == n && e[n - 1].1 >= min).then_some(())
        },
        || format!("epochs {:?}\n{}", epochs(w), diag(procs)()),
    );
}

fn alerts_of(w: &World, rule: &str) -> Vec<serde_json::Value> {
    w.alert_lines()
        .into_iter()
        .filter(|a| a["rule_id"] == rule)
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Stops the agent cleanly and waits until everything it journaled is stored.
fn stop_delivered(s: &Setup, agent: &mut Proc, procs: &[&Proc]) {
    agent.stop();
    let (last, _) = journal_keys(&s.agent_cfg);
    wait_for(
        "the stopped agent's last record stored",
        T,
        || {
            epochs(&s.w)
                .iter()
                .any(|(e, _, m)| *e as u64 == last.0 && *m as u64 == last.1)
                .then_some(())
        },
        || {
            format!(
                "last {last:?}, epochs {:?}\n{}",
                epochs(&s.w),
                diag(procs)()
            )
        },
    );
}

#[test]
fn reinstalled_and_restored_agents_are_reported_and_every_event_is_stored() {
    if !netns_available() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = setup("");
    let state = s.w.path(&format!("state-{AGENT}"));
    let snapshot = s.w.path("state-snapshot");
    let collector = s.w.start_collector(&s.ns, &s.collector_cfg);

    // Run 1, then a copy of its state directory (a VM snapshot, a backup).
    let mut agent = s.w.start_agent(&s.ns, &s.agent_cfg, AGENT);
    wait_epoch(&s.w, 1, 3, &[&collector, &agent]);
    stop_delivered(&s, &mut agent, &[&collector]);
    copy_dir(&state, &snapshot);

    // Run 2: an ordinary restart.
    let mut agent = s.w.start_agent(&s.ns, &s.agent_cfg, AGENT);
    wait_epoch(&s.w, 2, 3, &[&collector, &agent]);
    stop_delivered(&s, &mut agent, &[&collector]);

    // Run 3: the state directory restored from the copy made after run 1.
    fs::remove_dir_all(&state).unwrap();
    copy_dir(&snapshot, &state);
    let mut agent = s.w.start_agent(&s.ns, &s.agent_cfg, AGENT);
    wait_epoch(&s.w, 3, 3, &[&collector, &agent]);
    let restored = wait_for(
        "agent-restored alert",
        T,
        || alerts_of(&s.w, "builtin.integrity.agent-restored").pop(),
        diag(&[&collector, &agent]),
    );
    stop_delivered(&s, &mut agent, &[&collector]);

    // Run 4: re-installed (state directory wiped), then left running past the
    // silent-agent threshold (6 s here).
    fs::remove_dir_all(&state).unwrap();
    fs::create_dir_all(&state).unwrap();
    let mut agent = s.w.start_agent(&s.ns, &s.agent_cfg, AGENT);
    wait_epoch(&s.w, 4, 3, &[&collector, &agent]);
    let reinstalled = wait_for(
        "agent-reinstalled alert",
        T,
        || alerts_of(&s.w, "builtin.integrity.agent-reinstalled").pop(),
        diag(&[&collector, &agent]),
    );
    std::thread::sleep(Duration::from_secs(10));
    stop_delivered(&s, &mut agent, &[&collector]);
    std::thread::sleep(Duration::from_secs(3)); // one more fleet check

    let e = epochs(&s.w);
    println!("MEASURED epochs (epoch, stored, max seq): {e:?}");
    println!("MEASURED restored: {}", restored["summary"]);
    println!("MEASURED reinstalled: {}", reinstalled["summary"]);
    assert_eq!(e.len(), 4, "one epoch per run: {e:?}");
    for (epoch, stored, max_seq) in &e {
        assert_eq!(
            stored, max_seq,
            "epoch {epoch}: every record of the run is stored, none dropped as a duplicate"
        );
    }
    assert_eq!(restored["level"], "red");
    assert_eq!(reinstalled["level"], "yellow");
    for (rule, n) in [
        ("builtin.integrity.agent-restored", 1),
        ("builtin.integrity.agent-reinstalled", 1),
        ("builtin.integrity.key-reused", 0),
        ("builtin.integrity.journal-reset", 0),
        ("builtin.integrity.chain-break", 0),
        ("builtin.integrity.journal-gap", 0),
        ("builtin.fleet.agent-silent", 0),
    ] {
        assert_eq!(
            alerts_of(&s.w, rule).len(),
            n,
            "{rule}\n{:#?}",
            s.w.alert_lines()
        );
    }
}

/// A segment's records: (offset, frame length, seq).
fn records(path: &Path) -> Vec<(usize, usize, u64)> {
    let data = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut off = 0;
    while off + 8 <= data.len() {
        let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
        let env: serde_json::Value = serde_json::from_slice(&data[off + 8..off + 8 + len]).unwrap();
        out.push((
            off,
            8 + len,
            env["event_id"]["key"]["seq"].as_u64().unwrap_or_else(|| {
                env["event_id"]
                    .as_str()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            }),
        ));
        off += 8 + len;
    }
    out
}

fn segments(w: &World) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(w.path(&format!("state-{AGENT}/journal")))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg") && fs::metadata(p).unwrap().len() > 0)
        .collect();
    v.sort();
    v
}

/// Removes the frames `[from, to)` (by index) from a segment, as an insider would.
fn remove_records(path: &Path, from: usize, to: usize) {
    let data = fs::read(path).unwrap();
    let recs = records(path);
    let mut out = data[..recs[from].0].to_vec();
    if let Some(after) = recs.get(to) {
        out.extend_from_slice(&data[after.0..]);
    }
    fs::write(path, out).unwrap();
}

#[test]
fn damage_to_an_offline_journal_is_counted_exactly_and_every_intact_record_arrives() {
    if !netns_available() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = setup("[journal]\nsegment_mib = 1\n");
    let mut collector = s.w.start_collector(&s.ns, &s.collector_cfg);
    let mut agent = s.w.start_agent(&s.ns, &s.agent_cfg, AGENT);
    wait_epoch(&s.w, 1, 3, &[&collector, &agent]);
    // Offline: a burst buffered in the journal, then the agent stops.
    collector.stop();
    usb_burst(&s.ns, &s.w.sysfs(), "1-9", BURST, 2000);
    wait_for(
        "burst journaled",
        T,
        || {
            let (last, _) = journal_keys(&s.agent_cfg);
            (last.1 >= 6000).then_some(())
        },
        diag(&[&agent]),
    );
    agent.stop();
    let (last, acked) = journal_keys(&s.agent_cfg);
    let segs = segments(&s.w);
    assert!(segs.len() >= 3, "several segments: {segs:?}");
    let unacked = |p: &Path| {
        records(p)
            .into_iter()
            .enumerate()
            .filter(|(_, r)| r.2 > acked.1 || acked.0 < last.0)
            .collect::<Vec<_>>()
    };
    // 1. One flipped bit in a record of the first segment (after what was acked).
    let first = unacked(&segs[0]);
    let (_, (off, len, flipped_seq)) = first[first.len() / 2];
    let mut data = fs::read(&segs[0]).unwrap();
    data[off + len / 2] ^= 0x10;
    fs::write(&segs[0], data).unwrap();
    // 2. Three records removed whole from the middle of the second segment.
    let second = unacked(&segs[1]);
    let at = second[second.len() / 2].0;
    let removed: Vec<u64> = records(&segs[1])[at..at + 3].iter().map(|r| r.2).collect();
    remove_records(&segs[1], at, at + 3);
    // 3. The newest five records cut off the end, exactly at a record boundary.
    let newest = segs.last().unwrap();
    let n = records(newest).len();
    let cut: Vec<u64> = records(newest)[n - 5..].iter().map(|r| r.2).collect();
    remove_records(newest, n - 5, n);
    println!("MEASURED damage: bit flipped in seq {flipped_seq}; removed {removed:?}; cut {cut:?}");

    let collector = s.w.start_collector(&s.ns, &s.collector_cfg);
    let agent = s.w.start_agent(&s.ns, &s.agent_cfg, AGENT);
    let procs = [&collector, &agent];
    wait_for(
        "damaged epoch delivered",
        T,
        || {
            let (now_last, now_acked) = journal_keys(&s.agent_cfg);
            (now_last.0 > last.0 && now_acked >= (last.0, last.1 - 5)).then_some(())
        },
        diag(&procs),
    );
    let gaps: Vec<serde_json::Value> = wait_for(
        "three gap alerts",
        T,
        || {
            let mut g = alerts_of(&s.w, "builtin.integrity.journal-gap");
            g.extend(alerts_of(&s.w, "builtin.integrity.journal-gap-reported"));
            (g.len() >= 3).then_some(g)
        },
        || format!("{:#?}\n{}", s.w.alert_lines(), diag(&procs)()),
    );
    let e = epochs(&s.w);
    let damaged = e.iter().find(|(ep, _, _)| *ep as u64 == last.0).unwrap();
    println!(
        "MEASURED damaged epoch {}: {} stored of {} journaled",
        damaged.0, damaged.1, last.1
    );
    assert_eq!(
        damaged.1 as u64,
        last.1 - 9,
        "every intact record arrived: 9 were damaged or removed"
    );
    let reports = s.w.events("agent.events_lost", "1", &[]);
    let mut lost: Vec<(String, u64, u64)> = reports
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().to_string(),
                r["count"].as_u64().unwrap(),
                r["first"]["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    lost.sort_by_key(|l| l.2);
    println!("MEASURED agent.events_lost (stage, count, first): {lost:?}");
    assert_eq!(
        lost,
        vec![
            ("journal".to_string(), 1, flipped_seq),
            ("journal-removed".to_string(), 3, removed[0]),
            ("journal-removed".to_string(), 5, cut[0]),
        ]
    );
    let mut levels: Vec<(String, i64, i64)> = gaps
        .iter()
        .map(|g| {
            (
                g["level"].as_str().unwrap().to_string(),
                g["details"]["event"]["first_missing"].as_i64().unwrap(),
                g["details"]["event"]["last_missing"].as_i64().unwrap(),
            )
        })
        .collect();
    levels.sort_by_key(|l| l.1);
    println!("MEASURED gap alerts (level, first, last): {levels:?}");
    assert_eq!(
        levels,
        vec![
            ("yellow".to_string(), flipped_seq as i64, flipped_seq as i64),
            ("red".to_string(), removed[0] as i64, removed[2] as i64),
            ("red".to_string(), cut[0] as i64, cut[4] as i64),
        ],
        "damage is explained by the agent's report; records removed whole are tampering"
    );
    // Each report also raised (or, within the suppression window, counted into) the
    // events-lost alert.
    wait_for(
        "three events-lost alerts counted",
        T,
        || {
            (s.w.count("SELECT SUM(count) FROM alerts WHERE rule_id = 'builtin.agent.events-lost'")
                == 3)
                .then_some(())
        },
        || format!("{:#?}", s.w.alert_lines()),
    );
}

/// A tmpfs of `mib` MiB mounted over `path` until dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(path),
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_loses_events_with_one_exact_report_and_delivery_resumes() {
    if !netns_available() || !require("the disk-full test mounts a tmpfs", have("mount")) {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Heartbeats far apart, so the burst is all that happens while the disk is full.
    let s = setup_quiet();
    let state = s.w.path(&format!("state-{AGENT}"));
    // 8 MiB, of which a 3 MiB filler leaves the journal about 5 MiB.
    let _disk = Tmpfs::mount(&state, 8);
    let filler = state.join("filler");
    fs::write(&filler, vec![0u8; 3 << 20]).unwrap();
    let mut agent = s.w.start_agent(&s.ns, &s.agent_cfg, AGENT);
    wait_for(
        "agent journaling",
        T,
        || (journal_keys(&s.agent_cfg).0 .1 >= 3).then_some(()),
        diag(&[&agent]),
    );
    let before = journal_keys(&s.agent_cfg).0;
    // 20 000 events (three records a pair), about 12 MB: far more than fits.
    const PAIRS: usize = 6667;
    let generated = 3 * PAIRS as u64;
    usb_burst(&s.ns, &s.w.sysfs(), "1-9", BURST, PAIRS);
    // The agent logs the full disk; give it time to take the whole burst.
    wait_for(
        "disk full reported in the agent's log",
        T,
        || {
            agent
                .log_text()
                .contains("disk full under the journal")
                .then_some(())
        },
        diag(&[&agent]),
    );
    std::thread::sleep(Duration::from_secs(5));
    let journaled = journal_keys(&s.agent_cfg).0;
    assert_eq!(journaled.0, before.0, "same epoch");
    // Space returns.
    fs::remove_file(&filler).unwrap();
    let collector = s.w.start_collector(&s.ns, &s.collector_cfg);
    let procs = [&collector, &agent];
    let report = wait_for(
        "the journal-full report stored",
        T,
        || {
            s.w.events(
                "agent.events_lost",
                "json_extract(envelope, '$.event.data.stage') = 'journal-full'",
                &[],
            )
            .pop()
        },
        diag(&procs),
    );
    let lost = report["count"].as_u64().unwrap();
    // Everything journaled is delivered.
    wait_for(
        "delivery complete",
        T,
        || {
            let (last, acked) = journal_keys(&s.agent_cfg);
            (acked == last).then_some(())
        },
        diag(&procs),
    );
    let stored = burst_records(&s.w, "1");
    println!("MEASURED full disk: generated {generated} burst events, stored {stored}, reported lost {lost}: {}", report["reason"]);
    assert!(lost > 0 && stored > 0, "the burst must overflow the disk");
    assert_eq!(
        s.w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.events_lost'"),
        1,
        "one report"
    );
    assert_eq!(
        stored + lost,
        generated,
        "the report counts exactly the events that were not journaled"
    );
    let alert = wait_for(
        "events-lost alert",
        T,
        || alerts_of(&s.w, "builtin.agent.events-lost").pop(),
        diag(&procs),
    );
    println!("MEASURED alert: {}", alert["summary"]);
    // Delivery resumes: an event after the space returned is stored.
    usb_burst(&s.ns, &s.w.sysfs(), "1-9", "AFTER-FULL-1", 1);
    wait_for(
        "an event after the disk emptied stored",
        T,
        || (s.w.burst_count("AFTER-FULL-1") == 2).then_some(()),
        diag(&procs),
    );
    agent.stop();
}

#[test]
fn events_queued_but_not_journaled_at_a_kill_are_counted_at_the_next_start() {
    if !netns_available() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Nothing but the burst while the recorder is held.
    let s = setup_quiet();
    let collector = s.w.start_collector(&s.ns, &s.collector_cfg);
    // The recorder is held (as on a hung disk) while this file exists.
    let stall = s.w.path("stall-recorder");
    let mut c = s.ns.command(weilan_bin());
    c.args(["agent", "run", "--config"])
        .arg(&s.agent_cfg)
        .env("RUST_LOG", "info")
        .env("WEILAN_FAULT_STALL_RECORDER", &stall);
    let mut agent = Proc::spawn(c, s.w.path("agent-stalled.log"), AGENT);
    wait_epoch(&s.w, 1, 3, &[&collector, &agent]);
    fs::write(&stall, "").unwrap();
    wait_for(
        "recorder held",
        T,
        || {
            agent
                .log_text()
                .contains("recorder loop stalled")
                .then_some(())
        },
        diag(&[&agent]),
    );
    const PAIRS: usize = 300;
    usb_burst(&s.ns, &s.w.sysfs(), "1-9", BURST, PAIRS);
    // Every record of the burst queued (the agent's capture ledger says so: queued
    // minus accounted for), the fence's decisions included.
    let ledger = s.w.path(&format!("state-{AGENT}/capture-ledger"));
    let waiting = || {
        let b = fs::read(&ledger).unwrap_or_default();
        let word = |i: usize| {
            b.get(i * 8..i * 8 + 8)
                .map_or(0, |w| u64::from_le_bytes(w.try_into().unwrap()))
        };
        word(1).saturating_sub(word(2))
    };
    wait_for(
        "the whole burst queued behind the held recorder",
        T,
        || (waiting() >= 3 * PAIRS as u64).then_some(()),
        || format!("waiting {}\n{}", waiting(), diag(&[&agent])()),
    );
    agent.kill9();
    fs::remove_file(&stall).unwrap();
    let journaled = journal_keys(&s.agent_cfg).0;
    let agent = s.w.start_agent(&s.ns, &s.agent_cfg, AGENT);
    let procs = [&collector, &agent];
    let report = wait_for(
        "the crash report stored",
        T,
        || {
            s.w.events(
                "agent.events_lost",
                "json_extract(envelope, '$.event.data.stage') = 'crash'",
                &[],
            )
            .pop()
        },
        diag(&procs),
    );
    let lost = report["count"].as_u64().unwrap();
    // Of the burst, what reached the journal before the kill (the new run's look at
    // devices present at its start is not part of it).
    let stored = burst_records(&s.w, &format!("epoch = {}", journaled.0));
    println!(
        "MEASURED kill -9 with the recorder held: {} burst events (attached, decision, detached), {stored} journaled before the kill (journal at {journaled:?}), crash report counts {lost}: {}",
        3 * PAIRS,
        report["reason"]
    );
    assert_eq!(
        stored + lost,
        3 * PAIRS as u64,
        "the crash report counts exactly what was queued and never journaled"
    );
    assert!(lost > 0, "the kill must land while events wait");
    wait_for(
        "events-lost alert for the crash",
        T,
        || {
            alerts_of(&s.w, "builtin.agent.events-lost")
                .into_iter()
                .find(|a| {
                    a["summary"]
                        .as_str()
                        .is_some_and(|t| t.contains("stage crash"))
                })
        },
        diag(&procs),
    );
}
