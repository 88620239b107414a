//! The mount table (`/proc/self/mountinfo`): parsing and change detection.
//!
//! The kernel signals a change of the mount table by `POLLPRI` on an open mountinfo
//! file; the source waits for that and, as a fallback (fake files in tests, exotic
//! kernels), re-reads on an interval. Either way it diffs the whole table, so a missed
//! notification delays a report but never loses it.

use std::collections::BTreeMap;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub id: u64,
    /// `major:minor` of the mounted device.
    pub dev: String,
    pub mount_point: String,
    /// The directory of the file system mounted here (`/` unless a bind mount of a
    /// subtree).
    pub root: String,
    pub fs_type: String,
    pub source: String,
    pub read_only: bool,
    /// Mounted `noexec`: no program can be started from it.
    pub no_exec: bool,
}

/// Parses mountinfo text; malformed lines are skipped with a warning (never fatal).
pub fn parse(text: &str) -> BTreeMap<u64, Mount> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        match parse_line(line) {
            Some(m) => {
                out.insert(m.id, m);
            }
            None if line.trim().is_empty() => {}
            None => tracing::warn!(line = n + 1, "malformed mountinfo line skipped"),
        }
    }
    out
}

fn parse_line(line: &str) -> Option<Mount> {
    let (pre, post) = line.split_once(" - ")?;
    let pre: Vec<&str> = pre.split(' ').collect();
    let post: Vec<&str> = post.split(' ').collect();
    if pre.len() < 6 || post.len() < 2 {
        return None;
    }
    let options = pre[5];
    Some(Mount {
        id: pre[0].parse().ok()?,
        dev: pre[2].to_string(),
        mount_point: unescape(pre[4]),
        root: unescape(pre[3]),
        fs_type: post[0].to_string(),
        source: unescape(post[1]),
        read_only: options.split(',').any(|o| o == "ro"),
        no_exec: options.split(',').any(|o| o == "noexec"),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts that appeared and disappeared between two tables.
pub fn diff<'a>(
    old: &'a BTreeMap<u64, Mount>,
    new: &'a BTreeMap<u64, Mount>,
) -> (Vec<&'a Mount>, Vec<&'a Mount>) {
    let added = new
        .iter()
        .filter(|(id, m)| old.get(id) != Some(m))
        .map(|(_, m)| m)
        .collect();
    let removed = old
        .iter()
        .filter(|(id, m)| new.get(id) != Some(m))
        .map(|(_, m)| m)
        .collect();
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
        90 22 8:17 / /media/usb\\040stick ro,nosuid - vfat /dev/sdb1 ro,fmask=0022\n\
        garbage line\n";

    #[test]
    fn parses_escapes_and_read_only() {
        let t = parse(TABLE);
        assert_eq!(t.len(), 2);
        let m = &t[&90];
        assert_eq!(m.mount_point, "/media/usb stick");
        assert_eq!(
            (m.dev.as_str(), m.fs_type.as_str(), m.read_only),
            ("8:17", "vfat", true)
        );
    }

    #[test]
    fn diff_reports_added_and_removed() {
        let old = parse(TABLE);
        let mut new = old.clone();
        new.remove(&90);
        let (added, removed) = diff(&old, &new);
        assert!(added.is_empty());
        assert_eq!(removed[0].id, 90);
        let (added, _) = diff(&new, &old);
        assert_eq!(added[0].id, 90);
    }
}
