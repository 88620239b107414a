//! Built-in detectors: PRC resident identity numbers (GB 11643: province, birth date,
//! check character; 15-digit ones of the 1989 edition after an identity word), unified social credit codes (GB 32100 with the GB 11714
//! organisation code inside), bank card numbers (issuer range and length, Luhn), mainland
//! mobile numbers (allocated segments), classification marks in their standard forms
//! (national and organisational apart), and custom keyword lists (Aho-Corasick).
//!
//! Every candidate is validated (check digits, dates, prefixes) so that random digit
//! runs do not count, and delimited: a match must not continue into more ASCII letters
//! or digits (Chinese text around it is fine — `\b` would not be, since CJK characters
//! are word characters).

use std::sync::OnceLock;

use aho_corasick::AhoCorasick;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// What one detector found in a text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub detector: String,
    pub count: usize,
    /// Up to [`MAX_SAMPLES`] masked samples, e.g. `110***********1234`.
    pub samples: Vec<String>,
}

pub const MAX_SAMPLES: usize = 3;

/// Keeps the first `head` and last `tail` characters, masks the rest with `*`.
pub fn mask(s: &str, head: usize, tail: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= head + tail {
        return "*".repeat(chars.len());
    }
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i < head || i >= chars.len() - tail {
                *c
            } else {
                '*'
            }
        })
        .collect()
}

fn delimited(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    !before.is_some_and(|c| c.is_ascii_alphanumeric())
        && !after.is_some_and(|c| c.is_ascii_alphanumeric())
}

fn collect(detector: &str, found: impl Iterator<Item = String>) -> Option<Finding> {
    let mut count = 0;
    let mut samples = Vec::new();
    for s in found {
        count += 1;
        if samples.len() < MAX_SAMPLES {
            samples.push(s);
        }
    }
    (count > 0).then(|| Finding {
        detector: detector.into(),
        count,
        samples,
    })
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("built-in pattern"))
}

/// GB 11643-1999 check character of the first 17 digits.
pub fn id_check_char(first17: &[u8]) -> Option<u8> {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const C: &[u8; 11] = b"10X98765432";
    if first17.len() != 17 || !first17.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = first17
        .iter()
        .zip(W)
        .map(|(d, w)| (d - b'0') as u32 * w)
        .sum();
    Some(C[(sum % 11) as usize])
}

/// Provincial-level codes of GB/T 2260 (the first two digits of a region code):
/// mainland provinces, Taiwan (71), Hong Kong and Macao (81, 82) and 83 (residence
/// permits of Taiwan residents).
const PROVINCES: &[&[u8; 2]] = &[
    b"11", b"12", b"13", b"14", b"15", b"21", b"22", b"23", b"31", b"32", b"33", b"34", b"35",
    b"36", b"37", b"41", b"42", b"43", b"44", b"45", b"46", b"50", b"51", b"52", b"53", b"54",
    b"61", b"62", b"63", b"64", b"65", b"71", b"81", b"82", b"83",
];

fn is_province(code: &[u8]) -> bool {
    PROVINCES.iter().any(|p| p.as_slice() == code)
}

/// Region and birth date of a resident identity number (GB 11643), whatever its check
/// character: what a mistyped identity number still has, and a random number rarely.
fn looks_like_resident_id(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) || !is_province(&b[..2]) {
        return false;
    }
    jiff::civil::Date::strptime("%Y%m%d", &s[6..14])
        .is_ok_and(|d| d.year() >= 1900 && d <= jiff::Zoned::now().date())
}

/// A valid 18-character resident identity number: province, real birth date, check
/// character.
pub fn is_resident_id(s: &str) -> bool {
    let b = s.as_bytes();
    looks_like_resident_id(s)
        && id_check_char(&b[..17]).is_some_and(|check| b[17].to_ascii_uppercase() == check)
}

/// A first-generation, 15-digit identity number (GB 11643-1989, issued until 2004):
/// province, and a birth date in the 1900s written as six digits. It has no check
/// digit, so about one random 15-digit number in 200 passes: it counts only after an
/// identity word ([`ID_WORDS`]).
pub fn is_old_resident_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 15
        && b.iter().all(u8::is_ascii_digit)
        && is_province(&b[..2])
        && jiff::civil::Date::strptime("%Y%m%d", format!("19{}", &s[6..12])).is_ok()
}

/// Whether one of `words` or `more` stands in the `window` characters before byte
/// `start` of `text` (context words: 卡号 before a card, 身份证 before an old ID).
fn says_before(text: &str, start: usize, window: usize, words: &[&str], more: &[String]) -> bool {
    let from = text[..start]
        .char_indices()
        .rev()
        .nth(window - 1)
        .map_or(0, |(i, _)| i);
    let before = &text[from..start];
    words.iter().any(|w| before.contains(w)) || more.iter().any(|w| before.contains(w.as_str()))
}

/// Words that name an identity number just before it.
const ID_WORDS: &[&str] = &["身份证", "身份号码", "证件号", "公民身份", "ID No", "ID no"];

/// PRC resident identity numbers (GB 11643): 18 characters with their check
/// character anywhere; 15 digits (the 1989 edition) after an identity word.
pub fn resident_ids(text: &str) -> Option<Finding> {
    resident_ids_with(text, &[])
}

/// [`resident_ids`], with the policy's own identity words (`[files] id_context`)
/// besides the built-in ones.
pub fn resident_ids_with(text: &str, more_context: &[String]) -> Option<Finding> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = re(&RE, r"[0-9]{17}[0-9Xx]|[0-9]{15}");
    let id_word = |start: usize| says_before(text, start, 15, ID_WORDS, more_context);
    collect(
        "prc-resident-id",
        re.find_iter(text)
            .filter(|m| delimited(text, m.start(), m.end()))
            .filter(|m| {
                is_resident_id(m.as_str()) || (is_old_resident_id(m.as_str()) && id_word(m.start()))
            })
            .map(|m| mask(m.as_str(), 3, 4)),
    )
}

const USCC_ALPHABET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";

/// GB 32100-2015: a valid 18-character unified social credit code — a registration
/// authority (1–9, A, N, Y), an organisation category under it (1–5, 9), a region code
/// of a real province, the organisation code with its own GB 11714 check character,
/// and the code's check character.
pub fn is_uscc(s: &str) -> bool {
    const W: [u32; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    let b = s.as_bytes();
    if b.len() != 18
        || !matches!(b[0], b'1'..=b'9' | b'A' | b'N' | b'Y')
        || !matches!(b[1], b'1'..=b'5' | b'9')
        || !is_province(&b[2..4])
        || !b[2..8].iter().all(u8::is_ascii_digit)
    {
        return false;
    }
    let value = |c: u8| USCC_ALPHABET.iter().position(|a| *a == c).map(|p| p as u32);
    let mut sum = 0;
    for (c, w) in b[..17].iter().zip(W) {
        match value(*c) {
            Some(v) => sum += v * w,
            None => return false,
        }
    }
    let check = (31 - sum % 31) % 31;
    value(b[17]) == Some(check) && is_organisation_code(&b[8..17])
}

/// GB 11714: the nine-character organisation code inside a credit code (characters
/// 9–17), whose last character checks the first eight.
fn is_organisation_code(code: &[u8]) -> bool {
    const W: [u32; 8] = [3, 7, 9, 10, 5, 8, 4, 2];
    let value = |c: u8| match c {
        b'0'..=b'9' => Some((c - b'0') as u32),
        b'A'..=b'Z' => Some((c - b'A') as u32 + 10),
        _ => None,
    };
    let mut sum = 0;
    for (c, w) in code[..8].iter().zip(W) {
        match value(*c) {
            Some(v) => sum += v * w,
            None => return false,
        }
    }
    let expected = match 11 - sum % 11 {
        10 => b'X',
        11 => b'0',
        d => b'0' + d as u8,
    };
    code[8] == expected
}

/// Unified social credit codes of organisations (GB 32100).
pub fn social_credit_codes(text: &str) -> Option<Finding> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = re(
        &RE,
        r"[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}",
    );
    collect(
        "prc-social-credit-code",
        re.find_iter(text)
            .filter(|m| {
                delimited(text, m.start(), m.end())
                    && is_uscc(m.as_str())
                    && !looks_like_resident_id(m.as_str())
            })
            .map(|m| mask(m.as_str(), 2, 4)),
    )
}

/// The Luhn checksum.
pub fn luhn(digits: &str) -> bool {
    let mut sum = 0;
    for (i, c) in digits.bytes().rev().enumerate() {
        let mut d = (c - b'0') as u32;
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

/// The card network whose issuer range and card length `digits` fit: UnionPay (62,
/// 16–19 digits), Visa (4, 16 or 19), Mastercard (51–55 and 2221–2720, 16), American
/// Express (34, 37, 15), JCB (3528–3589, 16–19).
fn card_network(digits: &str) -> Option<&'static str> {
    let prefix = |n: usize| digits[..n].parse::<u32>().unwrap_or(0);
    let len = digits.len();
    match (prefix(2), len) {
        (62, 16..=19) => Some("UnionPay"),
        (40..=49, 16 | 19) => Some("Visa"),
        (51..=55, 16) => Some("Mastercard"),
        (22..=27, 16) if (2221..=2720).contains(&prefix(4)) => Some("Mastercard"),
        (34 | 37, 15) => Some("American Express"),
        (35, 16..=19) if (3528..=3589).contains(&prefix(4)) => Some("JCB"),
        _ => None,
    }
}

/// Words that say a number nearby is a card number.
const CARD_WORDS: &[&str] = &[
    "卡号",
    "银行卡",
    "信用卡",
    "借记卡",
    "储蓄卡",
    "card",
    "Card",
    "CARD",
];

/// Words that say a number nearby is an account number: a card, or a bank account
/// of an organisation (which has no card number's structure).
const ACCOUNT_WORDS: &[&str] = &["账号", "帐号", "账户", "帐户", "开户", "account", "Account"];

/// Bank card numbers: an issuer range with that network's card length, Luhn-valid,
/// not one repeated digit, not a (possibly mistyped) resident identity number;
/// written as one run of digits or in groups of four (`6222 0212 3456 7890 123`).
/// UnionPay (62), the cards of this country, count wherever they stand. An 18-digit
/// number — the length of identity numbers and credit codes — needs a card or account
/// word (卡号, 账号, card …) within the 24 characters before it; a Visa, Mastercard,
/// American Express or JCB number needs a card word there, because their ranges
/// (4…, 5…, 34…, 35…) are also where organisations' account numbers and serial
/// numbers fall, one in ten of them Luhn-valid by chance.
pub fn bank_cards(text: &str) -> Option<Finding> {
    bank_cards_with(text, &[])
}

/// [`bank_cards`], with the policy's own card words (`[files] card_context`) besides
/// the built-in ones.
pub fn bank_cards_with(text: &str, more_context: &[String]) -> Option<Finding> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = re(
        &RE,
        r"[0-9]{15,19}|[0-9]{4}(?: [0-9]{4}){3}(?: [0-9]{1,3})?|[0-9]{4}(?:-[0-9]{4}){3}(?:-[0-9]{1,3})?",
    );
    let card_word = |start: usize| says_before(text, start, 24, CARD_WORDS, more_context);
    let account_word = |start: usize| says_before(text, start, 24, ACCOUNT_WORDS, &[]);
    collect(
        "bank-card",
        re.find_iter(text)
            .filter(|m| delimited(text, m.start(), m.end()))
            .filter_map(|m| {
                let digits: String = m.as_str().chars().filter(char::is_ascii_digit).collect();
                let network = card_network(&digits)?;
                let valid = luhn(&digits)
                    && !digits.bytes().all(|b| b == digits.as_bytes()[0])
                    && !looks_like_resident_id(&digits);
                let worded = if digits.len() == 18 {
                    card_word(m.start()) || account_word(m.start())
                } else {
                    network == "UnionPay" || card_word(m.start())
                };
                (valid && worded).then(|| mask(&digits, 4, 4))
            }),
    )
}

/// Mainland mobile numbers: 11 digits in the network segments allocated to mobile
/// (and IoT-free) service — 13x, 145–149, 150–153, 155–159, 162, 165–167, 170–178,
/// 18x, 190–193, 195–199 — with an optional +86 / 86 prefix, as one run of digits or
/// grouped 3-4-4 by spaces or hyphens (`138 1234 5678`, `138-1234-5678`).
pub fn mobile_numbers(text: &str) -> Option<Finding> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = re(
        &RE,
        r"(?:\+?86[- ]?)?1(?:3[0-9]|4[5-9]|5[0-35-9]|6[2567]|7[0-8]|8[0-9]|9[0-35-9])(?:[0-9]{8}| [0-9]{4} [0-9]{4}|-[0-9]{4}-[0-9]{4})",
    );
    collect(
        "prc-mobile",
        re.find_iter(text)
            .filter(|m| delimited(text, m.start(), m.end()))
            .map(|m| {
                let digits: String = m.as_str().chars().filter(char::is_ascii_digit).collect();
                mask(&digits[digits.len() - 11..], 3, 4)
            }),
    )
}

/// National-secret levels (the State Secrets Law's 绝密, 机密, 秘密): the mark word and
/// its class. Only these three ever make `mark:top-secret`, `mark:secret` or
/// `mark:confidential`.
pub const NATIONAL_MARKS: &[(&str, &str)] = &[
    ("绝密", "top-secret"),
    ("机密", "secret"),
    ("秘密", "confidential"),
];

/// How many non-empty lines count as a document's head (title, header, first lines):
/// a mark standing alone on such a line is a mark; the same word further down, or
/// inside a sentence, is only a word.
const HEAD_LINES: usize = 5;

/// Classification marks, one finding per class (`mark:secret`, `mark:internal` …), each
/// sample naming where the mark stands (`机密★1年 (line 1)`).
///
/// A national-secret mark counts only in a standard form, so that 手机密码, 有机密封,
/// 机密性 or 秘密通道 are words, not marks:
/// - the level followed (or surrounded) by ★, with the period after it: `机密★`,
///   `秘密★10年`, `绝密★启用前`, `★机密★`;
/// - the level as a label: `密级：机密`;
/// - the level alone on one of the first lines (a title-page mark, `【机密】`).
///
/// Organisational marks have their own classes: `mark:internal` (内部资料, 内部文件,
/// 内部使用, 仅供内部, `内部★`, INTERNAL USE ONLY, or 内部 alone on a first line — never
/// 内部控制 or 内部收益率), `mark:trade-secret` (商业秘密 with ★ or alone on a first line —
/// not the phrase in a confidentiality clause), `mark:sensitive` (敏感 or 敏感信息 with ★
/// or alone on a first line) and `mark:org-confidential` (CONFIDENTIAL, STRICTLY
/// CONFIDENTIAL or TOP SECRET alone on a first line — not an e-mail footer's sentence).
pub fn classification_marks(text: &str) -> Vec<Finding> {
    static STAR: OnceLock<Regex> = OnceLock::new();
    static LABEL: OnceLock<Regex> = OnceLock::new();
    static INTERNAL: OnceLock<Regex> = OnceLock::new();
    static ORG_STAR: OnceLock<Regex> = OnceLock::new();
    let star = re(
        &STAR,
        r"(?:★\s*)?(绝\s?密|机\s?密|秘\s?密)\s*★\s*(?:启用前|长期|[0-9一二三四五六七八九十]+\s*(?:年|个月|月|日|天))?|★\s*(绝\s?密|机\s?密|秘\s?密)",
    );
    let label = re(
        &LABEL,
        r"密\s*级\s*[:：]?\s*[“\x22【\[]?\s*(绝\s?密|机\s?密|秘\s?密)",
    );
    let internal = re(
        &INTERNAL,
        r"(?i)内部(?:资料|文件|材料|使用)|仅(?:限|供)内部|内部\s*★|internal\s+use\s+only",
    );
    let org_star = re(&ORG_STAR, r"(商业秘密|敏感信息|敏感)\s*★");
    let mut found = Marks::default();
    let mut head = 0;
    for (index, line) in text.lines().enumerate() {
        let n = index + 1;
        // A form feed line starts another document (an archive's next entry): its
        // first lines are a head again.
        if line == "\u{c}" {
            head = 0;
            continue;
        }
        // A line with one of the national forms.
        let before_line = found.total();
        // 商业秘密★ is a trade secret: a starred level must not end a longer word.
        let starts_a_word = |at: usize| {
            !line[..at]
                .chars()
                .next_back()
                .is_some_and(char::is_alphabetic)
        };
        let starred = star
            .captures_iter(line)
            .filter(|c| c[0].starts_with('★') || starts_a_word(c.get(0).map_or(0, |m| m.start())));
        for c in starred.chain(label.captures_iter(line)) {
            // A template may space the level's two characters apart (`机　密★`).
            let word: String = c
                .get(1)
                .or_else(|| c.get(2))
                .map_or("", |m| m.as_str())
                .split_whitespace()
                .collect();
            if let Some((_, class)) = NATIONAL_MARKS.iter().find(|(w, _)| *w == word) {
                found.note(class, c[0].trim(), n);
            }
        }
        for m in internal.find_iter(line) {
            found.note("internal", m.as_str(), n);
        }
        for c in org_star.captures_iter(line) {
            let class = if &c[1] == "商业秘密" {
                "trade-secret"
            } else {
                "sensitive"
            };
            found.note(class, c[0].trim(), n);
        }
        let bare = line.trim_matches(|c: char| {
            c.is_whitespace() || "【】[]()（）《》<>\u{201c}\u{201d}\"'★☆*＊:：".contains(c)
        });
        if bare.is_empty() {
            continue;
        }
        head += 1;
        // A line already counted in one of the forms above is not counted again.
        if head > HEAD_LINES || found.total() > before_line {
            continue;
        }
        // A first line that is nothing but a mark (its characters perhaps spaced
        // apart: `机　密`).
        let unspaced: String = bare.split_whitespace().collect();
        let alone = NATIONAL_MARKS
            .iter()
            .find(|(w, _)| *w == unspaced)
            .map(|(_, class)| *class)
            .or(match bare.to_uppercase().as_str() {
                "内部" => Some("internal"),
                "商业秘密" => Some("trade-secret"),
                "敏感" | "敏感信息" => Some("sensitive"),
                "CONFIDENTIAL" | "STRICTLY CONFIDENTIAL" | "TOP SECRET" => Some("org-confidential"),
                _ => None,
            });
        if let Some(class) = alone {
            found.note(class, bare, n);
        }
    }
    found.0
}

/// Mark findings as they are collected, one per class.
#[derive(Default)]
struct Marks(Vec<Finding>);

impl Marks {
    fn total(&self) -> usize {
        self.0.iter().map(|f| f.count).sum()
    }

    fn note(&mut self, class: &str, mark: &str, line: usize) {
        let name = format!("mark:{class}");
        let sample = format!("{mark} (line {line})");
        match self.0.iter_mut().find(|f| f.detector == name) {
            Some(f) => {
                f.count += 1;
                if f.samples.len() < MAX_SAMPLES && !f.samples.contains(&sample) {
                    f.samples.push(sample);
                }
            }
            None => self.0.push(Finding {
                detector: name,
                count: 1,
                samples: vec![sample],
            }),
        }
    }
}

/// A custom keyword list from the policy, matched with Aho-Corasick.
pub struct KeywordList {
    pub name: String,
    ac: AhoCorasick,
}

impl KeywordList {
    pub fn new(name: &str, words: &[String], case_insensitive: bool) -> Result<Self, String> {
        let ac = AhoCorasick::builder()
            .ascii_case_insensitive(case_insensitive)
            .build(words)
            .map_err(|e| e.to_string())?;
        Ok(KeywordList {
            name: name.into(),
            ac,
        })
    }

    /// Keywords are the organisation's own terms: samples show only their length.
    pub fn find(&self, text: &str) -> Option<Finding> {
        collect(
            &format!("keywords:{}", self.name),
            self.ac
                .find_iter(text)
                .map(|m| mask(&text[m.start()..m.end()], 1, 0)),
        )
    }
}

/// Every built-in detector over `text`.
pub fn scan(text: &str) -> Vec<Finding> {
    scan_with(text, &Context::default())
}

/// The policy's own context words for the detectors that use them.
#[derive(Debug, Default, Clone)]
pub struct Context {
    /// `[files] card_context`.
    pub cards: Vec<String>,
    /// `[files] id_context`.
    pub ids: Vec<String>,
}

/// Every built-in detector over `text`, with the policy's context words.
pub fn scan_with(text: &str, context: &Context) -> Vec<Finding> {
    let mut out: Vec<Finding> = [
        resident_ids_with(text, &context.ids),
        social_credit_codes(text),
        bank_cards_with(text, &context.cards),
        mobile_numbers(text),
    ]
    .into_iter()
    .flatten()
    .collect();
    out.extend(classification_marks(text));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a valid resident id from its first 17 digits.
    fn id(first17: &str) -> String {
        format!(
            "{first17}{}",
            id_check_char(first17.as_bytes()).unwrap() as char
        )
    }

    /// The policy validates detector names against the contract's list: it must be
    /// exactly what this classifier can report.
    #[test]
    fn every_detector_is_in_the_contracts_list_and_back() {
        let text = format!(
            "CONFIDENTIAL\n绝密★\n机密★1年\n秘密★启用前\n内部资料\n商业秘密★\n敏感信息★\n{} 91350100M000100Y43 卡号 4111111111111111 13812345678",
            id("11010519491231002")
        );
        let mut found: Vec<String> = scan(&text).into_iter().map(|f| f.detector).collect();
        // And the class of a file that could not be read at all.
        found.push(crate::classify::UNREADABLE.to_string());
        found.sort();
        let mut contract: Vec<String> = weilan_config::policy::files::BUILTIN_DETECTORS
            .iter()
            .map(|d| d.to_string())
            .collect();
        contract.sort();
        assert_eq!(found, contract);
    }

    #[test]
    fn resident_ids_need_a_valid_check_digit_and_date() {
        let good = id("11010519491231002");
        assert_eq!(good, "11010519491231002X");
        assert!(is_resident_id(&good));
        let wrong_check = format!("{}1", &good[..17]);
        assert!(!is_resident_id(&wrong_check));
        assert!(!is_resident_id(&id("11010519491332002")), "month 13");
        assert!(!is_resident_id(&id("91010519491231002")), "region 9");
        assert!(
            !is_resident_id(&id("19010519491231002")),
            "19 is no province"
        );
        let text = format!("员工身份证号{good}，备用{wrong_check}，长串{good}9");
        let f = resident_ids(&text).unwrap();
        assert_eq!(f.count, 1, "{f:?}");
        assert_eq!(f.samples, vec!["110***********002X"]);
    }

    #[test]
    fn fifteen_digit_identity_numbers_count_after_an_identity_word_only() {
        let old = "110105491231002";
        assert!(is_old_resident_id(old));
        for (text, want) in [
            (format!("身份证号：{old}"), 1),
            (format!("公民身份号码 {old}，住址"), 1),
            (format!("ID No. {old}"), 1),
            (format!("户籍号 {old}"), 0),
            (format!("订单号 {old}"), 0),
            (old.to_string(), 0),
            // Region 99 is no province; 19491331 is no date.
            ("身份证 990105491231002".to_string(), 0),
            ("身份证 110105491331002".to_string(), 0),
            // An 18-digit number's 15-digit tail is not read on its own.
            (format!("身份证 {}", id("11010519491231002")), 1),
        ] {
            let found = resident_ids(&text).map_or(0, |f| f.count);
            assert_eq!(found, want, "{text}");
        }
        // The policy's own words.
        let more = ["户籍号".to_string()];
        let found = resident_ids_with(&format!("户籍号 {old}"), &more);
        assert_eq!(found.map(|f| f.count), Some(1));
    }

    #[test]
    fn social_credit_codes_need_the_gb32100_check_character() {
        // A published example code.
        assert!(is_uscc("91350100M000100Y43"));
        assert!(!is_uscc("91350100M000100Y44"));
        assert!(!is_uscc("91350100M000100Y4I"), "I is not in the alphabet");
        let f = social_credit_codes("统一社会信用代码：91350100M000100Y43。").unwrap();
        assert_eq!((f.count, f.samples[0].as_str()), (1, "91************0Y43"));
    }

    #[test]
    fn bank_cards_need_luhn_and_a_network_prefix() {
        let visa = "4111111111111111";
        assert!(luhn(visa));
        let f = bank_cards(&format!(
            "卡号 {visa} 和 4111111111111112 以及 1234567812345670"
        ))
        .unwrap();
        assert_eq!(
            f.count, 1,
            "Luhn-invalid and prefix-less numbers do not count: {f:?}"
        );
        assert_eq!(f.samples, vec!["4111********1111"]);
        assert!(bank_cards("0000000000000000").is_none());
    }

    /// Look-alike numbers of the issue "Classification an officer can trust": random
    /// 18-digit numbers (6.0 % were flagged) and identity numbers with a wrong check
    /// digit (11.5 % were flagged as credit codes or bank cards). Deterministic: a
    /// fixed seed, so the figures are the same on every run.
    #[test]
    fn random_digits_and_mistyped_identity_numbers_are_rarely_anything() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let n = 20_000;
        let flagged = |text: &str| !scan(text).is_empty();
        let random = (0..n)
            .filter(|_| {
                let digits: String = (0..18)
                    .map(|_| char::from(b'0' + rng.random_range(0..10)))
                    .collect();
                flagged(&format!("编号 {digits} 。"))
            })
            .count();
        let mistyped = (0..n)
            .filter(|_| {
                let province = PROVINCES[rng.random_range(0..PROVINCES.len())];
                let first17 = format!(
                    "{}{:04}19{:02}{:02}{:02}{:03}",
                    std::str::from_utf8(province).unwrap(),
                    rng.random_range(0..10_000),
                    rng.random_range(50..100),
                    rng.random_range(1..13),
                    rng.random_range(1..29),
                    rng.random_range(0..1000)
                );
                let check = id_check_char(first17.as_bytes()).unwrap();
                let wrong = b"0123456789X"
                    .iter()
                    .copied()
                    .filter(|c| *c != check)
                    .nth(rng.random_range(0..10))
                    .unwrap();
                flagged(&format!("身份证 {first17}{} 。", wrong as char))
            })
            .count();
        println!("flagged: {random} of {n} random 18-digit numbers, {mistyped} of {n} mistyped identity numbers");
        assert!(random * 1000 <= n, "at most 0.1 %: {random} of {n}");
        assert!(mistyped * 1000 <= n, "at most 0.1 %: {mistyped} of {n}");
    }

    #[test]
    fn card_numbers_need_their_networks_length_and_18_digits_a_card_word() {
        // A UnionPay number of 19 digits, made Luhn-valid by its last digit.
        let unionpay = (0..10u8)
            .map(|d| format!("622202123456789012{d}"))
            .find(|s| luhn(s))
            .unwrap();
        assert_eq!(card_network(&unionpay), Some("UnionPay"));
        assert_eq!(
            bank_cards(&format!("编号 {unionpay}")).map(|f| f.count),
            Some(1),
            "19 digits need no card word"
        );
        assert_eq!(card_network("5500000000000004"), Some("Mastercard"));
        assert_eq!(
            card_network("550000000000000004"),
            None,
            "Mastercard is 16 digits"
        );
        assert_eq!(card_network("378282246310005"), Some("American Express"));
        assert_eq!(card_network("4111111111111111111"), Some("Visa"));
        assert_eq!(card_network("411111111111111111"), None, "no 18-digit Visa");
        // An 18-digit UnionPay number: a card only next to a card word.
        let eighteen = (0..10u8)
            .map(|d| format!("62220212345678901{d}"))
            .find(|s| luhn(s))
            .unwrap();
        assert!(bank_cards(&format!("编号 {eighteen}")).is_none());
        assert_eq!(
            bank_cards(&format!("银行卡号：{eighteen}")).map(|f| f.count),
            Some(1)
        );
    }

    #[test]
    fn cards_in_groups_of_four_count_and_foreign_ranges_need_a_card_word() {
        let unionpay = (0..10u8)
            .map(|d| format!("622202123456789012{d}"))
            .find(|s| luhn(s))
            .unwrap();
        let grouped: Vec<&str> = (0..5)
            .map(|i| &unionpay[i * 4..(i * 4 + 4).min(19)])
            .collect();
        for sep in [" ", "-"] {
            let text = format!("报销款转入 {}", grouped.join(sep));
            assert_eq!(bank_cards(&text).map(|f| f.count), Some(1), "{text}");
        }
        let sixteen = (0..10u8)
            .map(|d| format!("622588123456789{d}"))
            .find(|s| luhn(s))
            .unwrap();
        let four: Vec<&str> = (0..4).map(|i| &sixteen[i * 4..i * 4 + 4]).collect();
        assert!(bank_cards(&four.join(" ")).is_some());
        assert!(
            bank_cards(&format!("{} 1234", four.join(" "))).is_none(),
            "five groups of four are no card number"
        );
        // A Luhn-valid number in the Visa range: an organisation's account number after
        // 账号 is no card; after a card word it is one.
        let account = (0..10u8)
            .map(|d| format!("440212345678901234{d}"))
            .find(|s| luhn(s))
            .unwrap();
        assert!(bank_cards(&format!("基本户账号：{account}")).is_none());
        assert!(bank_cards(&format!("流水号 {account}")).is_none());
        assert_eq!(
            bank_cards(&format!("信用卡（卡号 {account}）")).map(|f| f.count),
            Some(1)
        );
    }

    #[test]
    fn mobile_numbers_and_their_prefixes() {
        assert_eq!(
            mobile_numbers("电话 138 1234 5678，手机 139-1234-5678，+86-137-1234-5678")
                .map(|f| f.count),
            Some(3),
            "grouped 3-4-4"
        );
        assert!(
            mobile_numbers("138 1234-5678 和 1381 234 5678").is_none(),
            "mixed or other groupings are not a mobile number's"
        );
        let f =
            mobile_numbers("电话13812345678，+86 13912345678，座机010-12345678，编号113812345678")
                .unwrap();
        assert_eq!(f.count, 2, "{f:?}");
        assert_eq!(f.samples[0], "138****5678");
        assert!(
            mobile_numbers("12812345678").is_none(),
            "12x is not a mobile prefix"
        );
        assert!(
            mobile_numbers("14012345678").is_none(),
            "140 is not allocated to mobiles"
        );
        assert!(
            mobile_numbers("19412345678").is_none(),
            "194 is not allocated"
        );
        assert_eq!(
            mobile_numbers("19912345678 16612345678").map(|f| f.count),
            Some(2)
        );
    }

    fn marks(text: &str) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = classification_marks(text)
            .into_iter()
            .map(|f| (f.detector, f.count))
            .collect();
        v.sort();
        v
    }

    fn one(class: &str) -> Vec<(String, usize)> {
        vec![(format!("mark:{class}"), 1)]
    }

    #[test]
    fn national_marks_count_in_their_standard_forms_only() {
        for (text, class) in [
            ("机密★1年\n关于2027年预算的请示", "secret"),
            ("秘密★启用前\n考试试题", "confidential"),
            ("绝密★长期", "top-secret"),
            ("标题\n★机密★ 第一页", "secret"),
            ("密级：秘密  保密期限：10年\n正文", "confidential"),
            ("【机密】\n2027年人员编制方案", "secret"),
            ("\n\n   绝密   \n正文", "top-secret"),
            // The two characters spaced apart, as some templates align them.
            ("机　密★１年\n通知", "secret"),
            ("秘 密 ★ 启用前", "confidential"),
            ("密级：绝　密\n正文", "top-secret"),
            ("\n  机　密  \n正文", "secret"),
        ] {
            assert_eq!(marks(text), one(class), "{text:?}");
        }
        let f = &classification_marks("标题\n秘密★5年")[0];
        assert_eq!(
            f.samples,
            vec!["秘密★5年 (line 2)"],
            "where the mark stands"
        );
    }

    /// The phrases that made bare substrings "classified" (issue "Classification an
    /// officer can trust"), in sentences and on first lines.
    #[test]
    fn words_that_contain_a_mark_are_not_marks() {
        for text in [
            "请勿泄露手机密码和银行卡密码",
            "本产品采用有机密封材料",
            "数据的机密性、完整性和可用性",
            "项目内部收益率为8%",
            "加强内部控制建设",
            "双方应保守对方的商业秘密",
            "This e-mail is confidential and intended solely for the addressee.",
            "机密文件管理办法\n第一条 为加强机密文件管理",
            "正文第一段\n二\n三\n四\n五\n六\n机密",
            "敏感肌肤护理指南",
            "Top secret recipes for dumplings",
        ] {
            assert_eq!(marks(text), vec![], "{text:?}");
        }
    }

    #[test]
    fn organisational_marks_have_their_own_classes() {
        assert_eq!(marks("内部资料 注意保存"), one("internal"));
        assert_eq!(marks("仅供内部使用"), one("internal"));
        assert_eq!(marks("Internal Use Only"), one("internal"));
        assert_eq!(marks("内部\n会议纪要"), one("internal"));
        assert_eq!(marks("商业秘密★\n报价单"), one("trade-secret"));
        assert_eq!(marks("商业秘密\n报价单"), one("trade-secret"));
        assert_eq!(marks("敏感信息★"), one("sensitive"));
        assert_eq!(
            marks("STRICTLY CONFIDENTIAL\nBoard minutes"),
            one("org-confidential")
        );
        assert_eq!(marks("Confidential"), one("org-confidential"));
        assert!(
            classification_marks("内部资料\n商业秘密★\nCONFIDENTIAL")
                .iter()
                .all(|f| !matches!(
                    f.detector.as_str(),
                    "mark:top-secret" | "mark:secret" | "mark:confidential"
                )),
            "never a national-secret class"
        );
    }

    #[test]
    fn keywords_are_counted_and_masked() {
        let kw = KeywordList::new(
            "finance",
            &["预算草案".into(), "Project Falcon".into()],
            true,
        )
        .unwrap();
        let f = kw.find("附件：预算草案 v2，project falcon 进度").unwrap();
        assert_eq!(f.count, 2);
        assert!(
            f.samples
                .iter()
                .all(|s| s.chars().skip(1).all(|c| c == '*')),
            "{f:?}"
        );
        assert!(scan("nothing to see here 12345").is_empty());
    }
}
