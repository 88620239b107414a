//! Ingest: authenticate, decode, validate, store, alert, acknowledge.
//!
//! For an events message the order is fixed: size bound → signed-message decode →
//! certificate and signature check (the signer's certificate CN must be the agent id
//! in the topic) → batch decode → per-event checks → one durable transaction with
//! the alerts the new events raise → alert log → signed ack. Anything refused is
//! counted, logged with its reason and kept in the quarantine table; the collector
//! never stops for bad input.

use crate::db::{Sql, Tx};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use weilan_config::event::{record_hash, Envelope, EventKey};
use weilan_config::policy::Policy;
use weilan_config::signing::{Role, Signer, Verifier};
use weilan_config::topics::{self, Channel};
use weilan_config::wire::{self, Ack, EventRejection, Purpose, SignedMessage, Status};

use crate::alerts::AlertLog;
use crate::rules::{Engine, Fact, Finding, Outcome};
use crate::sinks::Sinks;
use crate::store::{self, Alert, Incoming, Store};
use crate::{fleet, integrity};

/// Counters, logged periodically and used by tests and benchmarks.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub messages: AtomicU64,
    pub events_stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub alerts: AtomicU64,
    pub batches_committed: AtomicU64,
}

/// Refusals gathered and not yet in the database, at most.
const MAX_REFUSED_WAITING: usize = 10_000;

/// A message after its signature check.
enum Authenticated {
    /// An agent's batch: from the agent itself, or forwarded `via` a district.
    Batch {
        signed: SignedMessage,
        agent: String,
        via: Option<String>,
    },
    Status {
        agent: String,
        state: &'static str,
        version: String,
    },
    /// Door controllers' messages are handled one by one after the group.
    Door,
    /// Refused (or nothing to store): what to publish.
    Replies(Vec<Reply>),
}

/// A message of a group, ready for the transaction.
enum Step<'a> {
    Batch(Decoded<'a>),
    Status {
        agent: String,
        state: &'static str,
        version: String,
    },
    Door {
        topic: String,
        payload: Vec<u8>,
    },
    Replies(Vec<Reply>),
}

/// An events message, authenticated and decoded.
struct Decoded<'a> {
    agent: &'a str,
    /// The district that forwarded it (this collector is the province's).
    via: Option<&'a str>,
    /// The signed batch as received (a district forwards it verbatim).
    payload: &'a [u8],
    batch: wire::Batch<'a>,
    valid: Vec<Incoming<'a>>,
    rejected: Vec<EventRejection>,
}

/// Most queued commands published per look (`Ingest::queued_commands`).
const QUEUED_COMMANDS_PER_TICK: usize = 256;

/// What to send back after a message.
#[derive(Clone)]
pub struct Reply {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Published retained (an empty retained payload deletes the retained message).
    pub retain: bool,
}

pub struct Ingest {
    pub store: Arc<Mutex<Store>>,
    pub alerts: Mutex<AlertLog>,
    /// The rules in force and their correlation and suppression state.
    pub engine: Mutex<Engine>,
    /// Syslog, CEF and webhook sinks.
    pub sinks: Sinks,
    /// The fence policy in force (replaced when its file changes).
    pub policy: std::sync::RwLock<Policy>,
    pub verifier: Verifier,
    pub signer: Signer,
    pub max_payload: usize,
    pub stats: IngestStats,
    /// When each agent last got a bad-signature alert (flood control).
    pub last_integrity_alert: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The enrolled identities: a certificate must be in it, not only under the CA.
    pub registry: Enrolled,
    /// Refusals not yet written (see [`Ingest::refuse`]).
    pub refused: Mutex<Vec<store::Refused>>,
    /// Whether this collector does the fleet's once-only work (leader.rs).
    pub leadership: Mutex<crate::leader::Leadership>,
    /// Province: the districts whose forwarded batches are accepted (federation/).
    pub districts: crate::federation::Districts,
    /// District: every stored batch is queued for the province.
    pub forwards_to_province: bool,
}

/// What to do with an agent another collector is storing for right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentTurns {
    /// Wait until it has committed (imports: nothing else to do meanwhile).
    Wait,
    /// Put the agent's messages back and store the group's others (the serve loop).
    Defer,
}

/// A processed group: the replies to publish, and the indexes of the messages put
/// back because another collector was storing for their agent.
#[derive(Default)]
pub struct GroupDone {
    pub replies: Vec<Reply>,
    pub deferred: Vec<usize>,
}

/// What a group's transaction did, per message: stored and ruled (`results`), put
/// back for another collector's turn (`deferred`), or refused because another
/// district forwarded it (`misrouted`, with the reason).
#[derive(Default)]
struct Committed {
    results: Vec<Option<(store::BatchOutcome, Outcome)>>,
    deferred: Vec<usize>,
    misrouted: Vec<(usize, String)>,
}

/// The largest status message (a few hundred bytes in practice).
const STATUS_MAX_BYTES: usize = 4096;

/// How long before a certificate's end the yellow "expiring" alert comes.
pub const EXPIRY_WARNING: jiff::SignedDuration = jiff::SignedDuration::from_hours(14 * 24);

/// The registry of enrolled certificates as ingest consults it: reloaded when its file
/// changes (an enrollment or `pki issue-agent` since the last look).
pub struct Enrolled {
    pub path: std::path::PathBuf,
    pub state: std::sync::RwLock<crate::registry::Registry>,
    /// Certificates (by fingerprint) already alerted as expiring.
    pub expiry_alerted: Mutex<std::collections::HashSet<String>>,
    /// Where the file stands against the registry collectors share in the database.
    pub shared: Mutex<crate::registry::SyncState>,
}

impl Enrolled {
    pub fn open(path: std::path::PathBuf) -> Result<Enrolled, crate::registry::RegistryError> {
        let state = std::sync::RwLock::new(crate::registry::Registry::load(&path)?);
        Ok(Enrolled {
            path,
            state,
            expiry_alerted: Mutex::new(Default::default()),
            shared: Mutex::new(Default::default()),
        })
    }

    /// Merges this collector's registry file with the one collectors sharing the
    /// database hold there (`registry::sync_with_store`); blocks on the database.
    pub fn sync_shared(&self, store: &Mutex<Store>) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
        match crate::registry::sync_with_store(&self.path, &*store.conn(), &mut shared) {
            Ok((0, 0)) => {}
            Ok((offered, taken)) => {
                tracing::info!(
                    offered,
                    taken,
                    "registry merged with the collectors sharing the database"
                )
            }
            Err(e) => tracing::error!(error = %e, "registry not merged with the shared database"),
        }
    }

    /// Valid certificates within `EXPIRY_WARNING` of their end, each found once per
    /// run (a yellow alert: renew or re-enroll before the agent is cut off).
    pub fn expiring(&self, now: jiff::Timestamp) -> Vec<Finding> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.refresh(&self.path);
        let mut alerted = self
            .expiry_alerted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let horizon = now + EXPIRY_WARNING;
        state
            .expiring_before(horizon)
            .into_iter()
            // A renewed agent holds a later certificate: its old one ends unmourned.
            .filter(|e| {
                state
                    .expiry_of(&e.id)
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_none_or(|latest| latest < horizon)
            })
            .filter(|e| alerted.insert(e.fingerprint.clone()))
            .map(|e| Finding {
                kind: crate::rules::findings::CERTIFICATE_EXPIRING,
                agent_id: e.id.clone(),
                summary: format!(
                    "The certificate of {} `{}` expires at {} (less than 14 days): renew it or re-enroll the host (`weilan-collector enroll create --replace {}`), or it can no longer connect",
                    e.role, e.id, e.not_after, e.id
                ),
                event_ids: vec![],
                details: serde_json::json!({"not_after": e.not_after, "fingerprint": e.fingerprint, "role": e.role}),
            })
            .collect()
    }

    /// Ids with a certificate revoked since the registry had `seen` entries (advances
    /// `seen`), each with whether it holds no valid certificate any more: the broker
    /// then reads the new CRL, and the sessions of those without one are ended. (A
    /// replaced certificate needs no more: the new one's connection, under the same
    /// client id, takes the session over.)
    pub fn revoked_since(&self, seen: &mut usize) -> Vec<(String, bool)> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.refresh(&self.path);
        let entries = state.entries();
        let from = (*seen).min(entries.len());
        *seen = entries.len();
        let mut ids: Vec<(String, bool)> = entries[from..]
            .iter()
            .filter(|e| e.action == crate::registry::Action::Revoked)
            .map(|e| (e.id.clone(), state.valid_for(&e.id).next().is_none()))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// How many entries the registry has now.
    pub fn entry_count(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .entries()
            .len()
    }

    /// Whether the certificate (base64 DER, as a signed message carries it) is
    /// enrolled and not revoked; looks at the file again before saying no.
    pub fn admits(&self, cert_b64: &str) -> bool {
        use base64::Engine as _;
        let Ok(der) = base64::engine::general_purpose::STANDARD.decode(cert_b64) else {
            return false;
        };
        let fp = crate::registry::fingerprint(&der);
        if self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .valid(&fp)
            .is_some()
        {
            return true;
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.refresh(&self.path);
        state.valid(&fp).is_some()
    }
}

impl Ingest {
    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this collector leads the fleet's once-only work now (leader.rs);
    /// blocks on PostgreSQL.
    pub fn leads(&self) -> bool {
        self.leadership
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .leads()
    }

    /// Refuses a payload: counted, logged, quarantined.
    /// Refuses a payload: counted and logged now, quarantined with the group (one
    /// transaction for all of a group's refusals: a flood of refused messages in the
    /// same group as another agent's batch must not make it wait for an fsync each).
    pub(crate) fn refuse(&self, topic: &str, reason: &str, payload: &[u8]) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%topic, %reason, size = payload.len(), "payload refused and quarantined");
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        // Only while the database keeps failing does this fill up.
        if refused.len() >= MAX_REFUSED_WAITING {
            tracing::error!(%topic, "refusals waiting for the database are at their bound; this one is counted, not kept");
            return;
        }
        refused.push(store::Refused::new(topic, reason, payload));
    }

    /// Writes the refusals gathered so far inside `tx`.
    /// They stay gathered until the transaction has committed ([`Ingest::refused_kept`]),
    /// so a group that fails to commit does not take its refusals with it.
    fn quarantine_refused(&self, tx: &Tx<'_>) -> Result<(), store::StoreError> {
        for r in self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            store::quarantine_refused_in(tx, r)?;
        }
        Ok(())
    }

    /// Forgets the refusals gathered for messages of `agents`, which are put back:
    /// they are made again when those messages are taken next.
    fn forget_refusals_of(&self, agents: &std::collections::HashSet<String>) {
        if agents.is_empty() {
            return;
        }
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| {
                topics::parse_agent_topic(&r.topic).is_none_or(|(a, _)| !agents.contains(a))
            });
    }

    /// The gathered refusals are in the database now.
    fn refused_kept(&self) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Writes the refusals gathered outside a group's transaction (door messages).
    pub(crate) fn quarantine_refused_now(&self) {
        if self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return;
        }
        match self
            .store()
            .in_transaction(|tx| self.quarantine_refused(tx))
        {
            Ok(()) => self.refused_kept(),
            Err(e) => {
                tracing::error!(error = %e, "could not quarantine refused payloads; kept for the next attempt")
            }
        }
    }

    /// Checks an agent's (retained) status; it is recorded in the group's
    /// transaction. One that is not a valid status of that agent is refused and
    /// deleted from the broker (an empty retained publish), so a certificate holder
    /// cannot park large retained messages there; the deletion itself arrives here
    /// empty and is ignored.
    fn check_status(&self, agent: &str, topic: &str, payload: &[u8]) -> Authenticated {
        if payload.is_empty() {
            return Authenticated::Replies(vec![]);
        }
        let clear = || {
            Authenticated::Replies(vec![Reply {
                topic: topic.to_string(),
                payload: vec![],
                retain: true,
            }])
        };
        match wire::decode::<Status>("a status", payload, STATUS_MAX_BYTES) {
            Ok(s) if s.agent_id == agent => {
                let state = match s.state {
                    wire::AgentState::Online => "online",
                    wire::AgentState::Offline => "offline",
                };
                tracing::info!(agent_id = agent, state, "agent status");
                Authenticated::Status {
                    agent: agent.to_string(),
                    state,
                    version: s.agent_version,
                }
            }
            Ok(s) => {
                self.refuse(
                    topic,
                    &format!("status names agent `{}`", s.agent_id),
                    payload,
                );
                clear()
            }
            Err(e) => {
                self.refuse(topic, &e.to_string(), payload);
                clear()
            }
        }
    }

    /// Decodes a signed message and proves who sent it: a certificate of `role` from
    /// the CA whose common name is the topic's `id`. A refusal is quarantined; a bad
    /// signature or a foreign signer on someone's topic is also an integrity alert
    /// (the replies to publish are the `Err`).
    fn verified(
        &self,
        topic: &str,
        payload: &[u8],
        max: usize,
        purpose: Purpose,
        role: Role,
        id: &str,
    ) -> Result<SignedMessage, Vec<Reply>> {
        let signed = wire::decode_signed(payload, max).map_err(|e| {
            self.refuse(topic, &e.to_string(), payload);
            vec![]
        })?;
        let identity = self.verifier.verify(&signed, purpose, role).map_err(|e| {
            let reason = format!("signature: {e}");
            self.refuse(topic, &reason, payload);
            self.integrity_alert(id, &reason, payload)
        })?;
        if identity.common_name != id {
            let who = match role {
                Role::DoorController => "door controller",
                _ => "agent",
            };
            let reason = format!(
                "signed by {who} `{}` but published on the topic of `{id}`",
                identity.common_name
            );
            self.refuse(topic, &reason, payload);
            return Err(self.integrity_alert(id, &reason, payload));
        }
        if !self.registry.admits(&signed.cert) {
            let reason = format!(
                "certificate of `{id}` is valid under the CA but not enrolled (not in {}, or revoked)",
                self.registry.path.display()
            );
            self.refuse(topic, &reason, payload);
            return Err(self.unenrolled_alert(id, &reason, payload));
        }
        Ok(signed)
    }

    /// Handles a group of messages taken from the fair queue: authentication and
    /// decoding run on every core, then one durable transaction stores every batch
    /// and status of the group (each batch in its own savepoint, so a failing one is
    /// not acknowledged and the others are), and only after its commit are the acks
    /// and commands returned. Per source, messages keep their order.
    ///
    /// `turns` says what to do with an agent whose batches another collector sharing
    /// the ingest is storing right now: wait for it (an import), or put its messages
    /// back for a moment (`GroupDone::deferred`) and store the others meanwhile.
    pub fn process_group(&self, messages: &[crate::fair::Waiting], turns: AgentTurns) -> GroupDone {
        use rayon::prelude::*;
        self.stats
            .messages
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        let authenticated: Vec<Authenticated> = messages
            .par_iter()
            .map(|m| self.authenticate(&m.topic, &m.payload))
            .collect();
        let decoded: Vec<Step<'_>> = authenticated
            .par_iter()
            .zip(messages.par_iter())
            .map(|(a, m)| self.decode(a, &m.topic, &m.payload))
            .collect();
        let mut replies = Vec::new();
        let now = jiff::Timestamp::now();
        let Committed {
            results: stored,
            deferred,
            misrouted,
        } = self.commit_group(&decoded, now, turns);
        for (i, reason) in misrouted {
            let m = &messages[i];
            self.refuse(&m.topic, &reason, &m.payload);
            if let Step::Batch(b) = &decoded[i] {
                replies.extend(self.integrity_alert(b.agent, &reason, &m.payload));
                if let Some(district) = b.via {
                    replies.extend(self.refusal_ack(district, &m.payload, &reason));
                }
            }
        }
        let committed = stored.iter().filter(|r| r.is_some()).count() as u64;
        if let Some(n) = crash_after_commit() {
            let before = self
                .stats
                .batches_committed
                .fetch_add(committed, Ordering::Relaxed);
            if before < n && n <= before + committed {
                tracing::error!("fault injection: aborting between commit and ack");
                std::process::abort();
            }
        }
        for (step, result) in decoded.into_iter().zip(stored) {
            match step {
                Step::Replies(r) => replies.extend(r),
                Step::Door { topic, payload } => {
                    replies.extend(self.process_door(&topic, &payload))
                }
                Step::Status { .. } => {}
                Step::Batch(b) => {
                    let Some((outcome, ruled)) = result else {
                        continue;
                    };
                    replies.extend(self.acknowledge(b, outcome, ruled));
                }
            }
        }
        self.quarantine_refused_now();
        GroupDone { replies, deferred }
    }

    /// The signature check of one message (the costly part, run in parallel); other
    /// messages are only sorted.
    fn authenticate(&self, topic: &str, payload: &[u8]) -> Authenticated {
        if topics::parse_door_topic(topic).is_some() {
            return Authenticated::Door;
        }
        if let Some((district, agent)) = topics::parse_federation_topic(topic) {
            return self.forwarded(district, agent, topic, payload);
        }
        match topics::parse_agent_topic(topic) {
            Some((agent, Channel::Events)) => match self.verified(
                topic,
                payload,
                self.max_payload,
                Purpose::Batch,
                Role::Agent,
                agent,
            ) {
                Ok(signed) => Authenticated::Batch {
                    signed,
                    agent: agent.to_string(),
                    via: None,
                },
                Err(replies) => Authenticated::Replies(replies),
            },
            Some((agent, Channel::Status)) => self.check_status(agent, topic, payload),
            Some(_) => Authenticated::Replies(vec![]),
            None => {
                self.refuse(topic, "not a Weilan agent topic", payload);
                Authenticated::Replies(vec![])
            }
        }
    }

    /// A batch a district forwarded: signed by an agent certificate of that district's
    /// CA whose common name is the topic's agent. The district's enrollment registry
    /// is its own: the province trusts the district's CA for the district's agents,
    /// and nothing else the district says.
    fn forwarded(&self, district: &str, agent: &str, topic: &str, payload: &[u8]) -> Authenticated {
        let Some(verifier) = self.districts.verifier(district) else {
            self.refuse(
                topic,
                &format!("`{district}` is not a district this collector accepts ([[federation.districts]])"),
                payload,
            );
            return Authenticated::Replies(vec![]);
        };
        let signed = match wire::decode_signed(payload, self.max_payload) {
            Ok(s) => s,
            Err(e) => {
                self.refuse(topic, &e.to_string(), payload);
                return Authenticated::Replies(vec![]);
            }
        };
        let reason = match verifier.verify(&signed, Purpose::Batch, Role::Agent) {
            Ok(identity) if identity.common_name == agent => {
                return Authenticated::Batch {
                    signed,
                    agent: agent.to_string(),
                    via: Some(district.to_string()),
                }
            }
            Ok(identity) => format!(
                "forwarded by district `{district}` for `{agent}` but signed by agent `{}`",
                identity.common_name
            ),
            Err(e) => format!("forwarded by district `{district}`: signature: {e}"),
        };
        self.refuse(topic, &reason, payload);
        let mut replies = self.integrity_alert(agent, &reason, payload);
        replies.extend(self.refusal_ack(district, payload, &reason));
        Authenticated::Replies(replies)
    }

    /// The ack of a forwarded batch this province refuses for good (a signature that
    /// fails, an agent of another district): every event rejected with the reason, so
    /// the district takes it off its queue instead of sending it forever and holding
    /// up the batches behind it. The refusal itself stays here: quarantined, alerted.
    /// The batch's keys are read unverified: they only tell the district which of its
    /// own queued batches to drop.
    fn refusal_ack(&self, district: &str, payload: &[u8], reason: &str) -> Option<Reply> {
        let signed = wire::decode_signed(payload, self.max_payload).ok()?;
        let batch = wire::decode_batch(&signed.body, self.max_payload).ok()?;
        let ack = Ack {
            agent_id: batch.agent_id.clone(),
            batch_id: batch.batch_id,
            first: batch.first,
            last: batch.last,
            stored: 0,
            duplicates: 0,
            rejected: (0..batch.events.len())
                .map(|index| EventRejection {
                    index,
                    key: None,
                    reason: format!("refused by the province: {reason}"),
                })
                .collect(),
        };
        let body = serde_json::to_string(&ack).ok()?;
        Some(Reply {
            topic: topics::federation_acks(district),
            payload: serde_json::to_vec(&self.signer.sign(Purpose::Ack, body)).ok()?,
            retain: false,
        })
    }

    /// Decodes an authenticated batch and checks each event (in parallel).
    fn decode<'a>(&self, a: &'a Authenticated, topic: &'a str, payload: &'a [u8]) -> Step<'a> {
        let (signed, agent, via) = match a {
            Authenticated::Batch { signed, agent, via } => (signed, agent.as_str(), via.as_deref()),
            Authenticated::Replies(r) => return Step::Replies(r.clone()),
            Authenticated::Door => {
                return Step::Door {
                    topic: topic.to_string(),
                    payload: payload.to_vec(),
                }
            }
            Authenticated::Status {
                agent,
                state,
                version,
            } => {
                return Step::Status {
                    agent: agent.clone(),
                    state,
                    version: version.clone(),
                }
            }
        };
        let batch = match wire::decode_batch(&signed.body, self.max_payload) {
            Ok(b) => b,
            Err(e) => {
                self.refuse(topic, &e.to_string(), payload);
                return Step::Replies(vec![]);
            }
        };
        if let Err(e) = wire::check_batch(&batch, agent) {
            self.refuse(topic, &e.to_string(), payload);
            return Step::Replies(vec![]);
        }
        let mut valid = Vec::with_capacity(batch.events.len());
        let mut rejected = Vec::new();
        for (index, raw) in batch.events.iter().enumerate() {
            let expected = EventKey {
                epoch: batch.first.epoch,
                seq: batch.first.seq + index as u64,
            };
            let text = raw.get();
            let checked = serde_json::from_str::<Envelope>(text)
                .map_err(|e| (None, format!("not a valid event: {e}")))
                .and_then(|env| {
                    let key = env.event_id.key;
                    wire::check_envelope(&env, agent)
                        .and_then(|()| {
                            if key == expected {
                                Ok(())
                            } else {
                                Err(format!(
                                    "event {key} is out of place in batch {}..={}",
                                    batch.first, batch.last
                                ))
                            }
                        })
                        .map(|()| env)
                        .map_err(|r| (Some(key), r))
                });
            match checked {
                Ok(envelope) => valid.push(Incoming {
                    envelope,
                    raw: text,
                    hash: record_hash(text.as_bytes()),
                }),
                Err((key, reason)) => {
                    self.refuse(
                        topic,
                        &format!("event #{index} of batch {}: {reason}", batch.batch_id),
                        text.as_bytes(),
                    );
                    rejected.push(EventRejection { index, key, reason });
                }
            }
        }
        Step::Batch(Decoded {
            agent,
            via,
            payload,
            batch,
            valid,
            rejected,
        })
    }

    /// One transaction for the group: every status and batch, in order; each batch
    /// in a savepoint. The result per step: `Some` for a batch stored and ruled.
    fn commit_group(
        &self,
        steps: &[Step<'_>],
        now: jiff::Timestamp,
        turns: AgentTurns,
    ) -> Committed {
        let mut results: Vec<Option<(store::BatchOutcome, Outcome)>> = Vec::new();
        let mut deferred = Vec::new();
        let mut misrouted = Vec::new();
        let agent_of = |step: &Step<'_>| match step {
            Step::Batch(b) => Some(b.agent.to_string()),
            Step::Status { agent, .. } => Some(agent.clone()),
            _ => None,
        };
        let committed = self.store().in_transaction(|tx| {
            let agents: Vec<String> = steps.iter().filter_map(agent_of).collect();
            let busy = store::take_turns_for_agents(
                tx,
                agents.iter().map(String::as_str),
                turns == AgentTurns::Wait,
            )?;
            self.forget_refusals_of(&busy);
            self.quarantine_refused(tx)?;
            let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
            for (i, step) in steps.iter().enumerate() {
                results.push(None);
                if agent_of(step).is_some_and(|a| busy.contains(&a)) {
                    deferred.push(i);
                    continue;
                }
                match step {
                    Step::Status {
                        agent,
                        state,
                        version,
                    } => {
                        if let Err(e) =
                            store::touch_agent_in(tx, agent, Some(state), Some(version), None, None)
                        {
                            tracing::error!(agent_id = %agent, error = %e, "could not record agent status");
                        }
                    }
                    Step::Batch(b) => {
                        if let Some(reason) = self.routed_by_another_district(tx, b, now)? {
                            misrouted.push((i, reason));
                            continue;
                        }
                        tx.execute_batch("SAVEPOINT batch")?;
                        match self.store_one(tx, &policy, b, now) {
                            Ok(r) => {
                                tx.execute_batch("RELEASE batch")?;
                                *results.last_mut().expect("pushed") = Some(r);
                            }
                            Err(e) => {
                                tx.execute_batch("ROLLBACK TO batch; RELEASE batch")?;
                                // Not acknowledged: the agent keeps the events and
                                // sends them again.
                                tracing::error!(agent_id = b.agent, error = %e, "batch not stored; no ack");
                            }
                        }
                    }
                    Step::Replies(_) | Step::Door { .. } => {}
                }
            }
            Ok(())
        });
        match committed {
            Ok(()) => {
                self.refused_kept();
                Committed {
                    results,
                    deferred,
                    misrouted,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, messages = steps.len(), "group not committed; nothing in it is acknowledged");
                Committed {
                    results: steps.iter().map(|_| None).collect(),
                    ..Committed::default()
                }
            }
        }
    }

    /// A forwarded batch whose agent is bound to another district than the one that
    /// forwarded it: why it is refused. Binds an agent seen for the first time.
    fn routed_by_another_district(
        &self,
        tx: &Tx<'_>,
        b: &Decoded<'_>,
        now: jiff::Timestamp,
    ) -> Result<Option<String>, store::StoreError> {
        let Some(via) = b.via else {
            return Ok(None);
        };
        let bound = crate::federation::bind_to_district(tx, b.agent, via, now)?;
        Ok((bound != via).then(|| {
            format!(
                "agent `{}` belongs to district `{bound}` but its batch was forwarded by `{via}`",
                b.agent
            )
        }))
    }

    /// One batch inside the group's transaction: events, integrity, uplink head,
    /// rules, fleet state.
    fn store_one(
        &self,
        tx: &Tx<'_>,
        policy: &Policy,
        b: &Decoded<'_>,
        now: jiff::Timestamp,
    ) -> Result<(store::BatchOutcome, Outcome), store::StoreError> {
        let (outcome, ruled) = store_batch_in(tx, b.agent, &b.valid, now, |tx, stored, found| {
            crate::integrity::note_uplink_head(tx, b.agent, b.batch.last, b.batch.head, now)?;
            let mut facts: Vec<Fact> = stored
                .iter()
                .map(|s| Fact::from_envelope(s.envelope))
                .collect();
            facts.extend(found.iter().map(|f| Fact::from_finding(f, now)));
            self.engine().evaluate(tx, policy, &facts, now)
        })?;
        let new_events: Vec<&Envelope> =
            outcome.new.iter().map(|&i| &b.valid[i].envelope).collect();
        if !new_events.is_empty() {
            fleet::note_events(tx, b.agent, &new_events)?;
        }
        if self.forwards_to_province {
            crate::federation::queue_for_province(
                tx,
                b.agent,
                b.batch.first,
                b.batch.last,
                b.payload,
                now,
            )?;
        }
        Ok((outcome, ruled))
    }

    /// After the group's commit: counters, alerts, commands, and the signed ack.
    fn acknowledge(
        &self,
        b: Decoded<'_>,
        outcome: store::BatchOutcome,
        ruled: Outcome,
    ) -> Vec<Reply> {
        self.stats
            .events_stored
            .fetch_add(outcome.new.len() as u64, Ordering::Relaxed);
        self.stats
            .duplicates
            .fetch_add(outcome.duplicates as u64, Ordering::Relaxed);
        let mut ruled = ruled;
        if b.via.is_some() && !ruled.commands.is_empty() {
            // The agent is on its district's broker, not this one: its district's
            // own rules command it; the province's alerts stand.
            tracing::info!(
                agent_id = b.agent,
                district = b.via,
                commands = ruled.commands.len(),
                "commands from the province's rules are not sent to a district's agent"
            );
            ruled.commands.clear();
        }
        let mut replies = self.after_commit(ruled);
        let ack = Ack {
            agent_id: b.agent.to_string(),
            batch_id: b.batch.batch_id,
            first: b.batch.first,
            last: b.batch.last,
            stored: outcome.new.len() as u32,
            duplicates: outcome.duplicates,
            rejected: b.rejected,
        };
        if let Ok(payload) = serde_json::to_string(&ack)
            .and_then(|body| serde_json::to_vec(&self.signer.sign(Purpose::Ack, body)))
        {
            replies.insert(
                0,
                Reply {
                    topic: match b.via {
                        Some(district) => topics::federation_acks(district),
                        None => topics::agent_topic(b.agent, Channel::Acks),
                    },
                    payload,
                    retain: false,
                },
            );
        }
        replies
    }

    /// One signed message from a door controller: verified, checked against replay
    /// (its `seq` must exceed the last stored), stored as an event of the controller
    /// (epoch 0, the seq as sequence number, host role `door-controller`) and ruled.
    fn process_door(&self, topic: &str, payload: &[u8]) -> Vec<Reply> {
        const MAX_DOOR_PAYLOAD: usize = 16 * 1024;
        let Some(controller) = topics::parse_door_topic(topic) else {
            return vec![];
        };
        let signed = match self.verified(
            topic,
            payload,
            MAX_DOOR_PAYLOAD,
            Purpose::DoorEvent,
            Role::DoorController,
            controller,
        ) {
            Ok(m) => m,
            Err(replies) => return replies,
        };
        let message: wire::DoorMessage = match serde_json::from_str(&signed.body)
            .map_err(|e| format!("not a door message: {e}"))
            .and_then(|m| wire::check_door_message(&m, controller).map(|()| m))
        {
            Ok(m) => m,
            Err(reason) => {
                self.refuse(topic, &reason, payload);
                return vec![];
            }
        };
        let envelope = message.into_envelope();
        let now = jiff::Timestamp::now();
        let result = self.store().in_transaction(|tx| {
            let raw = serde_json::to_string(&envelope).unwrap_or_default();
            let hash = record_hash(signed.body.as_bytes());
            // The controller's turn, as an agent's: with several collectors the seq
            // check and the insert must see each other's commits (the event key spans
            // months on PostgreSQL and cannot refuse the second copy itself).
            store::take_turns_for_agents(tx, [envelope.event_id.agent_id.as_str()], true)?;
            match store::insert_controller_event(tx, &envelope, &raw, &hash, now)? {
                store::ControllerInsert::Inserted => {}
                store::ControllerInsert::Duplicate => return Ok(Ok(None)),
                store::ControllerInsert::Stale { last } => return Ok(Err(last)),
            }
            let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
            self.engine()
                .evaluate(tx, &policy, &[Fact::from_envelope(&envelope)], now)
                .map(|o| Ok(Some(o)))
        });
        let seq = envelope.event_id.key.seq;
        match result {
            Ok(Ok(Some(outcome))) => {
                self.stats.events_stored.fetch_add(1, Ordering::Relaxed);
                let mut replies = self.after_commit(outcome);
                replies.extend(self.door_ack(controller, seq, true));
                replies
            }
            Ok(Ok(None)) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                self.door_ack(controller, seq, false).into_iter().collect()
            }
            Ok(Err(last)) => {
                self.refuse(
                    topic,
                    &format!(
                        "replayed or out of order: seq {} is not above the last stored, {last}",
                        envelope.event_id.key.seq
                    ),
                    payload,
                );
                vec![]
            }
            Err(e) => {
                tracing::error!(controller, error = %e, "door controller event not stored");
                vec![]
            }
        }
    }

    /// The signed ack of a door controller's event `seq` (committed; `stored` false
    /// for a re-send that was already stored), so that a controller can keep what it
    /// sends until the collector has it, as agents do.
    fn door_ack(&self, controller: &str, seq: u64, stored: bool) -> Option<Reply> {
        let key = weilan_config::event::EventKey { epoch: 0, seq };
        let ack = Ack {
            agent_id: controller.to_string(),
            batch_id: seq,
            first: key,
            last: key,
            stored: u32::from(stored),
            duplicates: u32::from(!stored),
            rejected: vec![],
        };
        let body = serde_json::to_string(&ack).ok()?;
        let payload = serde_json::to_vec(&self.signer.sign(Purpose::Ack, body)).ok()?;
        Some(Reply {
            topic: topics::door_ack_topic(controller),
            payload,
            retain: false,
        })
    }

    /// After the alerts are durable: the alert log, the sinks, and the commands
    /// (signed, each with the agent's next sequence number) to publish.
    fn after_commit(&self, outcome: Outcome) -> Vec<Reply> {
        self.publish_alerts(&outcome.alerts);
        self.sinks.dispatch(&outcome.alerts, &outcome.notify);
        let mut replies = Vec::new();
        for c in outcome.commands {
            let signed = crate::unlock::sign_command(
                &mut self.store(),
                &self.signer,
                &c.agent_id,
                c.action,
                &c.reason,
                c.valid_secs,
                false,
            );
            match signed {
                Ok((seq, payload)) => {
                    tracing::info!(agent_id = %c.agent_id, seq, reason = %c.reason, "command from a rule");
                    replies.push(Reply {
                        topic: topics::agent_topic(&c.agent_id, Channel::Commands),
                        payload,
                        retain: false,
                    });
                }
                Err(e) => {
                    tracing::error!(agent_id = %c.agent_id, error = %e, "command not signed; not sent")
                }
            }
        }
        replies
    }

    /// Runs the rules on the collector's own findings, in one transaction.
    pub fn raise(&self, found: Vec<Finding>) -> Vec<Reply> {
        if found.is_empty() {
            return vec![];
        }
        let now = jiff::Timestamp::now();
        let facts: Vec<Fact> = found.iter().map(|f| Fact::from_finding(f, now)).collect();
        let result = self.store().in_transaction(|tx| {
            let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
            self.engine().evaluate(tx, &policy, &facts, now)
        });
        match result {
            Ok(outcome) => self.after_commit(outcome),
            Err(e) => {
                tracing::error!(error = %e, findings = found.len(), "findings not stored");
                vec![]
            }
        }
    }

    /// The commands the command line queued in the database (`weilan-collector
    /// command`, `unlock --send`), as replies to publish; each is marked sent, or
    /// expired (and never sent) when its validity ended while no collector ran.
    /// Once per fleet: only the leading collector sends them (leader.rs).
    pub fn queued_commands(&self) -> Vec<Reply> {
        if !self.leads() {
            return vec![];
        }
        let mut store = self.store();
        let queued = match store.queued_commands(QUEUED_COMMANDS_PER_TICK) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, "queued commands not read");
                return vec![];
            }
        };
        if queued.is_empty() {
            return vec![];
        }
        let now = jiff::Timestamp::now().as_second();
        let (expired, live): (Vec<_>, Vec<_>) =
            queued.into_iter().partition(|c| c.expires_at <= now);
        let keys = |v: &[crate::store::QueuedCommand]| -> Vec<(String, u64)> {
            v.iter().map(|c| (c.agent_id.clone(), c.seq)).collect()
        };
        for c in &expired {
            tracing::warn!(agent_id = %c.agent_id, seq = c.seq, "queued command expired before it could be sent; not sent");
        }
        let marked = store
            .set_command_states(&keys(&expired), crate::store::CommandState::Expired)
            .and_then(|()| {
                store.set_command_states(&keys(&live), crate::store::CommandState::Sent)
            });
        if let Err(e) = marked {
            tracing::error!(error = %e, "queued commands not marked; sent on the next look");
            return vec![];
        }
        live.into_iter()
            .map(|c| {
                tracing::info!(agent_id = %c.agent_id, seq = c.seq, "queued command sent");
                Reply {
                    topic: crate::unlock::command_topic(&c.agent_id),
                    payload: c.payload,
                    retain: false,
                }
            })
            .collect()
    }

    /// Counts what flooding sources sent beyond their share and raises it, one
    /// finding per source.
    pub fn flooding(&self, refused: std::collections::HashMap<String, (u64, u64)>) -> Vec<Reply> {
        let reason = format!(
            "flooding: more than {} messages waiting from this source",
            crate::fair::PER_SOURCE_MESSAGES
        );
        let mut found = Vec::new();
        for (source, (messages, bytes)) in refused {
            tracing::warn!(%source, messages, bytes, "flooding source: messages beyond its share refused");
            if let Err(e) = self
                .store()
                .count_refused(&source, messages, bytes, &reason)
            {
                tracing::error!(%source, error = %e, "flooding refusals not counted");
            }
            self.stats.rejected.fetch_add(messages, Ordering::Relaxed);
            found.push(Finding {
                kind: crate::rules::findings::SOURCE_FLOODING,
                agent_id: source.clone(),
                summary: format!(
                    "`{source}` sent faster than the collector takes its share: {messages} messages ({bytes} bytes) refused unread (more than {} waiting). A Weilan agent never does this; other agents were served first",
                    crate::fair::PER_SOURCE_MESSAGES
                ),
                event_ids: vec![],
                details: serde_json::json!({"messages": messages, "bytes": bytes}),
            });
        }
        self.raise(found)
    }

    /// Writes alerts (already in the database) to the alert log.
    pub fn publish_alerts(&self, alerts: &[Alert]) {
        if alerts.is_empty() {
            return;
        }
        self.stats
            .alerts
            .fetch_add(alerts.len() as u64, Ordering::Relaxed);
        for a in alerts {
            tracing::warn!(level = a.level.as_str(), rule = %a.rule_id, agent_id = %a.agent_id, summary = %a.summary, "alert");
        }
        self.write_log(alerts);
    }

    /// A payload on an agent's topic that fails verification may be tampering: alert,
    /// at most once a minute per agent (the quarantine keeps every payload).
    pub(crate) fn integrity_alert(&self, agent: &str, reason: &str, payload: &[u8]) -> Vec<Reply> {
        self.flood_controlled_alert(agent, payload, |digest| {
            integrity::bad_signature(agent, reason, digest)
        })
    }

    /// A certificate the CA signed that is not in the registry: red, at most once a
    /// minute per identity.
    pub(crate) fn unenrolled_alert(&self, agent: &str, reason: &str, payload: &[u8]) -> Vec<Reply> {
        self.flood_controlled_alert(agent, payload, |digest| {
            integrity::unenrolled_certificate(agent, reason, digest)
        })
    }

    fn flood_controlled_alert(
        &self,
        agent: &str,
        payload: &[u8],
        finding: impl FnOnce(&str) -> Finding,
    ) -> Vec<Reply> {
        let now = std::time::Instant::now();
        {
            let mut last = self
                .last_integrity_alert
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last
                .get(agent)
                .is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(60))
            {
                return vec![];
            }
            if last.len() > 10_000 {
                last.clear();
            }
            last.insert(agent.to_string(), now);
        }
        let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, payload));
        self.raise(vec![finding(&digest)])
    }

    /// Periodic work: open journal gaps, silent agents, rule-state evictions, the
    /// alert log lines of suppressed repeats; `found`
    /// carries findings made elsewhere on the tick (an invalid policy file).
    pub fn fleet_checks(
        &self,
        silent_after: std::time::Duration,
        gap_grace: std::time::Duration,
        mut found: Vec<Finding>,
    ) -> Vec<Reply> {
        // Gaps, silent agents and expiring certificates are the fleet's: checked once,
        // by the leading collector (leader.rs). The rest is this collector's own.
        if self.leads() {
            let mut store = self.store();
            match integrity::open_gaps(store.conn(), gap_grace) {
                Ok(f) => found.extend(f),
                Err(e) => tracing::error!(error = %e, "gap check failed"),
            }
            match fleet::silent_agents(&mut store, silent_after) {
                Ok(f) => found.extend(f),
                Err(e) => tracing::error!(error = %e, "silent-agent check failed"),
            }
            found.extend(self.registry.expiring(jiff::Timestamp::now()));
        }
        let (updates, overflow) = {
            let mut engine = self.engine();
            (engine.take_updates(), engine.take_overflow())
        };
        found.extend(overflow);
        found.extend(self.sinks.take_failures());
        if !updates.is_empty() {
            self.write_log(&updates);
        }
        self.raise(found)
    }

    /// Drops first-seen values older than their rule's window (a scan per rule: run
    /// with the minute's housekeeping, not every fleet tick).
    pub fn prune_first_seen(&self) {
        let mut store = self.store();
        let engine = self.engine();
        if let Err(e) = store.in_transaction(|tx| engine.prune_seen(tx, jiff::Timestamp::now())) {
            tracing::error!(error = %e, "first-seen pruning failed");
        }
    }

    /// Re-reads the rule directory if it changed; a refused set is alerted.
    /// Re-reads changed rule files and the roster; a refused one becomes a finding.
    pub fn reload_rules(&self) -> Vec<Reply> {
        let (refused, roster) = {
            let mut engine = self.engine();
            (
                engine.reload_if_changed(),
                engine.roster.reload_if_changed(),
            )
        };
        let mut found: Vec<Finding> = refused.into_iter().collect();
        match roster {
            Some(Ok(people)) => tracing::info!(people, "badge roster reloaded"),
            Some(Err(errors)) => {
                tracing::error!(errors = ?errors, "badge roster refused; the previous one stays");
                found.push(Finding {
                    kind: crate::rules::findings::ROSTER_INVALID,
                    agent_id: String::new(),
                    summary: format!(
                        "badge roster refused, the previous one stays: {}",
                        errors.join("; ")
                    ),
                    event_ids: vec![],
                    details: serde_json::json!({ "errors": errors }),
                });
            }
            None => {}
        }
        self.raise(found)
    }

    fn write_log(&self, alerts: &[Alert]) {
        let mut log = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = log.write(alerts) {
            tracing::error!(path = %log.path().display(), error = %e, "alert log write failed (alerts are in the database)");
        }
    }
}

/// Stores one agent's batch inside the caller's transaction and checks it: events
/// inserted (re-sends counted as duplicates), chain, gap and key-reuse checks on
/// what is new, then `rules` on the new events and the findings — all in the one
/// transaction ingest commits (an ack means all of it is durable).
pub fn store_batch_in<T>(
    tx: &Tx<'_>,
    agent: &str,
    events: &[store::Incoming<'_>],
    received_at: jiff::Timestamp,
    rules: impl FnOnce(
        &Tx<'_>,
        &[store::Stored<'_>],
        Vec<crate::rules::Finding>,
    ) -> Result<T, store::StoreError>,
) -> Result<(store::BatchOutcome, T), store::StoreError> {
    let received = received_at.to_string();
    let mut compacted = crate::heartbeats::Held::new(tx);
    let (out, reused) = store::insert_batch(tx, events, &received, |id| compacted.holds(id))?;
    let mut found = crate::integrity::check_new(tx, agent, events, &out.new, &received)?;
    found.extend(crate::integrity::check_reused(tx, agent, events, &reused)?);
    let stored: Vec<store::Stored<'_>> = out
        .new
        .iter()
        .map(|&i| store::Stored {
            envelope: &events[i].envelope,
        })
        .collect();
    let result = rules(tx, &stored, found)?;
    Ok((out, result))
}

/// Fault injection for the crash-consistency tests: with
/// `WEILAN_FAULT_CRASH_AFTER_COMMIT=N` the collector aborts (like `kill -9`) after
/// committing its N-th batch and before acknowledging it. Never set in production.
fn crash_after_commit() -> Option<u64> {
    static N: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("WEILAN_FAULT_CRASH_AFTER_COMMIT")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// Shared handle used by the serve loop.
pub type SharedIngest = Arc<Ingest>;
