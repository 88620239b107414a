//! Journal bundles from hosts with no network (`weilan_config::bundle`): checked
//! whole, then stored through the broker's own ingest path, acknowledged into an ack
//! bundle that goes back to the agent on the stick.
//!
//! `weilan-collector import` hands a bundle to the running collector through a spool
//! directory beside the database (`imports/incoming/`), because the running collector
//! owns the rules' state (correlation, suppression) and must see every fact once;
//! the serve loop looks there every second and imports off its own thread, group by
//! group, so live agents' batches go on being stored in between. The outcome
//! (`imports/done/<name>.result.json`) and the ack bundle (`<name>.acks`) are what
//! the command waits for.
//!
//! Before anything is stored the manifest must be signed by an enrolled agent
//! certificate of the CA and every batch line must be the one it names; an altered
//! bundle is refused whole, quarantined, alerted red, and its altered record named
//! from the hash chain. A bundle imported twice stores nothing twice (events are
//! keyed by agent, epoch and sequence) and gets its acks again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weilan_config::bundle::{self, BundleError};
use weilan_config::topics::{self, Channel};
use weilan_config::wire::{self, Ack};

use crate::ingest::{Ingest, Reply};

/// How an import ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportStatus {
    /// Every batch stored (newly or before) and acknowledged.
    Imported,
    /// Some batches were not stored; the agent keeps them and exports them again.
    Partial,
    /// Nothing stored: the bundle failed its checks.
    Refused,
}

impl std::fmt::Display for ImportStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImportStatus::Imported => "imported",
            ImportStatus::Partial => "partial",
            ImportStatus::Refused => "refused",
        })
    }
}

/// What became of one bundle (the `.result.json` the command prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportOutcome {
    /// The spooled file's name.
    pub bundle: String,
    pub status: ImportStatus,
    pub agent_id: Option<String>,
    pub records: u64,
    pub batches: usize,
    /// Events stored for the first time, already stored before, refused one by one.
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Batches acknowledged in the ack bundle.
    pub acknowledged: usize,
    /// Why it was refused (the line and, where the chain shows it, the record).
    pub reason: Option<String>,
}

/// The spool directory beside the database.
pub fn spool_dir(database: &Path) -> PathBuf {
    database.parent().unwrap_or(Path::new(".")).join("imports")
}

/// Batches handed to ingest at once (one transaction each, like a group from the
/// broker).
const IMPORT_GROUP: usize = 256;

impl Ingest {
    /// Imports one journal bundle. Returns the outcome, the ack bundle (empty when
    /// nothing was acknowledged) and the other replies (alerts' commands) to publish.
    pub fn import_bundle(&self, name: &str, bytes: &[u8]) -> (ImportOutcome, Vec<u8>, Vec<Reply>) {
        let mut outcome = ImportOutcome {
            bundle: name.to_string(),
            status: ImportStatus::Refused,
            agent_id: None,
            records: 0,
            batches: 0,
            stored: 0,
            duplicates: 0,
            rejected: 0,
            acknowledged: 0,
            reason: None,
        };
        let checked = match bundle::check_bundle(&self.verifier, bytes) {
            Ok(c) => c,
            Err(e) => {
                let reason = refusal_reason(&e, bytes);
                let agent = claimed_agent(bytes);
                outcome.agent_id = agent.clone();
                outcome.reason = Some(reason.clone());
                let replies = self.refuse_bundle(agent.as_deref(), &reason, bytes);
                return (outcome, Vec::new(), replies);
            }
        };
        let agent = checked.manifest.agent_id.clone();
        outcome.agent_id = Some(agent.clone());
        outcome.records = checked.manifest.records;
        outcome.batches = checked.batch_lines.len();
        if !self.registry.admits(&checked.signed.cert) {
            let reason = format!(
                "bundle signed with a certificate of `{agent}` that is valid under the CA but not enrolled (not in {}, or revoked)",
                self.registry.path.display()
            );
            self.refuse(&import_topic(&agent), &reason, bytes);
            self.quarantine_refused_now();
            outcome.reason = Some(reason.clone());
            let replies = self.unenrolled_alert(&agent, &reason, bytes);
            return (outcome, Vec::new(), replies);
        }
        let events_topic = topics::agent_topic(&agent, Channel::Events);
        let acks_topic = topics::agent_topic(&agent, Channel::Acks);
        let mut ack_bundle = Vec::new();
        let mut others = Vec::new();
        for group in checked.batch_lines.chunks(IMPORT_GROUP) {
            let messages: Vec<crate::fair::Waiting> = group
                .iter()
                .map(|line| crate::fair::Waiting {
                    topic: events_topic.clone(),
                    payload: line.to_vec(),
                })
                .collect();
            let done = self.process_group(&messages, crate::ingest::AgentTurns::Wait);
            for reply in done.replies {
                if reply.topic != acks_topic {
                    others.push(reply);
                    continue;
                }
                if let Some(ack) = read_own_ack(&reply.payload) {
                    outcome.stored += u64::from(ack.stored);
                    outcome.duplicates += u64::from(ack.duplicates);
                    outcome.rejected += ack.rejected.len() as u64;
                    outcome.acknowledged += 1;
                }
                ack_bundle.extend_from_slice(&reply.payload);
                ack_bundle.push(b'\n');
            }
        }
        outcome.status = if outcome.acknowledged == outcome.batches {
            ImportStatus::Imported
        } else {
            ImportStatus::Partial
        };
        if outcome.status == ImportStatus::Partial {
            outcome.reason = Some(format!(
                "{} of {} batches were not stored (see the collector's log); the agent keeps them and exports them again",
                outcome.batches - outcome.acknowledged,
                outcome.batches
            ));
        }
        tracing::info!(bundle = name, agent_id = %agent, stored = outcome.stored, duplicates = outcome.duplicates, status = %outcome.status, "journal bundle imported");
        (outcome, ack_bundle, others)
    }

    /// An altered or unreadable bundle: quarantined, a red integrity alert.
    fn refuse_bundle(&self, agent: Option<&str>, reason: &str, bytes: &[u8]) -> Vec<Reply> {
        let who = agent.unwrap_or("(unknown agent)");
        let reason = format!("journal bundle refused: {reason}");
        self.refuse(&import_topic(who), &reason, bytes);
        self.quarantine_refused_now();
        self.integrity_alert(who, &reason, bytes)
    }

    /// Imports every bundle waiting in `spool/incoming/`, oldest name first; writes
    /// each outcome and ack bundle to `spool/done/` and removes the bundle. Returns
    /// the replies to publish.
    pub fn import_spooled(&self, spool: &Path) -> Vec<Reply> {
        prune_done(&spool.join("done"));
        let incoming = spool.join("incoming");
        let Ok(entries) = std::fs::read_dir(&incoming) else {
            return Vec::new();
        };
        let mut names: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
            .collect();
        names.sort();
        let mut replies = Vec::new();
        for path in names {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (outcome, acks, more) = match std::fs::read(&path) {
                Ok(bytes) => self.import_bundle(&name, &bytes),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "spooled bundle unreadable");
                    continue;
                }
            };
            replies.extend(more);
            if let Err(e) = write_done(spool, &name, &outcome, &acks) {
                tracing::error!(bundle = %name, error = %e, "import outcome not written; the bundle stays spooled and is imported again (nothing is stored twice)");
                continue;
            }
            let _ = std::fs::remove_file(&path);
        }
        replies
    }
}

/// How long an outcome and its ack bundle stay in `done/` for the command to take
/// (the command copies the acks out at once; this is for one that was interrupted).
const DONE_KEEP: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Removes outcomes and ack bundles older than [`DONE_KEEP`]: the spool stays bounded.
fn prune_done(done: &Path) {
    let Ok(entries) = std::fs::read_dir(done) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > DONE_KEEP);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The quarantine topic a bundle's refusal is filed under (its agent is the source).
fn import_topic(agent: &str) -> String {
    topics::agent_topic(agent, Channel::Events)
}

/// The agent an unverified manifest claims (for attributing a refusal only).
fn claimed_agent(bytes: &[u8]) -> Option<String> {
    let last = bundle::lines(bytes).pop()?;
    let signed = wire::decode_signed(last, bundle::MAX_LINE).ok()?;
    let m: bundle::Manifest = serde_json::from_str(&signed.body).ok()?;
    topics::valid_agent_id(&m.agent_id).then_some(m.agent_id)
}

/// The refusal, with the altered record named when the chain shows it.
fn refusal_reason(e: &BundleError, bytes: &[u8]) -> String {
    if let BundleError::Line { line, .. } = e {
        let lines = bundle::lines(bytes);
        if let Some(record) = lines.get(line - 1).and_then(|l| bundle::altered_record(l)) {
            return format!("{e}; {record}");
        }
    }
    e.to_string()
}

/// An ack this collector just signed (read back for counting, not trusted further).
fn read_own_ack(payload: &[u8]) -> Option<Ack> {
    let signed = wire::decode_signed(payload, bundle::MAX_LINE).ok()?;
    serde_json::from_str(&signed.body).ok()
}

/// Writes `<name>.acks` and then `<name>.result.json` (the command waits for the
/// latter, so the acks are complete when it appears).
fn write_done(
    spool: &Path,
    name: &str,
    outcome: &ImportOutcome,
    acks: &[u8],
) -> std::io::Result<()> {
    let done = spool.join("done");
    std::fs::create_dir_all(&done)?;
    if !acks.is_empty() {
        write_whole(&done.join(format!("{name}.acks")), acks)?;
    }
    let json = serde_json::to_vec_pretty(outcome).map_err(std::io::Error::other)?;
    write_whole(&done.join(format!("{name}.result.json")), &json)
}

/// Written beside and renamed: a reader never sees half a file.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The command's side: copies the bundle into the spool (named by the time and its
/// content's digest) and waits for its outcome.
pub fn spool_and_wait(
    database: &Path,
    bundle_path: &Path,
    wait: std::time::Duration,
) -> Result<(ImportOutcome, Option<PathBuf>), String> {
    let bytes =
        std::fs::read(bundle_path).map_err(|e| format!("{}: {e}", bundle_path.display()))?;
    let spool = spool_dir(database);
    let incoming = spool.join("incoming");
    std::fs::create_dir_all(&incoming).map_err(|e| format!("{}: {e}", incoming.display()))?;
    let stamp = jiff::Timestamp::now().as_millisecond();
    let name = format!("{stamp}-{}", &bundle::line_digest(&bytes)[..16]);
    let target = incoming.join(format!("{name}.bundle"));
    write_whole(&target, &bytes).map_err(|e| format!("{}: {e}", target.display()))?;
    let done = spool.join("done");
    let result = done.join(format!("{name}.result.json"));
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(text) = std::fs::read(&result) {
            let outcome: ImportOutcome =
                serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", result.display()))?;
            let acks = done.join(format!("{name}.acks"));
            return Ok((outcome, acks.exists().then_some(acks)));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "no running collector took {} within {} s; it stays spooled as {} and is imported when the collector runs",
                bundle_path.display(),
                wait.as_secs(),
                target.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, PkiPaths};
    use weilan_config::event::{record_hash, EventKey, GENESIS_HASH};
    use weilan_config::signing::{Signer, Verifier};
    use weilan_config::wire::{Batch, Purpose};

    struct Keys {
        _dir: tempfile::TempDir,
        agent: Signer,
        collector: Signer,
        verifier: Verifier,
    }

    fn keys() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let p = PkiPaths::new(dir.path());
        pki::init(&p, &["localhost".into()]).unwrap();
        pki::issue_agent(&p, "ws-1").unwrap();
        Keys {
            agent: Signer::from_pem_files(&p.agent("ws-1"), &p.agent_key("ws-1")).unwrap(),
            collector: Signer::from_pem_files(&p.collector(), &p.collector_key()).unwrap(),
            verifier: Verifier::from_ca_file(&p.ca()).unwrap(),
            _dir: dir,
        }
    }

    /// Records 1..=n of epoch 7, hash-chained, as journal JSON.
    fn records(n: u64) -> Vec<String> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let json = format!(
                    r#"{{"schema":1,"event_id":"ws-1:7:{seq}","time":"2026-12-05T01:00:00Z","host_role":"workstation","prev_hash":"{prev}","event":{{"kind":"agent.heartbeat","data":{{"agent_version":"1","uptime_secs":{seq},"policy_version":null,"backlog":0,"dropped_total":0}}}}}}"#
                );
                prev = record_hash(json.as_bytes());
                json
            })
            .collect()
    }

    fn batch_line(signer: &Signer, recs: &[String], first_seq: u64) -> Vec<u8> {
        let raws: Vec<Box<serde_json::value::RawValue>> = recs
            .iter()
            .map(|r| serde_json::value::RawValue::from_string(r.clone()).unwrap())
            .collect();
        let batch = Batch {
            agent_id: "ws-1".into(),
            batch_id: first_seq,
            first: EventKey {
                epoch: 7,
                seq: first_seq,
            },
            last: EventKey {
                epoch: 7,
                seq: first_seq + recs.len() as u64 - 1,
            },
            events: raws.iter().map(|r| r.as_ref()).collect(),
            head: None,
        };
        let body = serde_json::to_string(&batch).unwrap();
        serde_json::to_vec(&signer.sign(Purpose::Batch, body)).unwrap()
    }

    /// A bundle of two batches of 3 records, its manifest signed by `manifest_signer`.
    fn bundle_of(k: &Keys, manifest_signer: &Signer) -> Vec<u8> {
        let recs = records(6);
        let mut w = bundle::BundleWriter::new(Vec::new());
        for (i, chunk) in recs.chunks(3).enumerate() {
            let first = 1 + 3 * i as u64;
            let line = batch_line(&k.agent, chunk, first);
            let key = |seq| EventKey { epoch: 7, seq };
            w.batch(&line, key(first), key(first + 2), 3).unwrap();
        }
        w.finish(manifest_signer, "ws-1").unwrap().1
    }

    #[test]
    fn outcomes_older_than_the_keep_time_leave_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("a.result.json"), dir.path().join("b.acks"));
        for p in [&old, &new] {
            std::fs::write(p, "x").unwrap();
        }
        let long_ago =
            std::time::SystemTime::now() - DONE_KEEP - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        prune_done(dir.path());
        assert!(!old.exists() && new.exists());
    }

    #[test]
    fn a_bundle_as_written_passes_and_names_its_range() {
        let k = keys();
        let bytes = bundle_of(&k, &k.agent);
        let checked = bundle::check_bundle(&k.verifier, &bytes).unwrap();
        assert_eq!(checked.manifest.records, 6);
        assert_eq!(checked.batch_lines.len(), 2);
        assert_eq!(checked.manifest.last, EventKey { epoch: 7, seq: 6 });
    }

    #[test]
    fn an_altered_record_is_refused_and_named_from_the_chain() {
        let k = keys();
        let text = String::from_utf8(bundle_of(&k, &k.agent)).unwrap();
        // Record 7:2 (the middle of line 1): another uptime.
        let altered = text.replacen(r#"\"uptime_secs\":2,"#, r#"\"uptime_secs\":9,"#, 1);
        assert_ne!(altered, text);
        let e = bundle::check_bundle(&k.verifier, altered.as_bytes()).unwrap_err();
        assert!(matches!(e, BundleError::Line { line: 1, .. }), "{e}");
        let reason = refusal_reason(&e, altered.as_bytes());
        assert!(reason.contains("record 7:2 "), "{reason}");
    }

    #[test]
    fn removed_reordered_or_foreign_lines_are_refused() {
        let k = keys();
        let bytes = bundle_of(&k, &k.agent);
        let lines = bundle::lines(&bytes);
        // A batch line dropped: the manifest names two.
        let dropped = [lines[1], lines[2]].join(&b'\n');
        let e = bundle::check_bundle(&k.verifier, &dropped).unwrap_err();
        assert!(
            e.to_string().contains("names 2 batches, the bundle has 1"),
            "{e}"
        );
        // Two batch lines swapped.
        let swapped = [lines[1], lines[0], lines[2]].join(&b'\n');
        let e = bundle::check_bundle(&k.verifier, &swapped).unwrap_err();
        assert!(matches!(e, BundleError::Line { line: 1, .. }), "{e}");
        // A manifest signed by the collector (not an agent): refused.
        let e = bundle::check_bundle(&k.verifier, &bundle_of(&k, &k.collector)).unwrap_err();
        assert!(matches!(e, BundleError::Manifest { line: 3, .. }), "{e}");
        // Nothing at all.
        assert_eq!(
            bundle::check_bundle(&k.verifier, b"").unwrap_err(),
            BundleError::Empty
        );
    }
}
