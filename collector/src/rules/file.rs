//! Rule files: the TOML schema, its validation, and compiling every CEL expression
//! once at load. A file with any problem is refused as a whole, each problem named
//! with `file:line:column`, the field and (for CEL) the expression's own error.
//!
//! ```toml
//! [lists]                       # named string lists, `lists.<name>` in CEL
//! allowed_destinations = ["10.0.0.0/8"]
//! [user_groups]                 # group → user names (`user.groups`)
//! it = ["alice"]
//! [agent_groups]                # group → agent id patterns with `*` (`agent.groups`)
//! finance = ["fin-*"]
//! [working_hours]               # `time.working_hours`
//! timezone = "Asia/Shanghai"
//! days = ["mon", "tue", "wed", "thu", "fri"]
//! start = "08:30"
//! end = "18:00"
//!
//! [[rule]]
//! id = "site.usb.night"
//! title = "USB storage at night"
//! level = "yellow"              # red | yellow | blue
//! tags = ["等保2.0 8.1.4.2", "NIST AU-6"]
//! on = ["usb.attached"]         # event kinds ("*" for all)
//! condition = "!time.working_hours"
//! summary = "USB {event.data.vid}:{event.data.pid} on {agent.id} at {time.local}"
//! key = "agent.id"              # correlation group and suppression key (CEL)
//! suppress = "30m"              # same rule and key within 30 min: one alert, counted
//! [rule.correlation]            # optional
//! aggregate = "count"           # count | sum | distinct | first-seen
//! field = "event.data.size"     # sum, distinct, first-seen: the value (CEL)
//! window = "10m"
//! threshold = 51                # fires when the aggregate reaches it
//! [[rule.actions]]
//! type = "notify"               # or a command: block-device, set-device-read-only,
//!                               # quarantine-file, kill-process, request-inventory
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use weilan_config::load::{Validate, Validator};

use super::Level;

/// Variables a condition, key, field or template may use.
pub const VARIABLES: &[&str] = &[
    "event", "agent", "user", "device", "time", "clock", "lists", "person",
];

#[derive(Debug, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFileRaw {
    /// Named lists of strings, merged across files (a later file replaces a list).
    #[serde(default)]
    pub lists: BTreeMap<String, Vec<String>>,
    /// Group name → user names.
    #[serde(default)]
    pub user_groups: BTreeMap<String, Vec<String>>,
    /// Group name → agent id patterns (`*` matches any run of characters).
    #[serde(default)]
    pub agent_groups: BTreeMap<String, Vec<String>>,
    /// Office hours (the last file that sets them wins).
    #[serde(default)]
    pub working_hours: Option<WorkingHoursRaw>,
    #[serde(default)]
    pub rule: Vec<RuleRaw>,
}

#[derive(Debug, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingHoursRaw {
    /// IANA time zone, e.g. `Asia/Shanghai`.
    pub timezone: String,
    /// `mon` … `sun`.
    pub days: Vec<String>,
    /// `HH:MM`, local.
    pub start: String,
    pub end: String,
}

#[derive(Debug, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRaw {
    /// Unique id, named by every alert it raises.
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// `red`, `yellow` or `blue`.
    pub level: String,
    /// Compliance references and labels.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Event kinds the rule looks at; `*` for all.
    pub on: Vec<String>,
    /// CEL, must yield a bool; default `true`.
    #[serde(default)]
    pub condition: Option<String>,
    /// Text with `{CEL}` placeholders.
    pub summary: String,
    /// CEL: the correlation group and suppression key; default `agent.id`.
    #[serde(default)]
    pub key: Option<String>,
    /// Set `false` to switch a rule (e.g. a built-in one) off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Window in which the same rule and key update one alert; default `10m`, `0s` off.
    #[serde(default)]
    pub suppress: Option<String>,
    #[serde(default)]
    pub correlation: Option<CorrelationRaw>,
    #[serde(default)]
    pub actions: Vec<ActionRaw>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelationRaw {
    /// `count`, `sum`, `distinct`, `first-seen` or `absent`.
    pub aggregate: String,
    /// CEL: the value summed, counted distinct, or checked for first sight; for
    /// `absent` the presence key looked up (default: the rule's `key`).
    #[serde(default)]
    pub field: Option<String>,
    /// Sliding window (`10m`, `1h`, `30d`).
    pub window: String,
    /// The aggregate that fires the rule (not used by `first-seen` and `absent`).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// `absent`: the facts whose presence under the rule's key within `window` before
    /// a match keeps the rule quiet (a badge-in at the site before a USB plug).
    #[serde(default)]
    pub presence: Option<PresenceRaw>,
}

#[derive(Debug, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceRaw {
    /// Fact kinds that count as presence.
    pub on: Vec<String>,
    /// CEL over the presence fact, must yield a bool; default `true`.
    #[serde(default)]
    pub condition: Option<String>,
    /// CEL: the presence fact's key, compared with the rule's `key` of a match.
    pub key: String,
}

#[derive(Debug, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRaw {
    /// `notify` or a command to the agent that sent the event.
    #[serde(rename = "type")]
    pub kind: String,
    /// `notify`: sink names (default: every sink).
    #[serde(default)]
    pub sinks: Vec<String>,
    /// Commands: CEL giving the device hash, file path or process id; for
    /// `quarantine-file` and `kill-process` also `check` (SHA-256 or executable).
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub check: Option<String>,
    /// How long the command stays valid (default `10m`).
    #[serde(default)]
    pub valid: Option<String>,
}

/// A compiled CEL expression with its text (for messages).
#[derive(Debug)]
pub struct Expr {
    pub text: String,
    pub program: cel::Program,
}

/// `text {expr} text`.
#[derive(Debug)]
pub enum Piece {
    Text(String),
    Expr(Expr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Sum,
    Distinct,
    FirstSeen,
    /// Fires when no presence fact under the same key came within the window before.
    Absent,
}

/// What keeps an `absent` rule quiet.
#[derive(Debug)]
pub struct Presence {
    pub on: Vec<String>,
    pub condition: Option<Expr>,
    pub key: Expr,
}

#[derive(Debug)]
pub struct Correlation {
    pub aggregate: Aggregate,
    pub field: Option<Expr>,
    pub window_secs: i64,
    pub threshold: f64,
    /// `absent` only.
    pub presence: Option<Presence>,
    /// Changes when the definition changes (state is kept across reloads otherwise).
    pub fingerprint: String,
}

/// Commands a rule can send to the agent whose event fired it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    BlockDevice,
    SetDeviceReadOnly,
    QuarantineFile,
    KillProcess,
    RequestInventory,
}

#[derive(Debug)]
pub enum Action {
    Notify { sinks: Vec<String> },
    Command(Box<CommandAction>),
}

/// A command and the CEL that fills it in.
#[derive(Debug)]
pub struct CommandAction {
    pub kind: CommandKind,
    pub target: Option<Expr>,
    pub check: Option<Expr>,
    pub valid_secs: i64,
}

#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub title: String,
    pub description: String,
    pub level: Level,
    pub tags: Vec<String>,
    pub on: Vec<String>,
    pub condition: Option<Expr>,
    pub summary: Vec<Piece>,
    pub key: Option<Expr>,
    pub enabled: bool,
    pub suppress_secs: i64,
    pub correlation: Option<Correlation>,
    pub actions: Vec<Action>,
    /// Where it was defined (`builtin/usb.toml`, `/etc/weilan/rules/site.toml`).
    pub origin: String,
}

impl Rule {
    /// Every CEL expression of the rule: its condition, key, summary, correlation and
    /// the commands it sends.
    pub fn expressions(&self) -> impl Iterator<Item = &Expr> {
        let summary = self.summary.iter().filter_map(|p| match p {
            Piece::Expr(e) => Some(e),
            Piece::Text(_) => None,
        });
        let correlation = self.correlation.iter().flat_map(|c| {
            c.field.iter().chain(
                c.presence
                    .iter()
                    .flat_map(|p| p.condition.iter().chain(std::iter::once(&p.key))),
            )
        });
        let commands = self.actions.iter().flat_map(|a| match a {
            Action::Command(c) => c.target.iter().chain(c.check.iter()).collect::<Vec<_>>(),
            Action::Notify { .. } => Vec::new(),
        });
        self.condition
            .iter()
            .chain(self.key.iter())
            .chain(summary)
            .chain(correlation)
            .chain(commands)
    }
}

/// Office hours, validated.
#[derive(Debug, Clone)]
pub struct WorkingHours {
    pub tz: jiff::tz::TimeZone,
    pub days: Vec<jiff::civil::Weekday>,
    pub start: jiff::civil::Time,
    pub end: jiff::civil::Time,
}

impl Default for WorkingHours {
    fn default() -> Self {
        use jiff::civil::Weekday::*;
        WorkingHours {
            tz: jiff::tz::TimeZone::get("Asia/Shanghai").unwrap_or(jiff::tz::TimeZone::UTC),
            days: vec![Monday, Tuesday, Wednesday, Thursday, Friday],
            start: jiff::civil::time(8, 30, 0, 0),
            end: jiff::civil::time(18, 0, 0, 0),
        }
    }
}

/// One validated file.
#[derive(Debug)]
pub struct RulesFile {
    pub lists: BTreeMap<String, Vec<String>>,
    pub user_groups: BTreeMap<String, Vec<String>>,
    pub agent_groups: BTreeMap<String, Vec<String>>,
    pub working_hours: Option<WorkingHours>,
    pub rules: Vec<Rule>,
}

/// Parses a duration such as `90s`, `10m`, `1h 30m`, `30d` (a day is 24 h) into seconds.
pub fn parse_secs(s: &str) -> Result<i64, String> {
    let span: jiff::Span = s
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 90s, 10m, 2h, 30d)"))?;
    let secs = span
        .total((
            jiff::Unit::Second,
            jiff::SpanRelativeTo::days_are_24_hours(),
        ))
        .map_err(|e| format!("`{s}`: {e}"))?;
    if secs < 0.0 {
        return Err(format!("`{s}` is negative"));
    }
    Ok(secs as i64)
}

/// Compiles one CEL expression, checking it only names known variables.
pub fn compile(text: &str) -> Result<Expr, String> {
    let program = cel::Program::compile(text).map_err(|e| {
        format!(
            "CEL: {}",
            e.to_string().replace("ERROR: <input>:", "expression ")
        )
    })?;
    let refs = program.references();
    // Names bound by comprehension macros (`list.exists(i, i > 0)`) are not inputs.
    static BOUND: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"\.(?:all|exists|exists_one|map|filter)\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,",
        )
        .expect("valid regex")
    });
    let bound: Vec<&str> = BOUND
        .captures_iter(text)
        .filter_map(|c| c.get(1).map(|m| m.as_str()))
        .collect();
    if let Some(v) = refs
        .variables()
        .into_iter()
        .find(|v| !VARIABLES.contains(v) && !bound.contains(v))
    {
        return Err(format!(
            "CEL: unknown variable `{v}` (known: {})",
            VARIABLES.join(", ")
        ));
    }
    Ok(Expr {
        text: text.to_string(),
        program,
    })
}

/// Splits `text {expr} text` and compiles the expressions (`{{` and `}}` are literal braces).
pub fn template(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|p| p.1) == Some('{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek().map(|p| p.1) == Some('}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut depth = 1;
                let mut end = None;
                for (j, d) in chars.by_ref() {
                    match d {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = Some(j);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let end = end.ok_or_else(|| format!("`{{` at byte {i} is never closed"))?;
                if !lit.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut lit)));
                }
                let inner = &text[i + 1..end];
                pieces.push(Piece::Expr(
                    compile(inner).map_err(|e| format!("placeholder `{{{inner}}}`: {e}"))?,
                ));
            }
            '}' => return Err(format!("`}}` at byte {i} has no `{{` (write `}}}}`)")),
            _ => lit.push(c),
        }
    }
    if !lit.is_empty() {
        pieces.push(Piece::Text(lit));
    }
    Ok(pieces)
}

fn command_kind(s: &str) -> Option<CommandKind> {
    Some(match s {
        "block-device" => CommandKind::BlockDevice,
        "set-device-read-only" => CommandKind::SetDeviceReadOnly,
        "quarantine-file" => CommandKind::QuarantineFile,
        "kill-process" => CommandKind::KillProcess,
        "request-inventory" => CommandKind::RequestInventory,
        _ => return None,
    })
}

fn weekday(s: &str) -> Option<jiff::civil::Weekday> {
    use jiff::civil::Weekday::*;
    Some(match s {
        "mon" => Monday,
        "tue" => Tuesday,
        "wed" => Wednesday,
        "thu" => Thursday,
        "fri" => Friday,
        "sat" => Saturday,
        "sun" => Sunday,
        _ => return None,
    })
}

/// A rule that names a kind nothing produces never fires: refused, with the closest
/// kind when the name is a typo.
fn check_kinds(v: &mut Validator, field: &str, on: &[String]) {
    let known = || {
        weilan_config::event::KINDS
            .iter()
            .chain(super::findings::ALL)
            .copied()
    };
    for (i, kind) in on.iter().enumerate() {
        if kind == "*" || known().any(|k| k == kind) {
            continue;
        }
        let message = match weilan_config::load::closest(kind, known()) {
            Some(k) => format!("`{kind}` is not an event kind; did you mean `{k}`?"),
            None => format!(
                "`{kind}` is not an event kind (agent events such as `usb.attached`, \
                 `file.exported`, or the collector's `collector.*` findings: docs/rules.md)"
            ),
        };
        v.error(format!("{field}[{i}]"), message);
    }
}

/// `[working_hours]`: an IANA time zone, week days and a start before the end.
fn validate_working_hours(w: WorkingHoursRaw, v: &mut Validator) -> Option<WorkingHours> {
    let tz = jiff::tz::TimeZone::get(&w.timezone)
        .map_err(|_| {
            v.error(
                "working_hours.timezone",
                format!("`{}` is not an IANA time zone", w.timezone),
            )
        })
        .ok();
    let mut days = Vec::new();
    for (i, d) in w.days.iter().enumerate() {
        match weekday(d) {
            Some(d) => days.push(d),
            None => v.error(
                format!("working_hours.days[{i}]"),
                format!("`{d}` is not mon, tue, wed, thu, fri, sat or sun"),
            ),
        }
    }
    let mut time = |field: &str, s: &str| {
        s.parse::<jiff::civil::Time>()
            .map_err(|_| {
                v.error(
                    format!("working_hours.{field}"),
                    format!("`{s}` is not a time of day (HH:MM)"),
                )
            })
            .ok()
    };
    let (start, end) = (time("start", &w.start), time("end", &w.end));
    if let (Some(s), Some(e)) = (start, end) {
        if s >= e {
            v.error("working_hours.end", "must be after start");
        }
    }
    Some(WorkingHours {
        tz: tz?,
        days,
        start: start?,
        end: end?,
    })
}

/// A rule's `[[rule.actions]]`: notifications, and commands with the target and
/// check expressions each kind needs.
fn validate_actions(i: usize, raw: Vec<ActionRaw>, v: &mut Validator) -> Vec<Action> {
    let mut actions = Vec::new();
    for (j, a) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("rule[{i}].actions[{j}].{f}");
        if a.kind == "notify" {
            actions.push(Action::Notify { sinks: a.sinks });
            continue;
        }
        let Some(kind) = command_kind(&a.kind) else {
            v.error(at("type"), format!("`{}` is not notify, block-device, set-device-read-only, quarantine-file, kill-process or request-inventory", a.kind));
            continue;
        };
        let needs_target = kind != CommandKind::RequestInventory;
        let target = match (needs_target, a.target.as_deref()) {
            (true, None) => {
                v.error(
                    at("target"),
                    "this command needs a target (a CEL expression)",
                );
                continue;
            }
            (_, Some(t)) => match compile(t) {
                Ok(e) => Some(e),
                Err(e) => {
                    v.error(at("target"), e);
                    continue;
                }
            },
            (false, None) => None,
        };
        let needs_check = matches!(kind, CommandKind::QuarantineFile | CommandKind::KillProcess);
        let check = match (needs_check, a.check.as_deref()) {
            (true, None) => {
                v.error(at("check"), "quarantine-file needs the file's SHA-256, kill-process the executable (a CEL expression)");
                continue;
            }
            (_, Some(t)) => match compile(t) {
                Ok(e) => Some(e),
                Err(e) => {
                    v.error(at("check"), e);
                    continue;
                }
            },
            (false, None) => None,
        };
        let valid_secs = match a.valid.as_deref().map(parse_secs) {
            None => 600,
            Some(Ok(s)) if s > 0 => s,
            Some(Ok(_)) => {
                v.error(at("valid"), "must be longer than 0 s");
                continue;
            }
            Some(Err(e)) => {
                v.error(at("valid"), e);
                continue;
            }
        };
        actions.push(Action::Command(Box::new(CommandAction {
            kind,
            target,
            check,
            valid_secs,
        })));
    }
    actions
}

/// The presence facts of an `absent` correlation: kinds, optional condition, key.
fn validate_presence(i: usize, p: &PresenceRaw, v: &mut Validator) -> Option<Presence> {
    let at = |f: &str| format!("rule[{i}].{f}");
    if p.on.is_empty() {
        v.error(
            at("correlation.presence.on"),
            "name at least one event kind",
        );
    }
    check_kinds(v, &at("correlation.presence.on"), &p.on);
    let condition = match p.condition.as_deref().map(compile) {
        None => Some(None),
        Some(Ok(e)) => Some(Some(e)),
        Some(Err(e)) => {
            v.error(at("correlation.presence.condition"), e);
            None
        }
    };
    let key = compile(&p.key)
        .map_err(|e| v.error(at("correlation.presence.key"), e))
        .ok();
    match (condition, key) {
        (Some(condition), Some(key)) => Some(Presence {
            on: p.on.clone(),
            condition,
            key,
        }),
        _ => None,
    }
}

/// A rule's `[rule.correlation]`: the aggregate, its window and threshold, and for
/// `absent` the presence facts. `None` when it has errors (reported to `v`).
fn validate_correlation(
    i: usize,
    raw: Option<CorrelationRaw>,
    v: &mut Validator,
) -> Option<Option<Correlation>> {
    let at = |f: &str| format!("rule[{i}].{f}");
    match raw {
        None => Some(None),
        Some(c) => {
            let aggregate = match c.aggregate.as_str() {
                "count" => Some(Aggregate::Count),
                "sum" => Some(Aggregate::Sum),
                "distinct" => Some(Aggregate::Distinct),
                "first-seen" => Some(Aggregate::FirstSeen),
                "absent" => Some(Aggregate::Absent),
                other => {
                    v.error(
                        at("correlation.aggregate"),
                        format!("`{other}` is not count, sum, distinct, first-seen or absent"),
                    );
                    None
                }
            };
            let presence = match (&aggregate, &c.presence) {
                (Some(Aggregate::Absent), None) => {
                    v.error(
                        at("correlation.presence"),
                        "absent needs the presence facts (on, key, optional condition)",
                    );
                    None
                }
                (Some(Aggregate::Absent), Some(p)) => validate_presence(i, p, v),
                (_, Some(_)) => {
                    v.error(
                        at("correlation.presence"),
                        "only for aggregate = \"absent\"",
                    );
                    None
                }
                (_, None) => None,
            };
            let field = match (&aggregate, c.field.as_deref()) {
                (Some(Aggregate::Count), _) | (None, _) => None,
                // absent: the presence key looked up; default the rule's key.
                (Some(Aggregate::Absent), None) => None,
                (Some(_), None) => {
                    v.error(
                        at("correlation.field"),
                        "sum, distinct and first-seen need the field (a CEL expression)",
                    );
                    None
                }
                (Some(_), Some(t)) => compile(t)
                    .map_err(|e| v.error(at("correlation.field"), e))
                    .ok(),
            };
            let window = parse_secs(&c.window)
                .map_err(|e| v.error(at("correlation.window"), e))
                .ok();
            if window == Some(0) {
                v.error(at("correlation.window"), "must be longer than 0 s");
            }
            let threshold = match (aggregate, c.threshold) {
                (Some(Aggregate::FirstSeen), _) | (Some(Aggregate::Absent), _) => Some(1.0),
                (_, Some(t)) if t > 0.0 => Some(t),
                (_, Some(_)) => {
                    v.error(at("correlation.threshold"), "must be above 0");
                    None
                }
                (_, None) => {
                    v.error(
                        at("correlation.threshold"),
                        "count, sum and distinct need a threshold",
                    );
                    None
                }
            };
            match (aggregate, window, threshold) {
                (Some(aggregate), Some(window_secs), Some(threshold))
                    if aggregate == Aggregate::Count
                        || field.is_some()
                        || (aggregate == Aggregate::Absent && presence.is_some()) =>
                {
                    Some(Some(Correlation {
                        fingerprint: format!(
                            "{}|{:?}|{}|{threshold}|{:?}",
                            c.aggregate,
                            c.field,
                            c.window,
                            c.presence.as_ref().map(|p| (&p.on, &p.condition, &p.key))
                        ),
                        aggregate,
                        field,
                        window_secs,
                        threshold,
                        presence,
                    }))
                }
                _ => None,
            }
        }
    }
}

impl Validate for RulesFileRaw {
    type Valid = RulesFile;

    fn validate(self, v: &mut Validator) -> Option<RulesFile> {
        let working_hours = self
            .working_hours
            .and_then(|w| validate_working_hours(w, v));
        for (name, pats) in &self.agent_groups {
            for (i, p) in pats.iter().enumerate() {
                if p.is_empty() {
                    v.error(format!("agent_groups.{name}[{i}]"), "empty pattern");
                }
            }
        }
        let mut rules = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.rule.into_iter().enumerate() {
            let at = |f: &str| format!("rule[{i}].{f}");
            if r.id.is_empty() || r.id.contains(char::is_whitespace) {
                v.error(
                    at("id"),
                    format!("`{}` is not a rule id (no spaces, not empty)", r.id),
                );
            } else if !seen.insert(r.id.clone()) {
                v.error(
                    at("id"),
                    format!("`{}` is defined twice in this file", r.id),
                );
            }
            let level = Level::parse(&r.level);
            if level.is_none() {
                v.error(
                    at("level"),
                    format!("`{}` is not red, yellow or blue", r.level),
                );
            }
            if r.on.is_empty() {
                v.error(at("on"), "name at least one event kind (or \"*\")");
            }
            check_kinds(v, &at("on"), &r.on);
            let mut expr = |field: String, text: Option<&str>| -> Option<Option<Expr>> {
                match text {
                    None => Some(None),
                    Some(t) => match compile(t) {
                        Ok(e) => Some(Some(e)),
                        Err(e) => {
                            v.error(field, e);
                            None
                        }
                    },
                }
            };
            let condition = expr(at("condition"), r.condition.as_deref());
            let key = expr(at("key"), r.key.as_deref());
            let summary = template(&r.summary)
                .map_err(|e| v.error(at("summary"), e))
                .ok();
            let suppress_secs = match r.suppress.as_deref().map(parse_secs) {
                None => Some(600),
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    v.error(at("suppress"), e);
                    None
                }
            };
            let correlation = validate_correlation(i, r.correlation, v);
            let actions = validate_actions(i, r.actions, v);
            if let (
                Some(level),
                Some(condition),
                Some(key),
                Some(summary),
                Some(suppress_secs),
                Some(correlation),
            ) = (level, condition, key, summary, suppress_secs, correlation)
            {
                rules.push(Rule {
                    id: r.id,
                    title: r.title,
                    description: r.description,
                    level,
                    tags: r.tags,
                    on: r.on,
                    condition,
                    summary,
                    key,
                    enabled: r.enabled,
                    suppress_secs,
                    correlation,
                    actions,
                    origin: String::new(),
                });
            }
        }
        Some(RulesFile {
            lists: self.lists,
            user_groups: self.user_groups,
            agent_groups: self.agent_groups,
            working_hours,
            rules,
        })
    }
}

/// Parses and validates one rule file's text; `name` is used in messages.
pub fn parse(text: &str, name: &Path) -> Result<RulesFile, weilan_config::ConfigErrors> {
    let base = name.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut file = weilan_config::load::load_str::<RulesFileRaw>(text, name, base)?;
    for r in &mut file.rules {
        r.origin = name.display().to_string();
    }
    Ok(file)
}
