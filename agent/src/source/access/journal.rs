//! Reading the systemd journal's export as `journalctl --follow --output=json` writes
//! it: one JSON object per entry. The agent runs `journalctl` rather than linking
//! libsystemd (no build dependency, and the journal's file format is journalctl's to
//! know); it resumes after a restart from the last entry's cursor.

use serde_json::Value;

/// One journal entry, as far as access events need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `SYSLOG_IDENTIFIER` (e.g. `sshd`, `sudo`), else `_COMM`.
    pub program: String,
    pub message: String,
    pub pid: Option<u32>,
    /// Where to resume (`--after-cursor`).
    pub cursor: String,
}

/// The journal fields the agent asks for (`--output-fields`), so entries stay small.
pub const FIELDS: &str = "SYSLOG_IDENTIFIER,_COMM,MESSAGE,_PID";

/// Programs whose entries are read (`journalctl _COMM=` / identifier matches).
pub const PROGRAMS: [&str; 5] = ["sshd", "sshd-session", "sudo", "su", "login"];

/// A journal field's text: a string, or (for messages that are not valid UTF-8) an
/// array of byte values.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(bytes) => {
            let b: Vec<u8> = bytes
                .iter()
                .filter_map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect();
            Some(String::from_utf8_lossy(&b).into_owned())
        }
        _ => None,
    }
}

/// One line of `journalctl -o json`; `None` for lines that are not an entry with a
/// message and cursor (those are logged by the caller, never fatal).
pub fn parse_entry(line: &str) -> Option<Entry> {
    let v: Value = serde_json::from_str(line).ok()?;
    let program = v
        .get("SYSLOG_IDENTIFIER")
        .and_then(text)
        .or_else(|| v.get("_COMM").and_then(text))?;
    Some(Entry {
        program,
        message: v.get("MESSAGE").and_then(text)?,
        pid: v.get("_PID").and_then(text).and_then(|p| p.parse().ok()),
        cursor: v.get("__CURSOR").and_then(text)?,
    })
}

/// `journalctl` arguments: follow the access programs' entries as JSON, from after
/// `cursor` when resuming, else from now.
pub fn journalctl_args(cursor: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--follow".into(),
        "--output=json".into(),
        format!("--output-fields={FIELDS}"),
        "--no-pager".into(),
    ];
    match cursor {
        Some(c) => args.push(format!("--after-cursor={c}")),
        None => args.push("--lines=0".into()),
    }
    // Matches on one field are ORed by journalctl.
    for p in PROGRAMS {
        args.push(format!("SYSLOG_IDENTIFIER={p}"));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_give_program_message_pid_and_cursor() {
        let e = parse_entry(
            r#"{"__CURSOR":"s=abc;i=1f","__REALTIME_TIMESTAMP":"1763790000000000","SYSLOG_IDENTIFIER":"sshd","_PID":"812","MESSAGE":"Accepted publickey for root from 10.77.0.1 port 40000 ssh2"}"#,
        )
        .unwrap();
        assert_eq!(e.program, "sshd");
        assert_eq!(e.pid, Some(812));
        assert_eq!(e.cursor, "s=abc;i=1f");
        assert!(
            crate::source::access::parse::parse_message(&e.program, &e.message, "journal")
                .is_some()
        );
    }

    #[test]
    fn binary_messages_and_missing_identifiers_are_handled() {
        let e = parse_entry(
            r#"{"__CURSOR":"c","_COMM":"sudo","MESSAGE":[97,108,105,99,101,32,58,32,255]}"#,
        )
        .unwrap();
        assert_eq!(e.program, "sudo");
        assert!(e.message.starts_with("alice : "));
        assert_eq!(
            parse_entry(r#"{"__CURSOR":"c","MESSAGE":"no program"}"#),
            None
        );
        assert_eq!(parse_entry("not json"), None);
        assert_eq!(
            parse_entry(r#"{"MESSAGE":"x","_COMM":"sshd"}"#),
            None,
            "no cursor, no resume"
        );
    }

    #[test]
    fn journalctl_follows_from_now_or_after_the_cursor() {
        let fresh = journalctl_args(None);
        assert!(fresh.contains(&"--lines=0".to_string()));
        assert!(fresh.contains(&"SYSLOG_IDENTIFIER=sudo".to_string()));
        let resumed = journalctl_args(Some("s=abc;i=1f"));
        assert!(resumed.contains(&"--after-cursor=s=abc;i=1f".to_string()));
        assert!(!resumed.contains(&"--lines=0".to_string()));
    }
}
