//! An external Mosquitto for tests and benches: `config/mosquitto/weilan.conf` as
//! shipped, with only its file paths and listener pointed at this run, plus what
//! Debian's main mosquitto.conf adds (persistence) and `user root` (the run's files
//! are root's). Shared by tests (through `common`) and benches (`#[path]`).
#![allow(dead_code)] // each user takes its own subset

use std::path::{Path, PathBuf};

use weilan_collector::pki::PkiPaths;

/// Writes `root/mosquitto/mosquitto.conf` for a broker on `127.0.0.1:port` with the
/// ACL at `acl` (the shipped file, or one `broker-acl` printed) and returns its path.
pub fn shipped_conf(root: &Path, pki: &PkiPaths, port: u16, acl: &Path) -> PathBuf {
    shipped_conf_on(root, pki, "127.0.0.1", port, acl)
}

/// [`shipped_conf`] listening on `address` (`0.0.0.0`: every address of its namespace).
pub fn shipped_conf_on(
    root: &Path,
    pki: &PkiPaths,
    address: &str,
    port: u16,
    acl: &Path,
) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto");
    let mut conf = std::fs::read_to_string(shipped.join("weilan.conf")).unwrap();
    let crl = weilan_collector::registry::crl_path(pki);
    for (from, to) in [
        ("listener 8883", format!("listener {port} {address}")),
        (
            "/etc/mosquitto/ca_certificates/weilan-ca.pem",
            pki.ca().display().to_string(),
        ),
        (
            "/etc/mosquitto/certs/weilan-server.pem",
            pki.server().display().to_string(),
        ),
        (
            "/etc/mosquitto/certs/weilan-server-key.pem",
            pki.server_key().display().to_string(),
        ),
        (
            "/etc/mosquitto/ca_certificates/weilan-crl.pem",
            crl.display().to_string(),
        ),
        ("/etc/mosquitto/weilan.acl", acl.display().to_string()),
    ] {
        assert!(
            conf.contains(from),
            "the shipped weilan.conf no longer has {from}"
        );
        conf = conf.replace(from, &to);
    }
    let dir = root.join("mosquitto");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mosquitto.conf");
    std::fs::write(
        &path,
        format!(
            "user root\npersistence true\npersistence_location {}/\n{conf}",
            dir.display()
        ),
    )
    .unwrap();
    path
}

/// The shipped ACL file.
pub fn shipped_acl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto/weilan.acl")
}

/// The Mosquitto executable, if installed.
pub fn mosquitto() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}
