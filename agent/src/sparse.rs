//! Reading a file by its data extents (`SEEK_DATA` / `SEEK_HOLE`): a sparse file's
//! holes read as zeros without touching the disk, and its data — wherever it lies, a
//! secret at the end of a 2 GB file with nothing before it included — is what gets
//! hashed and classified. Where the file system cannot say (no `SEEK_DATA`), the whole
//! file is one extent.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::unistd::{lseek, Whence};

/// The byte ranges `[start, end)` of `f` that hold data, in order.
pub fn data_extents(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f;
    let mut out = Vec::new();
    let mut at: u64 = 0;
    while at < size {
        let start = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            // ENXIO: no data after `at` (the rest is a hole).
            Err(nix::errno::Errno::ENXIO) => break,
            // The file system cannot tell: treat the rest as data.
            Err(_) => {
                out.push((at, size));
                break;
            }
        };
        if start >= size {
            break;
        }
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(size),
            Err(_) => size,
        };
        if end <= start {
            break;
        }
        out.push((start, end));
        at = end;
    }
    out
}

/// Feeds every byte of `f` (holes as zeros) to `feed`, up to `max` bytes, reading only
/// the data extents. Returns the bytes fed.
pub fn for_each_chunk(
    f: &File,
    size: u64,
    max: u64,
    buf: &mut [u8],
    mut feed: impl FnMut(&[u8]),
) -> io::Result<u64> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let limit = size.min(max);
    let mut at = 0u64;
    let zeros = |from: u64, to: u64, feed: &mut dyn FnMut(&[u8])| {
        let mut n = to - from;
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            feed(&ZEROS[..k]);
            n -= k as u64;
        }
    };
    for (start, end) in data_extents(f, size) {
        if at >= limit {
            break;
        }
        let (start, end) = (start.min(limit), end.min(limit));
        if start > at {
            zeros(at, start, &mut feed);
        }
        let mut pos = start.max(at);
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            let n = f.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                // Shorter than it said (truncated meanwhile): stop here.
                return Ok(pos);
            }
            feed(&buf[..n]);
            pos += n as u64;
        }
        at = end;
    }
    if at < limit {
        zeros(at, limit, &mut feed);
        at = limit;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn a_sparse_file_is_read_as_its_data_and_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = File::create(&path).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"the secret at the end").unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        let size = f.metadata().unwrap().len();
        let extents = data_extents(&f, size);
        assert_eq!(extents.last().unwrap().1, size);
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        let fed =
            for_each_chunk(&f, size, u64::MAX, &mut buf, |c| seen.extend_from_slice(c)).unwrap();
        assert_eq!(fed, size);
        assert_eq!(
            seen,
            std::fs::read(&path).unwrap(),
            "holes read as zeros, data as data"
        );
        let mut capped = 0u64;
        assert_eq!(
            for_each_chunk(&f, size, 1000, &mut buf, |c| capped += c.len() as u64).unwrap(),
            1000
        );
        assert_eq!(capped, 1000);
    }
}
