//! `weilan-collector`: receives agents' events over MQTT with mutual TLS, stores them
//! in SQLite, raises alerts and acknowledges what it stored.
//!
//! Task graph (see `ARCHITECTURE.md`):
//!
//! ```text
//! agents --mTLS--> broker (embedded mosquitto | external) --mTLS--> MQTT session task
//!     --bounded channel--> serve loop (fair queue) --a group, spawn_blocking-->
//!     ingest (verify on every core; one transaction: store, rules; then acks)
//!     --> alert log (JSONL) ; signed ack --> broker --> agent
//! ```
// `deny`, not `forbid`: broker.rs allows one prctl between fork and exec.
#![deny(unsafe_code)]

pub mod alert_model;
pub mod alerts;
pub mod broker;
pub mod cli;
pub mod db;
pub mod enroll;
pub mod export;
pub mod fair;
pub mod federation;
pub mod fleet;
pub mod forwarder;
pub mod heartbeats;
pub mod import;
pub mod ingest;
pub mod integrity;
pub mod leader;
pub mod partitions;
pub mod pki;
/// The registry of issued certificates is part of the PKI (`pki/registry.rs`).
pub use pki::registry;
pub mod preflight;
pub mod roster;
pub mod rules;
pub mod sinks;
pub mod store;
pub mod tail;
pub mod unlock;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use weilan_config::mqtt::{self, SessionConfig, SessionEvent};
use weilan_config::policy::PolicyFile;
use weilan_config::settings::collector::{BrokerMode, CollectorSettings};
use weilan_config::signing::{Signer, Verifier};
use weilan_config::topics::{self, Channel};
use weilan_config::wire;

use crate::ingest::Ingest;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("policy: {0}")]
    Policy(#[from] weilan_config::ConfigErrors),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("alert log {path}: {source}")]
    AlertLog {
        path: String,
        source: std::io::Error,
    },
    #[error("identity: {0}")]
    Identity(#[from] weilan_config::signing::SigningError),
    #[error("TLS: {0}")]
    Tls(#[from] weilan_config::tls::TlsError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("rules: {}", .0.iter().map(|e| e.to_string()).collect::<String>())]
    Rules(Vec<weilan_config::ConfigErrors>),
    #[error(transparent)]
    Sink(#[from] sinks::SinkError),
    #[error("roster: {}", .0.join("; "))]
    Roster(Vec<String>),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error("enrollment: {0}")]
    Enroll(#[from] enroll::EnrollError),
    #[error(transparent)]
    Upstream(#[from] forwarder::UpstreamError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the collector until `shutdown` is cancelled.
pub async fn run(
    settings: CollectorSettings,
    shutdown: CancellationToken,
) -> Result<(), CollectorError> {
    let pki_dir = pki::PkiPaths::new(settings.ca.parent().unwrap_or(std::path::Path::new(".")));
    let (ingest, checkpointer, mut policy_push) =
        tokio::task::block_in_place(|| open_ingest(&settings, &pki_dir))?;
    let ingest = Arc::new(ingest);
    let (notice_tx, mut notice_rx) = tokio::sync::mpsc::channel(256);
    let broker_stop = CancellationToken::new();
    let embedded =
        start_embedded_broker(&settings, broker_stop.clone(), shutdown.clone(), notice_tx).await?;
    let mut registry_seen = ingest.registry.entry_count();
    let (refused_tx, mut refused_rx) = tokio::sync::mpsc::channel(256);
    if let Some(listen) = settings.enroll_listen {
        start_enrollment(&settings, listen, &pki_dir, refused_tx, shutdown.clone()).await?;
    }
    let session_stop = CancellationToken::new();
    let (client, mut rx, session) = mqtt::spawn(
        session_config(&settings, &ingest.signer)?,
        session_stop.clone(),
    );
    let mut broker_health = BrokerHealth::of(&settings);
    let mut watchdog = SystemdWatchdog::start();
    let mut ticks = Ticks::new(&settings);
    let mut background = Background::new(&settings);
    background.forward = start_forwarding(&settings, &ingest, &client, &shutdown)?;
    // Read from the broker into per-source queues while one message is processed;
    // sources take turns (fair.rs).
    let mut fair = fair::FairQueue::with_quota(settings.source_quota);
    let mut refusals = fair::Refusals::default();
    let mut processing: Option<tokio::task::JoinHandle<Processed>> = None;
    // Acks and commands wait here while the MQTT request channel is full; ingest
    // pauses meanwhile, so nothing is dropped and the backlog stays bounded.
    let mut outbox = Outbox::default();
    loop {
        if processing.is_none() && !outbox.backed_up() {
            processing = start_group(&ingest, &mut fair);
        }
        let replies = Replies {
            ingest: &ingest,
            client: &client,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.outbox.tick(), if !outbox.is_empty() => outbox.flush(&client),
            // Every waiting source over its quota: look again shortly.
            _ = ticks.quota.tick(), if processing.is_none() && !fair.is_empty() => {}
            done = async { processing.as_mut().expect("guarded").await }, if processing.is_some() => {
                processing = None;
                match done {
                    Ok(processed) => processed.settle(&client, &mut outbox, &mut fair),
                    Err(e) => tracing::error!(error = %e, "ingest task failed; message skipped"),
                }
            }
            _ = ticks.commands.tick() => replies.from(&mut outbox, "queued commands not sent", Ingest::queued_commands).await,
            _ = ticks.flood.tick(), if !refusals.by_source.is_empty() => {
                let refused = refusals.take();
                replies.from(&mut outbox, "flooding not counted", move |i| i.flooding(refused)).await;
            }
            // While replies are backed up no group is taken, but reading goes on: the
            // session task that delivers the replies is the one that hands over what
            // it reads (stopping here would stop both). What waits stays bounded by
            // the per-source cap (fair.rs).
            ev = rx.recv(), if fair.len() < settings.ingest_queue || outbox.backed_up() => match ev {
                Some(SessionEvent::Message { topic, payload }) => {
                    let source = store::quarantine_source(&topic);
                    if let Err(flooding) = fair.push(source, fair::Waiting { topic, payload }) {
                        refusals.note(flooding);
                    }
                }
                Some(SessionEvent::Connected) => {
                    tracing::info!("collector subscribed to agent topics");
                    broker_health.connected();
                    policy_push.publish(&client, &ingest.signer);
                    announce_online(&client, &settings.client_id, &ingest.signer);
                }
                Some(SessionEvent::Disconnected(reason)) => broker_health.disconnected(reason),
                None => break,
            },
            _ = watchdog.tick() => watchdog.keep_alive(),
            Some(notice) = notice_rx.recv() => {
                let found = vec![broker_finding(&notice)];
                replies.from(&mut outbox, "broker notice not raised", move |i| i.raise(found)).await;
            }
            _ = ticks.revocation.tick() => enforce_revocations(&ingest, &mut registry_seen, embedded.as_ref(), &pki_dir, &settings),
            Some(refusal) = refused_rx.recv() => {
                let found = vec![enroll::refusal_finding(&refusal)];
                replies.from(&mut outbox, "enrollment finding not raised", move |i| i.raise(found)).await;
            }
            _ = ticks.fleet.tick() => {
                // An invalid policy is raised with the fleet findings, off the runtime thread.
                let found = broker_health.finding().into_iter().chain(policy_push.refresh(&ingest, &client)).collect();
                let (silent, grace) = (settings.silent_after, settings.gap_grace);
                replies.from(&mut outbox, "fleet checks failed", move |i| i.fleet_checks(silent, grace, found)).await;
            }
            // A long export must not hold up ingest, nor start twice.
            _ = ticks.exports.tick() => start_scheduled_exports(&ingest, &mut background.export, &settings, &client),
            _ = ticks.imports.tick() => background.start_imports(&ingest, &client),
            _ = ticks.rules.tick() => replies.from(&mut outbox, "rule reload failed", Ingest::reload_rules).await,
            _ = ticks.report.tick() => log_counters(&ingest),
        }
    }
    watchdog.stopping();
    drain(processing, &mut outbox, &client, &fair).await;
    finish_background(&ingest, background).await;
    // Agents stop sending into a broker with nobody subscribed.
    let offline = presence_payload(&ingest.signer, wire::AgentState::Offline, 0);
    let presence = topics::collector_presence(&settings.client_id);
    let _ = client.try_publish(presence, QoS::AtLeastOnce, true, offline);
    session_stop.cancel();
    let _ = session.await;
    broker_stop.cancel();
    drop(checkpointer);
    if let Some(b) = embedded {
        b.stopped().await;
    }
    tracing::info!("collector stopped");
    Ok(())
}

/// A district's forwarder to the province (forwarder.rs), if configured;
/// it stops with `shutdown`.
fn start_forwarding(
    settings: &CollectorSettings,
    ingest: &Arc<Ingest>,
    client: &rumqttc::AsyncClient,
    shutdown: &CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, CollectorError> {
    let Some(upstream) = settings.federation.upstream.clone() else {
        return Ok(None);
    };
    let forwarder = forwarder::Forwarder::new(
        ingest.clone(),
        upstream,
        settings.max_payload_bytes,
        client.clone(),
    )?;
    tracing::info!(
        district = forwarder.district(),
        "district collector: stored batches are forwarded to the province"
    );
    Ok(Some(tokio::spawn(forwarder.run(shutdown.clone()))))
}

/// The registry merged with the shared database's (several collectors); then
/// certificates revoked since the last look: the embedded broker reloads its CRL, and
/// the sessions of identities that are gone are ended.
fn enforce_revocations(
    ingest: &Ingest,
    registry_seen: &mut usize,
    embedded: Option<&broker::SupervisedBroker>,
    pki_dir: &pki::PkiPaths,
    settings: &CollectorSettings,
) {
    if settings.shared_group.is_some() {
        tokio::task::block_in_place(|| ingest.registry.sync_shared(&ingest.store));
    }
    let revoked = ingest.registry.revoked_since(registry_seen);
    if revoked.is_empty() {
        return;
    }
    if let Some(b) = embedded {
        b.reload();
    }
    let gone = revoked
        .into_iter()
        .filter(|(_, gone)| *gone)
        .map(|(id, _)| id)
        .collect();
    end_revoked_sessions(gone, pki_dir.clone(), settings);
}

/// Opens everything ingest works with: the policy, the database (its WAL copied back
/// by a background checkpointer, never inside a commit), the alert log, the rules and
/// roster, the sinks, the collector's keys and the registry of enrolled identities;
/// the policy in force becomes a release. Called under `block_in_place`: opening may
/// connect to PostgreSQL, whose client blocks and must not run on an async worker.
fn open_ingest(
    settings: &CollectorSettings,
    pki_dir: &pki::PkiPaths,
) -> Result<(Ingest, store::Checkpointer, PolicyPublisher), CollectorError> {
    let policy = weilan_config::load_file::<PolicyFile>(&settings.policy_path)?;
    let mut store = store::Store::open_at(&crate::db::Location::of(settings))?;
    let checkpointer = store::Checkpointer::spawn(&crate::db::Location::of(settings))?;
    store.leave_checkpoints_to_the_background()?;
    let alert_log = alerts::AlertLog::open(&settings.alerts_path, settings.alerts_rotation)
        .map_err(|source| CollectorError::AlertLog {
            path: settings.alerts_path.display().to_string(),
            source,
        })?;
    let mut engine = rules::Engine::new(settings.rules_builtin, settings.rules_dir.clone())
        .map_err(CollectorError::Rules)?;
    engine.roster =
        roster::Roster::load(settings.roster.as_deref()).map_err(CollectorError::Roster)?;
    engine.shared_store = settings.shared_group.is_some();
    if engine.roster.configured() {
        tracing::info!(people = engine.roster.len(), "badge roster loaded");
    }
    tracing::info!(rules = engine.rule_set().rules().count(), files = ?engine.rule_set().files, "rules loaded");
    let mut policy_push = PolicyPublisher {
        path: settings.policy_path.clone(),
        version: policy.version.clone(),
        text: std::fs::read_to_string(&settings.policy_path).unwrap_or_default(),
        modified: std::fs::metadata(&settings.policy_path)
            .and_then(|m| m.modified())
            .ok(),
        release: None,
    };
    policy_push.new_release(&mut store)?;
    let store = Arc::new(Mutex::new(store));
    let registry = open_registry(pki_dir, settings.shared_group.is_some(), &store)?;
    let ingest = Ingest {
        store,
        alerts: Mutex::new(alert_log),
        engine: Mutex::new(engine),
        sinks: sinks::Sinks::start(&settings.sinks)?,
        policy: std::sync::RwLock::new(policy),
        verifier: Verifier::from_ca_file(&settings.ca)?,
        signer: Signer::from_pem_files(&settings.client_cert, &settings.client_key)?,
        max_payload: settings.max_payload_bytes,
        stats: Default::default(),
        last_integrity_alert: Default::default(),
        registry,
        refused: Default::default(),
        leadership: Mutex::new(leader::Leadership::new(crate::db::Location::of(settings))),
        districts: federation::Districts::open(&settings.federation.districts)?,
        forwards_to_province: settings.federation.upstream.is_some(),
    };
    tracing::info!(
        database = %crate::db::Location::of(settings),
        alerts = %settings.alerts_path.display(),
        broker = %format!("{}:{}", settings.broker_host, settings.broker_port),
        policy_version = %policy_push.version,
        "collector ready to serve"
    );
    Ok((ingest, checkpointer, policy_push))
}

/// The serve loop's clocks.
struct Ticks {
    /// Revoked certificates: the broker reloads its CRL and their sessions end.
    revocation: tokio::time::Interval,
    /// The minute's counters in the log.
    report: tokio::time::Interval,
    fleet: tokio::time::Interval,
    rules: tokio::time::Interval,
    /// Scheduled exports, retention and first-seen pruning; the first tick at start
    /// catches up missed periods.
    exports: tokio::time::Interval,
    flood: tokio::time::Interval,
    outbox: tokio::time::Interval,
    quota: tokio::time::Interval,
    /// Commands the command line queued in the database (unlock.rs); one indexed
    /// lookup per tick.
    commands: tokio::time::Interval,
    /// Journal bundles spooled for import (import.rs); one directory read per tick.
    imports: tokio::time::Interval,
}

impl Ticks {
    fn new(settings: &CollectorSettings) -> Ticks {
        let mut commands = tokio::time::interval(Duration::from_millis(250));
        commands.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Ticks {
            revocation: tokio::time::interval(Duration::from_secs(1)),
            report: tokio::time::interval(Duration::from_secs(60)),
            fleet: tokio::time::interval(settings.fleet_check_interval),
            rules: tokio::time::interval(settings.rules_reload_check),
            exports: tokio::time::interval(Duration::from_secs(60)),
            flood: tokio::time::interval(Duration::from_secs(1)),
            outbox: tokio::time::interval(Duration::from_millis(5)),
            quota: tokio::time::interval(Duration::from_millis(10)),
            commands,
            imports: tokio::time::interval(Duration::from_secs(1)),
        }
    }
}

/// A group's outcome: replies to publish, and the messages put back because another
/// collector sharing the ingest was storing for their agents.
struct Processed {
    replies: Vec<ingest::Reply>,
    put_back: Vec<fair::Waiting>,
}

/// How long a message put back waits before it is taken again: about one group's
/// commit on the collector that holds the agent.
const PUT_BACK_FOR: Duration = Duration::from_millis(5);

impl Processed {
    fn settle(
        self,
        client: &rumqttc::AsyncClient,
        outbox: &mut Outbox,
        fair: &mut fair::FairQueue,
    ) {
        outbox.send(client, self.replies);
        let not_before = std::time::Instant::now() + PUT_BACK_FOR;
        for waiting in self.put_back.into_iter().rev() {
            let source = store::quarantine_source(&waiting.topic);
            fair.put_back(source, waiting, not_before);
        }
    }
}

/// One message of every source waiting, up to a bound, goes into one transaction
/// (group commit): under load one fsync serves many agents' batches, and with a
/// single message waiting the group is that message.
fn start_group(
    ingest: &Arc<Ingest>,
    fair: &mut fair::FairQueue,
) -> Option<tokio::task::JoinHandle<Processed>> {
    if fair.is_empty() {
        return None;
    }
    let group = fair.pop_group(
        GROUP_MAX_MESSAGES,
        GROUP_MAX_BYTES,
        std::time::Instant::now(),
    );
    if group.is_empty() {
        return None;
    }
    let work = ingest.clone();
    Some(tokio::task::spawn_blocking(move || {
        let done = work.process_group(&group, ingest::AgentTurns::Defer);
        let mut put_back = Vec::with_capacity(done.deferred.len());
        for (i, waiting) in group.into_iter().enumerate() {
            if done.deferred.binary_search(&i).is_ok() {
                put_back.push(waiting);
            }
        }
        Processed {
            replies: done.replies,
            put_back,
        }
    }))
}

/// Work off the runtime thread whose replies (acks, commands, alerts' commands) go
/// out through the outbox.
struct Replies<'a> {
    ingest: &'a Arc<Ingest>,
    client: &'a rumqttc::AsyncClient,
}

impl Replies<'_> {
    /// Runs `work` on the blocking pool and sends its replies; if it panicked, the
    /// log says `failed` and the loop goes on.
    async fn from(
        &self,
        outbox: &mut Outbox,
        failed: &'static str,
        work: impl FnOnce(&Ingest) -> Vec<ingest::Reply> + Send + 'static,
    ) {
        let ingest = self.ingest.clone();
        match tokio::task::spawn_blocking(move || work(&ingest)).await {
            Ok(replies) => outbox.send(self.client, replies),
            Err(e) => tracing::error!(error = %e, "{failed}"),
        }
    }
}

/// Tells agents a collector listens: queued behind the subscriptions on the same
/// connection, so the broker routes to this collector before any agent hears of it.
fn announce_online(client: &rumqttc::AsyncClient, client_id: &str, signer: &Signer) {
    let connection = rand::random::<u64>();
    if let Err(e) = client.try_publish(
        topics::collector_presence(client_id),
        QoS::AtLeastOnce,
        true,
        presence_payload(signer, wire::AgentState::Online, connection),
    ) {
        tracing::error!(error = %e, "collector presence not published; agents fall back to their ack timeout");
    }
}

/// The collector's MQTT session: subscribed to every agent's events and status and
/// the door controllers, with its offline presence as last will (agents hold their
/// batches while no collector listens).
fn session_config(
    settings: &CollectorSettings,
    signer: &Signer,
) -> Result<SessionConfig, CollectorError> {
    let tls = weilan_config::tls::client_config(
        &settings.ca,
        &settings.client_cert,
        &settings.client_key,
        &settings.server_name,
    )?;
    Ok(SessionConfig {
        client_id: settings.client_id.clone(),
        host: settings.broker_host.clone(),
        port: settings.broker_port,
        tls,
        keep_alive: Duration::from_secs(20),
        // Agents hold their batches while no collector is subscribed.
        last_will: Some(rumqttc::LastWill::new(
            topics::collector_presence(&settings.client_id),
            presence_payload(signer, wire::AgentState::Offline, 0),
            QoS::AtLeastOnce,
            true,
        )),
        max_packet: settings.max_payload_bytes * 2 + 64 * 1024,
        request_capacity: 16384,
        max_inflight: 4096,
        incoming_capacity: settings.ingest_queue,
        subscriptions: [
            topics::all_agents_filter(Channel::Events),
            topics::all_agents_filter(Channel::Status),
            topics::DOORS_FILTER.to_string(),
        ]
        .into_iter()
        .chain(
            (!settings.federation.districts.is_empty())
                .then(|| topics::FEDERATION_FILTER.to_string()),
        )
        .map(|filter| match &settings.shared_group {
            Some(group) => topics::shared(group, &filter),
            None => filter,
        })
        .collect(),
        reconnect_spread: Duration::ZERO,
    })
}

/// The registry of enrolled identities beside the CA; a PKI from before it existed
/// is imported once.
fn open_registry(
    pki_dir: &pki::PkiPaths,
    shared: bool,
    store: &Mutex<store::Store>,
) -> Result<ingest::Enrolled, CollectorError> {
    match registry::import_if_missing(pki_dir) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            certificates = n,
            "registry created from the certificates already issued"
        ),
        Err(e) => tracing::error!(error = %e, "registry not imported"),
    }
    let enrolled = ingest::Enrolled::open(registry::path(pki_dir))?;
    if shared {
        // Before the first batch: a collector that joins finds the others' agents.
        enrolled.sync_shared(store);
        enrolled
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .refresh(&enrolled.path);
    }
    Ok(enrolled)
}

/// The enrollment listener: issues certificates for valid tokens; refusals come
/// back on `refused` to be raised as findings.
async fn start_enrollment(
    settings: &CollectorSettings,
    listen: std::net::SocketAddr,
    pki_dir: &pki::PkiPaths,
    refused: tokio::sync::mpsc::Sender<enroll::Refusal>,
    shutdown: CancellationToken,
) -> Result<(), CollectorError> {
    let tls = enroll::server_config(&settings.ca, &settings.server_cert, &settings.server_key)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| CollectorError::Listen {
            addr: listen,
            source,
        })?;
    let enroller = Arc::new(enroll::Enroller::new(
        pki_dir.clone(),
        settings.enroll_cert_days,
    ));
    tracing::info!(%listen, "enrollment listening");
    tokio::spawn(enroll::serve(listener, tls, enroller, refused, shutdown));

    Ok(())
}

/// The embedded broker (a supervised Mosquitto) when the settings ask for one; its
/// notices (refusals, restarts) arrive on `notices`.
async fn start_embedded_broker(
    settings: &CollectorSettings,
    broker_stop: CancellationToken,
    shutdown: CancellationToken,
    notice_tx: tokio::sync::mpsc::Sender<broker::BrokerNotice>,
) -> Result<Option<broker::SupervisedBroker>, CollectorError> {
    Ok(match &settings.broker {
        BrokerMode::Embedded {
            listen,
            max_connections,
            mosquitto,
        } => {
            let spec = broker::BrokerSpec {
                mosquitto: mosquitto.clone(),
                dir: settings
                    .store_path
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join("broker"),
                listen: *listen,
                max_connections: *max_connections,
                // A signed batch within the ingest limit plus MQTT framing; anything
                // bigger is refused at the broker, which disconnects the sender and
                // says so (raised below as `collector.broker_refused`).
                max_packet: settings.max_payload_bytes + 64 * 1024,
                ca: settings.ca.clone(),
                cert: settings.server_cert.clone(),
                key: settings.server_key.clone(),
                crl: pki::PkiPaths::new(settings.ca.parent().unwrap_or(std::path::Path::new(".")))
                    .dir
                    .join("crl.pem"),
                districts: settings
                    .federation
                    .districts
                    .iter()
                    .map(|d| d.name.clone())
                    .collect(),
            };
            descriptor_check(*max_connections);
            // A PKI from before revocation existed has no CRL; Mosquitto needs one.
            if !spec.crl.exists() {
                registry::write_crl(&pki::PkiPaths::new(
                    settings.ca.parent().unwrap_or(std::path::Path::new(".")),
                ))?;
            }
            Some(broker::SupervisedBroker::start(spec, broker_stop, shutdown, notice_tx).await?)
        }
        BrokerMode::External => {
            drop(notice_tx);
            None
        }
    })
}

/// At shutdown: finishes the group being processed (its acks sent), hands the
/// session what still waits for up to 2 s, and says what is left to the agents'
/// re-sends.
async fn drain(
    processing: Option<tokio::task::JoinHandle<Processed>>,
    outbox: &mut Outbox,
    client: &rumqttc::AsyncClient,
    fair: &fair::FairQueue,
) {
    // The message being processed is finished (its ack sent); what still waits is
    // not acknowledged and agents send it again.
    if let Some(p) = processing {
        if let Ok(processed) = p.await {
            outbox.send(client, processed.replies);
        }
    }
    // Hand the session what still waits (a missing ack only costs a re-send).
    let give_up = tokio::time::Instant::now() + Duration::from_secs(2);
    while !outbox.is_empty() && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(5)).await;
        outbox.flush(client);
    }
    if !outbox.is_empty() {
        tracing::info!(
            replies = outbox.waiting.len(),
            "stopping: replies not handed to the broker; their agents send again"
        );
    }
    if !fair.is_empty() {
        tracing::info!(
            waiting = fair.len(),
            "stopping: unprocessed messages left to their agents' re-send"
        );
    }
}

/// At shutdown, after the last acks: an export in progress is let finish (up to a
/// minute; otherwise its `.partial` folder is left and the next start makes it
/// again), and every sink delivers what it holds (up to 5 s; what is left is said).
/// Long work beside the serve loop: at most one export and one import at a time.
struct Background {
    export: Option<tokio::task::JoinHandle<()>>,
    import: Option<tokio::task::JoinHandle<()>>,
    /// A district's forwarder to the province (forwarder.rs); ends with `shutdown`.
    forward: Option<tokio::task::JoinHandle<()>>,
    /// Where `weilan-collector import` spools journal bundles (import.rs).
    spool: std::path::PathBuf,
}

impl Background {
    fn new(settings: &CollectorSettings) -> Background {
        let spool = import::spool_dir(&settings.store_path);
        for dir in ["incoming", "done"] {
            if let Err(e) = std::fs::create_dir_all(spool.join(dir)) {
                tracing::error!(dir = %spool.join(dir).display(), error = %e, "import spool not made; `weilan-collector import` cannot hand bundles over");
            }
        }
        Background {
            export: None,
            import: None,
            forward: None,
            spool,
        }
    }

    /// Imports what `weilan-collector import` spooled, unless an import runs.
    fn start_imports(&mut self, ingest: &Arc<Ingest>, client: &rumqttc::AsyncClient) {
        let spool = self.spool.clone();
        start_background(ingest, &mut self.import, client, move |i| {
            i.import_spooled(&spool)
        });
    }
}

async fn finish_background(ingest: &Arc<Ingest>, background: Background) {
    for (what, task) in [
        ("export", background.export),
        ("import", background.import),
        ("forwarding to the province", background.forward),
    ] {
        let Some(task) = task.filter(|t| !t.is_finished()) else {
            continue;
        };
        tracing::info!("stopping: waiting for the {what} in progress");
        if tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .is_err()
        {
            tracing::warn!("stopping: the {what} in progress did not finish within 60 s; it is done again at the next start");
        }
    }
    let work = ingest.clone();
    let left = tokio::task::spawn_blocking(move || work.sinks.drain(Duration::from_secs(5)))
        .await
        .unwrap_or_default();
    if left.is_empty() {
        tracing::info!("stopping: every sink delivered what it held");
    }
}

/// The minute's ingest, rule and sink counters, in the log.
fn log_counters(ingest: &Ingest) {
    let s = &ingest.stats;
    tracing::info!(
        messages = s.messages.load(Ordering::Relaxed),
        stored = s.events_stored.load(Ordering::Relaxed),
        duplicates = s.duplicates.load(Ordering::Relaxed),
        rejected = s.rejected.load(Ordering::Relaxed),
        alerts = s.alerts.load(Ordering::Relaxed),
        "ingest counters"
    );
    let r = ingest.engine().stats.clone();
    tracing::info!(
        facts = r.facts,
        evaluations = r.evaluations,
        matches = r.matches,
        alerts = r.alerts,
        suppressed = r.suppressed,
        errors = r.errors,
        state_dropped = r.state_dropped,
        reloads = r.reloads,
        reload_failures = r.reload_failures,
        "rule counters"
    );
    for (name, st) in ingest.sinks.stats() {
        tracing::info!(
            sink = name,
            sent = st.sent.load(Ordering::Relaxed),
            failed = st.failed.load(Ordering::Relaxed),
            dropped = st.dropped.load(Ordering::Relaxed),
            "sink counters"
        );
    }
}

/// Ends the broker sessions of revoked agents, a moment after the broker has read
/// the new CRL, and again later for an external broker that gets it later.
fn end_revoked_sessions(revoked: Vec<String>, pki: pki::PkiPaths, settings: &CollectorSettings) {
    let (host, port, name) = (
        settings.broker_host.clone(),
        settings.broker_port,
        settings.server_name.clone(),
    );
    // The broker reads the new CRL in its own time: end the sessions a
    // moment later, so that the revoked certificate cannot come back.
    // An external broker gets its CRL from the operator (deployment.md),
    // perhaps a little later: the sessions are ended again then.
    tokio::spawn(async move {
        let mut waited = Duration::ZERO;
        for at in [
            Duration::from_millis(500),
            Duration::from_secs(10),
            Duration::from_secs(60),
        ] {
            tokio::time::sleep(at - waited).await;
            waited = at;
            for id in &revoked {
                match broker::end_session(&pki, &host, port, &name, id).await {
                    Ok(()) => {
                        tracing::warn!(agent = %id, after_ms = at.as_millis() as u64, "revoked: its broker session was ended")
                    }
                    Err(e) => {
                        tracing::error!(agent = %id, error = %e, "revoked, but its broker session could not be ended")
                    }
                }
            }
        }
    });
}

/// Scheduled exports, retention and first-seen pruning on a blocking thread, unless
/// the previous round is still running.
fn start_scheduled_exports(
    ingest: &Arc<Ingest>,
    running: &mut Option<tokio::task::JoinHandle<()>>,
    settings: &CollectorSettings,
    client: &rumqttc::AsyncClient,
) {
    let settings = settings.clone();
    start_background(ingest, running, client, move |work| {
        // Once per fleet: the leader exports, applies retention and prunes.
        if !work.leads() {
            return Vec::new();
        }
        work.prune_first_seen();
        let rules = work.engine().rule_set();
        let found = export::schedule::run(&settings, &work.signer, &rules, jiff::Timestamp::now());
        work.raise(found)
    });
}

/// Long work beside the serve loop (an export, an import of a journal bundle): at
/// most one of a kind at a time; its replies are published when it ends.
fn start_background(
    ingest: &Arc<Ingest>,
    running: &mut Option<tokio::task::JoinHandle<()>>,
    client: &rumqttc::AsyncClient,
    work: impl FnOnce(&Ingest) -> Vec<ingest::Reply> + Send + 'static,
) {
    if running.as_ref().is_some_and(|t| !t.is_finished()) {
        return;
    }
    let (ingest, client) = (ingest.clone(), client.clone());
    *running = Some(tokio::task::spawn_blocking(move || {
        for r in work(&ingest) {
            let _ = client.try_publish(&r.topic, QoS::AtLeastOnce, false, r.payload);
        }
    }));
}

/// Most messages committed in one transaction.
const GROUP_MAX_MESSAGES: usize = 512;
/// Most payload bytes committed in one transaction.
const GROUP_MAX_BYTES: usize = 8 * 1024 * 1024;

/// The collector's signed presence (`topics::collector_presence`).
fn presence_payload(signer: &Signer, state: wire::AgentState, connection: u64) -> Vec<u8> {
    let presence = wire::Presence {
        state,
        connection,
        time: jiff::Timestamp::now(),
    };
    serde_json::to_string(&presence)
        .and_then(|body| serde_json::to_vec(&signer.sign(wire::Purpose::Presence, body)))
        .unwrap_or_default()
}

/// The alert finding for what the broker's log said.
fn broker_finding(notice: &broker::BrokerNotice) -> rules::Finding {
    use broker::BrokerNotice;
    let (kind, agent_id, summary, details) = match notice {
        BrokerNotice::Refused { client, reason } => (
            rules::findings::BROKER_REFUSED,
            client.clone(),
            format!("The broker refused `{client}` and disconnected it: {reason}. Weilan agents never send this; someone is using that certificate by hand"),
            serde_json::json!({"client": client, "reason": reason}),
        ),
        BrokerNotice::OutOfDescriptors => (
            rules::findings::BROKER_REFUSED,
            String::new(),
            "The broker cannot accept more connections: its file descriptor limit is reached (LimitNOFILE; broker.max_connections). Agents beyond it cannot deliver".to_string(),
            serde_json::json!({"reason": "file descriptors exhausted (EMFILE)"}),
        ),
        BrokerNotice::Exited { status, restarts } => (
            rules::findings::BROKER_RESTARTED,
            String::new(),
            format!("The embedded broker (mosquitto) exited ({status}) and was restarted ({restarts} times since the collector started); agents reconnect and re-send what was not acknowledged"),
            serde_json::json!({"status": status, "restarts": restarts}),
        ),
    };
    rules::Finding {
        kind,
        agent_id,
        summary,
        event_ids: vec![],
        details,
    }
}

/// Says at start when the descriptor limit cannot hold `max_connections` agents
/// (the unit's LimitNOFILE is sized for the default); the broker inherits it.
fn descriptor_check(max_connections: usize) {
    if let Ok((soft, _hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let needed = max_connections as u64 + 256;
        if soft < needed {
            tracing::error!(limit = soft, max_connections, "the file descriptor limit is below broker.max_connections + 256: at most {} agents can connect (raise LimitNOFILE=)", soft.saturating_sub(256));
        }
    }
}

/// How long the collector's own broker connection may fail before it is an alert:
/// a broker restart or a reconnect takes seconds, a wrong certificate name or an ACL
/// that refuses the collector never heals.
pub const BROKER_UNREACHABLE_AFTER: Duration = Duration::from_secs(30);

/// Follows the collector's own MQTT connection. Failing to reach its broker means no
/// agent event, policy or command moves: that is a red alert (through the rules, into
/// the alert log and sinks, which do not need the broker), once per outage.
struct BrokerHealth {
    broker: String,
    down_since: Option<std::time::Instant>,
    last_reason: String,
    failures: u64,
    alerted: bool,
}

impl BrokerHealth {
    /// The health of the collector's own connection to the broker it is set to.
    fn of(settings: &CollectorSettings) -> Self {
        BrokerHealth {
            broker: format!("{}:{}", settings.broker_host, settings.broker_port),
            // Not connected yet: a broker never reached at start counts from here.
            down_since: Some(std::time::Instant::now()),
            last_reason: "not connected yet".into(),
            failures: 0,
            alerted: false,
        }
    }

    fn connected(&mut self) {
        if self.alerted {
            tracing::info!(broker = %self.broker, failures = self.failures, "collector reached its broker again");
        }
        self.down_since = None;
        self.failures = 0;
        self.alerted = false;
    }

    fn disconnected(&mut self, reason: String) {
        self.failures += 1;
        self.down_since.get_or_insert_with(std::time::Instant::now);
        tracing::warn!(broker = %self.broker, %reason, failures = self.failures, "collector's broker connection failed");
        self.last_reason = reason;
    }

    /// The finding to raise now, if the outage has lasted long enough and was not
    /// raised yet.
    fn finding(&mut self) -> Option<rules::Finding> {
        let down = self.down_since?.elapsed();
        if self.alerted || down < BROKER_UNREACHABLE_AFTER {
            return None;
        }
        self.alerted = true;
        tracing::error!(broker = %self.broker, reason = %self.last_reason, down_secs = down.as_secs(), "collector cannot reach its broker");
        Some(rules::Finding {
            kind: rules::findings::BROKER_UNREACHABLE,
            agent_id: "(collector)".into(),
            summary: format!(
                "The collector has not reached its broker {} for {} s ({} failed attempts; last: {}): no agent event is being stored and no policy or command is delivered",
                self.broker,
                down.as_secs(),
                self.failures,
                self.last_reason
            ),
            event_ids: vec![],
            details: serde_json::json!({
                "broker": self.broker,
                "down_secs": down.as_secs(),
                "failures": self.failures,
                "reason": self.last_reason,
            }),
        })
    }
}

/// systemd's `Type=notify` and `WatchdogSec=`: `READY=1` once the serve loop runs, then
/// `WATCHDOG=1` from that loop at half the watchdog period, so a loop stuck (in a
/// store call, a lock) is killed and restarted. Without `NOTIFY_SOCKET` it is inert.
struct SystemdWatchdog {
    tick: Option<tokio::time::Interval>,
}

impl SystemdWatchdog {
    fn start() -> Self {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return SystemdWatchdog { tick: None };
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let mut usec = 0u64;
        let tick = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| tokio::time::interval(Duration::from_micros(usec / 2)));
        SystemdWatchdog { tick }
    }

    async fn tick(&mut self) {
        match &mut self.tick {
            Some(t) => {
                t.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    fn keep_alive(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }

    fn stopping(&self) {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        }
    }
}

/// Publishes acks and commands; one that cannot be queued is logged (an agent
/// re-sends an unacked batch; a command is counted as not sent).
/// Replies (acks, commands) not yet handed to the MQTT session. rumqttc's request
/// channel is bounded and `try_publish` must be used (the session task may itself be
/// waiting on the serve loop), so what does not fit waits here, in order.
#[derive(Default)]
struct Outbox {
    waiting: std::collections::VecDeque<ingest::Reply>,
}

/// Replies waiting beyond which no new group is taken from the fair queue.
const OUTBOX_HIGH: usize = 2048;

impl Outbox {
    fn send(&mut self, client: &rumqttc::AsyncClient, replies: Vec<ingest::Reply>) {
        self.waiting.extend(replies);
        self.flush(client);
    }

    fn flush(&mut self, client: &rumqttc::AsyncClient) {
        while let Some(reply) = self.waiting.pop_front() {
            match client.try_publish(
                &reply.topic,
                QoS::AtLeastOnce,
                reply.retain,
                reply.payload.clone(),
            ) {
                Ok(()) => {}
                Err(rumqttc::ClientError::TryRequest(_)) => {
                    // Full: try again on the next tick.
                    self.waiting.push_front(reply);
                    return;
                }
                Err(e) => tracing::warn!(topic = %reply.topic, error = %e, "reply not queued"),
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    fn backed_up(&self) -> bool {
        self.waiting.len() >= OUTBOX_HIGH
    }
}

/// Publishes the fence policy to every agent (signed, retained) and follows its file.
/// Every distinct text is a release with a rising serial (`Store::policy_release`):
/// an edit that keeps the file's `version` label is still a new release agents apply,
/// and a replayed older push is refused by them.
struct PolicyPublisher {
    path: std::path::PathBuf,
    version: String,
    text: String,
    modified: Option<std::time::SystemTime>,
    release: Option<store::PolicyRelease>,
}

impl PolicyPublisher {
    /// A changed policy file is put in force, recorded as a new release and pushed
    /// to the agents; an invalid one comes back as a finding to raise.
    fn refresh(
        &mut self,
        ingest: &Ingest,
        client: &rumqttc::AsyncClient,
    ) -> Option<rules::Finding> {
        match self.reload_if_changed() {
            Ok(Some(p)) => {
                *ingest.policy.write().unwrap_or_else(|e| e.into_inner()) = p;
                // A rare, one-row transaction; off the async workers' feet.
                let recorded =
                    tokio::task::block_in_place(|| self.new_release(&mut ingest.store()));
                match recorded {
                    Ok(()) => self.publish(client, &ingest.signer),
                    Err(e) => {
                        tracing::error!(error = %e, "policy release not recorded; not published")
                    }
                }
                None
            }
            Ok(None) => None,
            Err(invalid) => Some(invalid),
        }
    }

    /// Records (or finds) the release of the current text.
    fn new_release(&mut self, store: &mut store::Store) -> Result<(), store::StoreError> {
        let release = store.policy_release(&self.text, &self.version, jiff::Timestamp::now())?;
        tracing::info!(version = %self.version, serial = release.serial, sha256 = %release.sha256, "policy release");
        self.release = Some(release);
        Ok(())
    }

    fn publish(&self, client: &rumqttc::AsyncClient, signer: &Signer) {
        let Some(release) = &self.release else {
            return;
        };
        let push = weilan_config::wire::PolicyPush {
            version: self.version.clone(),
            policy_toml: self.text.clone(),
            serial: release.serial,
            issued_at: release.issued_at.clone(),
            sha256: release.sha256.clone(),
        };
        let Ok(body) = serde_json::to_string(&push) else {
            return;
        };
        let signed = signer.sign(weilan_config::wire::Purpose::Policy, body);
        let Ok(payload) = serde_json::to_vec(&signed) else {
            return;
        };
        match client.try_publish(
            weilan_config::topics::POLICY,
            QoS::AtLeastOnce,
            true,
            payload,
        ) {
            Ok(()) => {
                tracing::info!(version = %self.version, serial = release.serial, "policy published to agents")
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy not published; retried at the next change or reconnect")
            }
        }
    }

    /// A valid new version of the policy file, if it changed. An invalid file is
    /// logged and returned as a finding for the rules; the policy in force stays.
    fn reload_if_changed(
        &mut self,
    ) -> Result<Option<weilan_config::policy::Policy>, rules::Finding> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified == self.modified {
            return Ok(None);
        }
        self.modified = modified;
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Ok(None);
        };
        match weilan_config::load_file::<PolicyFile>(&self.path) {
            // Only the text matters: an edit that keeps the `version` label is a new
            // release all the same (it used to be published and ignored by every agent).
            Ok(_) if text == self.text => Ok(None),
            Ok(p) => {
                tracing::info!(version = %p.version, previous = %self.version, "policy file changed");
                self.version = p.version.clone();
                self.text = text;
                Ok(Some(p))
            }
            Err(e) => {
                tracing::error!(error = %e, "policy file changed but is invalid; the previous policy stays in force");
                Err(rules::Finding {
                    kind: rules::findings::POLICY_INVALID,
                    agent_id: "(collector)".into(),
                    summary: format!(
                        "The policy file {} is invalid; agents keep policy {}",
                        self.path.display(),
                        self.version
                    ),
                    event_ids: vec![],
                    details: serde_json::json!({"errors": e.to_string()}),
                })
            }
        }
    }
}
