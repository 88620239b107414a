//! The files guard's Linux enforcer: quarantine (move the file into the agent's
//! root-only evidence store, synced before the original goes), read-only-device (ask
//! the USB fence to switch the device read-only), and removing the empty file a
//! refused `O_CREAT` leaves behind.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use weilan_config::policy::usb::Target;

use super::FileEnforcer;
use crate::fence::FenceControl;

/// The files guard's hands on Linux: moving files into the evidence store and asking
/// the USB fence to switch a device read-only.
pub struct LinuxFileEnforcer {
    /// The USB fence, when it runs on this agent.
    pub fence: Option<mpsc::Sender<FenceControl>>,
}

impl FileEnforcer for LinuxFileEnforcer {
    fn quarantine(
        &self,
        path: &Path,
        evidence_dir: &Path,
        about: serde_json::Value,
    ) -> Result<(PathBuf, String), String> {
        quarantine(path, evidence_dir, about, None)
    }

    fn read_only_device(
        &self,
        device_hash: &str,
        rule_id: &str,
        reason: String,
    ) -> Result<(), String> {
        let fence = self
            .fence
            .as_ref()
            .ok_or("the USB fence is not running on this agent")?;
        fence
            .blocking_send(FenceControl::Override {
                device_hash: device_hash.to_string(),
                target: Target::ReadOnly,
                rule_id: rule_id.to_string(),
                reason,
            })
            .map_err(|_| "the USB fence is not running".to_string())
    }

    fn remove_refused_leftover(&self, path: &Path) -> String {
        remove_refused_leftover(path)
    }
}

/// Moves the regular file `path` into `evidence_dir` (0700, files 0600) with a JSON
/// sidecar (`about`, plus the SHA-256 and the time); returns where it is kept and
/// the SHA-256 of what was kept. With `expect_sha256`, a file whose content differs
/// is left where it is (it changed since it was judged). The copy is synced before
/// the original is removed, so a crash leaves two copies, never none.
pub fn quarantine(
    path: &Path,
    evidence_dir: &Path,
    about: serde_json::Value,
    expect_sha256: Option<&str>,
) -> Result<(PathBuf, String), String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(format!("{} is not a regular file", path.display())),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(evidence_dir)
        .map_err(|e| format!("{}: {e}", evidence_dir.display()))?;
    // An existing directory may have been created with looser permissions.
    std::fs::set_permissions(evidence_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", evidence_dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let stamp = jiff::Timestamp::now().as_millisecond();
    let kept = evidence_dir.join(format!("{stamp}-{name}"));
    let src = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&kept)
        .map_err(|e| format!("{}: {e}", kept.display()))?;
    // Copied by data extents, so a sparse file stays sparse in the store; the hash
    // covers the whole content (holes as zeros).
    let size = src
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0u64;
    let zeros = vec![0u8; 64 * 1024];
    let hash_zeros = |from: u64, to: u64, h: &mut ring::digest::Context| {
        let mut n = to - from;
        while n > 0 {
            let k = n.min(zeros.len() as u64) as usize;
            h.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    for (start, end) in crate::sparse::data_extents(&src, size) {
        hash_zeros(at, start, &mut hasher);
        let mut pos = start;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            let n = src
                .read_at(&mut buf[..want], pos)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            dst.write_all_at(&buf[..n], pos)
                .map_err(|e| format!("{}: {e}", kept.display()))?;
            pos += n as u64;
        }
        at = pos;
    }
    hash_zeros(at, size, &mut hasher);
    dst.set_len(size)
        .map_err(|e| format!("{}: {e}", kept.display()))?;
    dst.sync_all()
        .map_err(|e| format!("{}: {e}", kept.display()))?;
    let sha = hex::encode(hasher.finish().as_ref());
    if let Some(want) = expect_sha256.filter(|w| !w.eq_ignore_ascii_case(&sha)) {
        let _ = std::fs::remove_file(&kept);
        return Err(format!(
            "{} has SHA-256 {sha}, not {want}: it changed since it was judged; left in place",
            path.display()
        ));
    }
    let mut sidecar = about;
    if let Some(m) = sidecar.as_object_mut() {
        m.insert("sha256".into(), sha.clone().into());
        m.insert(
            "quarantined_at".into(),
            jiff::Timestamp::now().to_string().into(),
        );
    }
    let side = kept.with_file_name(format!("{stamp}-{name}.json"));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&side)
        .and_then(|mut f| {
            f.write_all(sidecar.to_string().as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| format!("{}: {e}", side.display()))?;
    std::fs::remove_file(path).map_err(|e| {
        format!(
            "{}: {e} (a copy is kept at {})",
            path.display(),
            kept.display()
        )
    })?;
    Ok((kept, sha))
}

/// Removes the empty file a refused `O_CREAT` leaves behind (fanotify decides after
/// the file was created); says what happened, for the event's detail.
pub fn remove_refused_leftover(path: &Path) -> String {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && m.len() == 0 => match std::fs::remove_file(path) {
            Ok(()) => format!(
                "; the empty {} left by the refused open was removed",
                path.display()
            ),
            Err(e) => format!("; the empty {} could not be removed: {e}", path.display()),
        },
        _ => String::new(),
    }
}
