//! Reading USB device identity and block devices from sysfs.
//!
//! Everything a device reports about itself (strings, serial) is attacker-controlled:
//! reads are size-bounded, strings are stripped of control characters and truncated,
//! and a missing or malformed attribute is an error naming the file, never a panic.
//! The root is configurable so tests can use a fake tree with the same layout.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use ring::digest;
use weilan_config::event::{BlockDevice, UsbDevice, UsbInterface};

/// Longest attribute read from sysfs; real attributes are far shorter.
const MAX_ATTR: u64 = 4096;
/// Longest device-supplied string kept.
const MAX_STRING: usize = 256;
/// Raw descriptors are hashed up to this size (a device can claim up to 64 KiB).
const MAX_DESCRIPTORS: u64 = 65_536;
/// Block devices sit a few levels below the USB device (interface/host/target/lun/block).
const MAX_BLOCK_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unexpected value `{value}`")]
    Malformed { path: PathBuf, value: String },
}

/// A sysfs tree (the real `/sys` or a fake one).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Absolute directory of a kernel `DEVPATH` (`/devices/...`).
    pub fn devpath_dir(&self, devpath: &Path) -> PathBuf {
        let rel = devpath.strip_prefix("/").unwrap_or(devpath);
        self.root.join(rel)
    }

    /// `DEVPATH` of a directory in this tree (inverse of [`Sysfs::devpath_dir`]).
    pub fn devpath_of(&self, dir: &Path) -> Option<PathBuf> {
        dir.strip_prefix(&self.root)
            .ok()
            .map(|rel| Path::new("/").join(rel))
    }

    /// Directories of every USB device (not interfaces), resolved to their real path.
    pub fn usb_device_dirs(&self) -> Result<Vec<PathBuf>, SysfsError> {
        let list = self.root.join("bus/usb/devices");
        let entries = match fs::read_dir(&list) {
            Ok(e) => e,
            // No USB subsystem at all (VMs, containers): no devices.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SysfsError::Io { path: list, source }),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.contains(':') {
                continue; // an interface, e.g. 1-1:1.0
            }
            match fs::canonicalize(entry.path()) {
                Ok(real) if is_usb_device_dir(&real) => out.push(real),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "unreadable USB device entry skipped")
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads the full identity of the USB device in `dir`.
    pub fn read_device(&self, dir: &Path, present_at_start: bool) -> Result<UsbDevice, SysfsError> {
        let port_path = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let vid = hex_id(dir, "idVendor")?;
        let pid = hex_id(dir, "idProduct")?;
        let bcd_device = read_opt(dir, "bcdDevice")?.unwrap_or_default();
        let serial = read_opt(dir, "serial")?.map(|s| clean_string(&s));
        let manufacturer = read_opt(dir, "manufacturer")?.map(|s| clean_string(&s));
        let product = read_opt(dir, "product")?.map(|s| clean_string(&s));
        let device_class = read_hex_u8(dir, "bDeviceClass")?.unwrap_or(0);
        let busnum = read_num(dir, "busnum")?.unwrap_or(0);
        let devnum = read_num(dir, "devnum")?.unwrap_or(0);
        let speed = read_opt(dir, "speed")?;
        let authorized = read_opt(dir, "authorized")?.map(|v| v == "1");
        let descriptors = read_bounded_bytes(&dir.join("descriptors"), MAX_DESCRIPTORS)?;
        // The raw descriptors list every interface even while the device is not
        // authorized (no interface directories exist then): policy needs them first.
        let mut interfaces = descriptors
            .as_deref()
            .map(interfaces_from_descriptors)
            .unwrap_or_default();
        if interfaces.is_empty() {
            interfaces = read_interfaces(dir, &port_path)?;
        }
        let hash = device_hash(
            &vid,
            &pid,
            serial.as_deref(),
            manufacturer.as_deref(),
            product.as_deref(),
            descriptors.as_deref(),
        );
        let parent_hash = dir
            .parent()
            .filter(|p| is_usb_device_dir(p))
            .and_then(|p| self.read_device_hash(p).ok());
        Ok(UsbDevice {
            port_path,
            busnum,
            devnum,
            vid,
            pid,
            bcd_device,
            serial,
            manufacturer,
            product,
            device_class,
            interfaces,
            speed,
            authorized,
            hash,
            parent_hash,
            block_devices: block_devices_under(dir),
            present_at_start,
        })
    }

    fn read_device_hash(&self, dir: &Path) -> Result<String, SysfsError> {
        let serial = read_opt(dir, "serial")?.map(|s| clean_string(&s));
        let manufacturer = read_opt(dir, "manufacturer")?.map(|s| clean_string(&s));
        let product = read_opt(dir, "product")?.map(|s| clean_string(&s));
        let descriptors = read_bounded_bytes(&dir.join("descriptors"), MAX_DESCRIPTORS)?;
        Ok(device_hash(
            &hex_id(dir, "idVendor")?,
            &hex_id(dir, "idProduct")?,
            serial.as_deref(),
            manufacturer.as_deref(),
            product.as_deref(),
            descriptors.as_deref(),
        ))
    }

    /// The directory of the block device `major:minor` (via `dev/block/M:m`).
    pub fn block_dir(&self, dev: &str) -> Option<PathBuf> {
        fs::canonicalize(self.root.join("dev/block").join(dev)).ok()
    }

    /// The USB device a block device belongs to, if any.
    pub fn usb_ancestor(&self, block_dir: &Path) -> Option<PathBuf> {
        let mut cur = block_dir.parent();
        while let Some(dir) = cur {
            if !dir.starts_with(&self.root) || dir == self.root {
                return None;
            }
            if is_usb_device_dir(dir) {
                return Some(dir.to_path_buf());
            }
            cur = dir.parent();
        }
        None
    }
}

/// A USB *device* directory has `idVendor` and `busnum`; interfaces do not.
pub fn is_usb_device_dir(dir: &Path) -> bool {
    dir.join("idVendor").is_file() && dir.join("busnum").is_file()
}

/// Stable identity over what the device says about itself. Like USBGuard's hash it
/// covers the descriptors, so a different device with a copied serial differs.
pub fn device_hash(
    vid: &str,
    pid: &str,
    serial: Option<&str>,
    manufacturer: Option<&str>,
    product: Option<&str>,
    descriptors: Option<&[u8]>,
) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in [
        vid,
        pid,
        serial.unwrap_or(""),
        manufacturer.unwrap_or(""),
        product.unwrap_or(""),
    ] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    if let Some(d) = descriptors {
        ctx.update(&(d.len() as u32).to_be_bytes());
        ctx.update(d);
    }
    hex::encode(ctx.finish().as_ref())
}

fn read_bounded_bytes(path: &Path, max: u64) -> Result<Option<Vec<u8>>, SysfsError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SysfsError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut buf = Vec::new();
    f.take(max)
        .read_to_end(&mut buf)
        .map_err(|source| SysfsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Some(buf))
}

/// An attribute as trimmed text, `None` if absent.
pub fn read_opt(dir: &Path, name: &str) -> Result<Option<String>, SysfsError> {
    Ok(read_bounded_bytes(&dir.join(name), MAX_ATTR)?
        .map(|b| String::from_utf8_lossy(&b).trim().to_string()))
}

fn hex_id(dir: &Path, name: &str) -> Result<String, SysfsError> {
    let path = dir.join(name);
    let v = read_opt(dir, name)?.ok_or_else(|| SysfsError::Io {
        path: path.clone(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let v = v.to_ascii_lowercase();
    if v.len() != 4 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SysfsError::Malformed { path, value: v });
    }
    Ok(v)
}

fn read_hex_u8(dir: &Path, name: &str) -> Result<Option<u8>, SysfsError> {
    match read_opt(dir, name)? {
        None => Ok(None),
        Some(v) => u8::from_str_radix(&v, 16)
            .map(Some)
            .map_err(|_| SysfsError::Malformed {
                path: dir.join(name),
                value: v,
            }),
    }
}

fn read_num<T: std::str::FromStr>(dir: &Path, name: &str) -> Result<Option<T>, SysfsError> {
    match read_opt(dir, name)? {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| SysfsError::Malformed {
            path: dir.join(name),
            value: v,
        }),
    }
}

/// Interface descriptors (type 4) found in raw USB descriptors, alternate setting 0,
/// deduplicated across configurations. Malformed lengths end the walk (never panic).
pub fn interfaces_from_descriptors(raw: &[u8]) -> Vec<UsbInterface> {
    let mut out: Vec<UsbInterface> = Vec::new();
    let mut off = 0;
    while off + 2 <= raw.len() {
        let len = raw[off] as usize;
        if len < 2 || off + len > raw.len() {
            break;
        }
        if raw[off + 1] == 4 && len >= 9 && raw[off + 3] == 0 {
            let i = UsbInterface {
                number: raw[off + 2],
                class: raw[off + 5],
                subclass: raw[off + 6],
                protocol: raw[off + 7],
            };
            if !out.contains(&i) {
                out.push(i);
            }
        }
        off += len;
    }
    out.sort_by_key(|i| i.number);
    out
}

/// Keeps printable characters only and bounds the length.
pub fn clean_string(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_STRING)
        .collect()
}

fn read_interfaces(dir: &Path, port_path: &str) -> Result<Vec<UsbInterface>, SysfsError> {
    let prefix = format!("{port_path}:");
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|source| SysfsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let idir = entry.path();
        let (Some(class), Some(subclass), Some(protocol)) = (
            read_hex_u8(&idir, "bInterfaceClass")?,
            read_hex_u8(&idir, "bInterfaceSubClass")?,
            read_hex_u8(&idir, "bInterfaceProtocol")?,
        ) else {
            continue;
        };
        let number = read_hex_u8(&idir, "bInterfaceNumber")?.unwrap_or(0);
        out.push(UsbInterface {
            number,
            class,
            subclass,
            protocol,
        });
    }
    out.sort_by_key(|i| i.number);
    Ok(out)
}

/// Every disk (with its partitions) found below a USB device directory.
pub fn block_devices_under(dir: &Path) -> Vec<BlockDevice> {
    let mut disks = Vec::new();
    collect_block(dir, 0, &mut disks);
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    disks
}

fn collect_block(dir: &Path, depth: usize, out: &mut Vec<BlockDevice>) {
    if depth > MAX_BLOCK_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // Never follow symlinks (`subsystem`, `driver`, `port` ...): they loop.
        let Ok(ft) = entry.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        let path = entry.path();
        if entry.file_name() == "block" {
            if let Ok(disks) = fs::read_dir(&path) {
                for d in disks.flatten() {
                    if let Some(disk) = read_block(&d.path(), true) {
                        out.push(disk);
                    }
                }
            }
        } else {
            collect_block(&path, depth + 1, out);
        }
    }
}

fn read_block(dir: &Path, with_partitions: bool) -> Option<BlockDevice> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let dev = read_opt(dir, "dev").ok().flatten()?;
    let sectors: u64 = read_opt(dir, "size")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let flag = |n: &str| read_opt(dir, n).ok().flatten().is_some_and(|v| v == "1");
    let mut partitions = Vec::new();
    if with_partitions {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().join("partition").is_file() {
                    if let Some(p) = read_block(&e.path(), false) {
                        partitions.push(p);
                    }
                }
            }
        }
        partitions.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Some(BlockDevice {
        name,
        dev,
        size_bytes: sectors.saturating_mul(512),
        removable: flag("removable"),
        read_only: flag("ro"),
        partitions,
    })
}

#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    //! A fake sysfs tree with the real layout, for unit and end-to-end tests.
    use std::fs;
    use std::path::{Path, PathBuf};

    pub struct FakeStick<'a> {
        pub port: &'a str,
        pub vid: &'a str,
        pub pid: &'a str,
        pub serial: &'a str,
        /// Interface classes, e.g. `[0x08]` for storage, `[0x08, 0x03]` for BadUSB.
        pub classes: &'a [u8],
        /// Disk name (e.g. `sdb`) and `major:minor`, if it has block devices yet.
        pub disk: Option<(&'a str, &'a str)>,
    }

    /// Device descriptor + one configuration with an interface per class.
    pub fn descriptors(classes: &[u8]) -> Vec<u8> {
        let mut d = vec![
            18u8, 1, 0x00, 0x02, 0, 0, 0, 64, 0, 0, 0, 0, 0, 1, 1, 2, 3, 1,
        ];
        let total = 9 + 9 * classes.len();
        d.extend_from_slice(&[9, 2, total as u8, 0, classes.len() as u8, 1, 0, 0x80, 50]);
        for (i, c) in classes.iter().enumerate() {
            d.extend_from_slice(&[9, 4, i as u8, 0, 2, *c, 0x06, 0x50, 0]);
        }
        d
    }

    /// Creates a device under `root/devices/pci0000:00/0000:00:14.0/usb1/` and the
    /// `bus/usb/devices` link; returns the device's DEVPATH.
    pub fn add_stick(root: &Path, s: &FakeStick<'_>) -> PathBuf {
        let hub = root.join("devices/pci0000:00/0000:00:14.0/usb1");
        fs::create_dir_all(&hub).unwrap();
        for (k, v) in [
            ("idVendor", "1d6b"),
            ("idProduct", "0002"),
            ("busnum", "1"),
            ("devnum", "1"),
            ("bDeviceClass", "09"),
        ] {
            fs::write(hub.join(k), format!("{v}\n")).unwrap();
        }
        let dev = hub.join(s.port);
        fs::create_dir_all(&dev).unwrap();
        let attrs = [
            ("idVendor", s.vid),
            ("idProduct", s.pid),
            ("serial", s.serial),
            ("manufacturer", "Fake Corp"),
            ("product", "Fake Stick"),
            ("bcdDevice", "0100"),
            ("bDeviceClass", "00"),
            ("busnum", "1"),
            ("devnum", "5"),
            ("speed", "480"),
            ("authorized", "1"),
        ];
        for (k, v) in attrs {
            fs::write(dev.join(k), format!("{v}\n")).unwrap();
        }
        fs::write(dev.join("descriptors"), descriptors(s.classes)).unwrap();
        for (i, class) in s.classes.iter().enumerate() {
            let idir = dev.join(format!("{}:1.{i}", s.port));
            fs::create_dir_all(&idir).unwrap();
            for (k, v) in [
                ("bInterfaceNumber", format!("{i:02x}")),
                ("bInterfaceClass", format!("{class:02x}")),
                ("bInterfaceSubClass", "06".to_string()),
                ("bInterfaceProtocol", "50".to_string()),
            ] {
                fs::write(idir.join(k), format!("{v}\n")).unwrap();
            }
        }
        if let Some((disk, majmin)) = s.disk {
            let bdir = dev.join(format!(
                "{}:1.0/host0/target0:0:0/0:0:0:0/block/{disk}",
                s.port
            ));
            fs::create_dir_all(&bdir).unwrap();
            fs::write(bdir.join("dev"), format!("{majmin}\n")).unwrap();
            fs::write(bdir.join("size"), "2048\n").unwrap();
            fs::write(bdir.join("removable"), "1\n").unwrap();
            fs::write(bdir.join("ro"), "0\n").unwrap();
            let part = bdir.join(format!("{disk}1"));
            fs::create_dir_all(&part).unwrap();
            let (maj, min) = majmin.split_once(':').unwrap();
            let pmajmin = format!("{maj}:{}", min.parse::<u32>().unwrap() + 1);
            fs::write(part.join("dev"), format!("{pmajmin}\n")).unwrap();
            fs::write(part.join("size"), "2000\n").unwrap();
            fs::write(part.join("partition"), "1\n").unwrap();
            let devblock = root.join("dev/block");
            fs::create_dir_all(&devblock).unwrap();
            let _ = std::os::unix::fs::symlink(&bdir, devblock.join(majmin));
            let _ = std::os::unix::fs::symlink(&part, devblock.join(pmajmin));
        }
        let bus = root.join("bus/usb/devices");
        fs::create_dir_all(&bus).unwrap();
        let _ = std::os::unix::fs::symlink(&dev, bus.join(s.port));
        let _ = std::os::unix::fs::symlink(&hub, bus.join("usb1"));
        Path::new("/").join(dev.strip_prefix(root).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    fn stick(port: &str, serial: &str) -> FakeStick<'static> {
        FakeStick {
            port: Box::leak(port.to_string().into_boxed_str()),
            vid: "0781",
            pid: "5581",
            serial: Box::leak(serial.to_string().into_boxed_str()),
            classes: &[0x08],
            disk: Some(("sdb", "8:16")),
        }
    }

    #[test]
    fn reads_identity_interfaces_and_block_devices() {
        let dir = tempfile::tempdir().unwrap();
        let devpath = add_stick(dir.path(), &stick("1-2", "SER-1"));
        let sysfs = Sysfs::new(dir.path().canonicalize().unwrap());
        let dirs = sysfs.usb_device_dirs().unwrap();
        assert_eq!(dirs.len(), 2, "root hub and stick: {dirs:?}");
        let d = sysfs
            .read_device(&sysfs.devpath_dir(&devpath), true)
            .unwrap();
        assert_eq!((d.vid.as_str(), d.pid.as_str()), ("0781", "5581"));
        assert_eq!(d.serial.as_deref(), Some("SER-1"));
        assert!(d.is_mass_storage());
        assert_eq!(d.block_devices.len(), 1);
        let disk = &d.block_devices[0];
        assert_eq!(
            (disk.name.as_str(), disk.size_bytes, disk.removable),
            ("sdb", 1_048_576, true)
        );
        assert_eq!(disk.partitions[0].name, "sdb1");
        assert!(d.parent_hash.is_some(), "parent is the root hub");
        let block = sysfs.block_dir("8:17").unwrap();
        assert_eq!(
            sysfs.usb_ancestor(&block),
            Some(sysfs.devpath_dir(&devpath))
        );
    }

    #[test]
    fn interfaces_come_from_raw_descriptors_and_garbage_is_harmless() {
        let raw = fake::descriptors(&[0x08, 0x03]);
        let ifs = interfaces_from_descriptors(&raw);
        assert_eq!(
            ifs.iter().map(|i| i.class).collect::<Vec<_>>(),
            vec![0x08, 0x03]
        );
        for cut in 0..raw.len() {
            let _ = interfaces_from_descriptors(&raw[..cut]);
        }
        assert!(interfaces_from_descriptors(&[0, 4, 0, 0]).is_empty());
        assert!(interfaces_from_descriptors(&[255, 4]).is_empty());
    }

    #[test]
    fn hash_is_stable_and_distinguishes_serials() {
        let a = device_hash("0781", "5581", Some("A"), None, None, Some(&[1, 2]));
        assert_eq!(
            a,
            device_hash("0781", "5581", Some("A"), None, None, Some(&[1, 2]))
        );
        assert_ne!(
            a,
            device_hash("0781", "5581", Some("B"), None, None, Some(&[1, 2]))
        );
        assert_ne!(
            a,
            device_hash("0781", "5581", Some("A"), None, None, Some(&[1, 3]))
        );
        // Field boundaries are part of the hash: ("ab","") differs from ("a","b").
        assert_ne!(
            device_hash("0781", "5581", Some("ab"), Some(""), None, None),
            device_hash("0781", "5581", Some("a"), Some("b"), None, None)
        );
    }

    #[test]
    fn malformed_attributes_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let devpath = add_stick(dir.path(), &stick("1-3", "S"));
        let sysfs = Sysfs::new(dir.path());
        let ddir = sysfs.devpath_dir(&devpath);
        fs::write(ddir.join("idVendor"), "zzzzzz").unwrap();
        let err = sysfs.read_device(&ddir, false).unwrap_err().to_string();
        assert!(err.contains("idVendor") && err.contains("zzzzzz"), "{err}");
        fs::write(ddir.join("idVendor"), "0781").unwrap();
        fs::write(ddir.join("product"), "Evil\u{1b}[2J\u{7}Stick").unwrap();
        let d = sysfs.read_device(&ddir, false).unwrap();
        assert_eq!(d.product.as_deref(), Some("Evil[2JStick"));
    }
}
