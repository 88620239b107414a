//! Loading certificates and keys from PEM files, with errors that name the problem.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The first certificate in a PEM file.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, String> {
    load_certs(path)?
        .into_iter()
        .next()
        .ok_or_else(|| "no CERTIFICATE block found".to_string())
}

/// Every certificate in a PEM file (a chain, leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| e.to_string())
}
