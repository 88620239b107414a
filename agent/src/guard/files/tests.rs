//! The files guard with a recording enforcer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use weilan_config::event::{Event, FileEnforced, FileExported};
use weilan_config::policy::files::ExitKind;

use super::{FileEnforcer, FilesGuard};
use crate::source::files::{FileFact, FileJudge, WrittenFile};

/// Records what the guard asked for; answers as told.
#[derive(Default, Clone)]
struct Recording {
    calls: Arc<Mutex<Vec<String>>>,
    quarantine_fails: bool,
}

impl FileEnforcer for Recording {
    fn quarantine(
        &self,
        path: &Path,
        evidence_dir: &Path,
        about: serde_json::Value,
    ) -> Result<(PathBuf, String), String> {
        self.calls.lock().unwrap().push(format!(
            "quarantine {} -> {} (rule {})",
            path.display(),
            evidence_dir.display(),
            about["rule_id"].as_str().unwrap_or("?")
        ));
        if self.quarantine_fails {
            return Err("disk full".into());
        }
        Ok((evidence_dir.join("kept"), "ab".repeat(32)))
    }
    fn read_only_device(&self, hash: &str, rule_id: &str, _reason: String) -> Result<(), String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("read-only {hash} ({rule_id})"));
        Ok(())
    }
    fn remove_refused_leftover(&self, path: &Path) -> String {
        self.calls
            .lock()
            .unwrap()
            .push(format!("remove {}", path.display()));
        "; removed".into()
    }
}

const POLICY: &str = r#"
version = "t"
[files]
evidence_dir = "/var/lib/weilan-agent/evidence"
[[files.rules]]
id = "secret-out"
detectors = ["mark:secret"]
action = "quarantine"
[[files.rules]]
id = "cards"
detectors = ["bank-card"]
action = "read-only-device"
"#;

fn written(detector: &str, usb_hash: Option<&str>) -> FileFact {
    let policy = weilan_config::policy::parse(POLICY, "policy.toml").unwrap();
    let event: FileExported = serde_json::from_value(serde_json::json!({
        "path": "/media/stick/a.docx", "mount_point": "/media/stick", "fs_type": "vfat",
        "mount_source": "/dev/sdb1", "usb_hash": usb_hash, "size": 10, "hashed_bytes": 10,
        "attribution": "fanotify", "exit": "usb", "action": "", "rule_id": "",
        "classification": [{"detector": detector, "count": 1, "samples": []}],
        "first_write": "2026-12-05T10:00:00Z", "last_write": "2026-12-05T10:00:01Z",
    }))
    .unwrap();
    FileFact::Written(Box::new(WrittenFile {
        event,
        kind: ExitKind::Removable,
        policy: Arc::new(policy.files),
    }))
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind()).collect()
}

#[test]
fn each_file_is_decided_by_the_policy_it_was_read_under_and_names_its_rule() {
    let enforcer = Recording::default();
    let guard = FilesGuard::new(Box::new(enforcer.clone()));

    let events = guard.judge(written("mark:secret", None));
    assert_eq!(kinds(&events), ["file.exported", "file.enforced"]);
    let (Event::FileExported(x), Event::FileEnforced(e)) = (&events[0], &events[1]) else {
        panic!("{events:?}")
    };
    assert_eq!(
        (x.action.as_str(), x.rule_id.as_str()),
        ("quarantine", "secret-out")
    );
    assert_eq!(
        (e.outcome.as_str(), e.rule_id.as_str()),
        ("done", "secret-out")
    );

    let events = guard.judge(written("bank-card", Some("h1")));
    let Event::FileEnforced(e) = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(e.outcome, "requested");

    // Nothing classified: audited by the built-in default, nothing done.
    let events = guard.judge(written("phone", None));
    assert_eq!(kinds(&events), ["file.exported"]);
    let Event::FileExported(x) = &events[0] else {
        panic!()
    };
    assert_eq!(x.action, "audit");

    assert_eq!(
        *enforcer.calls.lock().unwrap(),
        [
            "quarantine /media/stick/a.docx -> /var/lib/weilan-agent/evidence (rule secret-out)",
            "read-only h1 (files:cards)",
        ]
    );
}

#[test]
fn an_action_that_cannot_be_carried_out_is_reported_failed_never_skipped() {
    let guard = FilesGuard::new(Box::new(Recording {
        quarantine_fails: true,
        ..Default::default()
    }));
    let events = guard.judge(written("mark:secret", None));
    let Event::FileEnforced(e) = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(e.outcome, "failed");
    assert_eq!(e.error.as_deref(), Some("disk full"));
    // read-only-device on a file that is not on a USB device: no device to switch.
    let events = guard.judge(written("bank-card", None));
    let Event::FileEnforced(e) = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(e.outcome, "failed");
    assert!(
        e.error.as_deref().unwrap().contains("not on a USB device"),
        "{e:?}"
    );
}

#[test]
fn a_refused_open_leaves_no_empty_file_behind() {
    let enforcer = Recording::default();
    let guard = FilesGuard::new(Box::new(enforcer.clone()));
    let enforced: FileEnforced = serde_json::from_value(serde_json::json!({
        "action": "deny", "rule_id": "r", "matched": [], "outcome": "done", "detail": "refused",
    }))
    .unwrap();
    let events = guard.judge(FileFact::Refused {
        enforced: Box::new(enforced),
        created: Some(PathBuf::from("/media/stick/x")),
    });
    let Event::FileEnforced(e) = &events[0] else {
        panic!()
    };
    assert_eq!(e.detail, "refused; removed");
    assert_eq!(*enforcer.calls.lock().unwrap(), ["remove /media/stick/x"]);
}

fn exported_on_usb(hash: Option<&str>) -> FileExported {
    FileExported {
        path: "/media/stick/cards.csv".into(),
        mount_point: "/media/stick".into(),
        fs_type: "vfat".into(),
        mount_source: "/dev/sdb1".into(),
        usb_serial: Some("S1".into()),
        usb_hash: hash.map(String::from),
        size: 10,
        sha256: None,
        hashed_bytes: 10,
        pid: Some(42),
        exe: None,
        cmdline: None,
        uid: None,
        user: None,
        first_write: jiff::Timestamp::now(),
        last_write: jiff::Timestamp::now(),
        attribution: "fanotify".into(),
        classification: Vec::new(),
        classification_note: None,
        exit: "removable".into(),
        action: "read-only-device".into(),
        rule_id: "cards".into(),
        origins: Vec::new(),
        rewrites: 0,
        unclosed: false,
    }
}

#[test]
fn read_only_device_is_handed_to_the_usb_fence_naming_the_rule() {
    let verdict = weilan_config::policy::files::FileVerdict {
        action: weilan_config::policy::files::FileAction::ReadOnlyDevice,
        rule_id: "cards".into(),
        matched: vec!["bank-card".into()],
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let guard = FilesGuard::new(Box::new(super::linux::LinuxFileEnforcer {
        fence: Some(tx.clone()),
    }));
    let e = guard
        .act(
            &exported_on_usb(Some("h1")),
            &verdict,
            Path::new("/nonexistent"),
        )
        .unwrap();
    assert_eq!(
        (e.outcome.as_str(), e.rule_id.as_str()),
        ("requested", "cards")
    );
    match rx.try_recv().unwrap() {
        crate::fence::FenceControl::Override {
            device_hash,
            target,
            rule_id,
            ..
        } => assert_eq!(
            (device_hash.as_str(), target, rule_id.as_str()),
            (
                "h1",
                weilan_config::policy::usb::Target::ReadOnly,
                "files:cards"
            )
        ),
        other => panic!("{other:?}"),
    }
    // No device to switch: a failure, said so — never a silent no-op.
    let e = guard
        .act(&exported_on_usb(None), &verdict, Path::new("/x"))
        .unwrap();
    assert_eq!(e.outcome, "failed");
    assert!(e.error.unwrap().contains("not on a USB device"));
}
