//! `weilan-agent enroll`: the agent gets its identity from the collector with a
//! one-time token. The key is generated here and never leaves this host; the collector
//! sees a certificate signing request. The token's CA digest is the only trust the
//! agent starts with: the collector must present a certificate chain whose CA has
//! exactly that digest and that names `weilan-collector`, and the CA it returns must
//! be that one. Files written: the key (0600, written first), the certificate and the
//! CA, each replaced atomically.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use weilan_config::enroll::{Request, Response, Token, MAX_LINE};
use weilan_config::signing::{Role, Signer, Verifier};
use weilan_config::wire::Purpose;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("token: {0}")]
    Token(String),
    #[error("`{0}` is not a valid agent id (letters, digits, `.`, `_`, `-`; at most 64)")]
    BadId(String),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {detail}")]
    Tls { addr: String, detail: String },
    #[error("the collector refused: {0}")]
    Refused(String),
    #[error("the collector's answer is not acceptable: {0}")]
    BadAnswer(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key generation: {0}")]
    Key(String),
}

/// What was enrolled.
#[derive(Debug)]
pub struct Enrolled {
    pub agent_id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub groups: Vec<String>,
}

/// Enrolls as `agent_id` with the collector at `collector` (`host` or `host:port`)
/// and writes `agent.pem`, `agent-key.pem` and `ca.pem` into `dir`.
pub fn enroll(
    collector: &str,
    token: &str,
    agent_id: &str,
    dir: &Path,
) -> Result<Enrolled, EnrollError> {
    let token = Token::parse(token).map_err(EnrollError::Token)?;
    if !weilan_config::topics::valid_agent_id(agent_id) {
        return Err(EnrollError::BadId(agent_id.to_string()));
    }
    let (key, csr) = key_and_request(agent_id)?;
    let request = Request {
        v: 1,
        token: token.encode(),
        renew: false,
        agent_id: agent_id.to_string(),
        csr,
    };
    let config = weilan_config::tls::pinned_ca_client_config(token.ca_sha256, "weilan-collector")
        .map_err(|e| EnrollError::Tls {
        addr: collector.to_string(),
        detail: e.to_string(),
    })?;
    let response = exchange(collector, config, &request)?;
    if let Some(e) = response.error {
        return Err(EnrollError::Refused(e));
    }
    let (Some(cert_pem), Some(ca_pem)) = (response.cert, response.ca) else {
        return Err(EnrollError::BadAnswer("no certificate".into()));
    };
    // The CA must be the one the token names, the certificate ours and an agent's
    // under it, for the name asked.
    let ca = first_cert(&ca_pem)?;
    if ring::digest::digest(&ring::digest::SHA256, ca.as_ref()).as_ref() != token.ca_sha256 {
        return Err(EnrollError::BadAnswer(
            "the CA returned is not the one the token names".into(),
        ));
    }
    check_issued(&Verifier::new(ca), first_cert(&cert_pem)?, &key, agent_id)?;
    let out = Enrolled {
        agent_id: agent_id.to_string(),
        cert: dir.join("agent.pem"),
        key: dir.join("agent-key.pem"),
        ca: dir.join("ca.pem"),
        groups: response.groups,
    };
    // The identity's directory: root's only (as tmpfiles would make it).
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| EnrollError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    write_atomically(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&out.cert, cert_pem.as_bytes(), 0o644)?;
    write_atomically(&out.ca, ca_pem.as_bytes(), 0o644)?;
    Ok(out)
}

/// A new key (generated here; it never leaves this host) and a certificate request
/// for `agent_id` with it.
fn key_and_request(agent_id: &str) -> Result<(rcgen::KeyPair, String), EnrollError> {
    let key = rcgen::KeyPair::generate().map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, agent_id);
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    Ok((key, csr))
}

/// A renewed identity: the new certificate and key (PEM), checked.
pub struct Renewed {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: i64,
}

/// Renews `agent_id`'s certificate at the collector's enrollment port, authenticated
/// by the current one (`cert`, `key`) over TLS pinned to `ca`. The new key is made
/// here; the answer must be a certificate for `agent_id` under `ca`, for that key.
pub fn renew(
    collector: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    agent_id: &str,
) -> Result<Renewed, EnrollError> {
    let (new_key, csr) = key_and_request(agent_id)?;
    let config =
        weilan_config::tls::client_config(ca, cert, key, "weilan-collector").map_err(|e| {
            EnrollError::Tls {
                addr: collector.to_string(),
                detail: e.to_string(),
            }
        })?;
    let request = Request {
        v: 1,
        token: String::new(),
        renew: true,
        agent_id: agent_id.to_string(),
        csr,
    };
    let response = exchange(collector, config, &request)?;
    if let Some(e) = response.error {
        return Err(EnrollError::Refused(e));
    }
    let Some(cert_pem) = response.cert else {
        return Err(EnrollError::BadAnswer("no certificate".into()));
    };
    let new_cert = first_cert(&cert_pem)?;
    let verifier = Verifier::from_ca_file(ca).map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
    check_issued(&verifier, new_cert.clone(), &new_key, agent_id)?;
    let (_, not_after) = weilan_config::signing::validity(&new_cert)
        .map_err(|e| EnrollError::BadAnswer(format!("certificate: {e}")))?;
    Ok(Renewed {
        cert_pem,
        key_pem: new_key.serialize_pem(),
        not_after,
    })
}

/// The certificate the collector answered with is an agent's under the CA, for
/// `agent_id`, and for `key`: a probe signed with the key verifies against it.
fn check_issued(
    verifier: &Verifier,
    cert: CertificateDer<'static>,
    key: &rcgen::KeyPair,
    agent_id: &str,
) -> Result<(), EnrollError> {
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = Signer::new(cert, key_der, "generated key")
        .map_err(|e| EnrollError::BadAnswer(format!("certificate: {e}")))?;
    let probe = signer.sign(Purpose::Batch, "{}".into());
    let identity = verifier
        .verify(&probe, Purpose::Batch, Role::Agent)
        .map_err(|e| EnrollError::BadAnswer(format!("certificate: {e}")))?;
    if identity.common_name != agent_id {
        return Err(EnrollError::BadAnswer(format!(
            "certificate for `{}`, not `{agent_id}`",
            identity.common_name
        )));
    }
    Ok(())
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, EnrollError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| EnrollError::BadAnswer(format!("not a PEM certificate: {e}")))
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EnrollError> {
    crate::state::replace_file(path, bytes, mode).map_err(|source| EnrollError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// One request, one response, over `config`'s TLS (pinned to the token's CA for an
/// enrollment, to the configured CA with a client certificate for a renewal).
fn exchange(
    collector: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
    request: &Request,
) -> Result<Response, EnrollError> {
    let addr = if collector.contains(':') {
        collector.to_string()
    } else {
        format!("{collector}:{}", weilan_config::enroll::DEFAULT_PORT)
    };
    let tls_err = |detail: String| EnrollError::Tls {
        addr: addr.clone(),
        detail,
    };
    let name = ServerName::try_from("weilan-collector").map_err(|e| tls_err(e.to_string()))?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| tls_err(e.to_string()))?;
    let tcp = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .map_err(|source| EnrollError::Connect {
            addr: addr.clone(),
            source,
        })?
        .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(10)).ok())
        .ok_or_else(|| EnrollError::Connect {
            addr: addr.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "no address answered",
            ),
        })?;
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(30)));
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    stream
        .write_all(&line)
        .and_then(|()| stream.flush())
        .map_err(|e| tls_err(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&mut stream, MAX_LINE as u64))
        .read_line(&mut answer)
        .map_err(|e| tls_err(e.to_string()))?;
    serde_json::from_str(&answer).map_err(|e| EnrollError::BadAnswer(e.to_string()))
}
