//! Hosts with no network (涉密 computers): the journal leaves on a stick as a signed
//! bundle, and the collector's acknowledgements come back the same way.
//!
//! `weilan-agent journal export` reads every unacknowledged record (read-only, safe
//! while the agent runs) and writes them as the signed batches the uplink would have
//! published, closed by a signed manifest (`weilan_config::bundle`). `weilan-agent
//! journal import-ack` checks the collector's ack bundle (every ack signed by a
//! collector certificate of the pinned CA and addressed to this agent) and drops it in
//! `state_dir/journal-acks/`; the uplink applies it within a second (at its next start
//! when it is not running), exactly as if the acks had come over the broker: the
//! acknowledged watermark moves and acknowledged segments are deleted.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::value::RawValue;
use weilan_config::bundle::{self, BundleWriter, Manifest};
use weilan_config::event::EventKey;
use weilan_config::settings::agent::AgentSettings;
use weilan_config::signing::{Role, Signer, Verifier};
use weilan_config::wire::{self, Ack, Batch, Purpose};

/// Why an export or an ack import did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AirgapError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("identity: {0}")]
    Identity(#[from] weilan_config::signing::SigningError),
    #[error("{path} line {line}: {reason}")]
    Refused {
        path: String,
        line: usize,
        reason: String,
    },
    /// The export directory is not on a transfer stick the policy registers and lets
    /// be written.
    #[error("{path}: {reason}")]
    NotRegistered { path: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AirgapError + '_ {
    move |source| AirgapError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The registered transfer stick an export goes onto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferStick {
    /// Its `[[usb.known_devices]]` label.
    pub label: String,
    /// The rule that lets it be written.
    pub rule_id: String,
    pub vid: String,
    pub pid: String,
    pub serial: Option<String>,
}

/// The stick `out_dir` is on: the USB device its file system's block device belongs
/// to must be a `[[usb.known_devices]]` entry that the policy in force allows (not
/// read-only, not blocked) on this host now. A journal never goes to a disk, a
/// network share or an unregistered stick, where it would leave the fence unseen.
pub fn registered_stick(
    settings: &AgentSettings,
    out_dir: &Path,
) -> Result<TransferStick, AirgapError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |reason: String| AirgapError::NotRegistered {
        path: out_dir.display().to_string(),
        reason,
    };
    let dev = std::fs::metadata(out_dir).map_err(io_err(out_dir))?.dev();
    let majmin = format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let sysfs = crate::source::usb::sysfs::Sysfs::new(
        settings
            .usb
            .as_ref()
            .map_or_else(|| PathBuf::from("/sys"), |u| u.sysfs_root.clone()),
    );
    let usb_dir = sysfs
        .block_dir(&majmin)
        .and_then(|block| sysfs.usb_ancestor(&block))
        .ok_or_else(|| {
            refuse(format!(
                "its file system (device {majmin}) is not on a USB stick; mount the registered transfer stick there"
            ))
        })?;
    let device = sysfs
        .read_device(&usb_dir, false)
        .map_err(|e| refuse(format!("the stick's identity is unreadable: {e}")))?;
    let (policy, _, _) = crate::policy_manager::initial(&settings.state_dir, &settings.policy)
        .map_err(|e| {
            refuse(format!(
                "the policy in force is unreadable, so no stick is registered: {e}"
            ))
        })?;
    let serial = device.serial.clone().unwrap_or_default();
    let Some(known) = policy.usb.known_device(&device) else {
        return Err(refuse(format!(
            "the stick {}:{} serial `{serial}` is not a registered transfer stick ([[usb.known_devices]] in the policy)",
            device.vid, device.pid
        )));
    };
    let verdict = policy.usb.evaluate(
        &device,
        &weilan_config::policy::usb::Context {
            host_groups: &settings.host_groups,
            now: jiff::Timestamp::now(),
        },
    );
    if verdict.target != weilan_config::policy::usb::Target::Allow {
        return Err(refuse(format!(
            "the stick `{}` is registered but the policy does not let it be written here now ({} by rule `{}`: {})",
            known.label,
            verdict.target.as_str(),
            verdict.rule_id,
            verdict.reason
        )));
    }
    Ok(TransferStick {
        label: known.label.clone(),
        rule_id: verdict.rule_id,
        vid: device.vid,
        pid: device.pid,
        serial: device.serial,
    })
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    /// The bundles, oldest records first (none when nothing was unacknowledged).
    pub bundles: Vec<(PathBuf, Manifest)>,
    /// The acknowledged watermark the export started after.
    pub acked: Option<EventKey>,
    /// The registered stick it went onto.
    pub stick: TransferStick,
}

/// Where dropped ack bundles wait for the uplink.
pub fn ack_drop_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal-acks")
}

/// A run of records that becomes one batch: one epoch, consecutive sequence numbers.
#[derive(Default)]
struct Run {
    records: Vec<(EventKey, Box<RawValue>)>,
    bytes: usize,
}

/// The bundle being written: its file beside the final name until it is complete.
struct Open {
    tmp: PathBuf,
    writer: BundleWriter<std::io::BufWriter<std::fs::File>>,
}

/// Writes bundles into one directory, a new one past `max_bytes`.
struct Bundles<'a> {
    out_dir: &'a Path,
    signer: Signer,
    agent_id: String,
    max_bytes: u64,
    open: Option<Open>,
    done: Vec<(PathBuf, Manifest)>,
    next_batch_id: u64,
}

impl Bundles<'_> {
    fn add(&mut self, run: &mut Run) -> std::io::Result<()> {
        if run.records.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            let tmp = self
                .out_dir
                .join(format!(".{}-{}.tmp", self.agent_id, self.done.len()));
            let file = std::fs::File::create(&tmp)?;
            self.open = Some(Open {
                tmp,
                writer: BundleWriter::new(std::io::BufWriter::new(file)),
            });
        }
        let open = self.open.as_mut().expect("opened above");
        self.next_batch_id += 1;
        let line = signed_batch(
            &self.signer,
            &self.agent_id,
            self.next_batch_id,
            &run.records,
        )?;
        let (first, last) = (run.records[0].0, run.records[run.records.len() - 1].0);
        open.writer
            .batch(&line, first, last, run.records.len() as u64)?;
        run.records.clear();
        run.bytes = 0;
        if open.writer.bytes() >= self.max_bytes {
            self.close()?;
        }
        Ok(())
    }

    /// Signs the open bundle's manifest, syncs it and gives it its final name.
    fn close(&mut self) -> std::io::Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let (manifest, out) = open.writer.finish(&self.signer, &self.agent_id)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        let Some(manifest) = manifest else {
            drop(file);
            return std::fs::remove_file(&open.tmp);
        };
        file.sync_all()?;
        let path = self.out_dir.join(bundle_name(&self.agent_id, &manifest));
        std::fs::rename(&open.tmp, &path)?;
        self.done.push((path, manifest));
        Ok(())
    }
}

/// `weilan-journal-AGENT-EPOCH_SEQ-EPOCH_SEQ.bundle`: no `:`, which FAT and exFAT
/// sticks do not allow.
fn bundle_name(agent_id: &str, m: &Manifest) -> String {
    format!(
        "weilan-journal-{agent_id}-{}_{}-{}_{}.bundle",
        m.first.epoch, m.first.seq, m.last.epoch, m.last.seq
    )
}

/// The default size of one bundle: below FAT32's 4 GiB file limit, and what the
/// collector reads into memory at once.
pub const DEFAULT_BUNDLE_MIB: u64 = 512;

/// Writes every unacknowledged record of the journal into bundles of at most about
/// `max_mib` MiB in `out_dir`, which must be on a registered transfer stick
/// ([`registered_stick`]). Each file appears whole (written beside, synced, then
/// renamed), so a stick pulled mid-write leaves no half bundle under a final name.
pub fn export(
    settings: &AgentSettings,
    out_dir: &Path,
    max_mib: u64,
) -> Result<Exported, AirgapError> {
    let stick = registered_stick(settings, out_dir)?;
    let (agent_id, identity) = crate::identity_in_force(settings).map_err(|e| match e {
        crate::AgentError::Identity(e) => AirgapError::Identity(e),
        other => AirgapError::Io {
            path: settings.cert.display().to_string(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    let mut bundles = Bundles {
        out_dir,
        signer: Signer::from_pem_files(&identity.cert, &identity.key)?,
        agent_id,
        max_bytes: max_mib.max(1) * 1024 * 1024,
        open: None,
        done: Vec::new(),
        next_batch_id: 0,
    };
    let journal_dir = settings.state_dir.join("journal");
    let max_events = settings.delivery.batch_max_events;
    let mut run = Run::default();
    let mut write_failed = None;
    let acked = crate::journal::for_each_unacked(&journal_dir, |key, json| {
        let continues = run
            .records
            .last()
            .is_some_and(|(k, _)| k.epoch == key.epoch && k.seq + 1 == key.seq);
        if !continues
            || run.records.len() >= max_events
            || run.bytes + json.len() > wire::MAX_BATCH_BYTES
        {
            // A write error is the stick's, not the journal's: kept apart to name it.
            bundles.add(&mut run).map_err(|e| {
                let kept = std::io::Error::new(e.kind(), e.to_string());
                write_failed = Some(e);
                kept
            })?;
        }
        let raw = RawValue::from_string(json.to_string()).map_err(std::io::Error::other)?;
        run.bytes += json.len();
        run.records.push((key, raw));
        Ok(())
    });
    if let Some(e) = write_failed {
        return Err(io_err(out_dir)(e));
    }
    let acked = acked.map_err(io_err(&journal_dir))?;
    bundles.add(&mut run).map_err(io_err(out_dir))?;
    bundles.close().map_err(io_err(out_dir))?;
    Ok(Exported {
        bundles: bundles.done,
        acked,
        stick,
    })
}

/// One signed batch line, as the uplink would publish it.
fn signed_batch(
    signer: &Signer,
    agent_id: &str,
    batch_id: u64,
    records: &[(EventKey, Box<RawValue>)],
) -> std::io::Result<Vec<u8>> {
    let batch = Batch {
        agent_id: agent_id.to_string(),
        batch_id,
        first: records[0].0,
        last: records[records.len() - 1].0,
        events: records.iter().map(|(_, r)| r.as_ref()).collect(),
        // Each batch is judged as the newest the agent had: the collector imports
        // the whole bundle at once, so its holes are judged after its last batch.
        head: None,
    };
    let body = serde_json::to_string(&batch).map_err(std::io::Error::other)?;
    serde_json::to_vec(&signer.sign(Purpose::Batch, body)).map_err(std::io::Error::other)
}

/// Checks every line of an ack bundle: a signed ack from a collector certificate of
/// the CA, addressed to `agent_id`. All or nothing: the first bad line refuses the
/// file.
pub fn check_ack_bundle(
    verifier: &Verifier,
    agent_id: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<Ack>, AirgapError> {
    let refused = |line: usize, reason: String| AirgapError::Refused {
        path: path.display().to_string(),
        line,
        reason,
    };
    let mut acks = Vec::new();
    for (i, line) in bundle::lines(bytes).into_iter().enumerate() {
        let msg = wire::decode_signed(line, bundle::MAX_LINE)
            .map_err(|e| refused(i + 1, e.to_string()))?;
        verifier
            .verify(&msg, Purpose::Ack, Role::Collector)
            .map_err(|e| refused(i + 1, format!("signature: {e}")))?;
        let ack: Ack = wire::decode("an ack", msg.body.as_bytes(), bundle::MAX_LINE)
            .map_err(|e| refused(i + 1, e.to_string()))?;
        if ack.agent_id != agent_id {
            return Err(refused(
                i + 1,
                format!("ack for agent `{}`, this is `{agent_id}`", ack.agent_id),
            ));
        }
        acks.push(ack);
    }
    if acks.is_empty() {
        return Err(refused(0, "no acks in the file".into()));
    }
    Ok(acks)
}

/// Drops a checked ack bundle where the uplink picks it up (written beside, then
/// renamed, so the uplink never reads half a file).
pub fn drop_ack_bundle(state_dir: &Path, bytes: &[u8]) -> Result<PathBuf, AirgapError> {
    let dir = ack_drop_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let name = &bundle::line_digest(bytes)[..16];
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(format!("{name}.acks"));
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}

/// The acks of every bundle dropped in `dir`, checked again (the directory is the
/// agent's, but a file in it is only trusted by its signatures); each file is removed
/// once read. A refused file is logged and removed.
pub fn take_dropped_acks(dir: &Path, verifier: &Verifier, agent_id: &str) -> Vec<Ack> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut acks = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "acks") {
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) => match check_ack_bundle(verifier, agent_id, &path, &bytes) {
                Ok(found) => {
                    tracing::info!(file = %path.display(), acks = found.len(), "acknowledgements from an ack bundle");
                    acks.extend(found);
                }
                Err(e) => tracing::error!(error = %e, "ack bundle refused"),
            },
            Err(e) => tracing::error!(file = %path.display(), error = %e, "ack bundle unreadable"),
        }
        let _ = std::fs::remove_file(&path);
    }
    acks.sort_by_key(|a| a.first);
    acks
}
