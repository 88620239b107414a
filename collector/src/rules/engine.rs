//! Evaluating facts against a rule set: enrichment, CEL, correlation windows,
//! suppression, and the alerts, notifications and commands that follow.
//!
//! Windows slide on the facts' own times (an agent's backlog sent late still counts
//! in the minutes it happened), clamped to the collector's clock when an agent's
//! clock runs ahead. Correlation and suppression state lives in memory, bounded
//! (groups per rule, entries per group, suppressed keys), with every eviction that
//! changes a result counted and reported as a `collector.rules_overflow` finding;
//! first-seen values are kept in the database (`rule_seen`) so a restart does not
//! make every destination new again.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::db::{params, Sql, Tx};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::Val;
use cel::Value;
use weilan_config::event::Event;
use weilan_config::policy::Policy;
use weilan_config::wire::CommandAction;
use weilan_config::ConfigErrors;

use super::file::{self, Action, Aggregate, CommandKind, Expr, Piece, Rule, WorkingHours};
use super::reads::DataFields;
use super::{findings, BUILTIN};
use crate::store::{self, Alert, StoreError};

/// Groups kept per correlated rule.
const MAX_GROUPS: usize = 100_000;
/// Entries kept per group (sum and distinct; count keeps only what its threshold needs).
const MAX_ENTRIES: usize = 100_000;
/// Suppressed (rule, key) pairs remembered.
const MAX_SUPPRESSED: usize = 20_000;
/// Event ids an alert lists (the first ones; `count` says how many there were).
const MAX_EVENT_IDS: usize = 100;

pub use crate::alert_model::Finding;

/// One input to the rules.
#[derive(Debug, Clone)]
pub struct Fact {
    pub kind: String,
    pub agent_id: String,
    pub host_role: String,
    /// The agent's site (`[agent] site`; a door controller's from its message).
    pub site: Option<String>,
    pub time: jiff::Timestamp,
    pub event_id: Option<String>,
    /// The event's `data` (for findings: their details plus `summary`).
    pub data: serde_json::Value,
    /// The USB device of a `usb.attached`, for the policy's known-device check.
    usb: Option<weilan_config::event::UsbDevice>,
}

impl Fact {
    pub fn from_envelope(env: &weilan_config::event::Envelope) -> Fact {
        let mut data = serde_json::to_value(&env.event)
            .ok()
            .and_then(|mut v| v.get_mut("data").map(serde_json::Value::take))
            .unwrap_or(serde_json::Value::Null);
        if data.is_null() {
            data = serde_json::json!({});
        }
        Fact {
            kind: env.kind().to_string(),
            agent_id: env.event_id.agent_id.clone(),
            host_role: env.host_role.clone(),
            site: env.site.clone(),
            time: env.time,
            event_id: Some(env.event_id.to_string()),
            data,
            usb: match &env.event {
                Event::UsbAttached(d) => Some(d.clone()),
                _ => None,
            },
        }
    }

    pub fn from_finding(f: &Finding, now: jiff::Timestamp) -> Fact {
        let mut data = match &f.details {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        data.insert("summary".into(), f.summary.clone().into());
        data.insert("event_ids".into(), f.event_ids.clone().into());
        Fact {
            kind: f.kind.to_string(),
            agent_id: f.agent_id.clone(),
            host_role: String::new(),
            site: None,
            time: now,
            event_id: None,
            data: serde_json::Value::Object(data),
            usb: None,
        }
    }
}

/// A command a rule asked for; the collector signs it with the agent's next sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRequest {
    pub agent_id: String,
    pub action: CommandAction,
    pub reason: String,
    pub valid_secs: i64,
}

/// What one evaluation produced (alerts are already in the transaction).
#[derive(Debug, Default)]
pub struct Outcome {
    pub alerts: Vec<Alert>,
    /// Alerts for the sinks, with the sink names the rule chose (empty: all).
    pub notify: Vec<(Alert, Vec<String>)>,
    pub commands: Vec<CommandRequest>,
}

/// Counters for logs, tests and benchmarks.
#[derive(Debug, Default, Clone)]
pub struct EngineStats {
    pub facts: u64,
    pub evaluations: u64,
    pub matches: u64,
    pub alerts: u64,
    pub suppressed: u64,
    pub errors: u64,
    /// Correlation or suppression state evicted at a bound.
    pub state_dropped: u64,
    pub reloads: u64,
    pub reload_failures: u64,
}

/// The context variables (`event`, `agent`, `device`, ...) that some expressions
/// read: a fact gets only those its candidate rules need, so that, say, the device
/// lookup in the database or the local-time conversion are not paid by facts whose
/// rules never look at them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Needs(u8);

impl Needs {
    const EVENT: u8 = 1;
    const AGENT: u8 = 1 << 1;
    const USER: u8 = 1 << 2;
    const DEVICE: u8 = 1 << 3;
    const TIME: u8 = 1 << 4;
    const CLOCK: u8 = 1 << 5;
    const PERSON: u8 = 1 << 6;
    const NAMES: [(&'static str, u8); 7] = [
        ("event", Needs::EVENT),
        ("agent", Needs::AGENT),
        ("user", Needs::USER),
        ("device", Needs::DEVICE),
        ("time", Needs::TIME),
        ("clock", Needs::CLOCK),
        ("person", Needs::PERSON),
    ];

    /// What `rule`'s expressions read.
    fn of(rule: &Rule) -> Needs {
        let mut needs = Needs::default();
        for e in rule.expressions() {
            let refs = e.program.references();
            for (name, flag) in Needs::NAMES {
                if refs.has_variable(name) {
                    needs.0 |= flag;
                }
            }
        }
        needs
    }

    fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }
}

impl std::ops::BitOr for Needs {
    type Output = Needs;
    fn bitor(self, other: Needs) -> Needs {
        Needs(self.0 | other.0)
    }
}

/// A loaded, compiled rule set.
pub struct RuleSet {
    rules: Vec<Rule>,
    by_kind: HashMap<String, Vec<usize>>,
    any_kind: Vec<usize>,
    /// Per fact kind, what its candidate rules (and presence rules) read; the rules
    /// for every kind are in `needs_any`.
    needs_by_kind: HashMap<String, Needs>,
    needs_any: Needs,
    /// Per fact kind, the fields of `event.data` its rules (and the rules for every
    /// kind) read; a fact's context converts only those (`reads.rs`).
    data_by_kind: HashMap<String, DataFields>,
    data_any: DataFields,
    /// `absent` rules by the kinds of their presence facts.
    presence_by_kind: HashMap<String, Vec<usize>>,
    user_groups: BTreeMap<String, Vec<String>>,
    agent_groups: Vec<(String, regex::Regex)>,
    working_hours: WorkingHours,
    /// The scope every fact's context is a child of: the standard environment, the
    /// `lists` and the functions Weilan adds, converted once per set rather than once
    /// per fact.
    root: cel::Context<'static, 'static>,
    /// The files it came from.
    pub files: Vec<String>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.rules.len())
            .field("files", &self.files)
            .finish()
    }
}

impl RuleSet {
    /// Every enabled rule.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    pub fn get(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// The rules a fact of `kind` is evaluated against: its kind's and `*`'s.
    /// The fields of `event.data` the rules for `kind` read.
    fn data_fields(&self, kind: &str) -> &DataFields {
        self.data_by_kind.get(kind).unwrap_or(&self.data_any)
    }

    fn candidates(&self, kind: &str) -> Vec<usize> {
        self.by_kind
            .get(kind)
            .into_iter()
            .flatten()
            .chain(self.any_kind.iter())
            .copied()
            .collect()
    }

    /// The `[agent_groups]` an agent id belongs to.
    pub fn agent_groups(&self, agent: &str) -> Vec<&str> {
        self.agent_groups
            .iter()
            .filter(|(_, re)| re.is_match(agent))
            .map(|(g, _)| g.as_str())
            .collect()
    }

    pub fn has_group(&self, group: &str) -> bool {
        self.agent_groups.iter().any(|(g, _)| g == group)
    }

    /// Loads the built-in pack (when `builtin`) and every `*.toml` in `dir`, in name
    /// order. A rule in the directory with a built-in id replaces it (`enabled =
    /// false` switches it off); two directory files defining one id is an error.
    pub fn load(builtin: bool, dir: Option<&Path>) -> Result<RuleSet, Vec<ConfigErrors>> {
        let mut errors = Vec::new();
        let texts = rule_texts(builtin, dir, &mut errors);
        let mut lists = BTreeMap::new();
        let mut user_groups = BTreeMap::new();
        let mut agent_groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut working_hours = WorkingHours::default();
        let mut rules: Vec<Rule> = Vec::new();
        let mut defined_in: HashMap<String, (String, bool)> = HashMap::new();
        let mut files = Vec::new();
        for (path, text, is_builtin) in texts {
            let parsed = match file::parse(&text, &path) {
                Ok(f) => f,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            files.push(path.display().to_string());
            lists.extend(parsed.lists);
            user_groups.extend(parsed.user_groups);
            agent_groups.extend(parsed.agent_groups);
            if let Some(w) = parsed.working_hours {
                working_hours = w;
            }
            for rule in parsed.rules {
                match defined_in.get(&rule.id) {
                    Some((other, false)) if !is_builtin => {
                        errors.push(ConfigErrors {
                            file: path.clone(),
                            issues: vec![weilan_config::load::Issue {
                                field: "rule.id".into(),
                                line: None,
                                column: None,
                                message: format!("`{}` is also defined in {other}", rule.id),
                            }],
                        });
                        continue;
                    }
                    Some(_) => rules.retain(|r| r.id != rule.id),
                    None => {}
                }
                defined_in.insert(rule.id.clone(), (rule.origin.clone(), is_builtin));
                rules.push(rule);
            }
        }
        errors.extend(unknown_names(&rules, &lists, &user_groups, &agent_groups));
        if !errors.is_empty() {
            return Err(errors);
        }
        rules.retain(|r| r.enabled);
        let KindIndex {
            by_kind,
            any_kind,
            presence_by_kind,
            needs_by_kind,
            needs_any,
            data_by_kind,
            data_any,
        } = KindIndex::of(&rules);
        let agent_groups = agent_groups
            .into_iter()
            .flat_map(|(g, pats)| {
                pats.into_iter().filter_map(move |p| {
                    let re = format!("^{}$", regex::escape(&p).replace(r"\*", ".*"));
                    regex::Regex::new(&re).ok().map(|r| (g.clone(), r))
                })
            })
            .collect();
        let lists = Value::from(
            lists
                .into_iter()
                .map(|(k, v): (String, Vec<String>)| {
                    (
                        k,
                        Value::List(Arc::new(v.into_iter().map(Value::from).collect())),
                    )
                })
                .collect::<HashMap<String, Value>>(),
        );
        Ok(RuleSet {
            rules,
            by_kind,
            any_kind,
            needs_by_kind,
            needs_any,
            data_by_kind,
            data_any,
            presence_by_kind,
            user_groups,
            agent_groups,
            working_hours,
            root: {
                let mut root = cel::Context::with_env(Arc::new(cel::Env::stdlib()));
                let _ = root.add_function("in_cidr", in_cidr);
                root.add_variable_from_value("lists", lists);
                root
            },
            files,
        })
    }
}

/// The built-in rule files (if wanted) and every `*.toml` of `dir`: (path, text,
/// built in). What cannot be read is an error; a directory that does not exist yet
/// holds no rules.
fn rule_texts(
    builtin: bool,
    dir: Option<&Path>,
    errors: &mut Vec<ConfigErrors>,
) -> Vec<(PathBuf, String, bool)> {
    let mut texts: Vec<(PathBuf, String, bool)> = Vec::new();
    if builtin {
        for (name, text) in BUILTIN {
            texts.push((PathBuf::from(name), text.to_string(), true));
        }
    }
    if let Some(dir) = dir {
        match rule_files(dir) {
            Ok(files) => {
                for p in files {
                    match std::fs::read_to_string(&p) {
                        Ok(t) => texts.push((p, t, false)),
                        Err(e) => errors.push(read_error(&p, &e)),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(read_error(dir, &e)),
        }
    }
    texts
}

/// Each rule's index under the event kinds it runs on (`*` apart), and under the
/// kinds its presence facts come from.
struct KindIndex {
    by_kind: HashMap<String, Vec<usize>>,
    any_kind: Vec<usize>,
    presence_by_kind: HashMap<String, Vec<usize>>,
    needs_by_kind: HashMap<String, Needs>,
    needs_any: Needs,
    data_by_kind: HashMap<String, DataFields>,
    data_any: DataFields,
}

impl KindIndex {
    fn of(rules: &[Rule]) -> KindIndex {
        let mut by_kind: HashMap<String, Vec<usize>> = HashMap::new();
        let mut any_kind = Vec::new();
        let mut presence_by_kind: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            if let Some(p) = r.correlation.as_ref().and_then(|c| c.presence.as_ref()) {
                for k in &p.on {
                    presence_by_kind.entry(k.clone()).or_default().push(i);
                }
            }
            for k in &r.on {
                if k == "*" {
                    any_kind.push(i);
                } else {
                    by_kind.entry(k.clone()).or_default().push(i);
                }
            }
        }
        let needs: Vec<Needs> = rules.iter().map(Needs::of).collect();
        let needs_any = any_kind
            .iter()
            .fold(Needs::default(), |acc, &i| acc | needs[i]);
        let mut needs_by_kind: HashMap<String, Needs> = HashMap::new();
        for (kind, ids) in by_kind.iter().chain(presence_by_kind.iter()) {
            let n = needs_by_kind.entry(kind.clone()).or_default();
            *n = ids.iter().fold(*n, |acc, &i| acc | needs[i]);
        }
        // What each rule reads of `event.data`; a kind's facts carry what its rules
        // and the rules for every kind read.
        let data: Vec<DataFields> = rules
            .iter()
            .map(|r| {
                let mut fields = DataFields::default();
                r.expressions()
                    .for_each(|e| fields.note(e.program.expression()));
                fields
            })
            .collect();
        let mut data_any = DataFields::default();
        any_kind.iter().for_each(|&i| data_any.union(&data[i]));
        let mut data_by_kind: HashMap<String, DataFields> = HashMap::new();
        for (kind, ids) in by_kind.iter().chain(presence_by_kind.iter()) {
            let fields = data_by_kind
                .entry(kind.clone())
                .or_insert_with(|| data_any.clone());
            ids.iter().for_each(|&i| fields.union(&data[i]));
        }
        KindIndex {
            by_kind,
            any_kind,
            presence_by_kind,
            needs_by_kind,
            needs_any,
            data_by_kind,
            data_any,
        }
    }
}

/// Lists and groups a rule names that no rule file defines: such a rule would never
/// match (`'finanse' in agent.groups` is simply false), so it is refused, with the
/// closest defined name.
fn unknown_names(
    rules: &[Rule],
    lists: &BTreeMap<String, Vec<String>>,
    user_groups: &BTreeMap<String, Vec<String>>,
    agent_groups: &BTreeMap<String, Vec<String>>,
) -> Vec<ConfigErrors> {
    static LIST: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"\blists(?:\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*['"]([^'"]+)['"]\s*\])"#)
            .expect("valid regex")
    });
    static GROUP: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"['"]([^'"]+)['"]\s+in\s+(agent|device|user)\.groups\b"#)
            .expect("valid regex")
    });
    let mut by_file: BTreeMap<String, Vec<weilan_config::load::Issue>> = BTreeMap::new();
    for rule in rules {
        let mut problem = |what: &str, name: &str, known: &BTreeMap<String, Vec<String>>| {
            if known.contains_key(name) {
                return;
            }
            let hint = match weilan_config::load::closest(name, known.keys().map(String::as_str)) {
                Some(k) => format!("; did you mean `{k}`?"),
                None if known.is_empty() => " (none is defined)".to_string(),
                None => format!(
                    " (defined: {})",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            by_file
                .entry(rule.origin.clone())
                .or_default()
                .push(weilan_config::load::Issue {
                    field: format!("rule `{}`", rule.id),
                    line: None,
                    column: None,
                    message: format!("no {what} `{name}` is defined{hint}"),
                });
        };
        for expr in rule.expressions() {
            for c in LIST.captures_iter(&expr.text) {
                if let Some(name) = c.get(1).or_else(|| c.get(2)) {
                    problem("list", name.as_str(), lists);
                }
            }
            for c in GROUP.captures_iter(&expr.text) {
                let (name, whose) = (&c[1], &c[2]);
                match whose {
                    "user" => problem("user group", name, user_groups),
                    _ => problem("agent group", name, agent_groups),
                }
            }
        }
    }
    by_file
        .into_iter()
        .map(|(file, mut issues)| {
            issues.dedup_by(|a, b| a.field == b.field && a.message == b.message);
            ConfigErrors {
                file: PathBuf::from(file),
                issues,
            }
        })
        .collect()
}

fn read_error(p: &Path, e: &std::io::Error) -> ConfigErrors {
    ConfigErrors {
        file: p.to_path_buf(),
        issues: vec![weilan_config::load::Issue {
            field: ".".into(),
            line: None,
            column: None,
            message: format!("cannot read: {e}"),
        }],
    }
}

/// The `*.toml` files of a rule directory, by name.
fn rule_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Each rule file's path, size and change time.
type DirStamp = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

/// What the directory looks like now (names, sizes, change times): a change means reload.
fn dir_stamp(dir: &Path) -> DirStamp {
    rule_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let len = m.as_ref().map_or(0, |m| m.len());
            let modified = m.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}

/// (time, value, the value as text for `distinct` rules, event id).
type WindowEntry = (i64, f64, Option<Box<str>>, Option<Box<str>>);

#[derive(Default)]
struct Window {
    /// (time, value, the value as text for `distinct` rules, event id), oldest first.
    /// A `sum` rule folds the events of one second into one entry (the first event's
    /// id stands for them), so its window holds at most one entry per second however
    /// fast an agent reports: at 5 000 events/s across a fleet one entry per event
    /// kept the collector growing by ~1.5 MiB/s for the 10-minute windows of the
    /// built-in volume rule (`benches/fleet.rs`).
    entries: VecDeque<WindowEntry>,
    sum: f64,
    distinct: HashMap<String, usize>,
}

struct RuleState {
    fingerprint: String,
    groups: HashMap<String, Window>,
}

struct Suppressed {
    alert: Alert,
    until: i64,
    /// The count the alert's row had when this collector last wrote or read it:
    /// flushes add the difference, so that collectors sharing the store (each
    /// counting its own repeats of one alert) add up instead of overwriting.
    stored_count: u64,
}

/// The engine: the rule set in force and the state correlation and suppression need.
pub struct Engine {
    set: Arc<RuleSet>,
    builtin: bool,
    dir: Option<PathBuf>,
    stamp: DirStamp,
    windows: HashMap<String, RuleState>,
    suppressed: HashMap<(String, String), Suppressed>,
    /// Alerts updated by suppressed repeats since the last [`Engine::take_updates`].
    dirty: BTreeSet<(String, String)>,
    /// Suppressed alerts whose count changed since their row was last written (and
    /// whether their event ids did): one UPDATE per alert at the end of an
    /// evaluation, not one per repeat.
    unflushed: BTreeMap<(String, String), bool>,
    /// Unflushed alerts whose suppression ended (expired or evicted) before the flush.
    retired: Vec<(Alert, u64, bool)>,
    /// Evictions not yet reported.
    unreported_drops: u64,
    pub stats: EngineStats,
    last_error_log: HashMap<String, std::time::Instant>,
    /// Badge id hashes → people (`person` in rules).
    pub roster: crate::roster::Roster,
    /// Several collectors share the store (`broker.shared_group`): a repeat this one
    /// has no memory of is looked up among the stored alerts, so that suppression is
    /// fleet-wide, and event ids are merged with the row's rather than replacing them.
    pub shared_store: bool,
    /// With `shared_store`: the windows of `count`, `sum` and `distinct` rules, kept
    /// in the store (shared.rs).
    shared_windows: super::shared::SharedWindows,
}

impl Engine {
    /// Loads the rules; an error here stops the collector at start (nothing older to keep).
    pub fn new(builtin: bool, dir: Option<PathBuf>) -> Result<Engine, Vec<ConfigErrors>> {
        let stamp = dir.as_deref().map(dir_stamp).unwrap_or_default();
        let set = RuleSet::load(builtin, dir.as_deref())?;
        Ok(Engine {
            set: Arc::new(set),
            builtin,
            dir,
            stamp,
            windows: HashMap::new(),
            suppressed: HashMap::new(),
            dirty: BTreeSet::new(),
            unflushed: BTreeMap::new(),
            retired: Vec::new(),
            shared_store: false,
            shared_windows: Default::default(),
            unreported_drops: 0,
            stats: EngineStats::default(),
            roster: crate::roster::Roster::default(),
            last_error_log: HashMap::new(),
        })
    }

    pub fn rule_set(&self) -> Arc<RuleSet> {
        self.set.clone()
    }

    /// Whether the rule directory changed since the set in force was loaded.
    pub fn changed(&self) -> Option<(PathBuf, DirStamp)> {
        let dir = self.dir.as_ref()?;
        let now = dir_stamp(dir);
        (now != self.stamp).then(|| (dir.clone(), now))
    }

    /// Re-reads the rule directory if it changed. A valid set replaces the one in
    /// force (windows of unchanged correlations are kept); an invalid one is refused
    /// and returned as a finding, the previous set staying active.
    pub fn reload_if_changed(&mut self) -> Option<Finding> {
        let (dir, stamp) = self.changed()?;
        self.stamp = stamp;
        match RuleSet::load(self.builtin, Some(&dir)) {
            Ok(set) => {
                self.stats.reloads += 1;
                tracing::info!(rules = set.rules.len(), files = set.files.len(), dir = %dir.display(), "rule set reloaded");
                let keep: HashMap<&str, &str> = set
                    .rules
                    .iter()
                    .filter_map(|r| {
                        r.correlation
                            .as_ref()
                            .map(|c| (r.id.as_str(), c.fingerprint.as_str()))
                    })
                    .collect();
                self.windows
                    .retain(|id, st| keep.get(id.as_str()) == Some(&st.fingerprint.as_str()));
                self.set = Arc::new(set);
                None
            }
            Err(errors) => {
                self.stats.reload_failures += 1;
                let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                tracing::error!(dir = %dir.display(), errors = %text.join(""), "rule files refused; the previous rules stay active");
                Some(Finding {
                    kind: findings::RULES_INVALID,
                    agent_id: "(collector)".into(),
                    summary: format!(
                        "Rule files in {} refused; the previous {} rules stay active: {}",
                        dir.display(),
                        self.set.rules.len(),
                        text.join(" ")
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                    event_ids: vec![],
                    details: serde_json::json!({"errors": text}),
                })
            }
        }
    }

    /// Alerts updated by suppressed repeats since the last call (for the alert log),
    /// and expired suppression entries dropped.
    pub fn take_updates(&mut self) -> Vec<Alert> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out: Vec<Alert> = dirty
            .iter()
            .filter_map(|k| self.suppressed.get(k))
            .map(|s| {
                let mut a = s.alert.clone();
                a.update = true;
                a
            })
            .collect();
        out.sort_by_key(|a| a.alert_id);
        out
    }

    /// A finding for state evicted at a bound since the last call, if any.
    pub fn take_overflow(&mut self) -> Option<Finding> {
        if self.unreported_drops == 0 {
            return None;
        }
        let n = std::mem::take(&mut self.unreported_drops);
        Some(Finding {
            kind: findings::RULES_OVERFLOW,
            agent_id: "(collector)".into(),
            summary: format!("The rules engine evicted {n} correlation or suppression entries at its memory bounds; some correlated counts may be low"),
            event_ids: vec![],
            details: serde_json::json!({"evicted": n, "total": self.stats.state_dropped}),
        })
    }

    /// Evaluates facts, storing new alerts and updates in `tx`.
    pub fn evaluate(
        &mut self,
        tx: &Tx<'_>,
        policy: &Policy,
        facts: &[Fact],
        now: jiff::Timestamp,
    ) -> Result<Outcome, StoreError> {
        let set = self.set.clone();
        let mut out = Outcome::default();
        let now_s = now.as_second();
        self.shared_windows.clear();
        for fact in facts {
            self.stats.facts += 1;
            let candidates = set.candidates(&fact.kind);
            note_decision(tx, fact)?;
            let presence_rules = set
                .presence_by_kind
                .get(fact.kind.as_str())
                .map_or(&[][..], Vec::as_slice);
            if candidates.is_empty() && presence_rules.is_empty() {
                continue;
            }
            let needs = set
                .needs_by_kind
                .get(fact.kind.as_str())
                .map_or(set.needs_any, |n| *n | set.needs_any);
            let vars = enrich(&set, &self.roster, tx, policy, fact, now, needs)?;
            let mut ctx = set.root.new_inner_scope();
            for (name, value) in vars {
                ctx.add_variable_as_val(name, value);
            }
            // An agent clock ahead of ours must not stretch windows into the future.
            let t = fact.time.as_second().min(now_s + 300);
            for &i in presence_rules {
                let rule = &set.rules[i];
                let Some(p) = rule.correlation.as_ref().and_then(|c| c.presence.as_ref()) else {
                    continue;
                };
                if !self.holds(
                    rule,
                    "correlation.presence.condition",
                    p.condition.as_ref(),
                    &ctx,
                ) {
                    continue;
                }
                match p.key.program.execute(&ctx) {
                    Ok(k) => note_presence(tx, &rule.id, &render(&k), t)?,
                    Err(e) => self.eval_error(rule, "correlation.presence.key", &e.to_string()),
                }
            }
            for i in candidates {
                let rule = &set.rules[i];
                self.stats.evaluations += 1;
                if !self.holds(rule, "condition", rule.condition.as_ref(), &ctx) {
                    continue;
                }
                self.stats.matches += 1;
                let key = match &rule.key {
                    None => fact.agent_id.clone(),
                    Some(k) => match k.program.execute(&ctx) {
                        Ok(v) => render(&v),
                        Err(e) => {
                            self.eval_error(rule, "key", &e.to_string());
                            continue;
                        }
                    },
                };
                let mut event_ids: Vec<String> = fact.event_id.iter().cloned().collect();
                if let Some(ids) = fact.data.get("event_ids").and_then(|v| v.as_array()) {
                    event_ids.extend(ids.iter().filter_map(|v| v.as_str().map(str::to_string)));
                }
                let mut aggregate = serde_json::Value::Null;
                if let Some(c) = &rule.correlation {
                    let Some((ids, reached)) = self.correlate(tx, rule, c, &key, t, &ctx, fact)?
                    else {
                        continue;
                    };
                    if !ids.is_empty() {
                        event_ids = ids;
                    }
                    aggregate = reached;
                }
                if self.is_repeat(tx, rule, &key, now, &event_ids)? {
                    continue;
                }
                let summary = render_template(&rule.summary, &ctx);
                let mut alert = Alert {
                    alert_id: 0,
                    time: now,
                    level: rule.level,
                    rule_id: rule.id.clone(),
                    title: rule.title.clone(),
                    tags: rule.tags.clone(),
                    agent_id: fact.agent_id.clone(),
                    key: key.clone(),
                    summary,
                    event_ids: event_ids.into_iter().take(MAX_EVENT_IDS).collect(),
                    count: 1,
                    last_seen: now,
                    update: false,
                    details: serde_json::json!({
                        "kind": fact.kind,
                        "aggregate": aggregate,
                        "event": fact.data,
                    }),
                };
                store::insert_alerts(tx, std::slice::from_mut(&mut alert))?;
                self.stats.alerts += 1;
                if rule.suppress_secs > 0 {
                    self.remember_suppressed(rule, &key, &alert, now_s);
                }
                self.act(rule, &alert, fact, &ctx, &mut out);
                out.alerts.push(alert);
            }
        }
        self.flush_suppressed(tx)?;
        self.shared_windows.flush(tx)?;
        Ok(out)
    }

    /// Writes the counts, last-seen times and event ids that suppressed repeats
    /// changed since the last flush, one row per alert, inside `tx`. (A transaction
    /// that fails leaves them unflushed for the next one.)
    fn flush_suppressed(&mut self, tx: &Tx<'_>) -> Result<(), StoreError> {
        if self.unflushed.is_empty() && self.retired.is_empty() {
            return Ok(());
        }
        let mut writes: Vec<(Alert, u64, bool)> = std::mem::take(&mut self.retired);
        for (k, ids_changed) in std::mem::take(&mut self.unflushed) {
            if let Some(s) = self.suppressed.get_mut(&k) {
                writes.push((s.alert.clone(), s.stored_count, ids_changed));
                s.stored_count = s.alert.count;
            }
        }
        for (alert, stored_count, ids_changed) in writes {
            let added = alert.count.saturating_sub(stored_count) as i64;
            let last_seen = alert.last_seen.to_string();
            tx.execute(
                "UPDATE alerts SET count = count + ?1,
                     last_seen = CASE WHEN last_seen IS NULL OR last_seen < ?2 THEN ?2 ELSE last_seen END
                 WHERE alert_id = ?3",
                params![added, last_seen, alert.alert_id],
            )?;
            if ids_changed {
                let ids = self.merged_event_ids(tx, &alert)?;
                tx.execute(
                    "UPDATE alerts SET event_ids = ?1 WHERE alert_id = ?2",
                    params![ids, alert.alert_id],
                )?;
            }
        }
        Ok(())
    }

    /// The alert's event ids to store: this collector's, and on a shared store also
    /// those the row gained from other collectors (up to the bound).
    fn merged_event_ids(&self, tx: &Tx<'_>, alert: &Alert) -> Result<String, StoreError> {
        let mut ids = alert.event_ids.clone();
        if self.shared_store {
            let stored: Option<String> = tx.query_opt(
                "SELECT event_ids FROM alerts WHERE alert_id = ?1",
                params![alert.alert_id],
                |r| r.get(0),
            )?;
            let stored: Vec<String> = stored
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            for id in stored {
                if ids.len() >= MAX_EVENT_IDS {
                    break;
                }
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        Ok(serde_json::to_string(&ids).unwrap_or_default())
    }

    /// A repeat within the suppression window, of an alert this collector raised or
    /// (on a shared store) another one did: counted on that alert.
    fn is_repeat(
        &mut self,
        tx: &Tx<'_>,
        rule: &Rule,
        key: &str,
        now: jiff::Timestamp,
        event_ids: &[String],
    ) -> Result<bool, StoreError> {
        if self.suppress_repeat(rule, key, now, event_ids) {
            return Ok(true);
        }
        Ok(self.shared_store
            && rule.suppress_secs > 0
            && self.adopt_stored_alert(tx, rule, key, now)?
            && self.suppress_repeat(rule, key, now, event_ids))
    }

    /// On a shared store, a repeat this collector has no memory of: takes the
    /// fleet-wide turn for the rule and key (until the transaction ends, so that two
    /// collectors never both raise it) and adopts the alert another collector raised
    /// within the suppression window, if there is one.
    fn adopt_stored_alert(
        &mut self,
        tx: &Tx<'_>,
        rule: &Rule,
        key: &str,
        now: jiff::Timestamp,
    ) -> Result<bool, StoreError> {
        if tx.engine() == crate::db::Engine::Postgres {
            tx.query_row(
                "SELECT COUNT(pg_advisory_xact_lock(7486423, hashtext(?1 || chr(31) || ?2)))",
                params![rule.id, key],
                |r| r.get::<i64>(0),
            )?;
        }
        let since = now
            .checked_sub(jiff::SignedDuration::from_secs(rule.suppress_secs))
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_string();
        let found = tx.query_opt(
            "SELECT alert_id, time, level, rule_id, agent_id, summary, event_ids, details, title, tags, key, count, last_seen
             FROM alerts WHERE rule_id = ?1 AND key = ?2 AND time > ?3
             ORDER BY alert_id DESC LIMIT 1",
            params![rule.id, key, since],
            store::alert_from_row,
        )?;
        let Some(alert) = found else {
            return Ok(false);
        };
        let until = alert.time.as_second() + rule.suppress_secs;
        if now.as_second() >= until {
            return Ok(false);
        }
        self.remember_suppressed(rule, key, &alert, alert.time.as_second());
        Ok(true)
    }

    /// Ends the suppression of `k`, keeping an unflushed count for the flush.
    fn end_suppression(&mut self, k: &(String, String)) {
        if let Some(s) = self.suppressed.remove(k) {
            if let Some(ids_changed) = self.unflushed.remove(k) {
                self.retired.push((s.alert, s.stored_count, ids_changed));
            }
        }
    }

    /// The rule's correlation over `key` at time `t`: `None` while it does not fire;
    /// when it does, the events it stands for and what was reached.
    #[allow(clippy::too_many_arguments)]
    fn correlate(
        &mut self,
        tx: &Tx<'_>,
        rule: &Rule,
        c: &super::file::Correlation,
        key: &str,
        t: i64,
        ctx: &cel::Context<'_, '_>,
        fact: &Fact,
    ) -> Result<Option<(Vec<String>, serde_json::Value)>, StoreError> {
        let value = match &c.field {
            None => Value::Int(1),
            Some(f) => match f.program.execute(ctx) {
                Ok(v) => v,
                Err(e) => {
                    self.eval_error(rule, "correlation.field", &e.to_string());
                    return Ok(None);
                }
            },
        };
        let fired = match c.aggregate {
            Aggregate::FirstSeen => {
                first_seen(tx, &rule.id, key, &render(&value), t, c.window_secs)?
            }
            Aggregate::Absent => {
                let looked_up = match c.field {
                    Some(_) => render(&value),
                    None => key.to_string(),
                };
                absent(tx, &rule.id, &looked_up, t, c.window_secs)?
            }
            _ if self.shared_store => {
                let (number, text) = number_and_text(&value);
                let (number, text) = super::shared::contribution(c.aggregate, number, text);
                let slide = super::shared::Slide {
                    rule_id: &rule.id,
                    key,
                    agent: &fact.agent_id,
                    t,
                    number,
                    text,
                    event_id: fact.event_id.as_deref(),
                };
                self.shared_windows.slide(tx, c, slide)?
            }
            _ => self.slide(rule, c, key, t, &value, fact.event_id.clone()),
        };
        let Some((reached, ids)) = fired else {
            return Ok(None);
        };
        let aggregate = serde_json::json!({
            "function": format!("{:?}", c.aggregate).to_lowercase(),
            "value": reached,
            "threshold": c.threshold,
            "window_secs": c.window_secs,
            "key": key,
        });
        Ok(Some((ids, aggregate)))
    }

    /// Remembers `alert` so repeats within the rule's suppression window update it
    /// (bounded: the entry closest to expiry goes first, counted as dropped state).
    fn remember_suppressed(&mut self, rule: &Rule, key: &str, alert: &Alert, now_s: i64) {
        if self.suppressed.len() >= MAX_SUPPRESSED {
            let expired: Vec<_> = self
                .suppressed
                .iter()
                .filter(|(_, s)| s.until <= now_s)
                .map(|(k, _)| k.clone())
                .collect();
            expired.iter().for_each(|k| self.end_suppression(k));
            if self.suppressed.len() >= MAX_SUPPRESSED {
                // Forget the entry closest to expiry: at worst one more alert.
                if let Some(k) = self
                    .suppressed
                    .iter()
                    .min_by_key(|(_, s)| s.until)
                    .map(|(k, _)| k.clone())
                {
                    self.end_suppression(&k);
                    self.drop_state(1);
                }
            }
        }
        self.suppressed.insert(
            (rule.id.clone(), key.to_string()),
            Suppressed {
                alert: alert.clone(),
                until: now_s + rule.suppress_secs,
                stored_count: alert.count,
            },
        );
    }

    /// The rule's actions for `alert`: notifications to sinks, signed commands.
    fn act(
        &mut self,
        rule: &Rule,
        alert: &Alert,
        fact: &Fact,
        ctx: &cel::Context<'_, '_>,
        out: &mut Outcome,
    ) {
        for action in &rule.actions {
            match action {
                Action::Notify { sinks } => out.notify.push((alert.clone(), sinks.clone())),
                Action::Command(c) => {
                    match command(c.kind, c.target.as_ref(), c.check.as_ref(), ctx) {
                        Ok(action) => out.commands.push(CommandRequest {
                            agent_id: fact.agent_id.clone(),
                            action,
                            reason: format!(
                                "rule {} (alert {}): {}",
                                rule.id, alert.alert_id, alert.summary
                            ),
                            valid_secs: c.valid_secs,
                        }),
                        Err(e) => self.eval_error(rule, "actions", &e),
                    }
                }
            }
        }
    }

    /// A repeat within the suppression window: updates the first alert (count, last
    /// seen, event ids) instead of raising another.
    fn suppress_repeat(
        &mut self,
        rule: &Rule,
        key: &str,
        now: jiff::Timestamp,
        event_ids: &[String],
    ) -> bool {
        let k = (rule.id.clone(), key.to_string());
        let Some(s) = self.suppressed.get_mut(&k) else {
            return false;
        };
        if now.as_second() >= s.until {
            self.end_suppression(&k);
            return false;
        }
        s.alert.count += 1;
        s.alert.last_seen = now;
        let before = s.alert.event_ids.len();
        for id in event_ids {
            if s.alert.event_ids.len() >= MAX_EVENT_IDS {
                break;
            }
            if !s.alert.event_ids.contains(id) {
                s.alert.event_ids.push(id.clone());
            }
        }
        let ids_changed = s.alert.event_ids.len() > before;
        *self.unflushed.entry(k.clone()).or_default() |= ids_changed;
        self.stats.suppressed += 1;
        self.dirty.insert(k);
        true
    }

    /// Adds one value to a rule's window for `key`; returns the aggregate and the
    /// window's event ids when it reaches the threshold.
    fn slide(
        &mut self,
        rule: &Rule,
        c: &file::Correlation,
        key: &str,
        t: i64,
        value: &Value,
        event_id: Option<String>,
    ) -> Option<(f64, Vec<String>)> {
        let state = self
            .windows
            .entry(rule.id.clone())
            .or_insert_with(|| RuleState {
                fingerprint: c.fingerprint.clone(),
                groups: HashMap::new(),
            });
        let mut dropped = 0;
        if !state.groups.contains_key(key) && state.groups.len() >= MAX_GROUPS {
            let horizon = t - c.window_secs;
            state
                .groups
                .retain(|_, w| w.entries.back().is_some_and(|e| e.0 > horizon));
            if state.groups.len() >= MAX_GROUPS {
                if let Some(oldest) = state
                    .groups
                    .iter()
                    .min_by_key(|(_, w)| w.entries.back().map_or(i64::MIN, |e| e.0))
                    .map(|(k, _)| k.clone())
                {
                    state.groups.remove(&oldest);
                    dropped += 1;
                }
            }
        }
        let w = state.groups.entry(key.to_string()).or_default();
        let (number, text) = number_and_text(value);
        let text = (c.aggregate == Aggregate::Distinct).then(|| text.into_boxed_str());
        match w.entries.back_mut() {
            Some(back) if c.aggregate == Aggregate::Sum && back.0 == t => back.1 += number,
            _ => w
                .entries
                .push_back((t, number, text.clone(), event_id.map(Into::into))),
        }
        w.sum += number;
        if let Some(text) = text {
            *w.distinct.entry(text.into()).or_default() += 1;
        }
        let horizon = t - c.window_secs;
        let cap = match c.aggregate {
            // Beyond the threshold a count only needs to know it is there.
            Aggregate::Count => (c.threshold.ceil() as usize).clamp(1, MAX_ENTRIES),
            _ => MAX_ENTRIES,
        };
        while let Some(front) = w.entries.front() {
            let expired = front.0 <= horizon;
            if !expired && w.entries.len() <= cap {
                break;
            }
            if !expired && c.aggregate != Aggregate::Count {
                dropped += 1;
            }
            let (_, n, v, _) = w.entries.pop_front().expect("front exists");
            w.sum -= n;
            if let Some(v) = v {
                if let Some(m) = w.distinct.get_mut(&*v) {
                    *m -= 1;
                    if *m == 0 {
                        w.distinct.remove(&*v);
                    }
                }
            }
        }
        let reached = match c.aggregate {
            Aggregate::Count => w.entries.len() as f64,
            Aggregate::Sum => w.sum,
            Aggregate::Distinct => w.distinct.len() as f64,
            Aggregate::FirstSeen | Aggregate::Absent => 0.0,
        };
        let ids: Vec<String> = w
            .entries
            .iter()
            .filter_map(|e| e.3.as_deref().map(String::from))
            .take(MAX_EVENT_IDS)
            .collect();
        self.drop_state(dropped);
        (reached >= c.threshold).then_some((reached, ids))
    }

    /// Entries a rule's window holds for `key` (tests check the bounds).
    #[cfg(test)]
    pub(crate) fn window_len(&self, rule: &str, key: &str) -> usize {
        self.windows
            .get(rule)
            .and_then(|st| st.groups.get(key))
            .map_or(0, |w| w.entries.len())
    }

    fn drop_state(&mut self, n: u64) {
        self.stats.state_dropped += n;
        self.unreported_drops += n;
    }

    /// Whether a rule's CEL condition (absent: true) holds; a failure or a non-bool
    /// result is counted and logged as an evaluation error, and does not hold.
    fn holds(
        &mut self,
        rule: &Rule,
        part: &str,
        condition: Option<&Expr>,
        ctx: &cel::Context<'_, '_>,
    ) -> bool {
        match condition.map(|c| c.program.execute(ctx)) {
            None | Some(Ok(Value::Bool(true))) => true,
            Some(Ok(Value::Bool(false))) => false,
            Some(Ok(other)) => {
                self.eval_error(rule, part, &format!("yields {other:?}, not a bool"));
                false
            }
            Some(Err(e)) => {
                self.eval_error(rule, part, &e.to_string());
                false
            }
        }
    }

    fn eval_error(&mut self, rule: &Rule, part: &str, error: &str) {
        self.stats.errors += 1;
        let now = std::time::Instant::now();
        let last = self.last_error_log.get(&rule.id);
        if last.is_none_or(|t| now.duration_since(*t) > std::time::Duration::from_secs(60)) {
            self.last_error_log.insert(rule.id.clone(), now);
            tracing::warn!(rule = %rule.id, origin = %rule.origin, part, error, errors_total = self.stats.errors, "rule evaluation failed; the rule is skipped for this event");
        }
    }

    /// Drops first-seen rows older than their rule's window, and presences older than
    /// `PRESENCE_RETENTION_SECS` (or the longest `absent` window, if longer).
    pub fn prune_seen(&self, tx: &Tx<'_>, now: jiff::Timestamp) -> Result<(), StoreError> {
        let mut keep_presence = PRESENCE_RETENTION_SECS;
        for r in self.set.rules() {
            let Some(c) = r.correlation.as_ref() else {
                continue;
            };
            match c.aggregate {
                Aggregate::FirstSeen => {
                    tx.execute(
                        "DELETE FROM rule_seen WHERE rule_id = ?1 AND last_seen < ?2",
                        params![r.id, now.as_second() - c.window_secs],
                    )?;
                }
                Aggregate::Absent => keep_presence = keep_presence.max(c.window_secs),
                // Shared windows (`slide_shared`): what has left the window.
                Aggregate::Count | Aggregate::Sum | Aggregate::Distinct => {
                    tx.execute(
                        "DELETE FROM window_entries WHERE rule_id = ?1 AND (at <= ?2 OR fingerprint <> ?3)",
                        params![r.id, now.as_second() - c.window_secs, c.fingerprint],
                    )?;
                }
            }
        }
        // And the windows of rules that are gone.
        let kept: Vec<&str> = self.set.rules().map(|r| r.id.as_str()).collect();
        let stored: Vec<String> = tx.query_map(
            "SELECT DISTINCT rule_id FROM window_entries",
            params![],
            |r| r.get(0),
        )?;
        for gone in stored.iter().filter(|id| !kept.contains(&id.as_str())) {
            tx.execute(
                "DELETE FROM window_entries WHERE rule_id = ?1",
                params![gone],
            )?;
        }
        tx.execute(
            "DELETE FROM presence WHERE at < ?1",
            params![now.as_second() - keep_presence],
        )?;
        Ok(())
    }
}

/// A correlation field's value as a number (for `sum`) and as text (for `distinct`).
fn number_and_text(value: &Value) -> (f64, String) {
    match value {
        Value::Int(i) => (*i as f64, i.to_string()),
        Value::UInt(u) => (*u as f64, u.to_string()),
        Value::Float(f) => (*f, f.to_string()),
        other => (0.0, render(other)),
    }
}

/// The time `value` was last seen under (`rule`, `key`).
fn seen_at(tx: &Tx<'_>, rule: &str, key: &str, value: &str) -> Result<Option<i64>, StoreError> {
    Ok(tx.query_opt(
        "SELECT last_seen FROM rule_seen WHERE rule_id = ?1 AND key = ?2 AND value = ?3",
        params![rule, key, value],
        |r| r.get(0),
    )?)
}

/// Records `value` as seen at `t` under (`rule`, `key`) (the latest time wins).
fn note_seen(tx: &Tx<'_>, rule: &str, key: &str, value: &str, t: i64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO rule_seen (rule_id, key, value, last_seen) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(rule_id, key, value) DO UPDATE SET last_seen = excluded.last_seen
         WHERE rule_seen.last_seen < excluded.last_seen",
        params![rule, key, value, t],
    )?;
    Ok(())
}

/// Whether `value` under `key` was not seen within `window` before `t`; records `t`.
fn first_seen(
    tx: &Tx<'_>,
    rule: &str,
    key: &str,
    value: &str,
    t: i64,
    window: i64,
) -> Result<Option<(f64, Vec<String>)>, StoreError> {
    let last = seen_at(tx, rule, key, value)?;
    note_seen(tx, rule, key, value, t)?;
    Ok(match last {
        Some(l) if l > t - window => None,
        _ => Some((1.0, vec![])),
    })
}

/// How long presences are kept for `absent` rules (at least their window): a fact an
/// agent sends this much later is still judged against the presences of its own time.
/// Older facts find none and fire (a false alarm, never a missed one).
pub const PRESENCE_RETENTION_SECS: i64 = 30 * 24 * 3600;

/// Records a presence at `t` under (`rule`, `key`), kept in the database so a
/// collector restart does not forget who badged in.
fn note_presence(tx: &Tx<'_>, rule: &str, key: &str, t: i64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO presence (rule_id, key, at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        params![rule, key, t],
    )?;
    Ok(())
}

/// Whether no presence under `key` came within `window` around `t`: before it (the
/// badge-in that lets someone in), or after it by as much (a door agent's clock
/// ahead, or its backlog sent after the fact it explains).
fn absent(
    tx: &Tx<'_>,
    rule: &str,
    key: &str,
    t: i64,
    window: i64,
) -> Result<Option<(f64, Vec<String>)>, StoreError> {
    let found: Option<i64> = tx.query_opt(
        "SELECT at FROM presence WHERE rule_id = ?1 AND key = ?2 AND at BETWEEN ?3 AND ?4 LIMIT 1",
        params![rule, key, t - window, t + window],
        |r| r.get(0),
    )?;
    Ok(match found {
        Some(_) => None,
        None => Some((0.0, vec![])),
    })
}

/// `user`: the event's user name and the `[user_groups]` it is in.
fn user_var(set: &RuleSet, fact: &Fact) -> Value {
    let user_name = fact
        .data
        .get("user")
        .and_then(|u| u.as_str())
        .unwrap_or_default()
        .to_string();
    let user_groups: Vec<Value> = set
        .user_groups
        .iter()
        .filter(|(_, members)| !user_name.is_empty() && members.contains(&user_name))
        .map(|(g, _)| Value::from(g.as_str()))
        .collect();
    map([
        ("name", Value::from(user_name)),
        ("groups", Value::List(Arc::new(user_groups))),
    ])
}

/// `time`: the event's local time under `[working_hours]`, and whether it is in them.
fn time_var(wh: &WorkingHours, fact: &Fact) -> Value {
    let local = fact.time.to_zoned(wh.tz.clone());
    let clock_time = local.time();
    let working =
        wh.days.contains(&local.weekday()) && clock_time >= wh.start && clock_time < wh.end;
    map([
        ("working_hours", Value::Bool(working)),
        ("hour", Value::Int(local.hour() as i64)),
        ("weekday", Value::from(weekday_name(local.weekday()))),
        (
            "local",
            Value::from(local.strftime("%Y-%m-%d %H:%M").to_string()),
        ),
    ])
}

/// `person`: who the event's badge belongs to, from the roster; `person.known` is
/// null without a roster or without a card in the event.
fn person_var(roster: &crate::roster::Roster, fact: &Fact) -> Value {
    match fact.data.get("id_hash").and_then(|h| h.as_str()) {
        Some(h) if roster.configured() => match roster.person(h) {
            Some(p) => map([
                ("known", Value::Bool(true)),
                ("name", Value::from(p.name.as_str())),
                ("department", Value::from(p.department.as_str())),
            ]),
            None => map([
                ("known", Value::Bool(false)),
                ("name", Value::Null),
                ("department", Value::Null),
            ]),
        },
        _ => map([
            ("known", Value::Null),
            ("name", Value::Null),
            ("department", Value::Null),
        ]),
    }
}

/// The context of one fact: the variables `needs` names (see [`Needs`]).
#[allow(clippy::too_many_arguments)]
fn enrich<'f>(
    set: &RuleSet,
    roster: &crate::roster::Roster,
    tx: &Tx<'_>,
    policy: &Policy,
    fact: &'f Fact,
    now: jiff::Timestamp,
    needs: Needs,
) -> Result<Variables<'f>, StoreError> {
    let mut vars: Variables<'f> = Vec::with_capacity(7);
    if needs.has(Needs::EVENT) {
        vars.push(("event", event_var(fact, set.data_fields(&fact.kind))));
    }
    // The host's groups (regex matches over every pattern): once, for `agent` and
    // the device decision alike.
    let host_groups: Vec<&str> = if needs.has(Needs::AGENT) || needs.has(Needs::DEVICE) {
        set.agent_groups(&fact.agent_id)
    } else {
        Vec::new()
    };
    if needs.has(Needs::AGENT) {
        let groups: Vec<Value> = host_groups.iter().map(|g| Value::from(*g)).collect();
        vars.push((
            "agent",
            val(map([
                ("id", Value::from(fact.agent_id.as_str())),
                ("role", Value::from(fact.host_role.as_str())),
                (
                    "site",
                    fact.site.as_deref().map_or(Value::Null, Value::from),
                ),
                ("groups", Value::List(Arc::new(groups))),
            ])),
        ));
    }
    if needs.has(Needs::USER) {
        vars.push(("user", val(user_var(set, fact))));
    }
    if needs.has(Needs::DEVICE) {
        let host_groups: Vec<String> = host_groups.iter().map(|g| g.to_string()).collect();
        vars.push(("device", val(device(tx, policy, fact, &host_groups)?)));
    }
    if needs.has(Needs::TIME) {
        vars.push(("time", val(time_var(&set.working_hours, fact))));
    }
    if needs.has(Needs::CLOCK) {
        vars.push((
            "clock",
            val(map([
                (
                    "skew_secs",
                    Value::Int(fact.time.as_second() - now.as_second()),
                ),
                ("received", Value::from(now.to_string())),
            ])),
        ));
    }
    if needs.has(Needs::PERSON) {
        vars.push(("person", val(person_var(roster, fact))));
    }
    Ok(vars)
}

/// Remembers the agent's latest fence decision for a device (`device.decision`).
fn note_decision(tx: &Tx<'_>, fact: &Fact) -> Result<(), StoreError> {
    if fact.kind != "usb.decision" {
        return Ok(());
    }
    let field = |k: &str| fact.data.get(k).and_then(|v| v.as_str());
    if let (Some(hash), Some(target)) = (field("hash"), field("target")) {
        // RFC 3339 UTC strings order like the times they name.
        tx.execute("INSERT INTO device_decisions (agent_id, hash, target, agent_time) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(agent_id, hash) DO UPDATE SET target = excluded.target, agent_time = excluded.agent_time
             WHERE excluded.agent_time >= device_decisions.agent_time", params![fact.agent_id, hash, target, fact.time.to_string()])?;
    }
    Ok(())
}

/// `device`: identity hash, whether the policy knows it (USB attach), which of the
/// policy's rules lets it in (`allowed_by`: a rule that allows it or makes it
/// read-only, by the same pure decision the agent makes; null for the default or
/// a block), and the last fence decision the agent reported for it (for events on a
/// device's files).
fn device(
    tx: &Tx<'_>,
    policy: &Policy,
    fact: &Fact,
    host_groups: &[String],
) -> Result<Value, StoreError> {
    let hash = ["hash", "usb_hash", "device_hash"]
        .iter()
        .find_map(|k| fact.data.get(*k).and_then(|v| v.as_str()))
        .unwrap_or_default()
        .to_string();
    let known = fact.usb.as_ref().map(|d| policy.known_device(d).is_some());
    let allowed_by = fact.usb.as_ref().and_then(|d| {
        let ctx = weilan_config::policy::usb::Context {
            host_groups,
            now: fact.time,
        };
        let v = policy.usb.evaluate(d, &ctx);
        let lets_in = matches!(
            v.target,
            weilan_config::policy::usb::Target::Allow
                | weilan_config::policy::usb::Target::ReadOnly
        );
        let by_a_rule = v.rule_id != weilan_config::policy::usb::IMPLICIT_DEFAULT
            && !v.rule_id.starts_with("builtin.");
        (lets_in && by_a_rule).then_some(v.rule_id)
    });
    let decision: Option<String> = if !hash.is_empty() && fact.kind.starts_with("file.") {
        tx.query_opt(
            "SELECT target FROM device_decisions WHERE agent_id = ?1 AND hash = ?2",
            params![fact.agent_id, hash],
            |r| r.get(0),
        )?
    } else {
        None
    };
    Ok(map([
        ("hash", Value::from(hash)),
        ("known", known.map_or(Value::Null, Value::Bool)),
        ("allowed_by", allowed_by.map_or(Value::Null, Value::from)),
        ("decision", Value::from(decision.unwrap_or_default())),
    ]))
}

fn weekday_name(d: jiff::civil::Weekday) -> &'static str {
    use jiff::civil::Weekday::*;
    match d {
        Monday => "mon",
        Tuesday => "tue",
        Wednesday => "wed",
        Thursday => "thu",
        Friday => "fri",
        Saturday => "sat",
        Sunday => "sun",
    }
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::from(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<HashMap<String, Value>>(),
    )
}

/// JSON as CEL values (integers stay integers so `size > 1000` compares as expected).
/// A fact's CEL variables by name, borrowing the fact.
type Variables<'f> = Vec<(&'static str, Box<dyn Val + 'f>)>;

/// A variable built as `Value` (the small ones: agent, user, device, time, clock,
/// person), in the interpreter's own representation.
fn val(value: Value) -> Box<dyn Val> {
    <Box<dyn Val>>::try_from(value).unwrap_or_else(|_| Box::new(CelNull))
}

/// The `event` variable, built straight in the interpreter's representation and
/// borrowing the fact's strings: its `data` holds only the fields the kind's rules
/// read (all of it when a rule uses it as a whole, or when it is not an object).
fn event_var<'f>(fact: &'f Fact, fields: &DataFields) -> Box<dyn Val + 'f> {
    let data: Box<dyn Val + 'f> = match (&fact.data, fields) {
        (serde_json::Value::Object(o), DataFields::Only(_)) => Box::new(CelMap::from(
            o.iter()
                .filter(|(k, _)| fields.reads(k))
                .map(|(k, v)| (CelMapKey::from(k.as_str()), json_to_val(v)))
                .collect::<HashMap<_, _>>(),
        )),
        (data, _) => json_to_val(data),
    };
    let text = |s: &'f str| -> Box<dyn Val + 'f> { Box::new(CelString::from(s)) };
    let entries: [(&'static str, Box<dyn Val + 'f>); 5] = [
        ("kind", text(&fact.kind)),
        ("id", text(fact.event_id.as_deref().unwrap_or_default())),
        ("agent_id", text(&fact.agent_id)),
        ("time", Box::new(CelString::from(fact.time.to_string()))),
        ("data", data),
    ];
    Box::new(CelMap::from(
        entries
            .into_iter()
            .map(|(k, v)| (CelMapKey::from(k), v))
            .collect::<HashMap<_, _>>(),
    ))
}

/// JSON as the interpreter's values, strings borrowed.
fn json_to_val(v: &serde_json::Value) -> Box<dyn Val + '_> {
    match v {
        serde_json::Value::Null => Box::new(CelNull),
        serde_json::Value::Bool(b) => Box::new(CelBool::from(*b)),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Box::new(CelInt::from(i)),
            (None, Some(u)) => Box::new(CelUInt::from(u)),
            (None, None) => Box::new(CelDouble::from(n.as_f64().unwrap_or(0.0))),
        },
        serde_json::Value::String(s) => Box::new(CelString::from(s.as_str())),
        serde_json::Value::Array(a) => {
            Box::new(CelList::from(a.iter().map(json_to_val).collect::<Vec<_>>()))
        }
        serde_json::Value::Object(o) => Box::new(CelMap::from(
            o.iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), json_to_val(v)))
                .collect::<HashMap<_, _>>(),
        )),
    }
}

/// `in_cidr(ip, ["10.0.0.0/8", "192.168.1.5"])`: whether the address lies in any.
fn in_cidr(ip: Arc<String>, nets: Arc<Vec<Value>>) -> bool {
    let Ok(addr) = ip.parse::<std::net::IpAddr>() else {
        return false;
    };
    nets.iter().any(|n| match n {
        Value::String(s) => s
            .parse::<ipnet::IpNet>()
            .map(|net| net.contains(&addr))
            .or_else(|_| s.parse::<std::net::IpAddr>().map(|a| a == addr))
            .unwrap_or(false),
        _ => false,
    })
}

/// A value as text in a summary.
pub fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "(none)".into(),
        Value::List(l) if l.is_empty() => "(none)".into(),
        Value::List(l) => l.iter().map(render).collect::<Vec<_>>().join(", "),
        other => other
            .json()
            .map(|j| j.to_string())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

fn render_template(pieces: &[Piece], ctx: &cel::Context<'_, '_>) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.clone(),
            Piece::Expr(e) => e
                .program
                .execute(ctx)
                .map(|v| render(&v))
                .unwrap_or_else(|_| "(?)".into()),
        })
        .collect()
}

fn command(
    kind: CommandKind,
    target: Option<&Expr>,
    check: Option<&Expr>,
    ctx: &cel::Context<'_, '_>,
) -> Result<CommandAction, String> {
    let eval = |e: Option<&Expr>| -> Result<Value, String> {
        match e {
            Some(e) => e
                .program
                .execute(ctx)
                .map_err(|err| format!("`{}`: {err}", e.text)),
            None => Ok(Value::Null),
        }
    };
    let text = |v: Value, what: &str| match v {
        Value::String(s) if !s.is_empty() => Ok(s.to_string()),
        other => Err(format!("{what} is {other:?}, not a non-empty string")),
    };
    Ok(match kind {
        CommandKind::BlockDevice => CommandAction::BlockDevice {
            device_hash: text(eval(target)?, "the device hash")?,
        },
        CommandKind::SetDeviceReadOnly => CommandAction::SetDeviceReadOnly {
            device_hash: text(eval(target)?, "the device hash")?,
        },
        CommandKind::QuarantineFile => CommandAction::QuarantineFile {
            path: text(eval(target)?, "the file path")?,
            sha256: text(eval(check)?, "the file's SHA-256")?,
        },
        CommandKind::KillProcess => CommandAction::KillProcess {
            pid: match eval(target)? {
                Value::Int(i) if i > 0 && i <= u32::MAX as i64 => i as u32,
                Value::UInt(u) if u > 0 && u <= u32::MAX as u64 => u as u32,
                other => return Err(format!("the process id is {other:?}")),
            },
            exe: text(eval(check)?, "the executable")?,
        },
        CommandKind::RequestInventory => CommandAction::RequestInventory,
    })
}

#[cfg(test)]
mod needs_tests {
    use super::*;

    #[test]
    fn a_fact_gets_only_the_variables_its_rules_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("site.toml"),
            r#"
[[rule]]
id = "site.night-copy"
title = "t"
description = "d"
level = "yellow"
on = ["file.exported"]
condition = "!time.working_hours && event.data.exit == 'removable'"
summary = "{agent.id} {event.data.path}"

[[rule]]
id = "site.device-key"
title = "t"
description = "d"
level = "blue"
on = ["usb.attached"]
condition = "true"
key = "device.hash"
summary = "attached"

[[rule]]
id = "site.everything"
title = "t"
description = "d"
level = "blue"
on = ["*"]
condition = "clock.skew_secs > 3600"
summary = "skew"
"#,
        )
        .unwrap();
        let set = RuleSet::load(false, Some(dir.path()))
            .unwrap_or_else(|e| panic!("{}", e.iter().map(|e| e.to_string()).collect::<String>()));
        let names = |n: Needs| -> Vec<&str> {
            Needs::NAMES
                .iter()
                .filter(|(_, f)| n.has(*f))
                .map(|(name, _)| *name)
                .collect()
        };
        assert_eq!(names(set.needs_any), ["clock"]);
        assert_eq!(
            names(set.needs_by_kind["file.exported"] | set.needs_any),
            ["event", "agent", "time", "clock"]
        );
        assert_eq!(
            names(set.needs_by_kind["usb.attached"] | set.needs_any),
            ["device", "clock"],
            "no device lookup for file.exported, no local time for usb.attached"
        );
        let only = |names: &[&str]| DataFields::Only(names.iter().map(|n| n.to_string()).collect());
        assert_eq!(set.data_fields("file.exported"), &only(&["exit", "path"]));
        assert_eq!(set.data_fields("usb.attached"), &only(&[]));
        assert_eq!(
            set.data_fields("net.transfer"),
            &only(&[]),
            "the rules for every kind read no data"
        );
    }

    /// The shipped pack must keep its facts small: no built-in rule may read a kind's
    /// whole `event.data` (one would make every fact of that kind convert all of it).
    #[test]
    fn no_built_in_rule_reads_the_whole_event_data() {
        let set = RuleSet::load(true, None).unwrap();
        assert_ne!(set.data_any, DataFields::All);
        for (kind, fields) in &set.data_by_kind {
            assert_ne!(fields, &DataFields::All, "{kind}");
        }
    }

    /// A fact's data keeps the fields its rules read, and only those; what is kept
    /// reads as it did when the whole data was converted.
    #[test]
    fn a_fact_carries_only_the_data_fields_read() {
        let fact = Fact {
            kind: "file.exported".into(),
            agent_id: "ws-01".into(),
            host_role: "workstation".into(),
            site: None,
            time: "2026-12-05T10:00:00Z".parse().unwrap(),
            event_id: Some("ws-01:1:2".into()),
            data: serde_json::json!({"path": "/media/s/x", "exit": "removable", "size": 7,
                "classes": ["mark:secret"], "owner": {"uid": 1000}}),
            usb: None,
        };
        let root = cel::Context::default();
        let check = |fields: &DataFields, source: &str| -> Value {
            let mut ctx = root.new_inner_scope();
            ctx.add_variable_as_val("event", event_var(&fact, fields));
            cel::Program::compile(source)
                .unwrap()
                .execute(&ctx)
                .unwrap()
        };
        let some = DataFields::Only(["exit".to_string(), "missing".to_string()].into());
        assert_eq!(check(&some, "event.data.size()"), Value::Int(1));
        assert_eq!(check(&some, "event.data.exit == 'removable' && event.kind == 'file.exported' && event.agent_id == 'ws-01' && event.id == 'ws-01:1:2'"), Value::Bool(true));
        assert_eq!(check(&DataFields::All, "event.data.size()"), Value::Int(5));
        assert_eq!(
            check(&DataFields::All, "event.data.size == 7 && 'mark:secret' in event.data.classes && event.data.owner.uid == 1000 && event.time == '2026-12-05T10:00:00Z'"),
            Value::Bool(true)
        );
    }
}
