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
//! so a sequence number the collector has seen is never reused. On open every segment
//! is scanned: a torn or corrupt tail is cut off and counted; records after a corrupt
//! one in the same segment are lost and counted; other segments are kept. Whenever any
//! complete record was lost the journal starts a new epoch, so ids never collide with
//! ones the collector may already hold. Nothing in a damaged journal makes `open` fail:
//! unreadable files are moved aside and reported.
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

use weilan_config::event::{record_hash, Envelope, EventKey, GENESIS_HASH};

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
    /// Bytes of an incomplete final record cut off (a write torn by a crash; such a
    /// record was never synced, so never sent).
    pub torn_bytes: u64,
    /// A new epoch was started.
    pub new_epoch: bool,
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
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// Result of scanning one segment file.
struct Scan {
    valid_bytes: u64,
    first: Option<EventKey>,
    last: Option<EventKey>,
    last_hash: Option<String>,
    records: u64,
    /// Reason the scan stopped early, if it did; `true` when a complete record was bad.
    damage: Option<(String, bool)>,
    /// Complete records found after the damage (counted by resynchronising).
    lost_after: u64,
}

fn parse_record(buf: &[u8]) -> Option<(u64, EventKey)> {
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
    Some((HEADER + len as u64, env.event_id.key))
}

fn scan_segment(data: &[u8]) -> Scan {
    let mut s = Scan {
        valid_bytes: 0,
        first: None,
        last: None,
        last_hash: None,
        records: 0,
        damage: None,
        lost_after: 0,
    };
    let mut off = 0usize;
    while off < data.len() {
        let rest = &data[off..];
        if rest.len() < HEADER as usize {
            s.damage = Some((format!("{} stray bytes at the end", rest.len()), false));
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len == 0 || len > MAX_RECORD as usize {
            s.damage = Some((
                format!("impossible record length {len} at byte {off}"),
                true,
            ));
            break;
        }
        if rest.len() < HEADER as usize + len {
            s.damage = Some((format!("incomplete record at byte {off}"), false));
            break;
        }
        match parse_record(rest) {
            Some((n, key)) => {
                s.first.get_or_insert(key);
                s.last = Some(key);
                s.last_hash = Some(record_hash(&rest[8..8 + len]));
                s.records += 1;
                off += n as usize;
                s.valid_bytes = off as u64;
            }
            None => {
                s.damage = Some((format!("corrupt record at byte {off}"), true));
                break;
            }
        }
    }
    if let Some((_, true)) = s.damage {
        // The damaged record itself was complete: it is lost too, with those behind it.
        s.lost_after = 1 + count_records_after(data, s.valid_bytes + 1);
    }
    s
}

/// Counts intact records from `from` on by resynchronising byte by byte.
fn count_records_after(data: &[u8], from: u64) -> u64 {
    let mut n_found = 0;
    let mut pos = from as usize;
    while pos + HEADER as usize <= data.len() {
        match parse_record(&data[pos..]) {
            Some((n, _)) => {
                n_found += 1;
                pos += n as usize;
            }
            None => pos += 1,
        }
    }
    n_found
}

impl Journal {
    /// Opens (or creates) the journal, recovering from any damage. Never fails because
    /// of the journal's *content*; only for I/O on the directory itself.
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
        // First scan everything, then judge: a damaged segment's loss is measured
        // against the first key of the segment after it.
        let mut scans: Vec<(u64, PathBuf, Vec<u8>, Scan)> = Vec::new();
        let mut damaged = false;
        for id in &ids {
            let path = segment_path(&cfg.dir, *id);
            match fs::read(&path) {
                Ok(data) => {
                    let scan = scan_segment(&data);
                    scans.push((*id, path, data, scan));
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable journal segment moved aside");
                    let _ = fs::rename(&path, path.with_extension("unreadable"));
                    rec.lost.push(Lost {
                        reissue_of: None,
                        stage: "journal".into(),
                        count: 0,
                        first: None,
                        last: None,
                        reason: format!("segment {} unreadable: {e}", path.display()),
                    });
                    damaged = true;
                }
            }
        }
        let acked = read_acked(&cfg.dir);
        let mut segments = BTreeMap::new();
        let mut head: Option<(EventKey, String)> = None;
        let n = scans.len();
        for i in 0..n {
            let next_first = scans.get(i + 1).and_then(|(_, _, _, s)| s.first);
            let (id, path, data, scan) = &scans[i];
            if let Some((why, complete)) = &scan.damage {
                let behind = count_records_after(data, scan.valid_bytes + 1);
                // A torn write can only be the very last record of the newest segment.
                let torn = !complete && i + 1 == n && behind == 0;
                if torn {
                    rec.torn_bytes += data.len() as u64 - scan.valid_bytes;
                    tracing::warn!(path = %path.display(), reason = %why, "torn journal tail truncated");
                } else {
                    damaged = true;
                    let from = scan
                        .last
                        .or(head.as_ref().map(|(k, _)| *k))
                        .map(|k| EventKey {
                            epoch: k.epoch,
                            seq: k.seq + 1,
                        })
                        .or_else(|| {
                            // The very first segment lost everything: it began right
                            // after what was acknowledged (or at the epoch's start).
                            next_first.map(|nf| EventKey {
                                epoch: nf.epoch,
                                seq: acked
                                    .filter(|a| a.epoch == nf.epoch)
                                    .map_or(1, |a| a.seq + 1),
                            })
                        });
                    // Exact when the next segment continues the same epoch.
                    let (count, last) = match (from, next_first) {
                        (Some(f), Some(nf)) if nf.epoch == f.epoch && nf.seq > f.seq => (
                            nf.seq - f.seq,
                            Some(EventKey {
                                epoch: nf.epoch,
                                seq: nf.seq - 1,
                            }),
                        ),
                        _ => (1 + behind, None),
                    };
                    tracing::error!(path = %path.display(), reason = %why, lost = count, "journal segment damaged; valid prefix kept");
                    rec.lost.push(Lost {
                        reissue_of: None,
                        stage: "journal".into(),
                        count,
                        first: from,
                        last,
                        reason: format!("journal segment {}: {why}", path.display()),
                    });
                }
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_err(path))?;
                f.set_len(scan.valid_bytes).map_err(io_err(path))?;
                f.sync_all().map_err(io_err(path))?;
            }
            if let (Some(k), Some(h)) = (scan.last, scan.last_hash.clone()) {
                head = Some((k, h));
            }
            rec.records += scan.records;
            segments.insert(
                *id,
                Segment {
                    path: path.clone(),
                    bytes: scan.valid_bytes,
                    durable: scan.valid_bytes,
                    first: scan.first,
                    last: scan.last,
                    records: scan.records,
                },
            );
        }
        rec.segments = segments.len();
        let (next_key, head_hash) = match head {
            Some((k, h)) if !damaged => (
                EventKey {
                    epoch: k.epoch,
                    seq: k.seq + 1,
                },
                h,
            ),
            _ => {
                // A fresh journal, or one that lost complete records: new key space.
                let epoch = crate::state::next_epoch(&cfg.state_dir)?;
                let epoch = match head {
                    // Never go back below an epoch still present in the journal.
                    Some((k, _)) if k.epoch >= epoch => k.epoch + 1,
                    _ => epoch,
                };
                rec.new_epoch = true;
                (EventKey { epoch, seq: 1 }, GENESIS_HASH.to_string())
            }
        };
        let active_id = ids.last().map_or(1, |l| l + 1);
        let path = segment_path(&cfg.dir, active_id);
        let active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(&cfg.dir);
        segments.insert(
            active_id,
            Segment {
                path,
                bytes: 0,
                durable: 0,
                first: None,
                last: None,
                records: 0,
            },
        );
        let total_bytes = segments.values().map(|s| s.bytes).sum();
        let dir_for_cap = cfg.dir.clone();
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
            cap_lost: read_cap_lost(&dir_for_cap),
            sent_until: None,
            total_bytes,
        };
        j.resume = j.find_resume_position();
        j.delete_acked_segments();
        Ok((j, rec))
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
            self.rotate()?;
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
        self.segments.insert(
            id,
            Segment {
                path,
                bytes: 0,
                durable: 0,
                first: None,
                last: None,
                records: 0,
            },
        );
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
        Ok(())
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

/// A summary of a journal directory without opening it for writing (safe while the
/// agent runs): segments, records, first/last key, acknowledged watermark.
pub fn inspect(dir: &Path) -> io::Result<String> {
    let mut ids: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()?;
            Some((id, e.path()))
        })
        .collect();
    ids.sort();
    let mut out = String::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    let (mut first, mut last) = (None, None);
    for (id, path) in &ids {
        let data = fs::read(path)?;
        let scan = scan_segment(&data);
        records += scan.records;
        bytes += data.len() as u64;
        if first.is_none() {
            first = scan.first;
        }
        if scan.last.is_some() {
            last = scan.last;
        }
        out.push_str(&format!(
            "segment {id:016x}: {} records, {} bytes{}\n",
            scan.records,
            data.len(),
            scan.damage
                .map(|(w, _)| format!(", damaged: {w}"))
                .unwrap_or_default()
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
