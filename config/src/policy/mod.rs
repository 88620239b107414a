//! The fence policy (`policy.toml`): what the organisation knows and allows.
//!
//! - [`usb`]: known devices, ordered USB rules, built-in protections.
//! - [`files`]: exit-point file systems, sensitive sources, detectors and file rules.
//! - [`network`]: allowlisted destinations and rules on outgoing transfers.
//!
//! `docs/policy.md` is the reference.

pub mod files;
pub mod network;
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
    pub files: files::FilesPolicyRaw,
    /// `[network]`.
    #[serde(default)]
    pub network: network::NetworkPolicyRaw,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub version: String,
    pub usb: usb::UsbPolicy,
    pub files: files::FilesPolicy,
    pub network: network::NetworkPolicy,
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
        let files = self.files.validate(v);
        let network = self.network.validate(v);
        Some(Policy {
            version: self.version,
            usb,
            files,
            network,
        })
    }
}

/// Parses and validates policy text (e.g. one pushed by the collector); `name` is
/// used in messages.
pub fn parse(text: &str, name: &str) -> Result<Policy, crate::ConfigErrors> {
    crate::load::load_str::<PolicyFile>(text, std::path::Path::new(name), PathBuf::from("/"))
}
