//! The files guard: decides on every file the files source described, with the
//! policy it was read under ([`FilesPolicy::decide`], pure), and carries the verdict
//! out through a [`FileEnforcer`]: quarantine (into the evidence store),
//! read-only-device (through the USB fence), and a `deny` that did not stop the copy
//! while it happened falls back to quarantine — the file must not stay.
//!
//! Every file becomes one `file.exported` naming the rule that decided it; every
//! action one `file.enforced` naming its rule, `done`, `requested` or `failed`.

#[cfg(target_os = "linux")]
pub mod linux;

use std::path::{Path, PathBuf};

use weilan_config::event::{Event, FileEnforced, FileExported};
use weilan_config::policy::files::{FileAction, FileVerdict};

use crate::source::files::{FileFact, FileJudge, WrittenFile};

/// What the files guard can do to a file or its device.
pub trait FileEnforcer: Send + Sync {
    /// Moves `path` into `evidence_dir` with `about` beside it; where it is kept and
    /// the SHA-256 of what was kept.
    fn quarantine(
        &self,
        path: &Path,
        evidence_dir: &Path,
        about: serde_json::Value,
    ) -> Result<(PathBuf, String), String>;
    /// Asks for the USB device `device_hash` to be switched read-only.
    fn read_only_device(
        &self,
        device_hash: &str,
        rule_id: &str,
        reason: String,
    ) -> Result<(), String>;
    /// Removes the empty file a refused `O_CREAT` left; what happened, for the detail.
    fn remove_refused_leftover(&self, path: &Path) -> String;
}

/// Decides and acts on the files source's facts.
pub struct FilesGuard {
    enforcer: Box<dyn FileEnforcer>,
}

impl FilesGuard {
    pub fn new(enforcer: Box<dyn FileEnforcer>) -> Self {
        FilesGuard { enforcer }
    }

    /// The verdict on a written file: the first of the policy's rules its
    /// classification and exit kind match (pure).
    pub fn decide(file: &WrittenFile) -> FileVerdict {
        file.policy.decide(
            &crate::classify::counts(&file.event.classification),
            file.kind,
        )
    }

    /// Carries `verdict` out on the file `exported` describes (blocking); `None` for
    /// `audit`.
    pub fn act(
        &self,
        exported: &FileExported,
        verdict: &FileVerdict,
        evidence_dir: &Path,
    ) -> Option<FileEnforced> {
        let mut e = FileEnforced {
            action: verdict.action.as_str().into(),
            rule_id: verdict.rule_id.clone(),
            matched: verdict.matched.clone(),
            path: Some(exported.path.clone()),
            source_path: exported.origins.first().cloned(),
            sha256: exported.sha256.clone(),
            mount_point: Some(exported.mount_point.clone()),
            usb_hash: exported.usb_hash.clone(),
            pid: exported.pid,
            exe: exported.exe.clone(),
            user: exported.user.clone(),
            outcome: "done".into(),
            error: None,
            evidence: None,
            detail: String::new(),
        };
        match verdict.action {
            FileAction::Audit => return None,
            FileAction::Quarantine | FileAction::Deny => {
                let pre = if verdict.action == FileAction::Deny {
                    "the copy was not refused while it happened (the writer held no classified \
                     file from a sensitive source open); "
                } else {
                    ""
                };
                let about = serde_json::json!({
                    "original_path": exported.path,
                    "mount_point": exported.mount_point,
                    "usb_serial": exported.usb_serial,
                    "writer": { "pid": exported.pid, "exe": exported.exe, "user": exported.user },
                    "classification": exported.classification,
                    "rule_id": exported.rule_id,
                });
                match self
                    .enforcer
                    .quarantine(Path::new(&exported.path), evidence_dir, about)
                {
                    Ok((kept, sha)) => {
                        e.detail = format!(
                            "{pre}{} moved off {} into the evidence store",
                            exported.path, exported.mount_point
                        );
                        e.evidence = Some(kept.display().to_string());
                        e.sha256 = Some(sha);
                    }
                    Err(err) => {
                        e.outcome = "failed".into();
                        e.detail = format!("{pre}quarantine of {} failed", exported.path);
                        e.error = Some(err);
                    }
                }
            }
            FileAction::ReadOnlyDevice => {
                let sent = match &exported.usb_hash {
                    Some(hash) => self.enforcer.read_only_device(
                        hash,
                        &format!("files:{}", verdict.rule_id),
                        format!(
                            "{} was written to it ({})",
                            exported.path,
                            verdict.matched.join(", ")
                        ),
                    ),
                    None => Err(format!(
                        "{} is not on a USB device (no device to switch)",
                        exported.mount_point
                    )),
                };
                match sent {
                    Ok(()) => {
                        e.outcome = "requested".into();
                        e.detail = format!(
                            "device {} switched read-only by the USB fence (see its usb.decision)",
                            exported.usb_serial.as_deref().unwrap_or("?")
                        );
                    }
                    Err(err) => {
                        e.outcome = "failed".into();
                        e.detail = "the device could not be switched read-only".into();
                        e.error = Some(err);
                    }
                }
            }
        }
        Some(e)
    }
}

impl FileJudge for FilesGuard {
    fn judge(&self, fact: FileFact) -> Vec<Event> {
        match fact {
            FileFact::Written(file) => {
                let verdict = Self::decide(&file);
                let file = *file;
                let mut exported = file.event;
                exported.action = verdict.action.as_str().into();
                exported.rule_id = verdict.rule_id.clone();
                let enforced = self.act(&exported, &verdict, &file.policy.evidence_dir);
                let mut events = vec![Event::FileExported(exported)];
                events.extend(enforced.map(Event::FileEnforced));
                events
            }
            FileFact::Refused {
                mut enforced,
                created,
            } => {
                if let Some(c) = created {
                    enforced
                        .detail
                        .push_str(&self.enforcer.remove_refused_leftover(&c));
                }
                vec![Event::FileEnforced(*enforced)]
            }
        }
    }
}

#[cfg(test)]
mod tests;
