//! The shipped units and packages under a real systemd (PID 1, systemd 252 in a Debian
//! 12 QEMU guest: `tests/systemd-guest/`). The guest follows docs/deployment.md's command blocks
//! verbatim with the real `systemctl`, then `tests/systemd-guest/job.sh` shows what the
//! units promise; this test checks its figures.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::hosts::doc_step;
use common::*;

const GUEST_STEPS: &[&str] = &[
    "collector-install",
    "collector-pki",
    "collector-start",
    "collector-enroll-token",
    "workstation-install",
];

/// The figure after `prefix` on the MEASURED line that contains it.
fn figure(out: &str, prefix: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("MEASURED") && l.contains(prefix))
        .unwrap_or_else(|| panic!("no MEASURED line with `{prefix}`:\n{out}"));
    let rest = &line[line.find(prefix).unwrap() + prefix.len()..];
    rest.trim()
        .split(|c: char| c.is_whitespace())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{prefix}` in {line}"))
}

fn measured<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line:\n{text}"))
}

/// (before, after) of "NRestarts A -> B" in a MEASURED line.
fn restarts(line: &str) -> (u64, u64) {
    let rest = &line[line.find("NRestarts ").expect("NRestarts") + "NRestarts ".len()..];
    let mut it = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|n| n.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// Boots the guest in `guest` with `tests/systemd-guest/JOB` and the `puts` in
/// /share/files; prints its MEASURED lines, asserts it finished, returns its output.
fn run_guest(guest: &str, job: &str, puts: &[&Path], timeout_secs: u32) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/systemd-guest");
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("run.sh")).arg(root.join(job));
    for p in puts {
        cmd.arg("--put").arg(p);
    }
    let out = cmd
        .args(["--timeout", &timeout_secs.to_string(), "--mem", "3072"])
        .env("SDG_OUT", guest)
        .output()
        .expect("run.sh");
    let text = format!(
        "{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for l in text.lines().filter(|l| l.starts_with("MEASURED")) {
        println!("{l}");
    }
    assert!(out.status.success() && text.contains("JOB DONE"), "{text}");
    text
}

#[test]
fn units_run_hardened_under_real_systemd() {
    let guest = std::env::var("SDG_OUT").unwrap_or_else(|_| "/tmp/weilan-systemd-guest".into());
    if !require("systemd guest test needs root", is_root())
        || !require(
            "systemd guest test needs qemu-system-x86_64 (tests/systemd-guest/build.sh installs it)",
            have("qemu-system-x86_64"),
        )
        || !require(
            &format!("systemd guest not built in {guest} (run tests/systemd-guest/build.sh)"),
            Path::new(&guest).join("root.cpio.gz").exists(),
        )
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The release directory, with real files (the guest sees the share, not this host).
    let release = dir.path().join("release");
    std::fs::create_dir_all(release.join("config/mosquitto")).unwrap();
    // Without debug sections, as the packages carry it: the debug build is ~370 MB,
    // and the guest installs it twice into a root held in its memory (it ran out of
    // space once the PostgreSQL client was linked in).
    let strip = Command::new("strip")
        .arg("-o")
        .arg(release.join("weilan-collector"))
        .arg(weilan_bin())
        .status();
    if !strip.is_ok_and(|s| s.success()) {
        std::fs::copy(weilan_bin(), release.join("weilan-collector")).unwrap();
    }
    std::fs::hard_link(
        release.join("weilan-collector"),
        release.join("weilan-agent"),
    )
    .unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for f in [
        "agent.toml",
        "collector.toml",
        "policy.toml",
        "weilan-agent.service",
        "weilan-collector.service",
        "weilan-collector.sysusers",
        "weilan-collector.tmpfiles",
        "mosquitto/weilan.conf",
        "mosquitto/weilan.acl",
    ] {
        std::fs::copy(config.join(f), release.join("config").join(f)).unwrap();
    }
    // Archives for the classification step (job.sh): a secret in a 7z, and a 7z whose
    // header claims 1 TiB.
    {
        use weilan_agent::classify::samples;
        let samples_dir = release.join("samples");
        std::fs::create_dir_all(&samples_dir).unwrap();
        let docx = samples::docx(&[&["机密★1年"], &["预算调整通知"]]);
        let secret = samples::seven_zip(&[("通知.docx", &docx)], true);
        std::fs::write(samples_dir.join("secret.7z"), secret).unwrap();
        let bomb = samples::seven_zip_header_bomb();
        std::fs::write(samples_dir.join("header-bomb.7z"), bomb).unwrap();
    }
    let steps = dir.path().join("steps");
    std::fs::create_dir_all(&steps).unwrap();
    for s in GUEST_STEPS {
        std::fs::write(steps.join(format!("{s}.sh")), doc_step(s)).unwrap();
    }
    let text = run_guest(&guest, "job.sh", &[&release, &steps], 900);

    // systemd-analyze security, from the running units.
    let agent = figure(&text, "weilan-agent.service:");
    let collector = figure(&text, "weilan-collector.service:");
    assert!(agent <= 5.0, "agent exposure {agent}\n{text}");
    assert!(collector <= 3.0, "collector exposure {collector}\n{text}");
    assert!(
        text.contains("MEASURED collector runs as: weilan"),
        "{text}"
    );
    // The watchdog killed the hung agent (systemd logged a watchdog timeout) and
    // systemd restarted it.
    let watchdog = measured(&text, "MEASURED watchdog");
    let (before, after) = restarts(watchdog);
    assert!(after > before, "{watchdog}");
    assert!(!watchdog.contains(" 0 watchdog timeout"), "{watchdog}");
    // 20 crash-restarts within the default start limit's window, still active.
    let crash = measured(&text, "MEASURED crash-restarts");
    let (before, after) = restarts(crash);
    assert!(after - before >= 20, "{crash}");
    assert!(crash.ends_with("now active"), "{crash}");
    assert!(
        text.contains("MEASURED clean stop: agent.stopping stored"),
        "{text}"
    );
    // 7z under the hardened unit: read by the child, the lying one refused with the
    // child's last words, the agent itself untouched.
    let secret = measured(&text, "MEASURED 7z secret.7z:");
    assert!(secret.contains("mark:secret"), "{secret}");
    let bomb = measured(&text, "MEASURED 7z header-bomb.7z:");
    assert!(
        bomb.contains("unreadable")
            && bomb.contains("memory allocation of 1099511627776 bytes failed"),
        "{bomb}"
    );
    let agent_after = measured(&text, "MEASURED 7z agent:");
    assert!(agent_after.contains("same pid yes"), "{agent_after}");
    let warnings = figure(
        &text,
        "MEASURED 7z confinement warnings in the agent's journal:",
    );
    assert_eq!(warnings, 0.0, "{text}");
    let confinement = measured(&text, "MEASURED 7z confinement on this kernel:");
    assert!(
        confinement.contains("capabilities: none; landlock ABI v")
            && confinement.contains("files closed")
            && !confinement.contains("allowed"),
        "{confinement}"
    );
    // The upload from another namespace was measured in full.
    assert!(figure(&text, "upload:") >= 3_145_728.0, "{text}");
}

/// The Debian packages (`packaging/deb/build.sh`) on a clean Debian 12 root under a
/// real systemd: install, both services active; an upgrade to a newer build while the
/// agent holds over 1 000 undelivered events delivers every one once; purge leaves
/// neither units nor journal nor database. (In this binary so that it boots its guest
/// while the other test's guest runs.)
#[test]
fn packages_install_upgrade_and_purge_under_real_systemd() {
    let guest = std::env::var("SDG_OUT").unwrap_or_else(|_| "/tmp/weilan-systemd-guest".into());
    if !require("package test needs root", is_root())
        || !require(
            "package test needs qemu-system-x86_64 (tests/systemd-guest/build.sh installs it)",
            have("qemu-system-x86_64"),
        )
        || !require("package test needs dpkg-deb", have("dpkg-deb"))
        || !require(
            &format!("systemd guest not built in {guest} (run tests/systemd-guest/build.sh)"),
            Path::new(&guest).join("root.cpio.gz").exists(),
        )
    {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    // The programs as packages carry them: this build, without debug sections; the
    // agent package gets the agent-only program the workspace build puts beside it.
    let agent_only = PathBuf::from(env!("CARGO_BIN_EXE_weilan-agent"));
    let stripped = |from: &std::path::Path, name: &str| {
        let to = dir.path().join(name);
        let strip = Command::new("strip").arg("-o").arg(&to).arg(from).status();
        if !strip.is_ok_and(|s| s.success()) {
            std::fs::copy(from, &to).unwrap();
        }
        to
    };
    let program = stripped(&weilan_bin(), "weilan");
    let agent_program = stripped(&agent_only, "weilan-agent");
    let debs = dir.path().join("debs");
    for (version, sub) in [("0.1.0-1", "v1"), ("0.1.0-2", "v2")] {
        let out = Command::new("bash")
            .arg(repo.join("packaging/deb/build.sh"))
            .arg(&program)
            .arg(version)
            .arg(debs.join(sub))
            .arg(&agent_program)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "build.sh {version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = run_guest(&guest, "packages.sh", &[&debs], 600);
    assert!(
        text.contains("weilan-agent 0.1.0-1 installed; weilan-collector 0.1.0-1 installed"),
        "{text}"
    );
    // At least 1 000 events waited in the agent's journal; every one was stored once.
    let before = text
        .lines()
        .find(|l| l.starts_with("MEASURED before the upgrade: "))
        .unwrap_or_else(|| panic!("{text}"));
    let waiting: u64 = before["MEASURED before the upgrade: ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{before}"));
    assert!(waiting >= 1000, "{before}");
    assert!(
        text.contains(&format!(
            "{waiting} stored, {waiting} distinct of {waiting} waiting"
        )),
        "{text}"
    );
    assert!(
        text.contains("weilan-agent 0.1.0-2; weilan-collector 0.1.0-2; edited agent.toml kept: 1"),
        "{text}"
    );
    assert!(text.contains("MEASURED after purge: left []"), "{text}");
}
