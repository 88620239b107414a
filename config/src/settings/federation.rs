//! `[federation]` of `collector.toml`: tiered collectors (issue "Beyond one box",
//! item 5). A district collector forwards its agents' signed batches verbatim to a
//! province collector (`[federation.upstream]`); a province collector accepts them
//! from the districts it names (`[[federation.districts]]`), each with the CA that
//! signed its agents' certificates, and verifies every batch itself.

use std::path::PathBuf;

use serde::Serialize;

use crate::load::Validator;

/// The raw `[federation]` section.
#[derive(Debug, Clone, Default, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    /// This collector is a district's: forward every stored batch to the province.
    #[serde(default)]
    pub upstream: Option<UpstreamSection>,
    /// This collector is a province's: the districts whose batches it accepts.
    #[serde(default)]
    pub districts: Vec<DistrictSection>,
}

/// `[federation.upstream]`: the province's broker and this district's identity there.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// The province broker's host and TLS port.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Name the province broker's certificate carries.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The province's CA: it signs the province broker's certificate, this district's
    /// certificate, and the province collector's acks.
    pub ca: PathBuf,
    /// This district's client certificate and key from the province
    /// (`weilan-collector pki issue-district`); its name is the district's name.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Forwarded batches sent and not yet acknowledged by the province, at most.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Seconds to wait for the province's ack before sending a batch again.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_secs: u64,
    /// A yellow alert when the oldest batch not yet acknowledged by the province is
    /// older than this many seconds (the link is down, or the province refuses).
    #[serde(default = "default_backlog_alert")]
    pub backlog_alert_secs: u64,
}

fn default_port() -> u16 {
    8883
}
fn default_server_name() -> String {
    "weilan-collector".into()
}
fn default_window() -> usize {
    256
}
fn default_ack_timeout() -> u64 {
    30
}
fn default_backlog_alert() -> u64 {
    900
}

/// `[[federation.districts]]`: one district a province accepts batches from.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DistrictSection {
    /// The district's name: the common name of its certificate from this province's
    /// CA (`weilan-collector pki issue-district`), which is its broker user.
    pub name: String,
    /// The district's own CA (its `ca.pem`): it signed the district's agents'
    /// certificates, so the province verifies their signatures against it.
    pub ca: PathBuf,
}

/// Validated `[federation]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FederationSettings {
    pub upstream: Option<Upstream>,
    pub districts: Vec<District>,
}

/// Validated `[federation.upstream]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub window: usize,
    pub ack_timeout: std::time::Duration,
    pub backlog_alert: std::time::Duration,
}

/// Validated `[[federation.districts]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct District {
    pub name: String,
    pub ca: PathBuf,
}

/// The prefix every district's name carries: no agent or collector may take it.
pub const DISTRICT_PREFIX: &str = "weilan-district-";

/// Whether `name` can name a district (it becomes a topic level and a broker user).
pub fn valid_district_name(name: &str) -> bool {
    name.strip_prefix(DISTRICT_PREFIX)
        .is_some_and(|rest| !rest.is_empty())
        && crate::topics::valid_agent_id(name)
}

impl FederationSection {
    pub fn validate(self, v: &mut Validator) -> FederationSettings {
        let upstream = self.upstream.map(|u| {
            if u.host.is_empty() {
                v.error("federation.upstream.host", "must name the province broker");
            }
            if rustls_pki_types::ServerName::try_from(u.server_name.as_str()).is_err() {
                v.error(
                    "federation.upstream.server_name",
                    format!("`{}` is not a valid TLS server name", u.server_name),
                );
            }
            v.range("federation.upstream.window", u.window, 1, 65_535);
            v.range(
                "federation.upstream.ack_timeout_secs",
                u.ack_timeout_secs,
                1,
                3600,
            );
            v.range(
                "federation.upstream.backlog_alert_secs",
                u.backlog_alert_secs,
                10,
                30 * 86_400,
            );
            Upstream {
                host: u.host,
                port: u.port,
                server_name: u.server_name,
                ca: v.existing_file("federation.upstream.ca", &u.ca),
                cert: v.existing_file("federation.upstream.cert", &u.cert),
                key: v.existing_file("federation.upstream.key", &u.key),
                window: u.window,
                ack_timeout: std::time::Duration::from_secs(u.ack_timeout_secs),
                backlog_alert: std::time::Duration::from_secs(u.backlog_alert_secs),
            }
        });
        let mut districts: Vec<District> = Vec::new();
        for (i, d) in self.districts.into_iter().enumerate() {
            let at = |f: &str| format!("federation.districts[{i}].{f}");
            if !valid_district_name(&d.name) {
                v.error(
                    at("name"),
                    format!(
                        "`{}` is not a district name (`{DISTRICT_PREFIX}` and letters, digits, `.`, `_`, `-`)",
                        d.name
                    ),
                );
            } else if districts.iter().any(|o| o.name == d.name) {
                v.error(at("name"), format!("`{}` is named twice", d.name));
            }
            districts.push(District {
                ca: v.existing_file(&at("ca"), &d.ca),
                name: d.name,
            });
        }
        FederationSettings {
            upstream,
            districts,
        }
    }
}
