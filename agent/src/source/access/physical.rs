//! The door board's source: badge readers and door contacts → `access.badge` and
//! `access.door`.
//!
//! Each reader and each contact has its own blocking thread (both wait in the kernel:
//! `poll` on an input device, `poll` on a GPIO line request). A reader is opened
//! *exclusively* (`EVIOCGRAB`): while the agent holds it, no other reader of the
//! device — the console's keyboard handler, a desktop session, `cat /dev/input/…` —
//! receives its key presses, so card numbers never type into a login prompt. A reader
//! that is missing or unplugged is looked for again every second; its absence is
//! reported once per absence, and so is its return.
//!
//! The devices sit behind [`KeyReader`] and [`GpioLine`]; the loops are tested against
//! scripted doubles, the input device end to end in the QEMU guest (HID gadget).

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weilan_config::event::{AccessBadge, AccessDoor, Event};
use weilan_config::settings::agent::{BadgeReader, DoorContact, ReaderDevice};

use super::badge::{CardAssembler, Read};
use super::door::{DoorChange, DoorTracker, Edge, GpioLine};
use crate::source::{
    sleep_unless_cancelled, BoxFuture, EventSink, Source, SourceContext, SourceError,
};

/// Digits that stop coming for this long are a partial read (the reader sends a whole
/// card within milliseconds); they are discarded.
const INTER_KEY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a missing reader or door line is looked for again.
const RETRY: Duration = Duration::from_secs(1);

/// What a reader delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyInput {
    /// A key went down (Linux key code).
    Press(u16),
    /// The kernel's buffer for the device overflowed (`SYN_DROPPED`): presses were lost.
    Overflow,
}

/// An opened badge reader: key presses in order.
pub trait KeyReader: Send {
    /// The next input, waiting at most `timeout`; `None` on timeout. An error means
    /// the device is gone.
    fn next_press(&mut self, timeout: Duration) -> Result<Option<KeyInput>, String>;
}

/// Opens badge readers.
pub trait ReaderOpener: Send + Sync {
    /// `Ok(None)`: no such device now.
    fn open(&self, device: &ReaderDevice) -> Result<Option<Box<dyn KeyReader>>, String>;
}

/// Opens door contact lines.
pub trait LineOpener: Send + Sync {
    fn open(&self, contact: &DoorContact) -> Result<Box<dyn GpioLine>, String>;
}

/// Settings of [`PhysicalSource`].
#[derive(Clone)]
pub struct PhysicalConfig {
    pub site: String,
    /// The site's badge key (read from `[door] badge_key`).
    pub badge_key: Vec<u8>,
    pub readers: Vec<BadgeReader>,
    pub contacts: Vec<DoorContact>,
    pub reader_opener: Arc<dyn ReaderOpener>,
    pub line_opener: Arc<dyn LineOpener>,
}

pub struct PhysicalSource {
    config: PhysicalConfig,
}

impl PhysicalSource {
    pub fn new(config: PhysicalConfig) -> Self {
        PhysicalSource { config }
    }
}

fn report(sink: &EventSink, error: String) -> Result<(), SourceError> {
    sink.report_blocking("door", error, RETRY.as_secs())
}

/// One reader, for the agent's life: open, read cards, reopen when it comes back.
pub fn run_reader(
    reader: &BadgeReader,
    site: &str,
    key: &[u8],
    opener: &dyn ReaderOpener,
    sink: &EventSink,
    shutdown: &CancellationToken,
) -> Result<(), SourceError> {
    let mut missing_reported = false;
    while !shutdown.is_cancelled() {
        let mut device = match opener.open(&reader.device) {
            Ok(Some(d)) => d,
            outcome => {
                if !missing_reported {
                    missing_reported = true;
                    let why = match outcome {
                        Err(e) => e,
                        _ => "not present".into(),
                    };
                    report(
                        sink,
                        format!(
                            "badge reader {} ({:?}): {why}; looking for it every second",
                            reader.name, reader.device
                        ),
                    )?;
                }
                if !sleep_unless_cancelled(shutdown, RETRY) {
                    break;
                }
                continue;
            }
        };
        tracing::info!(reader = %reader.name, "badge reader present, held exclusively");
        match read_cards(device.as_mut(), reader, site, key, sink, shutdown)? {
            None => break,
            Some(gone) => report(sink, format!("badge reader {} gone: {gone}", reader.name))?,
        }
        // Its absence from now on was just reported.
        missing_reported = true;
    }
    Ok(())
}

/// Reads cards until shutdown (`None`) or the device fails (`Some(why)`).
fn read_cards(
    device: &mut dyn KeyReader,
    reader: &BadgeReader,
    site: &str,
    key: &[u8],
    sink: &EventSink,
    shutdown: &CancellationToken,
) -> Result<Option<String>, SourceError> {
    let mut cards = CardAssembler::new(key);
    let mut last_key: Option<Instant> = None;
    while !shutdown.is_cancelled() {
        let press = match device.next_press(Duration::from_millis(200)) {
            Ok(p) => p,
            Err(e) => return Ok(Some(e)),
        };
        let code = match press {
            Some(KeyInput::Press(code)) => code,
            Some(KeyInput::Overflow) => {
                // A lost digit would give a valid-looking hash of the wrong card.
                last_key = None;
                cards.lost_input();
                report(
                    sink,
                    format!(
                        "badge reader {}: the kernel's input buffer overflowed; the card being read was discarded",
                        reader.name
                    ),
                )?;
                continue;
            }
            None => {
                if last_key.is_some_and(|t| t.elapsed() >= INTER_KEY_TIMEOUT) {
                    last_key = None;
                    if cards.abandon() {
                        tracing::info!(reader = %reader.name, "partial card read discarded (no Enter within 2 s)");
                    }
                }
                continue;
            }
        };
        last_key = Some(Instant::now());
        match cards.press(code) {
            Read::Pending => {}
            Read::Card(card) => {
                last_key = None;
                sink.emit_blocking(Event::AccessBadge(AccessBadge {
                    reader: reader.name.clone(),
                    site: site.to_string(),
                    id_hash: card.id_hash,
                    last4: card.last4,
                    source: "hid-reader".into(),
                }))?;
            }
            Read::Rejected(why) => {
                last_key = None;
                tracing::info!(reader = %reader.name, why, "badge read rejected");
            }
        }
    }
    Ok(None)
}

/// One door contact, for the agent's life.
pub fn run_contact(
    contact: &DoorContact,
    site: &str,
    opener: &dyn LineOpener,
    sink: &EventSink,
    shutdown: &CancellationToken,
) -> Result<(), SourceError> {
    let mut reported = false;
    while !shutdown.is_cancelled() {
        let failure = match opener.open(contact) {
            Ok(mut line) => match watch_door(line.as_mut(), contact, site, sink, shutdown)? {
                None => break,
                Some(e) => e,
            },
            Err(e) => e,
        };
        if !reported {
            reported = true;
            report(
                sink,
                format!(
                    "door {} ({} line {}): {failure}; trying again every second",
                    contact.door,
                    contact.chip.display(),
                    contact.line
                ),
            )?;
        }
        if !sleep_unless_cancelled(shutdown, RETRY) {
            break;
        }
    }
    Ok(())
}

fn door_event(contact: &DoorContact, site: &str, change: DoorChange) -> Event {
    let (state, held) = match change {
        DoorChange::Opened => ("opened", None),
        DoorChange::Closed { held_open } => ("closed", Some(held_open.as_secs())),
        DoorChange::HeldOpen { for_ } => ("held-open", Some(for_.as_secs())),
    };
    Event::AccessDoor(AccessDoor {
        door: contact.door.clone(),
        site: site.to_string(),
        state: state.into(),
        held_open_secs: held,
        source: "gpio".into(),
    })
}

/// Follows one line until shutdown (`None`) or a failure (`Some(why)`).
pub fn watch_door(
    line: &mut dyn GpioLine,
    contact: &DoorContact,
    site: &str,
    sink: &EventSink,
    shutdown: &CancellationToken,
) -> Result<Option<String>, SourceError> {
    let level = match line.level() {
        Ok(l) => l,
        Err(e) => return Ok(Some(e)),
    };
    let mut tracker = DoorTracker::new(
        level,
        line.now(),
        contact.open_high,
        contact.debounce,
        contact.held_open,
    );
    tracing::info!(door = %contact.door, open = tracker.is_open(), "door contact watched");
    // Wake at least every debounce period so a level that settled is accepted.
    let wait = contact.debounce.min(Duration::from_millis(200));
    while !shutdown.is_cancelled() {
        let changes = match line.next_edge(wait) {
            Ok(Some(edge)) => tracker.edge(edge),
            Ok(None) => tracker.tick(line.now()),
            Err(e) => return Ok(Some(e)),
        };
        for change in changes {
            sink.emit_blocking(door_event(contact, site, change))?;
        }
    }
    Ok(None)
}

impl Source for PhysicalSource {
    fn name(&self) -> &'static str {
        "door"
    }

    fn run<'a>(&'a mut self, ctx: &'a SourceContext) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let mut tasks = Vec::new();
            for reader in self.config.readers.clone() {
                let (config, ctx) = (self.config.clone(), ctx.clone());
                tasks.push(tokio::task::spawn_blocking(move || {
                    run_reader(
                        &reader,
                        &config.site,
                        &config.badge_key,
                        config.reader_opener.as_ref(),
                        &ctx.sink,
                        &ctx.shutdown,
                    )
                }));
            }
            for contact in self.config.contacts.clone() {
                let (config, ctx) = (self.config.clone(), ctx.clone());
                tasks.push(tokio::task::spawn_blocking(move || {
                    run_contact(
                        &contact,
                        &config.site,
                        config.line_opener.as_ref(),
                        &ctx.sink,
                        &ctx.shutdown,
                    )
                }));
            }
            for t in tasks {
                t.await
                    .map_err(|e| SourceError::Other(format!("door thread: {e}")))??;
            }
            Ok(())
        })
    }
}

// ---- Linux backends -------------------------------------------------------------

/// Badge readers through evdev.
pub struct EvdevOpener;

/// The raw stream: it passes `SYN_DROPPED` through (the synchronising one would
/// paper over lost presses with a state resync).
struct EvdevReader {
    device: evdev::raw_stream::RawDevice,
    pending: VecDeque<KeyInput>,
}

impl ReaderOpener for EvdevOpener {
    fn open(&self, wanted: &ReaderDevice) -> Result<Option<Box<dyn KeyReader>>, String> {
        let found: Option<(PathBuf, evdev::raw_stream::RawDevice)> = match wanted {
            ReaderDevice::Path(p) => match evdev::raw_stream::RawDevice::open(p) {
                Ok(d) => Some((p.clone(), d)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(format!("{}: {e}", p.display())),
            },
            ReaderDevice::Usb { vendor, product } => {
                evdev::raw_stream::enumerate().find(|(_, d)| {
                    let id = d.input_id();
                    id.vendor() == *vendor
                        && id.product() == *product
                        && d.supported_keys()
                            .is_some_and(|k| k.contains(evdev::KeyCode::KEY_ENTER))
                })
            }
        };
        let Some((path, mut device)) = found else {
            return Ok(None);
        };
        device.grab().map_err(|e| {
            format!(
                "{}: cannot open it exclusively ({e}); another program holds it",
                path.display()
            )
        })?;
        tracing::info!(path = %path.display(), name = ?device.name(), "badge reader grabbed");
        Ok(Some(Box::new(EvdevReader {
            device,
            pending: VecDeque::new(),
        })))
    }
}

impl KeyReader for EvdevReader {
    fn next_press(&mut self, timeout: Duration) -> Result<Option<KeyInput>, String> {
        if let Some(k) = self.pending.pop_front() {
            return Ok(Some(k));
        }
        let ready = {
            let mut fds = [nix::poll::PollFd::new(
                self.device.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut fds, ms) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => false,
                Err(e) => return Err(format!("poll: {e}")),
            }
        };
        if !ready {
            return Ok(None);
        }
        let events = self
            .device
            .fetch_events()
            .map_err(|e| format!("read: {e}"))?;
        for ev in events {
            // Presses only (1); releases (0) and auto-repeat (2) are not digits.
            if ev.event_type() == evdev::EventType::KEY && ev.value() == 1 {
                self.pending.push_back(KeyInput::Press(ev.code()));
            } else if ev.event_type() == evdev::EventType::SYNCHRONIZATION
                && ev.code() == evdev::SynchronizationCode::SYN_DROPPED.0
            {
                self.pending.push_back(KeyInput::Overflow);
            }
        }
        Ok(self.pending.pop_front())
    }
}

/// Door contacts through the GPIO character device.
pub struct CdevOpener;

struct CdevLine {
    request: gpiocdev::Request,
    offset: u32,
}

impl LineOpener for CdevOpener {
    fn open(&self, c: &DoorContact) -> Result<Box<dyn GpioLine>, String> {
        use gpiocdev::line::{Bias, EdgeDetection};
        let bias = match c.bias.as_str() {
            "pull-up" => Some(Bias::PullUp),
            "pull-down" => Some(Bias::PullDown),
            "disabled" => Some(Bias::Disabled),
            _ => None,
        };
        let request = gpiocdev::Request::builder()
            .on_chip(&c.chip)
            .with_consumer("weilan-door")
            .with_line(c.line)
            .as_input()
            .with_bias(bias)
            .with_edge_detection(EdgeDetection::BothEdges)
            .request()
            .map_err(|e| e.to_string())?;
        Ok(Box::new(CdevLine {
            request,
            offset: c.line,
        }))
    }
}

impl GpioLine for CdevLine {
    fn level(&mut self) -> Result<bool, String> {
        self.request
            .value(self.offset)
            .map(|v| v == gpiocdev::line::Value::Active)
            .map_err(|e| e.to_string())
    }

    fn next_edge(&mut self, timeout: Duration) -> Result<Option<Edge>, String> {
        if !self
            .request
            .wait_edge_event(timeout)
            .map_err(|e| e.to_string())?
        {
            return Ok(None);
        }
        let e = self.request.read_edge_event().map_err(|e| e.to_string())?;
        Ok(Some(Edge {
            high: e.kind == gpiocdev::line::EdgeKind::Rising,
            // The kernel stamps edges with CLOCK_MONOTONIC (the default event clock).
            at: Duration::from_nanos(e.timestamp_ns),
        }))
    }

    fn now(&self) -> Duration {
        monotonic_now()
    }
}

/// CLOCK_MONOTONIC, the clock GPIO edge timestamps use.
pub fn monotonic_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
