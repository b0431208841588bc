//! Urgent frames kept until the gateway confirms them end to end.
//!
//! A broker's PUBACK is not delivery: a broker killed with `kill -9` loses what it
//! acknowledged since its last save. So an urgent frame (an alarm raised or cleared, an SOS,
//! an incident report) sent on a sharded topic is kept after its PUBACK until the gateway's
//! `UplinkAck` for its counter, which the gateway sends once the frame is durable; without it
//! the identical bytes (same counter) go again after [`URGENT_ACK_TIMEOUT_MS`] and on every
//! reconnection (to either broker), and the gateway's counter window drops the copies (and
//! confirms each copy again). Pure state: time is passed in.

use gridsense_protocol::FrameBuf;

use crate::Instant;

/// Urgent frames held for confirmation at once; past it the oldest is given up (counted):
/// 4 frames of at most 484 bytes.
pub const CONFIRM_SLOTS: usize = 4;

/// How long after its PUBACK an unconfirmed urgent frame is sent again.
pub const URGENT_ACK_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Clone)]
struct Entry {
    counter: u32,
    frame: FrameBuf,
    /// When it goes again (`None`: stamped at the next tick, from its PUBACK).
    due: Option<Instant>,
    /// Waiting to be sent again.
    resend: bool,
}

/// The urgent frames awaiting their `UplinkAck`.
#[derive(Debug, Clone, Default)]
pub struct Confirmations {
    entries: heapless::Vec<Entry, CONFIRM_SLOTS>,
    /// Frames given up unconfirmed because more were waiting than there are slots.
    pub dropped: u32,
    /// Frames confirmed.
    pub confirmed: u32,
    /// Copies sent because no confirmation came in time (or after a reconnection).
    pub resent: u32,
}

impl Confirmations {
    /// The broker acknowledged urgent frame `counter`: kept until confirmed.
    pub fn keep(&mut self, counter: u32, frame: FrameBuf) {
        if self.entries.iter().any(|e| e.counter == counter) {
            return;
        }
        if self.entries.is_full() {
            self.entries.remove(0);
            self.dropped = self.dropped.saturating_add(1);
        }
        let _ = self.entries.push(Entry { counter, frame, due: None, resend: false });
    }

    /// The gateway confirmed `counter`: forgotten.
    pub fn confirmed(&mut self, counter: u32) {
        if let Some(i) = self.entries.iter().position(|e| e.counter == counter) {
            self.entries.remove(i);
            self.confirmed = self.confirmed.saturating_add(1);
        }
    }

    /// Frames whose confirmation is overdue at `now` are marked to go again.
    pub fn tick(&mut self, now: Instant) {
        for e in &mut self.entries {
            match e.due {
                None => e.due = Some(now.add_millis(URGENT_ACK_TIMEOUT_MS)),
                Some(due) if now >= due && !e.resend => e.resend = true,
                Some(_) => {}
            }
        }
    }

    /// Connected again (to either broker): every unconfirmed frame goes again.
    pub fn reconnected(&mut self) {
        for e in &mut self.entries {
            e.resend = true;
        }
    }

    /// The next frame to send again, if any (it stays held until confirmed).
    pub fn next_resend(&mut self) -> Option<(u32, FrameBuf)> {
        let e = self.entries.iter_mut().find(|e| e.resend)?;
        e.resend = false;
        e.due = None;
        self.resent = self.resent.saturating_add(1);
        Some((e.counter, e.frame.clone()))
    }

    /// Whether a frame waits to be sent again.
    pub fn has_resend(&self) -> bool {
        self.entries.iter().any(|e| e.resend)
    }

    /// Frames awaiting confirmation.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none awaits confirmation.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When the next overdue check is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.iter().filter_map(|e| e.due).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> FrameBuf {
        FrameBuf::from_slice(&[n; 20]).unwrap_or_default()
    }

    #[test]
    fn an_unconfirmed_frame_goes_again_identical_after_the_timeout_and_on_reconnecting() {
        let mut c = Confirmations::default();
        let t0 = Instant::from_millis(1_000);
        c.keep(7, frame(7));
        c.tick(t0);
        assert_eq!(c.next_due(), Some(t0.add_millis(URGENT_ACK_TIMEOUT_MS)));
        c.tick(t0.add_millis(URGENT_ACK_TIMEOUT_MS - 1));
        assert!(!c.has_resend());
        c.tick(t0.add_millis(URGENT_ACK_TIMEOUT_MS));
        assert_eq!(c.next_resend(), Some((7, frame(7))), "the same counter and bytes");
        assert!(!c.has_resend() && c.len() == 1, "still held until confirmed");
        c.reconnected();
        assert_eq!(c.next_resend().map(|r| r.0), Some(7));
        c.confirmed(7);
        assert!(c.is_empty());
        assert_eq!((c.confirmed, c.resent, c.dropped), (1, 2, 0));
    }

    #[test]
    fn more_than_the_slots_gives_up_the_oldest_and_counts_it() {
        let mut c = Confirmations::default();
        for n in 0..=u32::try_from(CONFIRM_SLOTS).unwrap_or(4) {
            c.keep(n, frame(1));
        }
        assert_eq!((c.len(), c.dropped), (CONFIRM_SLOTS, 1));
        c.confirmed(0);
        assert_eq!(c.confirmed, 0, "the oldest was given up");
        c.keep(1, frame(1));
        assert_eq!(c.len(), CONFIRM_SLOTS, "a frame kept twice is held once");
    }
}
