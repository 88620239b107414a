//! The files part of the fence policy (`[files]`): which file systems are exit points,
//! which folders are sensitive sources, custom detectors with their thresholds, and an
//! ordered rule list that decides what happens to a file that crossed the fence.
//!
//! Deciding is pure: a file's findings (detector name and count) and the kind of exit
//! point go in, a [`FileVerdict`] naming its rule comes out. The agent enforces it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::load::Validator;

/// What happens to a file that crossed the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileAction {
    /// Record only.
    Audit,
    /// Move the file off the destination into the agent's root-only evidence store.
    Quarantine,
    /// Switch the removable device the file was written to read-only from now on
    /// (the file itself stays).
    ReadOnlyDevice,
    /// Refuse the copy while it happens (fanotify permission events: a process that
    /// holds a classified file from a sensitive source may not open a file on an exit
    /// point for writing, and the reverse); a file that still lands is quarantined.
    Deny,
}

impl FileAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FileAction::Audit => "audit",
            FileAction::Quarantine => "quarantine",
            FileAction::ReadOnlyDevice => "read-only-device",
            FileAction::Deny => "deny",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "audit" => FileAction::Audit,
            "quarantine" => FileAction::Quarantine,
            "read-only-device" => FileAction::ReadOnlyDevice,
            "deny" => FileAction::Deny,
            _ => return None,
        })
    }
}

/// The kind of exit point a file was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitKind {
    /// A mount of a USB block device.
    Removable,
    /// A file system type listed in `exit_fs_types` (network shares, FUSE, MTP).
    Network,
    /// A mount point the agent's settings name explicitly (`files.watch_mounts`).
    Watched,
}

impl ExitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitKind::Removable => "removable",
            ExitKind::Network => "network",
            ExitKind::Watched => "watched",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "removable" => ExitKind::Removable,
            "network" => ExitKind::Network,
            "watched" => ExitKind::Watched,
            _ => return None,
        })
    }
}

/// Rule id used when no rule matched.
pub const FILES_DEFAULT: &str = "files.default";

// ---------------------------------------------------------------- raw (serde) form

/// `[files]` of `policy.toml`.
#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilesPolicyRaw {
    /// Absolute, root-only directory where quarantined files are kept as evidence.
    #[serde(default = "default_evidence")]
    pub evidence_dir: PathBuf,
    /// File-system types that are exit points besides removable media (network shares,
    /// FUSE, MTP), as `/proc/self/mountinfo` names them (e.g. `cifs`, `fuse.sshfs`).
    #[serde(default = "default_exit_fs_types")]
    pub exit_fs_types: Vec<String>,
    /// Folders whose files' reads are recorded (`file.source_read`), so a copy can be
    /// traced to its origin; `deny` rules refuse copies of their classified files.
    #[serde(default)]
    pub sensitive_sources: Vec<PathBuf>,
    /// Minimum count for a detector's findings to classify a file (default 1), by
    /// detector name (`prc-resident-id`, `bank-card`, `mark:secret`, `keywords:NAME` …).
    #[serde(default)]
    pub thresholds: BTreeMap<String, u64>,
    /// Words that, within the 24 characters before an 18-digit number, say it is a card
    /// or account number (`bank-card`), besides the built-in ones (卡号, 账号, card …):
    /// the organisation's own, such as 工资卡 or 社保卡.
    #[serde(default)]
    pub card_context: Vec<String>,
    /// Words that, within the 15 characters before a 15-digit number, say it is a
    /// first-generation identity number (`prc-resident-id`), besides the built-in ones
    /// (身份证, 身份号码, 证件号, 公民身份, ID No): the organisation's own, such as 户籍号.
    #[serde(default)]
    pub id_context: Vec<String>,
    /// Custom keyword lists (`[[files.keywords]]`), reported as `keywords:NAME`.
    #[serde(default)]
    pub keywords: Vec<KeywordsRaw>,
    /// Custom regular expressions (`[[files.patterns]]`), reported as `pattern:NAME`.
    #[serde(default)]
    pub patterns: Vec<PatternRaw>,
    /// Ordered rules (`[[files.rules]]`); the first that matches decides.
    #[serde(default)]
    pub rules: Vec<FileRuleRaw>,
}

impl Default for FilesPolicyRaw {
    fn default() -> Self {
        FilesPolicyRaw {
            evidence_dir: default_evidence(),
            exit_fs_types: default_exit_fs_types(),
            sensitive_sources: Vec::new(),
            thresholds: BTreeMap::new(),
            card_context: Vec::new(),
            id_context: Vec::new(),
            keywords: Vec::new(),
            patterns: Vec::new(),
            rules: Vec::new(),
        }
    }
}

fn default_evidence() -> PathBuf {
    "/var/lib/weilan-agent/evidence".into()
}

/// Network shares, remote and FUSE file systems, and phones (MTP/PTP through gvfs).
pub fn default_exit_fs_types() -> Vec<String> {
    [
        "cifs",
        "smb3",
        "nfs",
        "nfs4",
        "fuse.sshfs",
        "fuse.rclone",
        "davfs",
        "fuse.davfs2",
        "fuse.gvfsd-fuse",
        "fuse.jmtpfs",
        "fuse.simple-mtpfs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordsRaw {
    /// Detector name suffix: findings are reported as `keywords:NAME`.
    pub name: String,
    /// The organisation's terms (matched with Aho-Corasick).
    pub words: Vec<String>,
    /// Match ASCII letters regardless of case.
    #[serde(default)]
    pub case_insensitive: bool,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PatternRaw {
    /// Detector name suffix: findings are reported as `pattern:NAME`.
    pub name: String,
    /// A regular expression (Rust `regex` syntax; linear time, no back-references).
    pub regex: String,
}

#[derive(Debug, Clone, eserde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileRuleRaw {
    /// Stable id, named by every event this rule causes.
    pub id: String,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
    /// Detector names (a trailing `*` matches a prefix, `*` alone any detector); the
    /// rule matches when any of them reached its threshold. Empty: any file, classified
    /// or not.
    #[serde(default)]
    pub detectors: Vec<String>,
    /// Exit kinds the rule applies to: `removable`, `network`, `watched` (default all).
    #[serde(default)]
    pub exit: Vec<String>,
    /// `audit`, `quarantine`, `read-only-device` or `deny`.
    pub action: String,
}

// ---------------------------------------------------------------- validated form

/// A custom keyword detector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keywords {
    pub name: String,
    pub words: Vec<String>,
    pub case_insensitive: bool,
}

/// A custom regex detector (the pattern compiled when validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub name: String,
    pub regex: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRule {
    pub id: String,
    pub description: String,
    pub detectors: Vec<String>,
    pub exit: Vec<ExitKind>,
    pub action: FileAction,
}

/// The validated `[files]` policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesPolicy {
    pub evidence_dir: PathBuf,
    pub exit_fs_types: Vec<String>,
    pub sensitive_sources: Vec<PathBuf>,
    pub thresholds: BTreeMap<String, u64>,
    /// Extra card words (`[files] card_context`), trimmed and non-empty.
    pub card_context: Vec<String>,
    /// Extra identity words (`[files] id_context`), trimmed and non-empty.
    pub id_context: Vec<String>,
    pub keywords: Vec<Keywords>,
    pub patterns: Vec<Pattern>,
    pub rules: Vec<FileRule>,
}

impl Default for FilesPolicy {
    fn default() -> Self {
        let mut v = Validator::new(PathBuf::from("/"));
        FilesPolicyRaw::default().validate(&mut v)
    }
}

/// What the policy says about one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileVerdict {
    pub action: FileAction,
    pub rule_id: String,
    /// Which detectors made the rule match (empty for a rule without detectors).
    pub matched: Vec<String>,
}

fn detector_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl FilesPolicy {
    /// The minimum count for `detector`'s findings to classify a file.
    pub fn threshold(&self, detector: &str) -> u64 {
        self.thresholds.get(detector).copied().unwrap_or(1).max(1)
    }

    /// Detectors (of `findings`: name and count) that reached their threshold.
    pub fn classified<'a>(&self, findings: &[(&'a str, u64)]) -> Vec<&'a str> {
        findings
            .iter()
            .filter(|(d, n)| *n >= self.threshold(d))
            .map(|(d, _)| *d)
            .collect()
    }

    /// Decides a file: the first rule whose exit kinds include `exit` and whose
    /// detectors include one that reached its threshold.
    pub fn decide(&self, findings: &[(&str, u64)], exit: ExitKind) -> FileVerdict {
        let hits = self.classified(findings);
        for r in &self.rules {
            if !r.exit.is_empty() && !r.exit.contains(&exit) {
                continue;
            }
            let matched: Vec<String> = if r.detectors.is_empty() {
                Vec::new()
            } else {
                let m: Vec<String> = hits
                    .iter()
                    .filter(|h| r.detectors.iter().any(|p| detector_matches(p, h)))
                    .map(|h| h.to_string())
                    .collect();
                if m.is_empty() {
                    continue;
                }
                m
            };
            return FileVerdict {
                action: r.action,
                rule_id: r.id.clone(),
                matched,
            };
        }
        FileVerdict {
            action: FileAction::Audit,
            rule_id: FILES_DEFAULT.into(),
            matched: Vec::new(),
        }
    }

    /// Whether any rule can deny (the agent then watches sensitive sources with
    /// permission events).
    pub fn has_deny(&self) -> bool {
        self.rules.iter().any(|r| r.action == FileAction::Deny)
    }

    /// Whether a `deny` rule can apply to an exit point of this kind (the agent then
    /// makes opens on it wait for a decision).
    pub fn deny_applies_to(&self, exit: ExitKind) -> bool {
        self.rules
            .iter()
            .any(|r| r.action == FileAction::Deny && (r.exit.is_empty() || r.exit.contains(&exit)))
    }

    /// The first `deny` rule matching `findings` on `exit`, if any.
    pub fn deny_rule(&self, findings: &[(&str, u64)], exit: ExitKind) -> Option<FileVerdict> {
        let v = self.decide(findings, exit);
        (v.action == FileAction::Deny).then_some(v)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The detectors the agent's classifier has built in (`agent/src/classify`; a test
/// there keeps the two lists equal). With `keywords:NAME` and `pattern:NAME` of the
/// policy's own lists, these are the names rules and thresholds may use.
pub const BUILTIN_DETECTORS: &[&str] = &[
    "prc-resident-id",
    "prc-social-credit-code",
    "bank-card",
    "prc-mobile",
    "mark:top-secret",
    "mark:secret",
    "mark:confidential",
    "mark:internal",
    "mark:trade-secret",
    "mark:sensitive",
    "mark:org-confidential",
    "unreadable",
];

/// Why `name` (a detector, or a prefix ending in `*`) names no detector of `known`,
/// with the closest known name when one is close; `None` when it does name one.
/// `[files] card_context` or `id_context` (looked for in the `window` characters
/// before a number), trimmed; an empty or overlong word is an error at its path.
fn validate_context(key: &str, window: usize, words: &[String], v: &mut Validator) -> Vec<String> {
    for (i, w) in words.iter().enumerate() {
        let len = w.trim().chars().count();
        if len == 0 || len > window {
            v.error(
                format!("files.{key}[{i}]"),
                format!("`{w}` must be a word of 1 to {window} characters (it is looked for in the {window} before a number)"),
            );
        }
    }
    words
        .iter()
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

fn unknown_detector(name: &str, known: &[String]) -> Option<String> {
    if let Some(prefix) = name.strip_suffix('*') {
        if known.iter().any(|k| k.starts_with(prefix)) {
            return None;
        }
        return Some(format!("`{name}` matches no detector"));
    }
    if known.iter().any(|k| k == name) {
        return None;
    }
    Some(match crate::load::closest(name, known.iter().map(String::as_str)) {
        Some(k) => format!("`{name}` is not a detector; did you mean `{k}`?"),
        None => format!(
            "`{name}` is not a detector (built in: {}; or `keywords:NAME`, `pattern:NAME` of this policy)",
            BUILTIN_DETECTORS.join(", ")
        ),
    })
}

/// Defines detector `kind:name` (at field `at`): a valid name, defined once.
fn define(
    v: &mut Validator,
    at: &str,
    names: &mut std::collections::HashSet<String>,
    kind: &str,
    name: &str,
) {
    if !valid_name(name) {
        v.error(
            format!("{at}.name"),
            format!("`{name}`: use 1-64 letters, digits, `-`, `_`, `.`"),
        );
    } else if !names.insert(format!("{kind}:{name}")) {
        v.error(format!("{at}.name"), format!("`{name}` is defined twice"));
    }
}

/// The policy's own detectors, `[[files.keywords]]` and `[[files.patterns]]`: each
/// named once, keyword lists without empty words, regexes that compile within a
/// bound (a pushed policy must not exhaust the agent's memory). Also the names they
/// define (`keywords:NAME`, `pattern:NAME`).
fn validate_detectors(
    keywords_raw: Vec<KeywordsRaw>,
    patterns_raw: Vec<PatternRaw>,
    v: &mut Validator,
) -> (
    Vec<Keywords>,
    Vec<Pattern>,
    std::collections::HashSet<String>,
) {
    let mut names = std::collections::HashSet::new();
    let mut keywords = Vec::new();
    for (i, k) in keywords_raw.into_iter().enumerate() {
        let at = format!("files.keywords[{i}]");
        define(v, &at, &mut names, "keywords", &k.name);
        if k.words.is_empty() || k.words.iter().any(|w| w.trim().is_empty()) {
            v.error(
                format!("{at}.words"),
                "needs at least one word, none of them empty",
            );
        }
        keywords.push(Keywords {
            name: k.name,
            words: k.words,
            case_insensitive: k.case_insensitive,
        });
    }
    let mut patterns = Vec::new();
    for (i, p) in patterns_raw.into_iter().enumerate() {
        let at = format!("files.patterns[{i}]");
        define(v, &at, &mut names, "pattern", &p.name);
        // Bounded compile: a policy pushed by the collector must not exhaust memory.
        if let Err(e) = regex::RegexBuilder::new(&p.regex)
            .size_limit(1 << 20)
            .build()
        {
            v.error(format!("{at}.regex"), e.to_string());
        }
        patterns.push(Pattern {
            name: p.name,
            regex: p.regex,
        });
    }
    (keywords, patterns, names)
}

impl FilesPolicyRaw {
    pub fn validate(self, v: &mut Validator) -> FilesPolicy {
        if !self.evidence_dir.is_absolute() {
            v.error(
                "files.evidence_dir",
                format!(
                    "`{}` must be an absolute path (evidence must not move with the working directory)",
                    self.evidence_dir.display()
                ),
            );
        }
        for (i, t) in self.exit_fs_types.iter().enumerate() {
            if t.is_empty() || t.contains(char::is_whitespace) {
                v.error(
                    format!("files.exit_fs_types[{i}]"),
                    format!("`{t}` is not a file-system type name"),
                );
            }
        }
        for (i, p) in self.sensitive_sources.iter().enumerate() {
            if !p.is_absolute() {
                v.error(
                    format!("files.sensitive_sources[{i}]"),
                    format!("`{}` must be an absolute path", p.display()),
                );
            }
        }
        for (d, n) in &self.thresholds {
            if *n == 0 {
                v.error(
                    format!("files.thresholds.{d}"),
                    "must be at least 1 (a finding must exist to count)",
                );
            }
        }
        let card_context = validate_context("card_context", 24, &self.card_context, v);
        let id_context = validate_context("id_context", 15, &self.id_context, v);
        let (keywords, patterns, names) = validate_detectors(self.keywords, self.patterns, v);
        // Every detector a rule or threshold may name: a typo there would be a rule
        // that never fires.
        let mut known: Vec<String> = BUILTIN_DETECTORS.iter().map(|d| d.to_string()).collect();
        known.extend(names.iter().cloned());
        for d in self.thresholds.keys() {
            if let Some(why) = unknown_detector(d, &known) {
                v.error(format!("files.thresholds.{d}"), why);
            }
        }
        let mut ids = std::collections::HashSet::new();
        let mut rules = Vec::new();
        for (i, r) in self.rules.into_iter().enumerate() {
            let at = format!("files.rules[{i}]");
            if r.id.trim().is_empty() {
                v.error(format!("{at}.id"), "must not be empty");
            } else if !ids.insert(r.id.clone()) {
                v.error(
                    format!("{at}.id"),
                    format!("`{}` is used by an earlier rule", r.id),
                );
            }
            let action = FileAction::parse(&r.action).unwrap_or_else(|| {
                v.error(
                    format!("{at}.action"),
                    format!(
                        "`{}`: expected `audit`, `quarantine`, `read-only-device` or `deny`",
                        r.action
                    ),
                );
                FileAction::Audit
            });
            let mut exit = Vec::new();
            for (j, e) in r.exit.iter().enumerate() {
                match ExitKind::parse(e) {
                    Some(k) => exit.push(k),
                    None => v.error(
                        format!("{at}.exit[{j}]"),
                        format!("`{e}`: expected `removable`, `network` or `watched`"),
                    ),
                }
            }
            if action == FileAction::ReadOnlyDevice
                && exit.iter().any(|k| *k != ExitKind::Removable)
            {
                v.error(
                    format!("{at}.exit"),
                    "`read-only-device` applies to removable media only: set exit = [\"removable\"]",
                );
            }
            for (j, d) in r.detectors.iter().enumerate() {
                if d.is_empty() || d[..d.len() - usize::from(d.ends_with('*'))].contains('*') {
                    v.error(
                        format!("{at}.detectors[{j}]"),
                        format!("`{d}`: a name, or a prefix ending in `*`"),
                    );
                } else if let Some(why) = unknown_detector(d, &known) {
                    v.error(format!("{at}.detectors[{j}]"), why);
                }
            }
            rules.push(FileRule {
                id: r.id,
                description: r.description,
                detectors: r.detectors,
                exit,
                action,
            });
        }
        FilesPolicy {
            evidence_dir: self.evidence_dir,
            exit_fs_types: self.exit_fs_types,
            sensitive_sources: self.sensitive_sources,
            thresholds: self.thresholds,
            card_context,
            id_context,
            keywords,
            patterns,
            rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<crate::policy::Policy, crate::ConfigErrors> {
        crate::policy::parse(&format!("version = \"t\"\n{text}"), "policy.toml")
    }

    const RULES: &str = r#"
[files]
sensitive_sources = ["/srv/finance"]
thresholds = { "bank-card" = 3 }

[[files.keywords]]
name = "projects"
words = ["天河计划"]

[[files.rules]]
id = "secret-to-usb"
detectors = ["mark:*", "keywords:projects"]
exit = ["removable"]
action = "quarantine"

[[files.rules]]
id = "cards-anywhere"
detectors = ["bank-card"]
action = "read-only-device"
exit = ["removable"]

[[files.rules]]
id = "all-to-shares"
exit = ["network"]
action = "audit"
"#;

    #[test]
    fn a_deny_rule_applies_to_its_exit_kinds_only() {
        let usb_only = policy(
            "[files]\n[[files.rules]]\nid = \"no-ids-on-sticks\"\ndetectors = [\"prc-resident-id\"]\nexit = [\"removable\"]\naction = \"deny\"\n",
        )
        .unwrap()
        .files;
        assert!(usb_only.deny_applies_to(ExitKind::Removable));
        assert!(!usb_only.deny_applies_to(ExitKind::Network));
        assert!(!usb_only.deny_applies_to(ExitKind::Watched));
        let everywhere = policy(
            "[files]\n[[files.rules]]\nid = \"no-ids-out\"\ndetectors = [\"prc-resident-id\"]\naction = \"deny\"\n",
        )
        .unwrap()
        .files;
        assert!(everywhere.deny_applies_to(ExitKind::Watched));
        // Quarantine and audit rules never make opens wait.
        let p = policy(RULES).unwrap().files;
        assert!(!p.has_deny());
        assert!(!p.deny_applies_to(ExitKind::Removable));
    }

    #[test]
    fn first_matching_rule_decides_and_names_itself() {
        let p = policy(RULES).unwrap().files;
        let v = p.decide(&[("mark:secret", 1)], ExitKind::Removable);
        assert_eq!(
            (v.action, v.rule_id.as_str(), v.matched),
            (
                FileAction::Quarantine,
                "secret-to-usb",
                vec!["mark:secret".to_string()]
            )
        );
        // Same file on a share: the first rule is removable-only.
        let v = p.decide(&[("mark:secret", 1)], ExitKind::Network);
        assert_eq!(
            (v.action, v.rule_id.as_str()),
            (FileAction::Audit, "all-to-shares")
        );
        // Below its threshold a detector does not classify.
        let v = p.decide(&[("bank-card", 2)], ExitKind::Removable);
        assert_eq!(v.rule_id, FILES_DEFAULT);
        let v = p.decide(&[("bank-card", 3)], ExitKind::Removable);
        assert_eq!(
            (v.action, v.rule_id.as_str()),
            (FileAction::ReadOnlyDevice, "cards-anywhere")
        );
        assert_eq!(
            p.decide(&[("keywords:projects", 1)], ExitKind::Removable)
                .rule_id,
            "secret-to-usb"
        );
        assert!(!p.has_deny());
    }

    /// Typos that used to pass `check-config` as rules that never fire.
    #[test]
    fn unknown_detector_names_are_refused_with_the_closest_name() {
        let err = policy(
            r#"
[files]
thresholds = { "bank-cards" = 2, "keywords:projects" = 2 }

[[files.keywords]]
name = "projects"
words = ["天河计划"]

[[files.rules]]
id = "typos"
detectors = ["prc-resident-ids", "mark:secrets", "pattern:nope", "keywords:project", "pattern:*", "mark:*", "keywords:*"]
action = "deny"
exit = ["removable"]
"#,
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "files.thresholds.bank-cards: `bank-cards` is not a detector; did you mean `bank-card`?",
            "files.rules[0].detectors[0]: `prc-resident-ids` is not a detector; did you mean `prc-resident-id`?",
            "files.rules[0].detectors[1]: `mark:secrets` is not a detector; did you mean `mark:secret`?",
            "files.rules[0].detectors[2]: `pattern:nope` is not a detector (built in:",
            "files.rules[0].detectors[3]: `keywords:project` is not a detector; did you mean `keywords:projects`?",
            "files.rules[0].detectors[4]: `pattern:*` matches no detector",
        ] {
            assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
        }
        for fine in ["keywords:projects` =", "detectors[5]", "detectors[6]"] {
            assert!(!err.contains(fine), "`{fine}` was refused:\n{err}");
        }
    }

    #[test]
    fn card_words_are_trimmed_and_an_empty_or_overlong_one_is_refused() {
        let err = policy("[files]\ncard_context = [\"工资卡\", \"  \", \"一二三四五六七八九十一二三四五六七八九十一二三四五\"]\n")
            .unwrap_err()
            .to_string();
        for (i, word) in [
            (1, "  "),
            (2, "一二三四五六七八九十一二三四五六七八九十一二三四五"),
        ] {
            let expected =
                format!("files.card_context[{i}]: `{word}` must be a word of 1 to 24 characters");
            assert!(err.contains(&expected), "missing `{expected}` in:\n{err}");
        }
        assert!(!err.contains("card_context[0]"), "{err}");
        let err =
            policy("[files]\nid_context = [\"户籍号\", \"一二三四五六七八九十一二三四五六\"]\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("files.id_context[1]: `一二三四五六七八九十一二三四五六` must be a word of 1 to 15 characters"),
            "{err}"
        );
        assert!(!err.contains("id_context[0]"), "{err}");
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let err = policy(
            r#"
[files]
evidence_dir = "relative"
sensitive_sources = ["also/relative"]
thresholds = { "bank-card" = 0 }

[[files.keywords]]
name = "bad name"
words = []

[[files.patterns]]
name = "p"
regex = "(unclosed"

[[files.rules]]
id = "a"
action = "shred"
exit = ["usb"]

[[files.rules]]
id = "a"
action = "read-only-device"
exit = ["network"]
detectors = ["ma*rk"]
"#,
        )
        .unwrap_err()
        .to_string();
        for path in [
            "files.evidence_dir",
            "files.sensitive_sources[0]",
            "files.thresholds.bank-card",
            "files.keywords[0].name",
            "files.keywords[0].words",
            "files.patterns[0].regex",
            "files.rules[0].action",
            "files.rules[0].exit[0]",
            "files.rules[1].id",
            "files.rules[1].exit",
            "files.rules[1].detectors[0]",
        ] {
            assert!(err.contains(path), "missing {path} in:\n{err}");
        }
    }

    #[test]
    fn the_default_audits_everything() {
        let p = FilesPolicy::default();
        assert_eq!(p.exit_fs_types, default_exit_fs_types());
        let v = p.decide(&[("mark:top-secret", 9)], ExitKind::Removable);
        assert_eq!(
            (v.action, v.rule_id.as_str()),
            (FileAction::Audit, FILES_DEFAULT)
        );
    }
}
