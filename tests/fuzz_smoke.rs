//! The fuzz targets (`fuzz/src/lib.rs`, the same code `cargo fuzz` runs) over their
//! committed seed corpora and a fixed number of deterministic mutations of each seed,
//! in the ordinary test build. The coverage-guided runs are local and long
//! (docs/fuzzing.md); this keeps every target compiling and every regression input
//! passing on each CI run, without a second sanitizer build of the whole tree.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::Path;

/// Mutations tried per target, spread over its seeds.
const MUTATIONS: usize = 400;

/// xorshift64*: reproducible, so a failure names an input that fails again.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => d.truncate(rng.below(d.len())),
            2 => {
                let i = rng.below(d.len() + 1);
                d.insert(i, rng.next() as u8);
            }
            3 if !d.is_empty() => {
                let i = rng.below(d.len());
                d.remove(i);
            }
            _ => {
                let interesting = [0u8, 0xff, b'"', b'{', b'}', b'\n', b'=', b'[', 0x7f];
                let i = rng.below(d.len() + 1);
                d.insert(i, interesting[rng.below(interesting.len())]);
            }
        }
    }
    d
}

fn smoke(name: &str, target: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(name);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{name}: no seeds in {}", dir.display());
    let mut rng = Rng(0x5eed_0000 + name.len() as u64);
    let mut runs = 0;
    let per_seed = MUTATIONS.div_ceil(seeds.len());
    for (path, seed) in &seeds {
        target(seed);
        for _ in 0..per_seed {
            let input = mutate(seed, &mut rng);
            let outcome = std::panic::catch_unwind(|| target(&input));
            if outcome.is_err() {
                let keep = std::env::temp_dir().join(format!("weilan-fuzz-{name}-crash"));
                std::fs::write(&keep, &input).unwrap();
                panic!(
                    "{name}: a mutation of {path} panicked; input kept at {}",
                    keep.display()
                );
            }
            runs += 1;
        }
    }
    eprintln!("{name}: {} seeds, {runs} mutations, no panic", seeds.len());
}

macro_rules! smoke_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            smoke(stringify!($name), targets::$name::run);
        }
    )*};
}

smoke_tests!(
    usb_descriptors,
    fs_superblock,
    uevent,
    mountinfo,
    journal_segment,
    signed_batch,
    agent_commands,
    policy_file,
    rules_file,
    access_lines,
    extract,
    badge,
    journal_bundle,
);

#[test]
fn every_fuzz_target_has_a_smoke_test_and_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let this = include_str!("fuzz_smoke.rs");
    for n in &names {
        assert!(
            this.contains(&format!("    {n},\n")),
            "fuzz target {n} has no smoke test"
        );
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/seeds")
                .join(n)
                .is_dir(),
            "fuzz target {n} has no seed corpus"
        );
    }
    assert_eq!(names.len(), 13, "{names:?}");
}

/// docs/fuzzing.md's commands name real targets, folders and scripts, and the
/// campaign script parses (the campaign itself runs by hand: a sanitizer build of
/// the tree does not fit CI's budget).
#[test]
fn the_fuzzing_docs_name_what_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/fuzzing.md")).unwrap();
    let block = doc
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block");
    let mut runs = 0;
    for line in block.lines() {
        let words: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "run") {
            let target = words[i + 1];
            assert!(
                root.join("fuzz/fuzz_targets")
                    .join(format!("{target}.rs"))
                    .exists(),
                "{line}"
            );
            assert!(root.join("fuzz").join(words[i + 3]).is_dir(), "{line}");
            runs += 1;
        }
        if let Some(script) = words.iter().find(|w| w.starts_with("./")) {
            let path = root.join("fuzz").join(script.trim_start_matches("./"));
            let ok = std::process::Command::new("bash")
                .arg("-n")
                .arg(&path)
                .status()
                .unwrap()
                .success();
            assert!(ok, "{} does not parse", path.display());
            runs += 1;
        }
    }
    assert_eq!(runs, 2, "{block}");
}
