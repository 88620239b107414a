//! The Weilan PKI: one CA, a server certificate for the broker, a client certificate
//! for the collector, and one client certificate per agent (CN = agent id).
//!
//! Certificates carry their role in the organizational unit (`weilan-agent`,
//! `weilan-collector`), which [`weilan_config::signing`] checks. Keys are ECDSA P-256,
//! written 0600. Files (all PEM) in the PKI directory:
//!
//! | file                                   | what                                   |
//! |----------------------------------------|----------------------------------------|
//! | `ca.pem`, `ca-key.pem`                 | the CA (keep the key offline in production) |
//! | `server.pem`, `server-key.pem`         | broker TLS server certificate          |
//! | `collector.pem`, `collector-key.pem`   | the collector's MQTT client identity; signs acks and commands |
//! | `agents/NAME.pem`, `agents/NAME-key.pem` | one agent's identity                 |

pub mod registry;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use weilan_config::signing::Role;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("`{0}` is not a valid agent id (use letters, digits, `.`, `_`, `-`; at most 64)")]
    BadName(String),
    #[error("`{0}` is reserved for the collector")]
    Reserved(String),
    #[error(
        "`{0}` is not a collector name: use `weilan-collector-` and letters, digits, `.`, `_`, `-`"
    )]
    BadCollectorName(String),
    #[error(
        "`{0}` is not a district name: use `weilan-district-` and letters, digits, `.`, `_`, `-`"
    )]
    BadDistrictName(String),
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
}

/// Paths of the files `pki init` writes.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub dir: PathBuf,
}

impl PkiPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PkiPaths { dir: dir.into() }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn server(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    pub fn collector(&self) -> PathBuf {
        self.dir.join("collector.pem")
    }
    pub fn collector_key(&self) -> PathBuf {
        self.dir.join("collector-key.pem")
    }
    /// A further collector's certificate (`pki issue-collector`), beside the first's.
    pub fn other_collector(&self, name: &str) -> PathBuf {
        self.dir.join("collectors").join(format!("{name}.pem"))
    }
    pub fn other_collector_key(&self, name: &str) -> PathBuf {
        self.dir.join("collectors").join(format!("{name}-key.pem"))
    }
    /// A district's certificate from this province's CA (`pki issue-district`).
    pub fn district(&self, name: &str) -> PathBuf {
        self.dir.join("districts").join(format!("{name}.pem"))
    }
    pub fn district_key(&self, name: &str) -> PathBuf {
        self.dir.join("districts").join(format!("{name}-key.pem"))
    }
    pub fn agent(&self, name: &str) -> PathBuf {
        self.dir.join("agents").join(format!("{name}.pem"))
    }
    pub fn agent_key(&self, name: &str) -> PathBuf {
        self.dir.join("agents").join(format!("{name}-key.pem"))
    }
    pub fn door_controller(&self, name: &str) -> PathBuf {
        self.dir
            .join("door-controllers")
            .join(format!("{name}.pem"))
    }
    pub fn door_controller_key(&self, name: &str) -> PathBuf {
        self.dir
            .join("door-controllers")
            .join(format!("{name}-key.pem"))
    }
}

const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 825;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn write_public(path: &Path, pem: &str) -> Result<(), PkiError> {
    create_parent(path)?;
    fs::write(path, pem).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io_err(path))?;
    take_parent_owner(path)
}

/// Creates `path`'s parent (and gives a new one the owner of its own parent).
fn create_parent(path: &Path) -> Result<(), PkiError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    if !parent.exists() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        take_parent_owner(parent)?;
    }
    Ok(())
}

/// Gives `path` the owner and group of its directory. Root runs `pki` commands, but
/// the collector service reads these files as its own user (`weilan`, whose
/// `/etc/weilan/pki` tmpfiles.d creates): the files follow the directory rather than
/// whoever typed the command. Nothing changes when they already match.
pub(crate) fn take_parent_owner(path: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::MetadataExt;
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    let dir = fs::metadata(parent).map_err(io_err(parent))?;
    let file = fs::symlink_metadata(path).map_err(io_err(path))?;
    if (file.uid(), file.gid()) != (dir.uid(), dir.gid()) {
        std::os::unix::fs::lchown(path, Some(dir.uid()), Some(dir.gid())).map_err(io_err(path))?;
    }
    Ok(())
}

fn write_secret(path: &Path, pem: &str) -> Result<(), PkiError> {
    create_parent(path)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_path_buf())
            } else {
                PkiError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    f.write_all(pem.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    take_parent_owner(path)
}

fn dn(cn: &str, ou: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(ou) = ou {
        dn.push(DnType::OrganizationalUnitName, ou);
    }
    dn
}

pub(crate) fn load_issuer(paths: &PkiPaths) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let ca_pem = fs::read_to_string(paths.ca()).map_err(io_err(&paths.ca()))?;
    let key_pem = fs::read_to_string(paths.ca_key()).map_err(io_err(&paths.ca_key()))?;
    let key = KeyPair::from_pem(&key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca_pem, key)?)
}

/// True when `pki init` has been run in `paths.dir`.
pub fn is_initialized(paths: &PkiPaths) -> bool {
    paths.ca().exists() && paths.ca_key().exists()
}

/// The name every broker certificate carries: agents (`collector.server_name`) and the
/// collector's own connection (`broker.server_name`) check it by default, whatever
/// address they dial, so a site's host names (`--name`) are added to it, never
/// instead of it.
pub const PROTOCOL_SERVER_NAME: &str = "weilan-collector";

/// The names the broker certificate carries: [`PROTOCOL_SERVER_NAME`] first, then
/// `site_names` in order, without repeats.
pub fn server_names(site_names: &[String]) -> Vec<String> {
    let mut names = vec![PROTOCOL_SERVER_NAME.to_string()];
    for n in site_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// Creates the CA, the broker's server certificate (for [`server_names`] of
/// `site_names`) and the collector's client certificate. Refuses to overwrite existing
/// keys. The directory is created 0700; every file takes the owner and group of the
/// directory (see [`write_secret`]), so a directory made for the service user by
/// tmpfiles.d gives that user its keys even when root runs this.
pub fn init(paths: &PkiPaths, site_names: &[String]) -> Result<(), PkiError> {
    let server_names = server_names(site_names);
    fs::create_dir_all(&paths.dir).map_err(io_err(&paths.dir))?;
    fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err(&paths.dir))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = dn("Weilan CA", None);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, CA_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;
    write_secret(&paths.ca_key(), &ca_key.serialize_pem())?;
    write_public(&paths.ca(), &ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);

    // Broker server certificate.
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(server_names.clone())?;
    for name in &server_names {
        if let Ok(ip) = name.parse() {
            p.subject_alt_names
                .retain(|s| !matches!(s, SanType::DnsName(n) if n.as_str() == name));
            p.subject_alt_names.push(SanType::IpAddress(ip));
        }
    }
    p.distinguished_name = dn(
        site_names.first().map_or(PROTOCOL_SERVER_NAME, |s| s),
        Some("weilan-broker"),
    );
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut p, LEAF_DAYS);
    let cert = p.signed_by(&key, &issuer)?;
    write_secret(&paths.server_key(), &key.serialize_pem())?;
    write_public(&paths.server(), &cert.pem())?;

    issue_client(
        &issuer,
        "weilan-collector",
        Role::Collector,
        &paths.collector(),
        &paths.collector_key(),
    )?;
    // An empty registry: only what is issued from now on is enrolled. And an empty
    // CRL, so that a broker configured with `crlfile` starts.
    crate::registry::import_if_missing(paths)?;
    crate::registry::write_crl(paths)?;
    Ok(())
}

fn issue_client(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    role: Role,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(name, Some(role.ou()));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut p, LEAF_DAYS);
    let cert = p.signed_by(&key, issuer)?;
    write_secret(key_path, &key.serialize_pem())?;
    write_public(cert_path, &cert.pem())
}

/// A certificate for `id` that lives ten minutes and exists only in memory: the
/// collector connects with it once to end the session a revoked certificate still
/// holds (the broker binds the client id to the certificate's name, so the newer
/// connection replaces the older one). Its OU says what it is for; it is not in the
/// registry, so nothing it could sign would be accepted.
pub fn session_breaker(
    paths: &PkiPaths,
    id: &str,
) -> Result<
    (
        rustls_pki_types::CertificateDer<'static>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    PkiError,
> {
    let issuer = load_issuer(paths)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(id, Some("weilan-session-breaker"));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::minutes(10);
    let cert = p.signed_by(&key, &issuer)?;
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((cert.der().clone(), key_der))
}

/// Issues an agent certificate with CN = `name` valid from `not_before` to
/// `not_after` (a short-lived identity, or one part way through its life), recorded
/// in the registry like any other; returns (cert, key) paths.
pub fn issue_agent_valid(
    paths: &PkiPaths,
    name: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let (cert, key) = (paths.agent(name), paths.agent_key(name));
    let issuer = load_issuer(paths)?;
    let pair = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(name, Some(Role::Agent.ou()));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = not_before;
    p.not_after = not_after;
    let issued = p.signed_by(&pair, &issuer)?;
    write_secret(&key, &pair.serialize_pem())?;
    write_public(&cert, &issued.pem())?;
    crate::registry::append(
        &crate::registry::path(paths),
        &crate::registry::entry_for_der(issued.der(), name, "agent", vec![], "pki issue-agent"),
    )?;
    Ok((cert, key))
}

/// Issues the client certificate of a further collector sharing the ingest
/// (`broker.shared_group`): CN = `name`, which is also its MQTT client id and its
/// user in the broker's ACL, so each collector of a group needs its own. Names start
/// with `weilan-collector-`, a prefix no agent or door controller may take. Refuses
/// to overwrite a key.
pub fn issue_collector(paths: &PkiPaths, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    let rest = name.strip_prefix("weilan-collector-").unwrap_or("");
    if rest.is_empty() || !weilan_config::topics::valid_agent_id(name) {
        return Err(PkiError::BadCollectorName(name.to_string()));
    }
    let (cert, key) = (paths.other_collector(name), paths.other_collector_key(name));
    if cert.exists() {
        return Err(PkiError::Exists(cert));
    }
    let issuer = load_issuer(paths)?;
    issue_client(&issuer, name, Role::Collector, &cert, &key)?;
    crate::registry::append(
        &crate::registry::path(paths),
        &crate::registry::issued_entry(&cert, name, "collector", vec![], "pki issue-collector")?,
    )?;
    Ok((cert, key))
}

/// Issues a district collector's client certificate from this (province) CA:
/// CN = `name`, role `weilan-district`. The district connects to the province broker
/// with it (its broker user; `broker-acl --district`) and forwards its agents'
/// batches under it; it signs nothing the province trusts. Names start with
/// `weilan-district-`, a prefix no agent may take. Refuses to overwrite a key.
pub fn issue_district(paths: &PkiPaths, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    if !weilan_config::settings::federation::valid_district_name(name) {
        return Err(PkiError::BadDistrictName(name.to_string()));
    }
    let (cert, key) = (paths.district(name), paths.district_key(name));
    if cert.exists() {
        return Err(PkiError::Exists(cert));
    }
    let issuer = load_issuer(paths)?;
    issue_client(&issuer, name, Role::District, &cert, &key)?;
    crate::registry::append(
        &crate::registry::path(paths),
        &crate::registry::issued_entry(&cert, name, "district", vec![], "pki issue-district")?,
    )?;
    Ok((cert, key))
}

/// Issues an agent certificate with CN = `name`; returns (cert, key) paths.
pub fn issue_agent(paths: &PkiPaths, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    issue_named(
        paths,
        name,
        Role::Agent,
        (paths.agent(name), paths.agent_key(name)),
        (paths.door_controller(name), "a door controller"),
    )
}

/// Issues a door controller certificate with CN = `name` (its controller id).
pub fn issue_door_controller(paths: &PkiPaths, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    issue_named(
        paths,
        name,
        Role::DoorController,
        (paths.door_controller(name), paths.door_controller_key(name)),
        (paths.agent(name), "an agent"),
    )
}

/// Issues a client certificate of `role` with CN = `name` into (cert, key). Agents and
/// door controllers share one name space, as their events share one store: a name the
/// other kind holds (`taken`) is refused, as are invalid and collector names.
fn issue_named(
    paths: &PkiPaths,
    name: &str,
    role: Role,
    (cert, key): (PathBuf, PathBuf),
    (taken, by): (PathBuf, &str),
) -> Result<(PathBuf, PathBuf), PkiError> {
    if !weilan_config::topics::valid_agent_id(name) {
        return Err(PkiError::BadName(name.to_string()));
    }
    if name.starts_with("weilan-collector") || name.starts_with("weilan-district") {
        return Err(PkiError::Reserved(name.to_string()));
    }
    if taken.exists() {
        return Err(PkiError::Reserved(format!("{name} ({by})")));
    }
    let issuer = load_issuer(paths)?;
    issue_client(&issuer, name, role, &cert, &key)?;
    let role_name = match role {
        Role::DoorController => "door-controller",
        _ => "agent",
    };
    let by = match role {
        Role::DoorController => "pki issue-door-controller",
        _ => "pki issue-agent",
    };
    crate::registry::append(
        &crate::registry::path(paths),
        &crate::registry::issued_entry(&cert, name, role_name, vec![], by)?,
    )?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weilan_config::signing::{Signer, Verifier};
    use weilan_config::wire::Purpose;

    #[test]
    fn a_further_collector_gets_a_collector_certificate_under_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path());
        init(&paths, &["weilan-collector".into(), "127.0.0.1".into()]).unwrap();
        let (cert, key) = issue_collector(&paths, "weilan-collector-b").unwrap();
        let signer = Signer::from_pem_files(&cert, &key).unwrap();
        assert_eq!(signer.identity().common_name, "weilan-collector-b");
        let verifier = Verifier::from_ca_file(&paths.ca()).unwrap();
        let msg = signer.sign(Purpose::Ack, "{}".into());
        assert!(verifier.verify(&msg, Purpose::Ack, Role::Collector).is_ok());
        assert!(verifier.verify(&msg, Purpose::Ack, Role::Agent).is_err());
        assert!(matches!(
            issue_collector(&paths, "weilan-collector-b"),
            Err(PkiError::Exists(_))
        ));
        for bad in [
            "ws-01",
            "weilan-collector",
            "weilan-collector-",
            "weilan-collector-b/x",
        ] {
            assert!(
                matches!(
                    issue_collector(&paths, bad),
                    Err(PkiError::BadCollectorName(_))
                ),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn a_district_gets_a_district_certificate_no_agent_can_take_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path());
        init(&paths, &["weilan-collector".into(), "127.0.0.1".into()]).unwrap();
        let (cert, key) = issue_district(&paths, "weilan-district-east").unwrap();
        let signer = Signer::from_pem_files(&cert, &key).unwrap();
        assert_eq!(signer.identity().role, Role::District);
        let verifier = Verifier::from_ca_file(&paths.ca()).unwrap();
        let msg = signer.sign(Purpose::Ack, "{}".into());
        assert!(verifier.verify(&msg, Purpose::Ack, Role::District).is_ok());
        // Not a collector: its signature on an ack or a command counts for nothing.
        assert!(verifier
            .verify(&msg, Purpose::Ack, Role::Collector)
            .is_err());
        assert!(matches!(
            issue_district(&paths, "weilan-district-east"),
            Err(PkiError::Exists(_))
        ));
        for bad in [
            "ws-01",
            "weilan-district-",
            "weilan-collector-b",
            "weilan-district-a/x",
        ] {
            assert!(
                matches!(
                    issue_district(&paths, bad),
                    Err(PkiError::BadDistrictName(_))
                ),
                "{bad} accepted"
            );
        }
        assert!(matches!(
            issue_agent(&paths, "weilan-district-west"),
            Err(PkiError::Reserved(_))
        ));
    }

    #[test]
    fn issued_certificates_sign_and_verify_with_their_roles() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path());
        init(&paths, &["weilan-collector".into(), "127.0.0.1".into()]).unwrap();
        let (cert, key) = issue_agent(&paths, "ws-01").unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let signer = Signer::from_pem_files(&cert, &key).unwrap();
        assert_eq!(signer.identity().common_name, "ws-01");
        let verifier = Verifier::from_ca_file(&paths.ca()).unwrap();
        let msg = signer.sign(Purpose::Batch, "{}".into());
        let id = verifier.verify(&msg, Purpose::Batch, Role::Agent).unwrap();
        assert_eq!(id.common_name, "ws-01");
        // Wrong purpose, wrong role and a changed body are all refused.
        assert!(verifier.verify(&msg, Purpose::Ack, Role::Agent).is_err());
        assert!(verifier
            .verify(&msg, Purpose::Batch, Role::Collector)
            .is_err());
        let mut edited = msg.clone();
        edited.body = "{ }".into();
        assert!(verifier
            .verify(&edited, Purpose::Batch, Role::Agent)
            .is_err());
        // A certificate from another CA is refused.
        let other = tempfile::tempdir().unwrap();
        let other_paths = PkiPaths::new(other.path());
        init(&other_paths, &["weilan-collector".into()]).unwrap();
        let (c2, k2) = issue_agent(&other_paths, "ws-01").unwrap();
        let foreign = Signer::from_pem_files(&c2, &k2).unwrap();
        let msg = foreign.sign(Purpose::Batch, "{}".into());
        assert!(matches!(
            verifier.verify(&msg, Purpose::Batch, Role::Agent),
            Err(weilan_config::signing::VerifyError::Untrusted(_))
        ));
        // Keys are never overwritten.
        assert!(matches!(
            issue_agent(&paths, "ws-01"),
            Err(PkiError::Exists(_))
        ));
        assert!(matches!(
            issue_agent(&paths, "weilan-collector"),
            Err(PkiError::Reserved(_))
        ));
        // Agents and door controllers share one name space; each has its own role.
        assert!(matches!(
            issue_door_controller(&paths, "ws-01"),
            Err(PkiError::Reserved(_))
        ));
        let (cert, key) = issue_door_controller(&paths, "ctl-1").unwrap();
        let msg = Signer::from_pem_files(&cert, &key)
            .unwrap()
            .sign(Purpose::DoorEvent, "{}".into());
        let id = verifier
            .verify(&msg, Purpose::DoorEvent, Role::DoorController)
            .unwrap();
        assert_eq!(id.common_name, "ctl-1");
        assert!(matches!(
            issue_agent(&paths, "ctl-1"),
            Err(PkiError::Reserved(_))
        ));
    }
}

#[cfg(test)]
mod server_name_tests {
    use super::*;

    fn dns_names(pem_path: &Path) -> Vec<String> {
        let der = weilan_config::pem::load_cert(pem_path).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                x509_parser::extensions::GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// Regression: `pki init --name collector.example.internal` (the README's step 1)
    /// issued a broker certificate without the name the collector and every agent
    /// check by default, so the collector could not reach its own broker.
    #[test]
    fn a_site_host_name_is_added_to_the_protocol_name_not_put_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(dir.path().join("pki"));
        init(&paths, &["collector.example.internal".into()]).unwrap();
        let names = dns_names(&paths.server());
        assert_eq!(names, ["weilan-collector", "collector.example.internal"]);
        assert_eq!(
            server_names(&["weilan-collector".into(), "a".into(), "a".into()]),
            ["weilan-collector", "a"]
        );
    }

    /// Files take the owner of the PKI directory (the service user's, made by
    /// tmpfiles.d), whoever runs the command.
    #[test]
    fn issued_files_take_the_owner_of_the_pki_directory() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: changing owners needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        fs::create_dir(&pki_dir).unwrap();
        std::os::unix::fs::chown(&pki_dir, Some(65534), Some(65534)).unwrap();
        let paths = PkiPaths::new(&pki_dir);
        init(&paths, &[]).unwrap();
        issue_agent(&paths, "ws-01").unwrap();
        for f in [
            paths.ca(),
            paths.ca_key(),
            paths.server_key(),
            paths.collector_key(),
            paths.agent_key("ws-01"),
            pki_dir.join("agents"),
        ] {
            let m = fs::metadata(&f).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", f.display());
        }
        let key_mode = fs::metadata(paths.server_key()).unwrap().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
    }
}
