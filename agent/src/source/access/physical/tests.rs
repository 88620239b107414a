//! The door board's loops against scripted devices.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use super::*;
use crate::source::access::door::ScriptedLine;
use crate::source::Observed;

fn sink() -> (EventSink, tokio::sync::mpsc::Receiver<Observed>) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    (EventSink::new(tx, Arc::new(AtomicU64::new(0))), rx)
}

fn drain(rx: &mut tokio::sync::mpsc::Receiver<Observed>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(o) = rx.try_recv() {
        out.push(o.event);
    }
    out
}

/// Inputs, then the device fails.
struct ScriptedKeys(VecDeque<KeyInput>);

impl KeyReader for ScriptedKeys {
    fn next_press(&mut self, _timeout: Duration) -> Result<Option<KeyInput>, String> {
        self.0
            .pop_front()
            .map(Some)
            .ok_or_else(|| "No such device".into())
    }
}

/// Hands out scripted readers in turn; none once they are used up (cancelling the
/// run then, so the test ends).
struct ScriptedOpener {
    readers: Mutex<VecDeque<Result<Option<Vec<KeyInput>>, String>>>,
    shutdown: CancellationToken,
}

impl ReaderOpener for ScriptedOpener {
    fn open(&self, _device: &ReaderDevice) -> Result<Option<Box<dyn KeyReader>>, String> {
        match self.readers.lock().unwrap().pop_front() {
            Some(r) => r.map(|o| o.map(|k| Box::new(ScriptedKeys(k.into())) as Box<dyn KeyReader>)),
            None => {
                self.shutdown.cancel();
                Ok(None)
            }
        }
    }
}

fn keys(digits: &str) -> Vec<KeyInput> {
    digits
        .chars()
        .map(|c| match c {
            '0' => 11,
            d => 2 + (d as u16 - '1' as u16),
        })
        .chain([28]) // Enter
        .map(KeyInput::Press)
        .collect()
}

fn reader() -> BadgeReader {
    BadgeReader {
        name: "dc-east".into(),
        device: ReaderDevice::Usb {
            vendor: 0x0c27,
            product: 0x3bfa,
        },
    }
}

#[test]
fn cards_become_keyed_hashes_and_a_lost_reader_is_reported_once_per_absence() {
    let shutdown = CancellationToken::new();
    let mut second = keys("4242");
    // KEY_A then a stray 1: junk, dropped with the card so far.
    second.splice(0..0, [KeyInput::Press(30), KeyInput::Press(2)]);
    // An overflow in the middle of a card: that card is dropped, the next one counts.
    let mut first = keys("0012345678");
    first.splice(3..3, [KeyInput::Overflow]);
    first.extend(keys("0012345678"));
    let opener = ScriptedOpener {
        readers: Mutex::new(
            [
                Ok(None),
                Err("permission denied".into()),
                Ok(Some(first)),
                Ok(Some(second)),
            ]
            .into(),
        ),
        shutdown: shutdown.clone(),
    };
    let (sink, mut rx) = sink();
    run_reader(&reader(), "hq-dc", b"site key", &opener, &sink, &shutdown).unwrap();
    let events = drain(&mut rx);
    let badges: Vec<&AccessBadge> = events
        .iter()
        .filter_map(|e| match e {
            Event::AccessBadge(b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(badges.len(), 2, "{events:?}");
    let expected = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"site key"),
        b"0012345678",
    );
    assert_eq!(badges[0].id_hash, hex::encode(expected.as_ref()));
    assert_eq!(
        (
            badges[0].last4.as_str(),
            badges[0].site.as_str(),
            badges[0].reader.as_str()
        ),
        ("5678", "hq-dc", "dc-east")
    );
    assert_eq!(badges[1].last4, "4242");
    let text = format!("{events:?}");
    assert!(
        !text.contains("0012345678"),
        "the raw number never leaves: {text}"
    );
    let errors: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::AgentSourceError(s) => Some(s.error.as_str()),
            _ => None,
        })
        .collect();
    // Absent then refused: one report; the overflow: one; gone after the first card:
    // one; gone again: one.
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[0].contains("not present"), "{errors:?}");
    assert!(errors[1].contains("input buffer overflowed"), "{errors:?}");
    assert!(errors[2].contains("gone: No such device"), "{errors:?}");
}

fn contact() -> DoorContact {
    DoorContact {
        door: "dc-east".into(),
        chip: "/dev/gpiochip0".into(),
        line: 17,
        open_high: true,
        bias: "pull-up".into(),
        debounce: Duration::from_millis(50),
        held_open: Duration::from_secs(60),
    }
}

fn edge(high: bool, ms: u64) -> Edge {
    Edge {
        high,
        at: Duration::from_millis(ms),
    }
}

fn doors(events: &[Event]) -> Vec<(String, Option<u64>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::AccessDoor(d) => {
                assert_eq!(
                    (d.door.as_str(), d.site.as_str(), d.source.as_str()),
                    ("dc-east", "hq-dc", "gpio")
                );
                Some((d.state.clone(), d.held_open_secs))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_bouncing_door_held_open_gives_opened_held_open_and_closed() {
    // Opens at 1 s (bouncing), stays open 90 s (held-open after 60 s), closes at 91 s.
    let mut line = ScriptedLine {
        initial: false,
        edges: [
            edge(true, 1000),
            edge(false, 1004),
            edge(true, 1009),
            edge(false, 91_000),
            edge(true, 91_003),
            edge(false, 91_008),
        ]
        .into(),
        end: Duration::from_secs(95),
        clock: Duration::ZERO,
    };
    let (sink, mut rx) = sink();
    let gone = watch_door(
        &mut line,
        &contact(),
        "hq-dc",
        &sink,
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(gone.as_deref(), Some("line gone"));
    assert_eq!(
        doors(&drain(&mut rx)),
        vec![
            ("opened".into(), None),
            ("held-open".into(), Some(60)),
            ("closed".into(), Some(89)),
        ]
    );
}

#[test]
fn a_failing_line_is_reported_once_and_retried() {
    struct Failing(CancellationToken, Mutex<u32>);
    impl LineOpener for Failing {
        fn open(&self, _c: &DoorContact) -> Result<Box<dyn GpioLine>, String> {
            let mut n = self.1.lock().unwrap();
            *n += 1;
            if *n == 3 {
                self.0.cancel();
            }
            Err("No such file or directory".into())
        }
    }
    let shutdown = CancellationToken::new();
    let opener = Failing(shutdown.clone(), Mutex::new(0));
    let (sink, mut rx) = sink();
    run_contact(&contact(), "hq-dc", &opener, &sink, &shutdown).unwrap();
    let events = drain(&mut rx);
    assert_eq!(*opener.1.lock().unwrap(), 3, "retried every second");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], Event::AgentSourceError(e) if e.error.contains("door dc-east (/dev/gpiochip0 line 17): No such file"))
    );
}
