//! Files that cross the fence, on real file systems: tmpfs and ext4 on a loop device
//! are mounted by the test and watched as exit points with fanotify; `cp`, `dd` and
//! `rsync` write onto them; each file must give exactly one `file.exported` with the
//! right hash, writer and user. Then the file rules act for real: a classified copy
//! is refused while it happens (`deny`, permission events), a classified file that
//! landed is moved into the evidence store (`quarantine`), and the same storm of
//! writes is followed with the inotify backend (writer unknown).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weilan_agent::source::files::inotify::InotifyBackend;
use weilan_agent::source::files::linux::FanotifyBackend;
use weilan_agent::source::files::{FileBackend, FilesConfig, FilesSource};
use weilan_agent::source::{EventSink, Observed, Source, SourceContext};
use weilan_config::event::{Event, FileEnforced, FileExported, FileSourceRead};

struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn sha256(path: &Path) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &std::fs::read(path).unwrap(),
    ))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Watches `mount` under `policy` (the `[files]` part of a policy.toml) with
/// `backend` and returns every event seen while `work` runs.
fn watch_with(
    mount: &Path,
    policy: &str,
    backend: Box<dyn FileBackend>,
    work: impl FnOnce(),
) -> Vec<Event> {
    watch_pushing(mount, policy, backend, Duration::from_millis(100), |_| {
        work()
    })
}

/// Like [`watch_with`], polling the mount table every `mount_poll`; `work` may push
/// new policies through the sender it gets.
fn watch_pushing(
    mount: &Path,
    policy: &str,
    backend: Box<dyn FileBackend>,
    mount_poll: Duration,
    work: impl FnOnce(&tokio::sync::watch::Sender<Arc<weilan_config::policy::Policy>>),
) -> Vec<Event> {
    // One watch at a time: the tests wait fixed times for the workers, and one test's
    // 2 GiB hash must not starve another's. (Within this process; nextest runs each
    // test in a process of its own and keeps them apart with its `flat-out` group.)
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, mut rx) = mpsc::channel::<Observed>(1024);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext {
        sink: EventSink::new(tx, Arc::new(AtomicU64::new(0))),
        shutdown: shutdown.clone(),
    };
    let config = FilesConfig {
        sysfs_root: "/sys".into(),
        mountinfo: "/proc/self/mountinfo".into(),
        mount_poll,
        watch_mounts: vec![mount.to_path_buf()],
        hash_max_bytes: 4 << 30,
        limits: Default::default(),
        workers: 2,
        settle: Duration::from_millis(500),
    };
    let policy = weilan_config::policy::parse(&format!("version = \"t\"\n{policy}"), "policy.toml")
        .expect("test policy");
    let (policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(policy));
    let guard = weilan_agent::guard::files::FilesGuard::new(Box::new(
        weilan_agent::guard::files::linux::LinuxFileEnforcer { fence: None },
    ));
    let mut source = FilesSource::new(config, backend, policy_rx, std::sync::Arc::new(guard));
    let task = rt.spawn(async move { source.run(&ctx).await.map_err(|e| e.to_string()) });
    // Events are taken as they come: a storm must not fill the channel and stall.
    let collected = CancellationToken::new();
    let done = collected.clone();
    let collector = rt.spawn(async move {
        let mut out = Vec::new();
        loop {
            tokio::select! {
                o = rx.recv() => match o {
                    Some(o) => out.push(o.event),
                    None => break,
                },
                _ = done.cancelled() => {
                    while let Ok(o) = rx.try_recv() {
                        out.push(o.event);
                    }
                    break;
                }
            }
        }
        out
    });
    std::thread::sleep(Duration::from_millis(500).max(mount_poll * 2)); // the marks are in place
    work(&policy_tx);
    std::thread::sleep(Duration::from_millis(1500)); // hashing workers finish
    shutdown.cancel();
    let _ = rt.block_on(task);
    collected.cancel();
    rt.block_on(collector).expect("event collector")
}

fn fanotify() -> Box<dyn FileBackend> {
    Box::new(FanotifyBackend::new().expect("fanotify"))
}

/// Watches `mount` with fanotify and the default policy; the `file.exported` events.
fn watch(mount: &Path, work: impl FnOnce()) -> Vec<FileExported> {
    exported(&watch_with(mount, "", fanotify(), work))
}

fn exported(events: &[Event]) -> Vec<FileExported> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::FileExported(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn enforced(events: &[Event]) -> Vec<FileEnforced> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::FileEnforced(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn check(fs: &str, mount: &Path, src: &Path) {
    let id = "11010519491231002X";
    std::fs::write(src.join("report.txt"), format!("★机密★ 员工 {id}\n")).unwrap();
    std::fs::write(src.join("big.bin"), vec![7u8; 3 * 1024 * 1024]).unwrap();
    let have_rsync = which("rsync").is_some();
    let events = watch(mount, || {
        run(Command::new("cp")
            .arg(src.join("report.txt"))
            .arg(mount.join("report.txt")));
        run(Command::new("dd")
            .arg(format!("if={}", src.join("big.bin").display()))
            .arg(format!("of={}", mount.join("dd.bin").display()))
            .args(["bs=64k", "status=none"]));
        if have_rsync {
            run(Command::new("rsync")
                .arg(src.join("report.txt"))
                .arg(mount.join("rsynced.txt")));
        }
        // A writer in its own mount namespace (as in a container or a sandboxed
        // service) writes through its own copy of the mount: still seen.
        run(Command::new("unshare")
            .args(["-m", "cp"])
            .arg(src.join("report.txt"))
            .arg(mount.join("from-other-ns.txt")));
    });
    let mut by_name: HashMap<String, Vec<&FileExported>> = HashMap::new();
    for e in &events {
        by_name
            .entry(
                Path::new(&e.path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            )
            .or_default()
            .push(e);
    }
    let one = |name: &str| -> &FileExported {
        let v = by_name
            .get(name)
            .unwrap_or_else(|| panic!("{fs}: no event for {name}: {events:#?}"));
        assert_eq!(v.len(), 1, "{fs}: exactly one event for {name}: {v:#?}");
        v[0]
    };
    let cp = one("report.txt");
    assert_eq!(
        cp.sha256.as_deref(),
        Some(sha256(&mount.join("report.txt")).as_str())
    );
    assert!(
        cp.exe.as_deref().is_some_and(|e| e.ends_with("/cp")),
        "{cp:?}"
    );
    assert_eq!(
        (cp.uid, cp.user.as_deref(), cp.attribution.as_str()),
        (Some(0), Some("root"), "fanotify")
    );
    assert_eq!(cp.fs_type, fs);
    assert!(
        cp.classification
            .iter()
            .any(|c| c.detector == "prc-resident-id" && c.count == 1 && !c.samples[0].contains(id)),
        "{cp:?}"
    );
    assert!(
        cp.classification
            .iter()
            .any(|c| c.detector == "mark:secret"),
        "{cp:?}"
    );
    let ns = one("from-other-ns.txt");
    assert!(
        ns.exe.as_deref().is_some_and(|e| e.ends_with("/cp"))
            && ns.sha256 == cp.sha256
            && ns.path == mount.join("from-other-ns.txt").to_str().unwrap(),
        "{ns:?}"
    );
    let dd = one("dd.bin");
    assert_eq!(
        (dd.size, dd.hashed_bytes),
        (3 * 1024 * 1024, 3 * 1024 * 1024)
    );
    assert_eq!(
        dd.sha256.as_deref(),
        Some(sha256(&mount.join("dd.bin")).as_str())
    );
    assert!(
        dd.exe.as_deref().is_some_and(|e| e.ends_with("/dd")),
        "{dd:?}"
    );
    if have_rsync {
        // rsync writes a temporary name and renames it: the file written is the temporary.
        let r: Vec<&FileExported> = events
            .iter()
            .filter(|e| e.exe.as_deref().is_some_and(|x| x.ends_with("/rsync")))
            .collect();
        assert_eq!(
            r.len(),
            1,
            "{fs}: one event for the rsync copy: {events:#?}"
        );
        // Hashed through the written descriptor, reported under the final name.
        assert_eq!(
            (r[0].path.as_str(), r[0].sha256.as_deref()),
            (
                mount.join("rsynced.txt").to_str().unwrap(),
                Some(sha256(&mount.join("rsynced.txt")).as_str())
            ),
            "{:?}",
            r[0]
        );
        assert_eq!((r[0].uid, r[0].user.as_deref()), (Some(0), Some("root")));
    } else {
        require("rsync case needs the `rsync` binary", false);
    }
    println!(
        "{fs}: cp, dd{}, cp from another mount namespace → one file.exported each, hashes, writers and user right",
        if have_rsync { ", rsync" } else { "" }
    );
}

#[test]
fn files_written_onto_tmpfs_and_ext4_are_reported_once_each() {
    if !require("files test needs root (mount, fanotify)", is_root()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();

    let tmpfs = dir.path().join("tmpfs");
    std::fs::create_dir_all(&tmpfs).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "weilan-test"])
        .arg(&tmpfs));
    let _t = Mounted(tmpfs.clone());
    check("tmpfs", &tmpfs, &src);

    if which("mkfs.ext4").is_none() || !Path::new("/dev/loop-control").exists() {
        require("ext4 case needs mkfs.ext4 and loop devices", false);
        return;
    }
    let img = dir.path().join("ext4.img");
    run(Command::new("truncate").args(["-s", "64M"]).arg(&img));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    let ext4 = dir.path().join("ext4");
    std::fs::create_dir_all(&ext4).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&ext4));
    let _e = Mounted(ext4.clone());
    check("ext4", &ext4, &src);
}

#[test]
fn files_written_during_policy_pushes_are_all_reported() {
    if !require("files test needs root (mount, fanotify)", is_root()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mount, _m) = tmpfs(dir.path(), "pushes");
    // A slow mount poll: a push that dropped the exit points until the next poll
    // would miss a whole second of writes each time.
    let events = watch_pushing(&mount, "", fanotify(), Duration::from_secs(1), |policy| {
        // Another process writes (the source ignores its own process's writes).
        let mut writer = Command::new("sh")
            .arg("-c")
            .arg("for i in $(seq 1000 1999); do echo \"file $i\" > f$i.txt; sleep 0.005; done")
            .current_dir(&mount)
            .spawn()
            .unwrap();
        for push in 0..20 {
            std::thread::sleep(Duration::from_millis(250));
            // Each push changes the exit types, so the exit points are re-derived.
            let fs_types = if push % 2 == 0 {
                "\"cifs\""
            } else {
                "\"nfs\", \"cifs\""
            };
            let next = weilan_config::policy::parse(
                &format!("version = \"push-{push}\"\n[files]\nexit_fs_types = [{fs_types}]\n"),
                "policy.toml",
            )
            .expect("pushed policy");
            policy.send_replace(Arc::new(next));
        }
        let pushes_done = std::time::Instant::now();
        assert!(writer.wait().unwrap().success());
        println!(
            "MEASURED the writer ran {:?} past the 20th push",
            pushes_done.elapsed()
        );
    });
    let mut names: Vec<String> = exported(&events)
        .into_iter()
        .map(|f| f.path.rsplit('/').next().unwrap().to_string())
        .collect();
    names.sort();
    let reported = names.len();
    names.dedup();
    println!("MEASURED 1000 files written during 20 policy pushes: {reported} file.exported, {} distinct", names.len());
    assert_eq!(names.len(), 1000, "every file reported");
    assert_eq!(reported, 1000, "each once");
}

#[test]
fn a_rewrite_loop_is_one_event_with_a_count() {
    if !require("files test needs root (mount, fanotify)", is_root()) {
        return;
    }
    // With a `deny` rule for this exit point every open is a permission event, which
    // the kernel never merges: each round is counted. Without one, writes are plain
    // notifications, and the kernel merges a file's identical notifications while
    // they wait unread: a loop faster than the agent reads counts fewer rounds.
    let deny = "[[files.rules]]\nid = \"no-ids-out\"\ndetectors = [\"prc-resident-id\"]\naction = \"deny\"\n";
    for (policy, exact) in [(deny, true), ("", false)] {
        let dir = tempfile::tempdir().unwrap();
        let (mount, _m) = tmpfs(dir.path(), "loop");
        let policy = if policy.is_empty() {
            String::new()
        } else {
            format!(
                "[files]\nevidence_dir = \"{}\"\n{policy}",
                dir.path().join("evidence").display()
            )
        };
        let events = watch_pushing(
            &mount,
            &policy,
            fanotify(),
            Duration::from_millis(100),
            |_| {
                let out = Command::new("sh")
                .arg("-c")
                .arg("for i in $(seq 1 600); do echo \"round $i\" > loop.txt; done; echo once > other.txt")
                .current_dir(&mount)
                .output()
                .unwrap();
                assert!(out.status.success());
                // The loop's event comes when it has been quiet for 2 s.
                std::thread::sleep(Duration::from_millis(2500));
            },
        );
        let all = exported(&events);
        let looped: Vec<&FileExported> = all
            .iter()
            .filter(|f| f.path.ends_with("/loop.txt"))
            .collect();
        let rounds: u64 = looped.iter().map(|f| f.rewrites.max(1)).sum();
        println!(
            "MEASURED 600 rewrites of one file (deny rule: {exact}): {} file.exported (rewrites {:?})",
            looped.len(),
            looped.iter().map(|f| f.rewrites).collect::<Vec<_>>()
        );
        assert!(
            (1..=3).contains(&looped.len()),
            "folded, not one event per round: {}",
            looped.len()
        );
        if exact {
            assert_eq!(rounds, 600, "every round is counted");
        } else {
            assert!(
                (1..=600).contains(&rounds),
                "at most the rounds made: {rounds}"
            );
        }
        let last = looped.last().unwrap();
        assert_eq!(
            last.sha256.as_deref(),
            Some(sha256(&mount.join("loop.txt")).as_str()),
            "the final content"
        );
        assert!(
            last.exe.as_deref().is_some_and(|e| e.ends_with("sh")),
            "the shell wrote it: {last:?}"
        );
        assert_eq!(
            all.iter()
                .filter(|f| f.path.ends_with("/other.txt"))
                .count(),
            1,
            "a file written once is reported as before"
        );
    }
}

/// Enforced files of `events`.
fn quarantined(events: &[Event]) -> Vec<FileEnforced> {
    enforced(events)
        .into_iter()
        .filter(|e| e.action == "quarantine")
        .collect()
}

#[test]
fn renamed_linked_and_sparse_files_are_reported_by_their_final_name_and_whole_content() {
    if !require("files test needs root (mount, fanotify)", is_root())
        || !require("the O_TMPFILE case runs python3", have("python3"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (exit, _e) = tmpfs(dir.path(), "identity");
    // The sparse file needs room for its data only; tmpfs keeps holes as holes.
    let evidence = dir.path().join("evidence");
    let secret = dir.path().join("memo.txt");
    std::fs::write(&secret, "机密 员工 11010519491231002X\n").unwrap();
    let policy = format!(
        "[files]\nevidence_dir = \"{}\"\n\n[[files.rules]]\nid = \"quarantine-ids\"\ndetectors = [\"prc-resident-id\"]\naction = \"quarantine\"\n",
        evidence.display()
    );
    let two_gib: u64 = 2 << 30;
    let events = watch_with(&exit, &policy, fanotify(), || {
        // 1. Copied, then renamed at once.
        run(Command::new("sh").arg("-c").arg(format!(
            "cp {} {e}/f.txt && mv {e}/f.txt {e}/g.txt",
            secret.display(),
            e = exit.display()
        )));
        // 2. Made unnamed (O_TMPFILE), written, then linked in under a name.
        run(Command::new("python3").arg("-c").arg(format!(
            "import os\nd = {e:?}\nfd = os.open(d, os.O_TMPFILE | os.O_WRONLY, 0o644)\n\
             os.write(fd, open({s:?}, 'rb').read())\n\
             dd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)\n\
             os.link('/proc/self/fd/%d' % fd, 'linked.txt', dst_dir_fd=dd, follow_symlinks=True)\nos.close(fd)\n",
            e = exit.display().to_string(),
            s = secret.display().to_string()
        )));
        // 3. A 2 GiB sparse file whose only data, at its very end, is the secret.
        run(Command::new("sh").arg("-c").arg(format!(
            "truncate -s {two_gib} {e}/big.bin && dd if={s} of={e}/big.bin bs=1 seek={at} conv=notrunc 2>/dev/null",
            e = exit.display(),
            s = secret.display(),
            at = two_gib - 64
        )));
        // Hashing 2 GiB of holes takes the workers a few seconds.
        std::thread::sleep(Duration::from_secs(8));
    });
    let all = exported(&events);
    let names: Vec<&str> = all.iter().map(|f| f.path.as_str()).collect();
    println!("MEASURED reported: {names:?}");
    let q = quarantined(&events);
    for (name, size) in [
        ("g.txt", None),
        ("linked.txt", None),
        ("big.bin", Some(two_gib)),
    ] {
        let hits: Vec<&FileExported> = all
            .iter()
            .filter(|f| f.path == exit.join(name).display().to_string())
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "{name} reported once under its final name: {names:?}"
        );
        let f = hits[0];
        if let Some(size) = size {
            assert_eq!(
                (f.size, f.hashed_bytes),
                (size, size),
                "{name}: the whole file hashed"
            );
        }
        assert!(
            f.classification
                .iter()
                .any(|c| c.detector == "prc-resident-id"),
            "{name} classified: {:?} {:?}",
            f.classification,
            f.classification_note
        );
        let e = q
            .iter()
            .find(|e| e.path.as_deref() == Some(&f.path))
            .unwrap_or_else(|| panic!("{name} quarantined: {q:?}"));
        assert_eq!(e.outcome, "done", "{e:?}");
        assert!(!exit.join(name).exists(), "{name} is off the exit point");
        println!(
            "MEASURED {name}: sha256 {} of {} bytes, quarantined to {:?}",
            f.sha256.as_deref().unwrap_or("-"),
            f.hashed_bytes,
            e.evidence
        );
        if size.is_some() {
            // The evidence copy keeps the holes (it is not 2 GiB on disk) and is the file.
            let kept = PathBuf::from(e.evidence.as_deref().unwrap());
            let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&kept).unwrap());
            assert!(
                blocks * 512 < 1 << 20,
                "sparse evidence copy: {} bytes on disk",
                blocks * 512
            );
            let out = Command::new("sha256sum").arg(&kept).output().unwrap();
            assert!(
                String::from_utf8_lossy(&out.stdout).starts_with(f.sha256.as_deref().unwrap()),
                "the evidence is the file: {out:?}"
            );
        }
    }
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with("/f.txt") || n.contains("#")),
        "no event under a name the file no longer has: {names:?}"
    );
    // The sparse file's hash is the hash of its whole content (computed here).
    let big = all.iter().find(|f| f.path.ends_with("/big.bin")).unwrap();
    let mut expected = ring::digest::Context::new(&ring::digest::SHA256);
    let zeros = vec![0u8; 1 << 20];
    let mut left = two_gib - 64;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        expected.update(&zeros[..n]);
        left -= n as u64;
    }
    let mut tail = std::fs::read(&secret).unwrap();
    tail.resize(64, 0);
    expected.update(&tail);
    assert_eq!(
        big.sha256.as_deref(),
        Some(hex::encode(expected.finish().as_ref()).as_str())
    );
}

#[test]
fn a_stick_mounted_only_in_another_mount_namespace_is_watched() {
    if !require("files test needs root (mount, fanotify)", is_root())
        || !require("the namespace case runs unshare", have("unshare"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hidden = dir.path().join("ns-stick");
    std::fs::create_dir_all(&hidden).unwrap();
    let secret = dir.path().join("memo.txt");
    std::fs::write(&secret, "机密 员工 11010519491231002X\n").unwrap();
    let evidence = dir.path().join("evidence");
    let mut seen_inside = String::new();
    // The exit is a file-system type only that namespace mounts (ramfs).
    let policy = format!(
        "[files]\nexit_fs_types = [\"ramfs\"]\nevidence_dir = \"{}\"\n\n[[files.rules]]\nid = \"quarantine-ids\"\ndetectors = [\"prc-resident-id\"]\naction = \"quarantine\"\n",
        evidence.display()
    );
    let events = watch_pushing(
        &dir.path().join("unused"),
        &policy,
        fanotify(),
        Duration::from_millis(100),
        |_| {
            let out = Command::new("unshare")
                .args(["-m", "--propagation", "private", "sh", "-c"])
                .arg(format!(
                    "mount -t ramfs weilan-ns {h} && sleep 4 && cp {s} {h}/f.txt && sleep 3 \
                     && if [ -e {h}/f.txt ]; then echo STILL-THERE; else echo OFF-THE-STICK; fi",
                    h = hidden.display(),
                    s = secret.display()
                ))
                .output()
                .unwrap();
            seen_inside = String::from_utf8_lossy(&out.stdout).trim().to_string();
        },
    );
    assert_eq!(
        seen_inside, "OFF-THE-STICK",
        "quarantined off the hidden stick"
    );
    let all = exported(&events);
    println!(
        "MEASURED reported from the other namespace: {:?}",
        all.iter()
            .map(|f| (&f.path, &f.mount_point))
            .collect::<Vec<_>>()
    );
    let f = all
        .iter()
        .find(|f| f.path.ends_with(&format!("{}/f.txt", hidden.display())))
        .expect("the copy onto the stick mounted in another namespace is reported");
    assert!(f.mount_point.starts_with("/proc/"), "{f:?}");
    assert_eq!(
        f.path,
        format!("{}/f.txt", f.mount_point),
        "named as that namespace sees it, reached through /proc/PID/root"
    );
    assert_eq!(f.sha256.as_deref(), Some(sha256(&secret).as_str()));
    assert!(f
        .classification
        .iter()
        .any(|c| c.detector == "prc-resident-id"));
    let q = quarantined(&events);
    let e = q
        .iter()
        .find(|e| e.path.as_deref() == Some(f.path.as_str()))
        .unwrap_or_else(|| panic!("quarantined: {q:?}"));
    assert_eq!(e.outcome, "done", "{e:?}");
    let kept = PathBuf::from(e.evidence.as_deref().unwrap());
    assert_eq!(sha256(&kept), sha256(&secret), "the evidence is the copy");
}

#[test]
fn short_lived_writers_during_a_storm_are_still_named() {
    if !require("files test needs root (mount, fanotify)", is_root()) {
        return;
    }
    // Without a deny rule writes are notifications: by the time the event of a `cp`
    // is read behind a storm of other files, that cp may have exited and been
    // reaped. Its program comes from its exec event, queued before its writes; its
    // user from its fork (the process connector); its arguments only if read before
    // it exited. Without the connector (a container) the program is still named.
    for (with_process_events, backend) in [
        (true, fanotify()),
        (
            false,
            Box::new(FanotifyBackend::without_process_events().expect("fanotify"))
                as Box<dyn FileBackend>,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (mount, _m) = tmpfs(dir.path(), "busy");
        let src = dir.path().join("report.txt");
        std::fs::write(&src, "季度报告\n").unwrap();
        let copies = 20;
        let events = watch_pushing(&mount, "", backend, Duration::from_millis(100), |_| {
            let mut storm = Command::new("sh")
                .arg("-c")
                .arg("i=0; while [ $i -lt 10000 ]; do echo x > storm-$i; i=$((i+1)); done")
                .current_dir(&mount)
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            for i in 0..copies {
                run(Command::new("cp")
                    .arg(&src)
                    .arg(mount.join(format!("copy-{i}.txt"))));
            }
            assert!(storm.wait().unwrap().success());
            // Every file of the storm is described before the watch ends.
            std::thread::sleep(Duration::from_secs(8));
        });
        let all = exported(&events);
        let storm = all.iter().filter(|f| f.path.contains("/storm-")).count();
        let named: Vec<&FileExported> = all.iter().filter(|f| f.path.contains("/copy-")).collect();
        let count = |p: &dyn Fn(&FileExported) -> bool| named.iter().filter(|f| p(f)).count();
        println!(
            "MEASURED process events {with_process_events}: {storm} storm files, {} of {copies} copies; \
             program named {}, user {}, arguments {}",
            named.len(),
            count(&|f| f.exe.as_deref().is_some_and(|e| e.ends_with("/cp"))),
            count(&|f| f.uid == Some(0)),
            count(&|f| f.cmdline.as_deref().is_some_and(|c| c.starts_with("cp "))),
        );
        let overflows = events
            .iter()
            .filter(|e| matches!(e, Event::FileOverflow(_)))
            .count();
        let storm_named = all
            .iter()
            .filter(|f| f.path.contains("/storm-") && f.exe.as_deref() == Some("/usr/bin/dash"))
            .count();
        println!("MEASURED kernel queue overflows {overflows}; storm files with their writer {storm_named}");
        assert_eq!(storm, 10_000, "every storm file reported");
        // Behind, the agent makes opens wait (the brake) rather than let the kernel
        // queue overflow and lose who wrote.
        assert_eq!((overflows, storm_named), (0, 10_000));
        assert_eq!(named.len(), copies, "every copy reported");
        for f in &named {
            assert!(
                f.exe.as_deref().is_some_and(|e| e.ends_with("/cp")),
                "{f:?}"
            );
            if with_process_events {
                assert_eq!((f.uid, f.user.as_deref()), (Some(0), Some("root")), "{f:?}");
            }
        }
    }
}

#[test]
fn a_writer_waits_while_the_agent_is_behind_rather_than_the_queue_overflowing() {
    if !require("files test needs root (mount, fanotify)", is_root()) {
        return;
    }
    use weilan_agent::source::files::RawEvent;
    // No deny rule: writes are notifications. Nobody takes the backend's events for
    // 3 s while a shell writes 40 000 files (80 000 events, five times the kernel's
    // queue). The backend's hand-over fills, it brakes (opens wait), and every close
    // is delivered once the events are taken: no overflow, nothing to rescan.
    let dir = tempfile::tempdir().unwrap();
    let (mount, _m) = tmpfs(dir.path(), "brake");
    let mut backend = FanotifyBackend::new().expect("fanotify");
    backend.mark_mount(&mount, true, false).expect("mark");
    let files = 40_000;
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "i=0; while [ $i -lt {files} ]; do echo x > f$i; i=$((i+1)); done"
        ))
        .current_dir(&mount)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let written_while_behind = std::fs::read_dir(&mount).unwrap().count();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut closed = std::collections::HashSet::new();
    let mut overflows = 0;
    rt.block_on(async {
        while let Ok(batch) = tokio::time::timeout(Duration::from_secs(5), backend.next()).await {
            for ev in batch.expect("events") {
                match ev {
                    RawEvent::Write {
                        path, close: true, ..
                    } => {
                        closed.insert(path);
                    }
                    RawEvent::Overflow => overflows += 1,
                    _ => {}
                }
            }
        }
    });
    assert!(writer.wait().unwrap().success());
    println!(
        "MEASURED files written in the 3 s nobody read: {written_while_behind}; closes delivered {}, overflows {overflows}",
        closed.len()
    );
    assert!(
        written_while_behind < files,
        "the writer waited: {written_while_behind}"
    );
    assert_eq!((closed.len(), overflows), (files, 0));
}

/// The masks of this process's fanotify marks (`/proc/self/fdinfo`), one per mark.
fn fanotify_masks() -> Vec<u64> {
    let mut masks = Vec::new();
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_fanotify =
            std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().contains("fanotify"));
        if !is_fanotify {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        // The group's own line (`fanotify flags:… event-flags:…`) has no mask.
        masks.extend(
            info.lines()
                .filter(|l| l.starts_with("fanotify "))
                .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("mask:")))
                .map(|m| u64::from_str_radix(m, 16).expect("a mark's mask in hex")),
        );
    }
    masks
}

#[test]
fn opens_wait_for_the_agent_only_while_a_deny_rule_applies() {
    if !require("files test needs root (mount, fanotify)", is_root()) {
        return;
    }
    const FAN_MODIFY: u64 = 0x2;
    const FAN_OPEN: u64 = 0x20;
    const FAN_OPEN_PERM: u64 = 0x1_0000;
    let dir = tempfile::tempdir().unwrap();
    let (src, _s) = tmpfs(dir.path(), "ledger");
    let (exit, _e) = tmpfs(dir.path(), "share");
    let secret = src.join("salaries.txt");
    std::fs::write(&secret, "机密 工资表 11010519491231002X\n").unwrap();
    let policy = |action: &str| {
        format!(
            "[files]\nevidence_dir = \"{}\"\nsensitive_sources = [\"{}\"]\n\n\
             [[files.rules]]\nid = \"no-secrets-out\"\ndetectors = [\"mark:*\", \"prc-resident-id\"]\nexit = [\"watched\"]\naction = \"{action}\"\n",
            dir.path().join("evidence").display(),
            src.display()
        )
    };
    let push = |tx: &tokio::sync::watch::Sender<Arc<weilan_config::policy::Policy>>,
                action: &str| {
        let p = weilan_config::policy::parse(
            &format!("version = \"{action}\"\n{}", policy(action)),
            "policy.toml",
        )
        .expect("pushed policy");
        tx.send_replace(Arc::new(p));
    };
    // Until the masks show `want` for every mark (source folder and exit point).
    let marks_become = |want_perm: bool| {
        wait_for(
            "the marks to change",
            Duration::from_secs(5),
            || {
                // The marks of the source folder and the exit point (not those that
                // only watch program starts, FAN_OPEN_EXEC).
                let masks: Vec<u64> = fanotify_masks()
                    .into_iter()
                    .filter(|m| m & (FAN_OPEN | FAN_OPEN_PERM | FAN_MODIFY) != 0)
                    .collect();
                (masks.len() == 2 && masks.iter().all(|m| (m & FAN_OPEN_PERM != 0) == want_perm))
                    .then_some(masks)
            },
            || format!("{:x?}", fanotify_masks()),
        )
    };
    let copy = |name: &str| {
        Command::new("cp")
            .arg(&secret)
            .arg(exit.join(name))
            .output()
            .unwrap()
    };
    let mut outcomes = Vec::new();
    let events = watch_pushing(
        &exit,
        &policy("audit"),
        fanotify(),
        Duration::from_millis(100),
        |tx| {
            let audit = marks_become(false);
            println!("MEASURED marks with an audit rule: {audit:x?}");
            assert!(
                audit.iter().any(|m| m & FAN_OPEN != 0),
                "source reads are still seen, as notifications: {audit:x?}"
            );
            outcomes.push(("audit", copy("1-audit.txt")));
            push(tx, "deny");
            println!("MEASURED marks with a deny rule: {:x?}", marks_become(true));
            outcomes.push(("deny", copy("2-deny.txt")));
            push(tx, "audit");
            marks_become(false);
            outcomes.push(("audit again", copy("3-audit.txt")));
        },
    );
    let ok: Vec<(&str, bool)> = outcomes
        .iter()
        .map(|(w, o)| (*w, o.status.success()))
        .collect();
    assert_eq!(
        ok,
        [("audit", true), ("deny", false), ("audit again", true)],
        "refused only while the deny rule applied: {outcomes:?}"
    );
    let mut landed: Vec<String> = exported(&events)
        .into_iter()
        .map(|f| {
            assert!(
                f.exe.as_deref().is_some_and(|e| e.ends_with("/cp")),
                "{f:?}"
            );
            assert!(
                f.origins.iter().any(|o| o.ends_with("salaries.txt")),
                "{f:?}"
            );
            f.path.rsplit('/').next().unwrap().to_string()
        })
        .collect();
    landed.sort();
    assert_eq!(landed, ["1-audit.txt", "3-audit.txt"]);
    // Refused while it happened (no evidence: nothing landed), the deny copy only.
    let refused: Vec<FileEnforced> = enforced(&events)
        .into_iter()
        .filter(|e| e.action == "deny" && e.evidence.is_none())
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].rule_id, "no-secrets-out");
    assert!(refused[0]
        .path
        .as_deref()
        .is_some_and(|p| p.ends_with("2-deny.txt")));
}

/// Mounts a fresh tmpfs at `dir/name`.
fn tmpfs(dir: &Path, name: &str) -> (PathBuf, Mounted) {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", &format!("weilan-{name}")])
        .arg(&m));
    (m.clone(), Mounted(m))
}

#[test]
fn classified_copies_from_a_sensitive_folder_are_refused_and_laundered_ones_quarantined() {
    if !require("files test needs root (mount, fanotify)", is_root()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, _s) = tmpfs(dir.path(), "finance");
    let (exit, _e) = tmpfs(dir.path(), "stick");
    let evidence = dir.path().join("evidence");
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(src.join("2026")).unwrap();
    let secret = src.join("2026/salaries.txt");
    std::fs::write(&secret, "机密 工资表 11010519491231002X\n").unwrap();
    let plain = src.join("menu.txt");
    std::fs::write(&plain, "lunch: noodles\n").unwrap();
    let policy = format!(
        r#"
[files]
evidence_dir = "{}"
sensitive_sources = ["{}"]

[[files.rules]]
id = "no-secrets-out"
detectors = ["mark:*", "prc-resident-id"]
action = "deny"
"#,
        evidence.display(),
        src.display()
    );
    let mut outcomes = Vec::new();
    let events = watch_with(&exit, &policy, fanotify(), || {
        let cp = Command::new("cp")
            .arg(&secret)
            .arg(exit.join("salaries.txt"))
            .output()
            .unwrap();
        outcomes.push(("cp", cp));
        let cat = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cat {} > {}",
                secret.display(),
                exit.join("cat.txt").display()
            ))
            .output()
            .unwrap();
        outcomes.push(("cat", cat));
        run(Command::new("cp").arg(&plain).arg(exit.join("menu.txt")));
        // Laundered through a folder that is not watched: lands, then quarantined.
        run(Command::new("cp").arg(&secret).arg(staging.join("x.txt")));
        run(Command::new("cp")
            .arg(staging.join("x.txt"))
            .arg(exit.join("laundered.txt")));
    });
    for (what, out) in &outcomes {
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
            "{what} of a classified file must be refused: {out:?}"
        );
    }
    assert!(
        !exit.join("salaries.txt").exists(),
        "the empty file left by the refused open is removed"
    );
    assert_eq!(
        std::fs::metadata(exit.join("cat.txt"))
            .map(|m| m.len())
            .ok(),
        Some(0),
        "cat was refused the source: nothing reached the stick"
    );
    let enf = enforced(&events);
    let refused: Vec<&FileEnforced> = enf
        .iter()
        .filter(|e| e.action == "deny" && e.evidence.is_none())
        .collect();
    assert_eq!(refused.len(), 2, "{enf:#?}");
    for r in &refused {
        assert_eq!(r.rule_id, "no-secrets-out");
        assert_eq!(r.source_path.as_deref(), Some(secret.to_str().unwrap()));
        assert!(r.matched.iter().any(|m| m == "prc-resident-id"), "{r:?}");
    }
    assert!(
        refused
            .iter()
            .any(|r| r.exe.as_deref().is_some_and(|e| e.ends_with("/cp"))
                && r.path.as_deref() == Some(exit.join("salaries.txt").to_str().unwrap())),
        "{refused:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r.exe.as_deref().is_some_and(|e| e.ends_with("/cat"))),
        "{refused:#?}"
    );

    // The plain file copied, with its origin; its read was recorded.
    let ex = exported(&events);
    let menu = ex
        .iter()
        .find(|e| e.path.ends_with("/menu.txt"))
        .expect("menu.txt exported");
    assert_eq!(menu.origins, vec![plain.display().to_string()]);
    assert_eq!(
        (menu.action.as_str(), menu.rule_id.as_str()),
        ("audit", "files.default")
    );
    let reads: Vec<&FileSourceRead> = events
        .iter()
        .filter_map(|e| match e {
            Event::FileSourceRead(r) => Some(r),
            _ => None,
        })
        .collect();
    assert!(
        reads.iter().any(|r| r.path == plain.to_str().unwrap()
            && r.exe.as_deref().is_some_and(|e| e.ends_with("/cp"))
            && r.source == src.to_str().unwrap()),
        "{reads:#?}"
    );

    // The laundered copy: reported, decided by the deny rule, quarantined.
    let laundered = ex
        .iter()
        .find(|e| e.path.ends_with("/laundered.txt"))
        .expect("laundered.txt exported");
    assert_eq!(
        (laundered.action.as_str(), laundered.rule_id.as_str()),
        ("deny", "no-secrets-out")
    );
    assert!(!exit.join("laundered.txt").exists(), "quarantined");
    let q = enf
        .iter()
        .find(|e| e.evidence.is_some())
        .expect("a quarantine");
    let kept = PathBuf::from(q.evidence.as_ref().unwrap());
    assert_eq!(q.outcome, "done");
    assert_eq!(q.sha256.as_deref(), Some(sha256(&kept).as_str()));
    assert_eq!(
        laundered.sha256, q.sha256,
        "the evidence is the file that landed"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&evidence).unwrap().permissions().mode() & 0o777,
        0o700
    );
    println!(
        "deny: cp and cat of a classified source refused (EPERM), 2 file.enforced naming \
         no-secrets-out; plain copy exported with its origin; laundered copy quarantined \
         into a 0700 store (0600 file, same SHA-256)"
    );
}

#[test]
fn inotify_fallback_reports_each_file_once_without_a_writer() {
    if !require("files test needs root (mount)", is_root()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (exit, _e) = tmpfs(dir.path(), "share");
    let src = dir.path().join("src.bin");
    std::fs::write(&src, vec![3u8; 200_000]).unwrap();
    let events = watch_with(&exit, "", Box::new(InotifyBackend::new().unwrap()), || {
        run(Command::new("cp").arg(&src).arg(exit.join("a.bin")));
        run(Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", exit.join("b.bin").display()))
            .args(["bs=4k", "status=none"]));
        // A file written right after its new directory: inotify watches the
        // directory only once it exists, so the scan of new directories finds it.
        run(Command::new("sh").arg("-c").arg(format!(
            "mkdir -p {0}/d/e && echo quick > {0}/d/e/f.txt",
            exit.display()
        )));
    });
    let ex = exported(&events);
    for name in ["a.bin", "b.bin", "d/e/f.txt"] {
        let hits: Vec<&FileExported> = ex
            .iter()
            .filter(|e| e.path == exit.join(name).to_str().unwrap())
            .collect();
        assert_eq!(hits.len(), 1, "{name}: {ex:#?}");
        assert_eq!((hits[0].attribution.as_str(), hits[0].pid), ("none", None));
        assert_eq!(
            hits[0].sha256.as_deref(),
            Some(sha256(&exit.join(name)).as_str())
        );
    }
    println!(
        "inotify: cp, dd and a file in a brand-new directory → one event each, attribution none"
    );
}

/// Each format the classifier reads, as a file a person would carry out: the classes
/// it must get, copied with `cp` onto a watched tmpfs (fanotify, the real source and
/// classifier). 7z archives go through the agent's real memory-capped child process
/// (`weilan-agent unpack-7z`); one made by 7-Zip itself, and one whose header claims
/// 1 TiB, which kills its child and is refused with the child's last words while the
/// files copied after it are still classified. RAR is named, not read.
#[test]
fn every_readable_format_copied_onto_a_mount_is_classified() {
    use weilan_agent::classify::samples;
    if !require("files test needs root (mount, fanotify)", is_root()) {
        return;
    }
    // The source runs in this test process: its 7z child is the agent program.
    weilan_agent::classify::sevenz::use_helper_program(env!("CARGO_BIN_EXE_weilan-agent").into());
    let id = "11010519491231002X";
    let mark = "机密★1年";
    let secret_docx: &[&[&str]] = &[&["机", "密★", "1年"], &["身份证 1101051949", "1231002X"]];
    let files: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "通知.txt",
            format!("{mark}\n员工 {id}\n").into_bytes(),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "通知-gb18030.txt",
            samples::gb18030(&format!("{mark}\n员工 {id}\n")),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "通知-utf16.txt",
            samples::utf16le(&format!("{mark}\n员工 {id}\n")),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "报告.docx",
            samples::docx(secret_docx),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "名单.xlsx",
            samples::xlsx(&["联系电话"], &[13812345678, 13912345678]),
            &["prc-mobile"],
        ),
        (
            "汇报.pptx",
            samples::pptx(&["秘密★启用前", "会议纪要"]),
            &["mark:confidential"],
        ),
        (
            "发票.ofd",
            samples::ofd(&["绝密★", "金额"]),
            &["mark:top-secret"],
        ),
        (
            "staff.pdf",
            samples::pdf(&format!("staff id {id}")),
            &["prc-resident-id"],
        ),
        (
            "通知.pdf",
            samples::pdf_cjk(&[mark, &format!("员工 {id}")]),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "通知.doc",
            samples::doc(&[mark], &[&format!("员工 {id}")]),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "名单.xls",
            samples::xls(&[&["姓名", "身份证号", "电话"], &["张三", id, "13812345678"]]),
            &["prc-resident-id", "prc-mobile"],
        ),
        (
            "通知.rtf",
            samples::rtf(&[mark], &[&format!("员工 {id}")], false),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "汇报.ppt",
            samples::ppt(&["秘密★启用前", "会议纪要"]),
            &["mark:confidential"],
        ),
        (
            "通知-ucs2.pdf",
            samples::pdf_ucs2(&[mark, &format!("员工 {id}")]),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "通知-gbk.pdf",
            samples::pdf_gbk(&[mark, &format!("员工 {id}")]),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "资料.zip",
            samples::zip(&[("a/名单.csv", format!("张三,{id}\n").as_bytes())]),
            &["prc-resident-id"],
        ),
        (
            "资料.tar.gz",
            samples::gzip(
                &samples::tar(&[("报告.docx", &samples::docx(secret_docx))]),
                false,
            ),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "名单.csv.gz",
            samples::gzip(format!("张三,{id}\n").as_bytes(), false),
            &["prc-resident-id"],
        ),
        // Refused with a reason, for rules to act on: a compression bomb.
        (
            "zeros.gz",
            samples::gzip(&vec![0u8; 64 << 20], false),
            &["unreadable"],
        ),
        (
            "zeros.zip",
            samples::zip(&[("zeros.bin", &vec![0u8; 64 << 20])]),
            &["unreadable"],
        ),
        ("深层.gz", ten_thousand_deep(), &["unreadable"]),
        (
            "header-bomb.7z",
            samples::seven_zip_header_bomb(),
            &["unreadable"],
        ),
        (
            "dictionary-bomb.7z",
            samples::seven_zip_dictionary_bomb(),
            &["unreadable"],
        ),
        (
            "资料.7z",
            samples::seven_zip(
                &[
                    ("报告.docx", &samples::docx(secret_docx)),
                    ("名单.csv", format!("张三,{id}\n").as_bytes()),
                ],
                true,
            ),
            &["mark:secret", "prc-resident-id"],
        ),
        (
            "嵌套.zip",
            samples::zip(&[(
                "inner.7z",
                &samples::seven_zip(&[("汇报.pptx", &samples::pptx(&["秘密★启用前"]))], false),
            )]),
            &["mark:confidential"],
        ),
        (
            "sealed.rar",
            b"Rar!\x1A\x07\x01\x00 not opened".to_vec(),
            &["unreadable"],
        ),
    ];
    let mut files = files;
    if have("7zz") {
        files.push((
            "7-zip-made.7z",
            seven_zip_by_7zip(&[
                ("通知.txt", format!("{mark}\n员工 {id}\n").as_bytes()),
                (
                    "名单.xls",
                    &samples::xls(&[&["姓名", "电话"], &["张三", "13812345678"]]),
                ),
            ]),
            &["mark:secret", "prc-resident-id", "prc-mobile"],
        ));
        for (name, header) in [
            ("sealed-entries.7z", "-mhe=off"),
            ("sealed-all.7z", "-mhe=on"),
        ] {
            files.push((
                name,
                seven_zip_by_7zip_with(&[("通知.txt", mark.as_bytes())], &["-pSECRET", header]),
                &["unreadable"],
            ));
        }
    } else {
        println!("SKIPPED: a 7z made by 7-Zip itself: 7zz not installed (Debian package 7zip)");
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (name, bytes, _) in &files {
        std::fs::write(src.join(name), bytes).unwrap();
    }
    let (stick, _m) = tmpfs(dir.path(), "stick");
    let got = watch(&stick, || {
        for (name, _, _) in &files {
            run(Command::new("cp").arg(src.join(name)).arg(stick.join(name)));
        }
    });
    for (name, _, want) in &files {
        let e = got
            .iter()
            .find(|e| e.path.ends_with(name))
            .unwrap_or_else(|| panic!("{name}: no file.exported in {got:#?}"));
        let mut classes: Vec<&str> = e
            .classification
            .iter()
            .map(|c| c.detector.as_str())
            .collect();
        classes.sort();
        let mut want = want.to_vec();
        want.sort();
        assert_eq!(classes, want, "{name}: {e:#?}");
    }
    let reason = |name: &str| {
        let e = got.iter().find(|e| e.path.ends_with(name)).unwrap();
        e.classification[0].samples.join(" ")
    };
    let zip_bomb = reason("zeros.zip");
    assert!(zip_bomb.contains("zip bomb refused"), "{zip_bomb}");
    let deep = reason("深层.gz");
    assert!(deep.contains("nested more than 3 deep"), "{deep}");
    let bomb = reason("header-bomb.7z");
    assert!(
        bomb.contains("7z: refused: the reader stopped")
            && bomb.contains("memory allocation of 1099511627776 bytes failed"),
        "{bomb}"
    );
    // Under the child's address-space limit the decoder's own check refuses the
    // dictionary; without the limit it would zero-fill 4 GiB.
    let dictionary = reason("dictionary-bomb.7z");
    assert!(
        dictionary.contains("dictionary allocation too large"),
        "{dictionary}"
    );
    assert_eq!(reason("sealed.rar"), "unsupported: rar");
    if have("7zz") {
        for name in ["sealed-entries.7z", "sealed-all.7z"] {
            assert!(
                reason(name).contains("encrypted"),
                "{name}: {}",
                reason(name)
            );
        }
    }
    println!(
        "{} files classified on a real copy; the lying 7z: {bomb}; {dictionary}",
        files.len()
    );
}

/// The 7z reader's confinement, as the agent's child gets it: no capability, and a
/// Landlock ruleset that refuses every file open and (on a kernel with Landlock ABI 4)
/// every TCP connection — tried for real by `unpack-7z --check-confinement`.
#[test]
fn the_7z_reader_cannot_open_files_or_connect() {
    let out = Command::new(env!("CARGO_BIN_EXE_weilan-agent"))
        .args(["unpack-7z", "--check-confinement"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("landlock: not enforced") {
        println!(
            "SKIPPED: this kernel has no Landlock; the reader keeps its rlimits only:\n{text}"
        );
        return;
    }
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("capabilities: none; landlock ABI v"),
        "{text}"
    );
    for probe in ["open /etc/passwd: refused", "create a file: refused"] {
        assert!(text.contains(probe), "{probe} in\n{text}");
    }
    println!("{text}");
}

/// An archive 10 000 deep: a tar in a zip in 9 998 gzip layers (stored, so that it
/// builds fast).
fn ten_thousand_deep() -> Vec<u8> {
    use weilan_agent::classify::samples;
    let mut nested = samples::tar(&[("x", "机密★\n".as_bytes())]);
    nested = samples::zip(&[("x.tar", &nested)]);
    for _ in 2..10_000 {
        nested = samples::gzip(&nested, true);
    }
    nested
}

/// A 7z archive of `entries` written by 7-Zip (`7zz`, its defaults: LZMA2, solid,
/// compressed header).
fn seven_zip_by_7zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    seven_zip_by_7zip_with(entries, &[])
}

/// The same with more `7zz a` switches (a password: `-pSECRET`).
fn seven_zip_by_7zip_with(entries: &[(&str, &[u8])], switches: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for (name, bytes) in entries {
        std::fs::write(input.join(name), bytes).unwrap();
    }
    let archive = dir.path().join("a.7z");
    run(Command::new("7zz")
        .args(["a", "-bso0", "-bsp0"])
        .args(switches)
        .arg(&archive)
        .arg(".")
        .current_dir(&input));
    std::fs::read(archive).unwrap()
}
