//! Compliance exports: for a period and a scope of agents, `events.csv`/`.jsonl`,
//! `alerts.csv`/`.jsonl`, `report.html`, and `manifest.json` listing every file with
//! its SHA-256, signed by the collector's certificate (`manifest.sig`, detached) and
//! chained to the previous export by that export's manifest hash.
//!
//! An export streams from one read transaction (a consistent snapshot; the collector
//! keeps writing), so memory stays bounded whatever the period: rows go straight to
//! the files through a hashing writer, and the report keeps only counters keyed by
//! agent, user, device and day, and at most 500 rows per table. It is written into
//! `NAME.partial` and renamed when complete, then recorded in the `exports` table
//! (the chain's next link). Events belong to the export of the period in which the
//! collector *received* them, so a backlog delivered late is in the next export
//! instead of being missed by one already signed.

pub mod report;
pub mod schedule;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::db::{self, params, Conn, Location, Sql, Tx};
use askama::Template;
use serde_json::Value as Json;
use weilan_config::signing::Signer;
use weilan_config::wire::Purpose;

use crate::rules::{Level, RuleSet};
pub use report::Lang;
use report::{AlertRow, DeviceRow, FileRow, MappingRow, TransferRow, UnlockRow};

/// Rows listed per report table (the CSV files have all of them).
const MAX_ROWS: usize = 500;
/// Distinct keys counted per top-N chart or USB table before further ones are lumped.
const MAX_KEYS: usize = 100_000;
/// The manifest format.
pub const FORMAT: &str = "weilan-export/1";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] db::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("report: {0}")]
    Render(#[from] askama::Error),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct Request {
    pub from: jiff::Timestamp,
    pub to: jiff::Timestamp,
    /// Zone for days in the report and the period as printed.
    pub tz: jiff::tz::TimeZone,
    /// `None`: every agent.
    pub agents: Option<Vec<String>>,
    /// How the scope was asked for (`group finance`, `agents a, b`), for the report.
    pub scope_label: Option<String>,
    pub lang: Lang,
    /// The export's own directory (must not exist yet).
    pub dir: PathBuf,
    /// The schedule that made it, if any.
    pub schedule: Option<String>,
    /// Made late, at start, for a time the collector was down.
    pub caught_up: bool,
    /// Heartbeats get a row in events.csv too (by default they are only in
    /// events.jsonl and counted: a fleet's heartbeats are most of its rows, 2 880 per
    /// agent-day, and a spreadsheet holds about a million).
    pub heartbeats_in_csv: bool,
}

/// What an export produced.
#[derive(Debug, Clone)]
pub struct Summary {
    pub dir: PathBuf,
    pub events: u64,
    pub alerts: u64,
    pub manifest_sha256: String,
    pub previous: Option<String>,
}

/// A writer that hashes what passes through it.
struct Hashing<W: Write> {
    inner: W,
    digest: ring::digest::Context,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type Out = Hashing<BufWriter<File>>;

fn create(dir: &Path, name: &str) -> Result<Out, ExportError> {
    let p = dir.join(name);
    Ok(Hashing::new(BufWriter::new(
        File::create(&p).map_err(io(&p))?,
    )))
}

/// Flushes, syncs and returns the manifest entry of one file.
fn finish(dir: &Path, name: &str, out: Out) -> Result<Json, ExportError> {
    let p = dir.join(name);
    let Hashing {
        inner,
        digest,
        bytes,
    } = out;
    let file = inner.into_inner().map_err(|e| ExportError::Io {
        path: p.display().to_string(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io(&p))?;
    Ok(serde_json::json!({
        "name": name,
        "sha256": hex::encode(digest.finish().as_ref()),
        "bytes": bytes,
    }))
}

/// UTF-8 byte-order mark: Excel opens Chinese text in a CSV correctly only with it.
const BOM: &[u8] = b"\xEF\xBB\xBF";

fn str_of<'a>(data: &'a Json, key: &str) -> &'a str {
    data.get(key).and_then(|v| v.as_str()).unwrap_or("")
}

/// Report counters and rows, filled while the rows stream past.
#[derive(Default)]
struct Agg {
    events: u64,
    /// `agent.heartbeat` events, in events.jsonl but only counted in events.csv.
    heartbeats: u64,
    alerts: u64,
    levels: [u64; 3],
    days: BTreeMap<String, [u64; 3]>,
    alerts_by_agent: HashMap<String, u64>,
    users: HashMap<String, u64>,
    devices: HashMap<String, u64>,
    usb: HashMap<(String, String, String, String), (String, u64)>,
    files: Vec<FileRow>,
    files_total: u64,
    transfers: Vec<TransferRow>,
    transfers_total: u64,
    unlocks: Vec<UnlockRow>,
    policies: BTreeMap<String, BTreeSet<String>>,
    reporting: HashSet<String>,
    failures: Vec<AlertRow>,
    integrity: Vec<AlertRow>,
    silent: Vec<AlertRow>,
}

fn bump(map: &mut HashMap<String, u64>, key: &str) {
    if key.is_empty() {
        return;
    }
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < MAX_KEYS {
        map.insert(key.to_string(), 1);
    }
}

fn push<T>(rows: &mut Vec<T>, row: impl FnOnce() -> T) {
    if rows.len() < MAX_ROWS {
        rows.push(row());
    }
}

impl Agg {
    fn event(&mut self, tz: &jiff::tz::TimeZone, agent: &str, kind: &str, time: &str, data: &Json) {
        self.events += 1;
        if !self.reporting.contains(agent) {
            self.reporting.insert(agent.to_string());
        }
        let local = local_time(tz, time);
        match kind {
            "usb.attached" => {
                let label = format!(
                    "{}:{} {}",
                    str_of(data, "vid"),
                    str_of(data, "pid"),
                    str_of(data, "serial")
                );
                bump(&mut self.devices, &label);
            }
            "usb.decision" => {
                let key = (
                    str_of(data, "target").to_string(),
                    str_of(data, "hash").to_string(),
                    agent.to_string(),
                    str_of(data, "rule_id").to_string(),
                );
                let label = format!(
                    "{}:{} {} ({})",
                    str_of(data, "vid"),
                    str_of(data, "pid"),
                    str_of(data, "serial"),
                    key.1.get(..12).unwrap_or(&key.1)
                );
                if let Some(e) = self.usb.get_mut(&key) {
                    e.1 += 1;
                } else if self.usb.len() < MAX_KEYS {
                    self.usb.insert(key.clone(), (label, 1));
                }
                if key.3.starts_with("unlock:") && key.0 != "block" {
                    push(&mut self.unlocks, || UnlockRow {
                        time: local.clone(),
                        agent: agent.into(),
                        status: format!("used ({})", key.0),
                        device: str_of(data, "serial").into(),
                        reason: str_of(data, "reason").into(),
                    });
                }
            }
            "usb.unlock" => push(&mut self.unlocks, || UnlockRow {
                time: local.clone(),
                agent: agent.into(),
                status: format!("{} ({})", str_of(data, "status"), str_of(data, "via")),
                device: format!("{} {}", str_of(data, "serial"), str_of(data, "device_hash"))
                    .trim()
                    .to_string(),
                reason: str_of(data, "reason").into(),
            }),
            "file.exported" => {
                bump(&mut self.users, str_of(data, "user"));
                let classes = data
                    .get("classification")
                    .and_then(|c| c.as_array())
                    .map(|a| {
                        a.iter()
                            .map(|c| format!("{} ×{}", str_of(c, "detector"), c["count"]))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                if !classes.is_empty() {
                    self.files_total += 1;
                    push(&mut self.files, || FileRow {
                        time: local.clone(),
                        agent: agent.into(),
                        user: str_of(data, "user").into(),
                        path: str_of(data, "path").into(),
                        classification: classes.join(", "),
                        action: format!("{} ({})", str_of(data, "action"), str_of(data, "rule_id")),
                    });
                }
            }
            "net.transfer" => {
                bump(&mut self.users, str_of(data, "user"));
                self.transfers_total += 1;
                push(&mut self.transfers, || TransferRow {
                    time: local.clone(),
                    agent: agent.into(),
                    user: str_of(data, "user").into(),
                    process: format!("{} ({})", str_of(data, "exe"), data["pid"]),
                    destination: format!("{}:{}", str_of(data, "remote_addr"), data["remote_port"]),
                    bytes: data["bytes_sent"].as_u64().unwrap_or(0),
                });
            }
            "access.login" | "access.privilege" | "net.transfer_tool" => {
                bump(&mut self.users, str_of(data, "user"));
            }
            "policy.applied" | "agent.heartbeat" | "agent.started" => {
                let v = if kind == "policy.applied" {
                    str_of(data, "version")
                } else {
                    str_of(data, "policy_version")
                };
                if !v.is_empty() {
                    let agents = self.policies.entry(v.to_string()).or_default();
                    if agents.len() < MAX_KEYS && !agents.contains(agent) {
                        agents.insert(agent.to_string());
                    }
                }
            }
            _ => {}
        }
    }

    fn alert(&mut self, tz: &jiff::tz::TimeZone, a: &crate::store::Alert) {
        self.alerts += 1;
        let i = match a.level {
            Level::Red => 0,
            Level::Yellow => 1,
            Level::Blue => 2,
        };
        self.levels[i] += 1;
        let day = a.time.to_zoned(tz.clone()).strftime("%Y-%m-%d").to_string();
        if self.days.len() < MAX_KEYS || self.days.contains_key(&day) {
            self.days.entry(day).or_default()[i] += 1;
        }
        bump(&mut self.alerts_by_agent, &a.agent_id);
        let row = || AlertRow {
            time: a
                .time
                .to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string(),
            agent: a.agent_id.clone(),
            rule: a.rule_id.clone(),
            summary: if a.count > 1 {
                format!("{} (×{})", a.summary, a.count)
            } else {
                a.summary.clone()
            },
        };
        if a.rule_id.contains("enforcement-failed") {
            push(&mut self.failures, row);
        } else if a.rule_id.starts_with("builtin.integrity.") {
            push(&mut self.integrity, row);
        } else if a.rule_id == "builtin.fleet.agent-silent" {
            push(&mut self.silent, row);
        }
    }
}

fn local_time(tz: &jiff::tz::TimeZone, t: &str) -> String {
    t.parse::<jiff::Timestamp>()
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| t.to_string())
}

fn sorted_top(map: HashMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = map.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(10);
    v
}

/// `agent_id IN (…)` for the scope, or always true.
fn scope_sql(engine: db::Engine, agents: &Option<Vec<String>>) -> (&'static str, String) {
    match (agents, engine) {
        (None, _) => ("1 = 1 OR CAST(?3 AS TEXT) IS NULL", String::new()),
        (Some(a), engine) => (
            match engine {
                db::Engine::Sqlite => "agent_id IN (SELECT value FROM json_each(?3))",
                db::Engine::Postgres => {
                    "agent_id IN (SELECT jsonb_array_elements_text(CAST(CAST(?3 AS TEXT) AS jsonb)))"
                }
            },
            serde_json::to_string(a).unwrap_or_default(),
        ),
    }
}

impl From<rusqlite::Error> for ExportError {
    fn from(e: rusqlite::Error) -> Self {
        ExportError::Sql(db::Error::Sqlite(e))
    }
}

/// Rows of `sql` mapped by `map`, each handed to `each` until it returns `false` or
/// fails (its error is the result).
fn each_row<T>(
    conn: &Tx<'_>,
    sql: &str,
    params: &[&dyn db::Param],
    map: impl FnMut(&db::Row<'_>) -> Result<T, db::Error>,
    mut each: impl FnMut(T) -> Result<bool, ExportError>,
) -> Result<(), ExportError> {
    let mut failed = None;
    conn.stream(sql, params, map, |row| match each(row) {
        Ok(more) => Ok(more),
        Err(e) => {
            failed = Some(e);
            Ok(false)
        }
    })?;
    failed.map_or(Ok(()), Err)
}

/// Resolves a scope: explicit agents, or the agents of a group (patterns from the rule
/// files matched against the agents the collector knows); with its label for the report.
pub fn scope(
    location: &Location,
    rules: &RuleSet,
    agents: Option<Vec<String>>,
    group: Option<String>,
) -> Result<(Option<Vec<String>>, Option<String>), ExportError> {
    if let Some(a) = agents {
        let label = format!("agents: {}", a.join(", "));
        return Ok((Some(a), Some(label)));
    }
    let Some(g) = group else {
        return Ok((None, None));
    };
    if !rules.has_group(&g) {
        return Err(ExportError::Invalid(format!(
            "group `{g}` is not defined in [agent_groups] of the rule files"
        )));
    }
    let conn = Conn::open_read_only(location)?;
    let known: Vec<String> = conn.query_map(
        "SELECT agent_id FROM agents ORDER BY agent_id",
        params![],
        |r| r.get(0),
    )?;
    let members = known
        .into_iter()
        .filter(|a| rules.agent_groups(a).iter().any(|x| *x == g))
        .collect();
    Ok((Some(members), Some(format!("group: {g}"))))
}

/// The chain's last link: the newest recorded export.
pub fn last_export(conn: &impl Sql) -> Result<Option<(String, String)>, db::Error> {
    conn.query_opt(
        "SELECT name, manifest_sha256 FROM exports ORDER BY id DESC LIMIT 1",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// What one export reads: one read transaction, the period and the agents in scope,
/// and the folder it writes into.
struct Period<'a, 'c> {
    conn: &'a Tx<'c>,
    dir: &'a Path,
    from: &'a str,
    to: &'a str,
    /// SQL restricting `agent_id` to the scope (`1` for every agent).
    scope: &'a str,
    scope_param: Option<&'a str>,
}

/// One stored event as the export reads it.
struct EventRow {
    id: String,
    received: String,
    agent_time: String,
    agent: String,
    role: String,
    kind: String,
    /// The stored record verbatim.
    envelope: String,
}

/// Rows handed from the reading thread to the writing one at a time; at most two
/// chunks wait in the channel, so what sits between the threads stays a few MiB.
const ROWS_PER_CHUNK: usize = 1024;

/// `events.csv` (for people; BOM for spreadsheet programs) and `events.jsonl` (the
/// stored records verbatim), streamed row by row; the manifest entries of both.
/// One thread reads the rows from the database while another formats, hashes and
/// writes them (both cores of a small server), through a bounded channel.
fn write_events(
    p: &Period<'_, '_>,
    req: &Request,
    total: u64,
    agg: &mut Agg,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<Json>, ExportError> {
    let mut csv_out = create(p.dir, "events.csv")?;
    csv_out.write_all(BOM).map_err(io(p.dir))?;
    let mut csv = csv::Writer::from_writer(csv_out);
    csv.write_record([
        "event_id",
        "received_at",
        "agent_time",
        "agent_id",
        "host_role",
        "kind",
        "user",
        "device",
        "path",
        "destination",
        "data",
    ])?;
    let jsonl = create(p.dir, "events.jsonl")?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<EventRow>>(2);
    let (dir, tz, heartbeats_in_csv) = (p.dir, &req.tz, req.heartbeats_in_csv);
    let (read, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<_, ExportError> {
            let mut jsonl = jsonl;
            for row in rx.into_iter().flatten() {
                write_event(dir, &mut csv, &mut jsonl, row, tz, heartbeats_in_csv, agg)?;
            }
            Ok((csv, jsonl))
        });
        let read = read_events(p, total, tx, progress);
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (read, written)
    });
    // A writer that failed ends the reading early: its error is the one to report.
    let (csv, jsonl) = written?;
    read?;
    let csv_out = csv.into_inner().map_err(|e| ExportError::Io {
        path: p.dir.join("events.csv").display().to_string(),
        source: e.into_error(),
    })?;
    Ok(vec![
        finish(p.dir, "events.csv", csv_out)?,
        finish(p.dir, "events.jsonl", jsonl)?,
    ])
}

/// Reads the period's events in order and hands them on in chunks; stops early if
/// the writer has gone.
fn read_events(
    p: &Period<'_, '_>,
    total: u64,
    tx: std::sync::mpsc::SyncSender<Vec<EventRow>>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ExportError> {
    let scope = p.scope;
    let sql = format!(
        "SELECT event_id, received_at, agent_time, agent_id, host_role, kind, envelope, epoch, seq FROM events
         WHERE received_at >= ?1 AND received_at < ?2 AND ({scope})
         ORDER BY received_at, agent_id, epoch, seq"
    );
    // Compacted heartbeats are merged back into their place in the same order.
    let mut heartbeats = crate::heartbeats::Merge::new(p.conn, p.from, p.to, scope, p.scope_param);
    let mut chunk = Vec::with_capacity(ROWS_PER_CHUNK);
    let mut read = 0u64;
    let mut hand_on = |row: EventRow, chunk: &mut Vec<EventRow>| -> bool {
        chunk.push(row);
        read += 1;
        if chunk.len() == ROWS_PER_CHUNK {
            let full = std::mem::replace(chunk, Vec::with_capacity(ROWS_PER_CHUNK));
            if tx.send(full).is_err() {
                return false; // the writer failed; it says why
            }
        }
        if read.is_multiple_of(10_000) {
            progress(read, total);
        }
        true
    };
    let mut writer_gone = false;
    each_row(
        p.conn,
        &sql,
        params![p.from, p.to, p.scope_param],
        |r| {
            let row = EventRow {
                id: r.get(0)?,
                received: r.get(1)?,
                agent_time: r.get(2)?,
                agent: r.get(3)?,
                role: r.get(4)?,
                kind: r.get(5)?,
                envelope: r.get(6)?,
            };
            Ok((row, r.get::<i64>(7)?, r.get::<i64>(8)?))
        },
        |(row, epoch, seq)| {
            while let Some(h) = heartbeats.next_before(&row.received, &row.agent, epoch, seq)? {
                if !hand_on(compacted_row(h), &mut chunk) {
                    writer_gone = true;
                    return Ok(false);
                }
            }
            writer_gone = !hand_on(row, &mut chunk);
            Ok(!writer_gone)
        },
    )?;
    if writer_gone {
        return Ok(());
    }
    while let Some(h) = heartbeats.next_remaining()? {
        if !hand_on(compacted_row(h), &mut chunk) {
            return Ok(());
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send(chunk);
    }
    progress(read, total);
    Ok(())
}

/// A heartbeat rebuilt from its block, as the row it was stored as.
fn compacted_row(h: crate::heartbeats::Keyed) -> EventRow {
    EventRow {
        id: format!("{}:{}:{}", h.agent_id, h.epoch, h.record.seq),
        received: h.record.received_at,
        agent_time: h.record.agent_time,
        agent: h.agent_id,
        role: h.record.host_role,
        kind: "agent.heartbeat".into(),
        envelope: h.record.envelope,
    }
}

/// One event's CSV row (with the fields people look for) and its JSON line.
fn write_event(
    dir: &Path,
    csv: &mut csv::Writer<Out>,
    jsonl: &mut Out,
    row: EventRow,
    tz: &jiff::tz::TimeZone,
    heartbeats_in_csv: bool,
    agg: &mut Agg,
) -> Result<(), ExportError> {
    let env: Json = serde_json::from_str(&row.envelope).unwrap_or(Json::Null);
    let data = &env["event"]["data"];
    let heartbeat = row.kind == "agent.heartbeat";
    if heartbeat {
        agg.heartbeats += 1;
    }
    if !heartbeat || heartbeats_in_csv {
        write_csv_row(csv, &row, data)?;
    }
    // The stored record verbatim: the agent's hash chain can be re-checked from it.
    jsonl.write_all(row.envelope.as_bytes()).map_err(io(dir))?;
    jsonl.write_all(b"\n").map_err(io(dir))?;
    agg.event(tz, &row.agent, &row.kind, &row.agent_time, data);
    Ok(())
}

/// One event's `events.csv` row, with the fields people look for.
fn write_csv_row(
    csv: &mut csv::Writer<Out>,
    row: &EventRow,
    data: &Json,
) -> Result<(), ExportError> {
    let device = [
        str_of(data, "usb_serial"),
        str_of(data, "serial"),
        str_of(data, "hash"),
    ]
    .into_iter()
    .find(|s| !s.is_empty())
    .unwrap_or("");
    let destination = if row.kind == "net.transfer" {
        format!("{}:{}", str_of(data, "remote_addr"), data["remote_port"])
    } else {
        String::new()
    };
    csv.write_record([
        row.id.as_str(),
        &row.received,
        &row.agent_time,
        &row.agent,
        &row.role,
        &row.kind,
        str_of(data, "user"),
        device,
        str_of(data, "path"),
        &destination,
        &data.to_string(),
    ])?;
    Ok(())
}

/// `alerts.csv` and `alerts.jsonl`; the manifest entries of both.
fn write_alerts(
    p: &Period<'_, '_>,
    req: &Request,
    agg: &mut Agg,
) -> Result<Vec<Json>, ExportError> {
    let scope = p.scope;
    let mut csv_out = create(p.dir, "alerts.csv")?;
    csv_out.write_all(BOM).map_err(io(p.dir))?;
    let mut csv = csv::Writer::from_writer(csv_out);
    csv.write_record([
        "alert_id",
        "time",
        "level",
        "rule_id",
        "title",
        "agent_id",
        "key",
        "count",
        "last_seen",
        "summary",
        "event_ids",
        "tags",
    ])?;
    let mut jsonl = create(p.dir, "alerts.jsonl")?;
    {
        let sql = format!(
            "SELECT alert_id, time, level, rule_id, agent_id, summary, event_ids, details, title, tags, key, count, last_seen
             FROM alerts WHERE time >= ?1 AND time < ?2 AND ({scope}) ORDER BY alert_id"
        );
        each_row(
            p.conn,
            &sql,
            params![p.from, p.to, p.scope_param],
            crate::store::alert_from_row,
            |alert| {
                csv.write_record([
                    alert.alert_id.to_string().as_str(),
                    &alert.time.to_string(),
                    alert.level.as_str(),
                    &alert.rule_id,
                    &alert.title,
                    &alert.agent_id,
                    &alert.key,
                    &alert.count.to_string(),
                    &alert.last_seen.to_string(),
                    &alert.summary,
                    &alert.event_ids.join(" "),
                    &alert.tags.join("; "),
                ])?;
                serde_json::to_writer(&mut jsonl, &alert).map_err(|e| ExportError::Io {
                    path: p.dir.join("alerts.jsonl").display().to_string(),
                    source: e.into(),
                })?;
                jsonl.write_all(b"\n").map_err(io(p.dir))?;
                agg.alert(&req.tz, &alert);
                Ok(true)
            },
        )?;
    }
    let csv_out = csv.into_inner().map_err(|e| ExportError::Io {
        path: p.dir.join("alerts.csv").display().to_string(),
        source: e.into_error(),
    })?;
    Ok(vec![
        finish(p.dir, "alerts.csv", csv_out)?,
        finish(p.dir, "alerts.jsonl", jsonl)?,
    ])
}

/// The period's report (`report.html`) from what the export aggregated.
fn render_report(
    req: &Request,
    rules: &RuleSet,
    expected: &[String],
    agg: &mut Agg,
    tz_name: &str,
) -> Result<String, ExportError> {
    let t = req.lang.texts();
    let fmt = |ts: jiff::Timestamp| {
        ts.to_zoned(req.tz.clone())
            .strftime("%Y-%m-%d %H:%M")
            .to_string()
    };
    let not_reporting: Vec<String> = expected
        .iter()
        .filter(|a| !agg.reporting.contains(*a))
        .cloned()
        .collect();
    let mut usb: Vec<DeviceRow> = std::mem::take(&mut agg.usb)
        .into_iter()
        .map(|((target, _, agent, rule), (device, count))| DeviceRow {
            target,
            device,
            agent,
            rule,
            count,
        })
        .collect();
    usb.sort_by(|a, b| {
        (
            a.target != "block",
            a.target.clone(),
            std::cmp::Reverse(a.count),
            a.device.clone(),
        )
            .cmp(&(
                b.target != "block",
                b.target.clone(),
                std::cmp::Reverse(b.count),
                b.device.clone(),
            ))
    });
    usb.truncate(MAX_ROWS);
    let days: Vec<(String, [u64; 3])> = std::mem::take(&mut agg.days).into_iter().collect();
    let mapping = mapping(rules, req.lang);
    Ok(report::Report {
        t,
        lang: req.lang.code(),
        period_from: fmt(req.from),
        period_to: fmt(req.to),
        timezone: tz_name.to_string(),
        scope: req
            .scope_label
            .clone()
            .unwrap_or_else(|| t.all_agents.to_string()),
        generated: fmt(jiff::Timestamp::now()),
        generator: format!("weilan-collector {}", crate::VERSION),
        events_total: agg.events,
        alerts_total: agg.alerts,
        red: agg.levels[0],
        yellow: agg.levels[1],
        blue: agg.levels[2],
        days: report::day_chart(t.chart_days, &days),
        tops: vec![
            report::top_chart(
                t.top_agents,
                &sorted_top(std::mem::take(&mut agg.alerts_by_agent)),
            ),
            report::top_chart(t.top_users, &sorted_top(std::mem::take(&mut agg.users))),
            report::top_chart(t.top_devices, &sorted_top(std::mem::take(&mut agg.devices))),
        ],
        expected: expected.len(),
        reporting: expected
            .iter()
            .filter(|a| agg.reporting.contains(*a))
            .count(),
        not_reporting,
        silent: std::mem::take(&mut agg.silent),
        policies: std::mem::take(&mut agg.policies)
            .into_iter()
            .map(|(v, a)| (v, a.into_iter().collect::<Vec<_>>().join(", ")))
            .collect(),
        usb,
        files: std::mem::take(&mut agg.files),
        files_total: agg.files_total,
        transfers: std::mem::take(&mut agg.transfers),
        transfers_total: agg.transfers_total,
        unlocks: std::mem::take(&mut agg.unlocks),
        failures: std::mem::take(&mut agg.failures),
        integrity: std::mem::take(&mut agg.integrity),
        mapping,
    }
    .render()?)
}

/// Writes the manifest and its detached signature into `partial` (synced), then
/// moves the folder to `dir` in one rename: an export is whole or absent.
fn seal(partial: &Path, dir: &Path, signer: &Signer, text: String) -> Result<(), ExportError> {
    let mut signed = signer.sign(Purpose::Export, text.clone());
    signed.body = String::new(); // detached: the body is manifest.json itself
    for (file, bytes) in [
        ("manifest.json", text.into_bytes()),
        (
            "manifest.sig",
            serde_json::to_vec_pretty(&signed).unwrap_or_default(),
        ),
    ] {
        let p = partial.join(file);
        let mut f = File::create(&p).map_err(io(&p))?;
        f.write_all(&bytes).map_err(io(&p))?;
        f.sync_all().map_err(io(&p))?;
    }
    std::fs::rename(partial, dir).map_err(io(dir))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))?;
    }
    Ok(())
}

/// Produces one export. `progress(done, total)` is called as event rows stream.
pub fn export(
    location: &Location,
    signer: &Signer,
    rules: &RuleSet,
    req: &Request,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, ExportError> {
    if req.from >= req.to {
        return Err(ExportError::Invalid(format!(
            "the period is empty: {} is not before {}",
            req.from, req.to
        )));
    }
    let name = req
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ExportError::Invalid(format!("{} has no name", req.dir.display())))?;
    if req.dir.exists() {
        return Err(ExportError::Exists(req.dir.display().to_string()));
    }
    let partial = req.dir.with_file_name(format!("{name}.partial"));
    if partial.exists() {
        // Left by an export that did not finish (a crash): start it again.
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let mut conn = Conn::open_read_only(location)?;
    if let Some(sqlite) = conn.sqlite() {
        sqlite.busy_timeout(std::time::Duration::from_secs(10))?;
    }
    // One read transaction: every count and row comes from the same snapshot.
    let conn = conn.snapshot()?;
    let (from, to) = (req.from.to_string(), req.to.to_string());
    let (scope, scope_arg) = scope_sql(conn.engine(), &req.agents);
    let scope_param: Option<&str> = req.agents.as_ref().map(|_| scope_arg.as_str());
    // For progress only: blocks that straddle the period count whole.
    let total: u64 = conn.query_row(
        &format!(
            "SELECT (SELECT COUNT(*) FROM events WHERE received_at >= ?1 AND received_at < ?2 AND ({scope}))
                  + (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM heartbeat_blocks
                     WHERE last_received >= ?1 AND first_received < ?2 AND ({scope}))"
        ),
        params![from, to, scope_param],
        |r| r.get::<i64>(0),
    )? as u64;
    let mut agg = Agg::default();
    let mut entries = Vec::new();

    let period = Period {
        conn: &conn,
        dir: &partial,
        from: &from,
        to: &to,
        scope,
        scope_param,
    };
    entries.extend(write_events(&period, req, total, &mut agg, progress)?);
    entries.extend(write_alerts(&period, req, &mut agg)?);

    // Fleet coverage: agents known by the end of the period, in scope.
    let expected: Vec<String> = conn.query_map(
        &format!(
            "SELECT agent_id FROM agents WHERE first_seen < ?2 AND CAST(?1 AS TEXT) IS NOT NULL AND ({scope}) ORDER BY agent_id"
        ),
        params![from, to, scope_param],
        |r| r.get(0),
    )?;
    let previous = last_export(&conn).ok().flatten();
    conn.commit()?;

    let tz_name = req.tz.iana_name().unwrap_or("UTC").to_string();
    let html = render_report(req, rules, &expected, &mut agg, &tz_name)?;
    let mut out = create(&partial, "report.html")?;
    out.write_all(html.as_bytes()).map_err(io(&partial))?;
    entries.push(finish(&partial, "report.html", out)?);

    // The manifest, signed, chained.
    let manifest = serde_json::json!({
        "format": FORMAT,
        "generator": format!("weilan-collector {}", crate::VERSION),
        "created_at": jiff::Timestamp::now(),
        "period": {"from": req.from, "to": req.to, "timezone": tz_name, "by": "received_at"},
        "scope": {"agents": req.agents, "label": req.scope_label},
        "schedule": req.schedule,
        "caught_up": req.caught_up,
        "language": req.lang.code(),
        "counts": {"events": agg.events, "heartbeats": agg.heartbeats,
                   "heartbeats_in_events_csv": req.heartbeats_in_csv, "alerts": agg.alerts},
        "files": entries,
        "previous": previous.as_ref().map(|(n, h)| serde_json::json!({"name": n, "manifest_sha256": h})),
    });
    let text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    let manifest_sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()));
    seal(&partial, &req.dir, signer, text)?;
    record(location, &name, req, (&from, &to), &manifest_sha256)?;
    Ok(Summary {
        dir: req.dir.clone(),
        events: agg.events,
        alerts: agg.alerts,
        manifest_sha256,
        previous: previous.map(|p| p.0),
    })
}

/// The mapping table: report sections and indicators for each control.
/// Records a sealed export: the next one chains to it.
fn record(
    location: &Location,
    name: &str,
    req: &Request,
    (from, to): (&str, &str),
    manifest_sha256: &str,
) -> Result<(), ExportError> {
    let rw = Conn::open(location)?;
    if let Some(sqlite) = rw.sqlite() {
        sqlite.busy_timeout(std::time::Duration::from_secs(10))?;
    }
    rw.execute(
        "INSERT INTO exports (name, dir, schedule, period_from, period_to, created_at, manifest_sha256, caught_up)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            name,
            req.dir.display().to_string(),
            req.schedule,
            from,
            to,
            jiff::Timestamp::now().to_string(),
            manifest_sha256,
            req.caught_up
        ],
    )?;
    Ok(())
}

fn mapping(rules: &RuleSet, lang: Lang) -> Vec<MappingRow> {
    let mut by_control: BTreeMap<String, (Vec<&str>, Vec<String>)> = BTreeMap::new();
    for (control, section) in report::section_controls(lang) {
        by_control
            .entry(control.to_string())
            .or_default()
            .0
            .push(section);
    }
    for r in rules.rules() {
        for tag in r
            .tags
            .iter()
            .filter(|t| t.starts_with("等保") || t.starts_with("NIST"))
        {
            by_control
                .entry(tag.clone())
                .or_default()
                .1
                .push(format!("{} ({})", r.title, r.id));
        }
    }
    by_control
        .into_iter()
        .map(|(control, (sections, rules))| MappingRow {
            control,
            sections: sections.join("; "),
            rules: rules.join("; "),
        })
        .collect()
}

#[cfg(test)]
mod tests;
