//! Frames kept until the gateway confirms them end to end.
//!
//! A broker's PUBACK is not delivery: a broker killed with `kill -9` loses what it
//! acknowledged since its last save. So on the sharded topics every frame is kept after its
//! PUBACK until the gateway confirms it, which the gateway does once the frame is durable:
//!
//! - an urgent frame (an alarm raised or cleared, an SOS, an incident report) by an
//!   `UplinkAck` for its counter ([`Urgent`], [`URGENT_SLOTS`] held, again after
//!   [`URGENT_ACK_TIMEOUT_MS`]);
//! - everything else (telemetry, status, downlink acks) cumulatively, by an `UplinkWindow`:
//!   the gateway's counter window as stored, so a frame the broker lost shows as a gap
//!   ([`Telemetry`], [`TELEMETRY_SLOTS`] held, again after [`TELEMETRY_ACK_TIMEOUT_MS`]).
//!
//! Without its confirmation a frame goes again, byte-identical (same counter), after its
//! timeout and on every reconnection (to either broker); the gateway's counter window drops the
//! copies and confirms them again. Pure state: time is passed in.

use gridsense_protocol::{Downlink, FrameBuf, MAX_UPLINK_FRAME_LEN};

use crate::Instant;

/// Urgent frames held for confirmation at once; past it the oldest is given up (counted).
pub const URGENT_SLOTS: usize = 4;

/// How long after its PUBACK an unconfirmed urgent frame is sent again.
pub const URGENT_ACK_TIMEOUT_MS: u64 = 10_000;

/// Other frames held for the cumulative confirmation: twice what the gateway lets come
/// between two windows (`downlink.confirm_every_frames`, 8).
pub const TELEMETRY_SLOTS: usize = 16;

/// The bytes they may take together: a reading's frame is 30–60 bytes, so the slots run out
/// first; a long backlog takes more (past it, the oldest are given up, counted).
pub const TELEMETRY_BYTES: usize = 1_024;

/// How long after its PUBACK a frame no window confirmed is sent again: past the gateway's
/// longest wait between windows while frames come (`downlink.confirm_every_s`, 30 s).
pub const TELEMETRY_ACK_TIMEOUT_MS: u64 = 60_000;

/// The urgent frames awaiting their `UplinkAck`: room for four of the longest.
pub type Urgent = Confirmations<URGENT_SLOTS, { URGENT_SLOTS * MAX_UPLINK_FRAME_LEN }>;

/// The other frames awaiting an `UplinkWindow` that holds them.
pub type Telemetry = Confirmations<TELEMETRY_SLOTS, TELEMETRY_BYTES>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    counter: u32,
    /// Its frame's length; the frames lie back to back in `bytes`, in the entries' order.
    len: u16,
    /// When it goes again (`None`: stamped at the next tick, from its PUBACK).
    due: Option<Instant>,
    /// Waiting to be sent again.
    resend: bool,
}

/// Up to `N` frames of `B` bytes together awaiting their confirmation, and what became of the
/// others.
#[derive(Debug, Clone)]
pub struct Confirmations<const N: usize, const B: usize> {
    entries: heapless::Vec<Entry, N>,
    bytes: heapless::Vec<u8, B>,
    timeout_ms: u64,
    /// Frames given up unconfirmed because more were waiting than there is room for.
    pub dropped: u32,
    /// Frames given up unconfirmed because a window had moved 64 counters past them: the
    /// gateway could no longer accept them.
    pub expired: u32,
    /// Frames confirmed.
    pub confirmed: u32,
    /// Copies sent because no confirmation came in time (or after a reconnection).
    pub resent: u32,
}

impl<const N: usize, const B: usize> Confirmations<N, B> {
    /// Nothing held; an unconfirmed frame goes again `timeout_ms` after its PUBACK.
    pub const fn new(timeout_ms: u64) -> Self {
        Confirmations {
            entries: heapless::Vec::new(),
            bytes: heapless::Vec::new(),
            timeout_ms,
            dropped: 0,
            expired: 0,
            confirmed: 0,
            resent: 0,
        }
    }

    fn offset(&self, i: usize) -> usize {
        self.entries.iter().take(i).map(|e| usize::from(e.len)).sum()
    }

    /// Forgets entry `i` and its bytes.
    fn remove(&mut self, i: usize) {
        let Some(len) = self.entries.get(i).map(|e| usize::from(e.len)) else { return };
        let from = self.offset(i);
        let total = self.bytes.len();
        self.bytes.copy_within(from + len..total, from);
        self.bytes.truncate(total - len);
        self.entries.remove(i);
    }

    /// The broker acknowledged frame `counter`: kept until confirmed (the oldest given up
    /// while there is no room).
    pub fn keep(&mut self, counter: u32, frame: &[u8]) {
        if self.entries.iter().any(|e| e.counter == counter) {
            return;
        }
        let Ok(len) = u16::try_from(frame.len()) else { return };
        if frame.len() > B {
            self.dropped = self.dropped.saturating_add(1);
            return;
        }
        while self.entries.is_full() || self.bytes.len() + frame.len() > B {
            self.remove(0);
            self.dropped = self.dropped.saturating_add(1);
        }
        if self.bytes.extend_from_slice(frame).is_ok() {
            let _ = self.entries.push(Entry { counter, len, due: None, resend: false });
        }
    }

    /// The counters held.
    pub fn counters(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().map(|e| e.counter)
    }

    /// The gateway confirmed `counter`: forgotten.
    pub fn confirmed(&mut self, counter: u32) {
        if let Some(i) = self.entries.iter().position(|e| e.counter == counter) {
            self.remove(i);
            self.confirmed = self.confirmed.saturating_add(1);
        }
    }

    /// The gateway's window as stored: the frames it holds are forgotten, and those it left 64
    /// or more counters behind are given up (the gateway would refuse them as replays). The
    /// rest — a gap in the window, or above it — stay until confirmed or sent again.
    pub fn confirmed_window(&mut self, highest: u32, seen: u64) {
        for i in (0..self.entries.len()).rev() {
            let Some(counter) = self.entries.get(i).map(|e| e.counter) else { continue };
            if Downlink::window_holds(highest, seen, counter) {
                self.remove(i);
                self.confirmed = self.confirmed.saturating_add(1);
            } else if highest.checked_sub(counter).is_some_and(|back| back >= 64) {
                self.remove(i);
                self.expired = self.expired.saturating_add(1);
            }
        }
    }

    /// Frames whose confirmation is overdue at `now` are marked to go again.
    pub fn tick(&mut self, now: Instant) {
        let timeout = self.timeout_ms;
        for e in &mut self.entries {
            match e.due {
                None => e.due = Some(now.add_millis(timeout)),
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
        let i = self.entries.iter().position(|e| e.resend)?;
        let from = self.offset(i);
        let e = self.entries.get_mut(i)?;
        e.resend = false;
        e.due = None;
        let frame = FrameBuf::from_slice(self.bytes.get(from..from + usize::from(e.len))?).ok()?;
        self.resent = self.resent.saturating_add(1);
        Some((e.counter, frame))
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
        let mut c = Urgent::new(URGENT_ACK_TIMEOUT_MS);
        let t0 = Instant::from_millis(1_000);
        c.keep(7, &frame(7));
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
        let mut c = Urgent::new(URGENT_ACK_TIMEOUT_MS);
        for n in 0..=u32::try_from(URGENT_SLOTS).unwrap_or(4) {
            c.keep(n, &frame(1));
        }
        assert_eq!((c.len(), c.dropped), (URGENT_SLOTS, 1));
        c.confirmed(0);
        assert_eq!(c.confirmed, 0, "the oldest was given up");
        c.keep(1, &frame(1));
        assert_eq!(c.len(), URGENT_SLOTS, "a frame kept twice is held once");
    }

    #[test]
    fn a_window_forgets_what_it_holds_keeps_its_gaps_and_gives_up_what_it_left_behind() {
        let mut c = Telemetry::new(TELEMETRY_ACK_TIMEOUT_MS);
        for n in [10, 11, 12, 13, 80] {
            c.keep(n, &frame(1));
        }
        // Stored through 13 except 12 (the broker lost it); 80 not yet seen.
        let seen = 0b1101;
        c.confirmed_window(13, seen);
        assert_eq!((c.len(), c.confirmed), (2, 3), "12 and 80 stay");
        c.reconnected();
        assert_eq!(c.next_resend().map(|r| r.0), Some(12), "the gap goes again");
        // A window far ahead: 12 can no longer be accepted; 80 is held.
        c.confirmed_window(80, 1);
        assert_eq!((c.len(), c.confirmed, c.expired), (0, 4, 1));
        // A window below a frame never confirms it.
        c.keep(200, &frame(2));
        c.confirmed_window(199, u64::MAX);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn frames_share_the_bytes_back_to_back_and_the_oldest_make_room() {
        let mut c = Confirmations::<4, 100>::new(1_000);
        let f = |n: u8, len: usize| FrameBuf::from_slice(&[n; 120][..len]).unwrap_or_default();
        c.keep(1, &f(1, 30));
        c.keep(2, &f(2, 40));
        c.keep(3, &f(3, 20));
        c.confirmed(2);
        c.reconnected();
        assert_eq!(c.next_resend(), Some((1, f(1, 30))));
        assert_eq!(c.next_resend(), Some((3, f(3, 20))), "intact after a removal before it");
        // 60 bytes do not fit beside 50: the oldest goes.
        c.keep(4, &f(4, 60));
        assert!(c.counters().eq([3, 4]) && c.dropped == 1);
        c.keep(5, &f(5, 101));
        assert_eq!((c.len(), c.dropped), (2, 2), "longer than the room: given up at once");
        c.reconnected();
        assert_eq!(c.next_resend(), Some((3, f(3, 20))));
        assert_eq!(c.next_resend(), Some((4, f(4, 60))));
    }
}
