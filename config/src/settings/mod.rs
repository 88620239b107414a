//! Settings files of the agent (`agent.toml`) and the collector (`collector.toml`).
//!
//! Each file has a raw form (serde, `deny_unknown_fields`, every field documented,
//! defaults where a default is safe) and a validated form with resolved paths and
//! typed values. Relative paths are resolved against the file's own directory.

pub mod agent;
pub mod collector;
pub mod federation;

use serde::Serialize;

use crate::load::Validator;

/// `[log]`: how the program logs (to stderr; systemd's journal keeps it).
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// A `tracing` filter, e.g. `info` or `weilan_agent=debug,info`. `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` for people, `json` for log shippers.
    #[serde(default = "default_log_format")]
    pub format: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: default_log_level(),
            format: default_log_format(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}
fn default_log_format() -> String {
    "text".into()
}

/// Validated logging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub filter: String,
    pub json: bool,
}

impl LogSection {
    pub(crate) fn validate(self, v: &mut Validator) -> LogSettings {
        let json = match self.format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                v.error("log.format", format!("`{other}` is not `text` or `json`"));
                false
            }
        };
        if self.level.trim().is_empty() {
            v.error("log.level", "must not be empty (try `info`)");
        }
        LogSettings {
            filter: self.level,
            json,
        }
    }
}
