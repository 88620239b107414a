//! The USB storage source: every USB device (identity, interfaces, block devices)
//! and every mount of a USB block device.
//!
//! At start it opens the uevent stream *first*, then enumerates sysfs (devices present
//! before the agent are reported with `present_at_start`), then reads the mount table.
//! After that it follows kernel uevents and mount-table changes. Mass-storage devices
//! get a short settle time after `add` so their `usb.attached` event carries the block
//! devices the kernel creates right after the USB device; a device that stays without
//! block devices (blocked, broken) is reported when the settle time ends.
//!
//! This module reports facts only; what is allowed is decided elsewhere.

pub mod fsprobe;
pub mod mounts;
pub mod sysfs;
pub mod uevent;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kobject_uevent::{ActionType, UEvent};
use tokio::time::Instant;
use weilan_config::event::{
    Event, SourceError as SourceErrorEvent, UsbDetached, UsbDevice, Volume,
};

use tokio::sync::mpsc;

use self::mounts::Mount;
use self::sysfs::Sysfs;
use self::uevent::{UeventBackend, UeventError};
use super::{BoxFuture, Source, SourceContext, SourceError};

/// What the USB source tells the fence.
#[derive(Debug, Clone)]
pub enum FenceFact {
    /// A device appeared (hot-plug) or was found at start.
    Attached {
        dir: PathBuf,
        device: UsbDevice,
        at_start: bool,
        /// When the uevent reached the agent (hot-plug only), for the decision latency.
        seen: Option<std::time::Instant>,
    },
    Detached {
        dir: PathBuf,
    },
    /// A disk or partition of a USB device appeared.
    BlockAdded {
        usb_dir: PathBuf,
        block: String,
    },
    /// A volume of a USB device was mounted.
    Mounted {
        usb_dir: PathBuf,
        volume: Volume,
    },
}

/// Configuration of the USB source.
#[derive(Debug, Clone)]
pub struct UsbConfig {
    pub sysfs_root: PathBuf,
    pub mountinfo: PathBuf,
    pub mount_poll: Duration,
    pub dev_root: PathBuf,
    /// How long a new mass-storage device may take to show its block devices.
    pub storage_settle: Duration,
}

pub struct UsbSource {
    config: UsbConfig,
    sysfs: Sysfs,
    backend: Box<dyn UeventBackend>,
    /// Where device facts go for a decision (the USB fence), if enforcement runs.
    fence: Option<mpsc::Sender<FenceFact>>,
}

impl UsbSource {
    pub fn new(
        config: UsbConfig,
        backend: Box<dyn UeventBackend>,
        fence: Option<mpsc::Sender<FenceFact>>,
    ) -> Self {
        // Canonical root: sysfs links resolve to canonical paths, which must share it.
        let root = std::fs::canonicalize(&config.sysfs_root).unwrap_or(config.sysfs_root.clone());
        UsbSource {
            sysfs: Sysfs::new(root),
            config,
            backend,
            fence,
        }
    }

    /// Hands a fact to the fence (waits for room: decisions must not be skipped).
    async fn tell_fence(&self, fact: FenceFact) {
        if let Some(f) = &self.fence {
            if f.send(fact).await.is_err() {
                tracing::error!("the USB fence is not running; device left undecided");
            }
        }
    }
}

/// What the source remembers between events of one run.
#[derive(Default)]
struct State {
    /// Devices reported attached, by sysfs directory.
    devices: HashMap<PathBuf, UsbDevice>,
    /// Mass-storage devices waiting for their block devices, with their deadline.
    pending: HashMap<PathBuf, (UsbDevice, Instant)>,
    /// The last mount table read.
    mounts: BTreeMap<u64, Mount>,
    /// Volumes reported mounted, by mount id (to describe them when they go).
    volumes: HashMap<u64, Volume>,
}

impl Source for UsbSource {
    fn name(&self) -> &'static str {
        "usb"
    }

    fn run<'a>(&'a mut self, ctx: &'a SourceContext) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(self.run_inner(ctx))
    }
}

impl UsbSource {
    async fn run_inner(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        let mut stream = self
            .backend
            .open()
            .map_err(|e| SourceError::Other(e.to_string()))?;
        let mut state = State::default();
        self.enumerate(ctx, &mut state, true).await?;
        self.rescan_mounts(ctx, &mut state).await?;
        let mut mount_watch = MountWatch::open(&self.config.mountinfo);
        let mut poll = tokio::time::interval(self.config.mount_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_deadline = state.pending.values().map(|(_, d)| *d).min();
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                ev = stream.next() => match ev {
                    Ok(ev) => self.handle_uevent(ctx, &mut state, ev).await?,
                    Err(UeventError::Overflow) => {
                        tracing::warn!("uevent socket overflowed; re-enumerating USB devices");
                        ctx.sink.emit(Event::AgentSourceError(SourceErrorEvent {
                            source: "usb".into(),
                            error: "kernel uevent queue overflowed; devices re-enumerated from sysfs".into(),
                            restart_in_secs: 0,
                        })).await?;
                        self.reconcile(ctx, &mut state).await?;
                    }
                    Err(e) => return Err(SourceError::Other(e.to_string())),
                },
                _ = mount_watch.changed() => self.rescan_mounts(ctx, &mut state).await?,
                _ = poll.tick() => self.rescan_mounts(ctx, &mut state).await?,
                _ = sleep_until_opt(next_deadline) => self.settle(ctx, &mut state, false).await?,
            }
        }
    }

    /// Reports every device in sysfs (at start, `present_at_start = true`).
    async fn enumerate(
        &self,
        ctx: &SourceContext,
        state: &mut State,
        at_start: bool,
    ) -> Result<(), SourceError> {
        let dirs = self
            .sysfs
            .usb_device_dirs()
            .map_err(|e| SourceError::Other(e.to_string()))?;
        for dir in dirs {
            if state.devices.contains_key(&dir) {
                continue;
            }
            match self.sysfs.read_device(&dir, at_start) {
                Ok(dev) => {
                    self.tell_fence(FenceFact::Attached {
                        dir: dir.clone(),
                        device: dev.clone(),
                        at_start,
                        seen: None,
                    })
                    .await;
                    state.devices.insert(dir, dev.clone());
                    ctx.sink.emit(Event::UsbAttached(dev)).await?;
                }
                Err(e) => tracing::warn!(error = %e, "USB device skipped: unreadable sysfs entry"),
            }
        }
        Ok(())
    }

    /// After lost uevents: report what appeared and what vanished.
    async fn reconcile(&self, ctx: &SourceContext, state: &mut State) -> Result<(), SourceError> {
        let present: Vec<PathBuf> = self
            .sysfs
            .usb_device_dirs()
            .map_err(|e| SourceError::Other(e.to_string()))?;
        let gone: Vec<PathBuf> = state
            .devices
            .keys()
            .filter(|d| !present.contains(d))
            .cloned()
            .collect();
        for dir in gone {
            if let Some(dev) = state.devices.remove(&dir) {
                ctx.sink
                    .emit(Event::UsbDetached(detached_from(&dev)))
                    .await?;
            }
        }
        self.enumerate(ctx, state, false).await?;
        self.rescan_mounts(ctx, state).await
    }

    async fn handle_uevent(
        &self,
        ctx: &SourceContext,
        state: &mut State,
        ev: UEvent,
    ) -> Result<(), SourceError> {
        let seen = std::time::Instant::now();
        let devtype = ev.env.get("DEVTYPE").map(String::as_str);
        let dir = self.sysfs.devpath_dir(&ev.devpath);
        match (ev.subsystem.as_str(), devtype, ev.action) {
            ("usb", Some("usb_device"), ActionType::Add) => {
                let dev = match self.sysfs.read_device(&dir, false) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(devpath = %ev.devpath.display(), error = %e, "USB add skipped: unreadable device");
                        return Ok(());
                    }
                };
                // The decision first: it must not wait for block devices.
                self.tell_fence(FenceFact::Attached {
                    dir: dir.clone(),
                    device: dev.clone(),
                    at_start: false,
                    seen: Some(seen),
                })
                .await;
                let waits_for_block = dev.is_mass_storage()
                    && dev.authorized != Some(false)
                    && dev.block_devices.is_empty()
                    && !self.config.storage_settle.is_zero();
                if waits_for_block {
                    let deadline = Instant::now() + self.config.storage_settle;
                    state.pending.insert(dir, (dev, deadline));
                } else {
                    state.devices.insert(dir, dev.clone());
                    ctx.sink.emit(Event::UsbAttached(dev)).await?;
                }
            }
            ("usb", Some("usb_device"), ActionType::Remove) => {
                self.tell_fence(FenceFact::Detached { dir: dir.clone() })
                    .await;
                if let Some((mut dev, _)) = state.pending.remove(&dir) {
                    // Attached and gone within the settle time: still report both.
                    dev.block_devices.clear();
                    ctx.sink.emit(Event::UsbAttached(dev.clone())).await?;
                    state.devices.insert(dir.clone(), dev);
                }
                let detached = match state.devices.remove(&dir) {
                    Some(dev) => detached_from(&dev),
                    None => UsbDetached {
                        port_path: ev
                            .devpath
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        hash: None,
                        vid: None,
                        pid: None,
                        serial: None,
                    },
                };
                ctx.sink.emit(Event::UsbDetached(detached)).await?;
            }
            ("block", Some("disk" | "partition"), ActionType::Add) => {
                if let Some(usb_dir) = self.sysfs.usb_ancestor(&dir) {
                    if let Some(block) = dir.file_name() {
                        self.tell_fence(FenceFact::BlockAdded {
                            usb_dir: usb_dir.clone(),
                            block: block.to_string_lossy().into_owned(),
                        })
                        .await;
                    }
                    if let Some((_, deadline)) = state.pending.get_mut(&usb_dir) {
                        // Partitions follow their disk within milliseconds.
                        let soon = Instant::now() + Duration::from_millis(200);
                        if soon < *deadline {
                            *deadline = soon;
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Reports pending storage devices whose settle time is over (all, if `all`).
    async fn settle(
        &self,
        ctx: &SourceContext,
        state: &mut State,
        all: bool,
    ) -> Result<(), SourceError> {
        let now = Instant::now();
        let due: Vec<PathBuf> = state
            .pending
            .iter()
            .filter(|(_, (_, d))| all || *d <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for dir in due {
            if let Some((mut dev, _)) = state.pending.remove(&dir) {
                dev.block_devices = sysfs::block_devices_under(&dir);
                state.devices.insert(dir, dev.clone());
                ctx.sink.emit(Event::UsbAttached(dev)).await?;
            }
        }
        Ok(())
    }

    async fn rescan_mounts(
        &self,
        ctx: &SourceContext,
        state: &mut State,
    ) -> Result<(), SourceError> {
        let text = match tokio::fs::read_to_string(&self.config.mountinfo).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %self.config.mountinfo.display(), error = %e, "cannot read the mount table");
                return Ok(());
            }
        };
        let table = mounts::parse(&text);
        let (added, removed) = mounts::diff(&state.mounts, &table);
        let removed: Vec<u64> = removed.iter().map(|m| m.id).collect();
        let added: Vec<Mount> = added.into_iter().cloned().collect();
        for id in removed {
            if let Some(vol) = state.volumes.remove(&id) {
                ctx.sink.emit(Event::VolumeUnmounted(vol)).await?;
            }
        }
        for m in added {
            if let Some((usb_dir, vol)) = self.describe_volume(state, &m) {
                // A remount (e.g. to read-only) replaces the old description.
                state.volumes.insert(m.id, vol.clone());
                ctx.sink.emit(Event::VolumeMounted(vol.clone())).await?;
                self.tell_fence(FenceFact::Mounted {
                    usb_dir,
                    volume: vol,
                })
                .await;
            }
        }
        state.mounts = table;
        Ok(())
    }

    /// A mount of a block device that lives on a USB device, described fully.
    fn describe_volume(&self, state: &State, m: &Mount) -> Option<(PathBuf, Volume)> {
        let block_dir = self.sysfs.block_dir(&m.dev)?;
        let usb_dir = self.sysfs.usb_ancestor(&block_dir)?;
        let usb = state
            .devices
            .get(&usb_dir)
            .or_else(|| state.pending.get(&usb_dir).map(|(d, _)| d))
            .cloned()
            .or_else(|| self.sysfs.read_device(&usb_dir, false).ok());
        let block_name = block_dir.file_name()?.to_string_lossy().into_owned();
        let fs_id = fsprobe::probe_device(&self.config.dev_root.join(&block_name));
        Some((
            usb_dir,
            Volume {
                block_device: block_name,
                dev: m.dev.clone(),
                mount_point: m.mount_point.clone(),
                fs_type: m.fs_type.clone(),
                read_only: m.read_only,
                label: fs_id.label,
                uuid: fs_id.uuid,
                usb_port_path: usb.as_ref().map(|u| u.port_path.clone()),
                usb_hash: usb.as_ref().map(|u| u.hash.clone()),
                usb_serial: usb.and_then(|u| u.serial),
            },
        ))
    }
}

fn detached_from(dev: &UsbDevice) -> UsbDetached {
    UsbDetached {
        port_path: dev.port_path.clone(),
        hash: Some(dev.hash.clone()),
        vid: Some(dev.vid.clone()),
        pid: Some(dev.pid.clone()),
        serial: dev.serial.clone(),
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Waits for the kernel's mount-table change notification (`POLLPRI` on mountinfo).
///
/// A small thread polls the file (nix's safe `poll`) and signals a channel of
/// capacity 1; it ends when the watch is dropped. Regular files (fake tables in
/// tests) never signal, so the interval re-read covers them.
struct MountWatch {
    rx: Option<tokio::sync::mpsc::Receiver<()>>,
}

impl MountWatch {
    fn open(path: &Path) -> Self {
        let Ok(file) = std::fs::File::open(path) else {
            return MountWatch { rx: None };
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let spawned = std::thread::Builder::new()
            .name("mount-watch".into())
            .spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                use std::os::fd::AsFd;
                loop {
                    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
                    match poll(&mut fds, PollTimeout::from(1000u16)) {
                        Ok(n) if n > 0 => {
                            let pri = fds[0].revents().is_some_and(|r| {
                                r.intersects(PollFlags::POLLPRI | PollFlags::POLLERR)
                            });
                            if pri && tx.try_send(()).is_err() && tx.is_closed() {
                                return;
                            }
                            if !pri {
                                // Readable-only (a regular file): nothing to wait for.
                                return;
                            }
                        }
                        Ok(_) => {
                            if tx.is_closed() {
                                return;
                            }
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => return,
                    }
                }
            });
        MountWatch {
            rx: spawned.ok().map(|_| rx),
        }
    }

    async fn changed(&mut self) {
        match &mut self.rx {
            Some(rx) => {
                if rx.recv().await.is_none() {
                    self.rx = None;
                }
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sysfs::fake::{add_stick, FakeStick};
    use super::uevent::test_backend::ChannelBackend;
    use super::*;
    use crate::source::{EventSink, Observed};
    use std::collections::HashMap as Map;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn uevent(action: ActionType, devpath: &Path, subsystem: &str, devtype: &str) -> UEvent {
        let mut env = Map::new();
        env.insert("DEVTYPE".to_string(), devtype.to_string());
        UEvent {
            action,
            devpath: devpath.to_path_buf(),
            subsystem: subsystem.into(),
            env,
            seq: 1,
        }
    }

    async fn next(rx: &mut mpsc::Receiver<Observed>) -> Event {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("channel open")
            .event
    }

    #[tokio::test]
    async fn reports_present_devices_hotplug_mounts_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        add_stick(
            &root,
            &FakeStick {
                port: "1-1",
                vid: "0781",
                pid: "5581",
                serial: "OLD",
                classes: &[0x08],
                disk: Some(("sda", "8:0")),
            },
        );
        let mountinfo = root.join("mountinfo");
        std::fs::write(&mountinfo, "").unwrap();
        let (utx, urx) = mpsc::channel(16);
        let config = UsbConfig {
            sysfs_root: root.clone(),
            mountinfo: mountinfo.clone(),
            mount_poll: Duration::from_millis(50),
            dev_root: root.join("dev"),
            storage_settle: Duration::from_millis(100),
        };
        let mut source = UsbSource::new(config, Box::new(ChannelBackend { rx: Some(urx) }), None);
        let (tx, mut rx) = mpsc::channel(64);
        let ctx = SourceContext {
            sink: EventSink::new(tx, Arc::new(AtomicU64::new(0))),
            shutdown: CancellationToken::new(),
        };
        let shutdown = ctx.shutdown.clone();
        let task = tokio::spawn(async move { source.run(&ctx).await.map_err(|e| e.to_string()) });

        // Root hub and the stick present at start.
        let mut seen = Vec::new();
        for _ in 0..2 {
            match next(&mut rx).await {
                Event::UsbAttached(d) => seen.push((d.port_path, d.present_at_start)),
                other => panic!("unexpected {other:?}"),
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            vec![("1-1".to_string(), true), ("usb1".to_string(), true)]
        );

        // Hot-plug: the storage device waits for its block device, then reports it.
        let devpath = add_stick(
            &root,
            &FakeStick {
                port: "1-2",
                vid: "abcd",
                pid: "1234",
                serial: "NEW",
                classes: &[0x08],
                disk: None,
            },
        );
        utx.send(Ok(uevent(ActionType::Add, &devpath, "usb", "usb_device")))
            .await
            .unwrap();
        add_stick(
            &root,
            &FakeStick {
                port: "1-2",
                vid: "abcd",
                pid: "1234",
                serial: "NEW",
                classes: &[0x08],
                disk: Some(("sdb", "8:16")),
            },
        );
        let Event::UsbAttached(d) = next(&mut rx).await else {
            panic!()
        };
        assert_eq!(
            (d.serial.as_deref(), d.present_at_start),
            (Some("NEW"), false)
        );
        assert_eq!(d.block_devices[0].name, "sdb");

        // Mounting its partition is reported with the USB identity.
        std::fs::write(&mountinfo, "90 22 8:17 / /media/x rw - vfat /dev/sdb1 rw\n").unwrap();
        let Event::VolumeMounted(v) = next(&mut rx).await else {
            panic!()
        };
        assert_eq!(
            (v.block_device.as_str(), v.usb_serial.as_deref()),
            ("sdb1", Some("NEW"))
        );
        std::fs::write(&mountinfo, "").unwrap();
        let Event::VolumeUnmounted(v) = next(&mut rx).await else {
            panic!()
        };
        assert_eq!(v.mount_point, "/media/x");

        utx.send(Ok(uevent(
            ActionType::Remove,
            &devpath,
            "usb",
            "usb_device",
        )))
        .await
        .unwrap();
        let Event::UsbDetached(d) = next(&mut rx).await else {
            panic!()
        };
        assert_eq!(d.serial.as_deref(), Some("NEW"));

        // A malformed device is skipped, the source keeps running.
        let bad = add_stick(
            &root,
            &FakeStick {
                port: "1-3",
                vid: "zz",
                pid: "1",
                serial: "X",
                classes: &[],
                disk: None,
            },
        );
        utx.send(Ok(uevent(ActionType::Add, &bad, "usb", "usb_device")))
            .await
            .unwrap();
        utx.send(Ok(uevent(ActionType::Remove, &bad, "usb", "usb_device")))
            .await
            .unwrap();
        let Event::UsbDetached(d) = next(&mut rx).await else {
            panic!()
        };
        assert_eq!((d.port_path.as_str(), d.hash), ("1-3", None));

        shutdown.cancel();
        assert_eq!(task.await.unwrap(), Ok(()));
    }
}
