//! The fence policy (`policy.toml`): what the organisation knows and allows.
//!
//! - [`usb`]: known devices, ordered USB rules, built-in protections.
//! - `[files]`: where enforcement keeps evidence.
//!
//! `docs/policy.md` is the reference.

pub mod usb;

use std::path::PathBuf;

use serde::Serialize;

use crate::event::UsbDevice;
use crate::load::{Validate, Validator};

/// The raw `policy.toml`.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Version string of this policy, reported by every agent that enforces it.
    pub version: String,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
    /// `[usb]`: the USB fence.
    #[serde(default)]
    pub usb: usb::UsbPolicyRaw,
    /// `[files]`.
    #[serde(default)]
    pub files: FilesPolicySection,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilesPolicySection {
    /// Absolute, root-only directory where quarantined files are kept as evidence.
    #[serde(default = "default_evidence")]
    pub evidence_dir: PathBuf,
}

impl Default for FilesPolicySection {
    fn default() -> Self {
        FilesPolicySection {
            evidence_dir: default_evidence(),
        }
    }
}

fn default_evidence() -> PathBuf {
    "/var/lib/weilan-agent/evidence".into()
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub version: String,
    pub usb: usb::UsbPolicy,
    pub evidence_dir: PathBuf,
}

impl Policy {
    /// The known-device entry matching `d`, if any.
    pub fn known_device(&self, d: &UsbDevice) -> Option<&usb::KnownDevice> {
        self.usb.known_device(d)
    }
}

impl Validate for PolicyFile {
    type Valid = Policy;

    fn validate(self, v: &mut Validator) -> Option<Policy> {
        if self.version.trim().is_empty() {
            v.error("version", "must not be empty");
        }
        let usb = self.usb.validate(v);
        if !self.files.evidence_dir.is_absolute() {
            v.error(
                "files.evidence_dir",
                format!(
                    "`{}` must be an absolute path (evidence must not move with the working directory)",
                    self.files.evidence_dir.display()
                ),
            );
        }
        Some(Policy {
            version: self.version,
            usb,
            evidence_dir: self.files.evidence_dir,
        })
    }
}

/// Parses and validates policy text (e.g. one pushed by the collector); `name` is
/// used in messages.
pub fn parse(text: &str, name: &str) -> Result<Policy, crate::ConfigErrors> {
    crate::load::load_str::<PolicyFile>(text, std::path::Path::new(name), PathBuf::from("/"))
}
