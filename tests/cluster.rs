//! Several collectors sharing the ingest (issue "Beyond one box", acceptance 2):
//! three `weilan collector serve` processes on one external Mosquitto (the shipped
//! `weilan.conf`, the ACL `broker-acl` prints for them) with MQTT shared
//! subscriptions (`broker.shared_group`) and one PostgreSQL store. The agents are the
//! agent's own journal and uplink (`weilan_agent::journal`, `weilan_agent::uplink`),
//! one per simulated host, in this process. Mid-burst the leading collector is killed
//! with SIGKILL: every event is stored exactly once, the hash chains check out (no
//! integrity alert), each alert is raised once, and another collector takes over the
//! fleet's once-only duties.
//!
//! Size: `CLUSTER_AGENTS` × `CLUSTER_EVENTS` [12 × 2 000]; the issue's run is
//! `CLUSTER_AGENTS=50 CLUSTER_EVENTS=10000 cargo nextest run --test cluster
//! --no-capture` (BENCHMARKS.md, "Several collectors"). `CLUSTER_COLLECTORS` [3] and
//! `CLUSTER_KILL` [1; 0 keeps them all] make the throughput runs of the benchmarks.

mod common;
// The benches' process bookkeeping (`env_or`, `cpu_ticks`): this test is also the
// several-collectors benchmark.
#[path = "../benches/common/mod.rs"]
mod bench_common;

use std::path::Path;
use std::time::{Duration, Instant};

use bench_common::{cpu_ticks, env_or};
use common::*;
use weilan_agent::uplink::Uplink;
use weilan_collector::db::testing::TempDatabase;
use weilan_config::event::Envelope;

/// Every `CLASSIFIED_EVERY`th file carries a classification finding: one red alert
/// each (`builtin.files.classified-export`, a distinct file each time).
const CLASSIFIED_EVERY: u64 = 500;

/// File `n` of `agent` written to a USB stick (the benches' `exported`); every
/// `CLASSIFIED_EVERY`th carries a classification finding.
fn exported(agent: &str, n: u64) -> Envelope {
    let classification = if n.is_multiple_of(CLASSIFIED_EVERY) {
        vec![weilan_config::event::Classification {
            detector: "cn_id".into(),
            count: 2,
            samples: vec!["1101**********1234".into()],
        }]
    } else {
        vec![]
    };
    bench_common::exported(agent, n, classification)
}

/// The settings of collector `name`: docs/deployment.md §10's, with the broker on
/// this test's loopback, the files under `root` and the test's database; each
/// collector its own client id, certificate and alert log.
fn collector_toml(root: &Path, name: &str, url: &str) -> std::path::PathBuf {
    let documented = doc_block("docs/deployment.md", "<!-- cluster-test: settings -->");
    // The first collector holds the PKI; a further one has only what §10 says to copy
    // to its host's /etc/weilan/pki/ (its enrollment registry comes from the database).
    let (pki, cert, key) = match name {
        "weilan-collector" => (
            "pki/".to_string(),
            "pki/collector.pem".to_string(),
            "pki/collector-key.pem".to_string(),
        ),
        other => {
            let dir = root.join(format!("pki-{other}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(root.join("pki/ca.pem"), dir.join("ca.pem")).unwrap();
            for f in [format!("{other}.pem"), format!("{other}-key.pem")] {
                std::fs::copy(root.join("pki/collectors").join(&f), dir.join(&f)).unwrap();
            }
            (
                format!("pki-{other}/"),
                format!("pki-{other}/{other}.pem"),
                format!("pki-{other}/{other}-key.pem"),
            )
        }
    };
    let mut text = documented.clone();
    for (from, to) in [
        ("mqtt.example.internal", "127.0.0.1".to_string()),
        ("port = 8883", format!("port = {BROKER_PORT}")),
        ("\"weilan-collector-b\"", format!("\"{name}\"")),
        ("/etc/weilan/pki/weilan-collector-b.pem", cert),
        ("/etc/weilan/pki/weilan-collector-b-key.pem", key),
        ("/etc/weilan/pki/", pki),
        (
            "/var/lib/weilan-collector/weilan.db",
            "unused.db".to_string(),
        ),
        (
            "postgresql://weilan:PASSWORD@db.example.internal/weilan",
            url.to_string(),
        ),
        // The first collector holds the CA key and enrolls; the others do not.
        (
            "enabled = false",
            format!("enabled = {}", name == "weilan-collector"),
        ),
    ] {
        assert!(
            text.contains(from),
            "§10's settings no longer have {from}:\n{documented}"
        );
        text = text.replace(from, &to);
    }
    text.push_str(&format!(
        "[alerts]\npath = \"alerts-{name}.jsonl\"\n[policy]\npath = \"policy.toml\"\n"
    ));
    let p = root.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// docs/deployment.md §10's certificate and ACL commands, as written, with the PKI
/// and the ACL under `root`; then, beyond the two further collectors it names, one
/// more certificate each and the ACL for them all.
fn documented_pki_steps(root: &Path, pki_dir: &str, acl: &Path, names: &[String]) {
    run_documented_pki_block("<!-- cluster-test: pki -->", pki_dir, acl, root);
    if names.len() > 3 {
        let mut acl_args = vec!["broker-acl".to_string()];
        for (i, name) in names.iter().enumerate().skip(1) {
            if i > 2 {
                collector_cli(&["pki", "issue-collector", name, "--dir", pki_dir]);
            }
            acl_args.extend(["--collector".to_string(), name.clone()]);
        }
        let args: Vec<&str> = acl_args.iter().map(String::as_str).collect();
        std::fs::write(acl, collector_cli(&args)).unwrap();
    }
}

#[test]
fn three_collectors_share_the_ingest_and_one_killed_mid_burst_loses_and_doubles_nothing() {
    if !require("root (network namespace)", is_root())
        || !require("ip netns", netns_available())
        || !require("mosquitto", common::mosquitto::mosquitto().is_some())
    {
        return;
    }
    let Some(pg) = TempDatabase::create("cluster") else {
        return;
    };
    let agents = env_or("CLUSTER_AGENTS", 12);
    let per_agent = env_or("CLUSTER_EVENTS", 2_000) as u64;
    let collectors = env_or("CLUSTER_COLLECTORS", 3).max(1);
    let kill = env_or("CLUSTER_KILL", 1) == 1 && collectors > 1;
    let total = agents as u64 * per_agent;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = weilan_collector::pki::PkiPaths::new(root.join("pki"));
    let pki_dir = pki.dir.display().to_string();
    collector_cli(&[
        "pki",
        "init",
        "--dir",
        &pki_dir,
        "--name",
        "weilan-collector",
        "--name",
        "127.0.0.1",
    ]);
    // The further collectors: their own certificates, and the ACL with their blocks.
    let names: Vec<String> = (0..collectors.max(3))
        .map(|i| match i {
            0 => "weilan-collector".to_string(),
            i => format!("weilan-collector-{}", (b'a' + i as u8) as char),
        })
        .collect();
    let acl = root.join("weilan.acl");
    documented_pki_steps(root, &pki_dir, &acl, &names);
    let agent_names: Vec<String> = (0..agents).map(|i| format!("ws-{i:03}")).collect();
    for a in &agent_names {
        weilan_collector::pki::issue_agent(&pki, a).unwrap();
    }
    std::fs::write(root.join("policy.toml"), "version = \"cluster-1\"\n").unwrap();

    let ns = Netns::create();
    let conf = common::mosquitto::shipped_conf(root, &pki, BROKER_PORT, &acl);
    let mut broker_cmd = ns.command(common::mosquitto::mosquitto().unwrap());
    broker_cmd.arg("-c").arg(&conf);
    let broker = Proc::spawn(broker_cmd, root.join("mosquitto.log"), "mosquitto");
    std::thread::sleep(Duration::from_millis(500));

    let start = |i: usize| {
        let config = collector_toml(root, &names[i], pg.url());
        let mut c = ns.command(weilan_bin());
        c.current_dir(root)
            .args(["collector", "serve", "--config"])
            .arg(&config);
        c.env("RUST_LOG", "info");
        Proc::spawn(c, root.join(format!("{}.log", names[i])), &names[i])
    };
    // The first starts alone and leads; the others join.
    let mut running = vec![start(0)];
    let first_leads = within(Duration::from_secs(30), || {
        running[0]
            .log_text()
            .contains("this collector leads")
            .then_some(())
    });
    assert!(
        first_leads.is_some(),
        "the first collector never led:\n{}",
        running[0].log_text()
    );
    running.extend((1..collectors).map(start));
    for c in &running {
        let subscribed = within(Duration::from_secs(30), || {
            c.log_text().contains("collector subscribed").then_some(())
        });
        assert!(
            subscribed.is_some(),
            "{} never subscribed:\n{}",
            c.name,
            c.log_text()
        );
    }

    let made = Instant::now();
    let uplinks: Vec<Uplink> = agent_names
        .iter()
        .map(|a| {
            let events = (1..=per_agent).map(|n| exported(a, n));
            common::uplink::agent_uplink(root, &pki, a, BROKER_PORT, events)
        })
        .collect();
    println!(
        "journals: {agents} agents × {per_agent} events written in {:?}",
        made.elapsed()
    );
    let db = Conn::open(&pg.location()).expect("store");
    let stored = |db: &Conn| -> i64 {
        db.query_row(
            "SELECT COUNT(*) FROM events WHERE kind = 'file.exported'",
            params![],
            |r| r.get(0),
        )
        .unwrap_or(0)
    };
    let cpu_before: Vec<u64> = running.iter().map(|c| cpu_ticks(c.child.id())).collect();
    let (broker_before, machine_before) = (cpu_ticks(broker.child.id()), machine_ticks());
    let began = Instant::now();
    let delivering = common::uplink::deliver_in(&ns, uplinks);
    let mut killed_at = None;
    let mut cpu_of_killed = 0u64;
    if kill {
        // Mid-burst: a third stored, the leader goes without a word.
        let third = within(Duration::from_secs(300), || {
            (stored(&db) >= total as i64 / 3).then_some(())
        });
        assert!(
            third.is_some(),
            "a third was never stored ({} of {total})",
            stored(&db)
        );
        cpu_of_killed = cpu_ticks(running[0].child.id()) - cpu_before[0];
        running[0].kill9();
        killed_at = Some((began.elapsed(), stored(&db)));
        println!(
            "killed {} (SIGKILL) after {:?} with {} stored",
            names[0],
            began.elapsed(),
            stored(&db)
        );
    }
    delivering.join().expect("uplinks");
    let elapsed = began.elapsed();
    let all = stored(&db);
    let cpu_after: Vec<u64> = running.iter().map(|c| cpu_ticks(c.child.id())).collect();
    let broker_ticks = cpu_ticks(broker.child.id()) - broker_before;
    let machine = machine_ticks();
    let (busy, all_ticks) = (machine.0 - machine_before.0, machine.1 - machine_before.1);
    let ticks: u64 = cpu_after
        .iter()
        .zip(&cpu_before)
        .enumerate()
        .map(|(i, (a, b))| {
            if kill && i == 0 {
                cpu_of_killed
            } else {
                a.saturating_sub(*b)
            }
        })
        .sum();
    let tick_hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    println!(
        "cluster: {collectors} collectors, {agents} agents × {per_agent} = {total} events in {:.1} s = {:.0} events/s; collectors' CPU {:.1} s = {:.0} µs per event{}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        ticks as f64 / tick_hz,
        ticks as f64 / tick_hz * 1e6 / total as f64,
        killed_at.map(|(t, n)| format!("; {} killed at {:.1} s with {n} stored", names[0], t.as_secs_f64())).unwrap_or_default()
    );
    println!(
        "side by side: Mosquitto (the broker relaying every batch and ack) {:.1} s CPU = {:.0} µs per event; the machine {:.0} % busy ({} cores: collectors, broker, PostgreSQL and the simulated agents)",
        broker_ticks as f64 / tick_hz,
        broker_ticks as f64 / tick_hz * 1e6 / total as f64,
        busy as f64 * 100.0 / all_ticks.max(1) as f64,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    let diag = || {
        running
            .iter()
            .map(|c| format!("--- {}\n{}", c.name, tail(&c.log_text(), 40)))
            .collect::<String>()
    };
    // Every event exactly once.
    assert_eq!(all, total as i64, "stored file events\n{}", diag());
    assert_each_event_once(&db, "file.exported", agents, |_| per_agent as i64);
    // The chains check out: no integrity finding or alert anywhere.
    let alerts_of = |rule: &str| -> i64 {
        db.query_row(
            "SELECT COUNT(*) FROM alerts WHERE rule_id LIKE ?1",
            params![rule],
            |r| r.get(0),
        )
        .unwrap()
    };
    let integrity: Vec<(String, String)> = db
        .query_map(
            "SELECT rule_id, summary FROM alerts WHERE rule_id LIKE 'builtin.integrity.%' OR rule_id LIKE 'builtin.agent.%'",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(integrity.is_empty(), "integrity alerts: {integrity:?}");
    // Each alert once: one classified-file alert per classified file, and one
    // mass-export alert per agent however the agent's files were shared out.
    let classified = agents as i64 * (per_agent / CLASSIFIED_EVERY) as i64;
    assert_eq!(
        alerts_of("builtin.files.classified-export"),
        classified,
        "classified-export alerts\n{}",
        diag()
    );
    if per_agent > 51 {
        let mass: Vec<(String, i64)> = db
            .query_map(
                "SELECT agent_id, COUNT(*) FROM alerts WHERE rule_id = 'builtin.files.mass-export-count' GROUP BY agent_id",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            mass.len(),
            agents,
            "agents with a mass-export alert: {mass:?}"
        );
        assert!(
            mass.iter().all(|(_, n)| *n == 1),
            "mass-export alerts raised more than once per agent: {mass:?}"
        );
    }
    if kill {
        // Another collector took over the fleet's duties.
        let took_over = within(Duration::from_secs(30), || {
            running[1..]
                .iter()
                .any(|c| c.log_text().contains("this collector leads"))
                .then_some(())
        });
        assert!(
            took_over.is_some(),
            "no collector took the lead after the kill\n{}",
            diag()
        );
    }
    // Revoked on the CA host (the first collector's, back after its crash): every
    // collector's registry takes the revocation from the database.
    collector_cli(&[
        "agents",
        "revoke",
        "ws-000",
        "--reason",
        "cluster test",
        "--dir",
        &pki_dir,
    ]);
    if kill {
        running[0] = start(0);
    }
    for name in &names[1..collectors] {
        let registry = root.join(format!("pki-{name}/registry.jsonl"));
        let revoked = within(Duration::from_secs(20), || {
            std::fs::read_to_string(&registry)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("\"revoked\"") && l.contains("\"ws-000\""))
                .then_some(())
        });
        assert!(
            revoked.is_some(),
            "{name} never learnt of the revocation\n{}",
            running
                .iter()
                .map(|c| format!("--- {}\n{}", c.name, tail(&c.log_text(), 40)))
                .collect::<String>()
        );
    }
    for c in &mut running {
        c.stop();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// (busy, all) clock ticks of every CPU since boot, from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let all: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (all - idle, all)
}
