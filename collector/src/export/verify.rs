//! `weilan-collector verify-export DIR`: the signature on `manifest.json`, every
//! listed file's size and SHA-256, no file missing or added, and the chain: each
//! previous export found beside this one must have exactly the manifest hash its
//! successor names, and is verified the same way, back to the first one present.

use std::path::{Path, PathBuf};

use weilan_config::signing::{Role, Verifier};
use weilan_config::wire::{Purpose, SignedMessage};

/// What a successful verification checked.
#[derive(Debug, Default)]
pub struct Verified {
    /// Exports verified, newest first.
    pub exports: Vec<String>,
    pub files: usize,
    /// Where the chain check stopped (the previous export is not in the directory).
    pub notes: Vec<String>,
    /// The certificate that signed the newest manifest.
    pub signer: String,
}

fn sha256_file(path: &Path) -> Result<(String, u64), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(ctx.finish().as_ref()), total))
}

/// Verifies `dir` and the chain behind it; the error names the file and what is wrong.
pub fn verify(dir: &Path, verifier: &Verifier) -> Result<Verified, String> {
    let mut out = Verified::default();
    let mut current: PathBuf = dir.to_path_buf();
    let mut expected_hash: Option<String> = None;
    loop {
        let manifest_path = current.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
        let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()));
        if let Some(want) = &expected_hash {
            if *want != hash {
                return Err(format!(
                    "{}: its SHA-256 is {hash}, but the next export's manifest names {want}: this export was replaced or altered",
                    manifest_path.display()
                ));
            }
        }
        let sig_path = current.join("manifest.sig");
        let mut sig: SignedMessage = serde_json::from_slice(
            &std::fs::read(&sig_path).map_err(|e| format!("{}: {e}", sig_path.display()))?,
        )
        .map_err(|e| format!("{}: not a signature file: {e}", sig_path.display()))?;
        sig.body = text.clone();
        let who = verifier
            .verify(&sig, Purpose::Export, Role::Collector)
            .map_err(|e| {
                format!(
                    "{}: the signature does not verify against manifest.json ({e})",
                    sig_path.display()
                )
            })?;
        if out.signer.is_empty() {
            out.signer = who.common_name.clone();
        }
        let manifest: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", manifest_path.display()))?;
        if manifest["format"] != super::FORMAT {
            return Err(format!(
                "{}: format {} is not {}",
                manifest_path.display(),
                manifest["format"],
                super::FORMAT
            ));
        }
        let files = manifest["files"]
            .as_array()
            .ok_or_else(|| format!("{}: no file list", manifest_path.display()))?;
        let mut listed = vec!["manifest.json".to_string(), "manifest.sig".to_string()];
        for f in files {
            let name = f["name"].as_str().unwrap_or_default();
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(format!(
                    "{}: bad file name {:?}",
                    manifest_path.display(),
                    f["name"]
                ));
            }
            let path = current.join(name);
            if !path.exists() {
                return Err(format!(
                    "{}: listed in the manifest but missing",
                    path.display()
                ));
            }
            let (sha, bytes) = sha256_file(&path)?;
            if Some(sha.as_str()) != f["sha256"].as_str() || Some(bytes) != f["bytes"].as_u64() {
                return Err(format!(
                    "{}: content changed (SHA-256 {sha}, {bytes} bytes; the manifest says {}, {} bytes)",
                    path.display(),
                    f["sha256"].as_str().unwrap_or("?"),
                    f["bytes"]
                ));
            }
            listed.push(name.to_string());
            out.files += 1;
        }
        for entry in
            std::fs::read_dir(&current).map_err(|e| format!("{}: {e}", current.display()))?
        {
            let name = entry
                .map_err(|e| format!("{}: {e}", current.display()))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if !listed.contains(&name) {
                return Err(format!(
                    "{}: not listed in the manifest",
                    current.join(&name).display()
                ));
            }
        }
        out.exports.push(current.display().to_string());
        let Some(prev) = manifest["previous"].as_object() else {
            break; // the first export of the chain
        };
        let name = prev
            .get("name")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| format!("{}: bad previous link", manifest_path.display()))?;
        let next = current.with_file_name(name);
        if !next.join("manifest.json").exists() {
            out.notes.push(format!(
                "the previous export {name} is not in {}; the chain was checked up to {}",
                current
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                current.display()
            ));
            break;
        }
        expected_hash = prev
            .get("manifest_sha256")
            .and_then(|h| h.as_str())
            .map(str::to_string);
        current = next;
    }
    Ok(out)
}
