//! The badge roster: who carries which card, so a badge alert names a person.
//!
//! A CSV file (`[rules] roster`) with the header `id_hash,name,department`: the card's
//! keyed hash as the door agents and controllers report it (`weilan-collector roster
//! hash --key FILE` computes it from card numbers read on standard input, so numbers
//! never appear in a process list or a shell history), the person, and their
//! department (`weilan_config::badge` is the one hash scheme). The file is checked for changes with the rules; a file with any error
//! is refused whole (every error named with its line) and the previous roster stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One person on the roster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    pub id_hash: String,
    pub name: String,
    pub department: String,
}

/// The loaded roster.
#[derive(Debug, Default)]
pub struct Roster {
    pub path: Option<PathBuf>,
    by_hash: HashMap<String, Person>,
    stamp: Option<(std::time::SystemTime, u64)>,
}

fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// Parses a roster; every problem as `file:line: message`.
pub fn parse(path: &Path, text: &str) -> Result<HashMap<String, Person>, Vec<String>> {
    let mut errors = Vec::new();
    let mut out = HashMap::new();
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(vec![format!("{}:1: {e}", path.display())]),
    };
    if !headers.iter().eq(["id_hash", "name", "department"]) {
        return Err(vec![format!(
            "{}:1: header is `{}`; expected `id_hash,name,department`",
            path.display(),
            headers.iter().collect::<Vec<_>>().join(",")
        )]);
    }
    for record in reader.records() {
        let line = match &record {
            Ok(r) => r.position().map_or(0, |p| p.line()),
            Err(e) => e.position().map_or(0, |p| p.line()),
        };
        match record.and_then(|r| r.deserialize::<Person>(Some(&headers))) {
            Ok(p) => {
                if p.id_hash.len() != 64
                    || !p
                        .id_hash
                        .bytes()
                        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
                {
                    errors.push(format!(
                        "{}:{line}: id_hash: 64 lower-case hex digits (see `weilan-collector roster hash`)",
                        path.display()
                    ));
                } else if p.name.is_empty() {
                    errors.push(format!("{}:{line}: name is empty", path.display()));
                } else if let Some(prev) = out.insert(p.id_hash.clone(), p) {
                    errors.push(format!(
                        "{}:{line}: the card of {} is listed twice",
                        path.display(),
                        prev.name
                    ));
                }
            }
            Err(e) => errors.push(format!("{}:{line}: {e}", path.display())),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

impl Roster {
    /// Loads `path` (or an empty roster for `None`).
    pub fn load(path: Option<&Path>) -> Result<Roster, Vec<String>> {
        let Some(path) = path else {
            return Ok(Roster::default());
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        Ok(Roster {
            by_hash: parse(path, &text)?,
            stamp: stamp(path),
            path: Some(path.to_path_buf()),
        })
    }

    /// Whether a roster file is configured.
    pub fn configured(&self) -> bool {
        self.path.is_some()
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn person(&self, id_hash: &str) -> Option<&Person> {
        self.by_hash.get(id_hash)
    }

    /// Re-reads the file if it changed: `Some(Ok(n))` loaded with n people,
    /// `Some(Err(errors))` refused (the previous roster stays), `None` unchanged.
    pub fn reload_if_changed(&mut self) -> Option<Result<usize, Vec<String>>> {
        let path = self.path.clone()?;
        let now = stamp(&path);
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        let loaded = std::fs::read_to_string(&path)
            .map_err(|e| vec![format!("{}: {e}", path.display())])
            .and_then(|text| parse(&path, &text));
        Some(loaded.map(|by_hash| {
            self.by_hash = by_hash;
            self.by_hash.len()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn a_roster_maps_hashes_to_people_and_reports_every_bad_line() {
        let ok = parse(
            Path::new("roster.csv"),
            &format!("id_hash,name,department\n{A}, Wang Fang ,IT\n"),
        )
        .unwrap();
        assert_eq!(ok[A].name, "Wang Fang");
        let errors = parse(
            Path::new("roster.csv"),
            &format!("id_hash,name,department\n{A},Wang Fang,IT\nabc,Li Lei,Finance\n{A},Zhang Wei,IT\n{A},x\n"),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("roster.csv:3: id_hash"), "{errors:?}");
        assert!(
            errors[1].contains("roster.csv:4: the card of Wang Fang is listed twice"),
            "{errors:?}"
        );
        assert!(errors[2].contains("roster.csv:5"), "{errors:?}");
        let header = parse(Path::new("r.csv"), "hash,name\n").unwrap_err();
        assert!(header[0].contains("r.csv:1: header"), "{header:?}");
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_previous_roster() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.csv");
        std::fs::write(
            &path,
            format!("id_hash,name,department\n{A},Wang Fang,IT\n"),
        )
        .unwrap();
        let mut r = Roster::load(Some(&path)).unwrap();
        assert_eq!(r.reload_if_changed(), None);
        std::fs::write(
            &path,
            "id_hash,name,department\nnot-a-hash,Li Lei,Finance\n",
        )
        .unwrap();
        assert!(matches!(r.reload_if_changed(), Some(Err(e)) if e[0].contains(":2: id_hash")));
        assert_eq!(r.person(A).map(|p| p.name.as_str()), Some("Wang Fang"));
        let b = "b".repeat(64);
        std::fs::write(
            &path,
            format!("id_hash,name,department\n{A},Wang Fang,IT\n{b},Li Lei,Finance\n"),
        )
        .unwrap();
        assert_eq!(r.reload_if_changed(), Some(Ok(2)));
        assert_eq!(r.person(&b).map(|p| p.department.as_str()), Some("Finance"));
    }
}
