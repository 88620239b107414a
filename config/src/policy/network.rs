//! The network part of the fence policy (`[network]`): destinations inside the fence
//! (the allowlist), when a connection is worth reporting, and ordered rules that act on
//! transfers crossing a byte threshold per connection, per process or per destination.
//!
//! Deciding is pure: [`FlowFacts`] go in, a [`NetVerdict`] naming its rule comes out.
//! The agent measures (sock_diag) and enforces (kill, nftables).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use super::usb::{TimeWindow, TimeWindowRaw};
use crate::load::Validator;

/// What happens to a transfer that a rule matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetAction {
    /// Record only.
    Audit,
    /// Stop the sending process: SIGTERM, then SIGKILL after 2 s.
    Kill,
    /// Reject all further traffic from this host to the destination address (an
    /// nftables set element with a timeout, so the kernel removes it on expiry).
    BlockDestination,
}

impl NetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            NetAction::Audit => "audit",
            NetAction::Kill => "kill",
            NetAction::BlockDestination => "block-destination",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "audit" => NetAction::Audit,
            "kill" => NetAction::Kill,
            "block-destination" => NetAction::BlockDestination,
            _ => return None,
        })
    }
}

/// What a rule's byte threshold counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Bytes sent on one connection.
    Connection,
    /// Bytes one process sent over all its connections the rule covers, within the window.
    Process,
    /// Bytes this host sent to one remote address, within the window.
    Destination,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Connection => "connection",
            Scope::Process => "process",
            Scope::Destination => "destination",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "connection" => Scope::Connection,
            "process" => Scope::Process,
            "destination" => Scope::Destination,
            _ => return None,
        })
    }
}

/// Rule id used when a connection is reported but no rule matched.
pub const NETWORK_DEFAULT: &str = "network.default";

// ---------------------------------------------------------------- raw (serde) form

/// `[network]` of `policy.toml`.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyRaw {
    /// A connection to a destination outside the allowlist is reported (`net.transfer`,
    /// phase `threshold`, then `closed` at its end) once it has sent this many bytes.
    #[serde(default = "default_report_bytes")]
    pub report_bytes: u64,
    /// How often host names in the allowlist are resolved again, in seconds.
    #[serde(default = "default_resolve_every_secs")]
    pub resolve_every_secs: u64,
    /// Destinations inside the fence (`[[network.allow]]`).
    #[serde(default)]
    pub allow: Vec<AllowRaw>,
    /// Ordered rules (`[[network.rules]]`); the first whose conditions and threshold hold
    /// decides.
    #[serde(default)]
    pub rules: Vec<NetRuleRaw>,
}

impl Default for NetworkPolicyRaw {
    fn default() -> Self {
        NetworkPolicyRaw {
            report_bytes: default_report_bytes(),
            resolve_every_secs: default_resolve_every_secs(),
            allow: Vec::new(),
            rules: Vec::new(),
        }
    }
}

fn default_report_bytes() -> u64 {
    1 << 20
}

fn default_resolve_every_secs() -> u64 {
    300
}

fn default_window_secs() -> u64 {
    3600
}

fn default_block_secs() -> u64 {
    3600
}

fn default_scope() -> String {
    "connection".into()
}

/// One allowlisted destination.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRaw {
    /// Name reported as `remote_host` when it matched (e.g. `corp-files`).
    pub name: String,
    /// Networks or single addresses (`10.1.0.0/16`, `192.0.2.7`, `2001:db8::/32`).
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Host names, resolved every `resolve_every_secs`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Remote ports (default: any).
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// One network rule.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetRuleRaw {
    /// Stable id, named by every event this rule causes.
    pub id: String,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
    /// `audit`, `kill` or `block-destination`.
    pub action: String,
    /// The rule fires once the bytes counted by `per` reach this.
    pub min_bytes: u64,
    /// `connection` (default), `process` or `destination`.
    #[serde(default = "default_scope")]
    pub per: String,
    /// For `per = process|destination`: bytes sent within this many seconds count.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Executables: an absolute path matches the executable, a bare name its file name
    /// (default: any process).
    #[serde(default)]
    pub processes: Vec<String>,
    /// User names (default: any user).
    #[serde(default)]
    pub users: Vec<String>,
    /// Remote networks (CIDR or address; default: any).
    #[serde(default)]
    pub destinations: Vec<String>,
    /// Remote ports (default: any).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Also apply to allowlisted destinations (default: only to others).
    #[serde(default)]
    pub include_allowlisted: bool,
    /// Time window in which the rule applies.
    #[serde(default)]
    pub time: Option<TimeWindowRaw>,
    /// For `block-destination`: how long the block lasts, in seconds.
    #[serde(default = "default_block_secs")]
    pub block_secs: u64,
}

// ---------------------------------------------------------------- validated form

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub name: String,
    pub cidrs: Vec<IpNet>,
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetRule {
    pub id: String,
    pub description: String,
    pub action: NetAction,
    pub min_bytes: u64,
    pub per: Scope,
    pub window: Duration,
    pub processes: Vec<String>,
    pub users: Vec<String>,
    pub destinations: Vec<IpNet>,
    pub ports: Vec<u16>,
    pub include_allowlisted: bool,
    pub time: Option<TimeWindow>,
    pub block: Duration,
}

/// The validated `[network]` policy.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkPolicy {
    pub report_bytes: u64,
    pub resolve_every: Duration,
    pub allow: Vec<Allow>,
    pub rules: Vec<NetRule>,
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        let mut v = Validator::new(std::path::PathBuf::from("/"));
        NetworkPolicyRaw::default().validate(&mut v)
    }
}

/// Which allowlist entry a destination matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowMatch {
    /// The entry's name.
    pub name: String,
    /// The host name that resolved to the address, when it matched by name.
    pub host: Option<String>,
}

/// What one transfer looks like to the policy at one moment.
#[derive(Clone)]
pub struct FlowFacts<'a> {
    pub exe: Option<&'a str>,
    pub user: Option<&'a str>,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub allowlisted: bool,
    /// Bytes sent on this connection.
    pub connection_bytes: u64,
    /// Bytes the process sent within each rule's window: looked up by window.
    pub process_bytes: &'a dyn Fn(Duration) -> u64,
    /// Bytes this host sent to `remote` within a window.
    pub destination_bytes: &'a dyn Fn(Duration) -> u64,
    pub now: jiff::Timestamp,
}

/// What the policy says about a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetVerdict {
    pub action: NetAction,
    pub rule_id: String,
    /// For `block-destination`: how long.
    #[serde(skip)]
    pub block: Duration,
    /// What the rule's threshold counted (where its firing is remembered).
    pub per: Scope,
}

impl NetRule {
    fn applies(&self, f: &FlowFacts<'_>) -> bool {
        (self.include_allowlisted || !f.allowlisted)
            && (self.processes.is_empty()
                || f.exe
                    .is_some_and(|exe| self.processes.iter().any(|p| exe_matches(p, exe))))
            && (self.users.is_empty() || f.user.is_some_and(|u| self.users.iter().any(|x| x == u)))
            && (self.destinations.is_empty()
                || self.destinations.iter().any(|n| n.contains(&f.remote)))
            && (self.ports.is_empty() || self.ports.contains(&f.remote_port))
            && self.time.as_ref().is_none_or(|t| t.contains(f.now))
    }

    fn counted(&self, f: &FlowFacts<'_>) -> u64 {
        match self.per {
            Scope::Connection => f.connection_bytes,
            Scope::Process => (f.process_bytes)(self.window),
            Scope::Destination => (f.destination_bytes)(self.window),
        }
    }
}

/// `pattern` is an absolute path (compared with the whole executable path) or a file
/// name (compared with its last component).
fn exe_matches(pattern: &str, exe: &str) -> bool {
    if pattern.starts_with('/') {
        pattern == exe
    } else {
        exe.rsplit('/').next() == Some(pattern)
    }
}

impl NetworkPolicy {
    /// The allowlist entry `remote:port` falls in. `resolved` maps addresses to the
    /// allowlisted host names that last resolved to them.
    pub fn allow_match(
        &self,
        remote: IpAddr,
        port: u16,
        resolved: &HashMap<IpAddr, Vec<String>>,
    ) -> Option<AllowMatch> {
        for a in &self.allow {
            if !a.ports.is_empty() && !a.ports.contains(&port) {
                continue;
            }
            if a.cidrs.iter().any(|n| n.contains(&remote)) {
                return Some(AllowMatch {
                    name: a.name.clone(),
                    host: None,
                });
            }
            if let Some(h) = resolved
                .get(&remote)
                .and_then(|names| names.iter().find(|n| a.hosts.contains(n)))
            {
                return Some(AllowMatch {
                    name: a.name.clone(),
                    host: Some(h.clone()),
                });
            }
        }
        None
    }

    /// Every host name the allowlist asks to resolve.
    pub fn hosts(&self) -> Vec<String> {
        let mut h: Vec<String> = self.allow.iter().flat_map(|a| a.hosts.clone()).collect();
        h.sort();
        h.dedup();
        h
    }

    /// The first rule whose conditions hold and whose threshold is reached.
    pub fn decide(&self, f: &FlowFacts<'_>) -> Option<NetVerdict> {
        self.rules
            .iter()
            .find(|r| r.applies(f) && r.counted(f) >= r.min_bytes)
            .map(|r| NetVerdict {
                action: r.action,
                rule_id: r.id.clone(),
                block: r.block,
                per: r.per,
            })
    }

    /// The longest window any `process`/`destination` rule counts over: how long the
    /// agent keeps per-process and per-destination byte history.
    pub fn longest_window(&self) -> Duration {
        self.rules
            .iter()
            .filter(|r| r.per != Scope::Connection)
            .map(|r| r.window)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

fn parse_net(v: &mut Validator, field: String, s: &str) -> Option<IpNet> {
    match s.parse::<IpNet>() {
        Ok(n) => Some(n.trunc()),
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => Some(IpNet::from(a)),
            Err(_) => {
                v.error(
                    field,
                    format!("`{s}` is neither an address nor a network in CIDR notation"),
                );
                None
            }
        },
    }
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `[[network.allow]]`: named once each, with CIDRs or host names (or both), no
/// port 0.
fn validate_allow(raw: Vec<AllowRaw>, v: &mut Validator) -> Vec<Allow> {
    let mut names = std::collections::HashSet::new();
    let mut allow = Vec::new();
    for (i, a) in raw.into_iter().enumerate() {
        let at = format!("network.allow[{i}]");
        if a.name.trim().is_empty() {
            v.error(format!("{at}.name"), "must not be empty");
        } else if !names.insert(a.name.clone()) {
            v.error(format!("{at}.name"), format!("`{}` is used twice", a.name));
        }
        if a.cidrs.is_empty() && a.hosts.is_empty() {
            v.error(
                at.clone(),
                "give `cidrs` or `hosts`: an entry without either allows nothing",
            );
        }
        let cidrs = a
            .cidrs
            .iter()
            .enumerate()
            .filter_map(|(j, c)| parse_net(v, format!("{at}.cidrs[{j}]"), c))
            .collect();
        for (j, h) in a.hosts.iter().enumerate() {
            if !valid_host(h) {
                v.error(
                    format!("{at}.hosts[{j}]"),
                    format!("`{h}` is not a host name"),
                );
            }
        }
        if a.ports.contains(&0) {
            v.error(format!("{at}.ports"), "port 0 is not a destination port");
        }
        allow.push(Allow {
            name: a.name,
            cidrs,
            hosts: a.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            ports: a.ports,
        });
    }
    allow
}

impl NetworkPolicyRaw {
    pub fn validate(self, v: &mut Validator) -> NetworkPolicy {
        if self.report_bytes == 0 {
            v.error(
                "network.report_bytes",
                "must be at least 1 (0 would report every connection, including the agent's own)",
            );
        }
        if self.resolve_every_secs == 0 {
            v.error("network.resolve_every_secs", "must be at least 1");
        }
        let allow = validate_allow(self.allow, v);
        let mut ids = std::collections::HashSet::new();
        let mut rules = Vec::new();
        for (i, r) in self.rules.into_iter().enumerate() {
            let at = format!("network.rules[{i}]");
            if r.id.trim().is_empty() {
                v.error(format!("{at}.id"), "must not be empty");
            } else if !ids.insert(r.id.clone()) {
                v.error(format!("{at}.id"), format!("`{}` is used twice", r.id));
            }
            let action = NetAction::parse(&r.action).unwrap_or_else(|| {
                v.error(
                    format!("{at}.action"),
                    format!(
                        "`{}` is not one of audit, kill, block-destination",
                        r.action
                    ),
                );
                NetAction::Audit
            });
            let per = Scope::parse(&r.per).unwrap_or_else(|| {
                v.error(
                    format!("{at}.per"),
                    format!("`{}` is not one of connection, process, destination", r.per),
                );
                Scope::Connection
            });
            if r.min_bytes == 0 {
                v.error(
                    format!("{at}.min_bytes"),
                    "must be at least 1 (a rule acts on bytes that were sent)",
                );
            }
            if per != Scope::Connection && r.window_secs == 0 {
                v.error(format!("{at}.window_secs"), "must be at least 1");
            }
            if action == NetAction::BlockDestination && r.block_secs == 0 {
                v.error(format!("{at}.block_secs"), "must be at least 1");
            }
            for (j, p) in r.processes.iter().enumerate() {
                if p.is_empty() || (!p.starts_with('/') && p.contains('/')) {
                    v.error(
                        format!("{at}.processes[{j}]"),
                        format!("`{p}`: give an absolute path or a bare file name"),
                    );
                }
            }
            let destinations = r
                .destinations
                .iter()
                .enumerate()
                .filter_map(|(j, c)| parse_net(v, format!("{at}.destinations[{j}]"), c))
                .collect();
            if r.ports.contains(&0) {
                v.error(format!("{at}.ports"), "port 0 is not a destination port");
            }
            let time = r.time.map(|t| t.validate(v, &format!("{at}.time")));
            rules.push(NetRule {
                id: r.id,
                description: r.description,
                action,
                min_bytes: r.min_bytes,
                per,
                window: Duration::from_secs(r.window_secs),
                processes: r.processes,
                users: r.users,
                destinations,
                ports: r.ports,
                include_allowlisted: r.include_allowlisted,
                time,
                block: Duration::from_secs(r.block_secs),
            });
        }
        NetworkPolicy {
            report_bytes: self.report_bytes,
            resolve_every: Duration::from_secs(self.resolve_every_secs.max(1)),
            allow,
            rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<NetworkPolicy, crate::ConfigErrors> {
        crate::policy::parse(&format!("version = \"t\"\n{text}"), "policy.toml").map(|p| p.network)
    }

    fn facts<'a>(
        exe: &'a str,
        remote: &str,
        port: u16,
        allowlisted: bool,
        bytes: u64,
        per_process: &'a dyn Fn(Duration) -> u64,
    ) -> FlowFacts<'a> {
        FlowFacts {
            exe: Some(exe),
            user: Some("alice"),
            remote: remote.parse().unwrap(),
            remote_port: port,
            allowlisted,
            connection_bytes: bytes,
            process_bytes: per_process,
            destination_bytes: per_process,
            now: jiff::Timestamp::now(),
        }
    }

    const RULES: &str = r#"
[[network.allow]]
name = "corp"
cidrs = ["10.1.0.0/16"]
hosts = ["files.corp.example"]
ports = [443]

[[network.rules]]
id = "kill-nc"
action = "kill"
processes = ["nc", "/usr/bin/ncat"]
min_bytes = 1000

[[network.rules]]
id = "bulk"
action = "block-destination"
per = "process"
window_secs = 60
min_bytes = 5000
block_secs = 120
"#;

    #[test]
    fn the_first_rule_whose_conditions_and_threshold_hold_decides() {
        let p = policy(RULES).unwrap();
        let small = |_: Duration| 10;
        let big = |_: Duration| 9000;
        // nc below its threshold: the next rule counts the process's bytes.
        assert_eq!(
            p.decide(&facts("/usr/bin/nc", "192.0.2.1", 80, false, 999, &small)),
            None
        );
        let v = p
            .decide(&facts("/usr/bin/nc", "192.0.2.1", 80, false, 1000, &small))
            .unwrap();
        assert_eq!((v.action, v.rule_id.as_str()), (NetAction::Kill, "kill-nc"));
        let v = p
            .decide(&facts("/usr/bin/curl", "192.0.2.1", 80, false, 10, &big))
            .unwrap();
        assert_eq!(
            (v.action, v.rule_id.as_str()),
            (NetAction::BlockDestination, "bulk")
        );
        assert_eq!(v.block, Duration::from_secs(120));
        // Absolute paths compare whole; names compare the last component.
        assert!(p
            .decide(&facts("/opt/ncat", "192.0.2.1", 80, false, 5000, &small))
            .is_none());
        assert!(p
            .decide(&facts(
                "/usr/bin/ncat",
                "192.0.2.1",
                80,
                false,
                5000,
                &small
            ))
            .is_some());
        // Allowlisted destinations are outside rules unless a rule includes them.
        assert_eq!(
            p.decide(&facts("/usr/bin/nc", "10.1.2.3", 443, true, 1 << 30, &big)),
            None
        );
    }

    #[test]
    fn allowlist_matches_networks_ports_and_resolved_names() {
        let p = policy(RULES).unwrap();
        let mut resolved = HashMap::new();
        assert_eq!(
            p.allow_match("10.1.9.9".parse().unwrap(), 443, &resolved)
                .map(|m| m.name),
            Some("corp".into())
        );
        assert_eq!(
            p.allow_match("10.1.9.9".parse().unwrap(), 22, &resolved),
            None
        );
        let ip: IpAddr = "198.51.100.4".parse().unwrap();
        assert_eq!(p.allow_match(ip, 443, &resolved), None);
        resolved.insert(ip, vec!["files.corp.example".to_string()]);
        assert_eq!(
            p.allow_match(ip, 443, &resolved),
            Some(AllowMatch {
                name: "corp".into(),
                host: Some("files.corp.example".into())
            })
        );
        assert_eq!(p.hosts(), vec!["files.corp.example".to_string()]);
        assert_eq!(p.longest_window(), Duration::from_secs(60));
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let err = policy(
            r#"
[network]
report_bytes = 0

[[network.allow]]
name = "x"
cidrs = ["10.0.0.0/33"]
hosts = ["bad host"]

[[network.allow]]
name = "x"

[[network.rules]]
id = "a"
action = "explode"
per = "user"
min_bytes = 0
processes = ["bin/nc"]
destinations = ["nowhere"]
time = { from = "08:00", to = "08:00" }

[[network.rules]]
id = "a"
action = "block-destination"
min_bytes = 1
block_secs = 0
"#,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "network.report_bytes",
            "network.allow[0].cidrs[0]",
            "network.allow[0].hosts[0]",
            "network.allow[1].name",
            "network.allow[1]:",
            "network.rules[0].action",
            "network.rules[0].per",
            "network.rules[0].min_bytes",
            "network.rules[0].processes[0]",
            "network.rules[0].destinations[0]",
            "network.rules[0].time.to",
            "network.rules[1].id",
            "network.rules[1].block_secs",
        ] {
            assert!(err.contains(needle), "missing {needle} in:\n{err}");
        }
    }
}
