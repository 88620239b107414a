//! Event sources: each observes one part of the host and reports facts.
//!
//! A source never decides policy and never talks to the network: it turns kernel
//! interfaces into [`Event`]s and hands them to an [`EventSink`]. Platform access sits
//! behind a backend trait per source, with a test backend, so the logic is tested
//! without a kernel and the kernel interface is tested end to end.

pub mod access;
pub mod files;
pub mod host;
pub mod net;
pub mod usb;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weilan_config::event::Event;

/// A boxed future, so sources can be stored as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A fact and the moment it was observed.
#[derive(Debug, Clone)]
pub struct Observed {
    pub time: Timestamp,
    pub event: Event,
}

/// Errors that end one run of a source; the supervisor restarts it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
    #[error("the event pipeline is closed")]
    PipelineClosed,
}

/// Where sources put what they observe. Bounded: [`EventSink::emit`] waits when the
/// pipeline is full (back-pressure), [`EventSink::try_emit`] drops and counts instead,
/// for sources that must never stall the kernel. Every drop is later reported as
/// `agent.events_lost` by the recorder.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::Sender<Observed>,
    dropped: Arc<AtomicU64>,
    /// Where queued and dropped events are also counted so a crash's loss is exact.
    ledger: Option<Arc<crate::ledger::CaptureLedger>>,
}

impl EventSink {
    pub fn new(tx: mpsc::Sender<Observed>, dropped: Arc<AtomicU64>) -> Self {
        EventSink {
            tx,
            dropped,
            ledger: None,
        }
    }

    /// Also counts every queued and dropped event in `ledger`.
    pub fn with_ledger(mut self, ledger: Arc<crate::ledger::CaptureLedger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    fn queued(&self) {
        if let Some(l) = &self.ledger {
            l.queued();
        }
    }

    /// Sends an event, waiting for room.
    pub async fn emit(&self, event: Event) -> Result<(), SourceError> {
        self.tx
            .send(Observed {
                time: Timestamp::now(),
                event,
            })
            .await
            .map_err(|_| SourceError::PipelineClosed)?;
        self.queued();
        Ok(())
    }

    /// Sends an event from a blocking (non-async) thread, waiting for room.
    pub fn emit_blocking(&self, event: Event) -> Result<(), SourceError> {
        self.tx
            .blocking_send(Observed {
                time: Timestamp::now(),
                event,
            })
            .map_err(|_| SourceError::PipelineClosed)?;
        self.queued();
        Ok(())
    }

    /// Sends an event if there is room; otherwise counts it as dropped.
    pub fn try_emit(&self, event: Event) -> bool {
        match self.tx.try_send(Observed {
            time: Timestamp::now(),
            event,
        }) {
            Ok(()) => {
                self.queued();
                true
            }
            Err(_) => {
                self.count_lost(1);
                false
            }
        }
    }

    /// Counts events a source itself lost (e.g. a kernel queue overflowed).
    pub fn count_lost(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        if let Some(l) = &self.ledger {
            l.dropped(n);
        }
    }

    /// Reports a problem of `source` as `agent.source_error` (and in the log); the
    /// source carries on.
    pub async fn report(&self, source: &str, error: String) -> Result<(), SourceError> {
        tracing::warn!(source, error = %error, "source problem reported");
        self.emit(Event::AgentSourceError(weilan_config::event::SourceError {
            source: source.into(),
            error,
            restart_in_secs: 0,
        }))
        .await
    }

    /// Reports a problem of `source` as `agent.source_error` (and in the log), from a
    /// blocking thread; `restart_in_secs` says when the source tries again (0: it
    /// carries on, or will not retry).
    pub fn report_blocking(
        &self,
        source: &str,
        error: String,
        restart_in_secs: u64,
    ) -> Result<(), SourceError> {
        tracing::warn!(source, error = %error, "source problem reported");
        self.emit_blocking(Event::AgentSourceError(weilan_config::event::SourceError {
            source: source.into(),
            error,
            restart_in_secs,
        }))
    }
}

/// Sleeps `d` on a blocking thread; false if shutdown came first. On a thread of the
/// runtime's blocking pool (or one that entered the runtime) it sleeps until either
/// comes, without waking in between: an idle agent must not wake 20 times a second
/// per sleeping thread to look at a flag.
pub fn sleep_unless_cancelled(shutdown: &CancellationToken, d: std::time::Duration) -> bool {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        return runtime.block_on(async {
            tokio::select! {
                _ = shutdown.cancelled() => false,
                _ = tokio::time::sleep(d) => !shutdown.is_cancelled(),
            }
        });
    }
    let end = std::time::Instant::now() + d;
    loop {
        if shutdown.is_cancelled() {
            return false;
        }
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
    }
}

/// What a source gets to run with.
#[derive(Clone, Debug)]
pub struct SourceContext {
    pub sink: EventSink,
    pub shutdown: CancellationToken,
}

/// One event source. `run` observes until shutdown (then returns `Ok`) or until it
/// fails; it may be called again after a failure and must then resynchronise
/// (e.g. re-enumerate devices) rather than assume what it saw before.
pub trait Source: Send {
    /// Short name used in logs and `agent.source_error` events, e.g. `usb`.
    fn name(&self) -> &'static str;
    fn run<'a>(&'a mut self, ctx: &'a SourceContext) -> BoxFuture<'a, Result<(), SourceError>>;
}
