//! The USB part of the fence policy: an ordered rule list (first match wins) and an
//! implicit default target, plus built-in protections.
//!
//! Evaluation is pure: a device's identity, the host's groups and the time go in, a
//! [`Verdict`] naming its rule comes out. Enforcement lives in the agent.

use std::fmt;

use serde::Serialize;

use crate::event::UsbDevice;
use crate::load::Validator;

/// What happens to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Authorize: the device works normally.
    Allow,
    /// Authorize, but its block devices are made read-only before any mount.
    ReadOnly,
    /// Deauthorize: no driver binds; the device stays visible.
    Block,
    /// Deauthorize and remove it from the bus.
    Reject,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Allow => "allow",
            Target::ReadOnly => "read-only",
            Target::Block => "block",
            Target::Reject => "reject",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "allow" => Target::Allow,
            "read-only" => Target::ReadOnly,
            "block" => Target::Block,
            "reject" => Target::Reject,
            _ => return None,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rule id of the implicit default.
pub const IMPLICIT_DEFAULT: &str = "implicit default";
/// Rule id of the built-in BadUSB protection.
pub const BUILTIN_BADUSB: &str = "builtin.badusb";
/// Rule id of the built-in root-hub exemption.
pub const BUILTIN_ROOT_HUB: &str = "builtin.root-hub";

// ---------------------------------------------------------------- raw (serde) form

/// `[usb]` of `policy.toml`.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsbPolicyRaw {
    /// Devices the organisation issued or approved (`[[usb.known_devices]]`).
    #[serde(default)]
    pub known_devices: Vec<KnownDeviceRaw>,
    /// Target for a device no rule matches: `allow`, `read-only`, `block`, `reject`.
    #[serde(default = "default_target")]
    pub default_target: String,
    /// `enforce`: default-deny (`authorized_default = 0` on every root hub) and apply
    /// verdicts; `audit`: decide and report only, touch nothing.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Devices present when the agent starts: `apply` the policy to them, or `keep`
    /// them as they are (decisions are still reported).
    #[serde(default = "default_present")]
    pub present_at_start: String,
    /// Reject devices that combine mass storage with a keyboard/HID interface.
    #[serde(default = "yes")]
    pub badusb_protection: bool,
    /// Ordered rules; the first that matches decides (`[[usb.rules]]`).
    #[serde(default)]
    pub rules: Vec<RuleRaw>,
}

impl Default for UsbPolicyRaw {
    fn default() -> Self {
        UsbPolicyRaw {
            known_devices: Vec::new(),
            default_target: default_target(),
            mode: default_mode(),
            present_at_start: default_present(),
            badusb_protection: true,
            rules: Vec::new(),
        }
    }
}

fn default_target() -> String {
    "block".into()
}
fn default_mode() -> String {
    "audit".into()
}
fn default_present() -> String {
    "apply".into()
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KnownDeviceRaw {
    /// Name for people, e.g. `finance stick #3`; must be unique. Rules refer to it.
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

/// One `[[usb.rules]]` entry. Every matcher given must match (AND); a list matches
/// when any element does (OR).
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRaw {
    /// Unique rule id, named in every decision it makes.
    pub id: String,
    /// `allow`, `read-only`, `block` or `reject`.
    pub target: String,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
    /// `vid:pid` patterns, `*` for any half or any digit: `0781:5581`, `0951:*`, `07*:*`.
    #[serde(default)]
    pub vid_pid: Option<Vec<String>>,
    /// Exact serial numbers.
    #[serde(default)]
    pub serial: Option<Vec<String>>,
    /// Manufacturer string pattern (`*` wildcard, case-sensitive).
    #[serde(default)]
    pub manufacturer: Option<String>,
    /// Product string pattern (`*` wildcard, case-sensitive).
    #[serde(default)]
    pub product: Option<String>,
    /// Device identity hashes.
    #[serde(default)]
    pub hash: Option<Vec<String>>,
    /// Identity hashes of the parent device (the hub it is plugged into).
    #[serde(default)]
    pub parent_hash: Option<Vec<String>>,
    /// Port path patterns, e.g. `1-1`, `2-*`.
    #[serde(default)]
    pub port: Option<Vec<String>>,
    /// Interface classes as `cc:ss:pp` hex with `*` wildcards.
    #[serde(default)]
    pub interfaces: Option<InterfacesRaw>,
    /// Connection speeds in Mbit/s as the kernel reports them (`1.5`, `12`, `480`, `5000`, ...).
    #[serde(default)]
    pub speed: Option<Vec<String>>,
    /// Host groups of the agent (`[agent] groups` in agent.toml); any one suffices.
    #[serde(default)]
    pub host_groups: Option<Vec<String>>,
    /// Time window in which the rule applies.
    #[serde(default)]
    pub time: Option<TimeWindowRaw>,
    /// Label of a known device (`[[usb.known_devices]]`) the device must match.
    #[serde(default)]
    pub label: Option<String>,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterfacesRaw {
    /// Every pattern must match some interface.
    #[serde(default, rename = "all-of")]
    pub all_of: Vec<String>,
    /// At least one pattern must match some interface.
    #[serde(default, rename = "one-of")]
    pub one_of: Vec<String>,
    /// No interface may match any pattern.
    #[serde(default, rename = "none-of")]
    pub none_of: Vec<String>,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindowRaw {
    /// Weekdays: `mon`..`sun` (default: every day).
    #[serde(default)]
    pub days: Vec<String>,
    /// Start, `HH:MM` local time (inclusive).
    pub from: String,
    /// End, `HH:MM` local time (exclusive); earlier than `from` means overnight.
    pub to: String,
    /// IANA time zone, e.g. `Asia/Shanghai` (default: the host's).
    #[serde(default)]
    pub tz: Option<String>,
}

impl TimeWindowRaw {
    /// Validates the window; errors are reported under `at` (e.g. `usb.rules[2].time`).
    pub fn validate(self, v: &mut Validator, at: &str) -> TimeWindow {
        let mut days = 0u8;
        if self.days.is_empty() {
            days = 0x7f;
        }
        for (j, d) in self.days.iter().enumerate() {
            match ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
                .iter()
                .position(|x| x.eq_ignore_ascii_case(d))
            {
                Some(p) => days |= 1 << p,
                None => v.error(format!("{at}.days[{j}]"), format!("`{d}` is not mon..sun")),
            }
        }
        let from = parse_time(v, format!("{at}.from"), &self.from);
        let to = parse_time(v, format!("{at}.to"), &self.to);
        if from == to {
            v.error(
                format!("{at}.to"),
                "the window is empty: `from` equals `to`",
            );
        }
        let tz = self
            .tz
            .as_ref()
            .and_then(|name| match jiff::tz::TimeZone::get(name) {
                Ok(tz) => Some(tz),
                Err(_) => {
                    v.error(
                        format!("{at}.tz"),
                        format!("`{name}` is not a known IANA time zone"),
                    );
                    None
                }
            });
        TimeWindow { days, from, to, tz }
    }
}

// ---------------------------------------------------------------- validated form

/// A validated USB policy.
#[derive(Debug, Clone, PartialEq)]
pub struct UsbPolicy {
    pub known_devices: Vec<KnownDevice>,
    pub default_target: Target,
    pub enforce: bool,
    pub apply_at_start: bool,
    pub badusb_protection: bool,
    pub rules: Vec<Rule>,
}

impl Default for UsbPolicy {
    fn default() -> Self {
        UsbPolicy {
            known_devices: Vec::new(),
            default_target: Target::Block,
            enforce: false,
            apply_at_start: true,
            badusb_protection: true,
            rules: Vec::new(),
        }
    }
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
    /// Named by its serial only: any stick programmed with that serial matches.
    pub fn serial_only(&self) -> bool {
        self.serial.is_some() && self.hash.is_none() && (self.vid.is_none() || self.pid.is_none())
    }

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

/// A `cc:ss:pp` pattern; `None` parts are wildcards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfacePattern {
    pub class: Option<u8>,
    pub subclass: Option<u8>,
    pub protocol: Option<u8>,
}

impl InterfacePattern {
    fn matches(&self, i: &crate::event::UsbInterface) -> bool {
        self.class.is_none_or(|c| c == i.class)
            && self.subclass.is_none_or(|s| s == i.subclass)
            && self.protocol.is_none_or(|p| p == i.protocol)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TimeWindow {
    /// Bit i set = weekday i allowed (0 = Monday).
    pub days: u8,
    pub from: jiff::civil::Time,
    pub to: jiff::civil::Time,
    pub tz: Option<jiff::tz::TimeZone>,
}

impl TimeWindow {
    pub fn contains(&self, now: jiff::Timestamp) -> bool {
        let tz = self.tz.clone().unwrap_or_else(jiff::tz::TimeZone::system);
        let local = now.to_zoned(tz);
        let day = local.weekday().to_monday_zero_offset() as u8;
        let t = local.time();
        if self.from <= self.to {
            self.days & (1 << day) != 0 && t >= self.from && t < self.to
        } else {
            // Overnight: the part after midnight belongs to the previous day's window.
            let yesterday = (day + 6) % 7;
            (self.days & (1 << day) != 0 && t >= self.from)
                || (self.days & (1 << yesterday) != 0 && t < self.to)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub target: Target,
    pub description: String,
    /// (vid pattern, pid pattern), lowercase, `*` wildcards.
    pub vid_pid: Option<Vec<(String, String)>>,
    pub serial: Option<Vec<String>>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    pub hash: Option<Vec<String>>,
    pub parent_hash: Option<Vec<String>>,
    pub port: Option<Vec<String>>,
    pub all_of: Vec<InterfacePattern>,
    pub one_of: Vec<InterfacePattern>,
    pub none_of: Vec<InterfacePattern>,
    pub speed: Option<Vec<String>>,
    pub host_groups: Option<Vec<String>>,
    pub time: Option<TimeWindow>,
    pub label: Option<String>,
}

/// What the evaluation needs besides the device.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub host_groups: &'a [String],
    pub now: jiff::Timestamp,
}

/// The decision for one device and the rule that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub target: Target,
    pub rule_id: String,
    /// A sentence for people.
    pub reason: String,
}

/// `*` matches any run of characters; everything else literally.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// A root hub (`usbN`): never touched, whatever the policy says.
pub fn is_root_hub(d: &UsbDevice) -> bool {
    d.port_path.starts_with("usb") && d.port_path[3..].bytes().all(|b| b.is_ascii_digit())
}

/// Mass storage together with a HID (keyboard/mouse) interface.
pub fn is_badusb(d: &UsbDevice) -> bool {
    d.is_mass_storage() && d.interfaces.iter().any(|i| i.class == 0x03)
}

impl Rule {
    /// The rule grants access (allow, read-only) to devices named by serial and
    /// nothing else that identifies them (`vid_pid`, `hash`, `label`): any stick can
    /// be programmed with a serial. (A block or reject by serial may match clones
    /// too: that only narrows what gets in.)
    pub fn serial_only(&self) -> bool {
        matches!(self.target, Target::Allow | Target::ReadOnly)
            && self.serial.is_some()
            && self.vid_pid.is_none()
            && self.hash.is_none()
            && self.label.is_none()
    }

    /// True when every matcher of the rule accepts the device. A serial-only rule
    /// that grants access accepts a device only with the vid:pid the inventory
    /// (`known_devices`) gives for that serial: a clone with another vid:pid is not the
    /// device the rule meant, and without an inventory entry the rule matches nothing
    /// (`lint` says so).
    pub fn matches(&self, d: &UsbDevice, known: &[KnownDevice], ctx: &Context<'_>) -> bool {
        if self.serial_only()
            && !known.iter().any(|k| {
                !k.serial_only() && k.serial.is_some() && k.serial == d.serial && k.matches(d)
            })
        {
            return false;
        }
        self.matches_fields(d, known, ctx)
    }

    fn matches_fields(&self, d: &UsbDevice, known: &[KnownDevice], ctx: &Context<'_>) -> bool {
        let any = |list: &Option<Vec<String>>, f: &dyn Fn(&String) -> bool| {
            list.as_ref().is_none_or(|l| l.iter().any(f))
        };
        let hit = |p: &InterfacePattern| d.interfaces.iter().any(|i| p.matches(i));
        any(&self.serial, &|s| d.serial.as_ref() == Some(s))
            && self
                .vid_pid
                .as_ref()
                .is_none_or(|l| l.iter().any(|(v, p)| glob(v, &d.vid) && glob(p, &d.pid)))
            && self
                .manufacturer
                .as_ref()
                .is_none_or(|m| d.manufacturer.as_ref().is_some_and(|x| glob(m, x)))
            && self
                .product
                .as_ref()
                .is_none_or(|m| d.product.as_ref().is_some_and(|x| glob(m, x)))
            && any(&self.hash, &|h| *h == d.hash)
            && any(&self.parent_hash, &|h| d.parent_hash.as_ref() == Some(h))
            && any(&self.port, &|p| glob(p, &d.port_path))
            && any(&self.speed, &|s| d.speed.as_ref() == Some(s))
            && any(&self.host_groups, &|g| ctx.host_groups.contains(g))
            && self.all_of.iter().all(hit)
            && (self.one_of.is_empty() || self.one_of.iter().any(hit))
            && !self.none_of.iter().any(hit)
            && self.time.as_ref().is_none_or(|w| w.contains(ctx.now))
            && self
                .label
                .as_ref()
                .is_none_or(|l| known.iter().any(|k| k.label == *l && k.matches(d)))
    }
}

impl UsbPolicy {
    /// Decides for `d`: built-in protections, then the rules in order, then the default.
    pub fn evaluate(&self, d: &UsbDevice, ctx: &Context<'_>) -> Verdict {
        if is_root_hub(d) {
            return Verdict {
                target: Target::Allow,
                rule_id: BUILTIN_ROOT_HUB.into(),
                reason: "root hubs are never touched".into(),
            };
        }
        if self.badusb_protection && is_badusb(d) {
            return Verdict {
                target: Target::Reject,
                rule_id: BUILTIN_BADUSB.into(),
                reason: "mass storage combined with a keyboard/HID interface (BadUSB)".into(),
            };
        }
        for r in &self.rules {
            if r.matches(d, &self.known_devices, ctx) {
                return Verdict {
                    target: r.target,
                    rule_id: r.id.clone(),
                    reason: if r.description.is_empty() {
                        format!("rule {} matched", r.id)
                    } else {
                        r.description.clone()
                    },
                };
            }
        }
        Verdict {
            target: self.default_target,
            rule_id: IMPLICIT_DEFAULT.into(),
            reason: "no rule matched".into(),
        }
    }

    /// The known-device entry matching `d`, if any.
    pub fn known_device(&self, d: &UsbDevice) -> Option<&KnownDevice> {
        self.known_devices.iter().find(|k| k.matches(d))
    }

    /// What is valid but weak: device identities that trust a serial alone. Printed by
    /// `check-config` (both programs) as warnings; the policy still loads.
    pub fn lint(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, k) in self.known_devices.iter().enumerate() {
            if k.serial_only() {
                out.push(format!(
                    "usb.known_devices[{i}] (`{}`): named by serial only; any stick programmed with that serial counts as it (and as known): add vid and pid, or hash",
                    k.label
                ));
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.serial_only() {
                out.push(format!(
                    "usb.rules[{i}] (`{}`): serial without vid_pid, hash or label; it matches only devices with the vid:pid usb.known_devices gives for that serial (none without such an entry): add vid_pid",
                    r.id
                ));
            }
        }
        out
    }
}

// ---------------------------------------------------------------- validation

fn hex4(v: &mut Validator, field: String, value: Option<String>) -> Option<String> {
    let value = value?;
    let lower = value.to_ascii_lowercase();
    if lower.len() != 4 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        v.error(field, format!("`{value}` is not 4 hex digits"));
    }
    Some(lower)
}

/// A rule's `vid_pid` patterns (`vvvv:pppp`, hex, `*` wildcards), lower case.
fn parse_vid_pids(v: &mut Validator, i: usize, list: Vec<String>) -> Vec<(String, String)> {
    list.into_iter()
        .enumerate()
        .map(|(j, s)| {
            let lower = s.to_ascii_lowercase();
            match lower.split_once(':') {
                Some((a, b)) if hex_pattern(a, 4) && hex_pattern(b, 4) => {
                    (a.to_string(), b.to_string())
                }
                _ => {
                    v.error(
                        format!("usb.rules[{i}].vid_pid[{j}]"),
                        format!("`{s}` is not `vvvv:pppp` (hex, `*` wildcards)"),
                    );
                    (String::new(), String::new())
                }
            }
        })
        .collect()
}

/// The interface patterns of rule `i` (all-of, one-of, none-of); a rule whose
/// required interface is also forbidden can never match and is refused.
fn parse_interfaces(
    v: &mut Validator,
    i: usize,
    ifs: &InterfacesRaw,
) -> (
    Vec<InterfacePattern>,
    Vec<InterfacePattern>,
    Vec<InterfacePattern>,
) {
    let at = |f: &str| format!("usb.rules[{i}].{f}");
    let (mut all_of, mut one_of, mut none_of) = (Vec::new(), Vec::new(), Vec::new());
    for (name, src, dst) in [
        ("all-of", &ifs.all_of, &mut all_of),
        ("one-of", &ifs.one_of, &mut one_of),
        ("none-of", &ifs.none_of, &mut none_of),
    ] {
        for (j, s) in src.iter().enumerate() {
            dst.push(parse_interface(
                v,
                format!("usb.rules[{i}].interfaces.{name}[{j}]"),
                s,
            ));
        }
    }
    if ifs.all_of.is_empty() && ifs.one_of.is_empty() && ifs.none_of.is_empty() {
        v.error(
            at("interfaces"),
            "give at least one of all-of, one-of, none-of",
        );
    }
    // A required interface that is also forbidden can never match.
    for a in &all_of {
        if none_of.iter().any(|n| covers(n, a)) {
            v.error(
                at("interfaces"),
                "an all-of pattern is also excluded by none-of: the rule can never match",
            );
        }
    }
    (all_of, one_of, none_of)
}

/// `[[usb.known_devices]]`: labelled once each, by serial or hash.
fn validate_known(raw: Vec<KnownDeviceRaw>, v: &mut Validator) -> Vec<KnownDevice> {
    let mut labels = std::collections::HashSet::new();
    let mut known = Vec::new();
    for (i, d) in raw.into_iter().enumerate() {
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
    known
}

/// `len` hex digits, or a shorter/equal pattern of hex digits and `*` wildcards.
fn hex_pattern(s: &str, len: usize) -> bool {
    let ok_chars = s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'*');
    if s.contains('*') {
        ok_chars && !s.is_empty() && s.len() <= len
    } else {
        ok_chars && s.len() == len
    }
}

fn hash_list(v: &mut Validator, field: &str, list: Option<Vec<String>>) -> Option<Vec<String>> {
    let list = list?;
    for (i, h) in list.iter().enumerate() {
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            v.error(
                format!("{field}[{i}]"),
                "must be a 64-hex-digit device hash",
            );
        }
    }
    Some(list.into_iter().map(|h| h.to_ascii_lowercase()).collect())
}

fn parse_interface(v: &mut Validator, field: String, s: &str) -> InterfacePattern {
    let parts: Vec<&str> = s.split(':').collect();
    let part = |p: &str| -> Result<Option<u8>, ()> {
        if p == "*" {
            Ok(None)
        } else if p.len() == 2 {
            u8::from_str_radix(p, 16).map(Some).map_err(|_| ())
        } else {
            Err(())
        }
    };
    if let [c, s, p] = parts.as_slice() {
        if let (Ok(class), Ok(subclass), Ok(protocol)) = (part(c), part(s), part(p)) {
            return InterfacePattern {
                class,
                subclass,
                protocol,
            };
        }
    }
    v.error(
        field,
        format!("`{s}` is not `cc:ss:pp` (two hex digits or `*` each)"),
    );
    InterfacePattern {
        class: None,
        subclass: None,
        protocol: None,
    }
}

fn parse_time(v: &mut Validator, field: String, s: &str) -> jiff::civil::Time {
    match jiff::civil::Time::strptime("%H:%M", s) {
        Ok(t) => t,
        Err(_) => {
            v.error(field, format!("`{s}` is not a time of day `HH:MM`"));
            jiff::civil::Time::midnight()
        }
    }
}

fn nonempty<T>(v: &mut Validator, field: String, list: &Option<Vec<T>>) {
    if list.as_ref().is_some_and(|l| l.is_empty()) {
        v.error(
            field,
            "an empty list matches no device: remove the key or list values",
        );
    }
}

impl UsbPolicyRaw {
    pub(crate) fn validate(self, v: &mut Validator) -> UsbPolicy {
        let known = validate_known(self.known_devices, v);
        let default_target = Target::parse(&self.default_target).unwrap_or_else(|| {
            v.error(
                "usb.default_target",
                format!(
                    "`{}` is not allow, read-only, block or reject",
                    self.default_target
                ),
            );
            Target::Block
        });
        let enforce = match self.mode.as_str() {
            "enforce" => true,
            "audit" => false,
            other => {
                v.error("usb.mode", format!("`{other}` is not `enforce` or `audit`"));
                false
            }
        };
        let apply_at_start = match self.present_at_start.as_str() {
            "apply" => true,
            "keep" => false,
            other => {
                v.error(
                    "usb.present_at_start",
                    format!("`{other}` is not `apply` or `keep`"),
                );
                true
            }
        };
        let mut ids = std::collections::HashSet::new();
        let mut rules = Vec::new();
        for (i, r) in self.rules.into_iter().enumerate() {
            let at = |f: &str| format!("usb.rules[{i}].{f}");
            if r.id.trim().is_empty() {
                v.error(at("id"), "must not be empty");
            } else if !ids.insert(r.id.clone()) {
                v.error(at("id"), format!("duplicate rule id `{}`", r.id));
            }
            let target = Target::parse(&r.target).unwrap_or_else(|| {
                v.error(
                    at("target"),
                    format!("`{}` is not allow, read-only, block or reject", r.target),
                );
                Target::Block
            });
            for (name, list) in [
                ("vid_pid", &r.vid_pid),
                ("serial", &r.serial),
                ("hash", &r.hash),
                ("parent_hash", &r.parent_hash),
                ("port", &r.port),
                ("speed", &r.speed),
                ("host_groups", &r.host_groups),
            ] {
                nonempty(v, at(name), list);
            }
            let vid_pid = r.vid_pid.map(|l| parse_vid_pids(v, i, l));
            let (all_of, one_of, none_of) = match &r.interfaces {
                Some(ifs) => parse_interfaces(v, i, ifs),
                None => Default::default(),
            };
            let time = r
                .time
                .map(|t| t.validate(v, &format!("usb.rules[{i}].time")));
            if let Some(l) = &r.label {
                if !known.iter().any(|k| k.label == *l) {
                    v.error(at("label"), format!("no known device has the label `{l}`"));
                }
            }
            for (name, pat) in [("manufacturer", &r.manufacturer), ("product", &r.product)] {
                if pat.as_ref().is_some_and(|p| p.is_empty()) {
                    v.error(at(name), "an empty pattern matches only devices without the string; use `*` or remove it");
                }
            }
            rules.push(Rule {
                id: r.id,
                target,
                description: r.description,
                vid_pid,
                serial: r.serial,
                manufacturer: r.manufacturer,
                product: r.product,
                hash: hash_list(v, &at("hash"), r.hash),
                parent_hash: hash_list(v, &at("parent_hash"), r.parent_hash),
                port: r.port,
                all_of,
                one_of,
                none_of,
                speed: r.speed,
                host_groups: r.host_groups,
                time,
                label: r.label,
            });
        }
        UsbPolicy {
            known_devices: known,
            default_target,
            enforce,
            apply_at_start,
            badusb_protection: self.badusb_protection,
            rules,
        }
    }
}

/// True when every interface matching `inner` also matches `outer`.
fn covers(outer: &InterfacePattern, inner: &InterfacePattern) -> bool {
    let f = |o: Option<u8>, i: Option<u8>| o.is_none() || o == i;
    f(outer.class, inner.class)
        && f(outer.subclass, inner.subclass)
        && f(outer.protocol, inner.protocol)
}

#[cfg(test)]
mod tests;
