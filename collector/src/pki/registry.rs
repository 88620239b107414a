//! The registry of enrolled identities: every agent and door-controller certificate
//! this collector's CA issued on purpose, with its groups and how it was issued.
//!
//! A certificate that chains to the CA is not enough: one signed for a name that was
//! never enrolled (a leaked CA key, a test certificate, a forgotten issuance) is
//! refused and alerted, because only certificates in this registry count. The
//! registry is an append-only JSON-lines file beside the CA (`registry.jsonl` in the
//! PKI directory), written by `pki issue-agent` / `issue-door-controller` (offline,
//! without the collector running) and by enrollment in the running collector; appends
//! take an exclusive lock, readers reload when the file changes. A PKI made before
//! the registry existed is imported once from the certificates in `agents/` and
//! `door-controllers/`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pki::PkiPaths;

/// What a registry line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Issued,
    Revoked,
}

/// One line of `registry.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// When (RFC 3339).
    pub at: String,
    pub action: Action,
    pub id: String,
    /// `agent` or `door-controller`.
    pub role: String,
    /// SHA-256 (hex) of the certificate's DER: what a signed message is matched by.
    pub fingerprint: String,
    /// The certificate's expiry (RFC 3339).
    #[serde(default)]
    pub not_after: String,
    /// The certificate's serial number (hex), for the CRL.
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// `pki issue-agent`, `enrollment token <id>`, `imported`, an admin's reason...
    pub by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {detail}")]
    Line {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("{0}: not a PEM certificate")]
    Certificate(PathBuf),
    #[error("CRL: {0}")]
    Crl(String),
}

/// The registry's state: the entries in force by fingerprint and by id.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    /// Certificates issued and not revoked.
    valid: HashMap<String, Entry>,
    /// Every entry, oldest first (for listings).
    entries: Vec<Entry>,
    modified: Option<std::time::SystemTime>,
}

/// SHA-256 (hex) of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The registry file of a PKI directory.
pub fn path(paths: &PkiPaths) -> PathBuf {
    paths.dir.join("registry.jsonl")
}

impl Registry {
    /// Reads the registry file (an absent file is an empty registry).
    pub fn load(path: &Path) -> Result<Registry, RegistryError> {
        let io = |source| RegistryError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut reg = Registry::default();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(reg),
            Err(e) => return Err(io(e)),
        };
        reg.modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let entry: Entry = serde_json::from_str(line).map_err(|e| RegistryError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                detail: e.to_string(),
            })?;
            if entry.action == Action::Issued {
                reg.valid.insert(entry.fingerprint.clone(), entry.clone());
            }
            reg.entries.push(entry);
        }
        // A revocation is final wherever it stands: registries that several
        // collectors merge (`sync_with_store`) need not hold lines in one order.
        for e in &reg.entries {
            if e.action == Action::Revoked {
                reg.valid.remove(&e.fingerprint);
            }
        }
        Ok(reg)
    }

    /// Reloads when the file changed since it was read; keeps the old state (and says
    /// so) if the new one cannot be read.
    pub fn refresh(&mut self, path: &Path) {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == self.modified {
            return;
        }
        match Registry::load(path) {
            Ok(r) => *self = r,
            Err(e) => {
                tracing::error!(error = %e, "registry unreadable; the previous one stays in use")
            }
        }
    }

    /// The entry in force for a certificate, if it was issued and not revoked.
    pub fn valid(&self, fingerprint: &str) -> Option<&Entry> {
        self.valid.get(fingerprint)
    }

    /// Valid certificates of `id`.
    pub fn valid_for<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.valid.values().filter(move |e| e.id == id)
    }

    /// Valid certificates that expire before `horizon`, soonest first.
    pub fn expiring_before(&self, horizon: jiff::Timestamp) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self
            .valid
            .values()
            .filter(|e| {
                e.not_after
                    .parse::<jiff::Timestamp>()
                    .is_ok_and(|t| t < horizon)
            })
            .collect();
        v.sort_by(|a, b| a.not_after.cmp(&b.not_after));
        v
    }

    /// The latest expiry among `id`'s valid certificates.
    pub fn expiry_of<'a>(&'a self, id: &'a str) -> Option<&'a str> {
        self.valid_for(id).map(|e| e.not_after.as_str()).max()
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Whether an enrollment token (by id) was used already.
    pub fn token_used(&self, token_id: &str) -> bool {
        let by = format!("enrollment token {token_id}");
        self.entries.iter().any(|e| e.by == by)
    }
}

/// Appends `entry` under an exclusive lock (the CLI and the collector may both write).
pub fn append(path: &Path, entry: &Entry) -> Result<(), RegistryError> {
    let io = |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let existed = path.exists();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let mut locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io(std::io::Error::from(e)))?;
    let mut line = serde_json::to_string(entry).unwrap_or_default();
    line.push('\n');
    locked.write_all(line.as_bytes()).map_err(io)?;
    locked.sync_all().map_err(io)?;
    if !existed {
        crate::pki::take_parent_owner(path)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    }
    Ok(())
}

/// What `sync_with_store` has seen: the lines (by hash) offered or taken, the last
/// database line read, and the file's size when it was last read.
#[derive(Debug, Default, Clone)]
pub struct SyncState {
    seen: std::collections::HashSet<u64>,
    pulled_to: i64,
    file_len: Option<u64>,
}

fn line_hash(line: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    line.hash(&mut h);
    h.finish()
}

/// Collectors sharing one database (`broker.shared_group`) share one registry: each
/// offers the lines its own file gained (an enrollment, a revocation, `pki
/// issue-agent` on its host) to the table `registry_lines`, and appends to its file
/// the lines the others offered; its ingest then reloads the file as always. So an
/// agent enrolled at one collector is admitted by all, and a certificate revoked on
/// any collector host is refused by all within a second or two, without copying
/// files. Returns (lines offered, lines taken).
pub fn sync_with_store(
    path: &Path,
    sql: &impl crate::db::Sql,
    state: &mut SyncState,
) -> Result<(usize, usize), RegistryError> {
    use crate::db::params;
    let db = |e: crate::db::Error| RegistryError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("shared registry: {e}")),
    };
    let len = std::fs::metadata(path).map(|m| m.len()).ok();
    let mut offered = 0;
    if len != state.file_len {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(RegistryError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if state.seen.insert(line_hash(line)) {
                offered += sql
                    .execute(
                        "INSERT INTO registry_lines (line) VALUES (?1) ON CONFLICT DO NOTHING",
                        params![line],
                    )
                    .map_err(db)? as usize;
            }
        }
        state.file_len = len;
    }
    let news: Vec<(i64, String)> = sql
        .query_map(
            "SELECT line_id, line FROM registry_lines WHERE line_id > ?1 ORDER BY line_id",
            params![state.pulled_to],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db)?;
    let mut taken = 0;
    for (id, line) in &news {
        state.pulled_to = *id;
        if !state.seen.insert(line_hash(line)) {
            continue;
        }
        // Only lines that read as entries: a line that is not one must not make the
        // file unreadable for ingest.
        let entry: Entry = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(line_id = id, error = %e, "shared registry line is not an entry; skipped");
                continue;
            }
        };
        // As this host writes it (the same text, unless a field's form differs):
        // seen too, so it is not offered back as new.
        state.seen.insert(line_hash(
            &serde_json::to_string(&entry).unwrap_or_default(),
        ));
        append(path, &entry)?;
        taken += 1;
    }
    Ok((offered, taken))
}

/// The registry entry for a certificate file just issued.
pub fn issued_entry(
    cert_pem_path: &Path,
    id: &str,
    role: &str,
    groups: Vec<String>,
    by: &str,
) -> Result<Entry, RegistryError> {
    let der = weilan_config::pem::load_cert(cert_pem_path)
        .map_err(|_| RegistryError::Certificate(cert_pem_path.to_path_buf()))?;
    Ok(entry_for_der(der.as_ref(), id, role, groups, by))
}

pub fn entry_for_der(der: &[u8], id: &str, role: &str, groups: Vec<String>, by: &str) -> Entry {
    let parsed = x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c);
    let not_after = parsed
        .as_ref()
        .and_then(|c| {
            jiff::Timestamp::from_second(c.validity().not_after.timestamp())
                .ok()
                .map(|t| t.to_string())
        })
        .unwrap_or_default();
    let serial = parsed
        .as_ref()
        .map(|c| hex::encode(c.raw_serial()))
        .unwrap_or_default();
    Entry {
        at: jiff::Timestamp::now().to_string(),
        action: Action::Issued,
        id: id.to_string(),
        role: role.to_string(),
        fingerprint: fingerprint(der),
        not_after,
        serial,
        groups,
        by: by.to_string(),
    }
}

/// Revokes every valid certificate of `id` (the registry says so at once; ingest
/// refuses their payloads from the next one) and rewrites the CRL for external
/// brokers. Returns the entries revoked.
pub fn revoke(paths: &PkiPaths, id: &str, reason: &str) -> Result<Vec<Entry>, RegistryError> {
    let reg_path = path(paths);
    let reg = Registry::load(&reg_path)?;
    let now = jiff::Timestamp::now().to_string();
    let mut revoked: Vec<Entry> = reg.valid_for(id).cloned().collect();
    revoked.sort_by(|a, b| a.at.cmp(&b.at));
    for e in &mut revoked {
        e.action = Action::Revoked;
        e.at = now.clone();
        e.by = format!("revoked: {reason}");
        append(&reg_path, e)?;
    }
    write_crl(paths)?;
    Ok(revoked)
}

/// The CRL of every revoked certificate (`crl.pem` beside the CA), for Mosquitto's
/// `crlfile`. Valid until the CA expires, so a broker never starts refusing everyone
/// because an unchanged list went stale; rewritten at every revocation.
pub fn crl_path(paths: &PkiPaths) -> PathBuf {
    paths.dir.join("crl.pem")
}

pub fn write_crl(paths: &PkiPaths) -> Result<PathBuf, RegistryError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| RegistryError::Io { path: p, source }
    };
    let reg = Registry::load(&path(paths))?;
    let mut serials: Vec<(&str, &str)> = reg
        .entries()
        .iter()
        .filter(|e| e.action == Action::Revoked && !e.serial.is_empty())
        .map(|e| (e.serial.as_str(), e.at.as_str()))
        .collect();
    serials.sort();
    serials.dedup_by(|a, b| a.0 == b.0);
    let now = time::OffsetDateTime::now_utc();
    let revoked_certs = serials
        .iter()
        .filter_map(|(serial, at)| {
            let bytes = hex::decode(serial).ok()?;
            let when = at
                .parse::<jiff::Timestamp>()
                .ok()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.as_second()).ok())
                .unwrap_or(now);
            Some(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&bytes),
                revocation_time: when,
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect();
    let ca_der = weilan_config::pem::load_cert(&paths.ca())
        .map_err(|e| RegistryError::Crl(e.to_string()))?;
    let ca_until = x509_parser::parse_x509_certificate(ca_der.as_ref())
        .ok()
        .and_then(|(_, c)| {
            time::OffsetDateTime::from_unix_timestamp(c.validity().not_after.timestamp()).ok()
        })
        .unwrap_or(now + time::Duration::days(3650));
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: ca_until.max(now + time::Duration::days(1)),
        crl_number: rcgen::SerialNumber::from((now.unix_timestamp() as u64).max(1)),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let issuer = crate::pki::load_issuer(paths).map_err(|e| RegistryError::Crl(e.to_string()))?;
    let crl = params
        .signed_by(&issuer)
        .and_then(|c| c.pem())
        .map_err(|e| RegistryError::Crl(e.to_string()))?;
    let out = crl_path(paths);
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, crl).map_err(io(&tmp))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io(&tmp))?;
    crate::pki::take_parent_owner(&tmp).map_err(|e| RegistryError::Crl(e.to_string()))?;
    std::fs::rename(&tmp, &out).map_err(io(&out))?;
    Ok(out)
}

/// A PKI made before the registry existed: register the certificates it issued
/// (`agents/*.pem`, `door-controllers/*.pem`) once, so an upgrade refuses nobody.
pub fn import_if_missing(paths: &PkiPaths) -> Result<usize, RegistryError> {
    let reg = path(paths);
    if reg.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for (sub, role) in [("agents", "agent"), ("door-controllers", "door-controller")] {
        let dir = paths.dir.join(sub);
        let Ok(list) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = list
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "pem")
                    && !p.to_string_lossy().ends_with("-key.pem")
            })
            .collect();
        files.sort();
        for f in files {
            let id = f
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            append(&reg, &issued_entry(&f, &id, role, vec![], "imported")?)?;
            n += 1;
        }
    }
    if n == 0 {
        // An empty registry all the same: the import happens once.
        append_nothing(&reg)?;
    }
    Ok(n)
}

fn append_nothing(path: &Path) -> Result<(), RegistryError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| RegistryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    crate::pki::take_parent_owner(path).map_err(|e| RegistryError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: Action, id: &str, fingerprint: &str, at: &str) -> Entry {
        Entry {
            at: at.into(),
            action,
            id: id.into(),
            role: "agent".into(),
            fingerprint: fingerprint.into(),
            not_after: "2030-01-01T00:00:00Z".into(),
            serial: String::new(),
            groups: vec![],
            by: "test".into(),
        }
    }

    #[test]
    fn a_revocation_counts_wherever_it_stands_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("registry.jsonl");
        append(
            &p,
            &entry(Action::Revoked, "ws-1", "aa", "2026-01-02T00:00:00Z"),
        )
        .unwrap();
        append(
            &p,
            &entry(Action::Issued, "ws-1", "aa", "2026-01-01T00:00:00Z"),
        )
        .unwrap();
        append(
            &p,
            &entry(Action::Issued, "ws-2", "bb", "2026-01-01T00:00:00Z"),
        )
        .unwrap();
        let reg = Registry::load(&p).unwrap();
        assert!(reg.valid("aa").is_none());
        assert!(reg.valid("bb").is_some());
    }

    #[test]
    fn collectors_sharing_a_database_share_enrollments_and_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let (location, _pg) = crate::db::testing::store_location(dir.path());
        let mut store = crate::store::Store::open_at(&location).unwrap();
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        let (mut sa, mut sb) = (SyncState::default(), SyncState::default());
        append(
            &a,
            &entry(Action::Issued, "ws-1", "aa", "2026-01-01T00:00:00Z"),
        )
        .unwrap();
        append(
            &a,
            &entry(Action::Issued, "ws-2", "bb", "2026-01-01T00:00:01Z"),
        )
        .unwrap();
        assert_eq!(
            sync_with_store(&a, &*store.conn(), &mut sa).unwrap(),
            (2, 0)
        );
        // B had no file: it takes both, and offers nothing back.
        assert_eq!(
            sync_with_store(&b, &*store.conn(), &mut sb).unwrap(),
            (0, 2)
        );
        assert_eq!(
            sync_with_store(&b, &*store.conn(), &mut sb).unwrap(),
            (0, 0)
        );
        assert!(Registry::load(&b).unwrap().valid("aa").is_some());
        // Revoked on B's host: A refuses it after its next look.
        append(
            &b,
            &entry(Action::Revoked, "ws-1", "aa", "2026-01-03T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            sync_with_store(&b, &*store.conn(), &mut sb).unwrap(),
            (1, 0)
        );
        assert_eq!(
            sync_with_store(&a, &*store.conn(), &mut sa).unwrap(),
            (0, 1)
        );
        assert_eq!(
            sync_with_store(&a, &*store.conn(), &mut sa).unwrap(),
            (0, 0)
        );
        let reg = Registry::load(&a).unwrap();
        assert!(reg.valid("aa").is_none());
        assert!(reg.valid("bb").is_some());
        assert_eq!(reg.entries().len(), 3);
        // A line that is no entry is skipped, not written into a file.
        use crate::db::Sql;
        store
            .conn()
            .execute(
                "INSERT INTO registry_lines (line) VALUES ('not json')",
                crate::db::params![],
            )
            .unwrap();
        assert_eq!(
            sync_with_store(&a, &*store.conn(), &mut sa).unwrap(),
            (0, 0)
        );
        assert_eq!(Registry::load(&a).unwrap().entries().len(), 3);
    }

    #[test]
    fn issued_then_revoked_and_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path().join("pki"));
        crate::pki::init(&paths, &[]).unwrap();
        // issue-agent registers what it issues.
        let (cert, _) = crate::pki::issue_agent(&paths, "ws-01").unwrap();
        let reg = Registry::load(&path(&paths)).unwrap();
        let der = weilan_config::pem::load_cert(&cert).unwrap();
        let e = reg.valid(&fingerprint(der.as_ref())).expect("registered");
        assert_eq!((e.id.as_str(), e.role.as_str()), ("ws-01", "agent"));
        assert!(e.not_after.starts_with('2'), "{e:?}");
        // A revocation line takes it out.
        let mut revoked = e.clone();
        revoked.action = Action::Revoked;
        append(&path(&paths), &revoked).unwrap();
        let reg = Registry::load(&path(&paths)).unwrap();
        assert!(reg.valid(&fingerprint(der.as_ref())).is_none());
        assert_eq!(reg.entries().len(), 2);
        // A registry present is never imported again.
        assert_eq!(import_if_missing(&paths).unwrap(), 0);
        // A broken line names the file and line.
        std::fs::write(path(&paths), "{}\n").unwrap();
        let err = Registry::load(&path(&paths)).unwrap_err().to_string();
        assert!(err.contains("registry.jsonl:1:"), "{err}");
    }

    #[test]
    fn revoking_takes_an_agent_out_and_lists_it_in_the_crl() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path().join("pki"));
        crate::pki::init(&paths, &[]).unwrap();
        // pki init writes an empty CRL (a broker with crlfile must start).
        let empty = std::fs::read(crl_path(&paths)).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&empty).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der.contents).unwrap();
        assert_eq!(crl.iter_revoked_certificates().count(), 0);
        let (a, _) = crate::pki::issue_agent(&paths, "ws-a").unwrap();
        let (b, _) = crate::pki::issue_agent(&paths, "ws-b").unwrap();
        let revoked = revoke(&paths, "ws-a", "stolen").unwrap();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].by, "revoked: stolen");
        assert!(revoke(&paths, "ws-a", "again").unwrap().is_empty());
        let reg = Registry::load(&path(&paths)).unwrap();
        let fp = |p: &Path| fingerprint(weilan_config::pem::load_cert(p).unwrap().as_ref());
        assert!(reg.valid(&fp(&a)).is_none());
        assert!(reg.valid(&fp(&b)).is_some());
        let pem = std::fs::read(crl_path(&paths)).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der.contents).unwrap();
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        assert_eq!(serials, [revoked[0].serial.clone()]);
        assert!(crl.next_update().is_some());
    }

    #[test]
    fn an_old_pki_is_imported() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path().join("pki"));
        crate::pki::init(&paths, &[]).unwrap();
        crate::pki::issue_agent(&paths, "ws-01").unwrap();
        crate::pki::issue_door_controller(&paths, "ctl-1").unwrap();
        std::fs::remove_file(path(&paths)).unwrap(); // as a PKI of the previous release
        assert_eq!(import_if_missing(&paths).unwrap(), 2);
        let reg = Registry::load(&path(&paths)).unwrap();
        assert_eq!(reg.entries().len(), 2);
        assert!(reg.entries().iter().all(|e| e.by == "imported"));
    }
}
