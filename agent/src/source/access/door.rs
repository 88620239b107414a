//! A door contact on a GPIO line: edges → debounced `opened` / `closed`, and
//! `held-open` once the door has stood open longer than allowed.
//!
//! Wiring (documented in docs/deployment.md): a reed switch between the GPIO line and
//! ground, the line pulled up (internal bias `pull-up` or an external 10 kΩ to 3.3 V).
//! Door closed = magnet at the switch = contact closed = line low; door open = line
//! high. `open_level` in the settings inverts this for normally-open switches.
//!
//! The GPIO character device is behind [`GpioLine`] (edge events with kernel
//! timestamps); [`DoorTracker`] is pure and is tested against a scripted double.

use std::time::Duration;

/// One edge as the GPIO character device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    /// The line's level after the edge (true = high).
    pub high: bool,
    /// Kernel timestamp, monotonic.
    pub at: Duration,
}

/// The line, as the door source needs it.
pub trait GpioLine: Send {
    /// The current level (read once at start, and after an overflow).
    fn level(&mut self) -> Result<bool, String>;
    /// The next edge, waiting at most `timeout`; `None` on timeout.
    fn next_edge(&mut self, timeout: Duration) -> Result<Option<Edge>, String>;
    /// The clock edges are stamped with (monotonic).
    fn now(&self) -> Duration;
}

/// What the door did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DoorChange {
    Opened,
    Closed { held_open: Duration },
    HeldOpen { for_: Duration },
}

/// Debounces edges and times how long the door stands open.
#[derive(Debug)]
pub struct DoorTracker {
    debounce: Duration,
    held_open_after: Duration,
    /// Line level that means "open".
    open_level: bool,
    /// The accepted (debounced) state and since when.
    open: bool,
    since: Duration,
    /// A level change waiting to outlast the debounce time.
    pending: Option<Edge>,
    held_reported: bool,
}

impl DoorTracker {
    /// Starts from the line's current `level` at time `now`.
    pub fn new(
        level: bool,
        now: Duration,
        open_level: bool,
        debounce: Duration,
        held_open_after: Duration,
    ) -> Self {
        DoorTracker {
            debounce,
            held_open_after,
            open_level,
            open: level == open_level,
            since: now,
            pending: None,
            held_reported: false,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// An edge arrived. Bounces (a level that does not last `debounce`) are dropped.
    pub fn edge(&mut self, e: Edge) -> Vec<DoorChange> {
        let mut out = self.tick(e.at);
        if (e.high == self.open_level) == self.open {
            // Back to the accepted state before the debounce ran out: a bounce.
            self.pending = None;
        } else {
            self.pending = Some(e);
        }
        out.extend(self.tick(e.at));
        out
    }

    /// Time passed (call at least every `debounce`, and when no edge comes).
    pub fn tick(&mut self, now: Duration) -> Vec<DoorChange> {
        let mut out = Vec::new();
        if let Some(p) = self.pending {
            if now.saturating_sub(p.at) >= self.debounce {
                self.pending = None;
                let opening = p.high == self.open_level;
                if opening != self.open {
                    if opening {
                        out.push(DoorChange::Opened);
                    } else {
                        out.push(DoorChange::Closed {
                            held_open: p.at.saturating_sub(self.since),
                        });
                    }
                    self.open = opening;
                    self.since = p.at;
                    self.held_reported = false;
                }
            }
        }
        if self.open
            && !self.held_reported
            && now.saturating_sub(self.since) >= self.held_open_after
        {
            self.held_reported = true;
            out.push(DoorChange::HeldOpen {
                for_: now.saturating_sub(self.since),
            });
        }
        out
    }
}

/// A scripted line for tests: edges at set times, then silence. Its clock is
/// simulated: waiting with no edge due moves it on by the timeout, an edge moves it
/// to the edge's time; after the script (and `end`) it fails, like an unplugged chip.
#[derive(Debug, Default)]
pub struct ScriptedLine {
    pub initial: bool,
    pub edges: std::collections::VecDeque<Edge>,
    /// Simulated time at which the line fails ("gone"), ending the watch.
    pub end: Duration,
    pub clock: Duration,
}

impl GpioLine for ScriptedLine {
    fn level(&mut self) -> Result<bool, String> {
        Ok(self.initial)
    }
    fn next_edge(&mut self, timeout: Duration) -> Result<Option<Edge>, String> {
        if self.clock >= self.end {
            return Err("line gone".into());
        }
        match self.edges.front() {
            Some(e) if e.at <= self.clock + timeout => {
                self.clock = self.clock.max(e.at);
                Ok(self.edges.pop_front())
            }
            _ => {
                self.clock += timeout;
                Ok(None)
            }
        }
    }
    fn now(&self) -> Duration {
        self.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn edge(high: bool, ms: u64) -> Edge {
        Edge {
            high,
            at: MS * ms as u32,
        }
    }

    /// Runs a scripted line through a tracker (door open = line high, 50 ms debounce,
    /// held open after 60 s), ticking every 10 ms up to `until_ms`.
    fn run(line: &mut ScriptedLine, until_ms: u64) -> Vec<(u64, DoorChange)> {
        let level = line.level().unwrap();
        let mut t = DoorTracker::new(
            level,
            Duration::ZERO,
            true,
            50 * MS,
            Duration::from_secs(60),
        );
        let mut next = line.edges.pop_front();
        let mut out = Vec::new();
        let mut now = 0;
        while now <= until_ms {
            while let Some(e) = next.filter(|e| e.at <= MS * now as u32) {
                out.extend(t.edge(e).into_iter().map(|c| (now, c)));
                next = line.edges.pop_front();
            }
            out.extend(t.tick(MS * now as u32).into_iter().map(|c| (now, c)));
            now += 10;
        }
        out
    }

    #[test]
    fn a_bouncing_contact_gives_one_open_and_one_close() {
        // The door opens at 1 000 ms with 4 bounces, closes at 9 000 ms with 2.
        let mut line = ScriptedLine {
            initial: false,
            edges: [
                edge(true, 1000),
                edge(false, 1003),
                edge(true, 1007),
                edge(false, 1010),
                edge(true, 1012),
                edge(false, 9000),
                edge(true, 9004),
                edge(false, 9006),
            ]
            .into(),
            ..Default::default()
        };
        let changes = run(&mut line, 10_000);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].1, DoorChange::Opened);
        assert!(
            (1060..=1070).contains(&changes[0].0),
            "opened once the level held 50 ms"
        );
        // Held open from the edge that stuck (1 012 ms) to the close that did (9 006 ms).
        assert_eq!(
            changes[1].1,
            DoorChange::Closed {
                held_open: 7994 * MS
            }
        );
    }

    #[test]
    fn a_pulse_shorter_than_the_debounce_is_no_door_movement() {
        let mut line = ScriptedLine {
            initial: false,
            edges: [edge(true, 500), edge(false, 530)].into(),
            ..Default::default()
        };
        assert!(run(&mut line, 2000).is_empty());
    }

    #[test]
    fn a_door_left_open_is_reported_once_after_the_limit() {
        let mut line = ScriptedLine {
            initial: false,
            edges: [edge(true, 100)].into(),
            ..Default::default()
        };
        let changes = run(&mut line, 125_000);
        let held: Vec<_> = changes
            .iter()
            .filter(|(_, c)| matches!(c, DoorChange::HeldOpen { .. }))
            .collect();
        assert_eq!(held.len(), 1, "{changes:?}");
        assert!((60_100..=60_110).contains(&held[0].0));
    }

    #[test]
    fn the_open_level_can_be_inverted_and_the_start_state_counts() {
        // Normally-open switch: line low = open. The door is open when the agent starts.
        let t = DoorTracker::new(
            false,
            Duration::ZERO,
            false,
            50 * MS,
            Duration::from_secs(60),
        );
        assert!(t.is_open());
        let mut t = DoorTracker::new(
            true,
            Duration::ZERO,
            false,
            50 * MS,
            Duration::from_secs(60),
        );
        assert!(!t.is_open());
        assert!(t.edge(edge(false, 10)).is_empty());
        assert_eq!(t.tick(70 * MS), vec![DoorChange::Opened]);
    }
}
