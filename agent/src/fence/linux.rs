//! The kernel interface of the USB fence: sysfs authorization attributes, the
//! `BLKROSET` ioctl and read-only remounts. The sysfs root is configurable so the
//! same code writes into a fake tree in tests.
#![allow(unsafe_code)] // one ioctl (BLKROSET) through nix's macro; see `set_block_ro`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::UsbEnforcer;

// BLKROSET is _IO(0x12, 93) in <linux/fs.h>.
nix::ioctl_write_ptr_bad!(blkroset, nix::request_code_none!(0x12, 93), libc::c_int);

/// Writes sysfs attributes and block-device flags on the running kernel.
pub struct LinuxEnforcer {
    pub dev_root: PathBuf,
    /// A fake sysfs tree (tests): attribute files are created when missing. On the
    /// real sysfs a missing attribute is an error (the kernel lacks the feature).
    pub create_missing: bool,
}

impl LinuxEnforcer {
    fn write_attr(&self, path: &Path, value: &str) -> Result<(), String> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(self.create_missing)
            .truncate(self.create_missing)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(value.as_bytes())
            .map_err(|e| format!("{} <- {value}: {e}", path.display()))
    }
}

impl UsbEnforcer for LinuxEnforcer {
    fn set_authorized_default(&mut self, hub_dir: &Path, allow: bool) -> Result<(), String> {
        self.write_attr(
            &hub_dir.join("authorized_default"),
            if allow { "1" } else { "0" },
        )
    }

    fn authorize(&mut self, dev_dir: &Path, allow: bool) -> Result<(), String> {
        self.write_attr(&dev_dir.join("authorized"), if allow { "1" } else { "0" })
    }

    fn remove(&mut self, dev_dir: &Path) -> Result<(), String> {
        self.write_attr(&dev_dir.join("remove"), "1")
    }

    fn set_read_only(&mut self, block: &str) -> Result<(), String> {
        let path = self.dev_root.join(block);
        let f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let one: libc::c_int = 1;
        // SAFETY: BLKROSET reads one c_int through the pointer, which points to a
        // live local; the fd is open for the duration of the call.
        unsafe { blkroset(f.as_raw_fd(), &one) }
            .map(|_| ())
            .map_err(|e| format!("BLKROSET {}: {e}", path.display()))
    }

    fn remount_read_only(&mut self, mount_point: &str) -> Result<(), String> {
        use nix::mount::{mount, MsFlags};
        mount(
            None::<&str>,
            mount_point,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("remount {mount_point} read-only: {e}"))
    }
}
