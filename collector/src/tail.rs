//! `weilan-collector tail`: follow the alert log, for people (coloured by level) or
//! machines (`--json`), with filters, a start time (`--since`, reading rotated files
//! too) and a summary mode. Survives rotation and truncation of the file: the old
//! file is read to its end before the new one is followed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
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
    /// Only alerts from this time on; rotated files are read too.
    pub since: Option<jiff::Timestamp>,
    /// Print counts by level, rule and agent instead of the alerts (no following).
    pub summary: bool,
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
            && self.since.is_none_or(|t| a.time >= t)
    }
}

/// Parses `--since`: a time (`2026-11-21T08:00:00Z`, `2026-11-21 08:00` in the
/// local zone) or a span back from now (`30m`, `2h`, `7d`).
pub fn parse_since(s: &str) -> Result<jiff::Timestamp, String> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    if let Ok(dt) = s.parse::<jiff::civil::DateTime>() {
        return dt
            .to_zoned(jiff::tz::TimeZone::system())
            .map(|z| z.timestamp())
            .map_err(|e| e.to_string());
    }
    let span: jiff::Span = s.parse().map_err(|_| {
        format!("`{s}`: expected a time (2026-11-21T08:00:00Z) or a span (30m, 2h, 7d)")
    })?;
    jiff::Zoned::now()
        .checked_sub(span)
        .map(|z| z.timestamp())
        .map_err(|e| e.to_string())
}

/// Formats one alert for a person.
pub fn human(a: &Alert, color: bool) -> String {
    let (on, off) = match (color, a.level) {
        (false, _) => ("", ""),
        (true, Level::Red) => ("\x1b[1;31m", "\x1b[0m"),
        (true, Level::Yellow) => ("\x1b[33m", "\x1b[0m"),
        (true, Level::Blue) => ("\x1b[34m", "\x1b[0m"),
    };
    let repeats = if a.count > 1 {
        format!(
            "  ×{} until {}",
            a.count,
            a.last_seen.strftime("%Y-%m-%d %H:%M:%S")
        )
    } else {
        String::new()
    };
    format!(
        "{} {on}{:<6}{off} {} [{}] {}{}{repeats}  (events: {})",
        a.time.strftime("%Y-%m-%d %H:%M:%S"),
        a.level.as_str().to_uppercase(),
        a.agent_id,
        a.rule_id,
        if a.update { "(update) " } else { "" },
        a.summary,
        a.event_ids.join(", ")
    )
}

/// Counts of the selected alerts.
#[derive(Default)]
struct Summary {
    by_level: BTreeMap<String, u64>,
    by_rule: BTreeMap<String, u64>,
    by_agent: BTreeMap<String, u64>,
    first: Option<jiff::Timestamp>,
    last: Option<jiff::Timestamp>,
    /// Alert id → repeats folded into it (from its latest update line).
    repeats: BTreeMap<i64, u64>,
}

impl Summary {
    fn add(&mut self, a: &Alert) {
        if a.update {
            // Not another alert: a later count for one already counted.
            self.repeats.insert(a.alert_id, a.count.saturating_sub(1));
            return;
        }
        *self
            .by_level
            .entry(a.level.as_str().to_string())
            .or_default() += 1;
        *self.by_rule.entry(a.rule_id.clone()).or_default() += 1;
        *self.by_agent.entry(a.agent_id.clone()).or_default() += 1;
        self.first = Some(self.first.map_or(a.time, |f| f.min(a.time)));
        self.last = Some(self.last.map_or(a.time, |l| l.max(a.time)));
    }

    fn print(&self, out: &mut impl Write) -> io::Result<()> {
        let total: u64 = self.by_level.values().sum();
        match (self.first, self.last) {
            (Some(f), Some(l)) => {
                let folded: u64 = self.repeats.values().sum();
                writeln!(out, "{total} alerts from {f} to {l}")?;
                if folded > 0 {
                    writeln!(
                        out,
                        "{folded} further matches folded into them by suppression"
                    )?;
                }
            }
            _ => writeln!(out, "no alerts")?,
        }
        for (title, map) in [
            ("level", &self.by_level),
            ("rule", &self.by_rule),
            ("agent", &self.by_agent),
        ] {
            if map.is_empty() {
                continue;
            }
            writeln!(out, "by {title}:")?;
            let mut rows: Vec<(&String, &u64)> = map.iter().collect();
            rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (k, n) in rows {
                writeln!(out, "  {n:>8}  {k}")?;
            }
        }
        Ok(())
    }
}

/// Reads the complete lines available; `Ok(true)` when there were any.
fn drain(
    r: &mut BufReader<File>,
    partial: &mut String,
    opts: &TailOptions,
    out: &mut impl Write,
    summary: &mut Summary,
) -> io::Result<bool> {
    let mut progressed = false;
    loop {
        let n = r.read_line(partial)?;
        if n == 0 || !partial.ends_with('\n') {
            return Ok(progressed); // at the end, or the writer is mid-line
        }
        progressed = true;
        let line = partial.trim_end();
        match serde_json::from_str::<Alert>(line) {
            Ok(a) if opts.accepts(&a) => {
                if opts.summary {
                    summary.add(&a);
                } else if opts.json {
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

/// Rotated files (`NAME.N` … `NAME.1`) written to at or after `since`, oldest first.
fn rotated_since(path: &Path, since: jiff::Timestamp) -> Vec<PathBuf> {
    let since: std::time::SystemTime = since.into();
    let mut out = Vec::new();
    for n in 1.. {
        let p = crate::alerts::rotated(path, n);
        let Ok(m) = std::fs::metadata(&p) else { break };
        if m.modified().is_ok_and(|t| t >= since) {
            out.push(p);
        }
    }
    out.reverse();
    out
}

/// Prints matching alerts; with `follow`, keeps going until `stop()` returns true.
pub fn tail(opts: &TailOptions, out: &mut impl Write, stop: impl Fn() -> bool) -> io::Result<()> {
    let mut summary = Summary::default();
    let mut partial = String::new();
    if let Some(since) = opts.since {
        for p in rotated_since(&opts.path, since) {
            let mut r = BufReader::new(File::open(&p)?);
            drain(&mut r, &mut partial, opts, out, &mut summary)?;
            partial.clear();
        }
    }
    let follow = opts.follow && !opts.summary;
    let mut reader: Option<(BufReader<File>, u64)> = None;
    loop {
        if reader.is_none() {
            match File::open(&opts.path) {
                Ok(f) => {
                    let ino = f.metadata()?.ino();
                    reader = Some((BufReader::new(f), ino));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && follow => {}
                Err(e) => return Err(e),
            }
        }
        let progressed = match reader.as_mut() {
            Some((r, _)) => drain(r, &mut partial, opts, out, &mut summary)?,
            None => false,
        };
        out.flush()?;
        if !follow {
            if opts.summary {
                summary.print(out)?;
                out.flush()?;
            }
            return Ok(());
        }
        if stop() {
            return Ok(());
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(250));
            // Rotated (new inode) or truncated: finish the old file (lines written
            // just before the rotation), then start over on the new one.
            if let Some((r, ino)) = reader.as_mut() {
                let pos = r.stream_position()?;
                match std::fs::metadata(&opts.path) {
                    Ok(m) if m.ino() != *ino => {
                        drain(r, &mut partial, opts, out, &mut summary)?;
                        reader = None;
                        partial.clear();
                    }
                    Ok(m) if m.len() < pos => {
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
            title: String::new(),
            tags: vec![],
            key: agent.into(),
            count: 1,
            last_seen: jiff::Timestamp::UNIX_EPOCH,
            update: false,
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
            since: None,
            summary: false,
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

    fn line(a: &Alert) -> String {
        format!("{}\n", serde_json::to_string(a).unwrap())
    }

    fn at(secs: i64, level: Level, agent: &str, rule: &str) -> Alert {
        Alert {
            time: jiff::Timestamp::from_second(secs).unwrap(),
            rule_id: rule.into(),
            ..alert(level, agent)
        }
    }

    fn opts(path: PathBuf) -> TailOptions {
        TailOptions {
            path,
            follow: false,
            json: true,
            min_level: None,
            agent: None,
            rule: None,
            since: None,
            summary: false,
            color: false,
        }
    }

    #[test]
    fn since_reads_rotated_files_oldest_first_and_summary_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let old = dir.path().join("alerts.jsonl.2");
        let mid = dir.path().join("alerts.jsonl.1");
        std::fs::write(&old, line(&at(100, Level::Red, "a", "r1"))).unwrap();
        std::fs::write(&mid, line(&at(200, Level::Yellow, "b", "r2"))).unwrap();
        // An update line (alert 1 repeated 5 times) is not a fifth alert.
        let update = Alert {
            count: 5,
            update: true,
            ..at(300, Level::Red, "a", "r1")
        };
        std::fs::write(
            &path,
            line(&at(300, Level::Red, "a", "r1"))
                + &line(&at(400, Level::Blue, "c", "r3"))
                + &line(&update),
        )
        .unwrap();
        let mut o = opts(path.clone());
        o.since = Some(jiff::Timestamp::from_second(150).unwrap());
        let mut out = Vec::new();
        tail(&o, &mut out, || true).unwrap();
        let times: Vec<i64> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Alert>(l).unwrap().time.as_second())
            .collect();
        assert_eq!(
            times,
            vec![200, 300, 400, 300],
            "rotated first, then current; before --since left out"
        );

        o.since = Some(jiff::Timestamp::UNIX_EPOCH);
        o.summary = true;
        o.follow = true; // summary never follows
        let mut out = Vec::new();
        tail(&o, &mut out, || false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("4 alerts from 1970-01-01T00:01:40Z"),
            "{text}"
        );
        assert!(text.contains("       2  red\n"), "{text}");
        assert!(
            text.contains("4 further matches folded into them by suppression"),
            "{text}"
        );
        assert!(
            text.contains("       2  r1\n") && text.contains("       2  a\n"),
            "{text}"
        );
    }

    #[test]
    fn since_takes_times_and_spans() {
        assert_eq!(
            parse_since("2026-11-21T08:00:00Z").unwrap(),
            "2026-11-21T08:00:00Z".parse::<jiff::Timestamp>().unwrap()
        );
        let two_hours_ago = parse_since("2h").unwrap();
        let d = jiff::Timestamp::now().duration_since(two_hours_ago);
        assert!((d.as_secs() - 7200).abs() < 60, "{d:?}");
        assert!(parse_since("7d").is_ok() && parse_since("2026-11-21 08:00").is_ok());
        assert!(parse_since("yesterday-ish")
            .unwrap_err()
            .contains("expected a time"));
    }

    #[test]
    fn following_across_a_rotation_loses_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        std::fs::write(&path, line(&at(1, Level::Red, "a", "r"))).unwrap();
        let o = opts(path.clone());
        let o = TailOptions { follow: true, ..o };
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (o2, out2, done2) = (o.clone(), out.clone(), done.clone());
        let t = std::thread::spawn(move || {
            tail(&o2, &mut Shared(out2), || {
                done2.load(std::sync::atomic::Ordering::Relaxed)
            })
        });
        let count = || {
            String::from_utf8(out.lock().unwrap().clone())
                .unwrap()
                .lines()
                .count()
        };
        while count() < 1 {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A last line into the old file, then rotation and a line in the new file.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(line(&at(2, Level::Red, "a", "r")).as_bytes())
            .unwrap();
        std::fs::rename(&path, crate::alerts::rotated(&path, 1)).unwrap();
        std::fs::write(&path, line(&at(3, Level::Red, "a", "r"))).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap().unwrap();
        let times: Vec<i64> = String::from_utf8(out.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Alert>(l).unwrap().time.as_second())
            .collect();
        assert_eq!(times, vec![1, 2, 3]);
    }
}
