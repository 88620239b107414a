//! The files source with a test backend: aggregation into one event per file, and the
//! overflow path (explicit event + rescan with unknown writer).

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
    fn mark_mount(&mut self, mount_point: &Path) -> Result<(), String> {
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
    let mount = dir.path().canonicalize().unwrap().join("share");
    std::fs::create_dir_all(&mount).unwrap();
    let mountinfo = dir.path().join("mountinfo");
    std::fs::write(
        &mountinfo,
        format!("36 25 0:40 / {} rw - tmpfs share rw\n", mount.display()),
    )
    .unwrap();
    let (btx, brx) = mpsc::channel(8);
    let marked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut source = FilesSource::new(
        FilesConfig {
            sysfs_root: dir.path().join("sys"),
            mountinfo,
            mount_poll: Duration::from_millis(50),
            watch_mounts: vec![mount.clone()],
            network_fs: default_network_fs(),
            hash_max_bytes: 1 << 20,
            limits: Default::default(),
            workers: 1,
        },
        Box::new(ChannelBackend {
            rx: brx,
            marked: marked.clone(),
        }),
    );
    let (tx, mut rx) = mpsc::channel(64);
    let ctx = SourceContext {
        sink: EventSink::new(tx, Arc::new(AtomicU64::new(0))),
        shutdown: CancellationToken::new(),
    };
    let stop = ctx.shutdown.clone();
    let task = tokio::spawn(async move { source.run(&ctx).await.map_err(|e| e.to_string()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        marked.lock().unwrap().as_slice(),
        [mount.clone()],
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
