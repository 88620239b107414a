//! The badge id scheme shared by door agents, door controllers and the collector's
//! roster: a card number is only ever reported as HMAC-SHA256 under the site's badge
//! key (hex), next to its last four digits.

use std::path::Path;

/// HMAC-SHA256 of a card number (its digits) under the site's badge key, lower-case hex.
pub fn card_hash(key: &[u8], number: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    hex::encode(ring::hmac::sign(&key, number.as_bytes()).as_ref())
}

/// The last four digits of a card number (all of it when shorter).
pub fn last4(number: &str) -> &str {
    &number[number.len().saturating_sub(4)..]
}

/// Reads a badge key file: its bytes less trailing whitespace (so `echo key > file`
/// and a file without a newline give one key), at least 16 bytes, and — the agent's
/// case, `private` — readable by its owner only: whoever can read the key can link
/// hashes to card numbers.
pub fn read_key(path: &Path, private: bool) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if private && meta.mode() & 0o077 != 0 {
        return Err(format!(
            "readable by group or others (mode {:o}); chmod 600 it",
            meta.mode() & 0o777
        ));
    }
    let mut key = std::fs::read(path).map_err(|e| e.to_string())?;
    while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
        key.pop();
    }
    if key.len() < 16 {
        return Err(format!("{} bytes; at least 16 are needed", key.len()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_trimmed_private_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("badge.key");
        std::fs::write(&p, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_key(&p, true).unwrap_err().contains("mode 644"));
        assert_eq!(read_key(&p, false).unwrap(), b"0123456789abcdef");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            card_hash(&read_key(&p, true).unwrap(), "42"),
            card_hash(b"0123456789abcdef", "42")
        );
        std::fs::write(&p, "short\n").unwrap();
        assert!(read_key(&p, true).unwrap_err().contains("5 bytes"));
        assert_eq!((last4("0012345678"), last4("42")), ("5678", "42"));
    }
}
