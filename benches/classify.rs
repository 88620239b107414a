//! Classification benchmark (not a test): precision and recall of the built-in
//! detectors on a labelled corpus, and extraction speed per format.
//!
//! `cargo bench --bench classify` (environment: `DOCS` (3 000), `SEED` (1), `BIG_MB` (10),
//! `ONLY` (one format, e.g. `pdf`), `SHOW` (misses printed, 20)).
//!
//! 1. The corpus (`weilan_agent::classify::corpus`): `DOCS` finance-bureau documents
//!    from `SEED`, half sensitive (every class in every format), half benign
//!    look-alikes, written to files and read back as the agent reads a copied file
//!    (extraction, then the detectors with the shipped policy's card words).
//!    Reported per class: recall on the documents labelled with it, and false
//!    positives — benign documents (and sensitive ones not labelled with it) where it
//!    was found. Then per format: documents, misses, extraction MB/s. The first
//!    misses are printed with what was found instead. Another `SEED` gives documents
//!    nobody has seen.
//! 2. Throughput on one large document per office format (`BIG_MB` of text, in a
//!    docx of paragraphs split into runs and an xlsx of shared strings and numbers):
//!    file MB/s and text MB/s of extraction on one core, median of 5.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::env_or;
use weilan_agent::classify::{corpus, extract, samples, Classifier};

#[derive(Default)]
struct ClassScore {
    labelled: usize,
    found: usize,
    /// Benign documents where it was found.
    benign_hits: usize,
    /// Sensitive documents not labelled with it where it was found.
    other_hits: usize,
}

#[derive(Default)]
struct FormatScore {
    docs: usize,
    misses: usize,
    false_hits: usize,
    bytes: u64,
    extract: Duration,
}

fn main() {
    // 7z archives are decompressed by the agent program's child process, as on a host.
    weilan_agent::classify::sevenz::use_helper_program(env!("CARGO_BIN_EXE_weilan-agent").into());
    let docs = env_or("DOCS", 3000);
    let seed = env_or("SEED", 1) as u64;
    let policy = weilan_config::load::load_str::<weilan_config::policy::PolicyFile>(
        weilan_config::examples::POLICY_TOML,
        std::path::Path::new("policy.toml"),
        std::path::PathBuf::from("."),
    )
    .expect("shipped policy");
    let classifier = Classifier::from_policy(&policy.files, extract::Limits::default());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("host: {cpus} cores; corpus: {docs} documents, seed {seed}");

    let started = Instant::now();
    let corpus = corpus::generate(seed, docs);
    println!("generated in {:.1} s", started.elapsed().as_secs_f64());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut classes: BTreeMap<&str, ClassScore> = corpus::CLASSES
        .iter()
        .map(|c| (*c, ClassScore::default()))
        .collect();
    let mut formats: BTreeMap<&str, FormatScore> = BTreeMap::new();
    let mut misses = Vec::new();
    let benign = corpus.iter().filter(|d| d.expected.is_empty()).count();
    let only = std::env::var("ONLY").ok();
    for doc in &corpus {
        if only.as_deref().is_some_and(|f| f != doc.format) {
            continue;
        }
        let path = dir.path().join(&doc.name);
        std::fs::write(&path, &doc.bytes).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let t = Instant::now();
        let extracted = extract::extract_file(file, classifier.limits);
        let took = t.elapsed();
        let (found, reason): (Vec<String>, Option<String>) = match extracted {
            extract::Extracted::Text { text, .. } => {
                let findings = classifier.scan(&text);
                // What a false hit matched (masked, as findings are).
                let samples: Vec<String> = findings
                    .iter()
                    .filter(|f| !doc.expected.contains(&f.detector.as_str()))
                    .map(|f| format!("{}: {:?}", f.detector, f.samples))
                    .collect();
                (
                    findings.into_iter().map(|f| f.detector).collect(),
                    (!samples.is_empty()).then(|| samples.join("; ")),
                )
            }
            other => (vec!["unreadable".into()], Some(format!("{other:?}"))),
        };
        let f = formats.entry(doc.format).or_default();
        f.docs += 1;
        f.bytes += doc.bytes.len() as u64;
        f.extract += took;
        let mut missed = Vec::new();
        for class in corpus::CLASSES {
            let score = classes.get_mut(class).expect("class");
            let labelled = doc.expected.contains(class);
            let hit = found.iter().any(|d| d == class);
            match (labelled, hit) {
                (true, true) => {
                    score.labelled += 1;
                    score.found += 1;
                }
                (true, false) => {
                    score.labelled += 1;
                    missed.push(*class);
                }
                (false, true) if doc.expected.is_empty() => score.benign_hits += 1,
                (false, true) => score.other_hits += 1,
                (false, false) => {}
            }
        }
        let false_hit = found
            .iter()
            .any(|d| corpus::CLASSES.contains(&d.as_str()) && !doc.expected.contains(&d.as_str()));
        if !missed.is_empty() {
            f.misses += 1;
        }
        if false_hit {
            f.false_hits += 1;
        }
        if !missed.is_empty() || false_hit {
            misses.push(format!(
                "{}: labelled {:?}, found {:?}{}",
                doc.name,
                doc.expected,
                found,
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ));
        }
        let _ = std::fs::remove_file(&path);
    }

    println!(
        "\nclass                      labelled  found  recall    benign hits  FP rate   other hits"
    );
    for (class, s) in &classes {
        println!(
            "{class:<26} {:>8} {:>6} {:>7.2} % {:>12} {:>7.2} % {:>11}",
            s.labelled,
            s.found,
            100.0 * s.found as f64 / s.labelled.max(1) as f64,
            s.benign_hits,
            100.0 * s.benign_hits as f64 / benign.max(1) as f64,
            s.other_hits
        );
    }
    let (labels, found): (usize, usize) = classes
        .values()
        .fold((0, 0), |(l, f), s| (l + s.labelled, f + s.found));
    let flagged = classes.values().map(|s| s.benign_hits).sum::<usize>();
    println!("all classes: {found} of {labels} labels found; {flagged} benign hits");
    println!("(FP rate: benign documents with the class, of {benign} benign documents)");
    println!("\nformat    docs  misses  false hits  MB      extraction MB/s (1 core, files of the corpus)");
    for (format, s) in &formats {
        let mb = s.bytes as f64 / 1e6;
        println!(
            "{format:<8} {:>5} {:>7} {:>11}  {mb:>6.2}  {:>8.1}",
            s.docs,
            s.misses,
            s.false_hits,
            mb / s.extract.as_secs_f64()
        );
    }
    println!("\n{} documents with a miss or a false hit", misses.len());
    for m in misses.iter().take(env_or("SHOW", 20)) {
        println!("  {m}");
    }

    big_documents(env_or("BIG_MB", 10), dir.path());
}

/// One large docx and xlsx: extraction speed on one core.
fn big_documents(mb: usize, dir: &std::path::Path) {
    let line = "截至2026年11月30日，预算科累计拨付资金1,234,567.89元，执行率87.5%，联系人王伟。";
    let lines = mb * 1_000_000 / line.len();
    // Cut into three runs at character boundaries, as Word does mid-sentence.
    let (a, rest) = line.split_at(line.char_indices().nth(10).expect("long line").0);
    let (b, c) = rest.split_at(rest.char_indices().nth(20).expect("long line").0);
    let runs: Vec<[&str; 3]> = (0..lines).map(|_| [a, b, c]).collect();
    let paragraphs: Vec<&[&str]> = runs.iter().map(|r| r.as_slice()).collect();
    let strings: Vec<&str> = (0..lines).map(|_| line).collect();
    let numbers: Vec<u64> = (0..lines as u64).map(|i| 1_000_000 + i).collect();
    println!("\nlarge documents: {mb} MB of text each, extraction on one core, median of 5");
    println!("  peer in the same run: `unzip -p FILE PARTS | sed 's/<[^>]*>//g'`, a tag stripper");
    println!(
        "  (no document model: runs, cells and entities are not handled), over the same parts"
    );
    println!("  (for the 7z: `7zz e -so` to a file first)");
    println!("format              file MB  text MB  seconds  file MB/s  text MB/s  peer s  peer text MB/s");
    // Text of random common characters (deflate cannot shrink it much): a file the
    // size of its text, as the 10 MB documents of the file-storm benchmark.
    let random: Vec<String> = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        (0..mb * 1_000_000 / 1200)
            .map(|_| {
                (0..400)
                    .map(|_| char::from_u32(rng.random_range(0x4E00..0x9FA5)).expect("CJK"))
                    .collect()
            })
            .collect()
    };
    let random_runs: Vec<[&str; 1]> = random.iter().map(|p| [p.as_str()]).collect();
    let random_paragraphs: Vec<&[&str]> = random_runs.iter().map(|r| r.as_slice()).collect();
    let unzip = |parts: &str| format!("unzip -p FILE {parts} | sed 's/<[^>]*>//g'");
    let docx = samples::docx(&paragraphs);
    let docx_in_7z = samples::seven_zip(&[("报告.docx", &docx)], true);
    for (format, bytes, peer) in [
        ("docx", docx, unzip("word/document.xml")),
        (
            "docx (random text)",
            samples::docx(&random_paragraphs),
            unzip("word/document.xml"),
        ),
        (
            "xlsx",
            samples::xlsx(&strings, &numbers),
            unzip("xl/sharedStrings.xml xl/worksheets/sheet1.xml"),
        ),
        // The agent: its child process decompresses, then the docx is read. The peer
        // only decompresses (7-Zip, `7zz`), then strips tags as above.
        (
            "docx in a 7z",
            docx_in_7z,
            "7zz e -so FILE > FILE.docx && unzip -p FILE.docx word/document.xml | sed 's/<[^>]*>//g'"
                .to_string(),
        ),
    ] {
        let path = dir.join(format!("big-{}.bin", bytes.len()));
        std::fs::write(&path, &bytes).expect("write");
        let limits = extract::Limits {
            max_bytes: 1 << 30,
            max_chars: 1 << 30,
            max_time: Duration::from_secs(600),
        };
        let mut times = Vec::new();
        let mut text_len = 0;
        for _ in 0..5 {
            let file = std::fs::File::open(&path).expect("open");
            let t = Instant::now();
            match extract::extract_file(file, limits) {
                extract::Extracted::Text { text, .. } => text_len = text.len(),
                other => panic!("{format}: {other:?}"),
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let s = times[2];
        let peer = peer_seconds(&path, &peer);
        println!(
            "{format:<18} {:>8.1} {:>8.1} {s:>8.3} {:>10.1} {:>10.1} {} {}",
            bytes.len() as f64 / 1e6,
            text_len as f64 / 1e6,
            bytes.len() as f64 / 1e6 / s,
            text_len as f64 / 1e6 / s,
            peer.map_or("       -".into(), |p| format!("{p:>7.3}")),
            peer.map_or("  (no peer)".into(), |p| format!(
                "{:>14.1}",
                text_len as f64 / 1e6 / p
            )),
        );
    }
}

/// The peer's median of 5 seconds (`FILE` in `command` is the file), `None` when it
/// cannot run (no `unzip`, no `7zz`).
fn peer_seconds(path: &std::path::Path, command: &str) -> Option<f64> {
    let script = format!(
        "set -o pipefail; {} > /dev/null",
        command.replace("FILE", &format!("'{}'", path.display()))
    );
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let ok = std::process::Command::new("bash")
            .args(["-c", &script])
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Some(times[2])
}
