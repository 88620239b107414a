//! Read → parse → validate for every Weilan TOML file, reporting *all* problems at
//! once, each with `file:line:column`, the field path and what to do about it.
//!
//! Parsing uses `eserde` (serde that keeps going after the first error) for type and
//! unknown-key errors; `toml_edit` keeps the spans that turn a field path into a line.
//! Validation then checks meaning (paths exist, numbers in range, ids unique) on the
//! parsed raw struct and reports with the same field paths.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted field path, e.g. `collector.port` or `usb.rules[2].id` (`.` for the whole file).
    pub field: String,
    /// 1-based line and column of the field in the file, when it is present there.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub issues: Vec<Issue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} has {} problem{}:",
            self.file.display(),
            self.issues.len(),
            if self.issues.len() == 1 { "" } else { "s" }
        )?;
        for issue in &self.issues {
            match (issue.line, issue.column) {
                (Some(l), Some(c)) => write!(f, "  {}:{l}:{c}: ", self.file.display())?,
                (Some(l), None) => write!(f, "  {}:{l}: ", self.file.display())?,
                _ => write!(f, "  {}: ", self.file.display())?,
            }
            writeln!(f, "{}: {}", issue.field, issue.message)?;
        }
        Ok(())
    }
}

/// Collects validation problems by field path.
#[derive(Debug)]
pub struct Validator {
    /// Directory of the file; relative paths in it are resolved against it.
    pub base_dir: PathBuf,
    issues: Vec<(String, String)>,
}

impl Validator {
    pub fn new(base_dir: PathBuf) -> Self {
        Validator {
            base_dir,
            issues: Vec::new(),
        }
    }

    /// Records a problem with `field`.
    pub fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.issues.push((field.into(), message.into()));
    }

    /// Resolves a configured path against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Resolves a path that must name an existing, readable file.
    pub fn existing_file(&mut self, field: &str, p: &Path) -> PathBuf {
        let full = self.resolve(p);
        match std::fs::metadata(&full) {
            Ok(m) if m.is_file() => {}
            Ok(_) => self.error(field, format!("`{}` is not a regular file", full.display())),
            Err(e) => self.error(field, format!("cannot read `{}`: {e}", full.display())),
        }
        full
    }

    /// Resolves a path whose parent directory must exist (the file itself may be created).
    pub fn creatable_file(&mut self, field: &str, p: &Path) -> PathBuf {
        let full = self.resolve(p);
        match full.parent() {
            Some(parent) if parent.as_os_str().is_empty() || parent.is_dir() => {}
            Some(parent) => self.error(
                field,
                format!(
                    "directory `{}` does not exist (create it, or fix the path)",
                    parent.display()
                ),
            ),
            None => self.error(field, format!("`{}` is not a file path", full.display())),
        }
        full
    }

    /// Resolves a directory path that must exist or be creatable (its parent exists).
    pub fn directory(&mut self, field: &str, p: &Path) -> PathBuf {
        let full = self.resolve(p);
        if full.is_dir() {
            return full;
        }
        if full.exists() {
            self.error(field, format!("`{}` is not a directory", full.display()));
        } else if !full.parent().is_some_and(|d| d.is_dir()) {
            self.error(
                field,
                format!(
                    "neither `{}` nor its parent directory exists",
                    full.display()
                ),
            );
        }
        full
    }

    /// Checks `value` lies in `min..=max`.
    pub fn range<T: PartialOrd + fmt::Display>(&mut self, field: &str, value: T, min: T, max: T) {
        if value < min || value > max {
            self.error(
                field,
                format!("{value} is out of range; expected {min} to {max}"),
            );
        }
    }

    /// Checks `value` is one of `choices`; returns whether it is.
    pub fn one_of(&mut self, field: &str, value: &str, choices: &[&str]) -> bool {
        if choices.contains(&value) {
            return true;
        }
        let quoted: Vec<String> = choices.iter().map(|c| format!("`{c}`")).collect();
        let expected = match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.error(field, format!("`{value}`: expected {expected}"));
        false
    }

    fn into_issues(self) -> Vec<(String, String)> {
        self.issues
    }
}

/// A raw, parsed file that can check itself and become its validated form.
pub trait Validate: Sized {
    type Valid;
    /// Checks everything, recording problems in `v`; returns the validated form, which
    /// the loader discards if any problem was recorded.
    fn validate(self, v: &mut Validator) -> Option<Self::Valid>;
}

/// The known name closest to a mistyped `name` (a typo or two away), for a
/// "did you mean" in the error; `None` when nothing is that close.
pub fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Reads, parses and validates a TOML file.
pub fn load_file<T>(path: &Path) -> Result<T::Valid, ConfigErrors>
where
    T: for<'de> eserde::EDeserialize<'de> + Validate,
{
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: path.to_path_buf(),
        issues: vec![Issue {
            field: ".".into(),
            line: None,
            column: None,
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    load_str::<T>(&text, path, base)
}

/// Parses and validates TOML text; `file` is only used in messages.
pub fn load_str<T>(text: &str, file: &Path, base_dir: PathBuf) -> Result<T::Valid, ConfigErrors>
where
    T: for<'de> eserde::EDeserialize<'de> + Validate,
{
    let spans = Spans::new(text);
    let fail = |issues| ConfigErrors {
        file: file.to_path_buf(),
        issues,
    };
    let raw: T = match eserde::toml::from_str::<T>(text) {
        Ok(raw) => raw,
        Err(errors) => {
            // eserde stops inside a struct at some errors (e.g. an unknown top-level
            // key); drop the offending keys and parse again until nothing new turns up,
            // then validate what remains, so every problem is reported in one run.
            let mut issues: Vec<Issue> = Vec::new();
            let mut errors = errors;
            let mut current = text.to_string();
            for _round in 0..16 {
                let new: Vec<Issue> = errors
                    .iter()
                    .map(|e| {
                        let field = e
                            .path()
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| ".".into());
                        spans.issue(field, e.message().to_string())
                    })
                    .filter(|i| !issues.iter().any(|old| old.field == i.field))
                    .collect();
                if new.is_empty() {
                    break;
                }
                let Some(rest) = without_fields(&current, new.iter().map(|i| i.field.as_str()))
                else {
                    issues.extend(new);
                    break;
                };
                issues.extend(new);
                current = rest;
                match eserde::toml::from_str::<T>(&current) {
                    Ok(raw) => {
                        let mut v = Validator::new(base_dir);
                        let _ = raw.validate(&mut v);
                        for (field, msg) in v.into_issues() {
                            let parent = parent_of(&field);
                            // A key removed for its wrong value makes its siblings look
                            // incomplete; the person already has the real error there.
                            let shadowed = issues.iter().any(|i| {
                                i.field == field
                                    || (!parent.is_empty()
                                        && parent_of(&i.field) == parent
                                        && !i.message.starts_with("unknown field"))
                            });
                            if !shadowed {
                                issues.push(spans.issue(field, msg));
                            }
                        }
                        break;
                    }
                    Err(e) => errors = e,
                }
            }
            return Err(fail(issues));
        }
    };
    let mut v = Validator::new(base_dir);
    let valid = raw.validate(&mut v);
    let issues = v.into_issues();
    match valid {
        Some(valid) if issues.is_empty() => Ok(valid),
        _ => {
            let mut issues: Vec<Issue> = issues
                .into_iter()
                .map(|(field, msg)| spans.issue(field, msg))
                .collect();
            if issues.is_empty() {
                issues.push(spans.issue(".".into(), "invalid configuration".into()));
            }
            Err(fail(issues))
        }
    }
}

/// `a.b[2].c` → `a.b[2]`; top-level keys have the empty parent.
fn parent_of(field: &str) -> &str {
    field.rfind('.').map_or("", |i| &field[..i])
}

/// `text` with the keys at `fields` removed, or `None` if it does not parse.
fn without_fields<'f>(text: &str, fields: impl Iterator<Item = &'f str>) -> Option<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().ok()?;
    for field in fields {
        let segs = split_path(field);
        let Some((last, parents)) = segs.split_last() else {
            continue;
        };
        remove_at(doc.as_item_mut(), parents, last);
    }
    Some(doc.to_string())
}

fn remove_at(item: &mut toml_edit::Item, parents: &[PathSeg], last: &PathSeg) {
    if let Some((first, rest)) = parents.split_first() {
        let next = match first {
            PathSeg::Key(k) => item.get_mut(k.as_str()),
            PathSeg::Index(i) => item.get_mut(*i),
        };
        if let Some(next) = next {
            remove_at(next, rest, last);
        }
        return;
    }
    match last {
        PathSeg::Key(k) => {
            if let Some(t) = item.as_table_like_mut() {
                t.remove(k);
            }
        }
        PathSeg::Index(i) => {
            if let Some(a) = item.as_array_mut() {
                if *i < a.len() {
                    a.remove(*i);
                }
            }
        }
    }
}

/// The toml crate embeds its own multi-line excerpt in some messages; keep the sentence.
fn clean_message(msg: &str) -> String {
    if msg.starts_with("TOML parse error") {
        msg.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(msg)
            .trim()
            .to_string()
    } else {
        msg.trim().to_string()
    }
}

/// Maps field paths to positions using a span-preserving parse of the same text.
struct Spans<'a> {
    text: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

impl<'a> Spans<'a> {
    fn new(text: &'a str) -> Self {
        Spans {
            text,
            doc: toml_edit::ImDocument::parse(text).ok(),
        }
    }

    fn issue(&self, field: String, message: String) -> Issue {
        // eserde occasionally keeps a stale prefix on the path of an error that follows
        // another one (`agent.collector.port`); the longest suffix that names a real
        // key is the field the person wrote.
        let field = self.real_field(field);
        let (line, column) = match self.locate(&field) {
            Some(offset) => {
                let (l, c) = line_col(self.text, offset);
                (Some(l), Some(c))
            }
            // A syntax error has no field; toml reports the position in the message.
            None => match parse_error_position(&message) {
                Some((l, c)) => (Some(l), Some(c)),
                None => (None, None),
            },
        };
        Issue {
            field,
            line,
            column,
            message: clean_message(&message),
        }
    }

    fn real_field(&self, field: String) -> String {
        if field == "." || self.resolves(&field) {
            return field;
        }
        let mut rest = field.as_str();
        while let Some((_, tail)) = rest.split_once('.') {
            if self.resolves(tail) {
                return tail.to_string();
            }
            rest = tail;
        }
        field
    }

    /// True when every segment of `field` exists in the document.
    fn resolves(&self, field: &str) -> bool {
        let Some(doc) = self.doc.as_ref() else {
            return false;
        };
        let mut cur = Cursor::Table(doc.as_table());
        let mut best = None;
        for seg in split_path(field) {
            match step(cur, &seg, &mut best) {
                Some(next) => cur = next,
                None => return false,
            }
        }
        true
    }

    /// Byte offset of the deepest existing key (or array element) along `field`.
    fn locate(&self, field: &str) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut cur = Cursor::Table(doc.as_table());
        let mut best = None;
        for seg in split_path(field) {
            match step(cur, &seg, &mut best) {
                Some(next) => cur = next,
                None => break,
            }
        }
        best
    }
}

#[derive(Clone, Copy)]
enum Cursor<'d> {
    Item(&'d toml_edit::Item),
    Table(&'d toml_edit::Table),
    Value(&'d toml_edit::Value),
}

fn step<'d>(cur: Cursor<'d>, seg: &PathSeg, best: &mut Option<usize>) -> Option<Cursor<'d>> {
    use toml_edit::TableLike;
    match seg {
        PathSeg::Key(k) => {
            let table: &dyn TableLike = match cur {
                Cursor::Item(i) => i.as_table_like()?,
                Cursor::Table(t) => t,
                Cursor::Value(v) => v.as_inline_table()?,
            };
            let (key, item) = table.get_key_value(k)?;
            if let Some(span) = key.span() {
                *best = Some(span.start);
            }
            Some(Cursor::Item(item))
        }
        PathSeg::Index(i) => match cur {
            Cursor::Item(toml_edit::Item::ArrayOfTables(a)) => {
                let t = a.get(*i)?;
                if let Some(span) = t.span() {
                    *best = Some(span.start);
                }
                Some(Cursor::Table(t))
            }
            Cursor::Item(toml_edit::Item::Value(v)) | Cursor::Value(v) => {
                let e = v.as_array()?.get(*i)?;
                if let Some(span) = e.span() {
                    *best = Some(span.start);
                }
                Some(Cursor::Value(e))
            }
            _ => None,
        },
    }
}

#[derive(Debug, PartialEq)]
enum PathSeg {
    Key(String),
    Index(usize),
}

fn split_path(field: &str) -> Vec<PathSeg> {
    let mut out = Vec::new();
    if field == "." || field.is_empty() {
        return out;
    }
    for part in field.split('.') {
        let mut rest = part;
        if let Some(open) = rest.find('[') {
            let key = &rest[..open];
            if !key.is_empty() {
                out.push(PathSeg::Key(key.to_string()));
            }
            rest = &rest[open..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(close) = stripped.find(']') else {
                    break;
                };
                if let Ok(i) = stripped[..close].parse() {
                    out.push(PathSeg::Index(i));
                }
                rest = &stripped[close + 1..];
            }
        } else {
            out.push(PathSeg::Key(rest.to_string()));
        }
    }
    out
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn parse_error_position(message: &str) -> Option<(usize, usize)> {
    let rest = message.split("at line ").nth(1)?;
    let mut it = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let line = it.next()?.parse().ok()?;
    let col = it.next()?.parse().ok()?;
    Some((line, col))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_paths_with_indices() {
        assert_eq!(
            split_path("usb.rules[2].id"),
            vec![
                PathSeg::Key("usb".into()),
                PathSeg::Key("rules".into()),
                PathSeg::Index(2),
                PathSeg::Key("id".into())
            ]
        );
        assert!(split_path(".").is_empty());
    }

    #[test]
    fn a_choice_outside_its_set_names_every_allowed_value() {
        let mut v = Validator::new(".".into());
        assert!(v.one_of("a.b", "own", &["all", "own"]));
        assert!(!v.one_of("a.c", "some", &["all", "own"]));
        assert!(!v.one_of("a.d", "x", &["auto", "journal", "utmp"]));
        assert_eq!(
            v.into_issues(),
            vec![
                ("a.c".into(), "`some`: expected `all` or `own`".into()),
                (
                    "a.d".into(),
                    "`x`: expected `auto`, `journal` or `utmp`".into()
                )
            ]
        );
    }

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("abc", 0), (1, 1));
    }
}

#[cfg(test)]
mod report_all {
    use super::*;
    use crate::settings::agent::AgentFile;

    #[test]
    fn unknown_key_wrong_type_and_bad_path_are_all_reported_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "agent.pem", "agent-key.pem", "policy.toml"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let text = r#"
[agent]
state_dir = "state"
policy = "policy.toml"
colour = "blue"

[collector]
host = "127.0.0.1"
port = "eighty"
ca = "ca.pem"

[tls]
cert = "agent.pem"
key = "/nonexistent/dir/agent-key.pem"
"#;
        let err =
            load_str::<AgentFile>(text, Path::new("agent.toml"), dir.path().into()).unwrap_err();
        let shown = err.to_string();
        let find = |field: &str| {
            err.issues
                .iter()
                .find(|i| i.field == field)
                .unwrap_or_else(|| panic!("no issue for {field} in:\n{shown}"))
                .clone()
        };
        let unknown = find("agent.colour");
        assert_eq!(unknown.line, Some(5), "{shown}");
        assert!(unknown.message.contains("unknown field"), "{shown}");
        let wrong = find("collector.port");
        assert_eq!(wrong.line, Some(9), "{shown}");
        assert!(wrong.message.contains("invalid type"), "{shown}");
        let path = find("tls.key");
        assert_eq!(path.line, Some(14), "{shown}");
        assert!(
            path.message.contains("/nonexistent/dir/agent-key.pem"),
            "{shown}"
        );
        assert!(shown.contains("agent.toml:5:1: agent.colour"), "{shown}");
    }

    #[test]
    fn syntax_errors_carry_their_position() {
        let err =
            load_str::<AgentFile>("[agent\nx=1", Path::new("a.toml"), ".".into()).unwrap_err();
        assert_eq!(err.issues.len(), 1);
        assert_eq!(err.issues[0].line, Some(1), "{err}");
    }
}
