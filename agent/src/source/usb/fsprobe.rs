//! Filesystem label and UUID without udev/libblkid: read the superblock of the two
//! filesystems removable media actually use (FAT and ext2/3/4). Others report none.

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Label and UUID found on the device, if its filesystem is one we read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FsIdentity {
    pub label: Option<String>,
    pub uuid: Option<String>,
}

/// Reads the first 2 KiB of `device` and probes it.
pub fn probe_device(device: &Path) -> FsIdentity {
    let mut buf = vec![0u8; 2048];
    let n = File::open(device)
        .and_then(|f| {
            let mut n = 0;
            let mut f = f.take(2048);
            loop {
                let r = f.read(&mut buf[n..])?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            Ok(n)
        })
        .unwrap_or(0);
    probe(&buf[..n])
}

/// Probes a superblock image.
pub fn probe(b: &[u8]) -> FsIdentity {
    if let Some(id) = probe_ext(b) {
        return id;
    }
    probe_fat(b).unwrap_or_default()
}

fn text(field: &[u8]) -> Option<String> {
    let s: String = String::from_utf8_lossy(field)
        .trim_end_matches(['\0', ' '])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    (!s.is_empty() && s != "NO NAME").then_some(s)
}

fn probe_ext(b: &[u8]) -> Option<FsIdentity> {
    let sb = b.get(1024..1024 + 136)?;
    if sb[56..58] != [0x53, 0xEF] {
        return None;
    }
    let u = &sb[104..120];
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&u[0..4]),
        hex::encode(&u[4..6]),
        hex::encode(&u[6..8]),
        hex::encode(&u[8..10]),
        hex::encode(&u[10..16])
    );
    Some(FsIdentity {
        label: text(&sb[120..136]),
        uuid: Some(uuid),
    })
}

fn probe_fat(b: &[u8]) -> Option<FsIdentity> {
    if b.len() < 512 || b[510..512] != [0x55, 0xAA] {
        return None;
    }
    // FAT32 keeps its extended boot record at 64, FAT12/16 at 36.
    let (id_at, label_at) = if &b[82..87] == b"FAT32" {
        (67, 71)
    } else if &b[54..57] == b"FAT" {
        (39, 43)
    } else {
        return None;
    };
    let id = u32::from_le_bytes([b[id_at], b[id_at + 1], b[id_at + 2], b[id_at + 3]]);
    Some(FsIdentity {
        label: text(&b[label_at..label_at + 11]),
        uuid: Some(format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fat32_label_and_volume_id() {
        let mut b = vec![0u8; 2048];
        b[510] = 0x55;
        b[511] = 0xAA;
        b[82..87].copy_from_slice(b"FAT32");
        b[67..71].copy_from_slice(&0x1234_ABCDu32.to_le_bytes());
        b[71..82].copy_from_slice(b"SECRETS    ");
        let id = probe(&b);
        assert_eq!(id.label.as_deref(), Some("SECRETS"));
        assert_eq!(id.uuid.as_deref(), Some("1234-ABCD"));
    }

    #[test]
    fn reads_ext4_label_and_uuid_and_ignores_garbage() {
        let mut b = vec![0u8; 2048];
        b[1024 + 56] = 0x53;
        b[1024 + 57] = 0xEF;
        for i in 0..16 {
            b[1024 + 104 + i] = i as u8;
        }
        b[1024 + 120..1024 + 125].copy_from_slice(b"Audit");
        let id = probe(&b);
        assert_eq!(id.label.as_deref(), Some("Audit"));
        assert_eq!(
            id.uuid.as_deref(),
            Some("00010203-0405-0607-0809-0a0b0c0d0e0f")
        );
        assert_eq!(probe(&[0xFFu8; 100]), FsIdentity::default());
    }
}
