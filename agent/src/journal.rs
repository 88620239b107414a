//! The durable journal: every captured event is on disk before it counts as captured,
//! and stays there until the collector acknowledges it.
//!
//! ## Format
//! A directory of segment files `{id:016x}.seg` (ids increase; the newest is the one
//! appended to). A segment is a sequence of records:
//!
//! ```text
//! u32 LE  payload length (1..=MAX_RECORD)
//! u32 LE  CRC-32 of the payload
//! payload the event envelope as JSON — the exact bytes that are sent, hashed and stored
//! ```
//!
//! Each envelope carries `prev_hash`, the SHA-256 of the previous record's payload, so
//! the records form a hash chain the collector verifies: an edited or removed record
//! breaks it visibly.
//!
//! ## Durability and recovery
//! Appends are group-committed: the recorder appends what is queued and calls
//! [`Journal::sync`] once (`fdatasync`). Only synced records are ever read for sending,
//! so a sequence number the collector has seen is never reused. After each sync the
//! newest synced key and hash go to the `head` file (replaced, not synced: after a
//! crash it may lag the journal, never lead it).
//!
//! Every open starts a new epoch (see `state::next_epoch`), whose first record
//! (`agent.epoch_started`, written by the recorder) names the head it continues from.
//! On open every segment is scanned record by record, resynchronising past damage, so
//! every intact record is kept — also those after a bad one — and a damaged segment is
//! rewritten with only its intact records. The losses are then found from the keys
//! alone: a jump between two kept records, an epoch that does not start at 1, an epoch
//! whose tail ends before the next epoch's `previous`, and a journal that ends before
//! the recorded head (records cut off its end while the agent was stopped). Each hole
//! above the acknowledged watermark (and not already reported by the cap) is one
//! [`Lost`] with its exact range: stage `journal` when damaged bytes were found there,
//! `journal-removed` when whole records are simply gone. An incomplete record at the
//! end of the newest segment is a write torn by a crash and costs nothing unless the
//! recorded head says it had been synced. Nothing in a damaged journal makes `open`
//! fail: unreadable files are moved aside and reported.
//!
//! ## A full disk
//! The journal keeps a reserve file (`reserve`, 1 MiB, allocated at open) and a small
//! preallocated counter (`unjournaled`). When the disk is full the recorder stops
//! writing events and counts them with [`Journal::count_unjournaled`]; the count is
//! rewritten in place (no new blocks needed) and synced, so it survives a crash. When
//! space returns — or at stop, after giving up the reserve — one `agent.events_lost`
//! (stage `journal-full`) reports the exact count; a count found at open (the agent died
//! while the disk was full) is reported then.
//!
//! ## Bounds
//! The journal is capped at `max_bytes`: past it the oldest segment is deleted and the
//! unacknowledged events in it are returned as [`Lost`] (exact count and key range),
//! which the recorder reports as `agent.events_lost`. Acknowledged segments are deleted
//! as soon as a newer segment exists; the acknowledged watermark is kept in `acked`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use weilan_config::event::{record_hash, ChainHead, Envelope, Event, EventKey, GENESIS_HASH};

/// Largest record accepted (an envelope is a few KiB at most).
pub const MAX_RECORD: u32 = 1024 * 1024;
const HEADER: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("journal record too large ({0} bytes)")]
    TooLarge(usize),
    #[error("state: {0}")]
    State(#[from] crate::state::StateError),
}

impl JournalError {
    /// The file system under the journal has no space left (or the quota is used up).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, JournalError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

/// Space kept in reserve for the report of a full disk.
pub const RESERVE_BYTES: u64 = 1 << 20;
/// Size of the in-place counter of events a full disk kept out.
const UNJOURNALED_BYTES: usize = 4096;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Where the epoch counter lives (the agent's state directory).
    pub state_dir: PathBuf,
    /// A new segment is started when the current one reaches this size.
    pub segment_bytes: u64,
    /// Upper bound of all segments together.
    pub max_bytes: u64,
    /// Acknowledged segments kept (oldest deleted first) for local replay.
    pub retain_acked_bytes: u64,
}

/// Events that had to be given up, with their exact range where known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Where they were lost (`journal`, `journal-cap`, ...), as in `agent.events_lost`.
    pub stage: String,
    /// For a re-issued report: the key of the report it repeats.
    pub reissue_of: Option<EventKey>,
    pub count: u64,
    pub first: Option<EventKey>,
    pub last: Option<EventKey>,
    pub reason: String,
}

/// Where a record starts: segment id and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// One record read back for sending.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: EventKey,
    pub json: String,
    pub pos: Position,
    /// Position just after this record.
    pub end: Position,
}

#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    /// Bytes known to be on disk (synced).
    durable: u64,
    first: Option<EventKey>,
    last: Option<EventKey>,
    records: u64,
}

/// What `open` found, for the agent to report.
#[derive(Debug, Default)]
pub struct Recovery {
    pub records: u64,
    pub segments: usize,
    /// Complete records lost to corruption (reported as `agent.events_lost`).
    pub lost: Vec<Lost>,
    /// Bytes of incomplete final records cut off (a write torn by a crash; unless the
    /// recorded head says otherwise, such a record was never synced, so never sent).
    pub torn_bytes: u64,
    /// The last record journaled before this start (the new epoch's `previous`).
    pub previous: Option<ChainHead>,
}

pub struct Journal {
    cfg: JournalConfig,
    segments: BTreeMap<u64, Segment>,
    active: File,
    active_id: u64,
    /// Segments written since the last sync (the active one, and one rotated away).
    dirty: Vec<u64>,
    next_key: EventKey,
    head_hash: String,
    acked: Option<EventKey>,
    /// Acks received for ranges beyond the watermark (out of order), first → last.
    pending_acks: BTreeMap<EventKey, EventKey>,
    /// Position of the first record after the watermark.
    resume: Position,
    /// Cumulative cap losses of the current epoch.
    cap_lost: Option<CapLost>,
    /// End of the furthest batch ever sent and not yet acknowledged: the cap does not
    /// delete what may already be stored at the collector (it would count it as lost).
    /// Kept across re-sends: a batch whose ack is late may well be stored.
    sent_until: Option<Position>,
    total_bytes: u64,
    /// The head last written to the `head` file.
    recorded_head: Option<ChainHead>,
    /// The newest synced record (the last epoch's at open).
    durable_head: Option<EventKey>,
    /// Events kept out by a full disk since it filled, and since when.
    unjournaled: (u64, Option<jiff::Timestamp>),
    /// The preallocated counter file (absent if it could not be made).
    unjournaled_file: Option<File>,
}

impl Segment {
    /// A new segment file, nothing written yet.
    fn empty(path: PathBuf) -> Segment {
        Segment {
            path,
            bytes: 0,
            durable: 0,
            first: None,
            last: None,
            records: 0,
        }
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// One intact record found by a scan.
#[derive(Debug, Clone)]
struct Found {
    offset: u64,
    /// Frame length (header + payload).
    len: u64,
    key: EventKey,
    hash: String,
    /// For the first record of an epoch (`agent.epoch_started`): the head the agent
    /// had journaled before it.
    previous: Option<ChainHead>,
    /// Damage found between the previous intact record of the segment and this one.
    damage_before: Vec<String>,
}

/// Result of scanning one segment file: every intact record, resynchronising past
/// damage, so one bad record never costs the good ones behind it.
struct Scan {
    found: Vec<Found>,
    /// What was wrong where (damaged byte ranges between or after intact records).
    damage: Vec<String>,
    /// Damage after the last intact record (an incomplete record included).
    damage_after: Vec<String>,
    /// Bytes after the last intact record that look like a write cut short.
    torn_bytes: u64,
}

impl Scan {
    fn first(&self) -> Option<EventKey> {
        self.found.first().map(|f| f.key)
    }
    fn last(&self) -> Option<EventKey> {
        self.found.last().map(|f| f.key)
    }
    fn intact_bytes(&self) -> u64 {
        self.found.iter().map(|f| f.len).sum()
    }
}

fn parse_record(buf: &[u8]) -> Option<(u64, EventKey)> {
    parse_envelope(buf).map(|(n, env)| (n, env.event_id.key))
}

fn parse_envelope(buf: &[u8]) -> Option<(u64, Envelope)> {
    if buf.len() < HEADER as usize {
        return None;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().ok()?);
    let crc = u32::from_le_bytes(buf[4..8].try_into().ok()?);
    if len == 0 || len > MAX_RECORD || buf.len() < HEADER as usize + len as usize {
        return None;
    }
    let payload = &buf[8..8 + len as usize];
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let env: Envelope = serde_json::from_slice(payload).ok()?;
    Some((HEADER + len as u64, env))
}

fn scan_segment(data: &[u8]) -> Scan {
    let mut s = Scan {
        found: Vec::new(),
        damage: Vec::new(),
        damage_after: Vec::new(),
        torn_bytes: 0,
    };
    let mut pending: Vec<String> = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        if let Some((n, env)) = parse_envelope(&data[off..]) {
            let previous = match &env.event {
                Event::AgentEpochStarted(e) if env.event_id.key.seq == 1 => e.previous.clone(),
                _ => None,
            };
            s.found.push(Found {
                offset: off as u64,
                len: n,
                key: env.event_id.key,
                hash: record_hash(&data[off + 8..off + n as usize]),
                previous,
                damage_before: std::mem::take(&mut pending),
            });
            off += n as usize;
            continue;
        }
        // Resynchronise: the next offset where an intact record starts.
        let next = (off + 1..data.len()).find(|&p| parse_record(&data[p..]).is_some());
        match next {
            Some(p) => {
                pending.push(format!("{} damaged bytes at {off}", p - off));
                off = p;
            }
            None => {
                let rest = &data[off..];
                let len = rest
                    .get(0..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
                let cut_short = match len {
                    None => true,
                    Some(len) => len > 0 && len <= MAX_RECORD as usize && rest.len() < 8 + len,
                };
                if cut_short {
                    s.torn_bytes = rest.len() as u64;
                    pending.push(format!(
                        "{} bytes of an incomplete record at {off}",
                        rest.len()
                    ));
                } else {
                    pending.push(format!(
                        "{} damaged bytes at {off} (to the end)",
                        rest.len()
                    ));
                }
                break;
            }
        }
    }
    s.damage_after = pending;
    s.damage = s
        .found
        .iter()
        .flat_map(|f| f.damage_before.iter().cloned())
        .chain(s.damage_after.iter().cloned())
        .collect();
    s
}

/// The segment scanner as the fuzzer drives it (`fuzz/src/lib.rs`, `journal_segment`),
/// with what must hold of any scan: records inside the data, no byte counted twice.
#[doc(hidden)]
pub fn fuzz_scan_segment(data: &[u8]) {
    let scan = scan_segment(data);
    let mut covered = scan.intact_bytes();
    for f in &scan.found {
        assert!(f.offset + f.len <= data.len() as u64, "record past the end");
    }
    covered += scan.torn_bytes;
    assert!(
        covered <= data.len() as u64,
        "more bytes accounted than read"
    );
    let _ = (scan.first(), scan.last(), scan.damage.len());
}

/// A run of missing keys found when the journal was opened.
struct Hole {
    epoch: u64,
    first: u64,
    last: u64,
    reason: String,
    /// Damaged bytes were found where the records were: corruption. Without any, the
    /// records were removed whole (deliberately, or by a file system losing them).
    damaged: bool,
}

impl Hole {
    /// The loss report for this hole.
    fn into_lost(self) -> Lost {
        Lost {
            reissue_of: None,
            stage: if self.damaged {
                "journal"
            } else {
                "journal-removed"
            }
            .into(),
            count: self.last - self.first + 1,
            first: Some(EventKey {
                epoch: self.epoch,
                seq: self.first,
            }),
            last: Some(EventKey {
                epoch: self.epoch,
                seq: self.last,
            }),
            reason: self.reason,
        }
    }
}

/// An intact record in journal order, as `find_holes` needs it.
struct Seen {
    key: EventKey,
    /// Its epoch's `previous` (first record of an epoch only).
    previous: Option<ChainHead>,
    segment: PathBuf,
    /// Damage found between the previous intact record and this one.
    damage_before: Vec<String>,
}

/// What reading the segments back found: each intact segment, every intact record
/// in journal order, damage not yet placed before a record, and the newest record.
struct ReadBack {
    segments: BTreeMap<u64, Segment>,
    seen: Vec<Seen>,
    carry: Vec<String>,
    head: Option<ChainHead>,
}

/// Reads segments `ids` of `dir` back, keeping every intact record: a damaged
/// segment is rewritten with its intact records only, an unreadable one moved aside.
fn read_segments(dir: &Path, ids: &[u64], rec: &mut Recovery) -> Result<ReadBack, JournalError> {
    let mut segments = BTreeMap::new();
    // Every intact record in journal order, and damage not yet placed before one.
    let mut seen: Vec<Seen> = Vec::new();
    let mut carry: Vec<String> = Vec::new();
    let mut head: Option<ChainHead> = None;
    for id in ids {
        let path = segment_path(dir, *id);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "unreadable journal segment moved aside");
                let _ = fs::rename(&path, path.with_extension("unreadable"));
                carry.push(format!("segment {} unreadable: {e}", path.display()));
                continue;
            }
        };
        let scan = scan_segment(&data);
        if !scan.damage.is_empty() {
            tracing::warn!(path = %path.display(), damage = ?scan.damage, kept = scan.found.len(), "journal segment damaged or cut short; every intact record kept");
        }
        rec.torn_bytes += scan.torn_bytes;
        if scan.intact_bytes() != data.len() as u64 {
            rewrite_intact(&path, &data, &scan.found)?;
        }
        for f in &scan.found {
            let mut damage_before = std::mem::take(&mut carry);
            damage_before.extend(f.damage_before.iter().cloned());
            seen.push(Seen {
                key: f.key,
                previous: f.previous.clone(),
                segment: path.clone(),
                damage_before,
            });
        }
        carry.extend(scan.damage_after.iter().cloned());
        if let Some(f) = scan.found.last() {
            head = Some(ChainHead {
                key: f.key,
                hash: f.hash.clone(),
            });
        }
        rec.records += scan.found.len() as u64;
        let bytes = scan.intact_bytes();
        segments.insert(
            *id,
            Segment {
                path,
                bytes,
                durable: bytes,
                first: scan.first(),
                last: scan.last(),
                records: scan.found.len() as u64,
            },
        );
    }
    Ok(ReadBack {
        segments,
        seen,
        carry,
        head,
    })
}

/// Why records are missing before `r`: the damage found there (true), or none.
fn missing_before(r: &Seen) -> (String, bool) {
    if r.damage_before.is_empty() {
        (
            format!(
                "records removed whole from the journal before {} (segment {}), with no damaged bytes left",
                r.key,
                r.segment.display()
            ),
            false,
        )
    } else {
        (
            format!(
                "journal segment {} damaged before {}: {}",
                r.segment.display(),
                r.key,
                r.damage_before.join("; ")
            ),
            true,
        )
    }
}

/// Finds every run of records the journal should hold and does not: between intact
/// records, at an epoch's start, before an epoch began (its `previous`), and after the
/// last record up to the recorded head. Only keys above the acknowledged watermark
/// count (the collector holds the rest), and not what the cap already reported.
fn find_holes(
    records: &[Seen],
    damage_at_end: &[String],
    acked: Option<EventKey>,
    cap: Option<CapLost>,
    head: Option<&ChainHead>,
) -> Vec<Hole> {
    let mut holes = Vec::new();
    let mut push = |epoch: u64, first: u64, last: u64, (reason, damaged): (String, bool)| {
        let mut first = first;
        if let Some(a) = acked {
            if a.epoch > epoch {
                return;
            }
            if a.epoch == epoch {
                first = first.max(a.seq + 1);
            }
        }
        // Already reported by the cap (it deletes from the oldest unacknowledged).
        let mut last = last;
        if let Some(c) = cap.filter(|c| c.first.epoch == epoch && c.count > 0) {
            let (cf, cl) = (c.first.seq, c.first.seq + c.count - 1);
            if first >= cf && first <= cl {
                first = cl + 1;
            } else if last >= cf && last <= cl {
                last = cf - 1;
            }
        }
        if first <= last {
            holes.push(Hole {
                epoch,
                first,
                last,
                reason,
                damaged,
            });
        }
    };
    let mut prev: Option<EventKey> = acked;
    for r in records {
        let key = r.key;
        match prev {
            Some(p) if key <= p => continue, // a repeated or out-of-order record
            Some(p) if p.epoch == key.epoch => {
                if key.seq > p.seq + 1 {
                    push(key.epoch, p.seq + 1, key.seq - 1, missing_before(r));
                }
            }
            _ => {
                if key.seq > 1 {
                    push(key.epoch, 1, key.seq - 1, missing_before(r));
                }
                if let (Some(p), Some(pv)) = (prev, &r.previous) {
                    if pv.key.epoch == p.epoch && pv.key.seq > p.seq {
                        let (reason, damaged) = missing_before(r);
                        push(
                            p.epoch,
                            p.seq + 1,
                            pv.key.seq,
                            (
                                format!(
                                    "epoch {} ends at {p} in the journal, but the next epoch began after {}; {reason}",
                                    p.epoch, pv.key
                                ),
                                damaged,
                            ),
                        );
                    }
                }
            }
        }
        prev = Some(key);
    }
    if let Some(h) = head {
        let end = prev;
        if end.is_none_or(|e| h.key > e) {
            let from = match end {
                Some(e) if e.epoch == h.key.epoch => e.seq + 1,
                _ => 1,
            };
            let end_text = end.map_or("(nothing)".to_string(), |e| e.to_string());
            let reason = if damage_at_end.is_empty() {
                format!("the journal ends at {end_text} but had recorded up to {}: its newest records were removed whole", h.key)
            } else {
                format!(
                    "the journal ends at {end_text} but had recorded up to {}: {}",
                    h.key,
                    damage_at_end.join("; ")
                )
            };
            push(
                h.key.epoch,
                from,
                h.key.seq,
                (reason, !damage_at_end.is_empty()),
            );
        }
    }
    holes
}

/// Rewrites `path` with only the intact records (durably, via a temporary file).
fn rewrite_intact(path: &Path, data: &[u8], found: &[Found]) -> Result<(), JournalError> {
    let mut out = Vec::with_capacity(data.len());
    for f in found {
        out.extend_from_slice(&data[f.offset as usize..(f.offset + f.len) as usize]);
    }
    let tmp = path.with_extension("rewrite");
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&out).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

impl Journal {
    /// Opens (or creates) the journal, recovering from any damage, and starts a new
    /// epoch. Never fails because of the journal's *content*; only for I/O on the
    /// directory itself.
    pub fn open(cfg: JournalConfig) -> Result<(Journal, Recovery), JournalError> {
        fs::create_dir_all(&cfg.dir).map_err(io_err(&cfg.dir))?;
        let mut rec = Recovery::default();
        let mut ids: Vec<u64> = fs::read_dir(&cfg.dir)
            .map_err(io_err(&cfg.dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".seg")?;
                u64::from_str_radix(id, 16).ok()
            })
            .collect();
        ids.sort_unstable();
        let acked = read_acked(&cfg.dir);
        let cap_lost = read_cap_lost(&cfg.dir);
        let recorded_head = read_head(&cfg.dir);
        let ReadBack {
            mut segments,
            seen,
            carry,
            head,
        } = read_segments(&cfg.dir, &ids, &mut rec)?;
        sync_dir(&cfg.dir);
        for hole in find_holes(&seen, &carry, acked, cap_lost, recorded_head.as_ref()) {
            let count = hole.last - hole.first + 1;
            tracing::error!(epoch = hole.epoch, first = hole.first, last = hole.last, count, reason = %hole.reason, "journal records lost");
            rec.lost.push(hole.into_lost());
        }
        // A count left by a run that ended while the disk was full stays pending until
        // its report is in the journal.
        let (unjournaled_file, unjournaled) = match prepare_unjournaled(&cfg.dir) {
            Ok((file, pending)) => (Some(file), pending),
            Err(e) => {
                tracing::error!(error = %e, "no counter for events a full disk keeps out: such a count would not survive a crash");
                (None, (0, None))
            }
        };
        if let Err(e) = ensure_reserve(&cfg.dir) {
            tracing::error!(error = %e, "no space reserved for the report of a full disk");
        }
        rec.segments = segments.len();
        // The head this epoch continues from: the journal's, or the recorded one
        // when records after it were lost.
        let previous = match (head, recorded_head) {
            (Some(j), Some(h)) if h.key > j.key => Some(h),
            (None, h) => h,
            (j, _) => j,
        };
        let epoch = crate::state::next_epoch(&cfg.state_dir)?;
        // Never go back below an epoch still present in the journal.
        let epoch = match &previous {
            Some(p) if p.key.epoch >= epoch => p.key.epoch + 1,
            _ => epoch,
        };
        rec.previous = previous;
        let next_key = EventKey { epoch, seq: 1 };
        let head_hash = GENESIS_HASH.to_string();
        let active_id = ids.last().map_or(1, |l| l + 1);
        let path = segment_path(&cfg.dir, active_id);
        let active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(&cfg.dir);
        segments.insert(active_id, Segment::empty(path));
        let total_bytes = segments.values().map(|s| s.bytes).sum();
        let mut j = Journal {
            cfg,
            segments,
            active,
            active_id,
            dirty: Vec::new(),
            next_key,
            head_hash,
            acked,
            pending_acks: BTreeMap::new(),
            resume: Position {
                segment: 0,
                offset: 0,
            },
            cap_lost,
            sent_until: None,
            total_bytes,
            recorded_head: rec.previous.clone(),
            durable_head: rec.previous.as_ref().map(|p| p.key),
            unjournaled,
            unjournaled_file,
        };
        j.resume = j.find_resume_position();
        j.delete_acked_segments();
        Ok((j, rec))
    }

    /// Counts `n` events a full disk kept out of the journal (rewritten in place and
    /// synced, so the count survives a crash).
    pub fn count_unjournaled(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        let now = jiff::Timestamp::now();
        self.unjournaled.0 += n;
        let since = *self.unjournaled.1.get_or_insert(now);
        if let Some(f) = &self.unjournaled_file {
            if let Err(e) = write_unjournaled(f, self.unjournaled.0, Some(since)) {
                tracing::error!(error = %e, "could not record the count of events a full disk kept out");
            }
        }
    }

    /// Events a full disk has kept out and not yet reported.
    pub fn unjournaled(&self) -> u64 {
        self.unjournaled.0
    }

    /// Whether the file system has room again for records (beyond the reserve).
    pub fn has_room(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.cfg.dir).is_ok_and(|s| {
            s.blocks_available().saturating_mul(s.fragment_size()) >= 2 * RESERVE_BYTES
        })
    }

    /// The report of what a full disk kept out (stage `journal-full`), to append.
    /// The count is forgotten only by [`Journal::unjournaled_reported`].
    pub fn unjournaled_report(&self) -> Option<Lost> {
        let (count, since) = self.unjournaled;
        (count > 0).then(|| Lost {
            stage: "journal-full".into(),
            reissue_of: None,
            count,
            first: None,
            last: None,
            reason: format!(
                "the disk under the journal was full from {} to {}: {count} events could not be journaled",
                since.map_or("?".to_string(), |t| t.to_string()),
                jiff::Timestamp::now()
            ),
        })
    }

    /// The report is durable in the journal: forget the count, restore the reserve.
    pub fn unjournaled_reported(&mut self) {
        self.unjournaled = (0, None);
        if let Some(f) = &self.unjournaled_file {
            let _ = write_unjournaled(f, 0, None);
        }
        if let Err(e) = ensure_reserve(&self.cfg.dir) {
            tracing::warn!(error = %e, "space reserve not restored yet");
        }
    }

    /// Gives up the reserve so the report of a full disk fits (at stop).
    pub fn release_reserve(&mut self) {
        let _ = fs::remove_file(self.cfg.dir.join("reserve"));
    }

    /// The newest record made durable (what a batch reports as the journal's head).
    pub fn durable_head(&self) -> Option<EventKey> {
        self.durable_head
    }

    /// The key the next appended event gets.
    pub fn next_key(&self) -> EventKey {
        self.next_key
    }

    pub fn acked(&self) -> Option<EventKey> {
        self.acked
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Records appended and not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        let total: u64 = self.segments.values().map(|s| s.records).sum();
        match self.acked {
            Some(a) => {
                self.segments
                    .values()
                    .filter(|s| s.first.is_some_and(|f| f > a))
                    .map(|s| s.records)
                    .sum::<u64>()
                    + self
                        .segments
                        .values()
                        .filter(|s| {
                            s.first.is_some_and(|f| f <= a) && s.last.is_some_and(|l| l > a)
                        })
                        .map(|s| match (s.first, s.last) {
                            (Some(f), Some(l)) if l.epoch == a.epoch && f.epoch == a.epoch => {
                                l.seq - a.seq
                            }
                            _ => s.records,
                        })
                        .sum::<u64>()
            }
            None => total,
        }
    }

    /// Appends `env` (its key and `prev_hash` are set here). Not durable until
    /// [`Journal::sync`]. Returns the losses caused by staying under the cap.
    pub fn append(&mut self, mut env: Envelope) -> Result<Vec<Lost>, JournalError> {
        env.event_id.key = self.next_key;
        env.prev_hash = std::mem::take(&mut self.head_hash);
        let json = serde_json::to_vec(&env).map_err(|e| JournalError::Io {
            path: "(serialize)".into(),
            source: io::Error::other(e),
        });
        let json = match json {
            Ok(j) => j,
            Err(e) => {
                self.head_hash = env.prev_hash;
                return Err(e);
            }
        };
        if json.len() > MAX_RECORD as usize {
            self.head_hash = env.prev_hash;
            return Err(JournalError::TooLarge(json.len()));
        }
        let mut frame = Vec::with_capacity(json.len() + 8);
        frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
        frame.extend_from_slice(&json);
        if let Err(e) = self.active.write_all(&frame) {
            // Undo a partial write so the segment stays well-formed.
            let seg = &self.segments[&self.active_id];
            let _ = self.active.set_len(seg.bytes);
            self.head_hash = env.prev_hash;
            return Err(io_err(&seg.path.clone())(e));
        }
        let key = self.next_key;
        self.head_hash = record_hash(&json);
        self.next_key.seq += 1;
        let seg = self
            .segments
            .get_mut(&self.active_id)
            .expect("active segment");
        seg.bytes += frame.len() as u64;
        seg.first.get_or_insert(key);
        seg.last = Some(key);
        seg.records += 1;
        self.total_bytes += frame.len() as u64;
        if !self.dirty.contains(&self.active_id) {
            self.dirty.push(self.active_id);
        }
        if seg.bytes >= self.cfg.segment_bytes {
            // The record is written: a failed rotation (a full disk) only means the
            // segment grows until the next append tries again.
            if let Err(e) = self.rotate() {
                tracing::warn!(error = %e, "journal segment not rotated; retried at the next append");
            }
        }
        Ok(self.enforce_cap())
    }

    fn rotate(&mut self) -> Result<(), JournalError> {
        let id = self.active_id + 1;
        let path = segment_path(&self.cfg.dir, id);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // The previous segment is synced with the next group commit (it is in `dirty`).
        self.active = file;
        self.active_id = id;
        self.segments.insert(id, Segment::empty(path));
        sync_dir(&self.cfg.dir);
        Ok(())
    }

    /// Makes everything appended so far durable; only then is it readable for sending.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        for id in std::mem::take(&mut self.dirty) {
            let Some(seg) = self.segments.get_mut(&id) else {
                continue;
            };
            if id == self.active_id {
                self.active.sync_data().map_err(io_err(&seg.path))?;
            } else if let Ok(f) = File::open(&seg.path) {
                f.sync_data().map_err(io_err(&seg.path))?;
            }
            seg.durable = seg.bytes;
        }
        if self.next_key.seq > 1 {
            self.durable_head = Some(EventKey {
                epoch: self.next_key.epoch,
                seq: self.next_key.seq - 1,
            });
        }
        self.record_head();
        Ok(())
    }

    /// Writes the synced head to the `head` file (atomically, not synced: after a
    /// crash it may lag the journal, never lead it), so records removed from the end
    /// of the journal while the agent is stopped are found and counted at the next start.
    fn record_head(&mut self) {
        if self.next_key.seq <= 1 {
            return;
        }
        let key = EventKey {
            epoch: self.next_key.epoch,
            seq: self.next_key.seq - 1,
        };
        if self.recorded_head.as_ref().is_some_and(|h| h.key == key) {
            return;
        }
        let head = ChainHead {
            key,
            hash: self.head_hash.clone(),
        };
        let tmp = self.cfg.dir.join("head.tmp");
        let written = fs::write(&tmp, format!("{} {}\n", head.key, head.hash))
            .and_then(|()| fs::rename(&tmp, self.cfg.dir.join("head")));
        match written {
            Ok(()) => self.recorded_head = Some(head),
            Err(e) => tracing::warn!(error = %e, "could not record the journal head"),
        }
    }

    /// Past the cap, deletes the oldest segments; returns the unacked events lost.
    ///
    /// Cap reports are cumulative per epoch (total and range so far, persisted in
    /// `cap-lost`), so a report that is itself deleted by a later pass loses nothing:
    /// the next one supersedes it. Other loss reports caught in a deleted segment are
    /// re-issued, marked with the key of the report they repeat.
    fn enforce_cap(&mut self) -> Vec<Lost> {
        let mut reissued = Vec::new();
        let mut deleted_last = None;
        while self.total_bytes > self.cfg.max_bytes && self.segments.len() > 1 {
            let Some((&id, _)) = self.segments.iter().next() else {
                break;
            };
            if id == self.active_id {
                break;
            }
            if self.sent_until.is_some_and(|s| s.segment >= id) && self.resume.segment <= id {
                // In flight: wait for the ack (the cap is exceeded by at most the
                // uplink's window of unacknowledged batches).
                break;
            }
            let Some(seg) = self.segments.remove(&id) else {
                break;
            };
            reissued.extend(
                self.unacked_loss_reports(&seg)
                    .into_iter()
                    .filter(|l| l.stage != "journal-cap"),
            );
            self.total_bytes -= seg.bytes;
            let _ = fs::remove_file(&seg.path);
            if self.resume.segment == id {
                self.resume = Position {
                    segment: id + 1,
                    offset: 0,
                };
                self.advance_resume_to_existing();
            }
            let (Some(first), Some(last)) = (seg.first, seg.last) else {
                continue;
            };
            // Only what the collector has not acknowledged is lost.
            let unacked_first = match self.acked {
                Some(a) if a >= last => continue,
                Some(a) if a >= first && a.epoch == first.epoch => EventKey {
                    epoch: a.epoch,
                    seq: a.seq + 1,
                },
                _ => first,
            };
            let count = if unacked_first.epoch == last.epoch {
                last.seq - unacked_first.seq + 1
            } else {
                seg.records
            };
            let cap = self.cap_lost.get_or_insert(CapLost {
                epoch: last.epoch,
                count: 0,
                first: unacked_first,
            });
            if cap.epoch != last.epoch {
                *cap = CapLost {
                    epoch: last.epoch,
                    count: 0,
                    first: unacked_first,
                };
            }
            cap.count += count;
            deleted_last = Some(last);
        }
        if let (Some(last), Some(cap)) = (deleted_last, self.cap_lost) {
            write_cap_lost(&self.cfg.dir, &cap);
            reissued.push(Lost {
                stage: "journal-cap".into(),
                reissue_of: None,
                count: cap.count,
                first: Some(cap.first),
                last: Some(last),
                reason: "journal cap reached: oldest unacknowledged events deleted (cumulative for this epoch)".into(),
            });
        }
        reissued
    }

    /// `agent.events_lost` records in `seg` the collector has not acknowledged.
    fn unacked_loss_reports(&self, seg: &Segment) -> Vec<Lost> {
        let Ok(f) = File::open(&seg.path) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut off = 0;
        while off < seg.bytes {
            let Some((n, key, json)) = read_at(&f, off) else {
                break;
            };
            off += n;
            if self.acked.is_some_and(|a| key <= a) || !json.contains("\"agent.events_lost\"") {
                continue;
            }
            if let Ok(env) = serde_json::from_str::<Envelope>(&json) {
                if let weilan_config::event::Event::AgentEventsLost(l) = env.event {
                    out.push(Lost {
                        reissue_of: Some(l.reissue_of.unwrap_or(key)),
                        stage: l.stage,
                        count: l.count,
                        first: l.first,
                        last: l.last,
                        reason: l.reason,
                    });
                }
            }
        }
        out
    }

    fn advance_resume_to_existing(&mut self) {
        if !self.segments.contains_key(&self.resume.segment) {
            if let Some((id, _)) = self.segments.range(self.resume.segment..).next() {
                self.resume = Position {
                    segment: *id,
                    offset: 0,
                };
            }
        }
    }

    /// The uplink sent everything before `end`.
    pub fn mark_sent(&mut self, end: Position) {
        if self.sent_until.is_none_or(|s| end > s) {
            self.sent_until = Some(end);
        }
    }

    /// Records the collector's acknowledgement of `first..=last`. The watermark moves
    /// only over the oldest unacknowledged records, so out-of-order acks wait.
    pub fn ack(&mut self, first: EventKey, last: EventKey) {
        if self.acked.is_some_and(|a| last <= a) || last < first {
            return;
        }
        self.pending_acks.insert(first, last);
        let before = self.acked;
        while let Some(next) = self.first_unacked_key() {
            let cover = self
                .pending_acks
                .iter()
                .find(|(f, l)| **f <= next && next <= **l)
                .map(|(f, l)| (*f, *l));
            let Some((f, l)) = cover else { break };
            self.pending_acks.remove(&f);
            self.acked = Some(l);
            self.advance_resume();
        }
        if let Some(a) = self.acked {
            self.pending_acks.retain(|_, l| *l > a);
        }
        if self.sent_until.is_some_and(|s| self.resume >= s) {
            self.sent_until = None;
        }
        if self.acked != before {
            if let Some(a) = self.acked {
                write_acked(&self.cfg.dir, a);
            }
            self.delete_acked_segments();
        }
    }

    /// Key of the record at the resume position, if it is durable.
    fn first_unacked_key(&self) -> Option<EventKey> {
        let seg = self.segments.get(&self.resume.segment)?;
        if self.resume.offset >= seg.durable {
            // End of this segment: the next one, if any.
            let (id, next) = self.segments.range(self.resume.segment + 1..).next()?;
            let _ = id;
            return next.first.filter(|_| next.durable > 0);
        }
        let f = File::open(&seg.path).ok()?;
        read_at(&f, self.resume.offset).map(|(_, k, _)| k)
    }

    /// Moves the resume position past every record at or below the watermark.
    fn advance_resume(&mut self) {
        let Some(a) = self.acked else { return };
        loop {
            let seg = match self.segments.get(&self.resume.segment) {
                Some(seg) if self.resume.offset < seg.durable => seg,
                current => {
                    // Past this segment's durable end, or the segment is gone: go on
                    // at the next one, if there is one.
                    let from = self.resume.segment + u64::from(current.is_some());
                    match self.segments.range(from..).next() {
                        Some((id, _)) => {
                            self.resume = Position {
                                segment: *id,
                                offset: 0,
                            };
                            continue;
                        }
                        None => return,
                    }
                }
            };
            let Ok(f) = File::open(&seg.path) else { return };
            let mut off = self.resume.offset;
            while off < seg.durable {
                match read_at(&f, off) {
                    Some((n, key, _)) if key <= a => off += n,
                    _ => break,
                }
            }
            self.resume.offset = off;
            if off < seg.durable {
                return;
            }
        }
    }

    /// Deletes segments whose records are all acknowledged (never the newest), oldest
    /// first, beyond `retain_acked_bytes`.
    fn delete_acked_segments(&mut self) {
        let Some(acked) = self.acked else { return };
        let done: Vec<(u64, u64)> = self
            .segments
            .iter()
            .filter(|(id, s)| **id != self.active_id && s.last.is_none_or(|l| l <= acked))
            .map(|(id, s)| (*id, s.bytes))
            .collect();
        let mut retained: u64 = done.iter().map(|(_, b)| b).sum();
        for (id, bytes) in done {
            if retained <= self.cfg.retain_acked_bytes {
                break;
            }
            if let Some(seg) = self.segments.remove(&id) {
                self.total_bytes -= seg.bytes;
                let _ = fs::remove_file(&seg.path);
            }
            retained -= bytes;
        }
    }

    /// The position of the first record after the acknowledged watermark: where
    /// sending starts after a (re)connect.
    pub fn resume_position(&self) -> Position {
        self.resume
    }

    fn find_resume_position(&self) -> Position {
        for (id, seg) in &self.segments {
            match (seg.last, self.acked) {
                (Some(l), Some(a)) if l <= a => continue,
                (None, _) => continue,
                _ => {}
            }
            // Walk the segment to the first unacked record.
            let mut off = 0;
            if let (Some(a), Ok(f)) = (self.acked, File::open(&seg.path)) {
                while off < seg.durable {
                    match read_at(&f, off) {
                        Some((n, key, _)) if key <= a => off += n,
                        _ => break,
                    }
                }
            }
            return Position {
                segment: *id,
                offset: off,
            };
        }
        Position {
            segment: self.active_id,
            offset: self.segments.get(&self.active_id).map_or(0, |s| s.durable),
        }
    }

    /// Reads up to `max` durable records from `from`: a contiguous run of one epoch
    /// (it stops before a key that does not follow the previous one), at most
    /// `max_bytes` of JSON.
    pub fn read(&self, from: Position, max: usize, max_bytes: usize) -> Vec<Record> {
        let mut out: Vec<Record> = Vec::new();
        let mut bytes = 0;
        let mut pos = from;
        // A deleted segment (cap) means resuming at the oldest one still there.
        if !self.segments.contains_key(&pos.segment) {
            match self.segments.range(pos.segment..).next() {
                Some((id, _)) => {
                    pos = Position {
                        segment: *id,
                        offset: 0,
                    }
                }
                None => return out,
            }
        }
        for (id, seg) in self.segments.range(pos.segment..) {
            let mut off = if *id == pos.segment { pos.offset } else { 0 };
            let Ok(f) = File::open(&seg.path) else {
                continue;
            };
            while off < seg.durable && out.len() < max && bytes < max_bytes {
                let Some((n, key, json)) = read_at(&f, off) else {
                    break;
                };
                if let Some(prev) = out.last() {
                    if key.epoch != prev.key.epoch || key.seq != prev.key.seq + 1 {
                        return out;
                    }
                }
                bytes += json.len();
                out.push(Record {
                    key,
                    json,
                    pos: Position {
                        segment: *id,
                        offset: off,
                    },
                    end: Position {
                        segment: *id,
                        offset: off + n,
                    },
                });
                off += n;
            }
            if out.len() >= max || bytes >= max_bytes || off < seg.durable {
                break;
            }
        }
        out
    }
}

fn read_at(f: &File, off: u64) -> Option<(u64, EventKey, String)> {
    let mut header = [0u8; 8];
    f.read_exact_at(&mut header, off).ok()?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let mut buf = vec![0u8; HEADER as usize + len as usize];
    buf[..8].copy_from_slice(&header);
    f.read_exact_at(&mut buf[8..], off + HEADER).ok()?;
    let (n, key) = parse_record(&buf)?;
    let json = String::from_utf8(buf[8..].to_vec()).ok()?;
    Some((n, key, json))
}

/// Cumulative cap losses of one epoch.
#[derive(Debug, Clone, Copy)]
struct CapLost {
    epoch: u64,
    count: u64,
    first: EventKey,
}

fn read_cap_lost(dir: &Path) -> Option<CapLost> {
    let text = fs::read_to_string(dir.join("cap-lost")).ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>());
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(Ok(epoch)), Some(Ok(count)), Some(Ok(fe)), Some(Ok(fs_))) => Some(CapLost {
            epoch,
            count,
            first: EventKey {
                epoch: fe,
                seq: fs_,
            },
        }),
        _ => None,
    }
}

/// Synced: a cumulative total that went backwards would under-report.
fn write_cap_lost(dir: &Path, c: &CapLost) {
    let tmp = dir.join("cap-lost.tmp");
    let ok = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(
                format!(
                    "{} {} {} {}\n",
                    c.epoch, c.count, c.first.epoch, c.first.seq
                )
                .as_bytes(),
            )?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, dir.join("cap-lost")));
    if let Err(e) = ok {
        tracing::error!(error = %e, "could not persist the cumulative cap-loss count");
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Makes sure `reserve` holds `RESERVE_BYTES` of allocated space.
fn ensure_reserve(dir: &Path) -> io::Result<()> {
    let path = dir.join("reserve");
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)?;
    nix::fcntl::posix_fallocate(&f, 0, RESERVE_BYTES as i64).map_err(io::Error::from)?;
    f.sync_all()
}

/// Opens (making and preallocating it if needed) the counter of events a full disk
/// kept out, with the count a previous run left unreported and since when.
#[allow(clippy::type_complexity)]
fn prepare_unjournaled(dir: &Path) -> io::Result<(File, (u64, Option<jiff::Timestamp>))> {
    let path = dir.join("unjournaled");
    let text = fs::read_to_string(&path).unwrap_or_default();
    let f = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(&path)?;
    nix::fcntl::posix_fallocate(&f, 0, UNJOURNALED_BYTES as i64).map_err(io::Error::from)?;
    let mut it = text.split_whitespace();
    let count: u64 = it.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let since = it.next().and_then(|s| s.parse().ok());
    if count > 0 {
        tracing::error!(count, "the last run ended while the disk was full: its count of events kept out is reported now");
    }
    Ok((
        f,
        (
            count,
            since.or_else(|| (count > 0).then(jiff::Timestamp::now)),
        ),
    ))
}

/// Rewrites the counter in place (same length, so no new blocks) and syncs it.
fn write_unjournaled(f: &File, count: u64, since: Option<jiff::Timestamp>) -> io::Result<()> {
    let line = format!(
        "{count} {}\n",
        since.map_or("-".to_string(), |t| t.to_string())
    );
    let mut buf = vec![b' '; UNJOURNALED_BYTES];
    buf[..line.len()].copy_from_slice(line.as_bytes());
    f.write_all_at(&buf, 0)?;
    f.sync_data()
}

fn read_head(dir: &Path) -> Option<ChainHead> {
    let text = fs::read_to_string(dir.join("head")).ok()?;
    let (key, hash) = text.trim().split_once(' ')?;
    let (e, s) = key.split_once(':')?;
    Some(ChainHead {
        key: EventKey {
            epoch: e.parse().ok()?,
            seq: s.parse().ok()?,
        },
        hash: hash.to_string(),
    })
}

fn read_acked(dir: &Path) -> Option<EventKey> {
    let text = fs::read_to_string(dir.join("acked")).ok()?;
    let (e, s) = text.trim().split_once(':')?;
    Some(EventKey {
        epoch: e.parse().ok()?,
        seq: s.parse().ok()?,
    })
}

/// The watermark is an optimisation (fewer re-sends after a restart), so it is
/// replaced atomically but not synced: losing it only causes duplicates, which the
/// collector ignores.
fn write_acked(dir: &Path, key: EventKey) {
    let tmp = dir.join("acked.tmp");
    if fs::write(&tmp, format!("{}:{}\n", key.epoch, key.seq)).is_ok() {
        let _ = fs::rename(&tmp, dir.join("acked"));
    }
}

/// Resets the acknowledged watermark so everything in the journal is sent again
/// (operator command; the collector stores nothing twice).
pub fn reset_acked(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join("acked")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every intact record after the acknowledged watermark, in journal order, without
/// opening the journal for writing (safe while the agent runs: what it appends later
/// is simply not in this read). One segment is in memory at a time. Returns the
/// watermark the read started after.
pub fn for_each_unacked(
    dir: &Path,
    mut each: impl FnMut(EventKey, &str) -> io::Result<()>,
) -> io::Result<Option<EventKey>> {
    let acked = read_acked(dir);
    for (_, path) in segment_files(dir)? {
        let data = fs::read(&path)?;
        for f in scan_segment(&data).found {
            if acked.is_some_and(|a| f.key <= a) {
                continue;
            }
            let payload = &data[(f.offset + HEADER) as usize..(f.offset + f.len) as usize];
            // scan_segment parsed it as JSON, so it is UTF-8.
            if let Ok(json) = std::str::from_utf8(payload) {
                each(f.key, json)?;
            }
        }
    }
    Ok(acked)
}

/// The segment files of a journal directory, oldest first.
fn segment_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut ids: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()?;
            Some((id, e.path()))
        })
        .collect();
    ids.sort();
    Ok(ids)
}

/// A summary of a journal directory without opening it for writing (safe while the
/// agent runs): segments, records, first/last key, acknowledged watermark.
pub fn inspect(dir: &Path) -> io::Result<String> {
    let ids = segment_files(dir)?;
    let mut out = String::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    let (mut first, mut last) = (None, None);
    for (id, path) in &ids {
        let data = fs::read(path)?;
        let scan = scan_segment(&data);
        records += scan.found.len() as u64;
        bytes += data.len() as u64;
        if first.is_none() {
            first = scan.first();
        }
        if scan.last().is_some() {
            last = scan.last();
        }
        out.push_str(&format!(
            "segment {id:016x}: {} records, {} bytes{}\n",
            scan.found.len(),
            data.len(),
            if scan.damage.is_empty() {
                String::new()
            } else {
                format!(", damaged: {}", scan.damage.join("; "))
            }
        ));
    }
    let show = |k: Option<EventKey>| k.map_or("-".to_string(), |k| k.to_string());
    out.push_str(&format!(
        "records {records}\nbytes {bytes}\nfirst {}\nlast {}\nacked {}\n",
        show(first),
        show(last),
        show(read_acked(dir))
    ));
    Ok(out)
}

#[cfg(test)]
mod tests;
