//! Per-device frame-counter window: the replay and duplicate check.
//!
//! Pure state, no clock: the gateway keeps one [`CounterWindow`] per device and direction,
//! classifies each authentic frame's counter with [`CounterWindow::check`] *before* anything is
//! stored, and records it with [`CounterWindow::accept`] once the frame's effects are durable.
//! The window remembers the highest counter seen and which of the 63 counters below it were
//! seen, so frames that arrive late or out of order (QoS1 redelivery, backlog replay) within the
//! window are still accepted exactly once.

/// How many counters the window covers: the highest seen and the 63 below it.
pub const WINDOW: u32 = 64;

/// A counter below this value that is also older than the window is classed
/// [`CounterVerdict::ResetSuspect`] rather than a plain replay: a device whose counter storage
/// was wiped starts again from zero. (It is dropped either way; the verdict is a hint for the
/// operator, since a replay of a young device's first frames looks the same.)
pub const RESET_SUSPECT_BELOW: u32 = 1024;

/// What an incoming counter means for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CounterVerdict {
    /// Not seen before: process it. `skipped` counts the counters jumped over since the
    /// highest one seen (frames lost or still on their way); 0 for late arrivals in the window.
    New {
        /// Counters between the previous highest and this one.
        skipped: u32,
    },
    /// Seen already (QoS1 redelivery, backlog resend): drop it, ack it.
    Duplicate,
    /// Older than the window: a replay or a frame too late to place. Drop it.
    Replay,
    /// Far below the window and near zero: the device probably lost its counter. Drop it and
    /// flag the device; an operator re-provisions it (a new key) and resets its window.
    ResetSuspect,
}

impl CounterVerdict {
    /// The stable snake_case name used in logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            CounterVerdict::New { .. } => "new",
            CounterVerdict::Duplicate => "duplicate",
            CounterVerdict::Replay => "replay",
            CounterVerdict::ResetSuspect => "reset_suspect",
        }
    }
}

/// The counters one device has used in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CounterWindow {
    /// The highest counter accepted, or `None` before the first frame.
    highest: Option<u32>,
    /// Bit `i` set: counter `highest - i` was accepted. Bit 0 is `highest` itself.
    seen: u64,
}

impl CounterWindow {
    /// A window that has seen nothing: any counter is new.
    pub const fn new() -> Self {
        CounterWindow { highest: None, seen: 0 }
    }

    /// Rebuilds a window from its persisted parts ([`Self::highest`], [`Self::seen_bits`]).
    pub const fn from_parts(highest: Option<u32>, seen_bits: u64) -> Self {
        match highest {
            // Bit 0 stands for `highest` itself, which was accepted by definition.
            Some(h) => CounterWindow { highest: Some(h), seen: seen_bits | 1 },
            None => CounterWindow { highest: None, seen: 0 },
        }
    }

    /// The highest counter accepted so far.
    pub const fn highest(&self) -> Option<u32> {
        self.highest
    }

    /// The seen-bitmap, for persisting: bit `i` is counter `highest - i`.
    pub const fn seen_bits(&self) -> u64 {
        self.seen
    }

    /// Classifies `counter` without changing the window.
    pub const fn check(&self, counter: u32) -> CounterVerdict {
        let Some(highest) = self.highest else {
            return CounterVerdict::New { skipped: 0 };
        };
        if counter > highest {
            return CounterVerdict::New { skipped: counter - highest - 1 };
        }
        let age = highest - counter;
        if age < WINDOW {
            if self.seen & (1u64 << age) != 0 {
                CounterVerdict::Duplicate
            } else {
                CounterVerdict::New { skipped: 0 }
            }
        } else if counter < RESET_SUSPECT_BELOW {
            CounterVerdict::ResetSuspect
        } else {
            CounterVerdict::Replay
        }
    }

    /// Classifies `counter` and, if it is new, records it. Returns the verdict.
    pub fn accept(&mut self, counter: u32) -> CounterVerdict {
        let verdict = self.check(counter);
        if let CounterVerdict::New { .. } = verdict {
            match self.highest {
                Some(highest) if counter <= highest => {
                    self.seen |= 1u64 << (highest - counter);
                }
                Some(highest) => {
                    let shift = counter - highest;
                    self.seen = if shift >= WINDOW { 0 } else { self.seen << shift };
                    self.seen |= 1;
                    self.highest = Some(counter);
                }
                None => {
                    self.seen = 1;
                    self.highest = Some(counter);
                }
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CounterVerdict::*;

    #[test]
    fn first_counter_is_new_whatever_it_is() {
        for c in [0, 1, 255, u32::MAX] {
            assert_eq!(CounterWindow::new().check(c), New { skipped: 0 });
        }
    }

    #[test]
    fn in_order_counters_are_new_then_duplicate() {
        let mut w = CounterWindow::new();
        for c in 0..200 {
            assert_eq!(w.accept(c), New { skipped: 0 });
            assert_eq!(w.accept(c), Duplicate);
        }
        assert_eq!(w.highest(), Some(199));
    }

    #[test]
    fn gaps_are_counted_and_late_frames_fill_them_once() {
        let mut w = CounterWindow::new();
        assert_eq!(w.accept(10), New { skipped: 0 });
        assert_eq!(w.accept(15), New { skipped: 4 });
        for late in [11, 14, 12, 13] {
            assert_eq!(w.accept(late), New { skipped: 0 });
            assert_eq!(w.accept(late), Duplicate);
        }
        assert_eq!(w.accept(10), Duplicate);
        assert_eq!(w.highest(), Some(15));
    }

    #[test]
    fn window_edge_is_exactly_64_counters() {
        let mut w = CounterWindow::new();
        w.accept(2000);
        assert_eq!(w.check(2000 - 63), New { skipped: 0 });
        assert_eq!(w.check(2000 - 64), Replay);
        w.accept(2000 - 63);
        assert_eq!(w.check(2000 - 63), Duplicate);
        // Moving the top by one pushes the oldest slot out of the window.
        w.accept(2001);
        assert_eq!(w.check(2000 - 63), Replay);
        assert_eq!(w.check(2000 - 62), New { skipped: 0 });
    }

    #[test]
    fn big_jump_clears_the_bitmap() {
        let mut w = CounterWindow::new();
        for c in 0..64 {
            w.accept(c);
        }
        assert_eq!(w.accept(10_000), New { skipped: 10_000 - 63 - 1 });
        assert_eq!(w.seen_bits(), 1);
        assert_eq!(w.check(10_000 - 1), New { skipped: 0 });
    }

    #[test]
    fn low_counter_far_below_the_window_is_reset_suspect() {
        let mut w = CounterWindow::new();
        w.accept(50_000);
        assert_eq!(w.check(0), ResetSuspect);
        assert_eq!(w.check(RESET_SUSPECT_BELOW - 1), ResetSuspect);
        assert_eq!(w.check(RESET_SUSPECT_BELOW), Replay);
        assert_eq!(w.check(40_000), Replay);
        // Just outside the window of a young device.
        let mut very_young = CounterWindow::new();
        very_young.accept(70);
        assert_eq!(very_young.check(6), ResetSuspect);
        assert_eq!(very_young.check(7), New { skipped: 0 });
    }

    #[test]
    fn rejected_counters_do_not_change_the_window() {
        let mut w = CounterWindow::new();
        w.accept(5000);
        w.accept(4990);
        let before = w;
        assert_eq!(w.accept(4990), Duplicate);
        assert_eq!(w.accept(10), ResetSuspect);
        assert_eq!(w.accept(3000), Replay);
        assert_eq!(w, before);
    }

    #[test]
    fn persisted_parts_round_trip() {
        let mut w = CounterWindow::new();
        for c in [3, 9, 7, 40, 41, 90] {
            w.accept(c);
        }
        let back = CounterWindow::from_parts(w.highest(), w.seen_bits());
        assert_eq!(back, w);
        for c in 0..120 {
            assert_eq!(back.check(c), w.check(c));
        }
        assert_eq!(CounterWindow::from_parts(None, 0xffff), CounterWindow::new());
    }

    #[test]
    fn top_of_the_range_does_not_overflow() {
        let mut w = CounterWindow::new();
        assert_eq!(w.accept(u32::MAX), New { skipped: 0 });
        assert_eq!(w.accept(u32::MAX), Duplicate);
        assert_eq!(w.accept(u32::MAX - 1), New { skipped: 0 });
        assert_eq!(w.accept(0), ResetSuspect);
        assert_eq!(w.accept(u32::MAX - 64), Replay);
    }
}
