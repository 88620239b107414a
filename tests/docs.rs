//! Docs true to the code: every file or folder of the repository that the
//! architecture, the README, the benchmarks and `docs/` name (in backticks, from a
//! top-level folder such as `agent/src/uplink.rs`) exists. A module that moves or
//! goes away then fails here instead of leaving the map wrong.

use std::path::{Path, PathBuf};

/// Top-level folders whose paths the documents may name.
const ROOTS: [&str; 10] = [
    "fuzz/",
    "agent/",
    "collector/",
    "config/",
    "src/",
    "tests/",
    "benches/",
    "docs/",
    "packaging/",
    ".ci/",
];

fn documents(root: &Path) -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = ["ARCHITECTURE.md", "README.md", "BENCHMARKS.md"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    let mut more: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

/// The repository paths in backticks in `text`, with their line numbers.
fn named_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for (i, span) in line.split('`').enumerate() {
            // Odd pieces are inside backticks.
            if i % 2 == 0 || !ROOTS.iter().any(|r| span.starts_with(r)) {
                continue;
            }
            // A path, not a command line or a pattern (`tests/hil/plug.sh X`, `*.rs`).
            let path = span.split([':', ' ']).next().unwrap_or_default();
            if path.chars().any(|c| "*{}<>$[]".contains(c)) {
                continue;
            }
            found.push((n + 1, path.trim_end_matches(['.', ',']).to_string()));
        }
    }
    found
}

#[test]
fn every_repository_path_the_docs_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in documents(root) {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (line, path) in named_paths(&text) {
            checked += 1;
            if !root.join(&path).exists() {
                missing.push(format!(
                    "{}:{line}: `{path}`",
                    doc.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named in the docs but not in the repository:\n{}",
        missing.join("\n")
    );
    assert!(
        checked > 50,
        "only {checked} paths found: the scan is broken"
    );
    println!("{checked} repository paths named in the docs, all present");
}

#[test]
fn the_scan_finds_paths_and_skips_commands_and_patterns() {
    let text = "see `agent/src/uplink.rs` and `collector/src/lib.rs:42`,\n\
                run `tests/hil/plug.sh IMG SERIAL`; not `*.rs` nor `agent/src/*.rs` nor `uplink.rs`";
    assert_eq!(
        named_paths(text),
        [
            (1, "agent/src/uplink.rs".to_string()),
            (1, "collector/src/lib.rs".to_string()),
            (2, "tests/hil/plug.sh".to_string()),
        ]
    );
}

/// The README's two set-up commands: the test command is the one CI runs (a line of
/// `.ci/run`, verbatim), so the README cannot promise a test run that CI does not do.
#[test]
fn the_readme_test_command_is_the_one_ci_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README has a sh block with the set-up commands");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        commands.len(),
        2,
        "exactly two set-up commands: {commands:?}"
    );
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == commands[1]),
        "`{}` is not a line of .ci/run",
        commands[1]
    );
}
