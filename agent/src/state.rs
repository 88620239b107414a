//! The agent's small persistent state: the epoch counter, and the one way every
//! small state file is replaced ([`replace_file`]).
//!
//! Every start takes a new epoch, so `(epoch, seq)` never repeats even though the
//! sequence restarts at 1. The file is replaced atomically (write, fsync, rename).

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
    let epoch = previous + 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_increase_across_starts_and_survive_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_epoch(dir.path()).unwrap(), 1);
        assert_eq!(next_epoch(dir.path()).unwrap(), 2);
        fs::write(dir.path().join("epoch"), "garbage").unwrap();
        assert!(next_epoch(dir.path()).unwrap() > 1_000_000_000);
    }
}
