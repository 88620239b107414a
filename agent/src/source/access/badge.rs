//! Badge readers that present themselves as USB keyboards: key presses → card
//! numbers → a keyed hash and the last four digits. The raw number never leaves this
//! module (it would identify the person's card to anyone reading the events).
//!
//! [`CardAssembler`] is pure: it takes Linux key codes (`input-event-codes.h`) as the
//! input device reports them and yields a card when the reader sends Enter. The device
//! side (opening the reader exclusively so nothing types into a console) is the rest
//! of the door capability.

/// Longest card number accepted; a reader stuck sending keys is cut off here.
pub const MAX_DIGITS: usize = 32;

/// Key codes of the digit keys, main row and keypad, and of Enter.
fn digit(code: u16) -> Option<char> {
    match code {
        2..=10 => Some(char::from(b'1' + (code - 2) as u8)), // KEY_1..KEY_9
        11 => Some('0'),                                     // KEY_0
        79..=81 => Some(char::from(b'1' + (code - 79) as u8)), // KEY_KP1..KEY_KP3
        75..=77 => Some(char::from(b'4' + (code - 75) as u8)), // KEY_KP4..KEY_KP6
        71..=73 => Some(char::from(b'7' + (code - 71) as u8)), // KEY_KP7..KEY_KP9
        82 => Some('0'),                                     // KEY_KP0
        _ => None,
    }
}

const KEY_ENTER: u16 = 28;
const KEY_KPENTER: u16 = 96;

/// A card read: what may be reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    /// HMAC-SHA256 of the number under the site's badge key, hex.
    pub id_hash: String,
    /// The last four digits (what is printed on many cards), for people.
    pub last4: String,
    pub digits: usize,
}

/// What a key press led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Part of a number; nothing yet.
    Pending,
    Card(Card),
    /// Enter without digits, or a number longer than [`MAX_DIGITS`] (discarded), or
    /// a key that is not a digit (the number so far is discarded).
    Rejected(&'static str),
}

/// Collects key presses into card numbers.
pub struct CardAssembler {
    key: Vec<u8>,
    digits: String,
    overflowed: bool,
    /// Presses were lost mid-card: everything up to the next Enter is not a card.
    skipping: bool,
}

impl CardAssembler {
    /// `badge_key` is the site's secret (the same on every door agent, so one card has
    /// one hash across doors).
    pub fn new(badge_key: &[u8]) -> Self {
        CardAssembler {
            key: badge_key.to_vec(),
            digits: String::new(),
            overflowed: false,
            skipping: false,
        }
    }

    /// Drops a partial number (the reader stopped mid-card); true if there was one.
    pub fn abandon(&mut self) -> bool {
        let had = !self.digits.is_empty() || self.overflowed || self.skipping;
        self.digits.clear();
        self.overflowed = false;
        self.skipping = false;
        had
    }

    /// Presses were lost: the digits up to the next Enter belong to a card read only
    /// in part and would hash as a different, valid-looking card, so they are dropped.
    pub fn lost_input(&mut self) {
        self.digits.clear();
        self.overflowed = false;
        self.skipping = true;
    }

    /// One key press (value 1 events only; releases and repeats are not passed in).
    pub fn press(&mut self, code: u16) -> Read {
        if self.skipping {
            if code == KEY_ENTER || code == KEY_KPENTER {
                self.skipping = false;
                return Read::Rejected("keys were lost during this card");
            }
            return Read::Pending;
        }
        if code == KEY_ENTER || code == KEY_KPENTER {
            let number = std::mem::take(&mut self.digits);
            if std::mem::take(&mut self.overflowed) {
                return Read::Rejected("longer than 32 digits");
            }
            if number.is_empty() {
                return Read::Rejected("Enter without a number");
            }
            return Read::Card(Card {
                id_hash: weilan_config::badge::card_hash(&self.key, &number),
                last4: weilan_config::badge::last4(&number).to_string(),
                digits: number.len(),
            });
        }
        match digit(code) {
            Some(d) => {
                if self.digits.len() >= MAX_DIGITS {
                    self.overflowed = true;
                    self.digits.clear();
                } else if !self.overflowed {
                    self.digits.push(d);
                }
                Read::Pending
            }
            None => {
                self.digits.clear();
                self.overflowed = false;
                Read::Rejected("a key that is not a digit")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key codes for typing `s` on the main row, then Enter.
    fn typed(s: &str) -> Vec<u16> {
        s.chars()
            .map(|c| match c {
                '0' => 11,
                d => 2 + (d as u16 - '1' as u16),
            })
            .chain([KEY_ENTER])
            .collect()
    }

    fn read_all(a: &mut CardAssembler, codes: &[u16]) -> Read {
        codes.iter().map(|c| a.press(*c)).last().unwrap()
    }

    #[test]
    fn a_card_is_its_keyed_hash_and_last_four_digits() {
        let mut a = CardAssembler::new(b"site-key");
        let Read::Card(c) = read_all(&mut a, &typed("0012345678")) else {
            panic!()
        };
        assert_eq!((c.last4.as_str(), c.digits), ("5678", 10));
        assert_eq!(c.id_hash.len(), 64);
        assert!(!c.id_hash.contains("0012345678"));
        // The same card hashes the same; another key or card does not.
        let Read::Card(again) = read_all(&mut a, &typed("0012345678")) else {
            panic!()
        };
        assert_eq!(again.id_hash, c.id_hash);
        let Read::Card(other) =
            read_all(&mut CardAssembler::new(b"other-site"), &typed("0012345678"))
        else {
            panic!()
        };
        assert_ne!(other.id_hash, c.id_hash);
    }

    #[test]
    fn keypad_digits_count_like_the_main_row() {
        let mut a = CardAssembler::new(b"k");
        // KP1 KP2 KP3 KP4 KP5 KP6 KP7 KP8 KP9 KP0, KPEnter
        let pad = [79, 80, 81, 75, 76, 77, 71, 72, 73, 82, KEY_KPENTER];
        let Read::Card(p) = read_all(&mut a, &pad) else {
            panic!()
        };
        let Read::Card(m) = read_all(&mut a, &typed("1234567890")) else {
            panic!()
        };
        assert_eq!(p, m);
    }

    #[test]
    fn junk_is_rejected_and_does_not_leak_into_the_next_card() {
        let mut a = CardAssembler::new(b"k");
        assert_eq!(a.press(KEY_ENTER), Read::Rejected("Enter without a number"));
        a.press(2);
        assert_eq!(a.press(30), Read::Rejected("a key that is not a digit")); // KEY_A
        let Read::Card(c) = read_all(&mut a, &typed("9999")) else {
            panic!()
        };
        assert_eq!(c.digits, 4, "the 1 before the letter was dropped");
        let long: Vec<u16> = typed(&"1".repeat(40));
        assert_eq!(
            read_all(&mut a, &long),
            Read::Rejected("longer than 32 digits")
        );
        assert!(matches!(read_all(&mut a, &typed("42")), Read::Card(c) if c.digits == 2));
    }
}
