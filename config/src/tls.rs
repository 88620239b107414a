//! rustls configurations for Weilan's MQTT clients (agent and collector).
//!
//! Mutual TLS: the client presents its certificate, and trusts exactly one CA: the
//! pinned Weilan CA from its settings, never the system store. The server's
//! certificate must name `server_name` from the settings, which may differ from the
//! address dialled (e.g. `127.0.0.1`), so the check does not depend on DNS.
//!
//! The crypto provider is passed explicitly (`builder_with_provider`): the workspace
//! compiles exactly one rustls provider (ring), see `ARCHITECTURE.md`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::pem;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The one crypto provider of the workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default; harmless if already installed.
/// Binaries call this first thing so that any library reaching for the default
/// provider finds exactly this one.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn file_err(path: &Path) -> impl FnOnce(String) -> TlsError + '_ {
    move |detail| TlsError::File {
        path: path.display().to_string(),
        detail,
    }
}

/// The certificates of a PEM file as trust anchors.
pub fn roots(ca_path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in pem::load_certs(ca_path).map_err(file_err(ca_path))? {
        roots
            .add(ca)
            .map_err(|e| file_err(ca_path)(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(file_err(ca_path)("no CERTIFICATE block found".into()));
    }
    Ok(roots)
}

/// A client configuration that checks the server against the CA(s) in `ca_path` and
/// the name dialled, without a client certificate (e.g. a SIEM's syslog over TLS).
pub fn server_auth_config(ca_path: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots(ca_path)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A client configuration for mutual TLS against a server whose certificate is issued
/// by the CA in `ca_path` and names `server_name`.
pub fn client_config(
    ca_path: &Path,
    cert_path: &Path,
    key_path: &Path,
    server_name: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let chain = pem::load_certs(cert_path).map_err(file_err(cert_path))?;
    if chain.is_empty() {
        return Err(file_err(cert_path)("no CERTIFICATE block found".into()));
    }
    let key = pem::load_key(key_path).map_err(file_err(key_path))?;
    client_config_with(ca_path, chain, key, server_name)
}

/// [`client_config`] for a certificate chain and key already in memory (a
/// short-lived credential that is never written to disk).
pub fn client_config_with(
    ca_path: &Path,
    chain: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    server_name: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots(ca_path)?;
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let expected = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    let verifier = Arc::new(ExpectedNameVerifier {
        anchor: TrustAnchor::Configured(inner),
        expected,
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A client configuration for enrollment, before the agent has any certificate or CA:
/// no client certificate; the server must present, in its chain, the CA whose SHA-256
/// is `ca_sha256` (from the enrollment token), and a server certificate valid under
/// that CA for `server_name`.
pub fn pinned_ca_client_config(
    ca_sha256: [u8; 32],
    server_name: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let expected = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    let verifier = Arc::new(ExpectedNameVerifier {
        anchor: TrustAnchor::PinnedInChain(ca_sha256),
        expected,
    });
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Which CA a server's certificate must chain to.
#[derive(Debug)]
enum TrustAnchor {
    /// The CA file in the configuration.
    Configured(Arc<WebPkiServerVerifier>),
    /// Enrollment: the CA whose SHA-256 the token names, found among the certificates
    /// the server sent.
    PinnedInChain([u8; 32]),
}

/// Full WebPKI verification under the trust anchor, for the configured server name
/// instead of whatever host string the client dialled; handshake signatures with the
/// one provider's algorithms.
#[derive(Debug)]
struct ExpectedNameVerifier {
    anchor: TrustAnchor,
    expected: ServerName<'static>,
}

impl ServerCertVerifier for ExpectedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca_sha256 = match &self.anchor {
            TrustAnchor::Configured(inner) => {
                return inner.verify_server_cert(
                    end_entity,
                    intermediates,
                    &self.expected,
                    ocsp_response,
                    now,
                )
            }
            TrustAnchor::PinnedInChain(sha256) => sha256,
        };
        let ca = intermediates
            .iter()
            .find(|c| ring::digest::digest(&ring::digest::SHA256, c.as_ref()).as_ref() == ca_sha256)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the collector did not present the CA the token names".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], &self.expected, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks, before any client dials, that the server certificate in `cert_path` chains
/// to the CA in `ca_path`, is valid now, and names `server_name` — exactly what every
/// agent and the collector's own connection will check. A certificate made for other
/// names is the classic "everything refused, only WARN lines" deployment failure.
pub fn check_server_certificate(
    ca_path: &Path,
    cert_path: &Path,
    server_name: &str,
) -> Result<(), TlsError> {
    let chain = pem::load_certs(cert_path).map_err(file_err(cert_path))?;
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Err(file_err(cert_path)("no CERTIFICATE block found".into()));
    };
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca_path)?), provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    verifier
        .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| {
            file_err(cert_path)(format!(
                "not a valid server certificate for `{server_name}` under {}: {e}",
                ca_path.display()
            ))
        })
}
