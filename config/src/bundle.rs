//! Journal bundles: how a host with no network at all (a 涉密 computer) hands its
//! journal to the collector on a stick, and gets the acknowledgement back the same way.
//!
//! A **journal bundle** (`weilan-agent journal export`) is a text file of JSON lines:
//! every line but the last is a signed [`crate::wire::Batch`] exactly as the agent
//! would publish it on its events topic (journal records verbatim, hash-chained,
//! signed with the agent's key); the last line is a signed [`Manifest`] (purpose
//! `bundle`) naming the agent, the range and the SHA-256 of every batch line. The
//! collector (`weilan-collector import`) checks the manifest and every line against
//! it before it stores anything, then feeds the batches through the same ingest as
//! the broker's (signature, enrollment, chain, gaps, exactly-once, rules).
//!
//! An **ack bundle** is the collector's signed [`crate::wire::Ack`]s for those
//! batches, one per line, exactly as it would publish them; the agent checks each
//! like an ack from the broker (`weilan-agent journal import-ack`).

use serde::{Deserialize, Serialize};

use crate::event::EventKey;
use crate::signing::{Role, Signer, Verifier};
use crate::wire::{self, Purpose, SignedMessage};

/// Format version of [`Manifest`].
pub const MANIFEST_VERSION: u32 = 1;

/// The largest bundle line (a signed batch is below the 1 MiB payload limit).
pub const MAX_LINE: usize = 2 * 1024 * 1024;

/// The signed last line of a journal bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub v: u32,
    pub agent_id: String,
    /// When the bundle was written (agent clock).
    pub created_at: jiff::Timestamp,
    /// The first and last record in the bundle.
    pub first: EventKey,
    pub last: EventKey,
    /// How many records the bundle holds.
    pub records: u64,
    /// SHA-256 (hex) of each batch line, in order (the line's bytes without `\n`).
    pub batches: Vec<String>,
}

/// Why a bundle is refused; names the line (1-based) where it can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is empty")]
    Empty,
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("manifest (line {line}): {reason}")]
    Manifest { line: usize, reason: String },
}

/// SHA-256 (hex) of one bundle line.
pub fn line_digest(line: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, line))
}

/// Writes a journal bundle as it goes: the signed batch lines, then, at
/// [`BundleWriter::finish`], the signed manifest naming them.
pub struct BundleWriter<W: std::io::Write> {
    out: W,
    digests: Vec<String>,
    range: Option<(EventKey, EventKey)>,
    records: u64,
    bytes: u64,
}

impl<W: std::io::Write> BundleWriter<W> {
    pub fn new(out: W) -> Self {
        BundleWriter {
            out,
            digests: Vec::new(),
            range: None,
            records: 0,
            bytes: 0,
        }
    }

    /// Bytes of batch lines written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends one signed batch (`line`, without `\n`) of `records` records
    /// `first..=last`.
    pub fn batch(
        &mut self,
        line: &[u8],
        first: EventKey,
        last: EventKey,
        records: u64,
    ) -> std::io::Result<()> {
        self.out.write_all(line)?;
        self.out.write_all(b"\n")?;
        self.digests.push(line_digest(line));
        self.range = Some((self.range.map_or(first, |(f, _)| f), last));
        self.records += records;
        self.bytes += line.len() as u64 + 1;
        Ok(())
    }

    /// Batches written so far.
    pub fn batches(&self) -> usize {
        self.digests.len()
    }

    /// Writes the signed manifest; returns it with the writer. `None` for the
    /// manifest when no batch was written (nothing is written then).
    pub fn finish(
        mut self,
        signer: &Signer,
        agent_id: &str,
    ) -> std::io::Result<(Option<Manifest>, W)> {
        let Some((first, last)) = self.range else {
            return Ok((None, self.out));
        };
        let manifest = Manifest {
            v: MANIFEST_VERSION,
            agent_id: agent_id.to_string(),
            created_at: jiff::Timestamp::now(),
            first,
            last,
            records: self.records,
            batches: std::mem::take(&mut self.digests),
        };
        let body = serde_json::to_string(&manifest).map_err(std::io::Error::other)?;
        let signed = serde_json::to_vec(&signer.sign(Purpose::Bundle, body))
            .map_err(std::io::Error::other)?;
        self.out.write_all(&signed)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok((Some(manifest), self.out))
    }
}

/// A bundle whose manifest is signed by an agent of the CA and whose every line is
/// the one the manifest names. The batches themselves are verified again by ingest.
#[derive(Debug)]
pub struct CheckedBundle<'a> {
    pub manifest: Manifest,
    /// The signed manifest (its certificate is the agent's).
    pub signed: SignedMessage,
    pub batch_lines: Vec<&'a [u8]>,
}

/// Splits a bundle into lines (a final `\n` is optional; blank lines are refused).
pub fn lines(bytes: &[u8]) -> Vec<&[u8]> {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|b| *b == b'\n').collect()
}

/// Checks a journal bundle's manifest (signature by an agent certificate of the CA,
/// whose name is the manifest's agent) and that every batch line is the one it
/// names, in order.
pub fn check_bundle<'a>(
    verifier: &Verifier,
    bytes: &'a [u8],
) -> Result<CheckedBundle<'a>, BundleError> {
    let all = lines(bytes);
    let Some((last, batch_lines)) = all.split_last() else {
        return Err(BundleError::Empty);
    };
    let line = all.len();
    let bad = |reason: String| BundleError::Manifest { line, reason };
    let signed = wire::decode_signed(last, MAX_LINE).map_err(|e| bad(e.to_string()))?;
    let identity = verifier
        .verify(&signed, Purpose::Bundle, Role::Agent)
        .map_err(|e| bad(format!("signature: {e}")))?;
    let manifest: Manifest = wire::decode("a bundle manifest", signed.body.as_bytes(), MAX_LINE)
        .map_err(|e| bad(e.to_string()))?;
    if manifest.v != MANIFEST_VERSION {
        return Err(bad(format!("unsupported manifest version {}", manifest.v)));
    }
    if identity.common_name != manifest.agent_id {
        return Err(bad(format!(
            "signed by `{}` for agent `{}`",
            identity.common_name, manifest.agent_id
        )));
    }
    if manifest.batches.len() != batch_lines.len() {
        return Err(bad(format!(
            "names {} batches, the bundle has {}",
            manifest.batches.len(),
            batch_lines.len()
        )));
    }
    for (i, (l, digest)) in batch_lines.iter().zip(&manifest.batches).enumerate() {
        if l.is_empty() {
            return Err(BundleError::Line {
                line: i + 1,
                reason: "empty line".into(),
            });
        }
        if line_digest(l) != *digest {
            return Err(BundleError::Line {
                line: i + 1,
                reason: "not the batch the signed manifest names (altered)".into(),
            });
        }
    }
    Ok(CheckedBundle {
        manifest,
        signed,
        batch_lines: batch_lines.to_vec(),
    })
}

/// In an altered batch line, the first record whose bytes no longer match the chain:
/// the record whose successor's `prev_hash` does not name it, or which names a
/// predecessor that is not the record before it. `None` when the line cannot be read
/// as a batch or its records still chain (then the signature is what is broken).
pub fn altered_record(line: &[u8]) -> Option<String> {
    let signed = wire::decode_signed(line, MAX_LINE).ok()?;
    let batch = wire::decode_batch(&signed.body, MAX_LINE).ok()?;
    let mut previous: Option<(EventKey, String)> = None;
    for raw in &batch.events {
        let text = raw.get();
        let Ok(env) = serde_json::from_str::<crate::event::Envelope>(text) else {
            let at = previous
                .as_ref()
                .map_or_else(|| batch.first.to_string(), |(k, _)| format!("after {k}"));
            return Some(format!("record {at} is not a valid event"));
        };
        let key = env.event_id.key;
        if let Some((prev_key, prev_hash)) = &previous {
            if env.prev_hash != *prev_hash {
                return Some(format!(
                    "record {prev_key} (or the prev_hash of {key}) was altered: the chain breaks there"
                ));
            }
        }
        previous = Some((key, crate::event::record_hash(text.as_bytes())));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_with_or_without_a_final_newline() {
        assert_eq!(lines(b"a\nb\n"), vec![&b"a"[..], &b"b"[..]]);
        assert_eq!(lines(b"a\nb"), vec![&b"a"[..], &b"b"[..]]);
        assert!(lines(b"").is_empty());
        assert!(lines(b"\n").is_empty());
        assert_eq!(lines(b"a\n\nb"), vec![&b"a"[..], &b""[..], &b"b"[..]]);
    }
}
