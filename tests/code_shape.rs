//! The shape the code promises (ARCHITECTURE.md, `agent/src/guard/mod.rs`), checked on
//! the source text so that it cannot drift:
//! - a source never imports a guard or an enforcer, nor decides with the policy
//!   itself: it hands its facts to its guard through a trait;
//! - no function outside tests is longer than 120 lines, but for the ones listed in
//!   `LONG` (each at most as long as it is now; the list only shrinks: a function that
//!   got short must leave it).

use std::path::{Path, PathBuf};

const MAX_LINES: usize = 120;

/// Functions still longer than `MAX_LINES` (file, name, lines now). Split one, then
/// lower its figure or remove its row.
const LONG: &[(&str, &str, usize)] = &[];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Production source files of the three crates (test modules excluded).
fn production_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for krate in ["agent", "collector", "config"] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    files.retain(|p| p.file_name().is_some_and(|n| n != "tests.rs"));
    files.sort();
    files
}

/// The text before the file's `#[cfg(test)]` module, if it has one at the top level.
fn production_part(text: &str) -> &str {
    match text.find("\n#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// (name, first line, length) of every `fn` with a body, found by its signature and
/// the closing brace at the signature's indentation (what rustfmt writes).
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        let words: Vec<&str> = line.split_whitespace().collect();
        let fn_at = words.iter().position(|w| *w == "fn");
        let is_fn = fn_at.is_some_and(|k| {
            words[..k].iter().all(|w| {
                [
                    "pub",
                    "pub(crate)",
                    "pub(super)",
                    "async",
                    "const",
                    "unsafe",
                    "extern",
                ]
                .contains(w)
            })
        });
        if !is_fn {
            i += 1;
            continue;
        }
        let Some(name) = words
            .get(fn_at.unwrap() + 1)
            .and_then(|w| w.split(['(', '<']).next())
        else {
            i += 1;
            continue;
        };
        let name = name.to_string();
        // The signature ends with `{` (a body) or `;` (a declaration).
        let mut j = i;
        while j < lines.len()
            && !lines[j].trim_end().ends_with('{')
            && !lines[j].trim_end().ends_with(';')
        {
            j += 1;
        }
        if j >= lines.len() || lines[j].trim_end().ends_with(';') {
            i = j + 1;
            continue;
        }
        let close = format!("{}}}", " ".repeat(indent));
        let mut k = j + 1;
        while k < lines.len() && lines[k] != close {
            k += 1;
        }
        out.push((name, i + 1, k - i + 1));
        i = k + 1;
    }
    out
}

#[test]
fn no_function_outside_tests_is_longer_than_120_lines_but_the_listed_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    let mut found_long = Vec::new();
    for path in production_files(root) {
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        for (name, line, len) in functions(production_part(&text)) {
            if len <= MAX_LINES {
                continue;
            }
            found_long.push((rel.clone(), name.clone()));
            match LONG.iter().find(|(f, n, _)| *f == rel && *n == name) {
                Some((_, _, ceiling)) if len <= *ceiling => {}
                Some((_, _, ceiling)) => problems.push(format!(
                    "{rel}:{line}: fn {name} grew to {len} lines (listed at {ceiling}); split it"
                )),
                None => problems.push(format!(
                    "{rel}:{line}: fn {name} is {len} lines (at most {MAX_LINES}); split it by role"
                )),
            }
        }
    }
    for (f, n, _) in LONG {
        if !found_long.iter().any(|(rf, rn)| rf == f && rn == n) {
            problems.push(format!(
                "{f}: fn {n} is no longer over {MAX_LINES} lines: remove its row from LONG"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn sources_never_import_a_guard_an_enforcer_or_decide_with_the_policy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    rust_files(&root.join("agent/src/source"), &mut sources);
    sources.retain(|p| p.file_name().is_some_and(|n| n != "tests.rs"));
    assert!(sources.len() > 20, "{sources:?}");
    let mut problems = Vec::new();
    for path in sources {
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in production_part(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let forbidden = code.contains("crate::guard")
                || code.contains("Enforcer")
                || (code.contains("crate::fence") && !code.contains("crate::fence::FenceFact"))
                || (code.contains(".decide(") && !code.contains("judge.decide("))
                || (code.contains(".evaluate(") && code.contains("policy"));
            if forbidden {
                problems.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "a source reaches past its facts:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_scanner_finds_functions_by_their_closing_brace() {
    let text = "pub fn a() {\n    x();\n}\n\nimpl T {\n    pub(crate) async fn b(\n        y: u8,\n    ) -> u8 {\n        y\n    }\n    fn c();\n}\n";
    let found = functions(text);
    assert_eq!(
        found,
        vec![("a".to_string(), 1, 3), ("b".to_string(), 6, 5)]
    );
}

/// Top-level modules of a crate and the other top-level modules each names
/// (`crate::x`), outside comments and test modules.
fn module_graph(
    src: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for path in files {
        if path.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let rel = path.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let deps = graph.entry(top.clone()).or_default();
        for line in production_part(&text).lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle of the graph, if it has one.
fn cycle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        g: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut c = path[i..].to_vec();
            c.push(node.to_string());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in g.get(node).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = Default::default();
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_of_either_program_imports_one_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for krate in ["agent", "collector", "config"] {
        let graph = module_graph(&root.join(krate).join("src"));
        assert!(graph.len() > 5, "{krate}: {graph:?}");
        if let Some(c) = cycle(&graph) {
            panic!("{krate}: circular imports: {}", c.join(" → "));
        }
    }
    // The search finds a cycle when there is one.
    let mut g: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}
