//! Fence tests: decisions and enforcement with a recording backend, and the real
//! Linux enforcer writing into a fake sysfs tree.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use super::*;
use crate::source::usb::sysfs::fake::{add_stick, FakeStick};
use crate::source::Observed;

#[derive(Default, Clone)]
struct Recorded(Arc<Mutex<Vec<String>>>);

impl UsbEnforcer for Recorded {
    fn set_authorized_default(&mut self, hub: &Path, allow: bool) -> Result<(), String> {
        self.log(format!("default {} {}", name(hub), allow as u8))
    }
    fn authorize(&mut self, dev: &Path, allow: bool) -> Result<(), String> {
        self.log(format!("authorized {} {}", name(dev), allow as u8))
    }
    fn remove(&mut self, dev: &Path) -> Result<(), String> {
        self.log(format!("remove {}", name(dev)))
    }
    fn set_read_only(&mut self, block: &str) -> Result<(), String> {
        self.log(format!("ro {block}"))
    }
    fn remount_read_only(&mut self, mp: &str) -> Result<(), String> {
        self.log(format!("remount {mp}"))
    }
}

impl Recorded {
    fn log(&self, s: String) -> Result<(), String> {
        self.0.lock().unwrap().push(s);
        Ok(())
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

const POLICY: &str = r#"
version = "fence-1"
[usb]
mode = "enforce"
default_target = "block"

# The test sticks are abcd:0001 (a serial alone grants nothing).
[[usb.rules]]
id = "allowed-serial"
target = "allow"
serial = ["GOOD-1"]
vid_pid = ["abcd:0001"]

[[usb.rules]]
id = "ro-serial"
target = "read-only"
serial = ["RO-1"]
vid_pid = ["abcd:0001"]

[[usb.rules]]
id = "reject-serial"
target = "reject"
serial = ["EVIL-1"]
"#;

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    fence: Fence,
    rx: mpsc::Receiver<Observed>,
}

fn world(policy: &str, enforcer: Box<dyn UsbEnforcer>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    add_stick(
        &root,
        &FakeStick {
            port: "1-1",
            vid: "0781",
            pid: "5581",
            serial: "PRESENT",
            classes: &[8],
            disk: None,
        },
    );
    let (tx, rx) = mpsc::channel(64);
    let policy = Arc::new(weilan_config::policy::parse(policy, "policy.toml").unwrap());
    let fence = Fence::new(
        policy,
        vec![],
        &root,
        enforcer,
        EventSink::new(tx, Arc::new(AtomicU64::new(0))),
    );
    World {
        _dir: dir,
        root,
        fence,
        rx,
    }
}

fn stick(w: &World, port: &str, serial: &str, classes: &[u8]) -> (PathBuf, UsbDevice) {
    let devpath = add_stick(
        &w.root,
        &FakeStick {
            port,
            vid: "abcd",
            pid: "0001",
            serial,
            classes,
            disk: None,
        },
    );
    let dir = Sysfs::new(&w.root).devpath_dir(&devpath);
    let dev = Sysfs::new(&w.root).read_device(&dir, false).unwrap();
    (dir, dev)
}

fn decision(w: &mut World) -> UsbDecision {
    match w.rx.try_recv().expect("a decision event").event {
        Event::UsbDecision(d) => d,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn each_target_is_enforced_and_reported_with_its_rule() {
    let rec = Recorded::default();
    let mut w = world(POLICY, Box::new(rec.clone()));
    w.fence.start();
    assert_eq!(
        rec.take(),
        vec!["default usb1 0"],
        "default-deny on the root hub"
    );
    let cases = [
        (
            "1-2",
            "GOOD-1",
            "allow",
            "allowed-serial",
            vec!["authorized 1-2 1"],
        ),
        (
            "1-3",
            "EVIL-1",
            "reject",
            "reject-serial",
            vec!["authorized 1-3 0", "remove 1-3"],
        ),
        (
            "1-4",
            "WHO-1",
            "block",
            "implicit default",
            vec!["authorized 1-4 0"],
        ),
        (
            "1-5",
            "RO-1",
            "read-only",
            "ro-serial",
            vec!["authorized 1-5 1"],
        ),
    ];
    for (port, serial, target, rule, calls) in cases {
        let (dir, device) = stick(&w, port, serial, &[8]);
        w.fence
            .on_fact(FenceFact::Attached {
                dir,
                device,
                at_start: false,
                seen: None,
            })
            .await;
        let d = decision(&mut w);
        assert_eq!(
            (d.target.as_str(), d.rule_id.as_str(), d.enforced),
            (target, rule, true),
            "{serial}"
        );
        assert_eq!(d.policy_version, "fence-1");
        assert_eq!(rec.take(), calls, "{serial}");
    }
    // The read-only device's block devices and mounts are made read-only as they appear.
    let usb_dir =
        Sysfs::new(&w.root).devpath_dir(Path::new("/devices/pci0000:00/0000:00:14.0/usb1/1-5"));
    w.fence
        .on_fact(FenceFact::BlockAdded {
            usb_dir: usb_dir.clone(),
            block: "sdc".into(),
        })
        .await;
    assert_eq!(rec.take(), vec!["ro sdc"]);
    assert_eq!(decision(&mut w).actions, vec!["BLKROSET sdc"]);
    let volume = weilan_config::event::Volume {
        block_device: "sdc1".into(),
        dev: "8:33".into(),
        mount_point: "/media/sdc1".into(),
        fs_type: "vfat".into(),
        read_only: false,
        label: None,
        uuid: None,
        usb_port_path: Some("1-5".into()),
        usb_hash: None,
        usb_serial: Some("RO-1".into()),
    };
    w.fence
        .on_fact(FenceFact::Mounted { usb_dir, volume })
        .await;
    assert_eq!(rec.take(), vec!["ro sdc1", "remount /media/sdc1"]);
    assert_eq!(decision(&mut w).trigger, "mount");
}

#[tokio::test]
async fn badusb_and_root_hubs_and_audit_mode() {
    let rec = Recorded::default();
    let mut w = world(POLICY, Box::new(rec.clone()));
    let (dir, device) = stick(&w, "1-6", "GOOD-1", &[8, 3]);
    w.fence
        .on_fact(FenceFact::Attached {
            dir,
            device,
            at_start: false,
            seen: None,
        })
        .await;
    let d = decision(&mut w);
    assert_eq!(
        (d.target.as_str(), d.rule_id.as_str()),
        ("reject", "builtin.badusb"),
        "even an allowed serial"
    );
    assert_eq!(rec.take(), vec!["authorized 1-6 0", "remove 1-6"]);
    // A root hub is never touched (a new one only gets default-deny).
    let hub = w.root.join("devices/pci0000:00/0000:00:14.0/usb1");
    let hub_dev = Sysfs::new(&w.root).read_device(&hub, false).unwrap();
    w.fence
        .on_fact(FenceFact::Attached {
            dir: hub,
            device: hub_dev,
            at_start: false,
            seen: None,
        })
        .await;
    assert!(w.rx.try_recv().is_err(), "no decision for a root hub");
    assert_eq!(rec.take(), vec!["default usb1 0"]);

    let rec = Recorded::default();
    let mut w = world(
        &POLICY.replace("mode = \"enforce\"", "mode = \"audit\""),
        Box::new(rec.clone()),
    );
    w.fence.start();
    let (dir, device) = stick(&w, "1-7", "WHO-1", &[8]);
    w.fence
        .on_fact(FenceFact::Attached {
            dir,
            device,
            at_start: false,
            seen: None,
        })
        .await;
    let d = decision(&mut w);
    assert_eq!(
        (d.target.as_str(), d.mode.as_str(), d.enforced),
        ("block", "audit", false)
    );
    assert!(rec.take().is_empty(), "audit mode touches nothing");
}

#[tokio::test]
async fn present_devices_are_kept_or_decided_and_policy_changes_reapply() {
    let rec = Recorded::default();
    let mut w = world(
        &POLICY.replace(
            "default_target = \"block\"",
            "default_target = \"block\"\npresent_at_start = \"keep\"",
        ),
        Box::new(rec.clone()),
    );
    let (dir, device) = stick(&w, "1-8", "WHO-1", &[8]);
    w.fence
        .on_fact(FenceFact::Attached {
            dir,
            device,
            at_start: true,
            seen: None,
        })
        .await;
    let d = decision(&mut w);
    assert_eq!((d.trigger.as_str(), d.enforced), ("start", false));
    assert!(d.actions[0].starts_with("kept"));
    assert!(rec.take().is_empty());
    // A new policy that allows it is applied to the present device.
    let allow = POLICY
        .replace("serial = [\"GOOD-1\"]", "serial = [\"GOOD-1\", \"WHO-1\"]")
        .replace("fence-1", "fence-2");
    w.fence.policy = Arc::new(weilan_config::policy::parse(&allow, "p").unwrap());
    w.fence.reevaluate("policy-change").await;
    let d = decision(&mut w);
    assert_eq!(
        (
            d.target.as_str(),
            d.trigger.as_str(),
            d.policy_version.as_str()
        ),
        ("allow", "policy-change", "fence-2")
    );
    assert_eq!(rec.take(), vec!["authorized 1-8 1"]);
}

#[tokio::test]
async fn the_linux_enforcer_writes_the_sysfs_attributes_of_a_fake_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    add_stick(
        &root,
        &FakeStick {
            port: "1-1",
            vid: "0781",
            pid: "5581",
            serial: "X",
            classes: &[8],
            disk: None,
        },
    );
    let enforcer = linux::LinuxEnforcer {
        dev_root: root.join("dev"),
        create_missing: true,
    };
    let (tx, mut rx) = mpsc::channel(64);
    let policy = Arc::new(weilan_config::policy::parse(POLICY, "p").unwrap());
    let mut fence = Fence::new(
        policy,
        vec![],
        &root,
        Box::new(enforcer),
        EventSink::new(tx, Arc::new(AtomicU64::new(0))),
    );
    fence.start();
    let hub = root.join("devices/pci0000:00/0000:00:14.0/usb1");
    assert_eq!(
        std::fs::read_to_string(hub.join("authorized_default")).unwrap(),
        "0"
    );
    let read =
        |p: &str, attr: &str| std::fs::read_to_string(hub.join(p).join(attr)).unwrap_or_default();
    for (port, serial) in [("1-2", "GOOD-1"), ("1-3", "EVIL-1"), ("1-4", "WHO-1")] {
        let devpath = add_stick(
            &root,
            &FakeStick {
                port,
                vid: "abcd",
                pid: "0001",
                serial,
                classes: &[8],
                disk: None,
            },
        );
        let d = Sysfs::new(&root).devpath_dir(&devpath);
        let device = Sysfs::new(&root).read_device(&d, false).unwrap();
        fence
            .on_fact(FenceFact::Attached {
                dir: d,
                device,
                at_start: false,
                seen: None,
            })
            .await;
        assert!(matches!(rx.try_recv().unwrap().event, Event::UsbDecision(ref x) if x.enforced));
    }
    assert_eq!(
        (read("1-2", "authorized"), read("1-2", "remove")),
        ("1".into(), "".into())
    );
    assert_eq!(
        (read("1-3", "authorized"), read("1-3", "remove")),
        ("0".into(), "1".into())
    );
    assert_eq!(
        (read("1-4", "authorized"), read("1-4", "remove")),
        ("0".into(), "".into())
    );
    // BLKROSET on something that is not a block device fails, and says so.
    let (dir2, device) = {
        let devpath = add_stick(
            &root,
            &FakeStick {
                port: "1-5",
                vid: "abcd",
                pid: "0001",
                serial: "RO-1",
                classes: &[8],
                disk: None,
            },
        );
        let d = Sysfs::new(&root).devpath_dir(&devpath);
        (d.clone(), Sysfs::new(&root).read_device(&d, false).unwrap())
    };
    fence
        .on_fact(FenceFact::Attached {
            dir: dir2.clone(),
            device,
            at_start: false,
            seen: None,
        })
        .await;
    let _ = rx.try_recv();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join("dev/sdq"), "not a block device").unwrap();
    fence
        .on_fact(FenceFact::BlockAdded {
            usb_dir: dir2,
            block: "sdq".into(),
        })
        .await;
    let Event::UsbDecision(d) = rx.try_recv().unwrap().event else {
        panic!()
    };
    assert!(!d.enforced);
    assert!(d.error.unwrap().contains("BLKROSET"));
}

#[tokio::test]
async fn a_device_switched_read_only_while_mounted_is_flagged_and_remounted() {
    let rec = Recorded::default();
    let mut w = world(POLICY, Box::new(rec.clone()));
    let devpath = add_stick(
        &w.root,
        &FakeStick {
            port: "1-5",
            vid: "abcd",
            pid: "0001",
            serial: "GOOD-1",
            classes: &[8],
            disk: Some(("sdq", "65:0")),
        },
    );
    let mountinfo = w.root.join("mountinfo");
    std::fs::write(
        &mountinfo,
        "40 25 65:0 / /media/stick rw,nosuid - vfat /dev/sdq rw\n\
         41 25 8:1 / / rw - ext4 /dev/sda1 rw\n",
    )
    .unwrap();
    w.fence.mountinfo = Some(mountinfo);
    let dir = Sysfs::new(&w.root).devpath_dir(&devpath);
    let device = Sysfs::new(&w.root).read_device(&dir, false).unwrap();
    let hash = device.hash.clone();
    w.fence
        .on_fact(FenceFact::Attached {
            dir,
            device,
            at_start: false,
            seen: None,
        })
        .await;
    assert_eq!(decision(&mut w).target.as_str(), "allow");
    rec.take();
    // A file rule asks for read-only: the disk is flagged and its mount remounted
    // (the other mount is left alone).
    w.fence.overrides.insert(
        hash,
        Verdict {
            target: Target::ReadOnly,
            rule_id: "files:cards".into(),
            reason: "cards.csv was written to it".into(),
        },
    );
    w.fence.reevaluate("command").await;
    let d = decision(&mut w);
    assert_eq!(
        (d.target.as_str(), d.rule_id.as_str(), d.error.as_deref()),
        ("read-only", "files:cards", None)
    );
    assert_eq!(
        rec.take(),
        vec![
            "authorized 1-5 1",
            "ro sdq",
            "ro sdq1",
            "remount /media/stick"
        ]
    );
}

/// A kernel stand-in over the fake tree: BLKROSET sets the `ro` attribute, a remount
/// rewrites the mount table — unless a file is "open for writing" (`busy`): EBUSY.
struct Kernelish {
    block: PathBuf,
    mountinfo: PathBuf,
    busy: Arc<std::sync::atomic::AtomicBool>,
}

impl UsbEnforcer for Kernelish {
    fn set_authorized_default(&mut self, _: &Path, _: bool) -> Result<(), String> {
        Ok(())
    }
    fn authorize(&mut self, _: &Path, _: bool) -> Result<(), String> {
        Ok(())
    }
    fn remove(&mut self, _: &Path) -> Result<(), String> {
        Ok(())
    }
    fn set_read_only(&mut self, block: &str) -> Result<(), String> {
        let dir = if self.block.ends_with(block) {
            self.block.clone()
        } else {
            self.block.join(block)
        };
        std::fs::write(dir.join("ro"), "1\n").map_err(|e| e.to_string())
    }
    fn remount_read_only(&mut self, mp: &str) -> Result<(), String> {
        if self.busy.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(format!(
                "remount {mp} read-only: EBUSY: Device or resource busy"
            ));
        }
        let text = std::fs::read_to_string(&self.mountinfo).unwrap();
        std::fs::write(
            &self.mountinfo,
            text.replace(&format!("{mp} rw,"), &format!("{mp} ro,")),
        )
        .map_err(|e| e.to_string())
    }
}

#[tokio::test]
async fn read_only_is_verified_retried_while_busy_and_restored_after_root_undoes_it() {
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let devpath = add_stick(
        &root,
        &FakeStick {
            port: "1-6",
            vid: "abcd",
            pid: "0001",
            serial: "RO-1",
            classes: &[8],
            disk: Some(("sdr", "65:16")),
        },
    );
    let usb_dir = Sysfs::new(&root).devpath_dir(&devpath);
    let block = usb_dir.join("1-6:1.0/host0/target0:0:0/0:0:0:0/block/sdr");
    std::fs::write(block.join("sdr1/ro"), "0\n").unwrap();
    let mountinfo = root.join("mountinfo");
    std::fs::write(
        &mountinfo,
        "40 25 65:17 / /media/stick rw,nosuid - vfat /dev/sdr1 rw\n",
    )
    .unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let mut fence = Fence::new(
        Arc::new(weilan_config::policy::parse(POLICY, "policy.toml").unwrap()),
        vec![],
        &root,
        Box::new(Kernelish {
            block: block.clone(),
            mountinfo: mountinfo.clone(),
            busy: busy.clone(),
        }),
        EventSink::new(tx, Arc::new(AtomicU64::new(0))),
    );
    fence.mountinfo = Some(mountinfo.clone());
    let device = Sysfs::new(&root).read_device(&usb_dir, false).unwrap();
    let mut next = || match rx.try_recv() {
        Ok(o) => match o.event {
            Event::UsbDecision(d) => Some(d),
            other => panic!("{other:?}"),
        },
        Err(_) => None,
    };
    fence
        .on_fact(FenceFact::Attached {
            dir: usb_dir.clone(),
            device,
            at_start: false,
            seen: None,
        })
        .await;
    // A writer holds a file open: the disk and partition are flagged, the remount is
    // refused, and the decision says the stick is still writable.
    let d = next().unwrap();
    assert_eq!(d.target, "read-only");
    assert!(!d.enforced);
    let error = d.error.unwrap();
    assert!(
        error.contains("EBUSY") && error.contains("/media/stick is still writable"),
        "{error}"
    );
    fence.verify_read_only().await;
    assert!(next().is_none(), "the same failure is not reported again");
    // The writer closes its file: the retry succeeds and says so.
    busy.store(false, std::sync::atomic::Ordering::SeqCst);
    fence.verify_read_only().await;
    let d = next().unwrap();
    assert_eq!(
        (d.trigger.as_str(), d.actions.clone(), d.error, d.enforced),
        (
            "verify",
            vec!["remount /media/stick read-only".to_string()],
            None,
            true
        )
    );
    // Root re-enables writes on the whole disk: flagged again at the next check.
    std::fs::write(block.join("ro"), "0\n").unwrap();
    fence.verify_read_only().await;
    let d = next().unwrap();
    assert_eq!(
        d.actions,
        vec!["BLKROSET sdr again (writes had been re-enabled)".to_string()]
    );
    assert_eq!(std::fs::read_to_string(block.join("ro")).unwrap(), "1\n");
    // And the partition and mount.
    std::fs::write(block.join("sdr1/ro"), "0\n").unwrap();
    let text = std::fs::read_to_string(&mountinfo).unwrap();
    std::fs::write(
        &mountinfo,
        text.replace("/media/stick ro,", "/media/stick rw,"),
    )
    .unwrap();
    fence.verify_read_only().await;
    let d = next().unwrap();
    assert_eq!(
        d.actions,
        vec![
            "BLKROSET sdr1 again (writes had been re-enabled)".to_string(),
            "remount /media/stick read-only again (it had been made writable)".to_string()
        ]
    );
    fence.verify_read_only().await;
    assert!(next().is_none(), "nothing to do while it holds");
}
