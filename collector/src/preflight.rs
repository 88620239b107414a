//! `weilan-collector check-config`: everything `serve` would load, checked before it
//! bites — settings (already validated by the loader), the fence policy, the rule
//! files, the badge roster, and the PKI files the service reads: parsed, keys matching
//! their certificates, the client certificate a collector's under the CA, the broker
//! certificate valid for `broker.server_name`, and every file readable by the user
//! the service runs as (`weilan` in `weilan-collector.service`) when root runs the
//! check. Every problem is listed, not just the first.

use std::path::{Path, PathBuf};

use weilan_config::settings::collector::{BrokerMode, CollectorSettings};
use weilan_config::signing::{Role, Signer, Verifier};
use weilan_config::wire::Purpose;

/// The user `weilan-collector.service` runs as.
pub const SERVICE_USER: &str = "weilan";

/// One problem found, with the file it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

/// What the check found: problems, and what it read (for the success line).
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    /// Valid but weak (e.g. a USB identity that trusts a serial alone).
    pub warnings: Vec<Problem>,
    pub policy_version: Option<String>,
    pub rules: usize,
    pub checked_as: Option<String>,
}

/// `[federation]`'s files: the district's certificate is a district certificate of
/// the province CA it names, with its key; each district's CA loads.
fn federation_problems(
    federation: &weilan_config::settings::federation::FederationSettings,
) -> Vec<(std::path::PathBuf, String)> {
    let mut found = Vec::new();
    if let Some(up) = &federation.upstream {
        let checked = Signer::from_pem_files(&up.cert, &up.key)
            .map_err(|e| e.to_string())
            .and_then(|signer| {
                let province = Verifier::from_ca_file(&up.ca).map_err(|e| e.to_string())?;
                let probe = signer.sign(Purpose::Ack, "{}".into());
                province
                    .verify(&probe, Purpose::Ack, Role::District)
                    .map(|_| ())
                    .map_err(|e| {
                        format!(
                            "not a district certificate of the province CA {} (weilan-collector pki issue-district): {e}",
                            up.ca.display()
                        )
                    })
            });
        if let Err(e) = checked {
            found.push((up.cert.clone(), e));
        }
    }
    for d in &federation.districts {
        if let Err(e) = Verifier::from_ca_file(&d.ca) {
            found.push((d.ca.clone(), format!("district `{}`: {e}", d.name)));
        }
    }
    found
}

/// Checks what `serve` loads with `settings`. `service_user` is the account whose
/// read access is checked when the caller is root (`None`: no such check).
pub fn check(settings: &CollectorSettings, service_user: Option<&str>) -> Report {
    let mut report = Report::default();
    let mut problem = |file: &Path, message: String| {
        report.problems.push(Problem {
            file: file.to_path_buf(),
            message,
        })
    };
    match weilan_config::load_file::<weilan_config::policy::PolicyFile>(&settings.policy_path) {
        Ok(p) => {
            for w in p.usb.lint() {
                report.warnings.push(Problem {
                    file: settings.policy_path.clone(),
                    message: w,
                });
            }
            report.policy_version = Some(p.version)
        }
        Err(e) => problem(&settings.policy_path, e.to_string().trim_end().to_string()),
    }
    match crate::rules::RuleSet::load(settings.rules_builtin, settings.rules_dir.as_deref()) {
        Ok(set) => report.rules = set.rules().count(),
        Err(errors) => {
            let dir = settings.rules_dir.clone().unwrap_or_default();
            for e in errors {
                problem(&dir, e.to_string().trim_end().to_string());
            }
        }
    }
    if let Err(errors) = crate::roster::Roster::load(settings.roster.as_deref()) {
        let file = settings.roster.clone().unwrap_or_default();
        for e in errors {
            problem(&file, e);
        }
    }

    // The PKI, as the broker and the collector's own connection will use it.
    let verifier = match Verifier::from_ca_file(&settings.ca) {
        Ok(v) => Some(v),
        Err(e) => {
            problem(&settings.ca, e.to_string());
            None
        }
    };
    match Signer::from_pem_files(&settings.client_cert, &settings.client_key) {
        Ok(signer) => {
            if let Some(v) = &verifier {
                let probe = signer.sign(Purpose::Ack, "{}".into());
                if let Err(e) = v.verify(&probe, Purpose::Ack, Role::Collector) {
                    problem(
                        &settings.client_cert,
                        format!("not usable as the collector's certificate: {e}"),
                    );
                }
            }
            // The broker makes the certificate's name the client id; the collector
            // announces itself under `broker.client_id`, which the ACL grants only
            // under that name (a further collector that kept the default would go
            // unannounced).
            let name = &signer.identity().common_name;
            if *name != settings.client_id {
                problem(
                    &settings.client_cert,
                    format!(
                        "its name `{name}` is not broker.client_id `{}`: set client_id to the certificate's name (docs/deployment.md §10)",
                        settings.client_id
                    ),
                );
            }
        }
        Err(e) => problem(&settings.client_cert, e.to_string()),
    }
    for (file, message) in federation_problems(&settings.federation) {
        problem(&file, message);
    }
    if let BrokerMode::Embedded { .. } = settings.broker {
        if let Err(e) = weilan_config::tls::check_server_certificate(
            &settings.ca,
            &settings.server_cert,
            &settings.server_name,
        ) {
            problem(&settings.server_cert, e.to_string());
        }
        if let Err(e) = weilan_config::pem::load_key(&settings.server_key) {
            problem(&settings.server_key, e);
        }
    }

    // Read access of the service user, when root checks on its behalf.
    if let Some(user) = service_user.and_then(ServiceUser::lookup) {
        report.checked_as = Some(user.name.clone());
        let mut files = vec![
            settings.ca.clone(),
            settings.client_cert.clone(),
            settings.client_key.clone(),
            settings.policy_path.clone(),
        ];
        if let BrokerMode::Embedded { .. } = settings.broker {
            files.push(settings.server_cert.clone());
            files.push(settings.server_key.clone());
        }
        files.extend(settings.roster.clone());
        for f in files {
            if let Err(why) = user.can_read(&f) {
                problem(
                    &f,
                    format!("the service user `{}` cannot read it: {why}", user.name),
                );
            }
        }
    }
    report
}

/// A local account and its groups, for access checks done by root on its behalf.
pub struct ServiceUser {
    name: String,
    uid: u32,
    gids: Vec<u32>,
}

impl ServiceUser {
    /// The account, if the caller is root (only root checks for another user) and it
    /// exists (without it, there is no service to check for).
    pub fn lookup(name: &str) -> Option<ServiceUser> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let user = nix::unistd::User::from_name(name).ok()??;
        let cname = std::ffi::CString::new(name).ok()?;
        let gids = nix::unistd::getgrouplist(&cname, user.gid)
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|_| vec![user.gid.as_raw()]);
        Some(ServiceUser {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gids,
        })
    }

    /// Whether the classic permission bits let this user read `path` (and search
    /// every directory above it).
    pub fn can_read(&self, path: &Path) -> Result<(), String> {
        let path = std::path::absolute(path).map_err(|e| e.to_string())?;
        for dir in path.ancestors().skip(1) {
            if !self.allowed(dir, 0o1)? {
                return Err(format!(
                    "directory {} is not searchable by it",
                    dir.display()
                ));
            }
        }
        if !self.allowed(&path, 0o4)? {
            return Err("no read permission".into());
        }
        Ok(())
    }

    fn allowed(&self, path: &Path, bit: u32) -> Result<bool, String> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = m.mode();
        Ok(if m.uid() == self.uid {
            mode & (bit << 6) != 0
        } else if self.gids.contains(&m.gid()) {
            mode & (bit << 3) != 0
        } else {
            mode & bit != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_bits_are_read_for_owner_group_and_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key.pem");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let other = ServiceUser {
            name: "other".into(),
            uid: me + 4242,
            gids: vec![4242],
        };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(other.can_read(&f), Err("no read permission".into()));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(other.can_read(&f), Ok(()));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(other.can_read(&f).unwrap_err().contains("not searchable"));
    }
}
