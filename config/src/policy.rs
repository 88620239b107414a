//! The fence policy (`policy.toml`), version 1: what the organisation knows and allows.
//!
//! This first version carries the devices the organisation knows (so the collector
//! does not alert on them) and where enforcement keeps evidence. The USB, file and
//! network fence issues grow it with ordered rules; `docs/policy.md` is the reference.

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
    /// `[usb]`.
    #[serde(default)]
    pub usb: UsbPolicySection,
    /// `[files]`.
    #[serde(default)]
    pub files: FilesPolicySection,
}

#[derive(Debug, Clone, Default, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsbPolicySection {
    /// Devices the organisation issued or approved (`[[usb.known_devices]]`).
    #[serde(default)]
    pub known_devices: Vec<KnownDeviceRaw>,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KnownDeviceRaw {
    /// Name for people, e.g. `finance stick #3`; must be unique.
    pub label: String,
    /// Vendor id, 4 hex digits (optional).
    #[serde(default)]
    pub vid: Option<String>,
    /// Product id, 4 hex digits (optional).
    #[serde(default)]
    pub pid: Option<String>,
    /// Serial number (exact match). At least one of `serial` and `hash` is required.
    #[serde(default)]
    pub serial: Option<String>,
    /// Device identity hash as reported in `usb.attached`.
    #[serde(default)]
    pub hash: Option<String>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub version: String,
    pub known_devices: Vec<KnownDevice>,
    pub evidence_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDevice {
    pub label: String,
    pub vid: Option<String>,
    pub pid: Option<String>,
    pub serial: Option<String>,
    pub hash: Option<String>,
}

impl KnownDevice {
    pub fn matches(&self, d: &UsbDevice) -> bool {
        self.vid.as_ref().is_none_or(|v| *v == d.vid)
            && self.pid.as_ref().is_none_or(|p| *p == d.pid)
            && self
                .serial
                .as_ref()
                .is_none_or(|s| d.serial.as_ref() == Some(s))
            && self.hash.as_ref().is_none_or(|h| *h == d.hash)
    }
}

impl Policy {
    /// The known-device entry matching `d`, if any.
    pub fn known_device(&self, d: &UsbDevice) -> Option<&KnownDevice> {
        self.known_devices.iter().find(|k| k.matches(d))
    }
}

fn hex4(v: &mut Validator, field: String, value: Option<String>) -> Option<String> {
    let value = value?;
    let lower = value.to_ascii_lowercase();
    if lower.len() != 4 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        v.error(field, format!("`{value}` is not 4 hex digits"));
    }
    Some(lower)
}

impl Validate for PolicyFile {
    type Valid = Policy;

    fn validate(self, v: &mut Validator) -> Option<Policy> {
        if self.version.trim().is_empty() {
            v.error("version", "must not be empty");
        }
        let mut labels = std::collections::HashSet::new();
        let mut known = Vec::new();
        for (i, d) in self.usb.known_devices.into_iter().enumerate() {
            let at = |f: &str| format!("usb.known_devices[{i}].{f}");
            if !labels.insert(d.label.clone()) {
                v.error(at("label"), format!("duplicate label `{}`", d.label));
            }
            if d.serial.is_none() && d.hash.is_none() {
                v.error(
                    at("label"),
                    "a known device needs `serial` or `hash` (vid/pid alone match every such device)",
                );
            }
            if let Some(h) = &d.hash {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    v.error(
                        at("hash"),
                        "must be the 64-hex-digit hash from usb.attached",
                    );
                }
            }
            known.push(KnownDevice {
                vid: hex4(v, at("vid"), d.vid),
                pid: hex4(v, at("pid"), d.pid),
                label: d.label,
                serial: d.serial,
                hash: d.hash.map(|h| h.to_ascii_lowercase()),
            });
        }
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
            known_devices: known,
            evidence_dir: self.files.evidence_dir,
        })
    }
}
