//! Rule matching (table-driven and property-based) and policy validation.

use super::*;
use crate::event::UsbInterface;
use crate::load::load_str;
use crate::policy::PolicyFile;
use proptest::prelude::*;

fn dev(vid: &str, pid: &str, serial: &str, classes: &[u8]) -> UsbDevice {
    UsbDevice {
        port_path: "1-2".into(),
        busnum: 1,
        devnum: 3,
        vid: vid.into(),
        pid: pid.into(),
        bcd_device: "0100".into(),
        serial: Some(serial.into()),
        manufacturer: Some("SanDisk".into()),
        product: Some("Cruzer Blade".into()),
        device_class: 0,
        interfaces: classes
            .iter()
            .enumerate()
            .map(|(i, c)| UsbInterface {
                number: i as u8,
                class: *c,
                subclass: 6,
                protocol: 0x50,
            })
            .collect(),
        speed: Some("480".into()),
        authorized: Some(false),
        hash: "a".repeat(64),
        parent_hash: Some("b".repeat(64)),
        block_devices: vec![],
        present_at_start: false,
    }
}

fn policy(text: &str) -> Result<crate::policy::Policy, crate::ConfigErrors> {
    load_str::<PolicyFile>(text, std::path::Path::new("policy.toml"), "/".into())
}

fn ctx_at(groups: &[String], rfc3339: &str) -> Context<'static> {
    Context {
        host_groups: Box::leak(groups.to_vec().into_boxed_slice()),
        now: rfc3339.parse().unwrap(),
    }
}

const POLICY: &str = r#"
version = "t1"
[usb]
default_target = "block"
mode = "enforce"

[[usb.known_devices]]
label = "finance-1"
serial = "FIN-1"

[[usb.rules]]
id = "finance-label"
target = "allow"
label = "finance-1"

[[usb.rules]]
id = "sandisk-ro"
target = "read-only"
vid_pid = ["0781:*"]
interfaces = { all-of = ["08:06:*"], none-of = ["e0:*:*"] }

[[usb.rules]]
id = "office-hours-kingston"
target = "allow"
vid_pid = ["0951:16*"]
host_groups = ["finance"]
time = { days = ["mon", "tue", "wed", "thu", "fri"], from = "08:00", to = "18:00", tz = "Asia/Shanghai" }

[[usb.rules]]
id = "no-hid"
target = "reject"
interfaces = { one-of = ["03:*:*"] }
"#;

#[test]
fn table_of_devices_and_the_rule_that_decides() {
    let p = policy(POLICY).unwrap_or_else(|e| panic!("{e}"));
    let fin = ["finance".to_string()];
    // Wednesday 10:00 in Shanghai = 02:00 UTC.
    let weekday_day = ctx_at(&fin, "2026-11-18T02:00:00Z");
    let weekday_night = ctx_at(&fin, "2026-11-18T13:00:00Z");
    let cases: Vec<(&str, UsbDevice, &Context, Target, &str)> = vec![
        (
            "known label",
            dev("1234", "0001", "FIN-1", &[8]),
            &weekday_day,
            Target::Allow,
            "finance-label",
        ),
        (
            "sandisk storage",
            dev("0781", "5567", "X", &[8]),
            &weekday_day,
            Target::ReadOnly,
            "sandisk-ro",
        ),
        (
            "sandisk non-storage",
            dev("0781", "5567", "X", &[0xff]),
            &weekday_day,
            Target::Block,
            IMPLICIT_DEFAULT,
        ),
        (
            "kingston in hours",
            dev("0951", "1666", "K", &[8]),
            &weekday_day,
            Target::Allow,
            "office-hours-kingston",
        ),
        (
            "kingston after hours",
            dev("0951", "1666", "K", &[8]),
            &weekday_night,
            Target::Block,
            IMPLICIT_DEFAULT,
        ),
        (
            "kingston other pid",
            dev("0951", "1700", "K", &[8]),
            &weekday_day,
            Target::Block,
            IMPLICIT_DEFAULT,
        ),
        (
            "keyboard",
            dev("046d", "c31c", "KB", &[3]),
            &weekday_day,
            Target::Reject,
            "no-hid",
        ),
        (
            "badusb composite",
            dev("0781", "5567", "X", &[8, 3]),
            &weekday_day,
            Target::Reject,
            BUILTIN_BADUSB,
        ),
        (
            "unknown stick",
            dev("abcd", "0001", "U", &[8]),
            &weekday_day,
            Target::Block,
            IMPLICIT_DEFAULT,
        ),
    ];
    for (name, d, ctx, target, rule) in cases {
        let v = p.usb.evaluate(&d, ctx);
        assert_eq!((v.target, v.rule_id.as_str()), (target, rule), "{name}");
    }
    let mut hub = dev("1d6b", "0002", "0000:00:14.0", &[9]);
    hub.port_path = "usb3".into();
    assert_eq!(p.usb.evaluate(&hub, &weekday_day).rule_id, BUILTIN_ROOT_HUB);
    // Outside the finance group the time rule does not apply.
    let other = ctx_at(&[], "2026-11-18T02:00:00Z");
    assert_eq!(
        p.usb
            .evaluate(&dev("0951", "1666", "K", &[8]), &other)
            .rule_id,
        IMPLICIT_DEFAULT
    );
}

#[test]
fn badusb_protection_can_be_turned_off_explicitly() {
    let p =
        policy("version = \"t\"\n[usb]\nbadusb_protection = false\ndefault_target = \"allow\"\n")
            .unwrap();
    let v = p.usb.evaluate(
        &dev("0781", "5567", "X", &[8, 3]),
        &ctx_at(&[], "2026-01-01T00:00:00Z"),
    );
    assert_eq!(
        (v.target, v.rule_id.as_str()),
        (Target::Allow, IMPLICIT_DEFAULT)
    );
}

#[test]
fn overnight_windows_wrap_midnight() {
    let w = TimeWindow {
        days: 1, // Monday only
        from: jiff::civil::time(22, 0, 0, 0),
        to: jiff::civil::time(6, 0, 0, 0),
        tz: Some(jiff::tz::TimeZone::UTC),
    };
    assert!(w.contains("2026-11-16T23:00:00Z".parse().unwrap())); // Monday 23:00
    assert!(w.contains("2026-11-17T05:00:00Z".parse().unwrap())); // Tuesday 05:00 (Monday's night)
    assert!(!w.contains("2026-11-17T23:00:00Z".parse().unwrap())); // Tuesday 23:00
}

#[test]
fn invalid_policies_report_every_problem_with_its_path() {
    let text = r#"
version = "bad"
[usb]
default_target = "maybe"
mode = "loud"

[[usb.rules]]
id = "dup"
target = "allow"
vid_pid = ["07g1:1234"]

[[usb.rules]]
id = "dup"
target = "explode"
serial = []
interfaces = { all-of = ["08:06:50"], none-of = ["08:*:*"] }
time = { days = ["funday"], from = "25:00", to = "08:00", tz = "Mars/Olympus" }
label = "nobody"
"#;
    let err = policy(text).unwrap_err();
    let shown = err.to_string();
    for field in [
        "usb.default_target",
        "usb.mode",
        "usb.rules[0].vid_pid[0]",
        "usb.rules[1].id",
        "usb.rules[1].target",
        "usb.rules[1].serial",
        "usb.rules[1].interfaces",
        "usb.rules[1].time.days[0]",
        "usb.rules[1].time.from",
        "usb.rules[1].time.tz",
        "usb.rules[1].label",
    ] {
        assert!(
            err.issues
                .iter()
                .any(|i| i.field == field && i.line.is_some()),
            "no line-located issue for {field}:\n{shown}"
        );
    }
}

fn arb_device() -> impl Strategy<Value = UsbDevice> {
    (
        "[0-9a-f]{4}",
        "[0-9a-f]{4}",
        "[A-Z0-9]{1,8}",
        proptest::collection::vec(
            prop_oneof![Just(3u8), Just(8u8), Just(9u8), Just(0xe0u8), Just(0xffu8)],
            0..4,
        ),
    )
        .prop_map(|(v, p, s, c)| dev(&v, &p, &s, &c))
}

proptest! {
    /// A rule with no matchers matches everything; adding matchers only narrows it.
    #[test]
    fn matchers_only_narrow(d in arb_device(), vid in "[0-9a-f*]{4}") {
        let ctx = ctx_at(&[], "2026-11-18T02:00:00Z");
        let mut r = Rule {
            id: "r".into(), target: Target::Allow, description: String::new(),
            vid_pid: None, serial: None, manufacturer: None, product: None, hash: None,
            parent_hash: None, port: None, all_of: vec![], one_of: vec![], none_of: vec![],
            speed: None, host_groups: None, time: None, label: None,
        };
        prop_assert!(r.matches(&d, &[], &ctx));
        r.vid_pid = Some(vec![(vid.clone(), "*".into())]);
        let with_vid = r.matches(&d, &[], &ctx);
        r.serial = Some(vec![d.serial.clone().unwrap()]);
        prop_assert_eq!(r.matches(&d, &[], &ctx), with_vid);
        r.serial = Some(vec!["not-this-one".into()]);
        prop_assert!(!r.matches(&d, &[], &ctx));
    }

    /// `*` in a vid pattern matches exactly like a regex `.*`.
    #[test]
    fn glob_agrees_with_regex(p in "[0-9a-f*]{1,5}", t in "[0-9a-f]{0,5}") {
        let re = format!("^{}$", p.replace('*', ".*"));
        let expected = regex_lite_match(&re, &t);
        prop_assert_eq!(glob(&p, &t), expected);
    }

    /// First match wins: the verdict always names the first matching rule or the default.
    #[test]
    fn first_match_wins(d in arb_device()) {
        let p = policy(POLICY).unwrap();
        let ctx = ctx_at(&["finance".to_string()], "2026-11-18T02:00:00Z");
        let v = p.usb.evaluate(&d, &ctx);
        if v.rule_id != BUILTIN_BADUSB && v.rule_id != BUILTIN_ROOT_HUB {
            let first = p.usb.rules.iter().find(|r| r.matches(&d, &p.usb.known_devices, &ctx));
            prop_assert_eq!(v.rule_id, first.map_or(IMPLICIT_DEFAULT.to_string(), |r| r.id.clone()));
        }
    }
}

/// A tiny `^[...]*$` matcher for the glob property (only literals and `.*`).
fn regex_lite_match(re: &str, t: &str) -> bool {
    let pat = re.trim_start_matches('^').trim_end_matches('$');
    let parts: Vec<&str> = pat.split(".*").collect();
    if parts.len() == 1 {
        return pat == t;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !t.starts_with(first) || t.len() < first.len() + last.len() || !t.ends_with(last) {
        return false;
    }
    let mut rest = &t[first.len()..t.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// A serial is no identity (any stick can be programmed with one): a serial-only rule
/// accepts only the vid:pid the inventory gives for that serial, never a clone, and
/// `lint` names every identity that trusts a serial alone.
#[test]
fn serial_only_rules_refuse_a_clone_with_another_vid_pid() {
    let p = policy(
        r#"
version = "s1"
[usb]
default_target = "block"

[[usb.known_devices]]
label = "finance stick"
vid = "0781"
pid = "5581"
serial = "FIN-7"

[[usb.known_devices]]
label = "old entry"
serial = "OLD-1"

[[usb.rules]]
id = "allow-by-serial"
target = "allow"
serial = ["FIN-7", "NOT-INVENTORIED"]

[[usb.rules]]
id = "allow-pinned"
target = "allow"
serial = ["PIN-1"]
vid_pid = ["0951:1666"]
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ctx = ctx_at(&[], "2026-11-18T02:00:00Z");
    let decide = |d: UsbDevice| p.usb.evaluate(&d, &ctx).rule_id;
    assert_eq!(
        decide(dev("0781", "5581", "FIN-7", &[8])),
        "allow-by-serial"
    );
    assert_eq!(
        decide(dev("abcd", "0001", "FIN-7", &[8])),
        IMPLICIT_DEFAULT,
        "clone"
    );
    assert_eq!(
        decide(dev("0781", "5581", "NOT-INVENTORIED", &[8])),
        IMPLICIT_DEFAULT,
        "no inventory entry: no identity"
    );
    assert_eq!(decide(dev("0951", "1666", "PIN-1", &[8])), "allow-pinned");
    assert_eq!(decide(dev("abcd", "0001", "PIN-1", &[8])), IMPLICIT_DEFAULT);
    let lint = p.usb.lint();
    assert_eq!(lint.len(), 2, "{lint:?}");
    assert!(
        lint[0].starts_with("usb.known_devices[1] (`old entry`): named by serial only"),
        "{lint:?}"
    );
    assert!(
        lint[1].starts_with("usb.rules[0] (`allow-by-serial`): serial without vid_pid"),
        "{lint:?}"
    );
}

/// Denying by serial keeps matching any device with it: a clone of a rejected stick is
/// rejected too.
#[test]
fn a_reject_by_serial_also_rejects_clones() {
    let p = policy(
        "version = \"s2\"\n[[usb.rules]]\nid = \"deny\"\ntarget = \"reject\"\nserial = [\"BAD-1\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ctx = ctx_at(&[], "2026-11-18T02:00:00Z");
    for (vid, pid) in [("0781", "5581"), ("abcd", "0001")] {
        assert_eq!(
            p.usb.evaluate(&dev(vid, pid, "BAD-1", &[8]), &ctx).rule_id,
            "deny"
        );
    }
    assert!(p.usb.lint().is_empty());
}
