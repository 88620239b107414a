//! Districts and a province (issue "Beyond one box", item 5 and acceptance 4): a
//! district collector forwards its agents' signed batches verbatim to a province
//! collector over mutual TLS; the link between them is cut mid-burst; afterwards
//! every event is at the province exactly once, verified there against the
//! district's CA, and a batch the district alters or puts under another agent's name
//! is refused there.
//!
//! Two network namespaces joined by a veth pair stand for the district's site and
//! the province's: each has the shipped Mosquitto configuration and a collector
//! (`weilan collector serve`, docs/deployment.md §12's settings and commands); the
//! district's agents are the agent's own journal and uplink, in this process. The
//! cut is an nftables rule in the district's namespace that drops everything to the
//! province (packets vanish, as on a failed WAN line).
//!
//! Size: `FEDERATION_EVENTS` [10 000] from `FEDERATION_AGENTS` [10], of which the
//! first has 46 % (more batches than the forwarder sends of one agent at once: the
//! others' must not wait behind it), cut for
//! `FEDERATION_CUT_SECS` [30]; the issue's run is `FEDERATION_CUT_SECS=600 cargo
//! nextest run --test federation --no-capture` (10 000 events, 10 minutes).

#[path = "../benches/common/mod.rs"]
mod bench_common;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bench_common::env_or;
use common::*;
use weilan_collector::pki::PkiPaths;
use weilan_config::signing::Signer;

const DISTRICT: &str = "weilan-district-east";
const DISTRICT_ADDR: &str = "10.79.0.1";
const PROVINCE_ADDR: &str = "10.79.0.2";

fn pki_init(dir: &Path) -> PkiPaths {
    let d = dir.display().to_string();
    collector_cli(&[
        "pki",
        "init",
        "--dir",
        &d,
        "--name",
        "weilan-collector",
        "--name",
        "127.0.0.1",
    ]);
    PkiPaths::new(dir)
}

/// docs/deployment.md §12's commands on the province's CA host, as written, with
/// the province's PKI and the ACL under `province`.
fn documented_province_pki(province: &Path, acl: &Path) {
    run_documented_pki_block(
        "<!-- federation-test: pki -->",
        &province.join("pki").display().to_string(),
        acl,
        province,
    );
}

/// A site's database: SQLite in its folder, or with `WEILAN_TEST_STORE=postgresql` a
/// PostgreSQL database of its own (CI runs this test on both engines).
struct SiteDb(Option<weilan_collector::db::testing::TempDatabase>);

impl SiteDb {
    fn new() -> SiteDb {
        SiteDb(common::postgres_for_this_run())
    }

    /// The collector's `[store]` keys.
    fn store_keys(&self) -> String {
        match &self.0 {
            Some(db) => format!("path = \"weilan.db\"\nurl = \"{}\"", db.url()),
            None => "path = \"weilan.db\"".into(),
        }
    }

    fn location(&self, site: &Path) -> Location {
        match &self.0 {
            Some(db) => db.location(),
            None => Location::Sqlite(site.join("weilan.db")),
        }
    }
}

/// A collector on its site's broker (127.0.0.1 of its namespace) and database, plus
/// §12's block `marker` with `replacements`.
fn collector_toml(
    site: &Path,
    db: &SiteDb,
    marker: &str,
    replacements: &[(&str, String)],
) -> PathBuf {
    let documented = doc_block("docs/deployment.md", marker);
    let mut block = documented.clone();
    for (from, to) in replacements {
        assert!(
            block.contains(from),
            "§12's {marker} no longer has {from}:\n{documented}"
        );
        block = block.replace(from, to);
    }
    let text = format!(
        "[broker]\nmode = \"external\"\nhost = \"127.0.0.1\"\nport = {BROKER_PORT}\n\n\
         [tls]\nca = \"pki/ca.pem\"\nserver_cert = \"pki/server.pem\"\nserver_key = \"pki/server-key.pem\"\n\
         client_cert = \"pki/collector.pem\"\nclient_key = \"pki/collector-key.pem\"\n\n\
         [store]\n{store}\n[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n\
         [enroll]\nenabled = false\n\n{block}\n",
        store = db.store_keys()
    );
    std::fs::write(site.join("policy.toml"), "version = \"federation-1\"\n").unwrap();
    let p = site.join("collector.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `weilan collector check-config` of the site's settings: whether it passes as
/// expected (exit 0, or 64); what it said.
fn check_config(site: &Path, passes: bool) -> String {
    let out = Command::new(weilan_bin())
        .current_dir(site)
        .args(["collector", "check-config", "--config", "collector.toml"])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(if passes { 0 } else { 64 }),
        "check-config in {}: {said}",
        site.display()
    );
    said
}

fn start_collector(ns: &Netns, site: &Path, name: &str) -> Proc {
    let mut c = ns.command(weilan_bin());
    c.current_dir(site)
        .args(["collector", "serve", "--config", "collector.toml"])
        .env("RUST_LOG", "info");
    Proc::spawn(c, site.join("collector.log"), name)
}

fn start_broker(ns: &Netns, site: &Path, pki: &PkiPaths, address: &str, acl: &Path) -> Proc {
    let conf = common::mosquitto::shipped_conf_on(site, pki, address, BROKER_PORT, acl);
    let mut cmd = ns.command(common::mosquitto::mosquitto().unwrap());
    cmd.arg("-c").arg(&conf);
    Proc::spawn(cmd, site.join("mosquitto.log"), "mosquitto")
}

fn count(db: &Conn, sql: &str) -> i64 {
    db.query_row(sql, params![], |r| r.get(0)).unwrap_or(0)
}

/// Waits until `what` appears in `p`'s log.
fn logged(p: &Proc, what: &str) {
    let seen = within(Duration::from_secs(30), || {
        p.log_text().contains(what).then_some(())
    });
    assert!(
        seen.is_some(),
        "{} never logged `{what}`:\n{}",
        p.name,
        p.log_text()
    );
}

/// Drops (`true`) or lets through again (`false`) everything the district's
/// namespace sends to the province.
fn cut_link(district: &Netns, cut: bool) {
    if cut {
        for rule in [
            "add table inet weilan_cut".to_string(),
            "add chain inet weilan_cut out { type filter hook output priority 0 ; }".to_string(),
            format!("add rule inet weilan_cut out ip daddr {PROVINCE_ADDR} drop"),
        ] {
            run_ok(district.command("nft").args(rule.split(' ')));
        }
    } else {
        run_ok(
            district
                .command("nft")
                .args(["delete", "table", "inet", "weilan_cut"]),
        );
    }
}

#[test]
fn a_district_forwards_through_a_cut_link_and_the_province_stores_every_event_once() {
    if !require("root (network namespace)", is_root())
        || !require("ip netns", netns_available())
        || !require("mosquitto", common::mosquitto::mosquitto().is_some())
        || !require("nft", which("nft").is_some())
    {
        return;
    }
    let agents = env_or("FEDERATION_AGENTS", 10);
    let total_events = env_or("FEDERATION_EVENTS", 10_000) as u64;
    // The first agent has 46 %, the others share the rest evenly.
    let small = total_events * 54 / 100 / (agents as u64 - 1).max(1);
    let big = total_events - small * (agents as u64 - 1);
    let events_of = |i: usize| if i == 0 { big } else { small };
    let cut_for = Duration::from_secs(env_or("FEDERATION_CUT_SECS", 30) as u64);
    let total = total_events as i64;
    let dir = tempfile::tempdir().unwrap();
    let (district, province) = (dir.path().join("district"), dir.path().join("province"));
    let district_pki = pki_init(&district.join("pki"));
    let province_pki = pki_init(&province.join("pki"));
    let province_acl = province.join("weilan.acl");
    documented_province_pki(&province, &province_acl);
    // What §12 says to copy between the two sites.
    let to_district = district.join("province");
    std::fs::create_dir_all(&to_district).unwrap();
    std::fs::copy(province_pki.ca(), to_district.join("ca.pem")).unwrap();
    for f in [format!("{DISTRICT}.pem"), format!("{DISTRICT}-key.pem")] {
        std::fs::copy(
            province_pki.dir.join("districts").join(&f),
            to_district.join(&f),
        )
        .unwrap();
    }
    let to_province = province.join("districts");
    std::fs::create_dir_all(&to_province).unwrap();
    std::fs::copy(
        district_pki.ca(),
        to_province.join(format!("{DISTRICT}-ca.pem")),
    )
    .unwrap();
    let agent_names: Vec<String> = (0..agents).map(|i| format!("ws-{i:03}")).collect();
    for a in &agent_names {
        weilan_collector::pki::issue_agent(&district_pki, a).unwrap();
    }

    let (district_ns, province_ns) = (Netns::create(), Netns::create());
    link_namespaces(&district_ns, DISTRICT_ADDR, &province_ns, PROVINCE_ADDR);
    let _district_broker = start_broker(
        &district_ns,
        &district,
        &district_pki,
        "127.0.0.1",
        &common::mosquitto::shipped_acl(),
    );
    let _province_broker = start_broker(
        &province_ns,
        &province,
        &province_pki,
        "0.0.0.0",
        &province_acl,
    );
    std::thread::sleep(Duration::from_millis(500));
    let (province_site_db, district_site_db) = (SiteDb::new(), SiteDb::new());
    collector_toml(
        &province,
        &province_site_db,
        "<!-- federation-test: province -->",
        &[("/etc/weilan/districts/", "districts/".into())],
    );
    collector_toml(
        &district,
        &district_site_db,
        "<!-- federation-test: district -->",
        &[
            ("province.example.internal", PROVINCE_ADDR.into()),
            ("port = 8883", format!("port = {BROKER_PORT}")),
            ("/etc/weilan/province/", "province/".into()),
            // The backlog alert within the test's cut.
            ("backlog_alert_secs = 900", "backlog_alert_secs = 10".into()),
        ],
    );
    check_config(&province, true);
    check_config(&district, true);
    // A district that presents its own collector certificate to the province is
    // told so before it starts.
    let good = std::fs::read_to_string(district.join("collector.toml")).unwrap();
    let wrong = good
        .replace(&format!("province/{DISTRICT}.pem"), "pki/collector.pem")
        .replace(
            &format!("province/{DISTRICT}-key.pem"),
            "pki/collector-key.pem",
        );
    std::fs::write(district.join("collector.toml"), wrong).unwrap();
    let said = check_config(&district, false);
    assert!(
        said.contains("not a district certificate of the province CA"),
        "{said}"
    );
    std::fs::write(district.join("collector.toml"), good).unwrap();
    let mut province_collector = start_collector(&province_ns, &province, "province");
    let mut district_collector = start_collector(&district_ns, &district, "district");
    logged(&province_collector, "collector subscribed");
    logged(&district_collector, "collector subscribed");
    logged(&district_collector, "connected to the province");

    let uplinks = agent_names
        .iter()
        .map(|a| {
            let i: usize = a[3..].parse().unwrap();
            let events = (1..=events_of(i)).map(|n| bench_common::exported(a, n, vec![]));
            common::uplink::agent_uplink(&district, &district_pki, a, BROKER_PORT, events)
        })
        .collect();
    let began = Instant::now();
    let delivering = common::uplink::deliver_in(&district_ns, uplinks);
    let province_db = Conn::open(&province_site_db.location(&province)).unwrap();
    let district_db = Conn::open(&district_site_db.location(&district)).unwrap();
    let files = "SELECT COUNT(*) FROM events WHERE kind = 'file.exported'";
    let diag = |what: &str| {
        format!(
            "{what}\n--- district\n{}\n--- province\n{}",
            district_collector.log_text(),
            province_collector.log_text()
        )
    };
    // Mid-burst: some of it at the province, then the line goes dead.
    let some = within(Duration::from_secs(120), || {
        (count(&province_db, files) >= total / 10).then_some(())
    });
    assert!(some.is_some(), "{}", diag("nothing reached the province"));
    cut_link(&district_ns, true);
    let at_cut = count(&province_db, files);
    println!(
        "link cut after {:.1} s with {at_cut} of {total} at the province",
        began.elapsed().as_secs_f64()
    );
    let cut_began = Instant::now();
    delivering.join().expect("uplinks");
    println!(
        "every agent's journal acknowledged by the district after {:.1} s",
        began.elapsed().as_secs_f64()
    );
    std::thread::sleep(cut_for.saturating_sub(cut_began.elapsed()));
    let before_restore = count(&province_db, files);
    let queued = count(&district_db, "SELECT COUNT(*) FROM federation_outbox");
    // More of the first agent's batches than the forwarder has out for one agent
    // (32): after the cut the others' are sent beside them, not behind.
    let queued_first = count(
        &district_db,
        "SELECT COUNT(*) FROM federation_outbox WHERE agent_id = 'ws-000'",
    );
    println!(
        "after {:.0} s cut: district {} stored, {queued} batches queued ({queued_first} of ws-000); province {before_restore}",
        cut_began.elapsed().as_secs_f64(),
        count(&district_db, files)
    );
    cut_link(&district_ns, false);
    let restored = Instant::now();
    let all = within(Duration::from_secs(300), || {
        (count(&province_db, files) >= total).then_some(())
    });
    assert!(
        all.is_some(),
        "{}",
        diag(&format!(
            "the province has {} of {total}",
            count(&province_db, files)
        ))
    );
    println!(
        "province complete {:.1} s after the link came back: {total} events",
        restored.elapsed().as_secs_f64()
    );

    // Every event at the province exactly once, contiguous per agent.
    assert_eq!(count(&province_db, files), total);
    assert_each_event_once(&province_db, "file.exported", agents, |agent| {
        events_of(agent[3..].parse().unwrap()) as i64
    });
    // Verified there: nothing refused, the chains intact, each agent bound to the district.
    assert_eq!(
        count(&province_db, "SELECT COUNT(*) FROM quarantine"),
        0,
        "{}",
        diag("refused at the province")
    );
    let integrity: Vec<String> = province_db
        .query_map(
            "SELECT summary FROM alerts WHERE rule_id LIKE 'builtin.integrity.%' OR rule_id LIKE 'builtin.agent.%'",
            params![],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        integrity.is_empty(),
        "integrity alerts at the province: {integrity:?}"
    );
    assert_eq!(
        count(
            &province_db,
            &format!("SELECT COUNT(*) FROM federated_agents WHERE district = '{DISTRICT}'")
        ),
        agents as i64
    );
    // The dead line held events back; the district said so and then drained its queue.
    assert!(
        before_restore < total,
        "every event reached the province while the link was cut"
    );
    if cut_for >= Duration::from_secs(25) {
        assert!(queued > 0, "nothing waited at the district during the cut");
        if total >= 10_000 {
            assert!(
                queued_first > 32,
                "only {queued_first} of ws-000's batches queued"
            );
        }
        let backlog = count(
            &district_db,
            "SELECT COUNT(*) FROM alerts WHERE rule_id = 'builtin.collector.federation-backlog'",
        );
        assert_eq!(backlog, 1, "{}", diag("the backlog alert"));
    }
    let drained = within(Duration::from_secs(30), || {
        (count(&district_db, "SELECT COUNT(*) FROM federation_outbox") == 0).then_some(())
    });
    assert!(
        drained.is_some(),
        "{}",
        diag("the district's outbox never drained")
    );

    // The test publishes as the district next: the broker would hand the district's
    // session back and forth between the two.
    district_collector.stop();
    refused_at_the_province(&province_ns, &province_pki, &district_pki, &province_db);
    province_collector.stop();
}

/// A batch the district altered, and one put under another agent's name, published
/// as the district: both refused at the province, nothing stored.
fn refused_at_the_province(
    province_ns: &Netns,
    province_pki: &PkiPaths,
    district_pki: &PkiPaths,
    province_db: &Conn,
) {
    let before = count(province_db, "SELECT COUNT(*) FROM events");
    let signer = |a: &str| {
        Signer::from_pem_files(&district_pki.agent(a), &district_pki.agent_key(a)).unwrap()
    };
    let batch = |a: &str| {
        let mut prev = String::new();
        let events = vec![bench_common::exported(a, 900_001, vec![])];
        bench_common::signed_batch(&signer(a), a, 9, events, &mut prev)
    };
    let tampered = String::from_utf8(batch("ws-000"))
        .unwrap()
        .replacen("file.exported", "file.exporteX", 1)
        .into_bytes();
    let districts = province_pki.dir.join("districts");
    let tls = || {
        test_client_tls(
            &province_pki.ca(),
            Some((
                &districts.join(format!("{DISTRICT}.pem")),
                &districts.join(format!("{DISTRICT}-key.pem")),
            )),
        )
    };
    // Refused for good, and acknowledged as refused: the district takes them off
    // its queue instead of sending them forever.
    let acks = publish_collecting(
        province_ns,
        DISTRICT,
        tls(),
        &weilan_config::topics::federation_acks(DISTRICT),
        vec![
            (
                weilan_config::topics::federation_batches(DISTRICT, "ws-000"),
                tampered,
            ),
            (
                weilan_config::topics::federation_batches(DISTRICT, "ws-000"),
                batch("ws-001"),
            ),
        ],
        2,
    );
    assert_eq!(acks.len(), 2, "refusal acks");
    let province = weilan_config::signing::Verifier::from_ca_file(&province_pki.ca()).unwrap();
    for a in &acks {
        let signed = weilan_config::wire::decode_signed(a, 1 << 20).unwrap();
        province
            .verify(
                &signed,
                weilan_config::wire::Purpose::Ack,
                weilan_config::signing::Role::Collector,
            )
            .expect("signed by the province collector");
        let ack: weilan_config::wire::Ack = serde_json::from_str(&signed.body).unwrap();
        assert_eq!((ack.stored, ack.rejected.len()), (0, 1), "{ack:?}");
        assert!(
            ack.rejected[0]
                .reason
                .starts_with("refused by the province"),
            "{ack:?}"
        );
    }
    // Not its own topic: the province broker's ACL drops it unseen (and the
    // connection with it).
    let _ = publish_denied(
        province_ns,
        DISTRICT,
        tls(),
        &weilan_config::topics::federation_batches("weilan-district-west", "ws-000"),
        batch("ws-000"),
    );
    let reasons = within(Duration::from_secs(30), || {
        let r: Vec<String> = province_db
            .query_map("SELECT reason FROM quarantine", params![], |r| r.get(0))
            .unwrap();
        (r.len() >= 2).then_some(r)
    })
    .expect("both refusals quarantined at the province");
    assert!(
        reasons.iter().any(|r| r.contains("signature")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("signed by agent `ws-001`")),
        "{reasons:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let reasons: Vec<String> = province_db
        .query_map("SELECT reason FROM quarantine", params![], |r| r.get(0))
        .unwrap();
    assert_eq!(
        reasons.len(),
        2,
        "the broker let the district publish for another district: {reasons:?}"
    );
    assert_eq!(count(province_db, "SELECT COUNT(*) FROM events"), before);
    let red = count(
        province_db,
        "SELECT COUNT(*) FROM alerts WHERE rule_id = 'builtin.integrity.bad-signature'",
    );
    assert!(red >= 1, "no bad-signature alert at the province");
}
