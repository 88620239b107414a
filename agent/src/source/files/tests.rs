//! The files source with a test backend: aggregation into one event per file, the
//! overflow path (explicit event + rescan with unknown writer), files found in new
//! directories, and the policy's actions (quarantine, read-only-device).

use std::sync::atomic::AtomicU64;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::source::{EventSink, Observed};

struct ChannelBackend {
    rx: mpsc::Receiver<Vec<RawEvent>>,
    marked: std::sync::Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl FileBackend for ChannelBackend {
    fn mark_mount(
        &mut self,
        mount_point: &Path,
        _whole_fs: bool,
        _refuse: bool,
    ) -> Result<(), String> {
        self.marked.lock().unwrap().push(mount_point.to_path_buf());
        Ok(())
    }
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<RawEvent>, String>> {
        Box::pin(async move { self.rx.recv().await.ok_or_else(|| "closed".to_string()) })
    }
}

fn writer() -> Option<Writer> {
    Some(Writer {
        pid: 42,
        exe: Some("/usr/bin/cp".into()),
        cmdline: Some("cp a b".into()),
        uid: Some(1000),
        user: Some("clerk".into()),
    })
}

fn test_source(
    dir: &Path,
    mountinfo: PathBuf,
    mount: &Path,
    brx: mpsc::Receiver<Vec<RawEvent>>,
    marked: std::sync::Arc<std::sync::Mutex<Vec<PathBuf>>>,
    policy: &str,
    fence: Option<mpsc::Sender<crate::fence::FenceControl>>,
) -> FilesSource {
    let policy =
        weilan_config::policy::parse(&format!("version = \"t\"\n{policy}"), "policy.toml").unwrap();
    let (tx, rx) = watch::channel(Arc::new(policy));
    std::mem::forget(tx); // the policy stays as it is for the test
    FilesSource::new(
        FilesConfig {
            sysfs_root: dir.join("sys"),
            mountinfo,
            mount_poll: Duration::from_millis(50),
            watch_mounts: vec![mount.to_path_buf()],
            hash_max_bytes: 1 << 20,
            limits: Default::default(),
            workers: 1,
            settle: Duration::from_millis(200),
        },
        Box::new(ChannelBackend { rx: brx, marked }),
        rx,
        Arc::new(crate::guard::files::FilesGuard::new(Box::new(
            crate::guard::files::linux::LinuxFileEnforcer { fence },
        ))),
    )
}

/// A watched tmpfs-like mount in a temporary directory, and its mountinfo.
fn fake_mount(dir: &Path) -> (PathBuf, PathBuf) {
    let mount = dir.canonicalize().unwrap().join("share");
    std::fs::create_dir_all(&mount).unwrap();
    let mountinfo = dir.join("mountinfo");
    std::fs::write(
        &mountinfo,
        format!("36 25 0:40 / {} rw - tmpfs share rw\n", mount.display()),
    )
    .unwrap();
    (mount, mountinfo)
}

async fn next_event(rx: &mut mpsc::Receiver<Observed>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("in time")
        .expect("open")
        .event
}

#[tokio::test]
async fn writes_aggregate_to_one_event_and_an_overflow_rescans() {
    let dir = tempfile::tempdir().unwrap();
    let (mount, mountinfo) = fake_mount(dir.path());
    let Running {
        backend: btx,
        events: mut rx,
        stop,
        marked,
        task,
    } = spawn_source(dir.path(), mountinfo, &mount, "", None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        marked.lock().unwrap().as_slice(),
        std::slice::from_ref(&mount),
        "the configured mount is watched"
    );

    // Three writes and a close of one file: one event, with the writer.
    let a = mount.join("a.txt");
    std::fs::write(&a, "hello").unwrap();
    for close in [false, false, false, true] {
        btx.send(vec![RawEvent::Write {
            path: a.clone(),
            close,
            writer: writer(),
            file: None,
            origins: Vec::new(),
        }])
        .await
        .unwrap();
    }
    let Event::FileExported(e) = next_event(&mut rx).await else {
        panic!()
    };
    assert_eq!(
        (e.path.as_str(), e.size, e.attribution.as_str()),
        (a.to_str().unwrap(), 5, "fanotify")
    );
    assert_eq!(e.user.as_deref(), Some("clerk"));
    assert_eq!(
        e.sha256.as_deref(),
        Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
    );

    // An overflow: a file written meanwhile without events is found by the rescan.
    let b = mount.join("sub/b.txt");
    std::fs::create_dir_all(b.parent().unwrap()).unwrap();
    std::fs::write(&b, "unseen").unwrap();
    btx.send(vec![RawEvent::Overflow]).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(next_event(&mut rx).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.try_recv().is_err(),
        "a.txt, reported at close and unchanged, is not reported again: {got:?}"
    );
    let overflow = got.iter().find_map(|e| match e {
        Event::FileOverflow(o) => Some(o.clone()),
        _ => None,
    });
    let rescanned: Vec<&FileExported> = got
        .iter()
        .filter_map(|e| match e {
            Event::FileExported(f) => Some(f),
            _ => None,
        })
        .collect();
    let o = overflow.expect("an explicit overflow event");
    assert!(o.complete && o.rescanned >= 1, "{o:?}");
    assert!(
        rescanned
            .iter()
            .any(|f| f.path == b.to_str().unwrap() && f.attribution == "none" && f.pid.is_none()),
        "{got:?}"
    );
    stop.cancel();
    assert_eq!(task.await.unwrap(), Ok(()));
}

/// A files source running over a test backend.
struct Running {
    backend: mpsc::Sender<Vec<RawEvent>>,
    events: mpsc::Receiver<Observed>,
    stop: CancellationToken,
    marked: std::sync::Arc<std::sync::Mutex<Vec<PathBuf>>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

/// Runs a source that watches `mount` (listed in `mountinfo`) under `policy`.
fn spawn_source(
    dir: &Path,
    mountinfo: PathBuf,
    mount: &Path,
    policy: &str,
    fence: Option<mpsc::Sender<crate::fence::FenceControl>>,
) -> Running {
    let (btx, brx) = mpsc::channel(8);
    let marked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut source = test_source(dir, mountinfo, mount, brx, marked.clone(), policy, fence);
    let (tx, rx) = mpsc::channel(64);
    let ctx = SourceContext {
        sink: EventSink::new(tx, Arc::new(AtomicU64::new(0))),
        shutdown: CancellationToken::new(),
    };
    let stop = ctx.shutdown.clone();
    let task = tokio::spawn(async move { source.run(&ctx).await.map_err(|e| e.to_string()) });
    Running {
        backend: btx,
        events: rx,
        stop,
        marked,
        task,
    }
}

/// Starts a source over a fake mount; returns the backend's sender, the event
/// receiver, the stop token and the mount.
#[allow(clippy::type_complexity)]
fn start(
    dir: &Path,
    policy: &str,
    fence: Option<mpsc::Sender<crate::fence::FenceControl>>,
) -> (
    mpsc::Sender<Vec<RawEvent>>,
    mpsc::Receiver<Observed>,
    CancellationToken,
    PathBuf,
) {
    let (mount, mountinfo) = fake_mount(dir);
    let r = spawn_source(dir, mountinfo, &mount, policy, fence);
    (r.backend, r.events, r.stop, mount)
}

fn close(path: &Path) -> RawEvent {
    RawEvent::Write {
        path: path.to_path_buf(),
        close: true,
        writer: writer(),
        file: None,
        origins: vec!["/srv/finance/q3.xlsx".into()],
    }
}

#[tokio::test]
async fn found_files_are_reported_once_when_quiet_unless_a_close_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let (btx, mut rx, stop, mount) = start(dir.path(), "", None);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let quiet = mount.join("new/quiet.txt");
    let closed = mount.join("new/closed.txt");
    std::fs::create_dir_all(quiet.parent().unwrap()).unwrap();
    std::fs::write(&quiet, "q").unwrap();
    std::fs::write(&closed, "c").unwrap();
    btx.send(vec![
        RawEvent::Found {
            path: quiet.clone(),
        },
        RawEvent::Found {
            path: closed.clone(),
        },
        close(&closed),
    ])
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Event::FileExported(e) = next_event(&mut rx).await {
            got.push(e);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "one event per file: {got:#?}");
    let q = got
        .iter()
        .find(|e| e.path == quiet.to_str().unwrap())
        .unwrap();
    let c = got
        .iter()
        .find(|e| e.path == closed.to_str().unwrap())
        .unwrap();
    assert_eq!((q.attribution.as_str(), q.pid), ("none", None));
    assert_eq!(
        (c.attribution.as_str(), c.origins.as_slice()),
        ("fanotify", ["/srv/finance/q3.xlsx".to_string()].as_slice())
    );
    stop.cancel();
}

#[tokio::test]
async fn a_quarantine_rule_moves_the_file_into_the_evidence_store_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let evidence = dir.path().join("evidence");
    let policy = format!(
        "[files]\nevidence_dir = \"{}\"\n[[files.rules]]\nid = \"marks-out\"\ndetectors = [\"mark:*\"]\naction = \"quarantine\"\n",
        evidence.display()
    );
    let (btx, mut rx, stop, mount) = start(dir.path(), &policy, None);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let secret = mount.join("memo.txt");
    let harmless = mount.join("menu.txt");
    std::fs::write(&secret, "绝密★启用前\nthe plan").unwrap();
    std::fs::write(&harmless, "noodles").unwrap();
    btx.send(vec![close(&secret), close(&harmless)])
        .await
        .unwrap();
    let mut events = Vec::new();
    while events.len() < 3 {
        events.push(next_event(&mut rx).await);
    }
    let exported: Vec<&FileExported> = events
        .iter()
        .filter_map(|e| match e {
            Event::FileExported(f) => Some(f),
            _ => None,
        })
        .collect();
    let named = |name: &str| *exported.iter().find(|e| e.path.ends_with(name)).unwrap();
    let memo = named("memo.txt");
    assert_eq!(
        (memo.action.as_str(), memo.rule_id.as_str()),
        ("quarantine", "marks-out")
    );
    let menu = named("menu.txt");
    assert_eq!(
        (menu.action.as_str(), menu.rule_id.as_str()),
        ("audit", "files.default")
    );
    let enforced = events
        .iter()
        .find_map(|e| match e {
            Event::FileEnforced(f) => Some(f),
            _ => None,
        })
        .expect("file.enforced");
    assert_eq!(
        (
            enforced.action.as_str(),
            enforced.rule_id.as_str(),
            enforced.outcome.as_str()
        ),
        ("quarantine", "marks-out", "done")
    );
    assert_eq!(enforced.matched, vec!["mark:top-secret".to_string()]);
    assert!(!secret.exists() && harmless.exists());
    let kept = PathBuf::from(enforced.evidence.as_ref().unwrap());
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "绝密★启用前\nthe plan"
    );
    assert_eq!(enforced.sha256, memo.sha256);
    let sidecar: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(kept.with_file_name(format!(
            "{}.json",
            kept.file_name().unwrap().to_string_lossy()
        )))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(sidecar["rule_id"], "marks-out");
    assert_eq!(sidecar["writer"]["user"], "clerk");
    stop.cancel();
}

#[tokio::test]
async fn a_file_renamed_right_after_the_close_is_reported_under_its_final_name() {
    let dir = tempfile::tempdir().unwrap();
    let (btx, mut rx, stop, mount) = start(dir.path(), "", None);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // rsync's temporary name, and a plain name moved away (`cp f stick/ && mv ...`).
    for (written, renamed) in [(".report.csv.Xy12Zq", "report.csv"), ("f.txt", "g.txt")] {
        let (written, renamed) = (mount.join(written), mount.join(renamed));
        std::fs::write(&written, "a,b\n").unwrap();
        btx.send(vec![RawEvent::Write {
            path: written.clone(),
            close: true,
            writer: writer(),
            file: Some(std::fs::File::open(&written).unwrap()),
            origins: Vec::new(),
        }])
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::rename(&written, &renamed).unwrap();
        let Event::FileExported(e) = next_event(&mut rx).await else {
            panic!()
        };
        assert_eq!(e.path, renamed.to_str().unwrap());
    }
    stop.cancel();
}

#[tokio::test]
async fn which_file_systems_are_exit_points_is_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (mount, mountinfo) = fake_mount(dir.path());
    let mut table = std::fs::read_to_string(&mountinfo).unwrap();
    table.push_str(
        "37 25 0:41 / /mnt/finance rw - cifs //fs01/finance rw\n\
         38 25 0:42 / /mnt/phone rw - fuse.gvfsd-fuse gvfsd-fuse rw\n\
         39 25 8:2 / /srv/data rw - ext4 /dev/sda2 rw\n",
    );
    std::fs::write(&mountinfo, &table).unwrap();
    for (policy, expected) in [
        ("", vec!["/mnt/finance", "/mnt/phone"]),
        ("[files]\nexit_fs_types = [\"ext4\"]\n", vec!["/srv/data"]),
    ] {
        let r = spawn_source(dir.path(), mountinfo.clone(), &mount, policy, None);
        let mut want: Vec<PathBuf> = expected.iter().map(PathBuf::from).collect();
        want.push(mount.clone()); // watch_mounts of the settings
        want.sort();
        // The marks appear once the source has read the table; a loaded machine only
        // makes that later (the deadline is a hang guard, not a measurement).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Mounts of this machine's other mount namespaces (`/proc/PID/root/…`: tests
        // beside this one run `unshare -m` hosts on ext4) are not in this table.
        let ours = |marked: &[PathBuf]| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = marked
                .iter()
                .filter(|p| !p.starts_with("/proc"))
                .cloned()
                .collect();
            v.sort();
            v
        };
        let got = loop {
            let got = ours(&r.marked.lock().unwrap());
            if got == want || std::time::Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // A mount marked beyond the expected ones would show up by now too.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = ours(&r.marked.lock().unwrap());
        assert_eq!(got, want, "policy {policy:?}");
        assert_eq!(after, want, "policy {policy:?}: nothing else marked later");
        r.stop.cancel();
        let _ = r.task.await;
    }
}

/// A busy host: the stick is pulled (its mount leaves the table) before the agent has
/// read the write the kernel queued for it. Nothing else will ever report that file.
#[tokio::test]
async fn a_write_read_after_its_exit_point_went_away_is_still_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (mount, mountinfo) = fake_mount(dir.path());
    let Running {
        backend: btx,
        events: mut rx,
        stop,
        marked,
        ..
    } = spawn_source(dir.path(), mountinfo.clone(), &mount, "", None);
    let watched = || marked.lock().unwrap().len();
    while watched() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = mount.join("held.txt");
    std::fs::write(&held, "written just before the pull").unwrap();
    let file = std::fs::File::open(&held).unwrap();
    std::fs::write(&mountinfo, "").unwrap();
    // The source notices the mount is gone (it polls mountinfo), then reads the write.
    tokio::time::sleep(Duration::from_millis(600)).await;
    btx.send(vec![RawEvent::Write {
        path: held.clone(),
        close: false,
        writer: writer(),
        file: Some(file),
        origins: Vec::new(),
    }])
    .await
    .unwrap();
    let Event::FileExported(e) = next_event(&mut rx).await else {
        panic!()
    };
    assert_eq!(e.path, held.to_str().unwrap());
    assert!(e.unclosed, "{e:?}");
    assert_eq!(e.size, 28);
    assert!(
        e.sha256.is_some(),
        "read through the event's descriptor: {e:?}"
    );
    assert_eq!(
        e.mount_point,
        mount.to_str().unwrap(),
        "the vanished exit point"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_file_open_when_its_exit_point_goes_away_is_reported_unclosed() {
    let dir = tempfile::tempdir().unwrap();
    let (mount, mountinfo) = fake_mount(dir.path());
    let Running {
        backend: btx,
        events: mut rx,
        stop,
        ..
    } = spawn_source(dir.path(), mountinfo.clone(), &mount, "", None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Written, never closed: one kept its descriptor, one did not (and is gone).
    let open = mount.join("open.txt");
    std::fs::write(&open, "still being written").unwrap();
    let lost = mount.join("lost.txt");
    std::fs::write(&lost, "x").unwrap();
    btx.send(vec![
        RawEvent::Write {
            path: open.clone(),
            close: false,
            writer: writer(),
            file: Some(std::fs::File::open(&open).unwrap()),
            origins: Vec::new(),
        },
        RawEvent::Write {
            path: lost.clone(),
            close: false,
            writer: writer(),
            file: None,
            origins: Vec::new(),
        },
    ])
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::remove_file(&lost).unwrap();
    // The stick is pulled: its mount leaves the table.
    std::fs::write(&mountinfo, "").unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let Event::FileExported(e) = next_event(&mut rx).await else {
            panic!()
        };
        got.push(e);
    }
    got.sort_by(|a, b| a.path.cmp(&b.path));
    let (l, o) = (&got[0], &got[1]);
    assert_eq!(o.path, open.to_str().unwrap());
    assert!(o.unclosed);
    assert_eq!(o.size, 19);
    assert_eq!(
        o.sha256.as_deref(),
        Some(
            hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                b"still being written"
            ))
            .as_str()
        ),
        "read through the kept descriptor"
    );
    assert_eq!(l.path, lost.to_str().unwrap());
    assert!(l.unclosed && l.sha256.is_none());
    assert!(
        l.classification_note
            .as_deref()
            .is_some_and(|n| n.contains("unreadable")),
        "{l:?}"
    );
    stop.cancel();
}
