//! Journal tests: round trip, chain, acks, cap accounting, recovery, and a
//! randomised damage campaign (truncations and bit flips).

use super::*;
use rand::{Rng, SeedableRng};
use weilan_config::event::{AgentStopping, Event, EventId};

fn cfg(dir: &Path, segment_bytes: u64, max_bytes: u64) -> JournalConfig {
    JournalConfig {
        dir: dir.join("journal"),
        state_dir: dir.to_path_buf(),
        segment_bytes,
        max_bytes,
        retain_acked_bytes: 0,
    }
}

fn env(i: u64) -> Envelope {
    Envelope {
        schema: 1,
        event_id: EventId {
            agent_id: "ws-1".into(),
            key: EventKey { epoch: 0, seq: 0 },
        },
        time: jiff::Timestamp::UNIX_EPOCH,
        host_role: "workstation".into(),
        site: None,
        prev_hash: String::new(),
        event: Event::AgentStopping(AgentStopping {
            reason: format!("event number {i} with some padding to make records realistic"),
        }),
    }
}

fn fill(j: &mut Journal, n: u64) -> Vec<Lost> {
    let mut lost = Vec::new();
    for i in 0..n {
        lost.extend(j.append(env(i)).unwrap());
    }
    j.sync().unwrap();
    lost
}

fn read_all(j: &Journal) -> Vec<Record> {
    let mut out = Vec::new();
    let mut pos = j.resume_position();
    loop {
        let batch = j.read(pos, 1000, usize::MAX);
        let Some(last) = batch.last() else { break };
        pos = last.end;
        out.extend(batch);
    }
    out
}

#[test]
fn records_round_trip_with_a_hash_chain_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, rec) = Journal::open(cfg(dir.path(), 4096, 1 << 30)).unwrap();
    assert_eq!(rec.previous, None, "a fresh journal continues from nothing");
    let epoch = j.next_key().epoch;
    fill(&mut j, 50);
    let records = read_all(&j);
    assert_eq!(records.len(), 50);
    let mut prev = GENESIS_HASH.to_string();
    for (i, r) in records.iter().enumerate() {
        let e: Envelope = serde_json::from_str(&r.json).unwrap();
        assert_eq!(
            e.event_id.key,
            EventKey {
                epoch,
                seq: i as u64 + 1
            }
        );
        assert_eq!(e.prev_hash, prev, "record {i} links to its predecessor");
        prev = record_hash(r.json.as_bytes());
    }
    drop(j);
    let (mut j, rec) = Journal::open(cfg(dir.path(), 4096, 1 << 30)).unwrap();
    assert_eq!(rec.records, 50);
    assert!(rec.lost.is_empty(), "{:?}", rec.lost);
    assert_eq!(
        rec.previous,
        Some(ChainHead {
            key: EventKey { epoch, seq: 50 },
            hash: prev.clone()
        }),
        "the new epoch names the last record of the one before"
    );
    assert!(j.next_key().epoch > epoch, "every start takes a new epoch");
    assert_eq!(j.next_key().seq, 1);
    fill(&mut j, 1);
    let last = read_all(&j).pop().unwrap();
    let e: Envelope = serde_json::from_str(&last.json).unwrap();
    assert_eq!(
        e.prev_hash, GENESIS_HASH,
        "each epoch's chain starts afresh"
    );
}

#[test]
fn records_cut_off_the_end_while_stopped_are_counted_from_the_recorded_head() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    let epoch = j.next_key().epoch;
    fill(&mut j, 40);
    drop(j);
    // Cut the newest 7 records exactly at a record boundary: no torn bytes, no damage.
    assert_eq!(keep_first_records(dir.path(), 33), 40);
    let (j, rec) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!(rec.torn_bytes, 0);
    assert_eq!(rec.lost.len(), 1, "{:?}", rec.lost);
    let lost = &rec.lost[0];
    assert_eq!(
        (lost.count, lost.first, lost.last),
        (
            7,
            Some(EventKey { epoch, seq: 34 }),
            Some(EventKey { epoch, seq: 40 })
        )
    );
    assert!(
        lost.reason.contains("newest records were removed"),
        "{}",
        lost.reason
    );
    assert_eq!(
        lost.stage, "journal-removed",
        "no damaged bytes: removed whole"
    );
    assert_eq!(
        rec.previous.map(|p| p.key),
        Some(EventKey { epoch, seq: 40 }),
        "the next epoch says where the journal really ended"
    );
    assert_eq!(read_all(&j).len(), 33);
}

#[test]
fn records_removed_at_the_end_of_an_older_epoch_are_counted_from_the_next_epochs_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    let first_epoch = j.next_key().epoch;
    fill(&mut j, 20);
    drop(j);
    let (mut j, rec) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    // What the recorder writes first in every epoch.
    j.append(Envelope {
        event: Event::AgentEpochStarted(weilan_config::event::EpochStarted {
            installation: "0".repeat(32),
            installation_new: false,
            previous: rec.previous.clone(),
        }),
        ..env(0)
    })
    .unwrap();
    fill(&mut j, 5);
    drop(j);
    // Remove the last 4 records of the first epoch (an older segment now).
    assert_eq!(keep_first_records(dir.path(), 16), 20);
    let (j, rec) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!(rec.lost.len(), 1, "{:?}", rec.lost);
    assert_eq!(
        (rec.lost[0].count, rec.lost[0].first),
        (
            4,
            Some(EventKey {
                epoch: first_epoch,
                seq: 17
            })
        )
    );
    assert_eq!(read_all(&j).len(), 16 + 6);
}

#[test]
fn unsynced_records_are_never_read_for_sending() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    j.append(env(0)).unwrap();
    assert!(read_all(&j).is_empty());
    j.sync().unwrap();
    assert_eq!(read_all(&j).len(), 1);
}

#[test]
fn acks_move_the_watermark_in_order_and_delete_acked_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(dir.path(), 2048, 1 << 30)).unwrap();
    let epoch = j.next_key().epoch;
    fill(&mut j, 100);
    let segs_before = j.segments.len();
    let k = |s| EventKey { epoch, seq: s };
    // Out of order: 51..=100 first; nothing moves until 1..=50 arrives.
    j.ack(k(51), k(100));
    assert_eq!(j.acked(), None);
    j.ack(k(1), k(50));
    assert_eq!(j.acked(), Some(k(100)));
    assert!(j.segments.len() < segs_before);
    assert!(read_all(&j).is_empty(), "nothing left to send");
    drop(j);
    let (j, _) = Journal::open(cfg(dir.path(), 2048, 1 << 30)).unwrap();
    assert_eq!(j.acked(), Some(k(100)));
    assert!(
        read_all(&j).is_empty(),
        "acked records are not re-sent after a restart"
    );
    reset_acked(&dir.path().join("journal")).unwrap();
    let (j, _) = Journal::open(cfg(dir.path(), 2048, 1 << 30)).unwrap();
    assert_eq!(
        read_all(&j).len() as u64,
        j.segments.values().map(|s| s.records).sum::<u64>()
    );
}

#[test]
fn the_cap_reports_exactly_the_unacked_events_it_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(dir.path(), 2048, 8192)).unwrap();
    let epoch = j.next_key().epoch;
    let lost = fill(&mut j, 400);
    // Cap reports are cumulative: the last one counts everything.
    let lost_total: u64 = lost.last().unwrap().count;
    let kept = read_all(&j);
    assert_eq!(
        kept.len() as u64 + lost_total,
        400,
        "kept + reported lost = appended"
    );
    // The lost ranges are exactly the keys missing before the first kept one.
    let first_kept = kept[0].key.seq;
    assert_eq!(lost_total, first_kept - 1);
    assert_eq!(lost[0].first, Some(EventKey { epoch, seq: 1 }));
    assert!(j.total_bytes() <= 8192 + 2048);
    drop(j);
    // What the cap reported is not reported again as a hole at the next start.
    let (_, rec) = Journal::open(cfg(dir.path(), 2048, 8192)).unwrap();
    assert!(rec.lost.is_empty(), "{:?}", rec.lost);
}

#[test]
fn readers_stop_at_a_gap_so_every_batch_is_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    fill(&mut j, 3);
    j.next_key.seq += 5; // as if records had been removed
    fill(&mut j, 2);
    let first = j.read(j.resume_position(), 100, usize::MAX);
    assert_eq!(first.len(), 3);
    let second = j.read(first[2].end, 100, usize::MAX);
    assert_eq!(second[0].key.seq, 9);
}

/// Segment files and the records each holds (as written).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir.join("journal"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .map(|e| (e.path(), fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

/// Cuts the oldest non-empty segment after its first `n` records, exactly at a
/// record boundary (as an insider would); returns how many it had.
fn keep_first_records(dir: &Path, n: usize) -> usize {
    let (path, data) = snapshot(dir)
        .into_iter()
        .find(|(_, d)| !d.is_empty())
        .unwrap();
    let recs = records_of(&data);
    let keep: usize = recs[..n].iter().map(Vec::len).sum();
    fs::write(&path, &data[..keep]).unwrap();
    recs.len()
}

fn records_of(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some((n, _)) = parse_record(&data[off..]) {
        out.push(data[off..off + n as usize].to_vec());
        off += n as usize;
    }
    out
}

#[test]
fn a_thousand_random_truncations_and_bit_flips_never_stop_the_agent() {
    let master = tempfile::tempdir().unwrap();
    {
        let (mut j, _) = Journal::open(cfg(master.path(), 3000, 1 << 30)).unwrap();
        fill(&mut j, 120);
    }
    let original = snapshot(master.path());
    let head = fs::read(master.path().join("journal/head")).unwrap();
    let original_records: Vec<Vec<Vec<u8>>> = original.iter().map(|(_, d)| records_of(d)).collect();
    let total: usize = original_records.iter().map(Vec::len).sum();
    assert_eq!(total, 120);
    let nonempty: Vec<usize> = (0..original.len())
        .filter(|i| !original[*i].1.is_empty())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let (mut flips, mut truncations, mut newest_cut) = (0, 0, 0);
    for round in 0..1000 {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("journal")).unwrap();
        fs::write(dir.path().join("journal/head"), &head).unwrap();
        let victim = nonempty[rng.random_range(0..nonempty.len())];
        // The original records a damaged segment still holds intact.
        let mut expected_kept = total;
        let mut flipped = false;
        for (i, (path, data)) in original.iter().enumerate() {
            let mut data = data.clone();
            if i == victim {
                let recs = &original_records[i];
                // Exactly 500 truncations and 500 bit flips.
                if round % 2 == 0 {
                    let at = rng.random_range(0..data.len());
                    data.truncate(at);
                    truncations += 1;
                    if *nonempty.last().unwrap() == i {
                        newest_cut += 1;
                    }
                    let mut end = 0;
                    let whole = recs
                        .iter()
                        .take_while(|r| {
                            end += r.len();
                            end <= at
                        })
                        .count();
                    expected_kept -= recs.len() - whole;
                } else {
                    let at = rng.random_range(0..data.len());
                    data[at] ^= 1 << rng.random_range(0..8);
                    flips += 1;
                    flipped = true;
                    expected_kept -= 1; // exactly the record holding the flipped bit
                }
            }
            fs::write(
                dir.path().join("journal").join(path.file_name().unwrap()),
                data,
            )
            .unwrap();
        }
        let (j, rec) = Journal::open(cfg(dir.path(), 3000, 1 << 30))
            .unwrap_or_else(|e| panic!("round {round}: open failed: {e}"));
        // Every intact record is kept, as written, and nothing else.
        let kept_now = snapshot(dir.path());
        let mut kept = 0;
        for (path, data) in &kept_now {
            let Some(idx) = original
                .iter()
                .position(|(p, _)| p.file_name() == path.file_name())
            else {
                assert!(
                    data.is_empty(),
                    "round {round}: new segment {path:?} is not empty"
                );
                continue;
            };
            let recs = records_of(data);
            assert!(
                recs.iter().all(|r| original_records[idx].contains(r)),
                "round {round}: segment {path:?} holds a record that was never written"
            );
            assert_eq!(
                recs.iter().map(Vec::len).sum::<usize>(),
                data.len(),
                "round {round}: the damaged bytes were removed"
            );
            kept += recs.len();
        }
        assert_eq!(
            kept, expected_kept,
            "round {round}: every intact record after the damage is kept"
        );
        assert_eq!(
            read_all(&j).len(),
            kept,
            "round {round}: every kept record is read for sending"
        );
        let reported: u64 = rec.lost.iter().map(|l| l.count).sum();
        assert_eq!(
            kept as u64 + reported,
            total as u64,
            "round {round}: kept {kept} + reported {reported} != {total}: {:?}",
            rec.lost
        );
        assert!(
            rec.lost
                .iter()
                .all(|l| l.first.is_some() && l.last.is_some()),
            "round {round}: every loss has its exact range"
        );
        if flipped {
            assert!(
                rec.lost.iter().all(|l| l.stage == "journal"),
                "round {round}: a flipped bit is damage, not a removal: {:?}",
                rec.lost
            );
        }
        // It keeps working: a new record can be appended and read back.
        drop(j);
        let (mut j, _) = Journal::open(cfg(dir.path(), 3000, 1 << 30)).unwrap();
        j.append(env(999)).unwrap();
        j.sync().unwrap();
    }
    println!("{flips} bit flips, {truncations} truncations ({newest_cut} of the newest segment): every loss reported exactly");
    assert!(
        flips == 500 && truncations == 500 && newest_cut >= 20,
        "{flips} flips, {truncations} truncations, {newest_cut} of the newest segment"
    );
}

#[test]
fn a_count_of_events_a_full_disk_kept_out_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    assert!(
        dir.path().join("journal/reserve").exists(),
        "space is reserved"
    );
    j.count_unjournaled(5);
    j.count_unjournaled(2);
    assert_eq!(j.unjournaled(), 7);
    drop(j); // killed while the disk was full: no report was written
    let (j, _) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!(j.unjournaled(), 7, "still to be reported");
    drop(j); // and killed again before reporting it
    let (mut j, _) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    let report = j.unjournaled_report().unwrap();
    assert_eq!((report.stage.as_str(), report.count), ("journal-full", 7));
    j.append(env(0)).unwrap();
    j.sync().unwrap();
    j.unjournaled_reported();
    drop(j);
    let (j, _) = Journal::open(cfg(dir.path(), 1 << 20, 1 << 30)).unwrap();
    assert_eq!(j.unjournaled(), 0, "reported once");
}
