//! `weilan-agent`: the endpoint side of the Weilan electronic fence.
//!
//! Task graph (see `ARCHITECTURE.md`):
//!
//! ```text
//! sources (usb, files, network, tools, host) --EventSink (bounded)--> recorder --> journal (disk) <-- uplink <--> MQTT/mTLS
//!        ^ supervised, restarted with backoff    (group commit, fsync)     (signed batches, acks)
//! ```
//!
//! [`run`] owns every loop; the binary only parses the command line, loads the
//! settings and calls it. One shutdown path: cancelling the token stops the sources,
//! the recorder records `agent.stopping` and ends when the pipeline closes, then the
//! uplink delivers what it can within the drain timeout.
// Unsafe only where FFI lives (one ioctl in `fence::linux`), allowed there by name.
#![deny(unsafe_code)]

pub mod airgap;
pub mod classify;
pub mod cli;
pub mod commands;
pub mod enroll;
pub mod fence;
pub mod guard;
pub mod journal;
pub mod ledger;
pub mod policy_manager;
pub mod procevents;
pub mod procinfo;
pub mod recorder;
pub mod renewal;
pub mod source;
pub mod sparse;
pub mod state;
pub mod stats;
pub mod unlock;
pub mod uplink;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use weilan_config::event::{
    AgentStopping, EpochStarted, Event, PolicyApplied, SourceError as SourceErrorEvent,
};
use weilan_config::policy::{Policy, PolicyFile};
use weilan_config::settings::agent::AgentSettings;
use weilan_config::signing::{Signer, Verifier};

use crate::fence::linux::LinuxEnforcer;
use crate::fence::Fence;
use crate::journal::{Journal, JournalConfig};
use crate::recorder::Recorder;
use crate::source::usb::uevent::NetlinkBackend;
use crate::source::usb::{UsbConfig, UsbSource};
use crate::source::{EventSink, Source, SourceContext};
use crate::stats::AgentStats;
use crate::uplink::{Uplink, UplinkConfig};

/// Version of this agent build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("policy: {0}")]
    Policy(#[from] weilan_config::ConfigErrors),
    #[error("identity: {0}")]
    Identity(#[from] weilan_config::signing::SigningError),
    #[error("TLS: {0}")]
    Tls(#[from] weilan_config::tls::TlsError),
    #[error("state: {0}")]
    State(#[from] state::StateError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("door.badge_key {path}: {reason}")]
    BadgeKey { path: String, reason: String },
}

/// Loads the policy file named in the settings.
pub fn load_policy(settings: &AgentSettings) -> Result<Policy, weilan_config::ConfigErrors> {
    weilan_config::load_file::<PolicyFile>(&settings.policy)
}

/// What runs on this agent, domain by domain: platform backend → source (facts)
/// → guard (decides with the policy, acts through its enforcer). The host source
/// (start, heartbeats) always; the others as the settings enable them.
async fn sources(
    settings: &AgentSettings,
    stats: Arc<AgentStats>,
    policy_version: String,
    policy_watch: &tokio::sync::watch::Sender<Arc<Policy>>,
    fence: Option<(
        mpsc::Sender<fence::FenceFact>,
        mpsc::Sender<fence::FenceControl>,
    )>,
    sink: &EventSink,
) -> Result<Vec<Box<dyn Source>>, AgentError> {
    let mut sources: Vec<Box<dyn Source>> = vec![Box::new(source::host::HostSource::new(
        settings.heartbeat,
        Some(policy_version),
        stats,
    ))];
    if let Some(usb) = &settings.usb {
        sources.push(Box::new(UsbSource::new(
            UsbConfig {
                sysfs_root: usb.sysfs_root.clone(),
                mountinfo: usb.mountinfo.clone(),
                mount_poll: usb.mount_poll,
                dev_root: usb.dev_root.clone(),
                storage_settle: Duration::from_millis(1500),
            },
            Box::new(NetlinkBackend),
            fence.as_ref().map(|(facts, _)| facts.clone()),
        )));
    }
    // Independent of the USB fence: `[usb] enabled = false` once switched the files
    // source off too, silently.
    if let Some(files) = &settings.files {
        match files_backend(files.backend) {
            Ok(backend) => sources.push(Box::new(source::files::FilesSource::new(
                source::files::FilesConfig {
                    sysfs_root: files.sysfs_root.clone(),
                    mountinfo: files.mountinfo.clone(),
                    mount_poll: files.mount_poll,
                    watch_mounts: files.watch_mounts.clone(),
                    hash_max_bytes: files.hash_max_bytes,
                    limits: Default::default(),
                    workers: files.workers,
                    settle: Duration::from_secs(2),
                },
                backend,
                policy_watch.subscribe(),
                Arc::new(guard::files::FilesGuard::new(Box::new(
                    guard::files::linux::LinuxFileEnforcer {
                        fence: fence.as_ref().map(|(_, control)| control.clone()),
                    },
                ))),
            ))),
            Err(e) => {
                tracing::error!(error = %e, "files source unavailable");
                let _ = sink
                    .emit(Event::AgentSourceError(weilan_config::event::SourceError {
                        source: "files".into(),
                        error: e,
                        restart_in_secs: 0,
                    }))
                    .await;
            }
        }
    }
    if let Some(net) = &settings.network {
        let (all, reconcile) = (net.all_namespaces, net.reconcile);
        sources.push(Box::new(source::net::NetSource::new(
            source::net::NetConfig {
                poll: net.poll,
                max_open_files: net.max_open_files,
                collector: (settings.collector_host.clone(), settings.collector_port),
            },
            Box::new(move || {
                source::net::linux::LinuxNet::new(all, reconcile)
                    .map(|b| Box::new(b) as Box<dyn source::net::NetBackend>)
            }),
            Arc::new(guard::net::NetGuard::new(Arc::new(
                guard::net::linux::LinuxNetEnforcer,
            ))),
            policy_watch.subscribe(),
        )));
        if net.transfer_tools {
            sources.push(Box::new(source::net::tools::ToolsSource::new(Box::new(
                || {
                    source::net::tools::ProcConnector::open()
                        .map(|w| Box::new(w) as Box<dyn source::net::tools::ExecWatch>)
                },
            ))));
        }
    }
    if let Some(access) = &settings.access {
        sources.push(Box::new(source::access::source::AccessSource::new(
            source::access::source::AccessConfig {
                from: access.from,
                auth_logs: access.auth_logs.clone(),
                wtmp: access.wtmp.clone(),
                poll: access.poll,
                state_dir: settings.state_dir.clone(),
            },
        )));
    }
    if let Some(door) = &settings.door {
        sources.push(Box::new(door_source(settings, door)?));
    }
    Ok(sources)
}

/// The door role: badge readers and door contacts, with the site's badge key.
fn door_source(
    settings: &AgentSettings,
    door: &weilan_config::settings::agent::DoorSettings,
) -> Result<source::access::physical::PhysicalSource, AgentError> {
    let badge_key = match &door.badge_key {
        Some(p) if !door.readers.is_empty() => {
            weilan_config::badge::read_key(p, true).map_err(|reason| AgentError::BadgeKey {
                path: p.display().to_string(),
                reason,
            })?
        }
        _ => Vec::new(),
    };
    Ok(source::access::physical::PhysicalSource::new(
        source::access::physical::PhysicalConfig {
            site: settings.site.clone().unwrap_or_default(),
            badge_key,
            readers: door.readers.clone(),
            contacts: door.contacts.clone(),
            reader_opener: Arc::new(source::access::physical::EvdevOpener),
            line_opener: Arc::new(source::access::physical::CdevOpener),
        },
    ))
}

/// The agent's id (its certificate's common name) and the certificate in force: a
/// certificate renewed since the configured one was installed takes its place.
pub(crate) fn identity_in_force(
    settings: &AgentSettings,
) -> Result<(String, renewal::Identity), AgentError> {
    let configured = renewal::Identity {
        cert: settings.cert.clone(),
        key: settings.key.clone(),
    };
    let agent_id = Signer::from_pem_files(&configured.cert, &configured.key)?
        .identity()
        .common_name
        .clone();
    let identity = renewal::in_force(configured.clone(), &settings.state_dir, &agent_id);
    if identity != configured {
        tracing::info!(cert = %identity.cert.display(), "using the renewed certificate");
    }
    Ok((agent_id, identity))
}

/// The journal, recovered: what survived the last run, and what it lost.
fn open_journal(
    settings: &AgentSettings,
    agent_id: &str,
    policy_version: &str,
) -> Result<(Journal, journal::Recovery), AgentError> {
    let (journal, recovery) = Journal::open(JournalConfig {
        dir: settings.state_dir.join("journal"),
        state_dir: settings.state_dir.clone(),
        segment_bytes: settings.journal_segment_bytes,
        max_bytes: settings.journal_max_bytes,
        retain_acked_bytes: settings.journal_retain_acked_bytes,
    })?;
    tracing::info!(
        agent_id = %agent_id,
        next = %journal.next_key(),
        journal_records = recovery.records,
        unacked = journal.unacked(),
        policy_version = %policy_version,
        collector = %settings.collector_host,
        "agent starting"
    );
    if recovery.torn_bytes > 0 {
        tracing::warn!(
            bytes = recovery.torn_bytes,
            "a write torn by a crash was cut from the journal (it was never sent)"
        );
    }
    Ok((journal, recovery))
}

/// What the last run queued and never journaled because it was killed, as a loss
/// report (counted exactly by the capture ledger).
fn crash_loss(crash_lost: u64) -> Option<journal::Lost> {
    if crash_lost > 0 {
        tracing::error!(
            count = crash_lost,
            "the last run ended abruptly with events queued but not journaled"
        );
        return Some(journal::Lost {
            stage: "crash".into(),
            reissue_of: None,
            count: crash_lost,
            first: None,
            last: None,
            reason: format!(
                "the agent stopped abruptly (killed or crashed) with {crash_lost} captured events not yet journaled"
            ),
        });
    }
    None
}

/// How the uplink reaches the collector, from the settings.
fn uplink_config(
    settings: &AgentSettings,
    agent_id: &str,
    tls: Arc<rustls::ClientConfig>,
) -> UplinkConfig {
    UplinkConfig {
        agent_id: agent_id.to_string(),
        host: settings.collector_host.clone(),
        port: settings.collector_port,
        tls,
        delivery: settings.delivery.clone(),
        drain_timeout: Duration::from_secs(3),
    }
}

/// The USB fence: the policy, the host's groups, the Linux enforcer for its sysfs
/// and device nodes, and what it needs to check unlock tokens.
fn usb_fence(
    settings: &AgentSettings,
    usb: &weilan_config::settings::agent::UsbSettings,
    policy: &Arc<Policy>,
    sink: &EventSink,
    unlock_verifier: &Arc<Verifier>,
    agent_id: &str,
) -> Fence {
    Fence::new(
        policy.clone(),
        settings.host_groups.clone(),
        &usb.sysfs_root,
        Box::new(LinuxEnforcer {
            dev_root: usb.dev_root.clone(),
            create_missing: usb.sysfs_root != std::path::Path::new("/sys"),
        }),
        sink.clone(),
    )
    .with_mountinfo(usb.mountinfo.clone())
    .with_unlocks(fence::UnlockSetup {
        verifier: unlock_verifier.clone(),
        agent_id: agent_id.to_string(),
        store: unlock::UnlockStore::new(&settings.state_dir),
    })
}

/// The agent's tasks while it runs, stopped in one order (`Running::stop`).
struct Running {
    supervised: JoinSet<()>,
    fence_tx: mpsc::Sender<fence::FenceFact>,
    fence_task: Option<tokio::task::JoinHandle<()>>,
    policy_task: tokio::task::JoinHandle<()>,
    command_task: tokio::task::JoinHandle<()>,
    renewal: Option<tokio::task::JoinHandle<()>>,
    sink: EventSink,
    recorder: tokio::task::JoinHandle<()>,
    drain: CancellationToken,
    uplink: tokio::task::JoinHandle<()>,
    watchdog: tokio::task::JoinHandle<()>,
}

impl Running {
    /// The one shutdown path: sources first, then the fence and the gates, then
    /// `agent.stopping` is recorded, the recorder drains the pipeline into the
    /// journal, and the uplink delivers what it can within its drain timeout.
    async fn stop(mut self) {
        while self.supervised.join_next().await.is_some() {}
        drop(self.fence_tx);
        if let Some(t) = self.fence_task {
            let _ = t.await;
        }
        let _ = self.policy_task.await;
        let _ = self.command_task.await;
        // A renewal in progress is abandoned: its files are replaced atomically, and the
        // next start renews again if it has to.
        if let Some(r) = self.renewal {
            r.abort();
        }
        let _ = self
            .sink
            .emit(Event::AgentStopping(AgentStopping {
                reason: "signal".into(),
            }))
            .await;
        drop(self.sink);
        let _ = self.recorder.await;
        self.drain.cancel();
        let _ = self.uplink.await;
        let _ = self.watchdog.await;
    }
}

/// Certificate renewal, when the collector offers it (`renew_port`): renews before
/// the certificate ends and hands the new identity to the uplink.
fn spawn_renewal(
    settings: &AgentSettings,
    agent_id: &str,
    identity: &renewal::Identity,
    switch_tx: mpsc::Sender<renewal::Switch>,
    shutdown: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    settings.renew_port.map(|port| {
        tokio::spawn(renewal::run(
            renewal::RenewalConfig {
                agent_id: agent_id.to_string(),
                collector: format!("{}:{port}", settings.collector_host),
                server_name: settings.server_name.clone(),
                ca: settings.ca.clone(),
                state_dir: settings.state_dir.clone(),
            },
            identity.clone(),
            switch_tx,
            shutdown.clone(),
        ))
    })
}

/// The recording half of the pipeline: the journal, recovered, and the recorder that
/// numbers, chains and journals every event the sources emit through `sink`.
struct Recording {
    journal: Arc<Mutex<Journal>>,
    /// Rung when the journal has something new for the uplink.
    notify: Arc<Notify>,
    sink: EventSink,
    recorder: tokio::task::JoinHandle<()>,
}

/// Opens the journal and the capture ledger and starts the recorder; the new epoch's
/// first events say what the last run lost (a torn write, events queued but never
/// journaled because it was killed — counted exactly).
fn start_recording(
    settings: &AgentSettings,
    agent_id: &str,
    policy_version: &str,
    stats: &Arc<AgentStats>,
) -> Result<Recording, AgentError> {
    let (installation, installation_new) = state::installation(&settings.state_dir)?;
    let (journal, recovery) = open_journal(settings, agent_id, policy_version)?;
    let journal = Arc::new(Mutex::new(journal));
    let notify = Arc::new(Notify::new());
    let source_drops = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel(settings.pipeline_capacity);
    let (ledger, crash_lost) = ledger::CaptureLedger::open(&settings.state_dir)?;
    let ledger = Arc::new(ledger);
    let mut recovered = recovery.lost;
    recovered.extend(crash_loss(crash_lost));
    let sink = EventSink::new(tx, source_drops.clone()).with_ledger(ledger.clone());
    let mut recorder = Recorder::new(
        agent_id.to_string(),
        settings.host_role.as_str(),
        settings.site.clone(),
        journal.clone(),
        notify.clone(),
        stats.clone(),
        source_drops,
    );
    recorder.ledger = Some(ledger);
    let started = EpochStarted {
        installation,
        installation_new,
        previous: recovery.previous,
    };
    let recorder =
        tokio::task::spawn_blocking(move || recorder.run_blocking(rx, started, recovered));
    Ok(Recording {
        journal,
        notify,
        sink,
        recorder,
    })
}

/// The first event of a run: which policy is in force and where it came from.
fn policy_in_force(
    policy: &Policy,
    source: &'static str,
    release: &policy_manager::Release,
) -> Event {
    Event::PolicyApplied(PolicyApplied {
        version: policy.version.clone(),
        previous: None,
        source: source.into(),
        serial: (release.serial > 0).then_some(release.serial),
        sha256: (!release.sha256.is_empty()).then(|| release.sha256.clone()),
    })
}

/// Every source under supervision, each in its own span.
fn supervise_all(
    sources: Vec<Box<dyn Source>>,
    sink: &EventSink,
    shutdown: &CancellationToken,
) -> JoinSet<()> {
    let ctx = SourceContext {
        sink: sink.clone(),
        shutdown: shutdown.clone(),
    };
    let mut supervised = JoinSet::new();
    for source in sources {
        let span = tracing::info_span!("source", name = source.name());
        supervised.spawn(supervise(source, ctx.clone()).instrument(span));
    }
    supervised
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(settings: AgentSettings, shutdown: CancellationToken) -> Result<(), AgentError> {
    let (agent_id, identity) = identity_in_force(&settings)?;
    let signer = Signer::from_pem_files(&identity.cert, &identity.key)?;
    let verifier = Verifier::from_ca_file(&settings.ca)?;
    let unlock_verifier = Arc::new(Verifier::from_ca_file(&settings.ca)?);
    let tls = weilan_config::tls::client_config(
        &settings.ca,
        &identity.cert,
        &identity.key,
        &settings.server_name,
    )?;
    let (switch_tx, switch_rx) = mpsc::channel(1);
    let renewal = spawn_renewal(&settings, &agent_id, &identity, switch_tx, &shutdown);
    let (policy, policy_source, policy_release) =
        policy_manager::initial(&settings.state_dir, &settings.policy)?;
    let stats = Arc::new(AgentStats::default());
    stats.set_policy_version(&policy.version);
    let Recording {
        journal,
        notify,
        sink,
        recorder,
    } = start_recording(&settings, &agent_id, &policy.version, &stats)?;
    let (policy_tx, policy_rx) = mpsc::channel(4);
    let (fence_control, fence_control_rx) = mpsc::channel(8);
    let (commands_tx, commands_rx) = mpsc::channel(64);
    let watchdog = tokio::spawn(watchdog(stats.clone(), shutdown.clone()));

    let drain = CancellationToken::new();
    let uplink = Uplink {
        config: uplink_config(&settings, &agent_id, tls),
        signer,
        identity_switches: switch_rx,
        verifier,
        policy_pushes: policy_tx,
        commands: commands_tx,
        journal,
        notify,
        stats: stats.clone(),
        ack_drop: airgap::ack_drop_dir(&settings.state_dir),
    };
    let uplink = tokio::spawn(uplink.run(drain.clone()));

    let policy = Arc::new(policy);
    let _ = sink
        .emit(policy_in_force(&policy, policy_source, &policy_release))
        .await;
    let (fence_tx, fence_rx) = mpsc::channel(256);
    let policy_watch = tokio::sync::watch::Sender::new(policy.clone());
    let command_task = tokio::spawn(
        commands::CommandGate {
            agent_id: agent_id.clone(),
            verifier: unlock_verifier.clone(),
            seq_file: settings.state_dir.join("command-seq"),
            sink: sink.clone(),
            fence: settings.usb.as_ref().map(|_| fence_control.clone()),
            policy_version: stats.clone(),
            policy: policy_watch.subscribe(),
        }
        .run(commands_rx, shutdown.clone()),
    );
    let policy_task = tokio::spawn(
        policy_manager::PolicyManager {
            state_dir: settings.state_dir.clone(),
            current: policy.version.clone(),
            release: policy_release.clone(),
            last_refused: None,
            fence: settings.usb.as_ref().map(|_| fence_control.clone()),
            policy_watch: policy_watch.clone(),
            sink: sink.clone(),
            stats: stats.clone(),
        }
        .run(policy_rx, shutdown.clone()),
    );
    let fence_task = settings.usb.as_ref().map(|usb| {
        let fence = usb_fence(&settings, usb, &policy, &sink, &unlock_verifier, &agent_id);
        tokio::spawn(
            fence
                .run(fence_rx, fence_control_rx, shutdown.clone())
                .instrument(tracing::info_span!("fence")),
        )
    });

    let fence_links = fence_task
        .as_ref()
        .map(|_| (fence_tx.clone(), fence_control.clone()));
    let sources = sources(
        &settings,
        stats,
        policy.version.clone(),
        &policy_watch,
        fence_links,
        &sink,
    )
    .await?;
    let supervised = supervise_all(sources, &sink, &shutdown);

    shutdown.cancelled().await;
    tracing::info!("agent stopping");
    Running {
        supervised,
        fence_tx,
        fence_task,
        policy_task,
        command_task,
        renewal,
        sink,
        recorder,
        drain,
        uplink,
        watchdog,
    }
    .stop()
    .await;
    tracing::info!("agent stopped");
    Ok(())
}

/// systemd integration: `READY=1` once running, then `WATCHDOG=1` keep-alives — but
/// only while the recorder loop is alive, so a wedged agent is restarted by systemd.
/// Without `NOTIFY_SOCKET` (not under systemd) this does nothing.
async fn watchdog(stats: Arc<AgentStats>, shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut usec = 0u64;
    let period = if sd_notify::watchdog_enabled(false, &mut usec) {
        Duration::from_micros(usec / 2)
    } else {
        Duration::from_secs(10)
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                return;
            }
            _ = tick.tick() => {
                if stats.recorder_idle() < Duration::from_secs(5) {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!(idle_secs = stats.recorder_idle().as_secs(), "recorder loop stalled; withholding the watchdog keep-alive");
                }
            }
        }
    }
}

/// Runs a source, restarting it with exponential backoff when it fails; every
/// failure becomes an `agent.source_error` event.
async fn supervise(mut source: Box<dyn Source>, ctx: SourceContext) {
    let name = source.name();
    let mut backoff = Duration::from_secs(1);
    loop {
        match source.run(&ctx).await {
            Ok(()) => return,
            Err(source::SourceError::PipelineClosed) => return,
            Err(e) => {
                if ctx.shutdown.is_cancelled() {
                    return;
                }
                tracing::error!(source = name, error = %e, restart_in_secs = backoff.as_secs(), "source failed; restarting");
                let _ = ctx
                    .sink
                    .emit(Event::AgentSourceError(SourceErrorEvent {
                        source: name.into(),
                        error: e.to_string(),
                        restart_in_secs: backoff.as_secs(),
                    }))
                    .await;
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// The files source's kernel interface: fanotify when it can be had (writer known),
/// else inotify (writer unknown, said in every event as `attribution: none`).
fn files_backend(
    wanted: weilan_config::settings::agent::FilesBackend,
) -> Result<Box<dyn source::files::FileBackend>, String> {
    use source::files::{inotify::InotifyBackend, linux::FanotifyBackend};
    use weilan_config::settings::agent::FilesBackend;
    let fanotify =
        || FanotifyBackend::new().map(|b| Box::new(b) as Box<dyn source::files::FileBackend>);
    let inotify =
        || InotifyBackend::new().map(|b| Box::new(b) as Box<dyn source::files::FileBackend>);
    match wanted {
        FilesBackend::Fanotify => fanotify(),
        FilesBackend::Inotify => inotify(),
        FilesBackend::Auto => fanotify().or_else(|e| {
            tracing::warn!(error = %e, "fanotify unavailable: files are watched with inotify; writers will be unknown (attribution: none)");
            inotify()
        }),
    }
}
