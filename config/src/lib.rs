//! `weilan-config`: the contract the Weilan agent and collector share.
//!
//! - [`event`]: the versioned event envelope and the closed `Event` enum.
//! - [`wire`]: MQTT payloads (signed batches, acks, commands, status) and strict decoding.
//! - [`topics`]: the MQTT topic scheme.
//! - [`signing`]: signing and verifying payloads with the Weilan PKI (identity from certificates).
//! - [`tls`]: rustls client configurations with a pinned CA and one crypto provider.
//! - [`settings`], [`policy`]: the TOML files, parsed strictly and validated with all errors reported.
//! - [`load`]: the read → parse → validate pipeline with `file:line` and field paths.
//!
//! Neither side depends on the other; both depend on this crate.
#![forbid(unsafe_code)]

pub mod badge;
pub mod bundle;
pub mod enroll;
pub mod event;
pub mod load;
#[cfg(feature = "runtime")]
pub mod mqtt;
pub mod pem;
pub mod policy;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod settings;
pub mod signing;
pub mod tls;
pub mod topics;
pub mod wire;

pub use load::{load_file, ConfigErrors};

/// The example files shipped with Weilan, embedded so `print-default-config` can show
/// them and tests can prove they parse.
pub mod examples {
    pub const AGENT_TOML: &str = include_str!("../agent.toml");
    pub const COLLECTOR_TOML: &str = include_str!("../collector.toml");
    pub const POLICY_TOML: &str = include_str!("../policy.toml");
}
