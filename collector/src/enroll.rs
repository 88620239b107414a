//! Enrollment on the collector: one-time tokens (`weilan-collector enroll create`) and
//! the TLS listener where agents trade a token and a CSR for their certificate.
//!
//! Tokens live in the PKI directory (`enroll-tokens.jsonl`), as SHA-256 of their
//! secret only: whoever reads the file cannot enroll. A token is single-use (the
//! registry records which token issued which certificate), expires, may carry host
//! groups, and may allow replacing one already enrolled id (an admin's `--replace`);
//! without it an enrolled id is refused. The certificate's common name is the agent
//! id asked for; every other field of the CSR is ignored. Every refusal is logged and
//! raised as a `collector.enrollment_refused` finding.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rcgen::{
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use weilan_config::enroll::{Request, Response, Token, MAX_LINE};
use weilan_config::signing::Role;

use crate::pki::PkiPaths;
use crate::registry::{self, Registry};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error("{0}")]
    Invalid(String),
}

/// One line of `enroll-tokens.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 (hex) of the secret.
    pub secret_sha256: String,
    pub created_at: String,
    pub expires_at: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// The enrolled id this token may replace (an admin's decision), if any.
    #[serde(default)]
    pub replace: Option<String>,
}

pub fn tokens_path(paths: &PkiPaths) -> PathBuf {
    paths.dir.join("enroll-tokens.jsonl")
}

/// Creates `count` tokens valid for `ttl`; returns them (shown once, never stored).
pub fn create_tokens(
    paths: &PkiPaths,
    count: usize,
    ttl: jiff::SignedDuration,
    groups: Vec<String>,
    replace: Option<String>,
) -> Result<Vec<String>, EnrollError> {
    use rand::RngCore;
    if let Some(id) = &replace {
        if !weilan_config::topics::valid_agent_id(id) {
            return Err(EnrollError::Invalid(format!("`{id}` is not an agent id")));
        }
    }
    let ca = weilan_config::pem::load_cert(&paths.ca())
        .map_err(|e| EnrollError::Invalid(format!("{}: {e}", paths.ca().display())))?;
    let ca_sha256: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, ca.as_ref())
        .as_ref()
        .try_into()
        .unwrap_or([0; 32]);
    let now = jiff::Timestamp::now();
    let path = tokens_path(paths);
    let existed = path.exists();
    let io = |source| EnrollError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    let mut out = Vec::with_capacity(count);
    let mut rng = rand::rng();
    for _ in 0..count {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        let token = Token {
            id: hex::encode(id),
            secret,
            ca_sha256,
        };
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_digest(),
            created_at: now.to_string(),
            expires_at: (now + ttl).to_string(),
            groups: groups.clone(),
            replace: replace.clone(),
        };
        let mut line = serde_json::to_string(&record).unwrap_or_default();
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(io)?;
        out.push(token.encode());
    }
    file.sync_all().map_err(io)?;
    if !existed {
        crate::pki::take_parent_owner(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(out)
}

fn load_tokens(paths: &PkiPaths) -> Result<Vec<TokenRecord>, EnrollError> {
    let path = tokens_path(paths);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(source) => return Err(EnrollError::Io { path, source }),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| EnrollError::Invalid(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// Signs CSRs for valid tokens. One at a time (the lock), so a token cannot be used
/// twice by two requests racing.
pub struct Enroller {
    pub paths: PkiPaths,
    pub cert_days: u32,
    lock: Mutex<()>,
}

/// A refused enrollment: what the agent is told and what the operator sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub token_id: Option<String>,
    pub agent_id: String,
    pub reason: String,
}

impl Enroller {
    pub fn new(paths: PkiPaths, cert_days: u32) -> Self {
        Enroller {
            paths,
            cert_days,
            lock: Mutex::new(()),
        }
    }

    /// Checks the request and issues the certificate; the registry records it.
    pub fn enroll(&self, req: &Request, now: jiff::Timestamp) -> Result<Response, Refusal> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let refuse = |token_id: Option<&str>, reason: String| Refusal {
            token_id: token_id.map(str::to_string),
            agent_id: req.agent_id.clone(),
            reason,
        };
        let token = Token::parse(&req.token).map_err(|e| refuse(None, format!("token: {e}")))?;
        let tid = Some(token.id.as_str());
        let internal = |e: &dyn std::fmt::Display| refuse(tid, format!("collector error: {e}"));
        let records = load_tokens(&self.paths).map_err(|e| internal(&e))?;
        let Some(record) = records.iter().find(|r| r.id == token.id) else {
            return Err(refuse(
                tid,
                "unknown token (forged, or from another collector)".into(),
            ));
        };
        // Digests are compared, not secrets: how long the comparison takes says
        // nothing an attacker could use without a SHA-256 preimage.
        if token.secret_digest() != record.secret_sha256 {
            return Err(refuse(tid, "wrong token secret (forged)".into()));
        }
        let expires: jiff::Timestamp = record
            .expires_at
            .parse()
            .map_err(|e: jiff::Error| internal(&e))?;
        if now >= expires {
            return Err(refuse(tid, format!("token expired at {expires}")));
        }
        let reg_path = registry::path(&self.paths);
        let reg = Registry::load(&reg_path).map_err(|e| internal(&e))?;
        if reg.token_used(&token.id) {
            return Err(refuse(tid, "token already used (single use)".into()));
        }
        let id = req.agent_id.as_str();
        if !weilan_config::topics::valid_agent_id(id) || id.starts_with("weilan-collector") {
            return Err(refuse(tid, format!("`{id}` is not a valid agent id")));
        }
        let enrolled: Vec<_> = reg.valid_for(id).cloned().collect();
        if enrolled.iter().any(|e| e.role != "agent") {
            return Err(refuse(tid, format!("`{id}` is a door controller's name")));
        }
        if !enrolled.is_empty() && record.replace.as_deref() != Some(id) {
            return Err(refuse(
                tid,
                format!(
                    "`{id}` is enrolled already; re-enrolling it needs a token made with `enroll create --replace {id}`"
                ),
            ));
        }
        let csr = CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| refuse(tid, format!("certificate request: {e}")))?;
        let (cert_pem, der) = self
            .sign(csr, id, now)
            .map_err(|e| refuse(tid, format!("signing: {e}")))?;
        let by = format!("enrollment token {}", token.id);
        for old in &enrolled {
            let mut revoked = old.clone();
            revoked.action = registry::Action::Revoked;
            revoked.at = now.to_string();
            revoked.by = format!("replaced by {by}");
            registry::append(&reg_path, &revoked).map_err(|e| internal(&e))?;
        }
        let entry = registry::entry_for_der(&der, id, "agent", record.groups.clone(), &by);
        registry::append(&reg_path, &entry).map_err(|e| internal(&e))?;
        if !enrolled.is_empty() {
            // The replaced certificates go into the CRL the brokers read.
            registry::write_crl(&self.paths).map_err(|e| internal(&e))?;
        }
        let ca = std::fs::read_to_string(self.paths.ca()).map_err(|e| internal(&e))?;
        tracing::info!(agent_id = id, token = %token.id, fingerprint = %entry.fingerprint, replaced = enrolled.len(), "agent enrolled");
        Ok(Response {
            cert: Some(cert_pem),
            ca: Some(ca),
            groups: record.groups.clone(),
            error: None,
        })
    }

    /// Renews the certificate the client authenticated with (`peer`, DER): it must be
    /// enrolled, not revoked, an agent's, and for `req.agent_id`. The new one keeps the
    /// groups; the old one stays valid until its end (batches signed with it may still
    /// be on their way).
    pub fn renew(
        &self,
        req: &Request,
        peer: Option<&[u8]>,
        now: jiff::Timestamp,
    ) -> Result<Response, Refusal> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let refuse = |reason: String| Refusal {
            token_id: None,
            agent_id: req.agent_id.clone(),
            reason: format!("renewal: {reason}"),
        };
        let Some(der) = peer else {
            return Err(refuse("no client certificate".into()));
        };
        let reg_path = registry::path(&self.paths);
        let reg = registry::Registry::load(&reg_path).map_err(|e| refuse(e.to_string()))?;
        let fingerprint = registry::fingerprint(der);
        let Some(current) = reg.valid(&fingerprint) else {
            return Err(refuse(
                "the client certificate is not enrolled or was revoked".into(),
            ));
        };
        if current.id != req.agent_id || current.role != "agent" {
            return Err(refuse(format!(
                "the client certificate is {} `{}`'s",
                current.role, current.id
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| refuse(format!("certificate request: {e}")))?;
        let (cert_pem, new_der) = self
            .sign(csr, &req.agent_id, now)
            .map_err(|e| refuse(format!("signing: {e}")))?;
        let by = format!("renewal of {}", &fingerprint[..16]);
        let entry = registry::entry_for_der(
            &new_der,
            &req.agent_id,
            "agent",
            current.groups.clone(),
            &by,
        );
        registry::append(&reg_path, &entry).map_err(|e| refuse(e.to_string()))?;
        let ca = std::fs::read_to_string(self.paths.ca()).map_err(|e| refuse(e.to_string()))?;
        tracing::info!(agent_id = %req.agent_id, old = %&fingerprint[..16], new = %&entry.fingerprint[..16], not_after = %entry.not_after, "agent certificate renewed");
        Ok(Response {
            cert: Some(cert_pem),
            ca: Some(ca),
            groups: current.groups.clone(),
            error: None,
        })
    }

    fn sign(
        &self,
        mut csr: CertificateSigningRequestParams,
        id: &str,
        now: jiff::Timestamp,
    ) -> Result<(String, Vec<u8>), EnrollError> {
        // Only the key comes from the request: name, usages and lifetime are ours.
        let p = &mut csr.params;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id);
        dn.push(DnType::OrganizationalUnitName, Role::Agent.ou());
        p.distinguished_name = dn;
        p.subject_alt_names.clear();
        p.is_ca = rcgen::IsCa::NoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let start = time::OffsetDateTime::from_unix_timestamp(now.as_second())
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
        p.not_before = start - time::Duration::hours(1);
        p.not_after = start + time::Duration::days(i64::from(self.cert_days));
        let issuer = crate::pki::load_issuer(&self.paths)?;
        let cert = csr
            .signed_by(&issuer)
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
        Ok((cert.pem(), cert.der().to_vec()))
    }
}

/// The TLS configuration of the enrollment listener: the broker's server certificate,
/// sent with the CA so that an agent holding only the CA's digest (from its token)
/// can check both.
pub fn server_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, EnrollError> {
    let bad =
        |p: &std::path::Path, e: String| EnrollError::Invalid(format!("{}: {e}", p.display()));
    let mut chain = weilan_config::pem::load_certs(cert).map_err(|e| bad(cert, e))?;
    chain.push(weilan_config::pem::load_cert(ca).map_err(|e| bad(ca, e))?);
    let key = weilan_config::pem::load_key(key).map_err(|e| bad(key, e))?;
    let config = rustls::ServerConfig::builder_with_provider(weilan_config::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| EnrollError::Invalid(e.to_string()))?
        .with_client_cert_verifier(client_verifier(ca)?)
        .with_single_cert(chain, key)
        .map_err(|e| EnrollError::Invalid(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Client certificates are optional here: an enrollment has none (the token is its
/// authority), a renewal presents the agent's current one, checked against the CA.
fn client_verifier(
    ca: &std::path::Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, EnrollError> {
    let roots = weilan_config::tls::roots(ca).map_err(|e| EnrollError::Invalid(e.to_string()))?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        weilan_config::tls::provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| EnrollError::Invalid(e.to_string()))
}

/// Serves enrollments until `shutdown`. Each connection: one request line, one
/// response line, within 10 s (a silent client holds only its own task). Refusals go
/// to `refused` (findings for the rules).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    enroller: Arc<Enroller>,
    refused: tokio::sync::mpsc::Sender<Refusal>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "enrollment accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, enroller, refused) = (acceptor.clone(), enroller.clone(), refused.clone());
        tokio::spawn(async move {
            let work = handle(acceptor, tcp, peer, enroller, refused);
            if tokio::time::timeout(std::time::Duration::from_secs(10), work)
                .await
                .is_err()
            {
                tracing::warn!(%peer, "enrollment connection timed out");
            }
        });
    }
}

async fn handle(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    enroller: Arc<Enroller>,
    refused: tokio::sync::mpsc::Sender<Refusal>,
) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let peer_cert: Option<Vec<u8>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let (read, mut write) = tokio::io::split(tls);
    let mut reader = tokio::io::BufReader::new(read).take(MAX_LINE as u64);
    let mut line = String::new();
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Err(Refusal {
            token_id: None,
            agent_id: String::new(),
            reason: format!("malformed request: {e}"),
        }),
        Ok(req) => {
            let e = enroller.clone();
            tokio::task::spawn_blocking(move || {
                if req.renew {
                    e.renew(&req, peer_cert.as_deref(), jiff::Timestamp::now())
                } else {
                    e.enroll(&req, jiff::Timestamp::now())
                }
            })
            .await
            .unwrap_or_else(|e| {
                Err(Refusal {
                    token_id: None,
                    agent_id: String::new(),
                    reason: format!("collector error: {e}"),
                })
            })
        }
    };
    let response = match response {
        Ok(r) => r,
        Err(refusal) => {
            tracing::warn!(%peer, agent_id = %refusal.agent_id, token = ?refusal.token_id, reason = %refusal.reason, "enrollment refused");
            let r = Response {
                cert: None,
                ca: None,
                groups: vec![],
                error: Some(refusal.reason.clone()),
            };
            let _ = refused.try_send(refusal);
            r
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

/// The finding for a refused enrollment.
pub fn refusal_finding(r: &Refusal) -> crate::rules::Finding {
    crate::rules::Finding {
        kind: crate::rules::findings::ENROLLMENT_REFUSED,
        agent_id: if r.agent_id.is_empty() {
            "(unknown)".into()
        } else {
            r.agent_id.clone()
        },
        summary: format!(
            "Enrollment refused for `{}` (token {}): {}",
            r.agent_id,
            r.token_id.as_deref().unwrap_or("?"),
            r.reason
        ),
        event_ids: vec![],
        details: serde_json::json!({"token": r.token_id, "reason": r.reason}),
    }
}
