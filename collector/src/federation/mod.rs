//! Tiered collectors (issue "Beyond one box", item 5): a district collector forwards
//! its agents' signed batches verbatim to a province collector, which verifies every
//! endpoint signature and chain itself and acknowledges each batch.
//!
//! - **District** (`[federation.upstream]`): a stored batch is queued in
//!   `federation_outbox` in the very transaction that stores it, so the agent's ack
//!   still means "committed", and now also "will reach the province". The
//!   forwarder (`crate::forwarder::Forwarder`) sends the queue in order over its own mTLS MQTT session
//!   to the province broker, and deletes a batch only when the province's signed
//!   ack for it arrives; a link that is down keeps the queue on disk.
//! - **Province** (`[[federation.districts]]`): `weilan/v1/federation/<district>/batches`
//!   is ingested like an agent's events topic, except that the signature is verified
//!   against that district's CA and the agent is the signer's common name. The
//!   district's database is not trusted: signatures, chain, gaps and duplicates are
//!   all checked here, and each agent is bound to the district it first came
//!   through, so one district cannot write into another's agents.

use std::collections::HashMap;

use weilan_config::event::EventKey;
use weilan_config::settings::federation::District;
use weilan_config::signing::{SigningError, Verifier};

use crate::db::{self, params, Sql, Tx};

/// The districts a province accepts batches from, each with its agents' CA.
#[derive(Default)]
pub struct Districts {
    verifiers: HashMap<String, Verifier>,
}

impl Districts {
    pub fn open(districts: &[District]) -> Result<Districts, SigningError> {
        let mut verifiers = HashMap::new();
        for d in districts {
            verifiers.insert(d.name.clone(), Verifier::from_ca_file(&d.ca)?);
        }
        Ok(Districts { verifiers })
    }

    /// The verifier of `district`'s agents, if this province accepts it.
    pub fn verifier(&self, district: &str) -> Option<&Verifier> {
        self.verifiers.get(district)
    }

    pub fn is_empty(&self) -> bool {
        self.verifiers.is_empty()
    }
}

/// Queues a batch just stored for the province, verbatim (inside the storing
/// transaction). A batch queued before (an agent's re-send) is queued once.
pub fn queue_for_province(
    tx: &Tx<'_>,
    agent: &str,
    first: EventKey,
    last: EventKey,
    payload: &[u8],
    now: jiff::Timestamp,
) -> Result<(), db::Error> {
    tx.execute(
        "INSERT INTO federation_outbox (agent_id, epoch, first_seq, last_seq, payload, queued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        params![
            agent,
            first.epoch,
            first.seq,
            last.seq,
            payload,
            now.to_string()
        ],
    )?;
    Ok(())
}

/// Binds `agent` to `district` the first time it is forwarded; the district it is
/// bound to (another one means the batch is refused).
pub fn bind_to_district(
    tx: &Tx<'_>,
    agent: &str,
    district: &str,
    now: jiff::Timestamp,
) -> Result<String, db::Error> {
    tx.execute(
        "INSERT INTO federated_agents (agent_id, district, first_at) VALUES (?1, ?2, ?3)
         ON CONFLICT DO NOTHING",
        params![agent, district, now.to_string()],
    )?;
    tx.query_row(
        "SELECT district FROM federated_agents WHERE agent_id = ?1",
        params![agent],
        |r| r.get(0),
    )
}

/// One queued batch, as sent to the province.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub outbox_id: i64,
    pub key: BatchKey,
    pub payload: Vec<u8>,
}

/// Which batch an ack is for: agent, epoch, first and last sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub agent: String,
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Up to `limit` queued batches after `after`, oldest first.
pub fn queued_after(sql: &impl Sql, after: i64, limit: usize) -> Result<Vec<Queued>, db::Error> {
    sql.query_map(
        "SELECT outbox_id, agent_id, epoch, first_seq, last_seq, payload FROM federation_outbox
         WHERE outbox_id > ?1 ORDER BY outbox_id LIMIT ?2",
        params![after, limit],
        |r| {
            Ok(Queued {
                outbox_id: r.get(0)?,
                key: BatchKey {
                    agent: r.get(1)?,
                    epoch: r.get::<i64>(2)? as u64,
                    first_seq: r.get::<i64>(3)? as u64,
                    last_seq: r.get::<i64>(4)? as u64,
                },
                payload: r.get(5)?,
            })
        },
    )
}

/// Removes a batch the province acknowledged; whether it was queued.
pub fn acknowledged(sql: &impl Sql, key: &BatchKey) -> Result<bool, db::Error> {
    Ok(sql.execute(
        "DELETE FROM federation_outbox
         WHERE agent_id = ?1 AND epoch = ?2 AND first_seq = ?3 AND last_seq = ?4",
        params![key.agent, key.epoch, key.first_seq, key.last_seq],
    )? > 0)
}

/// How many batches wait for the province, and when the oldest was queued.
pub fn backlog(sql: &impl Sql) -> Result<(u64, Option<String>), db::Error> {
    sql.query_row(
        "SELECT count(*), min(queued_at) FROM federation_outbox",
        params![],
        |r| Ok((r.get::<i64>(0)? as u64, r.get(1)?)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(epoch: u64, first: u64) -> EventKey {
        EventKey { epoch, seq: first }
    }

    #[test]
    fn the_outbox_keeps_order_queues_a_resend_once_and_forgets_what_was_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (location, _pg) = crate::db::testing::store_location(dir.path());
        let mut store = crate::store::Store::open_at(&location).unwrap();
        let now = jiff::Timestamp::now();
        store
            .in_transaction(|tx| {
                queue_for_province(tx, "ws-b", key(1, 1), key(1, 10), b"b1", now)?;
                queue_for_province(tx, "ws-a", key(1, 1), key(1, 5), b"a1", now)?;
                queue_for_province(tx, "ws-b", key(1, 1), key(1, 10), b"b1 again", now)?;
                queue_for_province(tx, "ws-b", key(1, 11), key(1, 12), b"b2", now)?;
                Ok(())
            })
            .unwrap();
        let all = queued_after(store.conn(), 0, 10).unwrap();
        let payloads: Vec<&[u8]> = all.iter().map(|q| q.payload.as_slice()).collect();
        assert_eq!(payloads, [&b"b1"[..], b"a1", b"b2"]);
        assert_eq!(
            queued_after(store.conn(), all[0].outbox_id, 1).unwrap()[0].payload,
            b"a1"
        );
        assert!(acknowledged(store.conn(), &all[1].key).unwrap());
        assert!(!acknowledged(store.conn(), &all[1].key).unwrap());
        let (waiting, oldest) = backlog(store.conn()).unwrap();
        assert_eq!(waiting, 2);
        assert_eq!(oldest, Some(now.to_string()));
    }

    #[test]
    fn an_agent_stays_bound_to_the_district_it_first_came_through() {
        let dir = tempfile::tempdir().unwrap();
        let (location, _pg) = crate::db::testing::store_location(dir.path());
        let mut store = crate::store::Store::open_at(&location).unwrap();
        let now = jiff::Timestamp::now();
        let bound = store
            .in_transaction(|tx| {
                Ok((
                    bind_to_district(tx, "ws-1", "weilan-district-east", now)?,
                    bind_to_district(tx, "ws-1", "weilan-district-west", now)?,
                    bind_to_district(tx, "ws-2", "weilan-district-west", now)?,
                ))
            })
            .unwrap();
        assert_eq!(
            bound,
            (
                "weilan-district-east".to_string(),
                "weilan-district-east".to_string(),
                "weilan-district-west".to_string()
            )
        );
    }
}
