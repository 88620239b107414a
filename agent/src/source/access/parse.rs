//! Reading authentication messages: what sshd, sudo, su and login write to the journal
//! or the auth log, turned into access events.
//!
//! Pure functions over one message and the program that wrote it (from the journal's
//! `SYSLOG_IDENTIFIER` or the syslog line's tag), so the journal reader and the
//! auth-log follower share them. The formats are OpenSSH's, sudo's, util-linux su's
//! and login's, and pam_unix's session lines; anything else is `None`.

use weilan_config::event::{AccessLogin, AccessLoginFailed, AccessLogout, AccessPrivilege, Event};

/// One syslog line split into its parts: `(program, pid, message)`. Both the
/// traditional (`Nov 22 05:53:00 host sshd[812]: …`) and the RFC 3339 timestamp
/// (`2026-11-22T05:53:00.123456+08:00 host sshd[812]: …`, Debian's rsyslog default)
/// are accepted.
pub fn split_syslog_line(line: &str) -> Option<(&str, Option<u32>, &str)> {
    let mut rest = line.trim_end();
    // Timestamp: one RFC 3339 token, or three tokens "Mon DD HH:MM:SS".
    let first = rest.split_whitespace().next()?;
    let skip = if first.contains('T') && first.contains(':') {
        1
    } else {
        3
    };
    for _ in 0..skip + 1 {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace)?;
        rest = &rest[end..];
    }
    let rest = rest.trim_start();
    let (tag, message) = rest.split_once(": ")?;
    let (program, pid) = match tag.split_once('[') {
        Some((p, pid)) => (p, pid.strip_suffix(']').and_then(|n| n.parse().ok())),
        None => (tag, None),
    };
    Some((program, pid, message))
}

fn word_after<'a>(s: &'a str, marker: &str) -> Option<&'a str> {
    let at = s.find(marker)? + marker.len();
    s[at..].split_whitespace().next()
}

/// The `user(uid=N)` of a pam_unix session line.
fn pam_user(s: &str) -> Option<(String, Option<u32>)> {
    let who = word_after(s, "for user ")?;
    match who.split_once("(uid=") {
        Some((u, rest)) => Some((u.to_string(), rest.trim_end_matches(')').parse().ok())),
        None => Some((who.to_string(), None)),
    }
}

fn method_of(service: &str, tty: Option<&str>) -> &'static str {
    match service {
        "sshd" => "ssh",
        "login" => "console",
        _ if tty.is_some_and(|t| t.starts_with("tty")) => "console",
        _ if tty.is_some() => "tty",
        _ => "other",
    }
}

/// The access event `message` (written by `program`) describes, if any. `source`
/// names where it was read (`journal`, `auth-log`).
pub fn parse_message(program: &str, message: &str, source: &str) -> Option<Event> {
    let program = program.rsplit('/').next().unwrap_or(program);
    match program {
        "sshd" | "sshd-session" => sshd(message, source),
        "sudo" => sudo(message, source),
        "su" => su(message, source),
        "login" => login(message, source),
        _ => None,
    }
}

fn sshd(m: &str, source: &str) -> Option<Event> {
    // "Accepted publickey for root from 10.77.0.1 port 40000 ssh2: ED25519 SHA256:…"
    if let Some(rest) = m.strip_prefix("Accepted ") {
        let user = word_after(rest, " for ")?;
        let addr = word_after(rest, " from ");
        return Some(Event::AccessLogin(AccessLogin {
            user: user.into(),
            uid: None,
            method: "ssh".into(),
            tty: None,
            remote_addr: addr.map(String::from),
            session_id: word_after(rest, " port ")
                .map(|p| format!("ssh:{}:{p}", addr.unwrap_or("?"))),
            source: source.into(),
        }));
    }
    // "Failed password for invalid user bob from 10.0.0.5 port 2222 ssh2"
    // "Failed publickey for root from 10.77.0.1 port 40000 ssh2: …"
    if let Some(rest) = m.strip_prefix("Failed ") {
        let (how, rest) = rest.split_once(" for ")?;
        let (user, invalid) = match rest.strip_prefix("invalid user ") {
            Some(r) => (r.split_whitespace().next()?, true),
            None => (rest.split_whitespace().next()?, false),
        };
        return Some(Event::AccessLoginFailed(AccessLoginFailed {
            user: user.into(),
            method: "ssh".into(),
            remote_addr: word_after(rest, " from ").map(String::from),
            reason: Some(if invalid {
                format!("{how}: no such user")
            } else {
                format!("{how} rejected")
            }),
            source: source.into(),
        }));
    }
    // "Disconnected from user root 10.77.0.1 port 40000" (the session's end, also
    // without PAM).
    if let Some(rest) = m.strip_prefix("Disconnected from user ") {
        let mut w = rest.split_whitespace();
        let (user, addr, port) = (w.next()?, w.next()?, w.nth(1)?);
        return Some(Event::AccessLogout(AccessLogout {
            user: user.into(),
            method: "ssh".into(),
            tty: None,
            session_id: Some(format!("ssh:{addr}:{port}")),
            source: source.into(),
        }));
    }
    // "Invalid user bob from 10.0.0.5 port 2222" comes before the "Failed" line for
    // the same attempt: not counted twice.
    // "pam_unix(sshd:session): session closed for user root"
    if m.starts_with("pam_unix(sshd:session): session closed") {
        let (user, _) = pam_user(m)?;
        return Some(Event::AccessLogout(AccessLogout {
            user,
            method: "ssh".into(),
            tty: None,
            session_id: None,
            source: source.into(),
        }));
    }
    None
}

/// `KEY=value ; KEY=value` fields of a sudo line.
fn sudo_field<'a>(m: &'a str, key: &str) -> Option<&'a str> {
    m.split(" ; ")
        .map(str::trim)
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

fn sudo(m: &str, source: &str) -> Option<Event> {
    // "alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; COMMAND=/usr/bin/id"
    // "alice : 3 incorrect password attempts ; TTY=pts/0 ; … ; COMMAND=/usr/bin/id"
    // "alice : user NOT in sudoers ; TTY=pts/0 ; … ; COMMAND=/usr/bin/id"
    let (user, rest) = m.split_once(" : ")?;
    let command = sudo_field(rest, "COMMAND")?;
    let first = rest.split(" ; ").next().unwrap_or("");
    let success =
        first.starts_with("TTY=") || first.starts_with("PWD=") || first.starts_with("USER=");
    Some(Event::AccessPrivilege(AccessPrivilege {
        user: user.trim().into(),
        target_user: sudo_field(rest, "USER").unwrap_or("root").into(),
        tool: "sudo".into(),
        command: Some(command.into()),
        success,
        tty: sudo_field(rest, "TTY")
            .filter(|t| *t != "unknown")
            .map(String::from),
        source: source.into(),
    }))
}

fn su(m: &str, source: &str) -> Option<Event> {
    // "(to root) alice on pts/0"  /  "FAILED SU (to root) alice on pts/0"
    let (failed, rest) = match m.strip_prefix("FAILED SU ") {
        Some(r) => (true, r),
        None => (false, m),
    };
    let rest = rest.strip_prefix("(to ")?;
    let (target, rest) = rest.split_once(") ")?;
    let mut words = rest.split_whitespace();
    let user = words.next()?;
    let tty = match (words.next(), words.next()) {
        (Some("on"), Some(t)) => Some(t.trim_start_matches("/dev/").to_string()),
        _ => None,
    };
    Some(Event::AccessPrivilege(AccessPrivilege {
        user: user.into(),
        target_user: target.into(),
        tool: "su".into(),
        command: None,
        success: !failed,
        tty,
        source: source.into(),
    }))
}

fn login(m: &str, source: &str) -> Option<Event> {
    // "pam_unix(login:session): session opened for user alice(uid=1000) by LOGIN(uid=0)"
    if m.starts_with("pam_unix(login:session): session opened") {
        let (user, uid) = pam_user(m)?;
        return Some(Event::AccessLogin(AccessLogin {
            user,
            uid,
            method: method_of("login", None).into(),
            tty: None,
            remote_addr: None,
            session_id: None,
            source: source.into(),
        }));
    }
    if m.starts_with("pam_unix(login:session): session closed") {
        let (user, _) = pam_user(m)?;
        return Some(Event::AccessLogout(AccessLogout {
            user,
            method: "console".into(),
            tty: None,
            session_id: None,
            source: source.into(),
        }));
    }
    // "FAILED LOGIN (1) on '/dev/tty1' FOR 'alice', Authentication failure"
    if m.starts_with("FAILED LOGIN") {
        let quoted: Vec<&str> = m.split('\'').skip(1).step_by(2).collect();
        let tty = quoted.first().map(|t| t.trim_start_matches("/dev/"));
        let user = quoted.get(1)?;
        return Some(Event::AccessLoginFailed(AccessLoginFailed {
            user: user.to_string(),
            method: method_of("login", tty).into(),
            remote_addr: None,
            reason: m.rsplit_once(", ").map(|(_, r)| r.to_string()),
            source: source.into(),
        }));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Option<Event> {
        let (program, _, message) = split_syslog_line(line)?;
        parse_message(program, message, "auth-log")
    }

    #[test]
    fn syslog_lines_split_in_both_timestamp_styles() {
        assert_eq!(
            split_syslog_line("Nov 22 05:53:00 ws1 sshd[812]: Accepted publickey for root"),
            Some(("sshd", Some(812), "Accepted publickey for root"))
        );
        assert_eq!(
            split_syslog_line(
                "2026-11-22T05:53:00.123456+08:00 ws1 sudo:    alice : TTY=pts/0 ; USER=root ; COMMAND=/usr/bin/id"
            ),
            Some(("sudo", None, "   alice : TTY=pts/0 ; USER=root ; COMMAND=/usr/bin/id"))
        );
        assert_eq!(split_syslog_line("garbage"), None);
    }

    #[test]
    fn ssh_logins_failures_and_logouts() {
        let Some(Event::AccessLogin(l)) = parse(
            "2026-11-22T05:53:00+00:00 srv sshd[901]: Accepted publickey for root from 10.77.0.1 port 40000 ssh2: ED25519 SHA256:abc",
        ) else {
            panic!()
        };
        assert_eq!((l.user.as_str(), l.method.as_str()), ("root", "ssh"));
        assert_eq!(l.remote_addr.as_deref(), Some("10.77.0.1"));
        assert_eq!(l.session_id.as_deref(), Some("ssh:10.77.0.1:40000"));
        let Some(Event::AccessLoginFailed(f)) = parse(
            "Nov 22 05:53:01 srv sshd[902]: Failed password for invalid user bob from 10.0.0.5 port 2222 ssh2",
        ) else {
            panic!()
        };
        assert_eq!(
            (f.user.as_str(), f.remote_addr.as_deref()),
            ("bob", Some("10.0.0.5"))
        );
        assert_eq!(f.reason.as_deref(), Some("password: no such user"));
        let Some(Event::AccessLoginFailed(f)) = parse(
            "Nov 22 05:53:01 srv sshd[903]: Failed publickey for root from 10.77.0.1 port 40002 ssh2: ED25519 SHA256:x",
        ) else {
            panic!()
        };
        assert_eq!(f.reason.as_deref(), Some("publickey rejected"));
        assert!(matches!(
            parse("Nov 22 05:54:00 srv sshd[901]: pam_unix(sshd:session): session closed for user root"),
            Some(Event::AccessLogout(o)) if o.user == "root"
        ));
        let Some(Event::AccessLogout(o)) = parse(
            "Nov 22 05:54:00 srv sshd[901]: Disconnected from user root 10.77.0.1 port 40000",
        ) else {
            panic!()
        };
        assert_eq!(
            o.session_id.as_deref(),
            Some("ssh:10.77.0.1:40000"),
            "pairs with the login"
        );
        // The "Invalid user" line precedes the "Failed" one for the same attempt.
        assert_eq!(
            parse("Nov 22 05:53:01 srv sshd[902]: Invalid user bob from 10.0.0.5 port 2222"),
            None
        );
    }

    #[test]
    fn sudo_and_su_with_their_outcome() {
        let Some(Event::AccessPrivilege(p)) = parse(
            "Nov 22 05:55:00 srv sudo:    alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; COMMAND=/usr/bin/id -u",
        ) else {
            panic!()
        };
        assert_eq!(
            (p.user.as_str(), p.target_user.as_str(), p.success),
            ("alice", "root", true)
        );
        assert_eq!(
            (p.command.as_deref(), p.tty.as_deref()),
            (Some("/usr/bin/id -u"), Some("pts/0"))
        );
        let Some(Event::AccessPrivilege(p)) = parse(
            "Nov 22 05:55:09 srv sudo:    alice : 3 incorrect password attempts ; TTY=pts/0 ; PWD=/home/alice ; USER=root ; COMMAND=/usr/bin/id",
        ) else {
            panic!()
        };
        assert!(!p.success);
        let Some(Event::AccessPrivilege(p)) =
            parse("Nov 22 05:55:09 srv sudo:      bob : user NOT in sudoers ; TTY=pts/1 ; PWD=/ ; USER=root ; COMMAND=/bin/sh")
        else {
            panic!()
        };
        assert!(!p.success && p.user == "bob");
        let Some(Event::AccessPrivilege(p)) =
            parse("Nov 22 05:56:00 srv su[1200]: (to root) alice on pts/0")
        else {
            panic!()
        };
        assert_eq!(
            (p.tool.as_str(), p.target_user.as_str(), p.success),
            ("su", "root", true)
        );
        let Some(Event::AccessPrivilege(p)) =
            parse("Nov 22 05:56:05 srv su[1201]: FAILED SU (to root) alice on pts/0")
        else {
            panic!()
        };
        assert!(!p.success && p.tty.as_deref() == Some("pts/0"));
        // As rsyslog on Debian 12 wrote it for `sudo -u nobody true` without a terminal.
        let Some(Event::AccessPrivilege(p)) = parse(
            "2026-11-22T06:20:09.851116+00:00 vm sudo:     root : PWD=/work/main ; USER=nobody ; COMMAND=/usr/bin/true",
        ) else {
            panic!()
        };
        assert_eq!(
            (p.user.as_str(), p.target_user.as_str(), p.success, p.tty),
            ("root", "nobody", true, None)
        );
        // A sudo line without a command (e.g. a PAM notice) is not a privilege use.
        assert_eq!(parse("Nov 22 05:55:00 srv sudo: pam_unix(sudo:session): session opened for user root(uid=0) by alice(uid=1000)"), None);
    }

    #[test]
    fn console_logins() {
        let Some(Event::AccessLogin(l)) = parse(
            "Nov 22 06:00:00 srv login[700]: pam_unix(login:session): session opened for user alice(uid=1000) by LOGIN(uid=0)",
        ) else {
            panic!()
        };
        assert_eq!(
            (l.user.as_str(), l.uid, l.method.as_str()),
            ("alice", Some(1000), "console")
        );
        let Some(Event::AccessLoginFailed(f)) = parse(
            "Nov 22 06:00:10 srv login[701]: FAILED LOGIN (1) on '/dev/tty1' FOR 'mallory', Authentication failure",
        ) else {
            panic!()
        };
        assert_eq!((f.user.as_str(), f.method.as_str()), ("mallory", "console"));
        assert_eq!(f.reason.as_deref(), Some("Authentication failure"));
        assert_eq!(
            parse(
                "Nov 22 06:00:10 srv cron[5]: pam_unix(cron:session): session opened for user root"
            ),
            None
        );
    }
}
