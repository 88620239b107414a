//! The agent's small persistent state: the epoch counter, the installation id, and
//! the one way every small state file is replaced ([`replace_file`]).
//!
//! Every start takes a new epoch, so `(epoch, seq)` never repeats even though the
//! sequence restarts at 1. An epoch is above the previous one *and* at least the start
//! time in Unix milliseconds: a re-installed agent (state directory wiped) or one whose
//! state directory was restored from an older copy (VM snapshot, backup) still takes
//! an epoch no earlier run of it used. The file is replaced atomically (write, fsync,
//! rename).

use std::fs;
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct StateError {
    pub path: String,
    pub source: std::io::Error,
}

/// Replaces `path` with `bytes` atomically and durably: written to a temporary file
/// of mode `mode` beside it, synced, renamed over it. A crash leaves the old content
/// or the new, never a torn file.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Reads, increments and durably stores the epoch; returns the new one.
pub fn next_epoch(state_dir: &Path) -> Result<u64, StateError> {
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| StateError { path, source }
    };
    fs::create_dir_all(state_dir).map_err(err(state_dir))?;
    let file = state_dir.join("epoch");
    let previous = match fs::read_to_string(&file) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                // Never reuse an epoch: fall back to the clock, which only grows.
                let fallback = jiff::Timestamp::now().as_second().max(0) as u64;
                tracing::error!(path = %file.display(), content = %s.trim(), fallback, "epoch file corrupt; continuing from the clock");
                fallback
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(err(&file)(e)),
    };
    let now_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
    let epoch = (previous + 1).max(now_ms);
    let tmp = state_dir.join("epoch.tmp");
    let mut f = fs::File::create(&tmp).map_err(err(&tmp))?;
    f.write_all(format!("{epoch}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(err(&tmp))?;
    fs::rename(&tmp, &file).map_err(err(&file))?;
    if let Ok(d) = fs::File::open(state_dir) {
        let _ = d.sync_all();
    }
    Ok(epoch)
}

/// The installation id (made at the first start with this state directory) and
/// whether it was made now.
pub fn installation(state_dir: &Path) -> Result<(String, bool), StateError> {
    let file = state_dir.join("installation");
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| StateError { path, source }
    };
    match fs::read_to_string(&file) {
        Ok(s) if is_installation_id(s.trim()) => return Ok((s.trim().to_string(), false)),
        Ok(s) => {
            tracing::error!(path = %file.display(), content = %s.trim(), "installation id corrupt; making a new one (the collector will report a re-installation)");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(&file)(e)),
    }
    fs::create_dir_all(state_dir).map_err(err(state_dir))?;
    let id = hex::encode(rand::random::<[u8; 16]>());
    replace_file(&file, format!("{id}\n").as_bytes(), 0o644).map_err(err(&file))?;
    Ok((id, true))
}

fn is_installation_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_increase_across_starts_and_survive_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let now_ms = jiff::Timestamp::now().as_millisecond() as u64;
        let first = next_epoch(dir.path()).unwrap();
        assert!(first >= now_ms, "an epoch is at least the start time in ms");
        assert!(next_epoch(dir.path()).unwrap() > first);
        // Far ahead of the clock (many quick restarts): still increasing.
        fs::write(
            dir.path().join("epoch"),
            format!("{}\n", now_ms + 10_000_000),
        )
        .unwrap();
        assert_eq!(next_epoch(dir.path()).unwrap(), now_ms + 10_000_001);
        // A state directory restored from an old copy: the clock keeps it ahead of
        // every epoch used since the copy was made.
        fs::write(dir.path().join("epoch"), "5\n").unwrap();
        assert!(next_epoch(dir.path()).unwrap() >= now_ms);
        fs::write(dir.path().join("epoch"), "garbage").unwrap();
        assert!(next_epoch(dir.path()).unwrap() > 1_000_000_000);
    }

    #[test]
    fn the_installation_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (id, new) = installation(dir.path()).unwrap();
        assert!(new && id.len() == 32);
        assert_eq!(installation(dir.path()).unwrap(), (id.clone(), false));
        fs::write(dir.path().join("installation"), "x").unwrap();
        let (other, new) = installation(dir.path()).unwrap();
        assert!(new && other != id, "a corrupt id is replaced, and says so");
    }
}
