//! Exports from a known event set: every count against the database, the files'
//! encodings, scope, and verification failing on any change, removal, addition or
//! replaced link of the chain.

use std::path::{Path, PathBuf};

use serde_json::json;
use weilan_config::event::{record_hash, Envelope, GENESIS_HASH, SCHEMA_VERSION};

use super::{export, verify, Lang, Request};
use crate::db::{params, Conn, Location, Sql};
use crate::pki::{self, PkiPaths};
use crate::rules::{Engine, Fact};
use crate::store::{Incoming, Store};

struct Fixture {
    dir: tempfile::TempDir,
    db: Location,
    _postgres: Option<crate::db::testing::TempDatabase>,
    pki: PkiPaths,
}

const FROM: &str = "2026-11-20T16:00:00Z"; // 2026-11-21 00:00 Shanghai
const TO: &str = "2026-11-21T16:00:00Z";

fn usb(serial: &str, hash: &str) -> serde_json::Value {
    json!({"port_path": "1-1", "busnum": 1, "devnum": 5, "vid": "abcd", "pid": "1234",
        "bcd_device": "0100", "serial": serial, "manufacturer": "Acme", "product": "Stick",
        "device_class": 0, "interfaces": [{"number": 0, "class": 8, "subclass": 6, "protocol": 80}],
        "speed": "480", "authorized": false, "hash": hash, "parent_hash": null,
        "block_devices": [], "present_at_start": false})
}

fn exported(path: &str, classified: bool) -> serde_json::Value {
    json!({"path": path, "mount_point": "/media/u", "fs_type": "vfat",
        "mount_source": "/dev/sdb1", "usb_serial": "S-1", "usb_hash": "h1", "size": 1000,
        "sha256": "00", "hashed_bytes": 1000, "pid": 42, "exe": "/usr/bin/cp",
        "cmdline": "cp", "uid": 1000, "user": "张三", "first_write": FROM, "last_write": FROM,
        "attribution": "fanotify",
        "classification": if classified { json!([{"detector": "cn_id", "count": 2, "samples": ["1101**"]}]) } else { json!([]) },
        "classification_note": null, "exit": "removable", "action": "audit",
        "rule_id": "files.default", "origins": []})
}

/// One agent's journal: its next sequence number and the hash the next record names.
struct Stream<'a> {
    agent: &'a str,
    role: &'a str,
    seq: u64,
    prev: String,
}

/// Stores `events` of the stream's agent as ingest does (chained records, rules in
/// the same transaction), received at `at`.
fn ingest(
    store: &mut Store,
    engine: &mut Engine,
    s: &mut Stream<'_>,
    at: &str,
    events: Vec<(&str, serde_json::Value)>,
) {
    let policy = weilan_config::load::load_str::<weilan_config::policy::PolicyFile>(
        weilan_config::examples::POLICY_TOML,
        Path::new("policy.toml"),
        PathBuf::from("."),
    )
    .unwrap();
    let raws: Vec<String> = events
        .into_iter()
        .map(|(kind, data)| {
            s.seq += 1;
            let env = json!({
                "schema": SCHEMA_VERSION, "event_id": format!("{}:1:{}", s.agent, s.seq), "time": at,
                "host_role": s.role, "prev_hash": s.prev.clone(),
                "event": {"kind": kind, "data": data},
            });
            // Serialized as the agent journals it (the struct's field order), so
            // heartbeats can be compacted and rebuilt byte for byte.
            let raw = serde_json::to_string(&serde_json::from_value::<Envelope>(env).unwrap())
                .unwrap();
            s.prev = record_hash(raw.as_bytes());
            raw
        })
        .collect();
    let incoming: Vec<Incoming<'_>> = raws.iter().map(|r| Incoming::parse(r).unwrap()).collect();
    let now: jiff::Timestamp = at.parse().unwrap();
    store
        .in_transaction(|tx| {
            crate::ingest::store_batch_in(tx, s.agent, &incoming, now, |tx, stored, found| {
                let mut facts: Vec<Fact> = stored
                    .iter()
                    .map(|s| Fact::from_envelope(s.envelope))
                    .collect();
                facts.extend(found.iter().map(|f| Fact::from_finding(f, now)));
                engine.evaluate(tx, &policy, &facts, now)
            })
        })
        .unwrap();
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pki = PkiPaths::new(dir.path().join("pki"));
    pki::init(&pki, &["localhost".into()]).unwrap();
    let (db, postgres) = crate::db::testing::store_location(dir.path());
    let mut store = Store::open_at(&db).unwrap();
    let mut engine = Engine::new(true, None).unwrap();
    for (agent, role) in [
        ("ws-1", "workstation"),
        ("ws-2", "workstation"),
        ("srv-1", "server-room"),
    ] {
        let mut st = Stream {
            agent,
            role,
            seq: 0,
            prev: GENESIS_HASH.to_string(),
        };
        // Before the period: not exported.
        ingest(
            &mut store,
            &mut engine,
            &mut st,
            "2026-11-20T10:00:00Z",
            vec![(
                "usb.attached",
                usb(&format!("{agent}-OLD"), &format!("{agent}-old")),
            )],
        );
        // In the period.
        ingest(
            &mut store,
            &mut engine,
            &mut st,
            "2026-11-21T02:00:00Z",
            vec![
                (
                    "agent.heartbeat",
                    json!({"agent_version": "0.1.0", "uptime_secs": 5, "policy_version": "v7", "backlog": 0, "dropped_total": 0}),
                ),
                (
                    "usb.attached",
                    usb(&format!("{agent}-U1"), &format!("{agent}-h1")),
                ),
                (
                    "usb.decision",
                    json!({"port_path": "1-1", "vid": "abcd", "pid": "1234", "serial": format!("{agent}-U1"),
                "manufacturer": "Acme", "product": "Stick", "hash": format!("{agent}-h1"), "target": "block",
                "rule_id": "implicit default", "reason": "r", "trigger": "attach", "mode": "enforce",
                "actions": [], "enforced": true, "error": null, "policy_version": "v7"}),
                ),
                ("file.exported", exported("/media/u/机密报告.docx", true)),
                (
                    "file.exported",
                    exported("/media/u/notes, \"draft\".txt", false),
                ),
            ],
        );
        ingest(
            &mut store,
            &mut engine,
            &mut st,
            "2026-11-21T15:59:59Z",
            vec![(
                "net.transfer",
                json!({"pid": 77, "exe": "/usr/bin/curl", "cmdline": "curl -T x", "uid": 1000,
                "user": "bob", "protocol": "tcp", "local_addr": "192.0.2.10", "local_port": 40000,
                "remote_addr": "203.0.113.9", "remote_port": 443, "remote_host": null, "bytes_sent": 5000000,
                "bytes_received": 300, "duration_ms": 900, "phase": "closed", "allowlisted": false,
                "sensitive_files": [], "action": "audit", "rule_id": "net.default"}),
            )],
        );
        // At the period's end (exclusive): the next export's.
        ingest(
            &mut store,
            &mut engine,
            &mut st,
            TO,
            vec![(
                "usb.attached",
                usb(&format!("{agent}-NEXT"), &format!("{agent}-next")),
            )],
        );
        store
            .touch_agent(agent, Some("online"), Some("0.1.0"), None, None)
            .unwrap();
    }
    // Known to the collector since before the period (the fixture is written today).
    store
        .conn()
        .execute(
            "UPDATE agents SET first_seen = '2026-11-20T00:00:00Z'",
            params![],
        )
        .unwrap();
    Fixture {
        dir,
        db,
        _postgres: postgres,
        pki,
    }
}

fn request(f: &Fixture, name: &str, lang: Lang, agents: Option<Vec<String>>) -> Request {
    Request {
        from: FROM.parse().unwrap(),
        to: TO.parse().unwrap(),
        tz: jiff::tz::TimeZone::get("Asia/Shanghai").unwrap(),
        agents,
        scope_label: None,
        lang,
        dir: f.dir.path().join("exports").join(name),
        schedule: None,
        caught_up: false,
        heartbeats_in_csv: false,
    }
}

fn run(f: &Fixture, req: &Request) -> super::Summary {
    std::fs::create_dir_all(req.dir.parent().unwrap()).unwrap();
    let signer =
        weilan_config::signing::Signer::from_pem_files(&f.pki.collector(), &f.pki.collector_key())
            .unwrap();
    let rules = crate::rules::RuleSet::load(true, None).unwrap();
    export(&f.db.clone(), &signer, &rules, req, &mut |_, _| {}).unwrap()
}

fn db_count(f: &Fixture, sql: &str) -> u64 {
    let conn = Conn::open(&f.db.clone()).unwrap();
    conn.query_row(sql, params![FROM, TO], |r| r.get::<i64>(0))
        .unwrap() as u64
}

fn csv_rows(path: &Path) -> Vec<csv::StringRecord> {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\xEF\xBB\xBF"),
        "{} starts with a UTF-8 BOM",
        path.display()
    );
    csv::Reader::from_reader(&bytes[3..])
        .records()
        .map(|r| r.unwrap())
        .collect()
}

fn verifier(f: &Fixture) -> weilan_config::signing::Verifier {
    weilan_config::signing::Verifier::from_ca_file(&f.pki.ca()).unwrap()
}

#[test]
fn every_count_in_csv_json_and_html_matches_the_database() {
    let f = fixture();
    let s = run(&f, &request(&f, "zh", Lang::Zh, None));
    let events = db_count(
        &f,
        "SELECT COUNT(*) FROM events WHERE received_at >= ?1 AND received_at < ?2",
    );
    let alerts = db_count(
        &f,
        "SELECT COUNT(*) FROM alerts WHERE time >= ?1 AND time < ?2",
    );
    assert_eq!(events, 18, "3 agents × 6 events in the period");
    assert!(alerts > 0);
    assert_eq!((s.events, s.alerts), (events, alerts));
    // 3 heartbeats (one per agent): in events.jsonl and counted, not rows of
    // events.csv unless asked for.
    let rows = csv_rows(&s.dir.join("events.csv"));
    assert_eq!(rows.len() as u64, events - 3);
    assert!(rows.iter().all(|r| &r[5] != "agent.heartbeat"));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.dir.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["counts"]["heartbeats"], 3);
    let mut all = request(&f, "with-heartbeats", Lang::Zh, None);
    all.heartbeats_in_csv = true;
    let with = run(&f, &all);
    assert_eq!(csv_rows(&with.dir.join("events.csv")).len() as u64, events);
    // Chinese text, commas and quotes survive the CSV round trip.
    assert!(rows
        .iter()
        .any(|r| &r[8] == "/media/u/机密报告.docx" && &r[6] == "张三"));
    assert!(rows
        .iter()
        .any(|r| &r[8] == "/media/u/notes, \"draft\".txt"));
    let conn = Conn::open(&f.db.clone()).unwrap();
    let jsonl = std::fs::read_to_string(s.dir.join("events.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count() as u64, events);
    for line in jsonl.lines() {
        let id = serde_json::from_str::<Envelope>(line)
            .unwrap()
            .event_id
            .to_string();
        let stored: String = conn
            .query_row(
                "SELECT envelope FROM events WHERE event_id = ?1",
                params![&id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(line, stored, "the stored record, byte for byte");
    }
    assert_eq!(csv_rows(&s.dir.join("alerts.csv")).len() as u64, alerts);
    assert_eq!(
        std::fs::read_to_string(s.dir.join("alerts.jsonl"))
            .unwrap()
            .lines()
            .count() as u64,
        alerts
    );
    let html = std::fs::read_to_string(s.dir.join("report.html")).unwrap();
    let level = |l: &str| {
        db_count(
            &f,
            &format!(
                "SELECT COUNT(*) FROM alerts WHERE time >= ?1 AND time < ?2 AND level = '{l}'"
            ),
        )
    };
    for (label, l) in [("红", "red"), ("黄", "yellow"), ("蓝", "blue")] {
        assert!(
            html.contains(&format!("{label} {}</span>", level(l))),
            "{label}: {}",
            level(l)
        );
    }
    assert!(html.contains(&format!("{events} 条事件 · {alerts} 条告警")));
    let classified = db_count(&f, match f.db.engine() {
        crate::db::Engine::Sqlite => "SELECT COUNT(*) FROM events WHERE received_at >= ?1 AND received_at < ?2 AND kind = 'file.exported' AND json_array_length(json_extract(envelope, '$.event.data.classification')) > 0",
        crate::db::Engine::Postgres => "SELECT COUNT(*) FROM events WHERE received_at >= ?1 AND received_at < ?2 AND kind = 'file.exported' AND jsonb_array_length(envelope::jsonb #> '{event,data,classification}') > 0",
    });
    assert!(
        html.contains(&format!("<p class=\"note\">{classified} 个含分类结果")),
        "{classified}"
    );
    assert_eq!(
        html.matches("/media/u/机密报告.docx").count() as u64,
        classified
    );
    let transfers = db_count(&f, "SELECT COUNT(*) FROM events WHERE received_at >= ?1 AND received_at < ?2 AND kind = 'net.transfer'");
    assert!(html.contains(&format!("{transfers} 次传输")));
    assert!(
        html.contains("<td>v7</td><td>srv-1, ws-1, ws-2</td>"),
        "policy versions in force"
    );
    assert!(
        html.contains("<td class=\"n\">3</td><td class=\"n\">3</td>"),
        "fleet: 3 expected, 3 reporting"
    );
    assert!(
        html.contains("NIST AU-9") && html.contains("等保2.0 8.1.4.3 安全审计"),
        "mapping section"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("<script"),
        "self-contained"
    );
    assert!(html.contains("<svg id=\"chart-days\"") && html.matches("<rect").count() > 3);
    let v = verify::verify(&s.dir, &verifier(&f)).unwrap();
    assert_eq!((v.exports.len(), v.files), (1, 5));
}

#[test]
fn the_english_report_and_a_scoped_export_count_only_their_agents() {
    let f = fixture();
    let s = run(&f, &request(&f, "en", Lang::En, Some(vec!["ws-1".into()])));
    assert_eq!(s.events, 6);
    let html = std::fs::read_to_string(s.dir.join("report.html")).unwrap();
    assert!(html.contains("<html lang=\"en\">") && html.contains("Alerts by level"));
    assert!(html.contains("6 events ·"), "{}", &html[..400]);
    assert!(!html.contains("ws-2"), "out of scope");
    assert!(csv_rows(&s.dir.join("events.csv"))
        .iter()
        .all(|r| &r[3] == "ws-1"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn verification_names_any_changed_removed_or_added_file_and_a_replaced_link() {
    let f = fixture();
    let first = run(&f, &request(&f, "first", Lang::En, None));
    let mut req = request(&f, "second", Lang::En, None);
    req.from = TO.parse().unwrap();
    req.to = "2026-11-22T16:00:00Z".parse().unwrap();
    let second = run(&f, &req);
    assert_eq!(second.previous.as_deref(), Some("first"));
    let v = verify::verify(&second.dir, &verifier(&f)).unwrap();
    assert_eq!(v.exports.len(), 2, "the chain back to the first export");

    // Any byte of any file.
    for name in [
        "events.csv",
        "events.jsonl",
        "alerts.csv",
        "alerts.jsonl",
        "report.html",
        "manifest.json",
        "manifest.sig",
    ] {
        let work = f.dir.path().join(format!("tamper-{name}"));
        copy_dir(&first.dir, &work);
        let p = work.join(name);
        let mut bytes = std::fs::read(&p).unwrap();
        let i = bytes.len() / 2;
        bytes[i] ^= 0x01;
        std::fs::write(&p, bytes).unwrap();
        let err = verify::verify(&work, &verifier(&f)).unwrap_err();
        let named = if name == "manifest.json" {
            "manifest.sig"
        } else {
            name
        };
        assert!(err.contains(named), "{name}: {err}");
    }
    // A file removed, a file added.
    let work = f.dir.path().join("removed");
    copy_dir(&first.dir, &work);
    std::fs::remove_file(work.join("alerts.csv")).unwrap();
    let err = verify::verify(&work, &verifier(&f)).unwrap_err();
    assert!(
        err.contains("alerts.csv") && err.contains("missing"),
        "{err}"
    );
    let work = f.dir.path().join("added");
    copy_dir(&first.dir, &work);
    std::fs::write(work.join("extra.csv"), "x").unwrap();
    let err = verify::verify(&work, &verifier(&f)).unwrap_err();
    assert!(
        err.contains("extra.csv") && err.contains("not listed"),
        "{err}"
    );

    // The first export replaced by another (validly signed) export of the same period.
    let original = f.dir.path().join("exports").join("first-original");
    std::fs::rename(&first.dir, &original).unwrap();
    run(&f, &request(&f, "first", Lang::En, None));
    let err = verify::verify(&second.dir, &verifier(&f)).unwrap_err();
    assert!(
        err.contains("first/manifest.json") && err.contains("replaced"),
        "{err}"
    );
    // A foreign CA's signature does not verify.
    let other = PkiPaths::new(f.dir.path().join("other-pki"));
    pki::init(&other, &["localhost".into()]).unwrap();
    let foreign = weilan_config::signing::Verifier::from_ca_file(&other.ca()).unwrap();
    let err = verify::verify(&original, &foreign).unwrap_err();
    assert!(err.contains("manifest.sig"), "{err}");
}

/// Collector settings for the scheduled-export tests: the fixture's PKI and database,
/// and `exports` as the `[exports]` section (with its schedules); the signer.
fn scheduled(
    f: &Fixture,
    exports: &str,
) -> (
    weilan_config::settings::collector::CollectorSettings,
    weilan_config::signing::Signer,
) {
    let root = f.dir.path();
    std::fs::write(root.join("policy.toml"), "version = \"t\"\n").unwrap();
    let toml = format!(
        "[broker]\nmode = \"external\"\n[tls]\nca = \"{pki}/ca.pem\"\nserver_cert = \"{pki}/server.pem\"\nserver_key = \"{pki}/server-key.pem\"\n\
         client_cert = \"{pki}/collector.pem\"\nclient_key = \"{pki}/collector-key.pem\"\n[store]\npath = \"db.sqlite\"\n{url}\
         [alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n{exports}",
        pki = f.pki.ca().parent().unwrap().display(),
        url = match &f.db {
            Location::Postgres(url) => format!("url = \"{url}\"\n"),
            Location::Sqlite(_) => String::new(),
        }
    );
    let settings =
        weilan_config::load::load_str::<weilan_config::settings::collector::CollectorFile>(
            &toml,
            &root.join("collector.toml"),
            root.to_path_buf(),
        )
        .unwrap();
    let signer =
        weilan_config::signing::Signer::from_pem_files(&f.pki.collector(), &f.pki.collector_key())
            .unwrap();
    (settings, signer)
}

#[test]
fn a_missed_schedule_is_caught_up_and_says_so_and_retention_prunes() {
    let f = fixture();
    let root = f.dir.path();
    let (settings, signer) = scheduled(
        &f,
        "[exports]\ndir = \"scheduled\"\nlanguage = \"en\"\ntimezone = \"Asia/Shanghai\"\nkeep = 1\nevents_keep_days = 1\n\
         [[exports.schedules]]\nname = \"daily\"\nevery = \"day\"\nat = \"01:00\"\n",
    );
    let rules = crate::rules::RuleSet::load(true, None).unwrap();
    // The collector comes up at 09:00 on the 22nd (Shanghai): the 21st was due at 01:00.
    let now: jiff::Timestamp = "2026-11-22T01:00:00Z".parse().unwrap();
    let found = super::schedule::run(&settings, &signer, &rules, now);
    let dir = root.join("scheduled/daily-2026-11-21");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["caught_up"], true);
    assert_eq!(manifest["schedule"], "daily");
    assert_eq!(manifest["counts"]["events"], 18, "the fixture's period");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].kind, crate::rules::findings::EXPORT_CAUGHT_UP);
    assert!(
        found[0].summary.contains("daily-2026-11-21") && found[0].summary.contains("made late")
    );
    // Nothing owed the same day; the next day's export replaces it under keep = 1,
    // and events older than a day are pruned.
    assert!(super::schedule::run(&settings, &signer, &rules, now).is_empty());
    assert!(!root.join("scheduled/daily-2026-11-22").exists());
    let next_day: jiff::Timestamp = "2026-11-22T17:00:30Z".parse().unwrap();
    let found = super::schedule::run(&settings, &signer, &rules, next_day);
    assert!(found.is_empty(), "on time: nothing to say ({found:?})");
    assert!(root.join("scheduled/daily-2026-11-22").exists());
    assert!(!dir.exists(), "keep = 1: the older export was removed");
    let left: i64 = Conn::open(&f.db.clone())
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM events WHERE received_at < '2026-11-21T17:00:30Z'",
            params![],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "events older than a day pruned");
    let chained = verify::verify(&root.join("scheduled/daily-2026-11-22"), &verifier(&f)).unwrap();
    assert_eq!(chained.exports.len(), 1);
    assert!(
        chained.notes[0].contains("daily-2026-11-21 is not in"),
        "{:?}",
        chained.notes
    );
}

#[test]
fn retention_that_drops_a_month_leaves_every_later_monthly_export_verifiable() {
    let f = fixture();
    // Besides the fixture's November: September and October, received then.
    heartbeats(
        &f,
        "ws-9",
        0,
        GENESIS_HASH.to_string(),
        "2026-09-10T00:00:00Z",
        80,
    );
    let (seq, prev) = head(&f, "ws-9");
    heartbeats(&f, "ws-9", seq, prev, "2026-10-10T00:00:00Z", 80);
    let (settings, signer) = scheduled(
        &f,
        "[exports]\ndir = \"scheduled\"\nlanguage = \"en\"\ntimezone = \"Asia/Shanghai\"\nevents_keep_days = 60\n\
         [[exports.schedules]]\nname = \"monthly\"\nevery = \"month\"\nat = \"01:00\"\n",
    );
    let rules = crate::rules::RuleSet::load(true, None).unwrap();
    let root = f.dir.path().join("scheduled");
    let in_month = |month: &str| -> i64 {
        Conn::open(&f.db.clone())
            .unwrap()
            .query_row(
                // Heartbeats move into blocks as they age (heartbeats/): counted apart.
                "SELECT (SELECT COUNT(*) FROM events WHERE received_at LIKE ?1)
                      + (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM heartbeat_blocks
                         WHERE first_received LIKE ?1)",
                params![format!("2026-{month}-%")],
                |r| r.get(0),
            )
            .unwrap()
    };
    let september = in_month("09");
    assert!(september >= 80, "{september}");
    // On PostgreSQL each month is a partition of its own (partitions.rs) from the
    // first tick of the leader's schedule; on SQLite there are none.
    let partitions = || -> Vec<String> {
        crate::partitions::list(&Conn::open(&f.db.clone()).unwrap())
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect()
    };
    let postgres = f.db.engine() == crate::db::Engine::Postgres;
    // Each month exported on the 1st of the next (Shanghai), retention applied each time.
    for now in [
        "2026-09-30T17:00:30Z",
        "2026-10-31T17:00:30Z",
        "2026-11-30T17:00:30Z",
    ] {
        super::schedule::run(&settings, &signer, &rules, now.parse().unwrap());
        if postgres && now.starts_with("2026-09") {
            let made = partitions();
            assert!(
                made.contains(&"events_y2026m09".to_string())
                    && made.contains(&"events_y2026m10".to_string()),
                "{made:?}"
            );
        }
    }
    // September went as a whole partition, not row by row.
    if postgres {
        let left = partitions();
        assert!(
            !left.contains(&"events_y2026m09".to_string())
                && left.contains(&"events_y2026m11".to_string()),
            "{left:?}"
        );
    }
    let months = ["monthly-2026-09", "monthly-2026-10", "monthly-2026-11"];
    for m in months {
        assert!(root.join(m).join("manifest.json").exists(), "{m} exported");
    }
    // The last run's retention (60 days before 1 December) dropped September only.
    assert_eq!(in_month("09"), 0, "September's events dropped");
    assert!(in_month("10") >= 80 && in_month("11") > 0);
    // Every export still verifies, and the newest's chain reaches back through the
    // month whose events are gone.
    for m in months {
        verify::verify(&root.join(m), &verifier(&f))
            .unwrap_or_else(|e| panic!("{m} no longer verifies: {e}"));
    }
    let chained = verify::verify(&root.join(months[2]), &verifier(&f)).unwrap();
    assert_eq!(chained.exports.len(), 3, "{:?}", chained.notes);
    // October exported again after the drop: the same events, byte for byte.
    let again = request(&f, "october-again", Lang::En, None);
    let again = Request {
        from: "2026-09-30T16:00:00Z".parse().unwrap(),
        to: "2026-10-31T16:00:00Z".parse().unwrap(),
        ..again
    };
    let done = run(&f, &again);
    assert_eq!(
        std::fs::read(root.join(months[1]).join("events.jsonl")).unwrap(),
        std::fs::read(done.dir.join("events.jsonl")).unwrap(),
        "October's events after September was dropped"
    );
}

/// Heartbeats of `agent` every 30 s from `start`, one batch each, with a USB attach
/// after every 40th (so some heartbeats follow another event, not a heartbeat).
fn heartbeats(f: &Fixture, agent: &str, seq_after: u64, prev: String, start: &str, n: usize) {
    let mut store = Store::open_at(&f.db).unwrap();
    let mut engine = Engine::new(true, None).unwrap();
    let mut st = Stream {
        agent,
        role: "workstation",
        seq: seq_after,
        prev,
    };
    let start: jiff::Timestamp = start.parse().unwrap();
    for i in 0..n {
        let at = (start + jiff::SignedDuration::from_millis(30_000 * i as i64 + 7)).to_string();
        let mut events = vec![(
            "agent.heartbeat",
            json!({"agent_version": "0.1.0", "uptime_secs": 100 + 30 * i, "policy_version": "v7",
                   "backlog": i % 3, "dropped_total": 0}),
        )];
        if i % 40 == 39 {
            events.push(("usb.attached", usb(&format!("HB-{i}"), &format!("hb-{i}"))));
        }
        ingest(&mut store, &mut engine, &mut st, &at, events);
    }
}

/// The last stored record of `agent`: its sequence number and hash.
fn head(f: &Fixture, agent: &str) -> (u64, String) {
    let conn = Conn::open(&f.db.clone()).unwrap();
    conn.query_row(
        "SELECT seq, hash FROM events WHERE agent_id = ?1 ORDER BY seq DESC LIMIT 1",
        params![agent],
        |r| Ok((r.get::<i64>(0)? as u64, r.get(1)?)),
    )
    .unwrap()
}

#[test]
fn compacted_heartbeats_export_as_the_same_bytes_and_the_export_still_verifies() {
    let f = fixture();
    let (seq, hash) = head(&f, "ws-2");
    heartbeats(&f, "ws-2", seq, hash, "2026-11-21T03:00:00Z", 300);
    let before = run(&f, &request(&f, "before", Lang::En, None));
    let rows_before = db_count(
        &f,
        "SELECT COUNT(*) FROM events WHERE kind = 'agent.heartbeat' AND ?1 < ?2",
    );

    let mut conn = Conn::open(&f.db.clone()).unwrap();
    let done = crate::heartbeats::compact(&mut conn, TO).unwrap();
    // 300 of ws-2 and the three agents' own (one each); 2.5 hours: at least 3 blocks.
    assert_eq!((done.heartbeats, done.kept_as_rows), (303, 0), "{done:?}");
    assert!(done.blocks >= 3, "{done:?}");
    let rows_after = db_count(
        &f,
        "SELECT COUNT(*) FROM events WHERE kind = 'agent.heartbeat' AND ?1 < ?2",
    );
    assert_eq!((rows_before, rows_after), (303, 0));
    // A second run finds nothing new (the watermark).
    assert_eq!(
        crate::heartbeats::compact(&mut conn, TO).unwrap(),
        Default::default()
    );

    let after = run(&f, &request(&f, "after", Lang::En, None));
    assert_eq!(
        (before.events, after.events),
        (before.events, before.events)
    );
    for file in ["events.jsonl", "events.csv"] {
        let a = std::fs::read(before.dir.join(file)).unwrap();
        let b = std::fs::read(after.dir.join(file)).unwrap();
        assert!(a == b, "{file} differs after compaction");
    }
    let jsonl = std::fs::read_to_string(after.dir.join("events.jsonl")).unwrap();
    assert_eq!(jsonl.matches("\"agent.heartbeat\"").count(), 303);
    verify::verify(&after.dir, &verifier(&f)).unwrap();

    // One altered byte in a block: the export fails and names the block.
    let (first, mut entries): (i64, Vec<u8>) = conn
        .query_row(
            "SELECT first_seq, entries FROM heartbeat_blocks WHERE agent_id = 'ws-2' ORDER BY first_seq LIMIT 1",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let middle = entries.len() / 2;
    entries[middle] ^= 0x01;
    conn.execute(
        "UPDATE heartbeat_blocks SET entries = ?2 WHERE agent_id = 'ws-2' AND first_seq = ?1",
        params![first, entries],
    )
    .unwrap();
    let req = request(&f, "altered", Lang::En, None);
    let signer =
        weilan_config::signing::Signer::from_pem_files(&f.pki.collector(), &f.pki.collector_key())
            .unwrap();
    let rules = crate::rules::RuleSet::load(true, None).unwrap();
    let err = export(&f.db.clone(), &signer, &rules, &req, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("heartbeat block ws-2:1:"), "{err}");
}
