//! The built-in indicator pack, one test per indicator: the facts that fire it and a
//! near miss that must not. Agent events are written as JSON and parsed as the
//! documented `Envelope` (unknown fields refused), so a test cannot drift from the
//! schema; network and access events are synthetic until their sources land.
//! Plus the engine itself: correlation, suppression, reload, errors.

use serde_json::{json, Value as Json};
use weilan_config::event::Envelope;

use super::engine::{Engine, Fact, Finding};
use super::findings;
use crate::db::{params, Sql};
use crate::store::{Alert, Store};

/// Monday 2026-11-23 10:00 in Shanghai (inside the default working hours).
const DAY: &str = "2026-11-23T02:00:00Z";
/// Monday 2026-11-23 22:00 in Shanghai (outside).
const NIGHT: &str = "2026-11-23T14:00:00Z";

const GROUPS: &str = r#"
[user_groups]
it = ["alice"]
admins = ["root", "alice"]
[lists]
allowed_destinations = ["10.0.0.0/8"]
"#;

struct Harness {
    _dir: tempfile::TempDir,
    store: Store,
    _postgres: Option<crate::db::testing::TempDatabase>,
    engine: Engine,
    policy: weilan_config::policy::Policy,
    seq: u64,
}

impl Harness {
    fn new() -> Harness {
        Self::with_rules(GROUPS)
    }

    fn with_rules(extra: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        std::fs::write(rules.join("site.toml"), extra).unwrap();
        let engine = Engine::new(true, Some(rules))
            .unwrap_or_else(|e| panic!("{}", e.iter().map(|e| e.to_string()).collect::<String>()));
        let policy = weilan_config::load::load_str::<weilan_config::policy::PolicyFile>(
            weilan_config::examples::POLICY_TOML,
            std::path::Path::new("policy.toml"),
            dir.path().to_path_buf(),
        )
        .unwrap();
        let (location, postgres) = crate::db::testing::store_location(dir.path());
        Harness {
            store: Store::open_at(&location).unwrap(),
            _postgres: postgres,
            _dir: dir,
            engine,
            policy,
            seq: 0,
        }
    }

    /// An agent event of the documented schema.
    fn event(&mut self, agent: &str, role: &str, at: &str, kind: &str, data: Json) -> Fact {
        self.seq += 1;
        let env: Envelope = serde_json::from_value(json!({
            "schema": weilan_config::event::SCHEMA_VERSION,
            "event_id": format!("{agent}:1:{}", self.seq),
            "time": at,
            "host_role": role,
            // Server-room hosts and door boards of the tests are at one site.
            "site": (role != "workstation").then_some("hq-dc"),
            "prev_hash": weilan_config::event::GENESIS_HASH,
            "event": {"kind": kind, "data": data},
        }))
        .unwrap_or_else(|e| panic!("{kind} does not match the schema: {e}"));
        Fact::from_envelope(&env)
    }

    /// Stores the events (for lookups such as the device's last decision) and
    /// evaluates the facts at `now`; returns the alerts raised.
    fn feed(&mut self, now: &str, facts: Vec<Fact>) -> Vec<Alert> {
        let now: jiff::Timestamp = now.parse().unwrap();
        let (engine, policy) = (&mut self.engine, &self.policy);
        self.store
            .in_transaction(|tx| {
                for f in &facts {
                    if let Some(id) = &f.event_id {
                        tx.execute(
                            "INSERT INTO events (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope)
                             VALUES (?1, ?2, 1, ?3, ?4, ?5, ?5, ?6, ?7)",
                            params![
                                id,
                                f.agent_id,
                                id.rsplit(':').next().unwrap().parse::<i64>().unwrap(),
                                f.kind,
                                f.time.to_string(),
                                f.host_role,
                                json!({"event": {"kind": f.kind, "data": f.data}}).to_string()
                            ],
                        )?;
                    }
                }
                engine.evaluate(tx, policy, &facts, now)
            })
            .unwrap()
            .alerts
    }

    /// A badge at the door of hq-dc at `at`, evaluated then.
    fn badge_in(&mut self, at: &str) {
        let b = self.event("door-1", "door", at, "access.badge", badge());
        self.feed(at, vec![b]);
    }

    fn fired(&mut self, now: &str, facts: Vec<Fact>, rule: &str) -> Option<Alert> {
        let errors = self.engine.stats.errors;
        let alerts = self.feed(now, facts);
        assert_eq!(self.engine.stats.errors, errors, "evaluation errors");
        alerts.into_iter().find(|a| a.rule_id == rule)
    }
}

fn finding(kind: &'static str, details: Json) -> Fact {
    Fact::from_finding(
        &Finding {
            kind,
            agent_id: "ws-1".into(),
            summary: format!("{kind} happened"),
            event_ids: vec!["ws-1:1:7".into()],
            details,
        },
        DAY.parse().unwrap(),
    )
}

fn merge(mut base: Json, over: Json) -> Json {
    if let (Some(b), Json::Object(o)) = (base.as_object_mut(), over) {
        b.extend(o);
    }
    base
}

fn usb(over: Json) -> Json {
    merge(
        json!({
            "port_path": "1-1", "busnum": 1, "devnum": 5, "vid": "abcd", "pid": "1234",
            "bcd_device": "0100", "serial": "S-1", "manufacturer": "Acme", "product": "Stick",
            "device_class": 0,
            "interfaces": [{"number": 0, "class": 8, "subclass": 6, "protocol": 80}],
            "speed": "480", "authorized": false, "hash": "h1", "parent_hash": null,
            "block_devices": [], "present_at_start": false,
        }),
        over,
    )
}

fn decision(over: Json) -> Json {
    merge(
        json!({
            "port_path": "1-1", "vid": "abcd", "pid": "1234", "serial": "S-1",
            "manufacturer": "Acme", "product": "Stick", "hash": "h1", "target": "block",
            "rule_id": "implicit default", "reason": "not allowed", "trigger": "attach",
            "mode": "enforce", "actions": [], "enforced": true, "error": null,
            "policy_version": "v1",
        }),
        over,
    )
}

fn exported(over: Json) -> Json {
    merge(
        json!({
            "path": "/media/s/a.txt", "mount_point": "/media/s", "fs_type": "vfat",
            "mount_source": "/dev/sdb1", "usb_serial": "S-1", "usb_hash": "h1", "size": 1000,
            "sha256": "00", "hashed_bytes": 1000, "pid": 42, "exe": "/usr/bin/cp",
            "cmdline": "cp a /media/s", "uid": 1000, "user": "bob",
            "first_write": DAY, "last_write": DAY, "attribution": "fanotify",
            "classification": [], "classification_note": null, "exit": "removable",
            "action": "audit", "rule_id": "files.default", "origins": [],
        }),
        over,
    )
}

fn enforced(over: Json) -> Json {
    merge(
        json!({
            "action": "deny", "rule_id": "no-secrets-out", "matched": ["cn_id"],
            "path": "/media/s/x", "source_path": "/srv/secret/x", "sha256": null,
            "mount_point": "/media/s", "usb_hash": "h1", "pid": 42, "exe": "/usr/bin/cp",
            "user": "bob", "outcome": "done", "error": null, "evidence": null, "detail": "refused",
        }),
        over,
    )
}

fn transfer(over: Json) -> Json {
    merge(
        json!({
            "pid": 77, "exe": "/usr/bin/curl", "cmdline": "curl -T x http://203.0.113.9/",
            "uid": 1000, "user": "bob", "protocol": "tcp", "local_addr": "192.0.2.10",
            "local_port": 40000, "remote_addr": "203.0.113.9", "remote_port": 80,
            "remote_host": null, "bytes_sent": 5_000_000, "bytes_received": 300,
            "duration_ms": 900, "phase": "closed", "allowlisted": false,
            "sensitive_files": [], "action": "audit", "rule_id": "network.default",
            "parents": [{"pid": 70, "exe": "/usr/bin/bash", "cmdline": "bash"}], "netns": 4026531840u64,
        }),
        over,
    )
}

/// One indicator: facts that fire it, and a near miss that must not.
macro_rules! indicator {
    ($name:ident, $rule:expr, |$h:ident| fire: $fire:expr, near: $near:expr $(,)?) => {
        mod $name {
            use super::*;

            #[test]
            fn fires() {
                let mut $h = Harness::new();
                let (now, facts): (&str, Vec<Fact>) = $fire;
                let a = $h.fired(now, facts, $rule);
                let a = a.unwrap_or_else(|| panic!("{} did not fire", $rule));
                assert!(
                    !a.summary.contains("(?)"),
                    "summary with a failed placeholder: {}",
                    a.summary
                );
                assert!(!a.title.is_empty() && !a.tags.is_empty(), "{a:?}");
            }

            #[test]
            fn near_miss_does_not_fire() {
                let mut $h = Harness::new();
                let (now, facts): (&str, Vec<Fact>) = $near;
                assert_eq!($h.fired(now, facts, $rule), None);
            }
        }
    };
}

indicator!(unknown_usb_storage, "builtin.usb.unknown-storage", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.attached", usb(json!({})))]),
    // The policy's known finance stick.
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.attached",
        usb(json!({"vid": "0781", "pid": "5581", "serial": "4C530001230915115093"})))]),
);

indicator!(badusb_composite, "builtin.usb.badusb-composite", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.attached", usb(json!({"interfaces": [
        {"number": 0, "class": 3, "subclass": 1, "protocol": 1},
        {"number": 1, "class": 8, "subclass": 6, "protocol": 80}]})))]),
    // Keyboard plus mouse: HID twice is an ordinary combo.
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.attached", usb(json!({"interfaces": [
        {"number": 0, "class": 3, "subclass": 1, "protocol": 1},
        {"number": 1, "class": 3, "subclass": 1, "protocol": 2}]})))]),
);

indicator!(usb_outside_hours, "builtin.usb.outside-hours", |h|
    fire: (NIGHT, vec![h.event("ws-1", "workstation", NIGHT, "usb.attached", usb(json!({})))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.attached", usb(json!({})))]),
);

indicator!(blocked_device_retried, "builtin.usb.blocked-retried", |h|
    fire: (DAY, (0..3).map(|_| h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({})))).collect()),
    near: (DAY, {
        // Two blocks, and a third for another device.
        let mut v: Vec<Fact> = (0..2).map(|_| h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({})))).collect();
        v.push(h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({"hash": "h2"}))));
        v
    }),
);

indicator!(usb_enforcement_failed, "builtin.usb.enforcement-failed", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({"enforced": false, "error": "EPERM writing authorized"})))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({})))]),
);

indicator!(usb_read_only_undone, "builtin.usb.read-only-undone", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({
        "target": "read-only", "trigger": "verify", "actions": ["BLKROSET sdb again (writes had been re-enabled)"]})))]),
    // A busy remount that finally succeeded is not someone undoing the lock.
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({
        "target": "read-only", "trigger": "verify", "actions": ["remount /media/sdb1 read-only"]})))]),
);

indicator!(temporary_unlock_used, "builtin.usb.unlock-used", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({"target": "allow", "rule_id": "unlock:ab12"})))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "usb.decision", decision(json!({"target": "allow", "rule_id": "finance-sticks"})))]),
);

indicator!(usb_on_server_room_host, "builtin.usb.server-room", |h|
    fire: (DAY, vec![
        // A badge at another site, one at this site 20 minutes before, and one claimed
        // by a workstation's agent: none counts.
        h.event("door-2", "door", "2026-11-23T01:55:00Z", "access.badge", badge_at("branch-2")),
        h.event("ws-1", "workstation", "2026-11-23T01:56:00Z", "access.badge", badge()),
        h.event("door-1", "door", "2026-11-23T01:40:00Z", "access.badge", badge()),
        h.event("srv-1", "server-room", DAY, "usb.attached", usb(json!({}))),
    ]),
    // Badged in at the site five minutes before the plug.
    near: (DAY, vec![
        h.event("door-1", "door", "2026-11-23T01:55:00Z", "access.badge", badge()),
        h.event("srv-1", "server-room", DAY, "usb.attached", usb(json!({}))),
    ]),
);

fn badge_at(site: &str) -> Json {
    json!({"reader": "dc-east", "site": site, "id_hash": "ab".repeat(32), "last4": "5678", "source": "hid-reader"})
}

fn badge() -> Json {
    badge_at("hq-dc")
}

fn door(state: &str, held: Option<u64>) -> Json {
    json!({"door": "dc-east", "site": "hq-dc", "state": state, "held_open_secs": held, "source": "gpio"})
}

#[test]
fn a_badge_in_is_remembered_across_a_collector_restart() {
    let mut h = Harness::new();
    h.badge_in("2026-11-23T01:55:00Z");
    // A new engine on the same database (the collector restarted).
    h.engine = Engine::new(true, None).unwrap();
    let plug = h.event("srv-1", "server-room", DAY, "usb.attached", usb(json!({})));
    assert_eq!(h.fired(DAY, vec![plug], "builtin.usb.server-room"), None);
}

#[test]
fn a_plug_sent_late_is_judged_by_the_badges_of_its_own_time() {
    let mut h = Harness::new();
    h.badge_in("2026-11-23T01:55:00Z");
    h.badge_in("2026-11-23T06:00:00Z");
    // The server-room host was offline; at 07:00 it sends a plug of 02:00 (five minutes
    // after the first badge-in, four hours before the latest) and one of 04:00.
    let late = h.event("srv-1", "server-room", DAY, "usb.attached", usb(json!({})));
    assert_eq!(
        h.fired(
            "2026-11-23T07:00:00Z",
            vec![late],
            "builtin.usb.server-room"
        ),
        None
    );
    let unbadged = h.event(
        "srv-1",
        "server-room",
        "2026-11-23T04:00:00Z",
        "usb.attached",
        usb(json!({"serial": "OTHER"})),
    );
    assert!(h
        .fired(
            "2026-11-23T07:00:00Z",
            vec![unbadged],
            "builtin.usb.server-room"
        )
        .is_some());
}

#[test]
fn presences_are_kept_for_their_retention_then_pruned() {
    let mut h = Harness::new();
    h.badge_in("2026-11-23T01:55:00Z");
    let count = |h: &mut Harness, now: jiff::Timestamp| {
        let engine = &h.engine;
        h.store
            .in_transaction(|tx| {
                engine.prune_seen(tx, now)?;
                Ok(tx.query_row(
                    "SELECT COUNT(*) FROM presence WHERE rule_id = 'builtin.usb.server-room'",
                    params![],
                    |r| r.get::<i64>(0),
                )?)
            })
            .unwrap()
    };
    let badged: jiff::Timestamp = "2026-11-23T01:55:00Z".parse().unwrap();
    let retention = jiff::SignedDuration::from_secs(super::engine::PRESENCE_RETENTION_SECS);
    assert_eq!(count(&mut h, badged + retention), 1);
    assert_eq!(
        count(
            &mut h,
            badged + retention + jiff::SignedDuration::from_secs(1)
        ),
        0
    );
}

#[test]
fn the_red_alert_names_the_host_and_the_site() {
    let mut h = Harness::new();
    let plug = h.event("srv-1", "server-room", DAY, "usb.attached", usb(json!({})));
    let a = h
        .fired(DAY, vec![plug], "builtin.usb.server-room")
        .expect("fires");
    assert_eq!(a.level, crate::rules::Level::Red);
    assert!(
        a.summary.contains("server-room host srv-1 at site hq-dc"),
        "{}",
        a.summary
    );
}

indicator!(classified_file_exported, "builtin.files.classified-export", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({
        "classification": [{"detector": "cn_id", "count": 3, "samples": ["1101**********1234"]}]})))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({})))]),
);

/// A file that could not be read is not a classified one (its own class, `unreadable`,
/// is for rules and the policy to act on).
#[test]
fn an_unreadable_file_alone_is_not_a_classified_export() {
    let mut h = Harness::new();
    let unreadable = h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({
        "classification": [{"detector": "unreadable", "count": 1, "samples": ["unsupported: binary"]}]})));
    assert_eq!(
        h.fired(DAY, vec![unreadable], "builtin.files.classified-export"),
        None
    );
    let both = h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({
        "sha256": "other",
        "classification": [{"detector": "unreadable", "count": 1, "samples": ["failed: pdf"]},
                           {"detector": "mark:secret", "count": 1, "samples": ["机密★ (line 1)"]}]})));
    let a = h
        .fired(DAY, vec![both], "builtin.files.classified-export")
        .expect("fires");
    assert!(
        a.summary.contains("mark:secret x1") && !a.summary.contains("unreadable"),
        "{}",
        a.summary
    );
}

indicator!(mass_export_by_count, "builtin.files.mass-export-count", |h|
    fire: (DAY, (0..51).map(|_| h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({})))).collect()),
    near: (DAY, {
        // 50 in the window; an older 51st fell out of it.
        let mut v = vec![h.event("ws-1", "workstation", "2026-11-23T01:49:00Z", "file.exported", exported(json!({})))];
        v.extend((0..50).map(|_| h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({})))));
        v
    }),
);

indicator!(mass_export_by_volume, "builtin.files.mass-export-volume", |h|
    fire: (DAY, (0..5).map(|_| h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({"size": 104_857_600})))).collect()),
    // 5 × 100 MiB, but one went to a network share.
    near: (DAY, (0..5).map(|i| h.event("ws-1", "workstation", DAY, "file.exported",
        exported(json!({"size": 104_857_600, "exit": if i == 0 { "network" } else { "removable" }})))).collect()),
);

indicator!(export_to_network_share, "builtin.files.network-share-export", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({
        "exit": "network", "fs_type": "cifs", "mount_source": "//nas/share", "usb_serial": null, "usb_hash": null})))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({})))]),
);

indicator!(read_only_device_written, "builtin.files.readonly-device-written", |h|
    fire: (DAY, vec![
        h.event("ws-1", "workstation", "2026-11-23T01:59:00Z", "usb.decision", decision(json!({"target": "read-only"}))),
        h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({}))),
    ]),
    // The device was read-only once, then allowed again before the write.
    near: (DAY, vec![
        h.event("ws-1", "workstation", "2026-11-23T01:58:00Z", "usb.decision", decision(json!({"target": "read-only"}))),
        h.event("ws-1", "workstation", "2026-11-23T01:59:00Z", "usb.decision", decision(json!({"target": "allow"}))),
        h.event("ws-1", "workstation", DAY, "file.exported", exported(json!({}))),
    ]),
);

indicator!(file_enforcement_failed, "builtin.files.enforcement-failed", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "file.enforced", enforced(json!({"action": "quarantine", "outcome": "failed", "error": "EBUSY"})))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "file.enforced", enforced(json!({"action": "quarantine"})))]),
);

indicator!(refused_copies_retried, "builtin.files.deny-retried", |h|
    fire: (DAY, (0..3).map(|_| h.event("ws-1", "workstation", DAY, "file.enforced", enforced(json!({})))).collect()),
    // Three refusals, but for two different users.
    near: (DAY, (0..3).map(|i| h.event("ws-1", "workstation", DAY, "file.enforced", enforced(json!({"user": if i == 0 { "carol" } else { "bob" }})))).collect()),
);

indicator!(upload_not_allowlisted, "builtin.net.upload-not-allowlisted", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "net.transfer", transfer(json!({})))]),
    // The same upload to an address in lists.allowed_destinations.
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "net.transfer", transfer(json!({"remote_addr": "10.20.0.5"})))]),
);

fn net_enforced(over: Json) -> Json {
    merge(
        json!({
            "action": "kill", "rule_id": "no-raw-uploads", "pid": 77, "exe": "/usr/bin/nc.openbsd",
            "remote_addr": "203.0.113.9", "remote_port": 9000, "ok": true,
            "detail": "process 77 (/usr/bin/nc.openbsd) ended by SIGTERM", "expires": null,
        }),
        over,
    )
}

indicator!(net_enforcement_failed, "builtin.net.enforcement-failed", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "net.enforced", net_enforced(json!({"ok": false, "detail": "nft: No such file or directory"})))]),
    // The same action, carried out.
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "net.enforced", net_enforced(json!({})))]),
);

indicator!(large_outbound_volume, "builtin.net.large-outbound", |h|
    fire: (DAY, (0..2).map(|_| h.event("ws-1", "workstation", DAY, "net.transfer", transfer(json!({"bytes_sent": 600_000_000})))).collect()),
    // Same volume, but one report is the threshold crossing of a transfer still open.
    near: (DAY, (0..2).map(|i| h.event("ws-1", "workstation", DAY, "net.transfer",
        transfer(json!({"bytes_sent": 600_000_000, "phase": if i == 0 { "threshold" } else { "closed" }})))).collect()),
);

indicator!(first_seen_destination, "builtin.net.first-seen-destination", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "net.transfer", transfer(json!({})))]),
    near: (DAY, {
        // Seen 29 days ago already: feed that first, then the transfer of today.
        let old = h.event("ws-1", "workstation", "2026-10-25T02:00:00Z", "net.transfer", transfer(json!({})));
        h.feed("2026-10-25T02:00:00Z", vec![old]);
        vec![h.event("ws-1", "workstation", DAY, "net.transfer", transfer(json!({})))]
    }),
);

indicator!(transfer_tool_by_non_it_user, "builtin.net.transfer-tool-non-it", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "net.transfer_tool", json!({
        "pid": 9, "tool": "scp", "exe": "/usr/bin/scp", "args": ["scp", "x", "e:/tmp"], "uid": 1000, "user": "bob"}))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "net.transfer_tool", json!({
        "pid": 9, "tool": "scp", "exe": "/usr/bin/scp", "args": ["scp", "x", "e:/tmp"], "uid": 1001, "user": "alice"}))]),
);

fn login(user: &str) -> Json {
    json!({"user": user, "uid": 1000, "method": "ssh", "tty": "pts/0",
        "remote_addr": "192.0.2.7", "session_id": "12", "source": "journal"})
}

indicator!(access_outside_hours, "builtin.access.outside-hours", |h|
    fire: (NIGHT, vec![h.event("srv-1", "server-room", NIGHT, "access.login", login("bob"))]),
    // A workstation login at night is not this indicator, nor a door closing.
    near: (NIGHT, vec![
        h.event("ws-1", "workstation", NIGHT, "access.login", login("bob")),
        h.event("door-1", "door", NIGHT, "access.door", door("closed", Some(5))),
    ]),
);

#[test]
fn badges_and_doors_at_night_are_outside_hours_too() {
    let mut h = Harness::new();
    let b = h.event("door-1", "door", NIGHT, "access.badge", badge());
    let a = h
        .fired(NIGHT, vec![b], "builtin.access.outside-hours")
        .expect("badge");
    assert!(
        a.summary
            .contains("badge …5678 presented at reader dc-east at site hq-dc"),
        "{}",
        a.summary
    );
    let d = h.event("door-1", "door", NIGHT, "access.door", door("opened", None));
    assert!(h
        .fired(NIGHT, vec![d], "builtin.access.outside-hours")
        .is_some());
    let d = h.event("door-1", "door", DAY, "access.door", door("opened", None));
    assert!(h
        .fired(DAY, vec![d], "builtin.access.outside-hours")
        .is_none());
}

fn console_login() -> Json {
    json!({"user": "root", "uid": 0, "method": "console", "tty": "tty1",
        "remote_addr": null, "session_id": "tty1", "source": "utmp"})
}

indicator!(console_login_without_badge, "builtin.access.console-login-without-badge", |h|
    fire: (DAY, vec![h.event("srv-1", "server-room", DAY, "access.login", console_login())]),
    near: (DAY, vec![
        h.event("door-1", "door", "2026-11-23T01:50:00Z", "access.badge", badge()),
        h.event("srv-1", "server-room", DAY, "access.login", console_login()),
        // A remote login needs nobody in the room.
        h.event("srv-1", "server-room", "2026-11-23T03:00:00Z", "access.login", login("bob")),
    ]),
);

indicator!(door_without_badge, "builtin.access.door-without-badge", |h|
    fire: (DAY, vec![
        h.event("door-1", "door", "2026-11-23T01:59:00Z", "access.badge", badge()),
        h.event("door-1", "door", DAY, "access.door", door("opened", None)),
    ]),
    near: (DAY, vec![
        h.event("door-1", "door", "2026-11-23T01:59:45Z", "access.badge", badge()),
        h.event("door-1", "door", DAY, "access.door", door("opened", None)),
    ]),
);

#[test]
fn a_badge_off_the_roster_is_yellow_and_a_listed_one_names_its_person() {
    let mut h = Harness::new();
    // Without a roster nothing is "unknown".
    let b = h.event("door-1", "door", DAY, "access.badge", badge());
    assert!(h
        .fired(DAY, vec![b], "builtin.access.unknown-badge")
        .is_none());
    let path = h._dir.path().join("roster.csv");
    std::fs::write(
        &path,
        format!(
            "id_hash,name,department\n{},Wang Fang,IT\n",
            "cd".repeat(32)
        ),
    )
    .unwrap();
    h.engine.roster = crate::roster::Roster::load(Some(&path)).unwrap();
    let b = h.event("door-1", "door", DAY, "access.badge", badge());
    let a = h
        .fired(DAY, vec![b], "builtin.access.unknown-badge")
        .expect("unknown card");
    assert_eq!(a.level, crate::rules::Level::Yellow);
    let listed = merge(badge(), json!({"id_hash": "cd".repeat(32)}));
    let b = h.event("door-1", "door", DAY, "access.badge", listed);
    assert!(h
        .fired(DAY, vec![b], "builtin.access.unknown-badge")
        .is_none());
    // A site rule can name the person.
    let mut h = Harness::with_rules(&format!(
        "{GROUPS}[[rule]]\nid = \"site.badge\"\ntitle = \"t\"\nlevel = \"blue\"\ntags = [\"x\"]\non = [\"access.badge\"]\ncondition = \"person.known == true\"\nsummary = \"{{person.name}} ({{person.department}})\"\n"
    ));
    h.engine.roster = crate::roster::Roster::load(Some(&path)).unwrap();
    let b = h.event(
        "door-1",
        "door",
        DAY,
        "access.badge",
        merge(badge(), json!({"id_hash": "cd".repeat(32)})),
    );
    assert_eq!(
        h.fired(DAY, vec![b], "site.badge").unwrap().summary,
        "Wang Fang (IT)"
    );
}

indicator!(roster_invalid, "builtin.collector.roster-invalid", |_h|
    fire: (DAY, vec![finding(findings::ROSTER_INVALID, json!({"errors": ["roster.csv:3: id_hash"]}))]),
    near: (DAY, vec![finding(findings::RULES_INVALID, json!({}))]),
);

indicator!(door_held_open, "builtin.access.door-held-open", |h|
    fire: (DAY, vec![h.event("door-1", "door", DAY, "access.door", door("held-open", Some(120)))]),
    near: (DAY, vec![h.event("door-1", "door", DAY, "access.door", door("closed", Some(30)))]),
);

indicator!(root_by_non_admin, "builtin.access.privilege-non-admin", |h|
    fire: (DAY, vec![h.event("srv-1", "server-room", DAY, "access.privilege", json!({
        "user": "bob", "target_user": "root", "tool": "sudo", "command": "/bin/bash", "success": true, "tty": "pts/0", "source": "journal"}))]),
    near: (DAY, vec![h.event("srv-1", "server-room", DAY, "access.privilege", json!({
        "user": "alice", "target_user": "root", "tool": "sudo", "command": "/bin/bash", "success": true, "tty": "pts/0", "source": "journal"}))]),
);

fn failed_login() -> Json {
    json!({"user": "root", "method": "ssh", "remote_addr": "192.0.2.66", "reason": "bad password", "source": "journal"})
}

indicator!(failed_login_burst, "builtin.access.failed-login-burst", |h|
    fire: (DAY, (0..5).map(|_| h.event("srv-1", "server-room", DAY, "access.login_failed", failed_login())).collect()),
    // Five failures spread over more than five minutes.
    near: (DAY, ["01:54", "01:56", "01:58", "02:00"].iter().chain(["01:50"].iter())
        .map(|t| h.event("srv-1", "server-room", &format!("2026-11-23T{t}:00Z"), "access.login_failed", failed_login())).collect()),
);

indicator!(agent_silent, "builtin.fleet.agent-silent", |_h|
    fire: (DAY, vec![finding(findings::AGENT_SILENT, json!({"last_event": DAY, "state": "offline"}))]),
    near: (DAY, vec![finding(findings::JOURNAL_RESET, json!({"epoch": 2}))]),
);

indicator!(agent_stopped, "builtin.fleet.agent-stopped", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "agent.stopping", json!({"reason": "signal"}))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "agent.heartbeat", json!({
        "agent_version": "0.1.0", "uptime_secs": 60, "policy_version": "v1", "backlog": 0, "dropped_total": 0}))]),
);

indicator!(journal_gap, "builtin.integrity.journal-gap", |_h|
    fire: (DAY, vec![finding(findings::JOURNAL_GAP, json!({"epoch": 1, "first_missing": 5, "last_missing": 9, "explained": false}))]),
    // A gap the agent reported losing is the yellow sibling, not this red one.
    near: (DAY, vec![finding(findings::JOURNAL_GAP, json!({"epoch": 1, "first_missing": 5, "last_missing": 9, "explained": true}))]),
);

indicator!(journal_gap_reported, "builtin.integrity.journal-gap-reported", |_h|
    fire: (DAY, vec![finding(findings::JOURNAL_GAP, json!({"epoch": 1, "first_missing": 5, "last_missing": 9, "explained": true}))]),
    near: (DAY, vec![finding(findings::JOURNAL_GAP, json!({"epoch": 1, "first_missing": 5, "last_missing": 9, "explained": false}))]),
);

indicator!(chain_break, "builtin.integrity.chain-break", |_h|
    fire: (DAY, vec![finding(findings::CHAIN_BREAK, json!({"expected": "aa", "found": "bb"}))]),
    near: (DAY, vec![finding(findings::BAD_SIGNATURE, json!({"reason": "x"}))]),
);

indicator!(bad_signature, "builtin.integrity.bad-signature", |_h|
    fire: (DAY, vec![finding(findings::BAD_SIGNATURE, json!({"reason": "signature", "payload_sha256": "00"}))]),
    near: (DAY, vec![finding(findings::CHAIN_BREAK, json!({}))]),
);

indicator!(journal_reset, "builtin.integrity.journal-reset", |_h|
    fire: (DAY, vec![finding(findings::JOURNAL_RESET, json!({"previous_epoch": 1, "epoch": 2}))]),
    near: (DAY, vec![finding(findings::AGENT_SILENT, json!({}))]),
);

indicator!(agent_reinstalled, "builtin.integrity.agent-reinstalled", |_h|
    fire: (DAY, vec![finding(findings::AGENT_REINSTALLED, json!({"previous_installation": "aa", "installation": "bb", "epoch": 2}))]),
    near: (DAY, vec![finding(findings::AGENT_RESTORED, json!({"epoch": 2}))]),
);

indicator!(agent_restored, "builtin.integrity.agent-restored", |_h|
    fire: (DAY, vec![finding(findings::AGENT_RESTORED, json!({"resumed_from": {"epoch": 1, "seq": 5}, "stored_until": {"epoch": 1, "seq": 9}, "epoch": 2}))]),
    near: (DAY, vec![finding(findings::AGENT_REINSTALLED, json!({"installation": "bb", "epoch": 2}))]),
);

indicator!(key_reused, "builtin.integrity.key-reused", |_h|
    fire: (DAY, vec![finding(findings::KEY_REUSED, json!({"stored_hash": "aa", "hash": "bb"}))]),
    near: (DAY, vec![finding(findings::CHAIN_BREAK, json!({}))]),
);

indicator!(events_lost, "builtin.agent.events-lost", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "agent.events_lost", json!({
        "count": 12, "stage": "queue", "reason": "source queue full", "first": null, "last": null}))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "agent.heartbeat", json!({
        "agent_version": "0.1.0", "uptime_secs": 60, "policy_version": "v1", "backlog": 0, "dropped_total": 0}))]),
);

fn heartbeat(backlog: u64) -> Json {
    json!({"agent_version": "0.1.0", "uptime_secs": 60, "policy_version": "v1", "backlog": backlog, "dropped_total": 0})
}

indicator!(clock_skew, "builtin.agent.clock-skew", |h|
    // Received 6 minutes after the agent says it was sent, with nothing queued.
    fire: ("2026-11-23T02:06:00Z", vec![h.event("ws-1", "workstation", DAY, "agent.heartbeat", heartbeat(0))]),
    // Same delay, but the agent had a backlog: a late delivery, not a wrong clock.
    near: ("2026-11-23T02:06:00Z", vec![h.event("ws-1", "workstation", DAY, "agent.heartbeat", heartbeat(250))]),
);

indicator!(policy_rejected, "builtin.policy.rejected", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "policy.rejected", json!({
        "version": "v2", "source": "collector", "errors": ["policy.toml:3:1: usb.rules[0].target: bad"], "kept": "v1"}))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "policy.applied", json!({"version": "v2", "previous": "v1", "source": "collector"}))]),
);

indicator!(command_rejected, "builtin.command.rejected", |h|
    fire: (DAY, vec![h.event("ws-1", "workstation", DAY, "command.result", json!({
        "seq": 9, "action": "block-device", "status": "rejected", "detail": "replayed: sequence 9 is not above 12"}))]),
    near: (DAY, vec![h.event("ws-1", "workstation", DAY, "command.result", json!({
        "seq": 13, "action": "block-device", "status": "executed", "detail": "device h1 blocked"}))]),
);

indicator!(policy_invalid_on_collector, "builtin.collector.policy-invalid", |_h|
    fire: (DAY, vec![finding(findings::POLICY_INVALID, json!({"errors": "policy.toml:1:1: x"}))]),
    near: (DAY, vec![finding(findings::RULES_INVALID, json!({}))]),
);

indicator!(rules_invalid, "builtin.collector.rules-invalid", |_h|
    fire: (DAY, vec![finding(findings::RULES_INVALID, json!({"errors": ["site.toml:3:1: x"]}))]),
    near: (DAY, vec![finding(findings::POLICY_INVALID, json!({}))]),
);

indicator!(sink_failures, "builtin.collector.sink-failures", |_h|
    fire: (DAY, vec![finding(findings::SINK_FAILURES, json!({"siem": {"failed": 1, "dropped": 0, "new": 1}}))]),
    near: (DAY, vec![finding(findings::RULES_OVERFLOW, json!({}))]),
);

indicator!(rules_overflow, "builtin.collector.rules-overflow", |_h|
    fire: (DAY, vec![finding(findings::RULES_OVERFLOW, json!({"evicted": 3, "total": 3}))]),
    near: (DAY, vec![finding(findings::SINK_FAILURES, json!({}))]),
);

indicator!(export_caught_up, "builtin.collector.export-caught-up", |_h|
    fire: (DAY, vec![finding(findings::EXPORT_CAUGHT_UP, json!({"schedule": "daily"}))]),
    near: (DAY, vec![finding(findings::EXPORT_FAILED, json!({}))]),
);

indicator!(export_failed, "builtin.collector.export-failed", |_h|
    fire: (DAY, vec![finding(findings::EXPORT_FAILED, json!({"error": "disk full"}))]),
    near: (DAY, vec![finding(findings::EXPORT_CAUGHT_UP, json!({}))]),
);

indicator!(broker_unreachable, "builtin.collector.broker-unreachable", |_h|
    fire: (DAY, vec![finding(findings::BROKER_UNREACHABLE, json!({"broker": "127.0.0.1:8883", "down_secs": 31, "reason": "invalid peer certificate: NotValidForName"}))]),
    near: (DAY, vec![finding(findings::EXPORT_FAILED, json!({}))]),
);

indicator!(unenrolled_certificate, "builtin.integrity.unenrolled-certificate", |_h|
    fire: (DAY, vec![finding(findings::UNENROLLED_CERTIFICATE, json!({"reason": "not enrolled", "payload_sha256": "ab"}))]),
    near: (DAY, vec![finding(findings::BAD_SIGNATURE, json!({"reason": "x", "payload_sha256": "ab"}))]),
);

indicator!(enrollment_refused, "builtin.collector.enrollment-refused", |_h|
    fire: (DAY, vec![finding(findings::ENROLLMENT_REFUSED, json!({"token": "0123456789abcdef", "reason": "token already used (single use)"}))]),
    near: (DAY, vec![finding(findings::UNENROLLED_CERTIFICATE, json!({"reason": "x", "payload_sha256": "ab"}))]),
);

indicator!(certificate_expiring, "builtin.fleet.certificate-expiring", |_h|
    fire: (DAY, vec![finding(findings::CERTIFICATE_EXPIRING, json!({"not_after": "2026-12-10T00:00:00Z", "fingerprint": "ab", "role": "agent"}))]),
    near: (DAY, vec![finding(findings::ENROLLMENT_REFUSED, json!({"token": "x", "reason": "y"}))]),
);

indicator!(broker_refused, "builtin.collector.broker-refused", |_h|
    fire: (DAY, vec![finding(findings::BROKER_REFUSED, json!({"client": "ws-9", "reason": "oversize packet (larger than max_packet_size)"}))]),
    near: (DAY, vec![finding(findings::BROKER_UNREACHABLE, json!({"broker": "x", "down_secs": 1, "reason": "y"}))]),
);

indicator!(broker_restarted, "builtin.collector.broker-restarted", |_h|
    fire: (DAY, vec![finding(findings::BROKER_RESTARTED, json!({"status": "signal: 9 (SIGKILL)", "restarts": 1}))]),
    near: (DAY, vec![finding(findings::BROKER_REFUSED, json!({"client": "ws-9", "reason": "x"}))]),
);

indicator!(source_flooding, "builtin.collector.source-flooding", |_h|
    fire: (DAY, vec![finding(findings::SOURCE_FLOODING, json!({"messages": 900, "bytes": 9000}))]),
    near: (DAY, vec![finding(findings::BROKER_REFUSED, json!({"client": "ws-9", "reason": "x"}))]),
);

indicator!(federation_backlog, "builtin.collector.federation-backlog", |_h|
    fire: (DAY, vec![finding(findings::FEDERATION_BACKLOG, json!({"district": "weilan-district-east", "province": "p:8883", "batches": 40, "oldest_secs": 1000}))]),
    near: (DAY, vec![finding(findings::BROKER_UNREACHABLE, json!({"broker": "x", "down_secs": 1, "reason": "y"}))]),
);

/// Every rule of the pack has its pair of tests above (kept in step by this list).
#[test]
fn every_builtin_rule_is_tested() {
    let tested = [
        "builtin.usb.unknown-storage",
        "builtin.usb.badusb-composite",
        "builtin.usb.outside-hours",
        "builtin.usb.blocked-retried",
        "builtin.usb.enforcement-failed",
        "builtin.usb.read-only-undone",
        "builtin.usb.unlock-used",
        "builtin.usb.server-room",
        "builtin.files.classified-export",
        "builtin.files.mass-export-count",
        "builtin.files.mass-export-volume",
        "builtin.files.network-share-export",
        "builtin.files.readonly-device-written",
        "builtin.files.enforcement-failed",
        "builtin.files.deny-retried",
        "builtin.net.upload-not-allowlisted",
        "builtin.net.large-outbound",
        "builtin.net.first-seen-destination",
        "builtin.net.transfer-tool-non-it",
        "builtin.net.enforcement-failed",
        "builtin.access.outside-hours",
        "builtin.access.console-login-without-badge",
        "builtin.access.door-without-badge",
        "builtin.access.door-held-open",
        "builtin.access.unknown-badge",
        "builtin.collector.roster-invalid",
        "builtin.access.privilege-non-admin",
        "builtin.access.failed-login-burst",
        "builtin.fleet.agent-silent",
        "builtin.fleet.agent-stopped",
        "builtin.integrity.journal-gap",
        "builtin.integrity.journal-gap-reported",
        "builtin.integrity.chain-break",
        "builtin.integrity.bad-signature",
        "builtin.integrity.journal-reset",
        "builtin.integrity.agent-reinstalled",
        "builtin.integrity.agent-restored",
        "builtin.integrity.key-reused",
        "builtin.agent.events-lost",
        "builtin.agent.clock-skew",
        "builtin.policy.rejected",
        "builtin.command.rejected",
        "builtin.collector.policy-invalid",
        "builtin.collector.rules-invalid",
        "builtin.collector.sink-failures",
        "builtin.collector.rules-overflow",
        "builtin.collector.export-caught-up",
        "builtin.collector.export-failed",
        "builtin.collector.broker-unreachable",
        "builtin.integrity.unenrolled-certificate",
        "builtin.collector.enrollment-refused",
        "builtin.fleet.certificate-expiring",
        "builtin.collector.broker-refused",
        "builtin.collector.broker-restarted",
        "builtin.collector.source-flooding",
        "builtin.collector.federation-backlog",
    ];
    let h = Harness::new();
    let set = h.engine.rule_set();
    let mut ids: Vec<&str> = set.rules().map(|r| r.id.as_str()).collect();
    ids.sort();
    let mut want = tested.to_vec();
    want.sort();
    assert_eq!(ids, want);
    assert!(ids.len() >= 28);
}

#[test]
fn repeats_within_the_suppression_window_update_one_alert() {
    let mut h = Harness::new();
    let mut facts = Vec::new();
    for _ in 0..20 {
        facts.push(h.event("ws-1", "workstation", DAY, "usb.attached", usb(json!({}))));
    }
    let alerts = h.feed(DAY, facts);
    let unknown: Vec<_> = alerts
        .iter()
        .filter(|a| a.rule_id == "builtin.usb.unknown-storage")
        .collect();
    assert_eq!(unknown.len(), 1, "one alert, not 20");
    let updates = h.engine.take_updates();
    let u = updates
        .iter()
        .find(|a| a.rule_id == "builtin.usb.unknown-storage")
        .unwrap();
    assert_eq!(
        (u.alert_id, u.count, u.update),
        (unknown[0].alert_id, 20, true)
    );
    assert_eq!(u.event_ids.len(), 20);
    let stored: i64 = h
        .store
        .conn()
        .query_row(
            "SELECT count FROM alerts WHERE alert_id = ?1",
            params![u.alert_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 20);
    // Another device is another key: its own alert.
    let other = h.event(
        "ws-1",
        "workstation",
        DAY,
        "usb.attached",
        usb(json!({"hash": "h2"})),
    );
    assert!(h
        .fired(DAY, vec![other], "builtin.usb.unknown-storage")
        .is_some());
    // After the window (10 min) the same device alerts again.
    let later = h.event(
        "ws-1",
        "workstation",
        "2026-11-23T02:11:00Z",
        "usb.attached",
        usb(json!({})),
    );
    assert!(h
        .fired(
            "2026-11-23T02:11:00Z",
            vec![later],
            "builtin.usb.unknown-storage"
        )
        .is_some());
}

#[test]
fn an_alert_names_its_rule_level_events_and_the_correlated_count() {
    let mut h = Harness::new();
    let facts: Vec<Fact> = (0..3)
        .map(|_| {
            h.event(
                "ws-1",
                "workstation",
                DAY,
                "usb.decision",
                decision(json!({})),
            )
        })
        .collect();
    let ids: Vec<String> = facts.iter().map(|f| f.event_id.clone().unwrap()).collect();
    let a = h.fired(DAY, facts, "builtin.usb.blocked-retried").unwrap();
    assert_eq!(a.level, super::Level::Red);
    assert_eq!(a.event_ids, ids);
    assert_eq!(a.key, "ws-1/h1");
    assert_eq!(a.details["aggregate"]["value"], 3.0);
    assert!(
        a.summary
            .starts_with("USB abcd:1234 serial S-1 blocked again on ws-1"),
        "{}",
        a.summary
    );
}

#[test]
fn rule_files_report_file_line_and_the_cel_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.toml");
    std::fs::write(
        &path,
        "[[rule]]\nid = \"site.a\"\ntitle = \"A\"\nlevel = \"red\"\non = [\"usb.attached\"]\ncondition = \"event.data.vid ==\"\nsummary = \"x\"\n\n[[rule]]\nid = \"site.b\"\ntitle = \"B\"\nlevel = \"purple\"\non = [\"usb.attached\"]\ncondition = \"evnt.kind == 'x'\"\nsummary = \"{event.data.vid\"\n",
    )
    .unwrap();
    let errors = super::RuleSet::load(false, Some(dir.path())).unwrap_err();
    let text = errors.iter().map(|e| e.to_string()).collect::<String>();
    for want in [
        "site.toml:6:",
        "rule[0].condition: CEL:",
        "site.toml:12:",
        "`purple` is not red, yellow or blue",
        "site.toml:14:",
        "unknown variable `evnt`",
        "site.toml:15:",
        "never closed",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
}

/// The condition of the test rule `site.vid` in force.
fn condition(engine: &Engine) -> String {
    let set = engine.rule_set();
    let rule = set.get("site.vid").expect("site.vid in force");
    rule.condition.as_ref().expect("a condition").text.clone()
}

#[test]
fn a_broken_rule_file_leaves_the_previous_rules_active() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let good = "[[rule]]\nid = \"site.vid\"\ntitle = \"Vendor abcd\"\nlevel = \"blue\"\non = [\"usb.attached\"]\ncondition = \"event.data.vid == 'abcd'\"\nsummary = \"abcd on {agent.id}\"\n";
    std::fs::write(rules.join("site.toml"), good).unwrap();
    let mut engine = Engine::new(false, Some(rules.clone())).unwrap();
    assert_eq!(engine.rule_set().rules().count(), 1);
    // Broken: the reload is refused with file:line, and the old rule stays.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(
        rules.join("site.toml"),
        good.replace("== 'abcd'", "== 'abcd' &&"),
    )
    .unwrap();
    let refused = engine
        .reload_if_changed()
        .expect("a finding for the refused file");
    assert_eq!(refused.kind, findings::RULES_INVALID);
    assert!(
        refused.summary.contains("site.toml:6:"),
        "{}",
        refused.summary
    );
    assert_eq!(condition(&engine), "event.data.vid == 'abcd'");
    assert_eq!(
        engine.reload_if_changed().map(|f| f.summary),
        None,
        "unchanged: not reported twice"
    );
    // Fixed: the new rule replaces it.
    std::fs::write(rules.join("site.toml"), good.replace("'abcd'", "'ef01'")).unwrap();
    assert!(engine.reload_if_changed().is_none());
    assert_eq!(condition(&engine), "event.data.vid == 'ef01'");
    assert_eq!(engine.stats.reloads, 1);
    assert_eq!(engine.stats.reload_failures, 1);
}

#[test]
fn the_directory_replaces_or_switches_off_builtin_rules_by_id() {
    let mut h = Harness::with_rules(
        "[[rule]]\nid = \"builtin.usb.unknown-storage\"\ntitle = \"x\"\nlevel = \"red\"\non = [\"usb.attached\"]\nsummary = \"x\"\nenabled = false\n\n\
         [[rule]]\nid = \"builtin.usb.server-room\"\ntitle = \"Any USB on servers\"\nlevel = \"yellow\"\ntags = [\"site\"]\non = [\"usb.attached\"]\ncondition = \"agent.role == 'server-room'\"\nsummary = \"USB on {agent.id}\"\n",
    );
    assert!(h
        .engine
        .rule_set()
        .get("builtin.usb.unknown-storage")
        .is_none());
    let f = h.event(
        "srv-1",
        "server-room",
        DAY,
        "usb.attached",
        usb(json!({"interfaces": []})),
    );
    let a = h.fired(DAY, vec![f], "builtin.usb.server-room").unwrap();
    assert_eq!(
        (a.level, a.summary.as_str()),
        (super::Level::Yellow, "USB on srv-1")
    );
}

#[test]
fn rules_send_commands_to_the_agent_whose_event_fired_them() {
    let mut h = Harness::with_rules(
        "[[rule]]\nid = \"site.block-unknown\"\ntitle = \"Block unknown storage\"\nlevel = \"red\"\non = [\"usb.attached\"]\ncondition = \"device.known == false\"\nkey = \"agent.id + event.data.hash\"\nsummary = \"blocking {event.data.hash}\"\n\
         [[rule.actions]]\ntype = \"block-device\"\ntarget = \"event.data.hash\"\nvalid = \"2m\"\n[[rule.actions]]\ntype = \"notify\"\nsinks = [\"siem\"]\n",
    );
    let f = h.event(
        "ws-9",
        "workstation",
        DAY,
        "usb.attached",
        usb(json!({"hash": "feed"})),
    );
    let out = h
        .store
        .in_transaction(|tx| h.engine.evaluate(tx, &h.policy, &[f], DAY.parse().unwrap()))
        .unwrap();
    assert_eq!(out.commands.len(), 1);
    let c = &out.commands[0];
    assert_eq!(c.agent_id, "ws-9");
    assert_eq!(c.valid_secs, 120);
    assert_eq!(
        c.action,
        weilan_config::wire::CommandAction::BlockDevice {
            device_hash: "feed".into()
        }
    );
    assert!(
        c.reason.starts_with("rule site.block-unknown (alert "),
        "{}",
        c.reason
    );
    assert!(out
        .notify
        .iter()
        .any(|(a, sinks)| a.rule_id == "site.block-unknown" && sinks == &["siem"]));
}

#[test]
fn evaluation_errors_are_counted_and_skip_only_that_rule() {
    let mut h = Harness::with_rules(
        "[[rule]]\nid = \"site.broken\"\ntitle = \"t\"\nlevel = \"blue\"\non = [\"usb.attached\"]\ncondition = \"event.data.no_such_field == 1\"\nsummary = \"x\"\n",
    );
    let f = h.event("ws-1", "workstation", DAY, "usb.attached", usb(json!({})));
    let alerts = h.feed(DAY, vec![f]);
    assert_eq!(h.engine.stats.errors, 1);
    assert!(alerts
        .iter()
        .any(|a| a.rule_id == "builtin.usb.unknown-storage"));
    assert!(!alerts.iter().any(|a| a.rule_id == "site.broken"));
}

#[test]
fn correlation_windows_are_bounded_per_group() {
    let mut h = Harness::new();
    // 200 exports: the count window keeps only what its threshold (51) needs.
    let facts: Vec<Fact> = (0..200)
        .map(|_| {
            h.event(
                "ws-1",
                "workstation",
                DAY,
                "file.exported",
                exported(json!({})),
            )
        })
        .collect();
    h.feed(DAY, facts);
    assert_eq!(
        h.engine
            .window_len("builtin.files.mass-export-count", "ws-1"),
        51,
        "a count keeps only the entries its threshold needs"
    );
    assert_eq!(
        h.engine
            .window_len("builtin.files.mass-export-volume", "ws-1"),
        1,
        "a sum keeps one entry per second"
    );
    assert_eq!(
        h.engine.stats.state_dropped, 0,
        "dropping beyond a count's threshold changes nothing"
    );
    assert!(h.engine.take_overflow().is_none());
}

/// Two collectors sharing the store (`broker.shared_group`), each given every other
/// batch of one agent by the broker: the windows count the agent once, whichever
/// collector its events reach, and the alert is raised once for the fleet.
#[test]
fn collectors_sharing_the_store_count_one_agents_window_together() {
    let mut h = Harness::with_rules(
        r#"
[[rule]]
id = "site.distinct-sticks"
title = "Many sticks"
level = "yellow"
on = ["usb.attached"]
summary = "{agent.id} plugged many sticks"
suppress = "30m"
[rule.correlation]
aggregate = "distinct"
field = "event.data.serial"
window = "10m"
threshold = 3
"#,
    );
    let rules_dir = h._dir.path().join("rules");
    let mut other = Engine::new(true, Some(rules_dir)).unwrap();
    h.engine.shared_store = true;
    other.shared_store = true;
    // 51 exports (the count rule's threshold), one per batch, alternating between
    // the two collectors: 26 reach this one, 25 the other.
    let (mut raised, mut fired_at) = (Vec::new(), Vec::new());
    for i in 0..60 {
        let at = format!("2026-11-23T02:00:{:02}Z", i % 60);
        let fact = h.event(
            "ws-1",
            "workstation",
            &at,
            "file.exported",
            exported(json!({})),
        );
        std::mem::swap(&mut h.engine, &mut other);
        let alerts: Vec<Alert> = h
            .feed(&at, vec![fact])
            .into_iter()
            .filter(|a| a.rule_id == "builtin.files.mass-export-count")
            .collect();
        if !alerts.is_empty() {
            fired_at.push(i + 1);
        }
        raised.extend(alerts);
    }
    assert_eq!(
        fired_at,
        [51],
        "raised at the 51st export, once for the fleet"
    );
    // Another agent's 30 exports in one batch on one collector, then 21 in one batch
    // on the other: the window read once per batch, slid in memory, written back.
    for (n, second) in [(30, "10"), (21, "11")] {
        let at = format!("2026-11-23T02:01:{second}Z");
        let facts: Vec<Fact> = (0..n)
            .map(|_| {
                h.event(
                    "ws-3",
                    "workstation",
                    &at,
                    "file.exported",
                    exported(json!({})),
                )
            })
            .collect();
        std::mem::swap(&mut h.engine, &mut other);
        let alerts = h.feed(&at, facts);
        let count = alerts
            .iter()
            .filter(|a| a.rule_id == "builtin.files.mass-export-count" && a.agent_id == "ws-3")
            .count();
        assert_eq!(count, usize::from(n == 21), "batch of {n}");
    }
    assert!(raised[0].event_ids.len() >= 2, "{:?}", raised[0].event_ids);
    // A distinct count: three sticks, the second on the other collector.
    let mut fired = Vec::new();
    for (i, serial) in ["A", "B", "A", "C"].iter().enumerate() {
        let at = format!("2026-11-23T02:05:{i:02}Z");
        let fact = h.event(
            "ws-2",
            "workstation",
            &at,
            "usb.attached",
            usb(json!({"serial": serial})),
        );
        std::mem::swap(&mut h.engine, &mut other);
        fired.push(
            h.feed(&at, vec![fact])
                .iter()
                .any(|a| a.rule_id == "site.distinct-sticks"),
        );
    }
    assert_eq!(fired, [false, false, false, true]);
    // Pruned on the leader once out of the window.
    let entries = |h: &mut Harness| -> i64 {
        h.store
            .conn()
            .query_row("SELECT COUNT(*) FROM window_entries", params![], |r| {
                r.get(0)
            })
            .unwrap()
    };
    assert!(entries(&mut h) > 0);
    let (store, engine) = (&mut h.store, &h.engine);
    store
        .in_transaction(|tx| engine.prune_seen(tx, "2026-11-23T03:00:00Z".parse().unwrap()))
        .unwrap();
    assert_eq!(entries(&mut h), 0);
}

#[test]
fn distinct_counts_values_per_key_and_groups_come_from_the_context() {
    let mut h = Harness::with_rules(
        "[agent_groups]\nfinance = [\"fin-*\"]\n\
         [[rule]]\nid = \"site.many-destinations\"\ntitle = \"Many destinations\"\nlevel = \"yellow\"\non = [\"net.transfer\"]\n\
         condition = \"'finance' in agent.groups\"\nsummary = \"{agent.id} reached {event.data.remote_addr}\"\n\
         [rule.correlation]\naggregate = \"distinct\"\nfield = \"event.data.remote_addr\"\nwindow = \"1h\"\nthreshold = 3\n",
    );
    let to = |h: &mut Harness, agent: &str, addr: &str| {
        h.event(
            agent,
            "workstation",
            DAY,
            "net.transfer",
            transfer(json!({"remote_addr": addr})),
        )
    };
    // Three transfers but two destinations: no alert; a third destination fires.
    let facts = vec![
        to(&mut h, "fin-1", "203.0.113.1"),
        to(&mut h, "fin-1", "203.0.113.2"),
        to(&mut h, "fin-1", "203.0.113.1"),
    ];
    assert!(h.fired(DAY, facts, "site.many-destinations").is_none());
    let third = to(&mut h, "fin-1", "203.0.113.3");
    let a = h.fired(DAY, vec![third], "site.many-destinations").unwrap();
    assert_eq!(a.details["aggregate"]["value"], 3.0);
    // The same from an agent outside the group never counts.
    let facts = (1..=4)
        .map(|i| to(&mut h, "ws-1", &format!("203.0.113.{i}")))
        .collect();
    assert!(h.fired(DAY, facts, "site.many-destinations").is_none());
}

#[test]
fn an_unattributed_transfer_still_fires_with_its_key() {
    // A connection seen only when the kernel destroyed it has no pid.
    let mut h = Harness::new();
    let fact = h.event(
        "ws-1",
        "workstation",
        DAY,
        "net.transfer",
        transfer(json!({"pid": null, "exe": null, "cmdline": null})),
    );
    let a = h
        .fired(DAY, vec![fact], "builtin.net.upload-not-allowlisted")
        .expect("fires without a pid");
    assert!(!a.summary.contains("(?)"), "{}", a.summary);
}

/// A stick the policy lets in by a rule (here: every 1234:5678) is not "unknown
/// storage" though no inventory entry names it: it raised a red alert on every plug.
#[test]
fn a_stick_allowed_by_a_rule_is_not_unknown_storage() {
    let mut h = Harness::new();
    h.policy = weilan_config::load::load_str::<weilan_config::policy::PolicyFile>(
        "version = \"a1\"\n[[usb.rules]]\nid = \"team-sticks\"\ntarget = \"read-only\"\nvid_pid = [\"1234:5678\"]\n",
        std::path::Path::new("policy.toml"),
        std::path::PathBuf::from("/"),
    )
    .unwrap();
    let allowed = h.event(
        "ws-1",
        "workstation",
        DAY,
        "usb.attached",
        usb(json!({"vid": "1234", "pid": "5678"})),
    );
    assert_eq!(
        h.fired(DAY, vec![allowed], "builtin.usb.unknown-storage"),
        None
    );
    let other = h.event(
        "ws-1",
        "workstation",
        DAY,
        "usb.attached",
        usb(json!({"vid": "1234", "pid": "9999"})),
    );
    assert!(h
        .fired(DAY, vec![other], "builtin.usb.unknown-storage")
        .is_some());
}

#[test]
fn every_finding_kind_is_listed_and_a_misspelt_kind_is_refused_with_the_closest() {
    // Each `pub const X: &str = "collector.…"` of `findings` is in `findings::ALL`.
    let source = include_str!("mod.rs");
    let declared: std::collections::BTreeSet<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|k| k.starts_with("collector."))
        .collect();
    let listed: std::collections::BTreeSet<&str> = findings::ALL.iter().copied().collect();
    assert_eq!(declared, listed);

    let text = r#"
[[rule]]
id = "site.typos"
title = "typos"
level = "red"
on = ["usb.atached", "collector.journal_gaps", "*", "nothing.like.it"]
summary = "x"
"#;
    let err = super::file::parse(text, std::path::Path::new("site.toml"))
        .unwrap_err()
        .to_string();
    for expected in [
        "rule[0].on[0]: `usb.atached` is not an event kind; did you mean `usb.attached`?",
        "rule[0].on[1]: `collector.journal_gaps` is not an event kind; did you mean `collector.journal_gap`?",
        "rule[0].on[3]: `nothing.like.it` is not an event kind",
    ] {
        assert!(err.contains(expected), "{expected}\n in:\n{err}");
    }
    assert!(!err.contains("on[2]"), "{err}");
}

#[test]
fn a_rule_naming_a_list_or_group_nobody_defined_is_refused_with_the_closest_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("groups.toml"),
        "[lists]\nallowed_destinations = [\"10.0.0.0/8\"]\n[user_groups]\nadmins = [\"root\"]\n[agent_groups]\nfinance = [\"fin-*\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("site.toml"),
        r#"
[[rule]]
id = "site.names"
title = "names"
level = "red"
on = ["usb.attached"]
condition = "'finanse' in agent.groups && 'admin' in user.groups && !(event.data.vid in lists.allowed_destination) && 'finance' in agent.groups && lists['allowed_destinations'].size() > 0"
summary = "x"
"#,
    )
    .unwrap();
    let errors = super::RuleSet::load(false, Some(dir.path())).unwrap_err();
    let text: String = errors.iter().map(|e| e.to_string()).collect();
    for expected in [
        "rule `site.names`: no agent group `finanse` is defined; did you mean `finance`?",
        "rule `site.names`: no user group `admin` is defined; did you mean `admins`?",
        "rule `site.names`: no list `allowed_destination` is defined; did you mean `allowed_destinations`?",
    ] {
        assert!(text.contains(expected), "{expected}\n in:\n{text}");
    }
    assert_eq!(text.matches("is defined").count(), 3, "{text}");
}

#[test]
fn the_complete_rule_files_in_docs_rules_md_load_beside_the_built_in_pack() {
    // The ```toml blocks that are whole files (a rule; lists, groups and working
    // hours), verbatim; the third block is an excerpt of a built-in rule.
    let doc = include_str!("../../../docs/rules.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(
        blocks.len(),
        3,
        "docs/rules.md's toml blocks changed: update this test"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("site.toml"), blocks[0]).unwrap();
    std::fs::write(dir.path().join("lists.toml"), blocks[1]).unwrap();
    let set = super::RuleSet::load(true, Some(dir.path()))
        .unwrap_or_else(|e| panic!("{}", e.iter().map(|e| e.to_string()).collect::<String>()));
    assert!(set.get("site.usb.night").is_some());
    assert!(set.has_group("finance"));
}
