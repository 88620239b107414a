//! The collector's SQLite database: schema, migrations, and the writes of ingest.
//!
//! WAL mode with `synchronous = FULL`: a batch is acknowledged to its agent only after
//! its transaction is durable. Events are keyed by `event_id`, so a re-sent batch
//! stores nothing twice (`INSERT OR IGNORE`, counted as duplicates).

use std::path::Path;

use crate::db::{self, params, Conn, Location, Sql, Tx};
use weilan_config::event::{Envelope, EventKey};

/// Migrations, applied in order; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: events, alerts, quarantine, agents.
    "CREATE TABLE events (
        event_id    TEXT PRIMARY KEY,
        agent_id    TEXT NOT NULL,
        epoch       INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        agent_time  TEXT NOT NULL,
        received_at TEXT NOT NULL,
        host_role   TEXT NOT NULL,
        envelope    TEXT NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX events_by_agent ON events(agent_id, epoch, seq);
     CREATE INDEX events_by_kind ON events(kind, received_at);
     CREATE TABLE alerts (
        alert_id   INTEGER PRIMARY KEY,
        time       TEXT NOT NULL,
        level      TEXT NOT NULL,
        rule_id    TEXT NOT NULL,
        agent_id   TEXT NOT NULL,
        summary    TEXT NOT NULL,
        event_ids  TEXT NOT NULL,
        details    TEXT NOT NULL
     );
     CREATE INDEX alerts_by_time ON alerts(time);
     CREATE TABLE quarantine (
        id          INTEGER PRIMARY KEY,
        received_at TEXT NOT NULL,
        topic       TEXT NOT NULL,
        reason      TEXT NOT NULL,
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        payload     BLOB NOT NULL
     );
     CREATE TABLE agents (
        agent_id       TEXT PRIMARY KEY,
        first_seen     TEXT NOT NULL,
        last_seen      TEXT NOT NULL,
        state          TEXT NOT NULL,
        agent_version  TEXT,
        policy_version TEXT,
        hostname       TEXT
     );",
    // 2: the hash chain and sequence continuity per agent, fleet health.
    "ALTER TABLE events ADD COLUMN hash TEXT NOT NULL DEFAULT '';
     ALTER TABLE events ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
     CREATE TABLE streams (
        agent_id       TEXT NOT NULL,
        epoch          INTEGER NOT NULL,
        contiguous_to  INTEGER NOT NULL,
        max_seq        INTEGER NOT NULL,
        first_seen     TEXT NOT NULL,
        gap_since      TEXT,
        gap_alerted    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (agent_id, epoch)
     );
     ALTER TABLE agents ADD COLUMN backlog INTEGER;
     ALTER TABLE agents ADD COLUMN last_event TEXT;
     ALTER TABLE agents ADD COLUMN silent_alerted INTEGER NOT NULL DEFAULT 0;",
    // 3: commands sent to agents (sequence numbers only ever increase per agent).
    "CREATE TABLE commands (
        agent_id  TEXT NOT NULL,
        seq       INTEGER NOT NULL,
        issued_at TEXT NOT NULL,
        action    TEXT NOT NULL,
        reason    TEXT NOT NULL,
        PRIMARY KEY (agent_id, seq)
     );",
    // 4: the rules engine: alert titles, tags, keys and repeat counts; first-seen values.
    "ALTER TABLE alerts ADD COLUMN title TEXT NOT NULL DEFAULT '';
     ALTER TABLE alerts ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
     ALTER TABLE alerts ADD COLUMN key TEXT NOT NULL DEFAULT '';
     ALTER TABLE alerts ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE alerts ADD COLUMN last_seen TEXT;
     CREATE INDEX alerts_by_rule ON alerts(rule_id, key);
     CREATE TABLE rule_seen (
        rule_id   TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (rule_id, key, value)
     ) WITHOUT ROWID;",
    // 5: the last fence decision per agent and device (rules enrich file events with it).
    "CREATE TABLE device_decisions (
        agent_id   TEXT NOT NULL,
        hash       TEXT NOT NULL,
        target     TEXT NOT NULL,
        agent_time TEXT NOT NULL,
        PRIMARY KEY (agent_id, hash)
     ) WITHOUT ROWID;",
    // 6: compliance exports (the chain of manifest hashes) and streaming by receive time.
    "CREATE TABLE exports (
        id              INTEGER PRIMARY KEY,
        name            TEXT NOT NULL,
        dir             TEXT NOT NULL,
        schedule        TEXT,
        period_from     TEXT NOT NULL,
        period_to       TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        manifest_sha256 TEXT NOT NULL,
        caught_up       INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX exports_by_schedule ON exports(schedule, period_to);
     CREATE INDEX events_by_received ON events(received_at);
     CREATE INDEX alerts_by_agent_time ON alerts(agent_id, time);",
    // 7: every presence an `absent` rule has seen (a badge-in), not only the latest, so
    // a fact sent late by an agent that was offline is judged against the presences of
    // its own time.
    "CREATE TABLE presence (
        rule_id TEXT NOT NULL,
        key     TEXT NOT NULL,
        at      INTEGER NOT NULL,
        PRIMARY KEY (rule_id, key, at)
     ) WITHOUT ROWID;
     INSERT OR IGNORE INTO presence (rule_id, key, at)
        SELECT rule_id, key, last_seen FROM rule_seen WHERE value = '(presence)';
     DELETE FROM rule_seen WHERE value = '(presence)';",
    // 8: policy releases: every distinct policy text the collector published, with the
    // serial agents order them by (a replayed older one is refused).
    "CREATE TABLE policy_releases (
        serial    INTEGER PRIMARY KEY,
        sha256    TEXT NOT NULL,
        label     TEXT NOT NULL,
        issued_at TEXT NOT NULL
     );",
    // 9: quarantine evidence kept per source (the agent or door controller the topic
    // names), so one source's flood cannot push out another's; and a count of every
    // refused payload per source, also of those whose evidence was pruned.
    "ALTER TABLE quarantine ADD COLUMN source TEXT NOT NULL DEFAULT '';
     CREATE INDEX quarantine_by_source ON quarantine(source, id);
     CREATE TABLE quarantine_counts (
        source     TEXT PRIMARY KEY,
        refused    INTEGER NOT NULL,
        bytes      INTEGER NOT NULL,
        first_at   TEXT NOT NULL,
        last_at    TEXT NOT NULL,
        last_reason TEXT NOT NULL,
        kept       INTEGER NOT NULL
     ) WITHOUT ROWID;
     INSERT INTO quarantine_counts (source, refused, bytes, first_at, last_at, last_reason, kept)
        SELECT '', COUNT(*), COALESCE(SUM(size), 0), MIN(received_at), MAX(received_at), 'before schema 9', COUNT(*)
        FROM quarantine HAVING COUNT(*) > 0;",
    // 10: per epoch, the installation that wrote it and the last sequence the agent
    // said it had journaled (the next epoch's `previous`): records up to it are
    // expected, and a missing tail is a gap like any other.
    // Holes are alerted one by one: `gap_alerted_to` is the last sequence alerted.
    "ALTER TABLE streams ADD COLUMN installation TEXT;
     ALTER TABLE streams ADD COLUMN expected_to INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE streams ADD COLUMN gap_alerted_to INTEGER NOT NULL DEFAULT 0;
     UPDATE streams SET gap_alerted_to = max_seq WHERE gap_alerted = 1;
     CREATE TABLE uplink_heads (
        agent_id    TEXT PRIMARY KEY,
        last_epoch  INTEGER NOT NULL,
        last_seq    INTEGER NOT NULL,
        head_epoch  INTEGER NOT NULL,
        head_seq    INTEGER NOT NULL,
        at          TEXT NOT NULL
     ) WITHOUT ROWID;",
    // 11: commands wait here for the running collector to publish them. The command
    // line (and later the console) never connects to the broker as the collector: the
    // broker binds the client id to the certificate, so it would take the running
    // collector's session over, and its last will would tell every agent that no
    // collector is listening. Earlier rows were published when written: `sent`.
    "ALTER TABLE commands ADD COLUMN payload BLOB;
     ALTER TABLE commands ADD COLUMN expires_at INTEGER;
     ALTER TABLE commands ADD COLUMN state TEXT NOT NULL DEFAULT 'sent';
     ALTER TABLE commands ADD COLUMN state_at TEXT;
     CREATE INDEX commands_queued ON commands (issued_at) WHERE state = 'queued';",
    // 12: old heartbeats as compact blocks (heartbeats/); per stream, how far its
    // heartbeats were examined for compaction. A rowid table: a block is 1–4 KB, and
    // a WITHOUT ROWID row keeps only ~1 KB in its page and spills the rest into an
    // overflow page of its own (measured: 42 bytes per heartbeat instead of ~17).
    "CREATE TABLE heartbeat_blocks (
        block_id       INTEGER PRIMARY KEY,
        agent_id       TEXT NOT NULL,
        epoch          INTEGER NOT NULL,
        first_seq      INTEGER NOT NULL,
        last_seq       INTEGER NOT NULL,
        count          INTEGER NOT NULL,
        first_received TEXT NOT NULL,
        last_received  TEXT NOT NULL,
        common         TEXT NOT NULL,
        entries        BLOB NOT NULL,
        last_hash      TEXT NOT NULL
     );
     CREATE UNIQUE INDEX heartbeat_blocks_by_key ON heartbeat_blocks(agent_id, epoch, first_seq);
     CREATE INDEX heartbeat_blocks_by_received ON heartbeat_blocks(first_received);
     CREATE INDEX heartbeat_blocks_by_end ON heartbeat_blocks(last_received);
     ALTER TABLE streams ADD COLUMN heartbeats_compacted_to INTEGER NOT NULL DEFAULT 0;",
    // 13: federation (federation/). A district's batches wait here, verbatim, until
    // the province acknowledges them (written in the transaction that stores them,
    // so an agent's ack means the batch will reach the province); a province binds
    // each forwarded agent to the district it first came through.
    "CREATE TABLE federation_outbox (
        outbox_id  INTEGER PRIMARY KEY,
        agent_id   TEXT NOT NULL,
        epoch      INTEGER NOT NULL,
        first_seq  INTEGER NOT NULL,
        last_seq   INTEGER NOT NULL,
        payload    BLOB NOT NULL,
        queued_at  TEXT NOT NULL
     );
     CREATE UNIQUE INDEX federation_outbox_by_batch ON federation_outbox(agent_id, epoch, first_seq, last_seq);
     CREATE TABLE federated_agents (
        agent_id   TEXT PRIMARY KEY,
        district   TEXT NOT NULL,
        first_at   TEXT NOT NULL
     );",
    // 14: the registry of enrolled certificates, shared by collectors that share this
    // database (registry::sync_with_store): each line of registry.jsonl once.
    "CREATE TABLE registry_lines (
        line_id    INTEGER PRIMARY KEY,
        line       TEXT NOT NULL
     );
     CREATE UNIQUE INDEX registry_lines_by_text ON registry_lines(line);",
    // 15: PostgreSQL partitions `events` by the month of `received_at`, so retention
    // drops a month whole (partitions.rs). SQLite, the small sites' engine, keeps one
    // table and deletes rows: this step changes nothing there (the index exists).
    "CREATE INDEX IF NOT EXISTS events_by_received ON events(received_at);",
    // 16: correlation windows shared by collectors that share this database
    // (rules/engine.rs, `slide_shared`): per rule, key and second, what the window
    // counted (and, for `distinct`, the value), so that an agent whose batches the
    // broker hands to several collectors is counted as one.
    "CREATE TABLE window_entries (
        rule_id     TEXT NOT NULL,
        key         TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        at          INTEGER NOT NULL,
        text        TEXT NOT NULL,
        value       REAL NOT NULL,
        event_id    TEXT,
        PRIMARY KEY (rule_id, key, at, text, fingerprint)
     ) WITHOUT ROWID;",
];

/// PostgreSQL migrations after [`POSTGRES_BASELINE`], which is the schema at version
/// [`POSTGRES_BASELINE_VERSION`]: migration `POSTGRES_BASELINE_VERSION + 1 + i` is
/// `POSTGRES_MIGRATIONS[i]`, the same change as SQLite's in PostgreSQL's types.
const POSTGRES_MIGRATIONS: &[&str] = &["
CREATE TABLE federation_outbox (
    outbox_id  BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    agent_id   TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    first_seq  BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL,
    payload    BYTEA NOT NULL,
    queued_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX federation_outbox_by_batch ON federation_outbox(agent_id, epoch, first_seq, last_seq);
CREATE TABLE federated_agents (
    agent_id   TEXT PRIMARY KEY,
    district   TEXT NOT NULL,
    first_at   TEXT NOT NULL
);
", "
CREATE TABLE registry_lines (
    line_id    BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    line       TEXT NOT NULL
);
CREATE UNIQUE INDEX registry_lines_by_text ON registry_lines(line);
", "
-- Events partitioned by the month of received_at (partitions.rs). The table so far
-- becomes the first partition, holding everything before next month (or the month
-- after its newest row); a database with no events yet drops it instead, and its
-- first month gets a partition of its own. A row no monthly partition takes lands in
-- events_default, from which partitions::maintain moves it into its month.
-- Uniqueness must include the partition key: an event id is checked across months
-- by ingest (store::insert_events), under the agent's turn.
ALTER TABLE events RENAME TO events_before_partitions;
ALTER INDEX events_pkey RENAME TO events_before_partitions_pkey;
ALTER INDEX events_by_agent RENAME TO events_before_partitions_by_agent;
ALTER INDEX events_by_kind RENAME TO events_before_partitions_by_kind;
ALTER INDEX events_by_received RENAME TO events_before_partitions_by_received;
CREATE TABLE events (
    event_id    TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    agent_time  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    host_role   TEXT NOT NULL,
    envelope    TEXT NOT NULL,
    hash        TEXT NOT NULL DEFAULT '',
    prev_hash   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (event_id, received_at)
) PARTITION BY RANGE (received_at);
CREATE INDEX events_by_agent ON events(agent_id, epoch, seq);
CREATE INDEX events_by_kind ON events(kind, received_at);
CREATE INDEX events_by_received ON events(received_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;
DO $migration$
DECLARE
    newest TEXT;
    upto TEXT;
BEGIN
    SELECT max(received_at) INTO newest FROM events_before_partitions;
    IF newest IS NULL THEN
        DROP TABLE events_before_partitions;
    ELSE
        upto := greatest(
            to_char(date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month', 'YYYY-MM-DD'),
            to_char(date_trunc('month', left(newest, 10)::date) + interval '1 month', 'YYYY-MM-DD'));
        -- A partition's key is the table's (the id alone would refuse nothing more:
        -- ingest looks for an id in every month before storing it).
        ALTER TABLE events_before_partitions DROP CONSTRAINT events_before_partitions_pkey,
            ADD CONSTRAINT events_before_partitions_pkey PRIMARY KEY (event_id, received_at);
        EXECUTE format('ALTER TABLE events ATTACH PARTITION events_before_partitions FOR VALUES FROM (MINVALUE) TO (%L)', upto);
    END IF;
END
$migration$;
", "
CREATE TABLE window_entries (
    rule_id     TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    at          BIGINT NOT NULL,
    text        TEXT NOT NULL,
    value       DOUBLE PRECISION NOT NULL,
    event_id    TEXT,
    PRIMARY KEY (rule_id, key, at, text, fingerprint)
);
"];

/// The version [`POSTGRES_BASELINE`] creates.
const POSTGRES_BASELINE_VERSION: i64 = 12;
const _: () =
    assert!(POSTGRES_BASELINE_VERSION as usize + POSTGRES_MIGRATIONS.len() == MIGRATIONS.len());

/// The PostgreSQL schema at version [`POSTGRES_BASELINE_VERSION`]: the same tables,
/// columns and indexes as SQLite's after those migrations, in PostgreSQL's types
/// (`BIGINT`, `BYTEA`, identity keys). A later migration goes to [`MIGRATIONS`] and
/// [`POSTGRES_MIGRATIONS`], so a database created earlier is brought up to date.
const POSTGRES_BASELINE: &str = "
CREATE TABLE events (
    event_id    TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    agent_time  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    host_role   TEXT NOT NULL,
    envelope    TEXT NOT NULL,
    hash        TEXT NOT NULL DEFAULT '',
    prev_hash   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_by_agent ON events(agent_id, epoch, seq);
CREATE INDEX events_by_kind ON events(kind, received_at);
CREATE INDEX events_by_received ON events(received_at);
CREATE TABLE alerts (
    alert_id   BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    time       TEXT NOT NULL,
    level      TEXT NOT NULL,
    rule_id    TEXT NOT NULL,
    agent_id   TEXT NOT NULL,
    summary    TEXT NOT NULL,
    event_ids  TEXT NOT NULL,
    details    TEXT NOT NULL,
    title      TEXT NOT NULL DEFAULT '',
    tags       TEXT NOT NULL DEFAULT '[]',
    key        TEXT NOT NULL DEFAULT '',
    count      BIGINT NOT NULL DEFAULT 1,
    last_seen  TEXT
);
CREATE INDEX alerts_by_time ON alerts(time);
CREATE INDEX alerts_by_rule ON alerts(rule_id, key);
CREATE INDEX alerts_by_agent_time ON alerts(agent_id, time);
CREATE TABLE quarantine (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    received_at TEXT NOT NULL,
    topic       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    size        BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    payload     BYTEA NOT NULL,
    source      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX quarantine_by_source ON quarantine(source, id);
CREATE TABLE quarantine_counts (
    source      TEXT PRIMARY KEY,
    refused     BIGINT NOT NULL,
    bytes       BIGINT NOT NULL,
    first_at    TEXT NOT NULL,
    last_at     TEXT NOT NULL,
    last_reason TEXT NOT NULL,
    kept        BIGINT NOT NULL
);
CREATE TABLE agents (
    agent_id       TEXT PRIMARY KEY,
    first_seen     TEXT NOT NULL,
    last_seen      TEXT NOT NULL,
    state          TEXT NOT NULL,
    agent_version  TEXT,
    policy_version TEXT,
    hostname       TEXT,
    backlog        BIGINT,
    last_event     TEXT,
    silent_alerted BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE streams (
    agent_id       TEXT NOT NULL,
    epoch          BIGINT NOT NULL,
    contiguous_to  BIGINT NOT NULL,
    max_seq        BIGINT NOT NULL,
    first_seen     TEXT NOT NULL,
    gap_since      TEXT,
    gap_alerted    BIGINT NOT NULL DEFAULT 0,
    installation   TEXT,
    expected_to    BIGINT NOT NULL DEFAULT 0,
    gap_alerted_to BIGINT NOT NULL DEFAULT 0,
    heartbeats_compacted_to BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, epoch)
);
CREATE TABLE uplink_heads (
    agent_id    TEXT PRIMARY KEY,
    last_epoch  BIGINT NOT NULL,
    last_seq    BIGINT NOT NULL,
    head_epoch  BIGINT NOT NULL,
    head_seq    BIGINT NOT NULL,
    at          TEXT NOT NULL
);
CREATE TABLE commands (
    agent_id   TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    issued_at  TEXT NOT NULL,
    action     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    payload    BYTEA,
    expires_at BIGINT,
    state      TEXT NOT NULL DEFAULT 'sent',
    state_at   TEXT,
    PRIMARY KEY (agent_id, seq)
);
CREATE INDEX commands_queued ON commands (issued_at) WHERE state = 'queued';
CREATE TABLE rule_seen (
    rule_id   TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    last_seen BIGINT NOT NULL,
    PRIMARY KEY (rule_id, key, value)
);
CREATE TABLE presence (
    rule_id TEXT NOT NULL,
    key     TEXT NOT NULL,
    at      BIGINT NOT NULL,
    PRIMARY KEY (rule_id, key, at)
);
CREATE TABLE device_decisions (
    agent_id   TEXT NOT NULL,
    hash       TEXT NOT NULL,
    target     TEXT NOT NULL,
    agent_time TEXT NOT NULL,
    PRIMARY KEY (agent_id, hash)
);
CREATE TABLE exports (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name            TEXT NOT NULL,
    dir             TEXT NOT NULL,
    schedule        TEXT,
    period_from     TEXT NOT NULL,
    period_to       TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    caught_up       BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX exports_by_schedule ON exports(schedule, period_to);
CREATE TABLE policy_releases (
    serial    BIGINT PRIMARY KEY,
    sha256    TEXT NOT NULL,
    label     TEXT NOT NULL,
    issued_at TEXT NOT NULL
);
CREATE TABLE heartbeat_blocks (
    block_id       BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    agent_id       TEXT NOT NULL,
    epoch          BIGINT NOT NULL,
    first_seq      BIGINT NOT NULL,
    last_seq       BIGINT NOT NULL,
    count          BIGINT NOT NULL,
    first_received TEXT NOT NULL,
    last_received  TEXT NOT NULL,
    common         TEXT NOT NULL,
    entries        BYTEA NOT NULL,
    last_hash      TEXT NOT NULL
);
CREATE UNIQUE INDEX heartbeat_blocks_by_key ON heartbeat_blocks(agent_id, epoch, first_seq);
CREATE INDEX heartbeat_blocks_by_received ON heartbeat_blocks(first_received);
CREATE INDEX heartbeat_blocks_by_end ON heartbeat_blocks(last_received);
";

/// Who a quarantined payload's topic names (the agent, forwarded or not, or the door
/// controller), or the topic itself when it names nobody.
pub fn quarantine_source(topic: &str) -> String {
    weilan_config::topics::parse_agent_topic(topic)
        .map(|(id, _)| id.to_string())
        .or_else(|| weilan_config::topics::parse_door_topic(topic).map(str::to_string))
        .or_else(|| {
            weilan_config::topics::parse_federation_topic(topic).map(|(_, id)| id.to_string())
        })
        .unwrap_or_else(|| topic.chars().take(200).collect())
}

/// One source's line in `weilan-collector quarantine`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuarantineSummary {
    pub source: String,
    pub refused: i64,
    pub bytes: i64,
    pub first_at: String,
    pub last_at: String,
    pub last_reason: String,
    /// Payloads still kept as evidence (the newest).
    pub kept: i64,
}

/// Where a command stands (`commands.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandState {
    /// Written by the command line, waiting for the running collector.
    Queued,
    /// Handed to the broker connection by the collector.
    Sent,
    /// Its validity ended before a collector could publish it; never sent.
    Expired,
}

impl CommandState {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Expired => "expired",
        }
    }

    fn parse(s: &str) -> Option<CommandState> {
        [
            CommandState::Queued,
            CommandState::Sent,
            CommandState::Expired,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// A signed command waiting for the running collector to publish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedCommand {
    pub agent_id: String,
    pub seq: u64,
    pub payload: Vec<u8>,
    /// Unix seconds.
    pub expires_at: i64,
}

/// One published policy release (see `policy_releases`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRelease {
    pub serial: u64,
    pub sha256: String,
    pub label: String,
    pub issued_at: String,
}

/// Quarantined payloads are kept up to this size (the hash covers the whole payload).
const QUARANTINE_KEEP_BYTES: usize = 64 * 1024;
/// Newest quarantined payloads kept per source (the id its topic names).
pub const QUARANTINE_KEEP_PER_SOURCE: i64 = 1_000;
/// Newest quarantined payloads kept in all (a flood spread over many topic names
/// cannot fill the disk); past it the largest source loses its oldest first, so the
/// flooder's evidence goes before anyone else's.
pub const QUARANTINE_MAX_ROWS: i64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: String, source: db::Error },
    #[error("database: {0}")]
    Sql(#[from] db::Error),
    #[error(transparent)]
    Partitions(#[from] crate::partitions::PartitionError),
    #[error("database {location}: {reason}")]
    Unusable { location: String, reason: String },
    #[error("database schema version {found} is newer than this collector ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("heartbeat block {block}: {reason}")]
    HeartbeatBlock { block: String, reason: String },
    #[error("cannot start the database checkpoint thread: {0}")]
    Thread(std::io::Error),
}

/// A newly stored event (rules look at these).
pub struct Stored<'a> {
    pub envelope: &'a Envelope,
}

/// One decoded event of a batch with the exact bytes it arrived as.
pub struct Incoming<'a> {
    pub envelope: Envelope,
    /// The record's JSON exactly as the agent journaled and sent it.
    pub raw: &'a str,
    /// SHA-256 of `raw` (what the next record's `prev_hash` must name).
    pub hash: String,
}

impl<'a> Incoming<'a> {
    /// A record as it arrived: parsed, with the hash of its exact bytes.
    pub fn parse(raw: &'a str) -> serde_json::Result<Incoming<'a>> {
        Ok(Incoming {
            envelope: serde_json::from_str(raw)?,
            raw,
            hash: weilan_config::event::record_hash(raw.as_bytes()),
        })
    }
}

/// Keeps a refused payload with its reason inside `tx`: per-source evidence (newest
/// kept, a global cap pruning the largest source first) and the per-source count.
pub(crate) fn quarantine_in(
    tx: &Tx<'_>,
    topic: &str,
    reason: &str,
    payload: &[u8],
) -> Result<(), StoreError> {
    quarantine_refused_in(tx, &Refused::new(topic, reason, payload))
}

/// A refused payload as the quarantine keeps it: its digest and size, and at most
/// its first `QUARANTINE_KEEP_BYTES`. Ingest gathers a group's refusals and writes
/// them in the group's transaction.
#[derive(Debug)]
pub struct Refused {
    pub topic: String,
    pub reason: String,
    pub size: usize,
    pub sha256: String,
    pub kept: Vec<u8>,
}

impl Refused {
    pub fn new(topic: &str, reason: &str, payload: &[u8]) -> Self {
        Refused {
            topic: topic.to_string(),
            reason: reason.to_string(),
            size: payload.len(),
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, payload)),
            kept: payload[..payload.len().min(QUARANTINE_KEEP_BYTES)].to_vec(),
        }
    }
}

/// [`quarantine_in`] for a refusal already digested.
pub(crate) fn quarantine_refused_in(tx: &Tx<'_>, refused: &Refused) -> Result<(), StoreError> {
    let Refused {
        topic,
        reason,
        size,
        sha256: digest,
        kept,
    } = refused;
    let (topic, reason) = (topic.as_str(), reason.as_str());
    let source = quarantine_source(topic);
    let now = jiff::Timestamp::now().to_string();
    tx.execute(
        "INSERT INTO quarantine (received_at, topic, reason, size, sha256, payload, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![now, topic, reason, *size as i64, digest, kept, source],
    )?;
    tx.execute(
        "INSERT INTO quarantine_counts (source, refused, bytes, first_at, last_at, last_reason, kept)
         VALUES (?1, 1, ?2, ?3, ?3, ?4, 1)
         ON CONFLICT(source) DO UPDATE SET refused = quarantine_counts.refused + 1,
            bytes = quarantine_counts.bytes + ?2, last_at = ?3, last_reason = ?4,
            kept = quarantine_counts.kept + 1",
        params![source, *size as i64, now, reason],
    )?;
    let pruned = tx.execute(
        "DELETE FROM quarantine WHERE source = ?1 AND id <= (
            SELECT id FROM quarantine WHERE source = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        params![source, QUARANTINE_KEEP_PER_SOURCE],
    )?;
    let forget = |source: &str, pruned: u64| {
        tx.execute(
            "UPDATE quarantine_counts SET kept = kept - ?2 WHERE source = ?1",
            params![source, pruned as i64],
        )
    };
    forget(&source, pruned)?;
    let total: i64 = tx.query_row(
        "SELECT CAST(COALESCE(SUM(kept), 0) AS BIGINT) FROM quarantine_counts",
        params![],
        |r| r.get(0),
    )?;
    if total > QUARANTINE_MAX_ROWS {
        let largest: String = tx.query_row(
            "SELECT source FROM quarantine_counts ORDER BY kept DESC LIMIT 1",
            params![],
            |r| r.get(0),
        )?;
        let pruned = tx.execute(
            "DELETE FROM quarantine WHERE id IN (
                SELECT id FROM quarantine WHERE source = ?1 ORDER BY id LIMIT ?2)",
            params![largest, total - QUARANTINE_MAX_ROWS],
        )?;
        forget(&largest, pruned)?;
    }
    Ok(())
}

/// Inserts alerts and gives each its id.
pub(crate) fn insert_alerts(tx: &Tx<'_>, alerts: &mut [Alert]) -> Result<(), StoreError> {
    for a in alerts.iter_mut() {
        a.alert_id = tx.query_row(
        "INSERT INTO alerts (time, level, rule_id, agent_id, summary, event_ids, details, title, tags, key, count, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) RETURNING alert_id",
        params![
            a.time.to_string(),
            a.level.as_str(),
            a.rule_id,
            a.agent_id,
            a.summary,
            serde_json::to_string(&a.event_ids).unwrap_or_default(),
            a.details.to_string(),
            a.title,
            serde_json::to_string(&a.tags).unwrap_or_default(),
            a.key,
            a.count as i64,
            a.last_seen.to_string(),
        ], |r| r.get(0))?;
    }
    Ok(())
}

/// Reads an alert row selected as `alert_id, time, level, rule_id, agent_id, summary,
/// event_ids, details, title, tags, key, count, last_seen`.
pub fn alert_from_row(r: &db::Row<'_>) -> Result<Alert, db::Error> {
    let text = |i: usize| -> Result<String, db::Error> { r.get(i) };
    let time = |s: String| {
        s.parse::<jiff::Timestamp>()
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    };
    let time_of = time(text(1)?);
    Ok(Alert {
        alert_id: r.get(0)?,
        time: time_of,
        level: crate::alert_model::Level::parse(&text(2)?)
            .unwrap_or(crate::alert_model::Level::Blue),
        rule_id: text(3)?,
        agent_id: text(4)?,
        summary: text(5)?,
        event_ids: serde_json::from_str(&text(6)?).unwrap_or_default(),
        details: serde_json::from_str(&text(7)?).unwrap_or(serde_json::Value::Null),
        title: text(8)?,
        tags: serde_json::from_str(&text(9)?).unwrap_or_default(),
        key: text(10)?,
        count: r.get::<i64>(11)?.max(1) as u64,
        last_seen: r.get::<Option<String>>(12)?.map(time).unwrap_or(time_of),
        update: false,
    })
}

/// Result of storing one batch.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Keys now held (new and duplicates).
    pub held: Vec<EventKey>,
    /// Indexes (into the batch) of events stored for the first time.
    pub new: Vec<usize>,
    pub duplicates: u32,
}

pub use crate::alert_model::Alert;

/// The collector's database, on either engine ([`crate::db`]). Write transactions
/// take SQLite's write lock first ([`Conn::transaction`]).
pub struct Store {
    conn: Conn,
    location: Location,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(db::Error::Sqlite(e))
    }
}

/// SQLite page cache per connection, in KiB.
const CACHE_KIB: i64 = 64 * 1024;
/// WAL pages after which a commit checkpoints.
const WAL_CHECKPOINT_PAGES: i64 = 16_384;
/// The collector writer's own checkpoint threshold while a [`Checkpointer`] runs
/// (1 GiB of WAL: only reached if that thread is stuck).
const WAL_SAFETY_PAGES: i64 = 262_144;

/// A thread with its own connection that checkpoints the WAL every
/// [`Checkpointer::EVERY`], off the writer's path; stops (after a last checkpoint)
/// when dropped. PostgreSQL checkpoints itself: there the thread is not started.
pub struct Checkpointer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(250);

    pub fn spawn(location: &Location) -> Result<Checkpointer, StoreError> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if location.engine() != db::Engine::Sqlite {
            return Ok(Checkpointer { stop, thread: None });
        }
        let store = Store::open_at(location)?;
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    let last = stopping.load(std::sync::atomic::Ordering::Relaxed);
                    match store.checkpoint_passive() {
                        Ok(_) => failing = false,
                        Err(e) if !failing => {
                            failing = true;
                            tracing::error!(error = %e, "WAL checkpoint failed; the writer checkpoints itself past its limit");
                        }
                        Err(_) => {}
                    }
                    if last {
                        return;
                    }
                    std::thread::sleep(Self::EVERY);
                }
            })
            .map_err(StoreError::Thread)?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Store {
    /// Opens (creating and migrating) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Store::open_at(&Location::Sqlite(path.to_path_buf()))
    }

    /// Opens (creating and migrating) the database at `location`.
    pub fn open_at(location: &Location) -> Result<Self, StoreError> {
        let conn = Conn::open(location).map_err(|source| StoreError::Open {
            path: location.to_string(),
            source,
        })?;
        if let Some(sqlite) = conn.sqlite() {
            Store::tune_sqlite(sqlite)?;
        }
        let mut store = Store {
            conn,
            location: location.clone(),
        };
        match location.engine() {
            db::Engine::Sqlite => store.migrate_sqlite()?,
            db::Engine::Postgres => {
                store.migrate_postgres()?;
                crate::partitions::maintain(&mut store.conn, jiff::Timestamp::now())?;
            }
        }
        Ok(store)
    }

    fn tune_sqlite(conn: &rusqlite::Connection) -> Result<(), StoreError> {
        // First: every statement below may meet the running collector's write lock.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Events are clustered by id, so a fleet's inserts land on one leaf page per
        // agent (5 000 agents: ~20 MB of hot pages, plus the indexes). SQLite's default
        // 2 MB cache re-read them from the OS for every insert once the table had
        // outgrown it; 64 MiB keeps the hot pages of a large fleet in memory.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        // A group commit dirties hundreds of pages; with the default checkpoint every
        // 1 000 WAL pages nearly every commit checkpointed. 16 384 pages (64 MiB of
        // WAL) write each hot page back once for many commits.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
        Ok(())
    }

    /// Where this database is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// For the collector's writer: checkpoints are run by a [`Checkpointer`] beside it,
    /// so a commit never stops to copy the WAL into the database (a stall of seconds
    /// under a fleet's load); the writer checkpoints itself only if the WAL ever grows
    /// past [`WAL_SAFETY_PAGES`] (the checkpointer stuck).
    pub fn leave_checkpoints_to_the_background(&self) -> Result<(), StoreError> {
        if let Some(sqlite) = self.conn.sqlite() {
            sqlite.pragma_update(None, "wal_autocheckpoint", WAL_SAFETY_PAGES)?;
        }
        Ok(())
    }

    /// One PASSIVE checkpoint: copies what it can of the WAL into the database
    /// without waiting for, or blocking, the writer or readers. Returns (WAL frames,
    /// frames checkpointed); (0, 0) on PostgreSQL.
    pub fn checkpoint_passive(&self) -> Result<(i64, i64), StoreError> {
        let Some(sqlite) = self.conn.sqlite() else {
            return Ok((0, 0));
        };
        Ok(sqlite.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })?)
    }

    fn migrate_sqlite(&mut self) -> Result<(), StoreError> {
        let sqlite = self.conn.sqlite().expect("a SQLite store");
        let applied: i64 = sqlite.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if applied > known {
            return Err(StoreError::TooNew {
                found: applied,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.sqlite().expect("a SQLite transaction").pragma_update(
                None,
                "user_version",
                (i + 1) as i64,
            )?;
            tx.commit()?;
            tracing::info!(version = i + 1, "database migrated");
        }
        Ok(())
    }

    /// PostgreSQL starts at the schema SQLite reached with [`MIGRATIONS`] (one
    /// baseline, [`POSTGRES_BASELINE`]); later versions are added to both.
    fn migrate_postgres(&mut self) -> Result<(), StoreError> {
        // Times are compared as text, which needs byte order. Asked of the server's
        // behaviour, not a setting's name: an ICU collation keeps `datcollate` at C.
        let (bytewise, collation): (bool, String) = self.conn.query_row(
            "SELECT 'B' < 'a' AND '.' < 'Z' AND '-' < '0',
                    (SELECT datcollate FROM pg_database WHERE datname = current_database())",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if !bytewise {
            return Err(StoreError::Unusable {
                location: self.location.to_string(),
                reason: format!(
                    "its collation ({collation}) does not compare text byte by byte; the collector \
                     compares times as text and needs a database created with --locale C \
                     (CREATE DATABASE weilan TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C')"
                ),
            });
        }
        let tx = self.conn.transaction()?;
        // One collector migrates at a time; the others wait here.
        tx.execute_batch(
            "SELECT pg_advisory_xact_lock(7486419);
             CREATE TABLE IF NOT EXISTS weilan_schema (version BIGINT NOT NULL)",
        )?;
        let applied: i64 = tx
            .query_opt("SELECT version FROM weilan_schema", params![], |r| r.get(0))?
            .unwrap_or(0);
        let known = MIGRATIONS.len() as i64;
        if applied > known {
            return Err(StoreError::TooNew {
                found: applied,
                known,
            });
        }
        if applied < known {
            if applied != 0 && applied < POSTGRES_BASELINE_VERSION {
                return Err(StoreError::Unusable {
                    location: self.location.to_string(),
                    reason: format!(
                        "schema version {applied} has no PostgreSQL migration to {known}"
                    ),
                });
            }
            if applied == 0 {
                tx.execute_batch(POSTGRES_BASELINE)?;
            }
            let from = applied.max(POSTGRES_BASELINE_VERSION) - POSTGRES_BASELINE_VERSION;
            for migration in &POSTGRES_MIGRATIONS[from as usize..] {
                tx.execute_batch(migration)?;
            }
            tx.execute("DELETE FROM weilan_schema", params![])?;
            tx.execute(
                "INSERT INTO weilan_schema (version) VALUES (?1)",
                params![known],
            )?;
            tracing::info!(
                from = applied,
                version = known,
                "database schema brought up to date"
            );
        }
        tx.commit()?;
        Ok(())
    }

    /// The policy release for `text` (labelled `label`): the newest release if it has
    /// the same text, else a new one whose serial is above every earlier one and at
    /// least `now` in Unix seconds (so serials keep rising even if this database is
    /// replaced: agents refuse a serial that is not above the one they hold).
    pub fn policy_release(
        &mut self,
        text: &str,
        label: &str,
        now: jiff::Timestamp,
    ) -> Result<PolicyRelease, StoreError> {
        let sha256 = weilan_config::wire::PolicyPush::digest(text);
        let tx = self.conn.transaction()?;
        let newest: Option<PolicyRelease> = tx.query_opt(
            "SELECT serial, sha256, label, issued_at FROM policy_releases ORDER BY serial DESC LIMIT 1",
            params![],
            |r| {
                Ok(PolicyRelease {
                    serial: r.get::<i64>(0)? as u64,
                    sha256: r.get(1)?,
                    label: r.get(2)?,
                    issued_at: r.get(3)?,
                })
            },
        )?;
        if let Some(r) = newest.as_ref().filter(|r| r.sha256 == sha256) {
            return Ok(r.clone());
        }
        let serial = newest
            .map_or(0, |r| r.serial + 1)
            .max(now.as_second().max(1) as u64);
        let release = PolicyRelease {
            serial,
            sha256,
            label: label.to_string(),
            issued_at: now.to_string(),
        };
        tx.execute(
            "INSERT INTO policy_releases (serial, sha256, label, issued_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                release.serial as i64,
                release.sha256,
                release.label,
                release.issued_at
            ],
        )?;
        tx.commit()?;
        Ok(release)
    }

    /// Runs `f` in one durable transaction (rules on findings outside a batch).
    pub fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    pub fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// Keeps a refused payload with its reason.
    pub fn quarantine(
        &mut self,
        topic: &str,
        reason: &str,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        quarantine_in(&tx, topic, reason, payload)?;
        tx.commit()?;
        Ok(())
    }

    /// Counts payloads refused without being kept (a flooding source's excess): the
    /// per-source totals `weilan-collector quarantine` shows, no payload rows.
    pub fn count_refused(
        &mut self,
        source: &str,
        messages: u64,
        bytes: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        let now = jiff::Timestamp::now().to_string();
        self.conn.execute(
            "INSERT INTO quarantine_counts (source, refused, bytes, first_at, last_at, last_reason, kept)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5, 0)
             ON CONFLICT(source) DO UPDATE SET refused = quarantine_counts.refused + ?2,
                bytes = quarantine_counts.bytes + ?3, last_at = ?4, last_reason = ?5",
            params![source, messages as i64, bytes as i64, now, reason],
        )?;
        Ok(())
    }

    /// Refused payloads per source: (source, refused, bytes, kept rows, last time,
    /// last reason), most refused first.
    pub fn quarantine_summary(&mut self) -> Result<Vec<QuarantineSummary>, StoreError> {
        Ok(self.conn.query_map(
            "SELECT source, refused, bytes, first_at, last_at, last_reason, kept
             FROM quarantine_counts ORDER BY refused DESC, source",
            params![],
            |r| {
                Ok(QuarantineSummary {
                    source: r.get(0)?,
                    refused: r.get(1)?,
                    bytes: r.get(2)?,
                    first_at: r.get(3)?,
                    last_at: r.get(4)?,
                    last_reason: r.get(5)?,
                    kept: r.get(6)?,
                })
            },
        )?)
    }

    /// Records what an agent's status message or events say about it.
    pub fn touch_agent(
        &mut self,
        agent_id: &str,
        state: Option<&str>,
        agent_version: Option<&str>,
        policy_version: Option<&str>,
        hostname: Option<&str>,
    ) -> Result<(), StoreError> {
        touch_agent_in(
            &self.conn,
            agent_id,
            state,
            agent_version,
            policy_version,
            hostname,
        )
    }

    /// Records a command for `agent` under its next sequence number (above every
    /// earlier one and at least the current Unix millisecond) and returns the number
    /// with the payload `sign` made for it. `queued` commands wait for the running
    /// collector ([`Store::queued_commands`]); the others are published by the caller.
    pub fn record_command(
        &mut self,
        agent: &str,
        action: &str,
        reason: &str,
        expires_at: jiff::Timestamp,
        queued: bool,
        sign: impl FnOnce(u64, jiff::Timestamp) -> Vec<u8>,
    ) -> Result<(u64, Vec<u8>), StoreError> {
        let tx = self.conn.transaction()?;
        if tx.engine() == db::Engine::Postgres {
            // Two collectors (or a collector and the command line) numbering the
            // same agent's commands take turns.
            tx.execute(
                "SELECT pg_advisory_xact_lock(7486420, hashtext(?1))",
                params![agent],
            )?;
        }
        let last: i64 = tx.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM commands WHERE agent_id = ?1",
            params![agent],
            |r| r.get(0),
        )?;
        let now = jiff::Timestamp::now();
        let seq = (last + 1).max(now.as_millisecond());
        let payload = sign(seq as u64, now);
        tx.execute(
            "INSERT INTO commands (agent_id, seq, issued_at, action, reason, payload, expires_at, state, state_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?3)",
            params![
                agent,
                seq,
                now.to_string(),
                action,
                reason,
                queued.then_some(&payload),
                expires_at.as_second(),
                if queued { CommandState::Queued } else { CommandState::Sent }.as_str(),
            ],
        )?;
        tx.commit()?;
        Ok((seq as u64, payload))
    }

    /// Commands waiting to be published, oldest first (at most `limit`).
    pub fn queued_commands(&self, limit: usize) -> Result<Vec<QueuedCommand>, StoreError> {
        Ok(self.conn.query_map(
            "SELECT agent_id, seq, payload, expires_at FROM commands
             WHERE state = 'queued' ORDER BY issued_at, seq LIMIT ?1",
            params![limit as i64],
            |r| {
                Ok(QueuedCommand {
                    agent_id: r.get(0)?,
                    seq: r.get::<i64>(1)? as u64,
                    payload: r.get::<Option<Vec<u8>>>(2)?.unwrap_or_default(),
                    expires_at: r.get::<Option<i64>>(3)?.unwrap_or(i64::MAX),
                })
            },
        )?)
    }

    /// Moves queued commands to `state`.
    pub fn set_command_states(
        &mut self,
        commands: &[(String, u64)],
        state: CommandState,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let now = jiff::Timestamp::now().to_string();
        for (agent, seq) in commands {
            tx.execute(
                "UPDATE commands SET state = ?3, state_at = ?4
                 WHERE agent_id = ?1 AND seq = ?2 AND state = 'queued'",
                params![agent, *seq as i64, state.as_str(), now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Where command `seq` for `agent` stands, if it exists.
    pub fn command_state(&self, agent: &str, seq: u64) -> Result<Option<CommandState>, StoreError> {
        let state: Option<String> = self.conn.query_opt(
            "SELECT state FROM commands WHERE agent_id = ?1 AND seq = ?2",
            params![agent, seq as i64],
            |r| r.get(0),
        )?;
        Ok(state.and_then(|s| CommandState::parse(&s)))
    }

    pub fn count_events(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM events)
                      + (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM heartbeat_blocks)",
            params![],
            |r| r.get(0),
        )?)
    }

    pub fn count_quarantine(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM quarantine", params![], |r| r.get(0))?)
    }

    pub fn agent_state(&self, agent_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn.query_opt(
            "SELECT state FROM agents WHERE agent_id = ?1",
            params![agent_id],
            |r| r.get(0),
        )?)
    }
}

/// Stores a door controller's event (epoch 0, its `seq` as the sequence number) unless
/// its seq is not above the last one stored for the controller — a replay or a
/// reordering; then returns that last seq and stores nothing.
pub fn insert_controller_event(
    tx: &Tx<'_>,
    env: &weilan_config::event::Envelope,
    raw: &str,
    hash: &str,
    received_at: jiff::Timestamp,
) -> Result<ControllerInsert, StoreError> {
    let controller = &env.event_id.agent_id;
    let seq = env.event_id.key.seq as i64;
    let last: Option<i64> = tx.query_row(
        "SELECT MAX(seq) FROM events WHERE agent_id = ?1 AND epoch = 0",
        params![controller],
        |r| r.get(0),
    )?;
    if let Some(last) = last.filter(|l| *l >= seq) {
        // The very message again (a controller re-sending what it saw no ack for)
        // is a duplicate; anything else at or below the last seq is a replay.
        let stored: Option<String> = tx.query_opt(
            "SELECT hash FROM events WHERE event_id = ?1",
            params![env.event_id.to_string()],
            |r| r.get(0),
        )?;
        return Ok(if stored.as_deref() == Some(hash) {
            ControllerInsert::Duplicate
        } else {
            ControllerInsert::Stale { last }
        });
    }
    tx.execute(
        "INSERT INTO events
         (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope, hash, prev_hash)
         VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            env.event_id.to_string(),
            controller,
            seq,
            env.kind(),
            env.time.to_string(),
            received_at.to_string(),
            env.host_role,
            raw,
            hash,
            env.prev_hash,
        ],
    )?;
    Ok(ControllerInsert::Inserted)
}

/// What became of a door controller's event ([`insert_controller_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerInsert {
    Inserted,
    /// Stored before, byte for byte: acknowledged again, not stored twice.
    Duplicate,
    /// At or below the last stored seq, and not that message: a replay.
    Stale {
        last: i64,
    },
}

/// Inserts one agent's batch inside the caller's transaction (ingest commits a group
/// of batches at once): which events are new, and which keys were already held — a
/// re-send, or, when the bytes differ, a key used twice (for the integrity checks).
/// `held_elsewhere` says whether a key is held outside the `events` rows (ingest asks
/// the heartbeat blocks, `heartbeats::Held`).
pub fn insert_batch(
    tx: &Tx<'_>,
    events: &[Incoming<'_>],
    received: &str,
    mut held_elsewhere: impl FnMut(&weilan_config::event::EventId) -> Result<bool, StoreError>,
) -> Result<(BatchOutcome, Vec<usize>), StoreError> {
    let mut elsewhere = Vec::with_capacity(events.len());
    for ev in events {
        elsewhere.push(held_elsewhere(&ev.envelope.event_id)?);
    }
    let to_insert: Vec<usize> = (0..events.len()).filter(|&i| !elsewhere[i]).collect();
    let mut inserted: std::collections::HashSet<String> = std::collections::HashSet::new();
    for chunk in to_insert.chunks(ROWS_PER_INSERT) {
        inserted.extend(insert_events(tx, events, chunk, received)?);
    }
    // In the batch's order: a key inserted now is new (once, should a batch carry
    // it twice); every other one was held before.
    let mut out = BatchOutcome::default();
    let mut reused = Vec::new();
    for (i, ev) in events.iter().enumerate() {
        let id = &ev.envelope.event_id;
        out.held.push(id.key);
        if !elsewhere[i] && inserted.remove(&id.to_string()) {
            out.new.push(i);
        } else {
            out.duplicates += 1;
            reused.push(i);
        }
    }
    Ok((out, reused))
}

/// Rows per `INSERT` of [`insert_events`]: 100 rows of 11 parameters stay far below
/// either engine's limit on parameters.
const ROWS_PER_INSERT: usize = 100;

/// Inserts `events[i]` for each `i` of `rows`, on PostgreSQL in one statement (one
/// round trip instead of one per event); returns the ids it inserted, not those
/// already stored.
fn insert_events(
    tx: &Tx<'_>,
    events: &[Incoming<'_>],
    rows: &[usize],
    received: &str,
) -> Result<Vec<String>, StoreError> {
    const COLUMNS: usize = 11;
    if tx.engine() == db::Engine::Sqlite {
        // In-process, a statement per row costs no round trip, and measured faster
        // than one statement for many rows (rules bench, store only: 32 000 vs
        // 17 700 events/s).
        let mut inserted = Vec::new();
        for &i in rows {
            let (ev, env) = (&events[i], &events[i].envelope);
            let id = env.event_id.to_string();
            let n = tx.execute(
                "INSERT INTO events
                 (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope, hash, prev_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT DO NOTHING",
                params![
                    id,
                    env.event_id.agent_id,
                    env.event_id.key.epoch as i64,
                    env.event_id.key.seq as i64,
                    env.kind(),
                    env.time.to_string(),
                    received,
                    env.host_role,
                    ev.raw,
                    ev.hash,
                    env.prev_hash,
                ],
            )?;
            if n == 1 {
                inserted.push(id);
            }
        }
        return Ok(inserted);
    }
    let texts: Vec<[String; 3]> = rows
        .iter()
        .map(|&i| {
            let env = &events[i].envelope;
            [
                env.event_id.to_string(),
                env.kind().to_string(),
                env.time.to_string(),
            ]
        })
        .collect();
    let numbers: Vec<[i64; 2]> = rows
        .iter()
        .map(|&i| {
            let key = events[i].envelope.event_id.key;
            [key.epoch as i64, key.seq as i64]
        })
        .collect();
    let mut values: Vec<&dyn db::Param> = Vec::with_capacity(rows.len() * COLUMNS);
    for (n, &i) in rows.iter().enumerate() {
        let (ev, env) = (&events[i], &events[i].envelope);
        values.extend([
            &texts[n][0] as &dyn db::Param,
            &env.event_id.agent_id,
            &numbers[n][0],
            &numbers[n][1],
            &texts[n][1],
            &texts[n][2],
            &received,
            &env.host_role,
            &ev.raw,
            &ev.hash,
            &env.prev_hash,
        ]);
    }
    let placeholders: Vec<String> = (0..rows.len())
        .map(|r| {
            let cols: Vec<String> = (1..=COLUMNS)
                .map(|c| match c {
                    // epoch and seq: a VALUES list has no column types of its own.
                    3 | 4 => format!("?{}::BIGINT", r * COLUMNS + c),
                    _ => format!("?{}", r * COLUMNS + c),
                })
                .collect();
            format!("({})", cols.join(", "))
        })
        .collect();
    // `events` is partitioned by month (partitions.rs), so its key includes
    // `received_at` and cannot refuse an id stored in another month: the ids already
    // held anywhere are looked up first, by key in each month's index (a correlated
    // NOT EXISTS was planned as scans of every month: 2.4 times the CPU per event at
    // 4 months, growing with the table). The agent's turn (take_turns_for_agents)
    // keeps another collector from storing the same id meanwhile.
    // Event ids have no comma (`agent:epoch:seq`, topics::valid_agent_id).
    let ids: String = texts
        .iter()
        .map(|t| t[0].as_str())
        .collect::<Vec<_>>()
        .join(",");
    values.push(&ids);
    let sql = format!(
        "WITH held AS MATERIALIZED (
             SELECT event_id FROM events WHERE event_id = ANY(string_to_array(?{}::TEXT, ','))),
         v (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope, hash, prev_hash)
           AS (VALUES {})
         INSERT INTO events
         (event_id, agent_id, epoch, seq, kind, agent_time, received_at, host_role, envelope, hash, prev_hash)
         SELECT * FROM v WHERE v.event_id NOT IN (SELECT event_id FROM held)
         ON CONFLICT DO NOTHING RETURNING event_id",
        rows.len() * COLUMNS + 1,
        placeholders.join(", ")
    );
    Ok(tx.query_map(&sql, &values, |r| r.get(0))?)
}

/// Makes the caller's transaction the only one, fleet-wide, storing for these
/// agents until it ends. Several collectors share the ingest (`broker.shared_group`)
/// and the broker may hand one agent's consecutive batches to two of them at once;
/// taking turns per agent keeps its chain, gap and first-seen checks as exact as on
/// one collector (each sees what the other committed). With `wait`, the locks are
/// taken in one statement, in the order of their keys (two transactions never wait
/// on each other in a circle); without, each is only tried, and the agents another
/// transaction holds are returned, to be stored later. On SQLite, a single writer,
/// there is nothing to do.
pub fn take_turns_for_agents<'a>(
    tx: &Tx<'_>,
    agents: impl IntoIterator<Item = &'a str>,
    wait: bool,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut busy = std::collections::HashSet::new();
    if tx.engine() != db::Engine::Postgres {
        return Ok(busy);
    }
    // Agent ids are `[A-Za-z0-9._-]` (topics::valid_agent_id): a comma separates them.
    let mut agents: Vec<&str> = agents.into_iter().collect();
    if agents.is_empty() {
        return Ok(busy);
    }
    agents.sort_unstable();
    agents.dedup();
    if wait {
        tx.query_row(
            "SELECT COUNT(pg_advisory_xact_lock(7486421, key)) FROM (
                 SELECT DISTINCT hashtext(agent) AS key
                 FROM unnest(string_to_array(?1, ',')) AS agent ORDER BY key) AS keys",
            params![agents.join(",")],
            |r| r.get::<i64>(0),
        )?;
    } else {
        busy.extend(tx.query_map(
            "SELECT agent FROM unnest(string_to_array(?1, ',')) AS agent
             WHERE NOT pg_try_advisory_xact_lock(7486421, hashtext(agent))",
            params![agents.join(",")],
            |r| r.get::<String>(0),
        )?);
    }
    Ok(busy)
}

/// Records that `agent_id` was heard from (its status, version, policy, host name),
/// inside the caller's transaction or as one statement.
pub fn touch_agent_in(
    conn: &impl Sql,
    agent_id: &str,
    state: Option<&str>,
    agent_version: Option<&str>,
    policy_version: Option<&str>,
    hostname: Option<&str>,
) -> Result<(), StoreError> {
    let now = jiff::Timestamp::now().to_string();
    conn.execute(
        "INSERT INTO agents (agent_id, first_seen, last_seen, state, agent_version, policy_version, hostname)
         VALUES (?1, ?2, ?2, COALESCE(?3, 'online'), ?4, ?5, ?6)
         ON CONFLICT(agent_id) DO UPDATE SET
           last_seen = excluded.last_seen,
           state = COALESCE(?3, agents.state),
           agent_version = COALESCE(?4, agents.agent_version),
           policy_version = COALESCE(?5, agents.policy_version),
           hostname = COALESCE(?6, agents.hostname)",
        params![agent_id, now, state, agent_version, policy_version, hostname],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_commands_wait_in_order_and_leave_the_queue_once_sent_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let (location, _postgres) = crate::db::testing::store_location(dir.path());
        let mut store = Store::open_at(&location).unwrap();
        let later = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(600);
        let mut record = |agent: &str, queued: bool| {
            store
                .record_command(agent, "block-device", "r", later, queued, |seq, _| {
                    format!("payload {agent} {seq}").into_bytes()
                })
                .unwrap()
        };
        let (a1, p1) = record("ws-a", true);
        let (a2, _) = record("ws-a", true);
        let (b1, _) = record("ws-b", false);
        assert!(a2 > a1, "sequence numbers rise per agent");
        assert_eq!(p1, format!("payload ws-a {a1}").into_bytes());
        let queued = store.queued_commands(10).unwrap();
        assert_eq!(
            queued
                .iter()
                .map(|c| (c.agent_id.as_str(), c.seq))
                .collect::<Vec<_>>(),
            [("ws-a", a1), ("ws-a", a2)],
            "only the queued ones, oldest first"
        );
        assert_eq!(queued[0].payload, p1);
        assert_eq!(
            store.command_state("ws-b", b1).unwrap(),
            Some(CommandState::Sent)
        );
        store
            .set_command_states(&[("ws-a".into(), a1)], CommandState::Sent)
            .unwrap();
        store
            .set_command_states(&[("ws-a".into(), a2)], CommandState::Expired)
            .unwrap();
        assert!(store.queued_commands(10).unwrap().is_empty());
        assert_eq!(
            store.command_state("ws-a", a2).unwrap(),
            Some(CommandState::Expired)
        );
        // A sent command never goes back to another state.
        store
            .set_command_states(&[("ws-a".into(), a1)], CommandState::Expired)
            .unwrap();
        assert_eq!(
            store.command_state("ws-a", a1).unwrap(),
            Some(CommandState::Sent)
        );
        assert_eq!(store.command_state("ws-a", 1).unwrap(), None);
    }

    #[test]
    fn postgresql_gets_the_same_tables_and_columns_as_migrated_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let Some(pg) = crate::db::testing::TempDatabase::create("schema parity") else {
            return;
        };
        let sqlite = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let postgres = Store::open_at(&pg.location()).unwrap();
        let sqlite_columns: std::collections::BTreeSet<(String, String)> = sqlite
            .conn
            .query_map(
                "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
                 WHERE m.type = 'table'",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
            .into_iter()
            .collect();
        let postgres_columns: std::collections::BTreeSet<(String, String)> = postgres
            .conn
            .query_map(
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name <> 'weilan_schema'
                   AND table_name NOT IN (SELECT c.relname::text FROM pg_inherits i
                                          JOIN pg_class c ON c.oid = i.inhrelid)",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(postgres_columns, sqlite_columns);
        let indexes = |store: &Store, sql: &str| -> std::collections::BTreeSet<String> {
            store
                .conn
                .query_map(sql, params![], |r| r.get(0))
                .unwrap()
                .into_iter()
                .collect()
        };
        assert_eq!(
            indexes(
                &postgres,
                // The indexes of `events` itself, not each monthly partition's copy.
                "SELECT indexname::text FROM pg_indexes WHERE schemaname = current_schema() AND indexname NOT LIKE '%_pkey'
                   AND tablename NOT IN (SELECT c.relname::text FROM pg_inherits i
                                         JOIN pg_class c ON c.oid = i.inhrelid)"
            ),
            indexes(
                &sqlite,
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            ),
            "the same named indexes"
        );
    }

    #[test]
    fn a_postgresql_database_of_the_baseline_is_brought_up_to_date() {
        let Some(pg) = crate::db::testing::TempDatabase::create("baseline migrated") else {
            return;
        };
        // An event the baseline stored last month.
        let raw = serde_json::json!({
            "schema": weilan_config::event::SCHEMA_VERSION, "event_id": "ws-old:1:1",
            "time": "2026-11-10T00:00:00Z", "host_role": "workstation",
            "prev_hash": weilan_config::event::GENESIS_HASH,
            "event": {"kind": "agent.stopping", "data": {"reason": "filler"}},
        })
        .to_string();
        {
            let mut client = postgres::Client::connect(pg.url(), postgres::NoTls).unwrap();
            client.batch_execute(POSTGRES_BASELINE).unwrap();
            client
                .batch_execute(&format!(
                    "CREATE TABLE weilan_schema (version BIGINT NOT NULL);
                     INSERT INTO weilan_schema VALUES ({POSTGRES_BASELINE_VERSION});
                     INSERT INTO policy_releases VALUES (7, 'x', 'kept', 't');"
                ))
                .unwrap();
            client
                .execute(
                    "INSERT INTO events VALUES ('ws-old:1:1', 'ws-old', 1, 1, 'agent.stopping',
                       '2026-11-10T00:00:00Z', '2026-11-10T00:00:01Z', 'workstation', $1, $2, $3)",
                    &[
                        &raw,
                        &weilan_config::event::record_hash(raw.as_bytes()),
                        &weilan_config::event::GENESIS_HASH,
                    ],
                )
                .unwrap();
        }
        let mut store = Store::open_at(&pg.location()).unwrap();
        // The old table is the first monthly partition: up to next month at least.
        let partitions = crate::partitions::list(store.conn()).unwrap();
        let next_month = jiff::Timestamp::now()
            .to_zoned(jiff::tz::TimeZone::UTC)
            .date()
            .first_of_month()
            .checked_add(jiff::Span::new().months(1))
            .unwrap()
            .to_string();
        assert!(
            partitions
                .iter()
                .any(|p| p.name == "events_before_partitions"
                    && p.bounds
                        == crate::partitions::Bounds::Range {
                            from: None,
                            to: Some(next_month.clone())
                        }),
            "{partitions:?}"
        );
        assert_eq!(store.count_events().unwrap(), 1);
        // Sent again today, into another partition: a duplicate, not a second row.
        let incoming = [Incoming::parse(&raw).unwrap()];
        let (out, ()) = store
            .in_transaction(|tx| {
                crate::ingest::store_batch_in(
                    tx,
                    "ws-old",
                    &incoming,
                    jiff::Timestamp::now(),
                    |_, _, _| Ok(()),
                )
            })
            .unwrap();
        assert_eq!((out.new.len(), out.duplicates), (0, 1));
        assert_eq!(store.count_events().unwrap(), 1);
        let version: i64 = store
            .conn
            .query_row("SELECT version FROM weilan_schema", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let outbox: i64 = store
            .conn
            .query_row("SELECT count(*) FROM federation_outbox", params![], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(outbox, 0);
        let kept: String = store
            .conn
            .query_row("SELECT label FROM policy_releases", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, "kept");
    }

    #[test]
    fn a_database_of_the_previous_schema_keeps_its_badge_in_when_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..6] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 6).unwrap();
            conn.execute_batch(
                "INSERT INTO rule_seen VALUES ('builtin.usb.server-room', 'hq-dc', '(presence)', 1000);
                 INSERT INTO rule_seen VALUES ('builtin.usb.new-device', 'ws-1', 'abc', 2000);",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let presence: Vec<(String, String, i64)> = store
            .conn
            .query_map("SELECT rule_id, key, at FROM presence", params![], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(
            presence,
            vec![("builtin.usb.server-room".into(), "hq-dc".into(), 1000)]
        );
        let seen: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM rule_seen", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 1, "first-seen rows stay, the presence row moved");
    }
}

#[cfg(test)]
mod policy_release_tests {
    use super::*;

    #[test]
    fn a_release_per_distinct_text_with_rising_serials() {
        let dir = tempfile::tempdir().unwrap();
        let (location, _postgres) = crate::db::testing::store_location(dir.path());
        let mut store = Store::open_at(&location).unwrap();
        let t0: jiff::Timestamp = "2026-12-04T10:00:00Z".parse().unwrap();
        let a = store.policy_release("version = \"a\"\n", "a", t0).unwrap();
        assert_eq!(a.serial, t0.as_second() as u64);
        // The same text again (a restart, a touch): the same release.
        let again = store
            .policy_release(
                "version = \"a\"\n",
                "a",
                t0 + jiff::SignedDuration::from_secs(60),
            )
            .unwrap();
        assert_eq!(again, a);
        // New text with the same label, even with the clock set back: a higher serial.
        let earlier = t0 - jiff::SignedDuration::from_secs(3600);
        let b = store
            .policy_release("version = \"a\"\n# edited\n", "a", earlier)
            .unwrap();
        assert_eq!(b.serial, a.serial + 1);
        assert_ne!(b.sha256, a.sha256);
        // Back to the first text: still a new, higher release (agents move forward only).
        let c = store.policy_release("version = \"a\"\n", "a", t0).unwrap();
        assert_eq!(c.serial, b.serial + 1);
    }
}

#[cfg(test)]
mod quarantine_tests {
    use super::*;

    /// One source's flood prunes its own oldest evidence, never another's; every
    /// refusal is counted, pruned or not.
    #[test]
    fn a_flood_prunes_only_the_flooders_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let (location, _postgres) = crate::db::testing::store_location(dir.path());
        let mut store = Store::open_at(&location).unwrap();
        store
            .quarantine(
                "weilan/v1/agents/ws-a/events",
                "bad signature",
                b"evidence-a",
            )
            .unwrap();
        let flood = QUARANTINE_KEEP_PER_SOURCE + 250;
        for i in 0..flood {
            store
                .quarantine(
                    "weilan/v1/agents/ws-b/events",
                    "garbage",
                    format!("{i}").as_bytes(),
                )
                .unwrap();
        }
        let summary = store.quarantine_summary().unwrap();
        let of = |s: &str| summary.iter().find(|q| q.source == s).unwrap().clone();
        assert_eq!(
            (of("ws-b").refused, of("ws-b").kept),
            (flood, QUARANTINE_KEEP_PER_SOURCE)
        );
        assert_eq!((of("ws-a").refused, of("ws-a").kept), (1, 1));
        let kept_a: i64 = store
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM quarantine WHERE source = 'ws-a' AND payload = ?1",
                params![b"evidence-a".to_vec()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kept_a, 1, "ws-a's evidence survived ws-b's flood");
        let newest_b: Vec<u8> = store
            .conn()
            .query_row(
                "SELECT payload FROM quarantine WHERE source = 'ws-b' ORDER BY id DESC LIMIT 1",
                params![],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            newest_b,
            format!("{}", flood - 1).as_bytes(),
            "the newest is kept"
        );
        assert_eq!(quarantine_source("weilan/v1/doors/ctl-1/events"), "ctl-1");
    }
}
