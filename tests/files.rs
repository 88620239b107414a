//! Files that cross the fence, on real file systems: tmpfs and ext4 on a loop device
//! are mounted by the test and watched as exit points with fanotify; `cp`, `dd` and
//! `rsync` write onto them; each file must give exactly one `file.exported` with the
//! right hash, writer and user.

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
use weilan_agent::source::files::linux::FanotifyBackend;
use weilan_agent::source::files::{default_network_fs, FilesConfig, FilesSource};
use weilan_agent::source::{EventSink, Observed, Source, SourceContext};
use weilan_config::event::{Event, FileExported};

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

/// Watches `mount` and returns the events seen while `work` runs.
fn watch(mount: &Path, work: impl FnOnce()) -> Vec<FileExported> {
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
        mount_poll: Duration::from_millis(100),
        watch_mounts: vec![mount.to_path_buf()],
        network_fs: default_network_fs(),
        hash_max_bytes: 64 << 20,
        limits: Default::default(),
        workers: 2,
    };
    let mut source = FilesSource::new(config, Box::new(FanotifyBackend::new().expect("fanotify")));
    let task = rt.spawn(async move { source.run(&ctx).await.map_err(|e| e.to_string()) });
    std::thread::sleep(Duration::from_millis(500)); // the mark is in place
    work();
    std::thread::sleep(Duration::from_millis(1500)); // hashing workers finish
    shutdown.cancel();
    let _ = rt.block_on(task);
    let mut out = Vec::new();
    while let Ok(o) = rx.try_recv() {
        if let Event::FileExported(f) = o.event {
            out.push(f);
        }
    }
    out
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
        assert!(r[0].sha256.is_some());
    } else {
        require("rsync case needs the `rsync` binary", false);
    }
    println!(
        "{fs}: cp, dd{} → one file.exported each, hashes, writers and user right",
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
