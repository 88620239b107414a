//! `weilan-collector tail`: follow the alert log, for people (coloured by level) or
//! machines (`--json`), with filters. Survives rotation and truncation of the file.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::rules::Level;
use crate::store::Alert;

#[derive(Debug, Clone)]
pub struct TailOptions {
    pub path: PathBuf,
    /// Keep following new lines (like `tail -f`).
    pub follow: bool,
    /// Print the JSON lines unchanged.
    pub json: bool,
    /// Only alerts at this level or above.
    pub min_level: Option<Level>,
    pub agent: Option<String>,
    pub rule: Option<String>,
    /// ANSI colours.
    pub color: bool,
}

impl TailOptions {
    fn accepts(&self, a: &Alert) -> bool {
        self.min_level.is_none_or(|l| a.level >= l)
            && self.agent.as_ref().is_none_or(|g| *g == a.agent_id)
            && self
                .rule
                .as_ref()
                .is_none_or(|r| a.rule_id.starts_with(r.as_str()))
    }
}

/// Formats one alert for a person.
pub fn human(a: &Alert, color: bool) -> String {
    let (on, off) = match (color, a.level) {
        (false, _) => ("", ""),
        (true, Level::Red) => ("\x1b[1;31m", "\x1b[0m"),
        (true, Level::Yellow) => ("\x1b[33m", "\x1b[0m"),
        (true, Level::Blue) => ("\x1b[34m", "\x1b[0m"),
    };
    format!(
        "{} {on}{:<6}{off} {} [{}] {}  (events: {})",
        a.time.strftime("%Y-%m-%d %H:%M:%S"),
        a.level.as_str().to_uppercase(),
        a.agent_id,
        a.rule_id,
        a.summary,
        a.event_ids.join(", ")
    )
}

/// Prints matching alerts; with `follow`, keeps going until `stop()` returns true.
pub fn tail(opts: &TailOptions, out: &mut impl Write, stop: impl Fn() -> bool) -> io::Result<()> {
    let mut reader: Option<(BufReader<File>, u64)> = None;
    let mut partial = String::new();
    loop {
        if reader.is_none() {
            match File::open(&opts.path) {
                Ok(f) => {
                    let ino = f.metadata()?.ino();
                    reader = Some((BufReader::new(f), ino));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && opts.follow => {}
                Err(e) => return Err(e),
            }
        }
        let mut progressed = false;
        if let Some((r, _)) = reader.as_mut() {
            loop {
                let n = r.read_line(&mut partial)?;
                if n == 0 {
                    break;
                }
                if !partial.ends_with('\n') {
                    break; // the writer is mid-line; finish it on the next read
                }
                progressed = true;
                let line = partial.trim_end();
                match serde_json::from_str::<Alert>(line) {
                    Ok(a) if opts.accepts(&a) => {
                        if opts.json {
                            writeln!(out, "{line}")?;
                        } else {
                            writeln!(out, "{}", human(&a, opts.color))?;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("weilan-collector tail: skipping a malformed line: {e}"),
                }
                partial.clear();
            }
        }
        out.flush()?;
        if !opts.follow {
            return Ok(());
        }
        if stop() {
            return Ok(());
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(250));
            // Rotated (new inode) or truncated: start over on the new file.
            if let Some((r, ino)) = reader.as_mut() {
                let pos = r.stream_position()?;
                match std::fs::metadata(&opts.path) {
                    Ok(m) if m.ino() != *ino || m.len() < pos => {
                        reader = None;
                        partial.clear();
                    }
                    Ok(_) => {}
                    Err(_) => reader = None,
                }
            }
        }
    }
}

/// Opens at the end of the file (for `tail -f` without history).
pub fn skip_to_end(path: &std::path::Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(level: Level, agent: &str) -> Alert {
        Alert {
            alert_id: 1,
            time: jiff::Timestamp::UNIX_EPOCH,
            level,
            rule_id: "builtin.usb.unknown-storage".into(),
            agent_id: agent.into(),
            summary: "Unknown USB storage".into(),
            event_ids: vec![format!("{agent}:1:1")],
            details: serde_json::json!({}),
        }
    }

    #[test]
    fn filters_by_level_agent_and_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let mut text = String::new();
        for a in [
            alert(Level::Red, "a"),
            alert(Level::Blue, "a"),
            alert(Level::Red, "b"),
        ] {
            text.push_str(&serde_json::to_string(&a).unwrap());
            text.push('\n');
        }
        text.push_str("not json\n");
        std::fs::write(&path, text).unwrap();
        let mut opts = TailOptions {
            path,
            follow: false,
            json: false,
            min_level: Some(Level::Yellow),
            agent: Some("a".into()),
            rule: Some("builtin.usb".into()),
            color: false,
        };
        let mut out = Vec::new();
        tail(&opts, &mut out, || true).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.contains("RED") && out.contains(" a [builtin.usb.unknown-storage]"),
            "{out}"
        );
        opts.min_level = None;
        opts.agent = None;
        opts.json = true;
        let mut out = Vec::new();
        tail(&opts, &mut out, || true).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 3);
    }
}
