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
    assert!(rec.new_epoch);
    fill(&mut j, 50);
    let records = read_all(&j);
    assert_eq!(records.len(), 50);
    let mut prev = GENESIS_HASH.to_string();
    for (i, r) in records.iter().enumerate() {
        let e: Envelope = serde_json::from_str(&r.json).unwrap();
        assert_eq!(
            e.event_id.key,
            EventKey {
                epoch: 1,
                seq: i as u64 + 1
            }
        );
        assert_eq!(e.prev_hash, prev, "record {i} links to its predecessor");
        prev = record_hash(r.json.as_bytes());
    }
    drop(j);
    let (mut j, rec) = Journal::open(cfg(dir.path(), 4096, 1 << 30)).unwrap();
    assert!(!rec.new_epoch);
    assert_eq!(rec.records, 50);
    assert_eq!(j.next_key(), EventKey { epoch: 1, seq: 51 });
    fill(&mut j, 1);
    let last = read_all(&j).pop().unwrap();
    let e: Envelope = serde_json::from_str(&last.json).unwrap();
    assert_eq!(e.prev_hash, prev, "the chain continues across restarts");
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
    fill(&mut j, 100);
    let segs_before = j.segments.len();
    let k = |s| EventKey { epoch: 1, seq: s };
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
    assert_eq!(lost[0].first, Some(EventKey { epoch: 1, seq: 1 }));
    assert!(j.total_bytes() <= 8192 + 2048);
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
    let original_records: Vec<Vec<Vec<u8>>> = original.iter().map(|(_, d)| records_of(d)).collect();
    let total: usize = original_records.iter().map(Vec::len).sum();
    assert_eq!(total, 120);
    let nonempty: Vec<usize> = (0..original.len())
        .filter(|i| !original[*i].1.is_empty())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let (mut flips, mut truncations, mut exact_reports) = (0, 0, 0);
    for round in 0..1000 {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("journal")).unwrap();
        fs::write(dir.path().join("epoch"), "1\n").unwrap();
        let victim = nonempty[rng.random_range(0..nonempty.len())];
        let mut truncated_last = false;
        for (i, (path, data)) in original.iter().enumerate() {
            let mut data = data.clone();
            if i == victim {
                if rng.random_bool(0.5) {
                    let at = rng.random_range(0..data.len());
                    data.truncate(at);
                    truncations += 1;
                    truncated_last = i == original.len() - 1
                        || original[i + 1..].iter().all(|(_, d)| d.is_empty());
                } else {
                    let at = rng.random_range(0..data.len());
                    data[at] ^= 1 << rng.random_range(0..8);
                    flips += 1;
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
        // Every kept record is an original one, and each segment keeps a prefix.
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
                recs.len() <= original_records[idx].len(),
                "round {round}: segment {path:?} has more records than were written"
            );
            assert!(
                recs.iter().zip(&original_records[idx]).all(|(a, b)| a == b),
                "round {round}: segment {path:?} is not a prefix of the original"
            );
            assert_eq!(
                records_of(data).iter().map(Vec::len).sum::<usize>(),
                data.len(),
                "round {round}: the damaged tail was cut off"
            );
            kept += recs.len();
        }
        let reported: u64 = rec.lost.iter().map(|l| l.count).sum();
        if kept + reported as usize == total {
            exact_reports += 1;
        } else {
            // Only a cut in the newest segment can hide records: it looks like a torn
            // write (never synced, never sent) and is reported as torn bytes.
            assert!(
                truncated_last,
                "round {round}: kept {kept} + reported {reported} != {total}: {rec:?}"
            );
        }
        assert_eq!(
            rec.new_epoch,
            !rec.lost.is_empty(),
            "round {round}: new epoch iff records were lost"
        );
        // It keeps working: a new record can be appended and read back.
        drop(j);
        let (mut j, _) = Journal::open(cfg(dir.path(), 3000, 1 << 30)).unwrap();
        j.append(env(999)).unwrap();
        j.sync().unwrap();
    }
    println!("{flips} bit flips, {truncations} truncations: {exact_reports} reported exactly; the rest cut the newest segment (torn writes)");
    assert!(
        flips > 400 && truncations > 400,
        "{flips} flips, {truncations} truncations"
    );
    assert!(
        exact_reports > 500,
        "most damage is reported exactly ({exact_reports}/1000)"
    );
}
