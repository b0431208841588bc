//! The uplink frame counter, which must never repeat a value under one key, across restarts
//! and power loss, while writing storage (flash wears) only rarely.
//!
//! Before a counter value is used, a *reservation* at least as high is persisted. After a
//! restart the device continues from the persisted reservation, so every value it may have used
//! before is skipped. Storage is written once every [`RESERVATION_STEP`] frames.

/// How far ahead of the counter the persisted reservation runs.
pub const RESERVATION_STEP: u32 = 256;

/// Persistent storage for the counter reservation (flash, EEPROM, FRAM; a file in the simulator).
pub trait CounterStore {
    /// Why storage failed.
    type Error: core::fmt::Debug;
    /// The last reservation saved, or `None` on a factory-fresh device.
    fn load(&mut self) -> Result<Option<u32>, Self::Error>;
    /// Durably saves a new reservation. Must not return before it survives power loss.
    fn save(&mut self, reservation: u32) -> Result<(), Self::Error>;
}

/// Why no counter value could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterError<E> {
    /// Every value has been used: the device needs a new key.
    Exhausted,
    /// The reservation could not be persisted; nothing may be sent until it can.
    Storage(E),
}

/// The next counter value and the reservation that covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCounter {
    next: u32,
    reserved: u32,
    exhausted: bool,
}

impl FrameCounter {
    /// Starts from what the store holds: the saved reservation, or 0 on a fresh device.
    pub fn boot<S: CounterStore>(store: &mut S) -> Result<Self, S::Error> {
        let start = store.load()?.unwrap_or(0);
        Ok(FrameCounter { next: start, reserved: start, exhausted: false })
    }

    /// The value the next frame will get.
    pub const fn peek(&self) -> u32 {
        self.next
    }

    /// Takes the next value, first extending the persisted reservation when it is used up.
    pub fn next<S: CounterStore>(&mut self, store: &mut S) -> Result<u32, CounterError<S::Error>> {
        if self.exhausted {
            return Err(CounterError::Exhausted);
        }
        if self.next >= self.reserved {
            let reservation = self.next.saturating_add(RESERVATION_STEP);
            store.save(reservation).map_err(CounterError::Storage)?;
            self.reserved = reservation;
        }
        let value = self.next;
        match self.next.checked_add(1) {
            Some(n) => self.next = n,
            None => self.exhausted = true,
        }
        Ok(value)
    }
}

/// A counter store in RAM, for tests and for simulated devices without persistence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamStore {
    /// The saved reservation.
    pub reservation: Option<u32>,
    /// How many times it was written.
    pub writes: u32,
}

impl CounterStore for RamStore {
    type Error = core::convert::Infallible;

    fn load(&mut self) -> Result<Option<u32>, Self::Error> {
        Ok(self.reservation)
    }

    fn save(&mut self, reservation: u32) -> Result<(), Self::Error> {
        self.reservation = Some(reservation);
        self.writes = self.writes.saturating_add(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that fails on demand.
    struct Flaky {
        inner: RamStore,
        fail: bool,
    }

    impl CounterStore for Flaky {
        type Error = &'static str;
        fn load(&mut self) -> Result<Option<u32>, Self::Error> {
            Ok(self.inner.reservation)
        }
        fn save(&mut self, r: u32) -> Result<(), Self::Error> {
            if self.fail {
                return Err("flash busy");
            }
            self.inner.reservation = Some(r);
            Ok(())
        }
    }

    #[test]
    fn never_reuses_a_value_across_power_loss_at_any_point() {
        let mut store = RamStore::default();
        let mut used = std::collections::BTreeSet::new();
        // Power is lost after a varying number of frames, many times over.
        for frames_before_loss in [0u32, 1, 5, 255, 256, 257, 1000, 3] {
            let mut counter = FrameCounter::boot(&mut store).unwrap();
            for _ in 0..frames_before_loss {
                let value = counter.next(&mut store).unwrap();
                assert!(used.insert(value), "counter {value} reused");
            }
        }
        // Storage is written once per 256 frames (plus once per boot that sends).
        let used = u32::try_from(used.len()).unwrap();
        assert!(store.writes <= 2 + used / RESERVATION_STEP + 8, "{}", store.writes);
    }

    #[test]
    fn values_increase_strictly_within_a_boot() {
        let mut store = RamStore::default();
        let mut counter = FrameCounter::boot(&mut store).unwrap();
        let values: std::vec::Vec<u32> =
            (0..600).map(|_| counter.next(&mut store).unwrap()).collect();
        assert!(values.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(store.writes, 3);
    }

    #[test]
    fn a_failed_save_sends_nothing_and_recovers() {
        let mut store = Flaky { inner: RamStore::default(), fail: true };
        let mut counter = FrameCounter::boot(&mut store).unwrap();
        assert_eq!(counter.next(&mut store), Err(CounterError::Storage("flash busy")));
        store.fail = false;
        assert_eq!(counter.next(&mut store), Ok(0));
    }

    #[test]
    fn the_last_value_is_used_once_then_exhausted() {
        let mut store = RamStore { reservation: Some(u32::MAX), writes: 0 };
        let mut counter = FrameCounter::boot(&mut store).unwrap();
        assert_eq!(counter.next(&mut store), Ok(u32::MAX));
        assert_eq!(counter.next(&mut store), Err(CounterError::Exhausted));
    }
}
