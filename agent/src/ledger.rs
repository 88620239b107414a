//! The capture ledger: how many events the sources handed to the recorder and how
//! many the recorder accounted for (journaled, or reported lost), kept in a small
//! memory-mapped file in the state directory.
//!
//! An event a source has queued is not yet on disk: a `kill -9` (or a crash) between
//! the two loses it. The ledger makes that loss exact instead of silent: the counters
//! live in shared file pages, which the kernel keeps when the process dies, so the
//! next start reads how many were queued but never accounted for and reports them
//! (`agent.events_lost`, stage `crash`). Updating a counter is one atomic add on
//! mapped memory — no system call. (A power loss can lose the last counter updates
//! with the page cache; the journal's own recovery covers what was on disk.)
#![allow(unsafe_code)] // one shared mapping of a 4 KiB file; see `CaptureLedger::open`.

use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::mman::{mmap, MapFlags, ProtFlags};

const LEDGER_BYTES: usize = 4096;
/// Identifies a ledger file (and its layout).
const MAGIC: u64 = 0x5745_494c_414e_4c31; // "WEILANL1"

/// Counters in the mapped page, in this order.
#[derive(Debug)]
#[repr(C)]
struct Counters {
    magic: AtomicU64,
    /// Events a source put into the pipeline.
    queued: AtomicU64,
    /// Of those, how many the recorder journaled (or accounted for as lost).
    accounted: AtomicU64,
    /// Events a source could not queue (pipeline full).
    dropped: AtomicU64,
    /// Of those, how many the recorder reported in an `agent.events_lost`.
    drops_reported: AtomicU64,
}

#[derive(Debug)]
pub struct CaptureLedger {
    counters: &'static Counters,
}

#[derive(Debug, thiserror::Error)]
#[error("capture ledger {path}: {reason}")]
pub struct LedgerError {
    path: String,
    reason: String,
}

impl CaptureLedger {
    /// Maps the ledger (made if missing) and returns it with the number of events
    /// the previous run queued but never accounted for; the counters start over.
    pub fn open(state_dir: &Path) -> Result<(CaptureLedger, u64), LedgerError> {
        let path = state_dir.join("capture-ledger");
        let err = |reason: String| LedgerError {
            path: path.display().to_string(),
            reason,
        };
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| err(e.to_string()))?;
        nix::fcntl::posix_fallocate(&file, 0, LEDGER_BYTES as i64)
            .map_err(|e| err(format!("allocate: {e}")))?;
        // SAFETY: a shared, read-write mapping of a file this process keeps at 4 KiB
        // (allocated above); it is never unmapped (leaked for the process's life), so
        // the `'static` reference below stays valid. The page is page-aligned, so the
        // `AtomicU64`s are aligned; all access goes through atomics, and another
        // process touching the file can only change numbers, never memory safety.
        let ptr: NonNull<std::ffi::c_void> = unsafe {
            mmap(
                None,
                NonZeroUsize::new(LEDGER_BYTES).expect("nonzero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .map_err(|e| err(format!("mmap: {e}")))?;
        // SAFETY: see above; `Counters` is five `AtomicU64`s (40 bytes) within the page.
        let counters: &'static Counters = unsafe { &*(ptr.as_ptr() as *const Counters) };
        let lost = if counters.magic.load(Ordering::Acquire) == MAGIC {
            let queued = counters.queued.load(Ordering::Acquire);
            let accounted = counters.accounted.load(Ordering::Acquire);
            let dropped = counters.dropped.load(Ordering::Acquire);
            let reported = counters.drops_reported.load(Ordering::Acquire);
            queued.saturating_sub(accounted) + dropped.saturating_sub(reported)
        } else {
            0 // new (or not ours): nothing to account for
        };
        for c in [
            &counters.queued,
            &counters.accounted,
            &counters.dropped,
            &counters.drops_reported,
        ] {
            c.store(0, Ordering::Release);
        }
        counters.magic.store(MAGIC, Ordering::Release);
        Ok((CaptureLedger { counters }, lost))
    }

    /// A source queued one event.
    pub fn queued(&self) {
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// A source could not queue `n` events (pipeline full, a kernel queue overflow).
    pub fn dropped(&self, n: u64) {
        self.counters.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// The recorder made `n` queued events durable (or reported them lost).
    pub fn accounted(&self, n: u64) {
        self.counters.accounted.fetch_add(n, Ordering::Release);
    }

    /// The recorder reported `n` pipeline drops in a durable `agent.events_lost`.
    pub fn drops_reported(&self, n: u64) {
        self.counters.drops_reported.fetch_add(n, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_queued_and_never_accounted_for_is_found_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (l, lost) = CaptureLedger::open(dir.path()).unwrap();
        assert_eq!(lost, 0);
        for _ in 0..10 {
            l.queued();
        }
        l.accounted(7);
        l.dropped(2);
        l.drops_reported(1);
        // "Killed": no cleanup; the counters are in the file's pages.
        let (_, lost) = CaptureLedger::open(dir.path()).unwrap();
        assert_eq!(lost, 3 + 1);
        let (_, lost) = CaptureLedger::open(dir.path()).unwrap();
        assert_eq!(lost, 0, "each run starts over");
    }
}
