//! Signing and verifying [`SignedMessage`]s with the keys of the Weilan PKI.
//!
//! Identity comes from certificates, never from a client-chosen id: the verifier
//! accepts a message only if the embedded certificate chains to the Weilan CA, is
//! valid now, carries the expected role in its organizational unit, and its key made
//! the signature. The signer's common name is then *the* agent id (or the collector's
//! name); payload fields that name an agent are checked against it by the caller.
//!
//! Keys are ECDSA P-256 (what `weilan-collector pki` issues, and what rustls, Mosquitto
//! and OpenSSL all speak). Signatures are over `purpose label || 0x00 || body`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::pem;
use crate::wire::{Purpose, SignedMessage, SIG_ALG};

/// Organizational unit that marks a certificate's role in the Weilan PKI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Collector,
    /// A third-party door controller publishing badge and door events.
    DoorController,
    /// A district collector forwarding its agents' batches to the province
    /// (federation): a broker identity only, it signs nothing the province trusts.
    District,
}

impl Role {
    /// The OU value written by `weilan-collector pki`.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Agent => "weilan-agent",
            Role::Collector => "weilan-collector",
            Role::DoorController => "weilan-door-controller",
            Role::District => "weilan-district",
        }
    }
}

/// Who signed a message, as proven by the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub common_name: String,
    pub role: Role,
    /// SHA-256 of the certificate DER, hex.
    pub cert_sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("{path}: not an ECDSA P-256 PKCS#8 key: {detail}")]
    Key { path: String, detail: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
}

/// Why a signed message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("message is signed for `{found:?}`, expected `{expected:?}`")]
    WrongPurpose { expected: Purpose, found: Purpose },
    #[error("certificate is not base64 DER")]
    CertEncoding,
    #[error("certificate is not trusted: {0}")]
    Untrusted(String),
    #[error("certificate has no usable common name / role: {0}")]
    BadSubject(String),
    #[error("certificate role is {found:?}, expected {expected:?}")]
    WrongRole { expected: Role, found: Role },
    #[error("signature is not valid")]
    BadSignature,
}

fn signed_bytes(purpose: Purpose, body: &str) -> Vec<u8> {
    let label = purpose.label().as_bytes();
    let mut out = Vec::with_capacity(label.len() + 1 + body.len());
    out.extend_from_slice(label);
    out.push(0);
    out.extend_from_slice(body.as_bytes());
    out
}

/// Signs bodies with the holder's certificate key.
pub struct Signer {
    key: EcdsaKeyPair,
    cert_b64: String,
    identity: Identity,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads a certificate and its PKCS#8 ECDSA P-256 key from PEM files.
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> Result<Self, SigningError> {
        let cert = pem::load_cert(cert_path).map_err(|detail| SigningError::Pem {
            path: cert_path.display().to_string(),
            detail,
        })?;
        let key = pem::load_key(key_path).map_err(|detail| SigningError::Pem {
            path: key_path.display().to_string(),
            detail,
        })?;
        Self::new(cert, key, &key_path.display().to_string())
    }

    pub fn new(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        key_name: &str,
    ) -> Result<Self, SigningError> {
        let pkcs8 = match &key {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der(),
            _ => {
                return Err(SigningError::Key {
                    path: key_name.into(),
                    detail: "expected a PKCS#8 key".into(),
                })
            }
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng)
            .map_err(|e| SigningError::Key {
                path: key_name.into(),
                detail: e.to_string(),
            })?;
        let identity = subject_identity(&cert).map_err(SigningError::Certificate)?;
        let spki = public_key_bits(&cert).map_err(SigningError::Certificate)?;
        if spki != key.public_key().as_ref() {
            return Err(SigningError::KeyMismatch);
        }
        Ok(Signer {
            key,
            cert_b64: B64.encode(cert.as_ref()),
            identity,
            rng,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Signs `body` for `purpose`.
    pub fn sign(&self, purpose: Purpose, body: String) -> SignedMessage {
        // ring only fails to sign on an RNG failure, which on Linux means getrandom(2)
        // is broken; there is nothing sensible to send then, so an empty signature
        // (which every verifier refuses) is the honest result.
        let sig = self
            .key
            .sign(&self.rng, &signed_bytes(purpose, &body))
            .map(|s| B64.encode(s.as_ref()))
            .unwrap_or_default();
        SignedMessage {
            v: 1,
            purpose,
            alg: SIG_ALG.into(),
            cert: self.cert_b64.clone(),
            body,
            sig,
        }
    }
}

struct CachedCert {
    identity: Identity,
    public_key: Vec<u8>,
    not_after: i64,
}

/// Verifies signed messages against one CA. Certificate checks are cached by the
/// certificate's hash (bounded), signatures are checked every time.
pub struct Verifier {
    ca_der: CertificateDer<'static>,
    cache: Mutex<HashMap<Vec<u8>, CachedCert>>,
}

const CACHE_MAX: usize = 10_000;

impl Verifier {
    pub fn from_ca_file(ca_path: &Path) -> Result<Self, SigningError> {
        let ca = pem::load_cert(ca_path).map_err(|detail| SigningError::Pem {
            path: ca_path.display().to_string(),
            detail,
        })?;
        Ok(Self::new(ca))
    }

    pub fn new(ca_der: CertificateDer<'static>) -> Self {
        Verifier {
            ca_der,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Verifies `msg` was signed for `purpose` by a certificate of `role` issued by the
    /// CA; returns the signer's identity. The body is only trustworthy after this.
    pub fn verify(
        &self,
        msg: &SignedMessage,
        purpose: Purpose,
        role: Role,
    ) -> Result<Identity, VerifyError> {
        if msg.purpose != purpose {
            return Err(VerifyError::WrongPurpose {
                expected: purpose,
                found: msg.purpose,
            });
        }
        let der = B64
            .decode(msg.cert.as_bytes())
            .map_err(|_| VerifyError::CertEncoding)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &der);
        let key = digest.as_ref().to_vec();
        let now = jiff::Timestamp::now().as_second();
        let (identity, public_key) = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(&key) {
                Some(c) if c.not_after > now => (Some(c.identity.clone()), c.public_key.clone()),
                _ => (None, Vec::new()),
            }
        };
        let (identity, public_key) = match identity {
            Some(id) => (id, public_key),
            None => {
                let cert = CertificateDer::from(der);
                let (identity, public_key, not_after) = self.check_certificate(&cert)?;
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(
                    key,
                    CachedCert {
                        identity: identity.clone(),
                        public_key: public_key.clone(),
                        not_after,
                    },
                );
                (identity, public_key)
            }
        };
        if identity.role != role {
            return Err(VerifyError::WrongRole {
                expected: role,
                found: identity.role,
            });
        }
        let sig = B64
            .decode(msg.sig.as_bytes())
            .map_err(|_| VerifyError::BadSignature)?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &public_key)
            .verify(&signed_bytes(purpose, &msg.body), &sig)
            .map_err(|_| VerifyError::BadSignature)?;
        Ok(identity)
    }

    fn check_certificate(
        &self,
        cert: &CertificateDer<'_>,
    ) -> Result<(Identity, Vec<u8>, i64), VerifyError> {
        let anchor = webpki::anchor_from_trusted_cert(&self.ca_der)
            .map_err(|e| VerifyError::Untrusted(format!("CA: {e}")))?;
        let ee = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| VerifyError::Untrusted(e.to_string()))?;
        let now = UnixTime::now();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| VerifyError::Untrusted(e.to_string()))?;
        let identity = subject_identity(cert).map_err(VerifyError::BadSubject)?;
        let public_key = public_key_bits(cert).map_err(VerifyError::BadSubject)?;
        let not_after = x509_parser::parse_x509_certificate(cert.as_ref())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .map_err(|e| VerifyError::BadSubject(e.to_string()))?;
        Ok((identity, public_key, not_after))
    }
}

/// A certificate's validity: (not before, not after), in seconds since the epoch.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let v = parsed.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Reads common name and role (OU) from a certificate.
pub fn subject_identity(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let subject = parsed.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or("no common name")?
        .to_string();
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or("no organizational unit (role)")?;
    let role = match ou {
        "weilan-agent" => Role::Agent,
        "weilan-collector" => Role::Collector,
        "weilan-door-controller" => Role::DoorController,
        "weilan-district" => Role::District,
        other => return Err(format!("unknown role `{other}`")),
    };
    if role != Role::Collector && !crate::topics::valid_agent_id(&cn) {
        return Err(format!("`{cn}` is not a valid agent id"));
    }
    Ok(Identity {
        common_name: cn,
        role,
        cert_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, cert.as_ref())),
    })
}

fn public_key_bits(cert: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    Ok(parsed.public_key().subject_public_key.data.to_vec())
}
