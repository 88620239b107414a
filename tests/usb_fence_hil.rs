//! The USB fence on a real kernel: the statically linked agent runs in a QEMU guest
//! (Debian kernel, real uevents, real usb-storage/sd/vfat, real `authorized`), devices
//! are hot-plugged through QMP or emulated inside the guest, and decisions travel over
//! mutual TLS to a collector on the host.
//!
//! Prepare once with `tests/hil/prepare.sh` (CI's `.ci/run` does); without the guest or
//! the static agent the test prints `SKIPPED:` and passes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

/// Copies the host's rsync with its shared libraries and loader into `dir` (the
/// guest runs it as `dir/ld-linux-x86-64.so.2 --library-path dir dir/rsync`).
fn stage_rsync(dir: &Path) -> bool {
    let Some(rsync) = which("rsync") else {
        return false;
    };
    let Ok(out) = Command::new("ldd").arg(&rsync).output() else {
        return false;
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(&rsync, dir.join("rsync")).unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let lib = line
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(lib) = lib {
            let name = Path::new(lib).file_name().unwrap();
            if std::fs::copy(lib, dir.join(name)).is_err() {
                return false;
            }
        }
    }
    dir.join("ld-linux-x86-64.so.2").exists()
}

/// Waits until the first partition of the stick with `serial` is mounted by the
/// guest's automounter; its mount point.
fn wait_mounted(hil: &Hil, serial: &str) -> String {
    wait_for(
        &format!("{serial} mounted"),
        T,
        || {
            let (_, m) = hil.gexec(&format!("for d in /sys/bus/usb/devices/*/serial; do grep -qx {serial} $d && ls -d $(dirname $d)/*/host*/target*/*/block/sd*/sd*1 2>/dev/null; done"));
            let part = m.lines().next()?.rsplit('/').next()?.to_string();
            let (_, mounts) = hil.gexec("cat /proc/mounts");
            mounts
                .contains(&format!("/media/{part} "))
                .then(|| format!("/media/{part}"))
        },
        || hil.agent_log(),
    )
}

/// `t1 - t0` from the last line of guest output "t0 t1" (seconds of /proc/uptime).
fn uptime_delta(text: &str) -> f64 {
    let last = text.trim().lines().last().unwrap_or_default();
    let mut it = last
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    match (it.next(), it.next()) {
        (Some(t0), Some(t1)) => t1 - t0,
        _ => f64::NAN,
    }
}

fn decisions(w: &World, serial: &str) -> Vec<serde_json::Value> {
    w.events(
        "usb.decision",
        "json_extract(envelope, '$.event.data.serial') = ?2",
        &[serial],
    )
}

fn wait_decision(w: &World, hil: &Hil, serial: &str) -> serde_json::Value {
    wait_for(
        &format!("usb.decision for {serial}"),
        T,
        || decisions(w, serial).into_iter().next(),
        || format!("--- agent (guest)\n{}", hil.agent_log()),
    )
}

const POLICY: &str = r#"
version = "hil-1"
[usb]
mode = "enforce"
default_target = "block"
present_at_start = "apply"

# The transfer stick of a host without network (deployment.md §7).
[[usb.known_devices]]
label = "hil transfer stick"
vid = "46f4"
pid = "0001"
serial = "GOOD-2"

# QEMU's usb-storage is 46f4:0001; a serial alone would be no identity.
[[usb.rules]]
id = "hil-allowed"
target = "allow"
serial = ["GOOD-1", "GOOD-2"]
vid_pid = ["46f4:0001"]

[[usb.rules]]
id = "hil-read-only"
target = "read-only"
serial = ["RO-1"]
vid_pid = ["46f4:0001"]

[[files.rules]]
id = "hil-classified-makes-ro"
detectors = ["mark:*", "prc-resident-id"]
exit = ["removable"]
action = "read-only-device"
"#;

/// `weilan-agent journal export` on a real kernel (deployment.md §7): a directory of
/// the guest's root file system is refused, the registered stick GOOD-2 (mounted at
/// `mnt`) takes the bundle.
fn journal_only_onto_the_registered_stick(hil: &Hil, mnt: &str) {
    let export = |dir: &str| {
        hil.gexec(&format!(
            "mkdir -p {dir} && /hil/files/weilan-agent journal --config /hil/files/agent.toml export --out {dir} 2>&1"
        ))
    };
    let (rc, text) = export("/root/not-a-stick");
    assert!(
        rc != 0 && text.contains("is not on a USB stick"),
        "export onto the root file system: rc {rc}: {text}"
    );
    let (rc, text) = export(mnt);
    assert!(
        rc == 0 && text.contains("onto the registered transfer stick `hil transfer stick` (allowed by rule `hil-allowed`; 46f4:0001 serial `GOOD-2`)"),
        "export onto {mnt}: rc {rc}: {text}"
    );
    println!(
        "scenario journal export: refused off a stick, written onto the registered stick: {}",
        text.lines().last().unwrap_or_default()
    );
}

#[test]
fn usb_fence_on_a_real_kernel() {
    let Some(hil) = Hil::prepared("real-kernel USB fence test") else {
        return;
    };
    let out = hil.out.clone();
    let w = World::new();
    std::fs::write(w.path("policy.toml"), POLICY).unwrap();
    let (collector, port, ccfg) = start_collector_for_guest(&w);

    // Files the guest agent needs, under /hil/files/.
    let stage = w.path("guest");
    std::fs::create_dir_all(&stage).unwrap();
    for (src, dst) in [
        (w.pki.ca(), "ca.pem"),
        (w.pki.agent(AGENT), "agent.pem"),
        (w.pki.agent_key(AGENT), "agent-key.pem"),
        (w.path("policy.toml"), "policy.toml"),
    ] {
        std::fs::copy(src, stage.join(dst)).unwrap();
    }
    std::fs::write(
        stage.join("agent.toml"),
        format!(
            "[agent]\nstate_dir = \"/root/state\"\npolicy = \"/hil/files/policy.toml\"\n\
             [collector]\nhost = \"10.0.2.2\"\nport = {port}\nca = \"/hil/files/ca.pem\"\nack_timeout_secs = 5\n\
             [tls]\ncert = \"/hil/files/agent.pem\"\nkey = \"/hil/files/agent-key.pem\"\n\
             [heartbeat]\ninterval_secs = 5\n[log]\nlevel = \"info\"\n"
        ),
    )
    .unwrap();
    let mut args: Vec<String> = vec!["--automount".into(), "--gadget".into()];
    for f in [
        "agent.toml",
        "policy.toml",
        "ca.pem",
        "agent.pem",
        "agent-key.pem",
    ] {
        args.push("--put".into());
        args.push(stage.join(f).display().to_string());
    }
    args.push("--put".into());
    args.push(static_agent().display().to_string());
    // The guest has busybox only: rsync goes in with its libraries and loader.
    let rsync = stage_rsync(&stage.join("rsync"));
    if rsync {
        args.push("--put".into());
        args.push(stage.join("rsync").display().to_string());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    hil.boot(&argv);
    // The agent runs as a background process (not the guest's job, whose end powers
    // the guest off), so the test can kill it and keep plugging.
    let (rc, text) = hil.gexec(
        "cd /root && (/hil/files/weilan-agent run --config /hil/files/agent.toml >/hil/out/agent.log 2>&1 &)",
    );
    assert_eq!(rc, 0, "agent start: {text}");
    wait_for(
        "agent.started from the guest",
        T,
        || (w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.started'") > 0).then_some(()),
        || {
            format!(
                "{}\n--- collector\n{}",
                hil.agent_log(),
                collector.log_text()
            )
        },
    );
    // Default-deny is on for every root hub (QEMU's xHCI/EHCI and the 4 dummy_hcd buses).
    let (_, defaults) =
        hil.gexec("cat /sys/bus/usb/devices/usb*/authorized_default | sort | uniq -c");
    assert!(
        defaults.trim().ends_with(" 0") && !defaults.contains(" 1\n"),
        "authorized_default: {defaults}"
    );
    println!("default-deny on every root hub: {}", defaults.trim());
    let stick = out.join("stick1.img").display().to_string();

    // 1. Unknown stick: blocked, no block device ever appears.
    let (rc, text) = hil.sh(
        "plug.sh",
        &[&stick, "UNKNOWN-1", "--copy", "--timeout", "6"],
    );
    assert_eq!(
        rc,
        3,
        "an unknown stick must not get a block device: {text}\n{}",
        hil.agent_log()
    );
    let d = wait_decision(&w, &hil, "UNKNOWN-1");
    assert_eq!(
        (
            d["target"].as_str(),
            d["rule_id"].as_str(),
            d["enforced"].as_bool()
        ),
        (Some("block"), Some("implicit default"), Some(true)),
        "{d}"
    );
    let (_, auth) =
        hil.gexec("cat $(dirname $(grep -l UNKNOWN-1 /sys/bus/usb/devices/*/serial))/authorized");
    assert_eq!(auth.trim(), "0");
    println!(
        "scenario unknown stick: blocked, no sdX (decision in {} µs)",
        d["latency_us"]
    );

    // 2. Allowed serial: mounts and accepts writes.
    let (rc, text) = hil.sh("plug.sh", &[&stick, "GOOD-1", "--copy", "--timeout", "20"]);
    assert_eq!(
        rc,
        0,
        "an allowed stick gets its block device: {text}\n{}",
        hil.agent_log()
    );
    let d = wait_decision(&w, &hil, "GOOD-1");
    assert_eq!(
        (d["target"].as_str(), d["rule_id"].as_str()),
        (Some("allow"), Some("hil-allowed")),
        "{d}"
    );
    let mnt = wait_mounted(&hil, "GOOD-1");
    let (rc, text) = hil.gexec(&format!(
        "echo weilan > {mnt}/allowed.txt && sync && cat {mnt}/allowed.txt"
    ));
    assert_eq!(
        (rc, text.trim()),
        (0, "weilan"),
        "writes to an allowed stick work"
    );
    println!("scenario allowed serial: mounted at {mnt}, write ok");

    // 2b. Files crossing onto the real vfat stick: one file.exported per file, with
    // the guest's hash, the writer and the stick's identity.
    wait_for(
        "the stick's mount watched as an exit point",
        T,
        || {
            hil.agent_log()
                .lines()
                .any(|l| l.contains("watching exit point") && l.contains(&mnt))
                .then_some(())
        },
        || hil.agent_log(),
    );
    let rsync_cmd = if rsync {
        format!(
            " && /hil/files/rsync/ld-linux-x86-64.so.2 --library-path /hil/files/rsync /hil/files/rsync/rsync /hil/files/agent.pem {mnt}/rsynced.pem"
        )
    } else {
        require("rsync onto vfat in the guest needs the host's rsync", false);
        String::new()
    };
    let listed = if rsync {
        format!(" {mnt}/rsynced.pem")
    } else {
        String::new()
    };
    let (rc, text) = hil.gexec(&format!(
        "cp /hil/files/policy.toml {mnt}/cp.txt && dd if=/hil/files/ca.pem of={mnt}/dd.pem bs=64 2>/dev/null{rsync_cmd} && sync && sha256sum {mnt}/cp.txt {mnt}/dd.pem{listed}"
    ));
    assert_eq!(rc, 0, "cp and dd onto the stick: {text}");
    for line in text.lines().filter(|l| l.contains(&mnt)) {
        let (sha, path) = line.split_once(char::is_whitespace).unwrap();
        let path = path.trim();
        let found = wait_for(
            &format!("file.exported for {path}"),
            T,
            || {
                let e = w.events(
                    "file.exported",
                    "json_extract(envelope, '$.event.data.path') = ?2",
                    &[path],
                );
                (!e.is_empty()).then_some(e)
            },
            || hil.agent_log(),
        );
        std::thread::sleep(Duration::from_secs(1));
        let all = w.events(
            "file.exported",
            "json_extract(envelope, '$.event.data.path') = ?2",
            &[path],
        );
        assert_eq!(all.len(), 1, "exactly one event for {path}: {all:?}");
        let e = &found[0];
        assert_eq!(
            (
                e["sha256"].as_str(),
                e["fs_type"].as_str(),
                e["usb_serial"].as_str(),
                e["exit"].as_str(),
                e["attribution"].as_str(),
                e["user"].as_str(),
            ),
            (
                Some(sha),
                Some("vfat"),
                Some("GOOD-1"),
                Some("removable"),
                Some("fanotify"),
                Some("root")
            ),
            "{e}"
        );
        if path.ends_with("rsynced.pem") {
            // rsync ran through its loader: that is the executable /proc shows.
            assert!(
                e["cmdline"]
                    .as_str()
                    .is_some_and(|c| c.contains("/hil/files/rsync/rsync")),
                "writer of {path}: {e}"
            );
            continue;
        }
        // The guest's cp and dd are busybox applets that its shell forks without an
        // exec: /proc shows busybox as the executable and the shell's command line.
        assert!(
            e["exe"].as_str() == Some("/bin/busybox")
                && e["pid"].as_u64().is_some_and(|p| p > 1)
                && e["cmdline"].as_str().is_some_and(|c| !c.is_empty()),
            "writer of {path}: {e}"
        );
    }
    println!(
        "scenario files on vfat: cp, dd{} → one file.exported each, guest SHA-256, writer and stick identity right",
        if rsync { ", rsync" } else { "" }
    );

    // 2c. A classified file written to it: the file rule switches the stick read-only —
    //     while another process holds a file on it open for writing, so the remount
    //     is refused (EBUSY) until that file is closed.
    let (rc, text) = hil.gexec(&format!(
        "touch /tmp/hold; (exec 3>>{mnt}/hold.log; while [ -e /tmp/hold ]; do echo tick >&3; usleep 200000; done) </dev/null >/dev/null 2>&1 &"
    ));
    assert_eq!(rc, 0, "background writer: {text}");
    let (rc, text) = hil.gexec(&format!(
        "echo '机密 员工 11010519491231002X' > {mnt}/memo.txt && sync"
    ));
    assert_eq!(rc, 0, "{text}");
    let ro = wait_for(
        "usb.decision from the file rule",
        T,
        || {
            decisions(&w, "GOOD-1")
                .into_iter()
                .find(|d| d["rule_id"] == "files:hil-classified-makes-ro")
        },
        || hil.agent_log(),
    );
    assert_eq!(ro["target"].as_str(), Some("read-only"), "{ro}");
    let busy = ro["error"].as_str().unwrap_or_default().to_string();
    assert!(
        busy.contains(&format!("{mnt} is still writable")),
        "the decision says plainly that the busy stick is still writable: {ro}"
    );
    let (_, mounts) = hil.gexec("cat /proc/mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&format!(" {mnt} ")) && l.contains(" rw,")),
        "still mounted read-write while the file is open: {mounts}"
    );
    // The writer closes its file: the agent's retry (every 250 ms) remounts read-only.
    let (rc, text) = hil.gexec(&format!(
        "t0=$(cut -d' ' -f1 /proc/uptime); rm /tmp/hold; i=0; \
         while [ $i -lt 200 ]; do grep -q ' {mnt} vfat ro,' /proc/mounts && break; usleep 20000; i=$((i+1)); done; \
         t1=$(cut -d' ' -f1 /proc/uptime); grep ' {mnt} ' /proc/mounts; echo \"$t0 $t1\""
    ));
    assert_eq!(rc, 0, "{text}");
    let waited = uptime_delta(&text);
    assert!(
        text.contains(" ro,"),
        "read-only once the file was closed: {text}\n{}",
        hil.agent_log()
    );
    let retried = wait_for(
        "the retry's decision",
        T,
        || {
            decisions(&w, "GOOD-1")
                .into_iter()
                .find(|d| d["trigger"] == "verify" && d["error"].is_null())
        },
        || hil.agent_log(),
    );
    println!(
        "MEASURED busy stick: {busy}; read-only {waited:.2} s after the writer closed its file ({})",
        retried["actions"]
    );
    let enforced = w.events("file.enforced", "1", &[]);
    assert!(
        enforced
            .iter()
            .any(|e| e["rule_id"] == "hil-classified-makes-ro"
                && e["outcome"] == "requested"
                && e["path"].as_str() == Some(&format!("{mnt}/memo.txt"))),
        "{enforced:?}"
    );
    let (rc, text) = hil.gexec(&format!("echo more > {mnt}/after.txt"));
    assert_ne!(rc, 0, "the stick is read-only now: {text}");
    assert!(
        text.to_lowercase().contains("read-only"),
        "EROFS expected: {text}"
    );
    println!(
        "scenario classified file → read-only-device: {} ; next write refused ({})",
        ro["actions"],
        text.trim()
    );

    // 3. Read-only rule: mounts, reads work, writes fail.
    let (rc, text) = hil.sh("plug.sh", &[&stick, "RO-1", "--copy", "--timeout", "20"]);
    assert_eq!(
        rc,
        0,
        "a read-only stick still gets its block device: {text}\n{}",
        hil.agent_log()
    );
    let ro_mnt = wait_mounted(&hil, "RO-1");
    // The fence flags the block devices as they appear and remounts a mount that raced it.
    wait_for(
        "RO-1 mount read-only",
        T,
        || {
            let (_, mounts) = hil.gexec("cat /proc/mounts");
            mounts
                .lines()
                .any(|l| {
                    l.contains(&format!(" {ro_mnt} "))
                        && l.split_whitespace()
                            .nth(3)
                            .is_some_and(|o| o.split(',').any(|x| x == "ro"))
                })
                .then_some(())
        },
        || format!("{}\n{}", hil.agent_log(), hil.gexec("cat /proc/mounts").1),
    );
    let (rc, _) = hil.gexec(&format!("ls {ro_mnt} >/dev/null"));
    assert_eq!(rc, 0, "reads work on a read-only stick");
    // 3a. Root undoes the lock — disk, partition and mount — and the agent locks it
    //     again at its next check; a raw write to the whole disk is refused afterwards.
    let part = ro_mnt.rsplit('/').next().unwrap().to_string();
    let disk = part
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string();
    let (rc, text) = hil.gexec(&format!(
        "blockdev --setrw /dev/{disk} && blockdev --setrw /dev/{part} && mount -o remount,rw {ro_mnt} && \
         t0=$(cut -d' ' -f1 /proc/uptime); echo undone $(cat /sys/block/{disk}/ro /sys/block/{disk}/{part}/ro); i=0; \
         while [ $i -lt 200 ]; do \
           [ \"$(cat /sys/block/{disk}/ro)$(cat /sys/block/{disk}/{part}/ro)\" = 11 ] && grep -q ' {ro_mnt} vfat ro,' /proc/mounts && break; \
           usleep 20000; i=$((i+1)); done; \
         t1=$(cut -d' ' -f1 /proc/uptime); echo locked $(cat /sys/block/{disk}/ro /sys/block/{disk}/{part}/ro); echo \"$t0 $t1\""
    ));
    assert_eq!(rc, 0, "root re-enabled writes: {text}");
    // (The agent may already have re-locked some of it by the time this is read.)
    assert!(
        text.contains("locked 1 1"),
        "disk and partition locked again: {text}\n{}",
        hil.agent_log()
    );
    let relocked = uptime_delta(&text);
    let (rc, dd) = hil.gexec(&format!(
        "dd if=/dev/zero of=/dev/{disk} bs=512 count=1 seek=64 conv=fsync 2>&1"
    ));
    assert_ne!(rc, 0, "a raw write to the whole disk must fail: {dd}");
    let undone = wait_for(
        "read-only-undone alert",
        T,
        || {
            w.alert_lines()
                .into_iter()
                .find(|a| a["rule_id"] == "builtin.usb.read-only-undone")
        },
        || hil.agent_log(),
    );
    println!(
        "MEASURED root undid read-only on {disk}, {part} and {ro_mnt}: locked again {relocked:.2} s later; raw dd refused ({}); alert: {}",
        dd.trim().lines().last().unwrap_or(""),
        undone["summary"]
    );
    let (rc, text) = hil.gexec(&format!("echo leak > {ro_mnt}/leak.txt"));
    assert_ne!(rc, 0, "a write to a read-only stick must fail: {text}");
    assert!(
        text.to_lowercase().contains("read-only"),
        "EROFS expected: {text}"
    );
    let (_, ro) = hil.gexec("for d in /sys/bus/usb/devices/*/serial; do grep -qx RO-1 $d && cat $(dirname $d)/*/host*/target*/*/block/sd*/ro; done");
    assert!(ro.trim().starts_with('1'), "BLKROSET on the disk: {ro}");
    let ro_decisions = decisions(&w, "RO-1");
    assert!(
        ro_decisions
            .iter()
            .any(|d| d["actions"].as_array().is_some_and(|a| a
                .iter()
                .any(|x| x.as_str().is_some_and(|s| s.starts_with("BLKROSET"))))),
        "{ro_decisions:?}"
    );
    println!(
        "scenario read-only: mounted {ro_mnt} read-only, read ok, write refused ({})",
        text.trim()
    );

    // 3b. A signed block command from the collector (host) blocks the read-only stick
    //     in the guest: deauthorized, its block device gone.
    let ro_hash = ro_decisions[0]["hash"].as_str().unwrap().to_string();
    collector_command(
        Command::new(weilan_bin()),
        &ccfg,
        AGENT,
        &["block-device", "--hash", &ro_hash],
    );
    let blocked = wait_for(
        "RO-1 blocked by command",
        T,
        || {
            decisions(&w, "RO-1")
                .into_iter()
                .find(|d| d["trigger"] == "command")
        },
        || hil.agent_log(),
    );
    assert_eq!(
        (blocked["target"].as_str(), blocked["error"].as_str()),
        (Some("block"), None),
        "{blocked}"
    );
    let (_, auth) = hil.gexec("for d in /sys/bus/usb/devices/*/serial; do grep -qx RO-1 $d && cat $(dirname $d)/authorized; done");
    assert_eq!(auth.trim(), "0", "RO-1 deauthorized in the guest");
    let (_, disks) = hil.gexec("for d in /sys/bus/usb/devices/*/serial; do grep -qx RO-1 $d && ls -d $(dirname $d)/*/host*/target*/*/block/* 2>/dev/null; done; true");
    assert!(disks.trim().is_empty(), "RO-1's disk is gone: {disks}");
    println!(
        "scenario block command: {} from the host collector, RO-1 deauthorized in the guest ({})",
        blocked["rule_id"], blocked["actions"]
    );

    // 3c. A file still open for writing when its stick is pulled: reported anyway,
    //     through the descriptor the agent kept from its first write. (RO-1 is
    //     unplugged first: the emulated root hub's ports are all taken, and QEMU
    //     would put the stick behind a hub the fence blocks.)
    let (rc, text) = hil.sh("unplug.sh", &["RO-1"]);
    assert_eq!(rc, 0, "RO-1 unplugged: {text}");
    // The new stick usually mounts where RO-1 was (/media/sdb1): only a "watching"
    // line that comes after the plug says its file system is marked.
    let watching = |mnt: &str| {
        hil.agent_log()
            .lines()
            .filter(|l| l.contains("watching exit point") && l.contains(&format!("{mnt} ")))
            .count()
    };
    let marks_before: std::collections::HashMap<String, usize> =
        ["/media/sda1", "/media/sdb1", "/media/sdc1"]
            .iter()
            .map(|m| (m.to_string(), watching(m)))
            .collect();
    let (rc, text) = hil.sh("plug.sh", &[&stick, "GOOD-2", "--copy", "--timeout", "20"]);
    assert_eq!(rc, 0, "allowed stick plugged again: {text}");
    let held_mnt = wait_mounted(&hil, "GOOD-2");
    let before = marks_before.get(&held_mnt).copied().unwrap_or(0);
    wait_for(
        "the files source watching the new stick",
        T,
        || (watching(&held_mnt) > before).then_some(()),
        || hil.agent_log(),
    );
    journal_only_onto_the_registered_stick(&hil, &held_mnt);
    let (rc, text) = hil.gexec(&format!(
        "(exec 3>{held_mnt}/held.txt; echo '机密 员工 11010519491231002X' >&3; sleep 600) </dev/null >/dev/null 2>&1 & sleep 1; echo started"
    ));
    assert_eq!(rc, 0, "writer holding held.txt open: {text}");
    let (rc, text) = hil.sh("unplug.sh", &["GOOD-2"]);
    assert_eq!(rc, 0, "pulled with the file open: {text}");
    let held = wait_for(
        "file.exported for the file open at unplug",
        T,
        || {
            w.events(
                "file.exported",
                "json_extract(envelope, '$.event.data.path') = ?2",
                &[&format!("{held_mnt}/held.txt")],
            )
            .into_iter()
            .next()
        },
        || hil.agent_log(),
    );
    assert_eq!(held["unclosed"], true, "{held}");
    println!(
        "MEASURED stick pulled with {held_mnt}/held.txt open: reported unclosed, {} bytes, sha256 {}, classification {}, note {}",
        held["size"], held["sha256"], held["classification"], held["classification_note"]
    );
    let _ = hil.gexec("pkill -f 'sleep 600'; true");

    // 4. Storage + keyboard composite (BadUSB) emulated in the guest: rejected, even with an allowed serial.
    let (rc, text) = hil.sh(
        "gplug.sh",
        &[
            &stick, "GOOD-1", "--hid", "--name", "badusb", "--vid", "0x0781", "--pid", "0x5567",
            "--copy", "--nowait",
        ],
    );
    assert_eq!(rc, 0, "gadget bound: {text}");
    let bad = wait_for(
        "BadUSB decision",
        T,
        || {
            decisions(&w, "GOOD-1")
                .into_iter()
                .find(|d| d["rule_id"] == "builtin.badusb")
        },
        || hil.agent_log(),
    );
    assert_eq!(bad["target"], "reject");
    std::thread::sleep(Duration::from_secs(3));
    let (_, blocks) = hil.gexec("ls -d /sys/devices/platform/dummy_hcd.*/usb*/*/*/host*/target*/*/block/* 2>/dev/null; true");
    assert!(
        blocks.trim().is_empty(),
        "the composite must not get a block device: {blocks}"
    );
    println!(
        "scenario BadUSB composite: rejected by builtin.badusb ({})",
        bad["actions"]
    );

    // 5. Agent killed (fail closed): an allowed stick plugged afterwards stays unauthorized.
    let (_, _) = hil.sh("unplug.sh", &["GOOD-1"]);
    let (rc, text) = hil.gexec("killall -9 weilan-agent; sleep 1; pidof weilan-agent >/dev/null && echo alive || echo dead");
    assert_eq!((rc, text.trim()), (0, "dead"), "agent killed");
    let t = Instant::now();
    let (rc, text) = hil.sh(
        "plug.sh",
        &[
            &stick,
            "GOOD-1",
            "--id",
            "again",
            "--copy",
            "--timeout",
            "6",
        ],
    );
    assert_eq!(
        rc, 3,
        "with the agent dead a new stick must stay unauthorized: {text}"
    );
    let (_, auth) = hil.gexec("for d in /sys/bus/usb/devices/*/serial; do grep -qx GOOD-1 $d && cat $(dirname $d)/authorized; done");
    assert_eq!(
        auth.trim(),
        "0",
        "still unauthorized {} s later",
        t.elapsed().as_secs()
    );
    println!("scenario agent killed: a newly plugged allowed stick stays unauthorized");

    // Decision latency (uevent at the agent → last enforcement write returned).
    let mut lat: Vec<u64> = ["UNKNOWN-1", "GOOD-1", "RO-1"]
        .iter()
        .flat_map(|s| decisions(&w, s))
        .filter(|d| d["trigger"] == "attach")
        .filter_map(|d| d["latency_us"].as_u64())
        .collect();
    lat.sort();
    println!("guest decision latency (µs, uevent received → authorization written, TCG-emulated CPU): {lat:?}");
    drop(collector);
}
