//! Scheduled exports: each schedule exports the previous day, week (Monday to Monday)
//! or calendar month once its time of day has passed in its time zone. Periods the
//! collector missed while it was down are produced at the next start — oldest first,
//! at most 31 — and marked `caught_up` in their manifest and in an alert.
//! Retention: exports beyond `keep` per schedule are deleted (their manifest hashes
//! stay in the database, so the chain's record is not lost), and events older than
//! `events_keep_days` are pruned (rows and heartbeat blocks alike). Heartbeats older than
//! `heartbeats_compact_after_secs` are compacted into blocks (`heartbeats/`) at the
//! same check.

use std::path::PathBuf;

use crate::db::{self, params, Conn, Location, Sql};
use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use weilan_config::settings::collector::{Every, ExportSettings, ScheduleSettings};

/// One export a schedule owes.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub schedule: String,
    pub from: jiff::Timestamp,
    pub to: jiff::Timestamp,
    /// When it was due.
    pub due: jiff::Timestamp,
    pub dir: PathBuf,
    /// Due more than two minutes ago: the collector was not running at the time.
    pub caught_up: bool,
}

/// The boundary (start of a period) on or before `d`.
fn boundary_on_or_before(every: Every, d: Date) -> Date {
    match every {
        Every::Day => d,
        Every::Week => d
            .checked_sub(jiff::Span::new().days(d.weekday().to_monday_zero_offset() as i64))
            .unwrap_or(d),
        Every::Month => d.first_of_month(),
    }
}

/// The boundary before boundary `b`.
fn previous(every: Every, b: Date) -> Date {
    let back = match every {
        Every::Day => jiff::Span::new().days(1),
        Every::Week => jiff::Span::new().weeks(1),
        Every::Month => jiff::Span::new().months(1),
    };
    b.checked_sub(back).unwrap_or(b)
}

fn instant(d: Date, t: Time, tz: &TimeZone) -> jiff::Timestamp {
    d.to_datetime(t)
        .to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn dir_name(s: &ScheduleSettings, from: Date) -> String {
    match s.every {
        Every::Month => format!("{}-{}", s.name, from.strftime("%Y-%m")),
        _ => format!("{}-{}", s.name, from.strftime("%Y-%m-%d")),
    }
}

/// The exports `s` owes at `now`, oldest first; `last_to` is the end of its newest
/// recorded export.
pub fn due(
    s: &ScheduleSettings,
    tz: &TimeZone,
    out: &std::path::Path,
    last_to: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> Vec<Job> {
    let today = now.to_zoned(tz.clone()).date();
    // The newest period whose due time has passed: [previous(b), b), due at b + at.
    let mut b = boundary_on_or_before(s.every, today);
    if now < instant(b, s.at, tz) {
        b = previous(s.every, b);
    }
    let mut jobs = Vec::new();
    let mut end = b;
    for _ in 0..31 {
        let start = previous(s.every, end);
        let to = instant(end, Time::midnight(), tz);
        if last_to.is_some_and(|l| to <= l) {
            break;
        }
        let due = instant(end, s.at, tz);
        jobs.push(Job {
            schedule: s.name.clone(),
            from: instant(start, Time::midnight(), tz),
            to,
            due,
            dir: out.join(dir_name(s, start)),
            caught_up: now.duration_since(due) > jiff::SignedDuration::from_secs(120),
        });
        if last_to.is_none() {
            break; // a new schedule starts with the newest period only
        }
        end = start;
    }
    jobs.reverse();
    jobs
}

/// The end of the newest export recorded for `schedule`.
pub fn last_to(conn: &impl Sql, schedule: &str) -> Result<Option<jiff::Timestamp>, db::Error> {
    let t: Option<String> = conn
        .query_opt(
            "SELECT MAX(period_to) FROM exports WHERE schedule = ?1",
            params![schedule],
            |r| r.get(0),
        )?
        .flatten();
    Ok(t.and_then(|t| t.parse().ok()))
}

/// Deletes the events received before `cutoff` row by row, 10 000 at a time, so
/// that ingest is never locked out for long; returns how many.
pub fn delete_events_before(conn: &Conn, cutoff: &str) -> Result<u64, crate::store::StoreError> {
    let mut removed = 0;
    loop {
        let n = conn.execute(
            conn.pick(
                "DELETE FROM events WHERE event_id IN
                   (SELECT event_id FROM events WHERE received_at < ?1 LIMIT 10000)",
                "DELETE FROM events WHERE (event_id, received_at) IN
                   (SELECT event_id, received_at FROM events WHERE received_at < ?1 LIMIT 10000)",
            ),
            params![cutoff],
        )?;
        removed += n;
        if n == 0 {
            return Ok(removed);
        }
    }
}

/// What a retention run removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Export directories beyond `keep`.
    pub exports: usize,
    /// Events (and compacted heartbeats) older than `events_keep_days`, in all.
    pub events: u64,
    /// Of them, the months dropped whole (PostgreSQL's partitions).
    pub partitions: Vec<crate::partitions::Dropped>,
}

/// Removes export directories beyond `keep` per schedule and events older than
/// `events_keep_days`: on PostgreSQL every month entirely before the cutoff is
/// dropped as a partition (partitions.rs); the rest before it — the month that
/// straddles it, and everything on SQLite — is deleted in slices.
pub fn retention(
    conn: &mut Conn,
    settings: &ExportSettings,
    now: jiff::Timestamp,
) -> Result<Removed, crate::store::StoreError> {
    let mut removed = Removed::default();
    if settings.keep > 0 {
        for s in &settings.schedules {
            let old: Vec<String> = conn.query_map(
                conn.pick(
                    "SELECT dir FROM exports WHERE schedule = ?1 ORDER BY period_to DESC LIMIT -1 OFFSET ?2",
                    "SELECT dir FROM exports WHERE schedule = ?1 ORDER BY period_to DESC OFFSET ?2",
                ),
                params![s.name, settings.keep],
                |r| r.get(0),
            )?;
            for dir in old {
                if std::path::Path::new(&dir).exists() {
                    match std::fs::remove_dir_all(&dir) {
                        Ok(()) => removed.exports += 1,
                        Err(e) => tracing::warn!(dir, error = %e, "old export not removed"),
                    }
                }
            }
        }
    }
    if settings.events_keep_days > 0 {
        let cutoff = (now
            - jiff::SignedDuration::from_hours(24 * settings.events_keep_days as i64))
        .to_string();
        removed.partitions = crate::partitions::drop_older_than(conn, &cutoff)?;
        removed.events = removed.partitions.iter().map(|p| p.events).sum();
        removed.events += delete_events_before(conn, &cutoff)?;
        removed.events += crate::heartbeats::prune(&*conn, &cutoff)?;
    }
    Ok(removed)
}

/// Produces every export the schedules owe now and applies retention; returns the
/// findings to alert on (exports caught up late, exports that failed).
pub fn run(
    settings: &weilan_config::settings::collector::CollectorSettings,
    signer: &weilan_config::signing::Signer,
    rules: &crate::rules::RuleSet,
    now: jiff::Timestamp,
) -> Vec<crate::rules::Finding> {
    use crate::rules::{findings, Finding};
    let ex = &settings.exports;
    let mut found = Vec::new();
    let failed = |what: String, error: String| Finding {
        kind: findings::EXPORT_FAILED,
        agent_id: "(collector)".into(),
        summary: format!("{what} failed: {error}"),
        event_ids: vec![],
        details: serde_json::json!({"error": error}),
    };
    let location = Location::of(settings);
    // PostgreSQL's monthly partitions are made ahead on this tick whatever else is
    // configured (partitions.rs).
    if ex.schedules.is_empty()
        && ex.events_keep_days == 0
        && ex.heartbeats_compact_after.is_none()
        && location.engine() == db::Engine::Sqlite
    {
        return found;
    }
    let mut conn = match Conn::open(&location) {
        Ok(c) => c,
        Err(e) => {
            return vec![failed(
                "opening the database for exports".into(),
                e.to_string(),
            )]
        }
    };
    if let Some(sqlite) = conn.sqlite() {
        let _ = sqlite.busy_timeout(std::time::Duration::from_secs(10));
    }
    if let Err(e) = crate::partitions::maintain(&mut conn, now) {
        found.push(failed("creating monthly partitions".into(), e.to_string()));
    }
    let lang = super::Lang::parse(&ex.language).unwrap_or(super::Lang::Zh);
    for s in &ex.schedules {
        let last = match last_to(&conn, &s.name) {
            Ok(l) => l,
            Err(e) => {
                found.push(failed(format!("schedule {}", s.name), e.to_string()));
                continue;
            }
        };
        for job in due(s, &ex.timezone, &ex.dir, last, now) {
            let what = format!("export {} ({} to {})", job.dir.display(), job.from, job.to);
            if let Err(e) = std::fs::create_dir_all(&ex.dir) {
                found.push(failed(what, format!("{}: {e}", ex.dir.display())));
                break;
            }
            let scope = super::scope(&location, rules, s.agents.clone(), s.group.clone());
            let result = scope.and_then(|(agents, label)| {
                super::export(
                    &location,
                    signer,
                    rules,
                    &super::Request {
                        from: job.from,
                        to: job.to,
                        tz: ex.timezone.clone(),
                        agents,
                        scope_label: label,
                        lang,
                        dir: job.dir.clone(),
                        schedule: Some(s.name.clone()),
                        caught_up: job.caught_up,
                        heartbeats_in_csv: false,
                    },
                    &mut |_, _| {},
                )
            });
            match result {
                Ok(sum) => {
                    tracing::info!(schedule = %s.name, dir = %sum.dir.display(), events = sum.events, alerts = sum.alerts, caught_up = job.caught_up, "export written");
                    if job.caught_up {
                        found.push(Finding {
                            kind: findings::EXPORT_CAUGHT_UP,
                            agent_id: "(collector)".into(),
                            summary: format!(
                                "Export {} of schedule {} was due at {} and made late, at {} (the collector was not running); {} events, {} alerts",
                                sum.dir.display(), s.name, job.due, now, sum.events, sum.alerts
                            ),
                            event_ids: vec![],
                            details: serde_json::json!({"schedule": s.name, "due": job.due, "from": job.from, "to": job.to}),
                        });
                    }
                }
                Err(e) => {
                    tracing::error!(schedule = %s.name, error = %e, "export failed; retried at the next check");
                    found.push(failed(what, e.to_string()));
                    break; // keep the chain in period order
                }
            }
        }
    }
    found.extend(
        keep_storage(&mut conn, ex, now)
            .into_iter()
            .map(|(what, error)| failed(what.into(), error)),
    );
    found
}

/// Retention, then heartbeat compaction, on the leader's tick; what failed, as
/// (what, error), for the caller's findings.
fn keep_storage(
    conn: &mut Conn,
    ex: &ExportSettings,
    now: jiff::Timestamp,
) -> Vec<(&'static str, String)> {
    let mut failed = Vec::new();
    match retention(conn, ex, now) {
        Ok(r) if r == Removed::default() => {}
        Ok(r) => tracing::info!(
            exports = r.exports,
            events = r.events,
            months_dropped = r.partitions.len(),
            "retention applied"
        ),
        Err(e) => failed.push(("retention", e.to_string())),
    }
    if let Some(age) = ex.heartbeats_compact_after {
        let cutoff = (now - jiff::SignedDuration::try_from(age).unwrap_or_default()).to_string();
        match crate::heartbeats::compact(conn, &cutoff) {
            Ok(c) if c.heartbeats == 0 => {}
            Ok(c) => tracing::info!(
                heartbeats = c.heartbeats,
                blocks = c.blocks,
                kept_as_rows = c.kept_as_rows,
                "heartbeats compacted"
            ),
            Err(e) => failed.push(("heartbeat compaction", e.to_string())),
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(every: Every) -> ScheduleSettings {
        ScheduleSettings {
            name: "s".into(),
            every,
            at: jiff::civil::time(1, 0, 0, 0),
            agents: None,
            group: None,
        }
    }

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn daily_weekly_monthly_periods_in_the_schedules_zone() {
        let tz = TimeZone::get("Asia/Shanghai").unwrap();
        let out = std::path::Path::new("/x");
        // Sunday 2026-11-22 03:00 Shanghai (19:00 UTC the day before).
        let now = ts("2026-11-21T19:00:00Z");
        let d = due(&schedule(Every::Day), &tz, out, None, now);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].from, d[0].to),
            (ts("2026-11-20T16:00:00Z"), ts("2026-11-21T16:00:00Z"))
        );
        assert_eq!(d[0].dir, out.join("s-2026-11-21"));
        assert!(d[0].caught_up, "due at 01:00, now 03:00");
        // Before 01:00 yesterday is not due yet: the day before is the newest.
        let early = due(
            &schedule(Every::Day),
            &tz,
            out,
            None,
            ts("2026-11-21T16:30:00Z"),
        );
        assert_eq!(early[0].to, ts("2026-11-20T16:00:00Z"));
        // Weeks run Monday to Monday: on Sunday the week before last is the newest due.
        let w = due(&schedule(Every::Week), &tz, out, None, now);
        assert_eq!(
            (w[0].from, w[0].to),
            (ts("2026-11-08T16:00:00Z"), ts("2026-11-15T16:00:00Z"))
        );
        let m = due(&schedule(Every::Month), &tz, out, None, now);
        assert_eq!(
            (m[0].from, m[0].to),
            (ts("2026-09-30T16:00:00Z"), ts("2026-10-31T16:00:00Z"))
        );
        assert_eq!(m[0].dir, out.join("s-2026-10"));
    }

    #[test]
    fn missed_periods_are_caught_up_oldest_first_and_done_ones_are_not_repeated() {
        let tz = TimeZone::UTC;
        let out = std::path::Path::new("/x");
        let now = ts("2026-11-22T01:00:30Z");
        // The last export covered up to the 19th: the 19th, 20th and 21st are owed.
        let d = due(
            &schedule(Every::Day),
            &tz,
            out,
            Some(ts("2026-11-19T00:00:00Z")),
            now,
        );
        let froms: Vec<_> = d.iter().map(|j| j.from.to_string()).collect();
        assert_eq!(
            froms,
            [
                "2026-11-19T00:00:00Z",
                "2026-11-20T00:00:00Z",
                "2026-11-21T00:00:00Z"
            ]
        );
        assert_eq!(
            d.iter().map(|j| j.caught_up).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(due(
            &schedule(Every::Day),
            &tz,
            out,
            Some(ts("2026-11-22T00:00:00Z")),
            now
        )
        .is_empty());
    }
}
