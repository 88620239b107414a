//! Content classification: what sensitive data a file carries.
//!
//! The detectors are pure functions over text; extraction (plain text, GB18030,
//! office formats) and the per-detector thresholds from the policy sit on top. A
//! finding carries counts and masked samples only — never the matched content in
//! clear, because findings travel to the collector and into reports.

#[cfg(any(test, feature = "test-util"))]
pub mod corpus;
pub mod detectors;
pub mod extract;
pub mod ole;
#[cfg(any(test, feature = "test-util"))]
pub mod samples;
pub mod sevenz;

use regex::Regex;
use weilan_config::event::Classification;
use weilan_config::policy::files::FilesPolicy;

use detectors::{Finding, KeywordList};

/// `text` with full-width digits, Latin letters, `＋` and `－` (`１１０１０５…`, `Ｘ`, as a
/// Chinese input method in full-width mode types them) and the ideographic space
/// (U+3000) as their ASCII characters, so that an identity number, card or mobile
/// number typed that way is read like one typed in ASCII. Chinese punctuation (`：`,
/// `，`, `（`) stays as it is: the marks' forms (`密级：机密`) are written with it.
/// Borrowed when there is nothing to change.
pub fn half_width(text: &str) -> std::borrow::Cow<'_, str> {
    let full =
        |c: char| matches!(c, '０'..='９' | 'Ａ'..='Ｚ' | 'ａ'..='ｚ' | '＋' | '－' | '\u{3000}');
    if !text.chars().any(full) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| match c {
            '\u{3000}' => ' ',
            c if full(c) => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            c => c,
        })
        .collect()
}

/// The built-in detectors plus the policy's custom keyword lists and patterns.
#[derive(Default)]
pub struct Classifier {
    keywords: Vec<KeywordList>,
    patterns: Vec<(String, Regex)>,
    /// The policy's own card and identity words (`[files] card_context`, `id_context`).
    context: detectors::Context,
    pub limits: extract::Limits,
}

impl Classifier {
    /// Builds the policy's custom detectors (validated with the policy; one that still
    /// fails to build is logged and left out, never a panic).
    pub fn from_policy(p: &FilesPolicy, limits: extract::Limits) -> Self {
        let mut c = Classifier {
            limits,
            context: detectors::Context {
                cards: p.card_context.clone(),
                ids: p.id_context.clone(),
            },
            ..Default::default()
        };
        for k in &p.keywords {
            match KeywordList::new(&k.name, &k.words, k.case_insensitive) {
                Ok(list) => c.keywords.push(list),
                Err(e) => tracing::error!(list = %k.name, error = %e, "keyword list left out"),
            }
        }
        for pat in &p.patterns {
            match regex::RegexBuilder::new(&pat.regex)
                .size_limit(1 << 20)
                .build()
            {
                Ok(re) => c.patterns.push((pat.name.clone(), re)),
                Err(e) => tracing::error!(pattern = %pat.name, error = %e, "pattern left out"),
            }
        }
        c
    }

    /// Every detector over `text` (full-width letters and digits read as their ASCII
    /// forms first: [`half_width`]).
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        let text = &*half_width(text);
        let mut out = detectors::scan_with(text, &self.context);
        out.extend(self.keywords.iter().filter_map(|k| k.find(text)));
        for (name, re) in &self.patterns {
            let mut count = 0;
            let mut samples = Vec::new();
            for m in re.find_iter(text) {
                count += 1;
                if samples.len() < detectors::MAX_SAMPLES {
                    let s = m.as_str();
                    let n = s.chars().count();
                    samples.push(detectors::mask(s, (n / 4).min(3), (n / 4).min(3)));
                }
            }
            if count > 0 {
                out.push(Finding {
                    detector: format!("pattern:{name}"),
                    count,
                    samples,
                });
            }
        }
        out
    }

    /// Extracts and scans an open file: the findings, and a note when the
    /// classification is partial or absent.
    pub fn classify_file(&self, f: std::fs::File) -> (Vec<Classification>, Option<String>) {
        match extract::extract_file(f, self.limits) {
            extract::Extracted::Text {
                text,
                truncated,
                unread,
                ..
            } => {
                let mut found: Vec<Classification> = self
                    .scan(&text)
                    .into_iter()
                    .map(|f| Classification {
                        detector: f.detector,
                        count: f.count,
                        samples: f.samples,
                    })
                    .collect();
                let mut notes: Vec<String> = Vec::new();
                if truncated {
                    notes.push("truncated: only the first part was classified".into());
                }
                // Parts of an archive that could not be read: what they hold is unknown.
                if let Some(unread) = unread {
                    let reason = format!("partly unread: {unread}");
                    found.push(unreadable(&reason));
                    notes.push(reason);
                }
                (found, (!notes.is_empty()).then(|| notes.join("; ")))
            }
            extract::Extracted::Unsupported(kind) => unclassified(format!("unsupported: {kind}")),
            extract::Extracted::Failed(e) => unclassified(format!("failed: {e}")),
        }
    }
}

/// A file whose content could not be classified at all: only the `unreadable` class,
/// and the reason as the note.
fn unclassified(reason: String) -> (Vec<Classification>, Option<String>) {
    (vec![unreadable(&reason)], Some(reason))
}

/// The class `unreadable`, its reason as the sample, so a rule can act on it (deny
/// what cannot be checked, or audit it) instead of it passing as "nothing found".
fn unreadable(reason: &str) -> Classification {
    Classification {
        detector: UNREADABLE.to_string(),
        count: 1,
        samples: vec![reason.chars().take(200).collect()],
    }
}

/// The class of a file that could not be read for classification.
pub const UNREADABLE: &str = "unreadable";

/// Detector names and counts, as the policy's deciding functions take them.
pub fn counts(c: &[Classification]) -> Vec<(&str, u64)> {
    c.iter()
        .map(|c| (c.detector.as_str(), c.count as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_typed_in_full_width_are_read_like_ascii_ones() {
        let c = Classifier::default();
        let text = "姓名　张三　身份证号：１１０１０５１９４９１２３１００２Ｘ　手机：１３８１２３４５６７８\n\
                    卡号：６２２２　０２１２　３４５６　７８９０　１２８";
        let mut found: Vec<(String, usize)> = c
            .scan(text)
            .into_iter()
            .map(|f| (f.detector, f.count))
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                ("bank-card".to_string(), 1),
                ("prc-mobile".to_string(), 1),
                ("prc-resident-id".to_string(), 1)
            ]
        );
        // Text without them is not copied; Chinese punctuation is left as it is.
        assert!(matches!(
            half_width("密级：机密★启用前，（正文）"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(half_width("ＡＢ－１２　：＋８６"), "AB-12 ：+86");
        // A mark with a full-width period count is still a mark.
        let marks: Vec<String> = c
            .scan("机密★１年\n通知")
            .into_iter()
            .map(|f| f.detector)
            .collect();
        assert_eq!(marks, ["mark:secret"]);
    }

    #[test]
    fn the_policys_own_identity_words_make_a_15_digit_number_an_id() {
        let text = "户籍号 110105491231002\n";
        let ids = |c: &Classifier| {
            c.scan(text)
                .into_iter()
                .filter(|f| f.detector == "prc-resident-id")
                .count()
        };
        assert_eq!(ids(&Classifier::default()), 0, "户籍号 is no built-in word");
        let policy = weilan_config::policy::parse(
            "version = \"t\"\n[files]\nid_context = [\"户籍号\"]\n",
            "policy.toml",
        )
        .unwrap();
        let c = Classifier::from_policy(&policy.files, extract::Limits::default());
        assert_eq!(ids(&c), 1);
    }

    #[test]
    fn the_policys_own_card_words_make_an_18_digit_number_a_card() {
        // An 18-digit UnionPay number (Luhn-valid): the length of identity numbers,
        // so a card only next to a card word.
        let card = (0..10u8)
            .map(|d| format!("62220212345678901{d}"))
            .find(|s| detectors::luhn(s))
            .unwrap();
        let text = format!("工资卡 {card}\n");
        let cards = |c: &Classifier| {
            c.scan(&text)
                .into_iter()
                .filter(|f| f.detector == "bank-card")
                .count()
        };
        assert_eq!(
            cards(&Classifier::default()),
            0,
            "工资卡 is no built-in card word"
        );
        let policy = weilan_config::policy::parse(
            "version = \"t\"\n[files]\ncard_context = [\" 工资卡 \", \"社保卡\"]\n",
            "policy.toml",
        )
        .unwrap();
        assert_eq!(policy.files.card_context, ["工资卡", "社保卡"]);
        let c = Classifier::from_policy(&policy.files, extract::Limits::default());
        assert_eq!(cards(&c), 1);
    }

    #[test]
    fn a_file_that_cannot_be_read_is_unreadable_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pdf");
        std::fs::write(&path, b"%PDF-1.7\nbroken").unwrap();
        let classifier = Classifier::default();
        let (found, note) = classifier.classify_file(std::fs::File::open(&path).unwrap());
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].detector.as_str(), found[0].count),
            (UNREADABLE, 1)
        );
        assert!(
            found[0].samples[0].starts_with("failed: pdf"),
            "{:?}",
            found[0].samples
        );
        assert_eq!(note.as_deref(), Some(found[0].samples[0].as_str()));
        // Archives this version does not open are named; a damaged 7z says why.
        for (name, head, kind) in [
            ("a.7z", &b"7z\xBC\xAF\x27\x1C\x00\x04"[..], "failed: 7z: "),
            ("a.rar", &b"Rar!\x1A\x07\x01\x00"[..], "unsupported: rar"),
        ] {
            let path = dir.path().join(name);
            let mut bytes = head.to_vec();
            bytes.extend((0..2000u32).map(|i| (i * 7919 % 251) as u8));
            std::fs::write(&path, bytes).unwrap();
            let (found, note) = classifier.classify_file(std::fs::File::open(&path).unwrap());
            assert_eq!(found[0].detector.as_str(), UNREADABLE);
            assert!(note.as_deref().unwrap().starts_with(kind), "{note:?}");
        }
        let text = dir.path().join("a.txt");
        std::fs::write(&text, "lunch menu").unwrap();
        let (found, note) = classifier.classify_file(std::fs::File::open(&text).unwrap());
        assert!(found.is_empty() && note.is_none());
    }
}
