//! Time as the device logic sees it: a monotonic [`Instant`] in milliseconds since boot, passed
//! in by the caller (no clock is read here), and the [`WallClock`] that maps it to the
//! protocol's [`DeviceTime`] for sample times, set by the gateway's time sync.

use gridsense_protocol::DeviceTime;

/// Milliseconds since the device booted. Only ever passed in; the logic never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// Boot.
    pub const ZERO: Instant = Instant(0);

    /// An instant `ms` milliseconds after boot.
    pub const fn from_millis(ms: u64) -> Self {
        Instant(ms)
    }

    /// An instant `s` seconds after boot.
    pub const fn from_secs(s: u64) -> Self {
        Instant(s.saturating_mul(1000))
    }

    /// Milliseconds since boot.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// This instant plus `ms` milliseconds (saturating).
    #[must_use]
    pub const fn add_millis(self, ms: u64) -> Self {
        Instant(self.0.saturating_add(ms))
    }

    /// This instant plus `s` seconds (saturating).
    #[must_use]
    pub const fn add_secs(self, s: u32) -> Self {
        self.add_millis(s as u64 * 1000)
    }

    /// Milliseconds from `earlier` to `self`; 0 if `earlier` is later.
    pub const fn millis_since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Maps boot-relative instants to wall-clock [`DeviceTime`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    /// Device time (seconds) at boot, as last synchronised; may be negative before a sync.
    boot_s: i64,
    synced: bool,
}

impl WallClock {
    /// A clock that believes boot happened at `boot_time` (from an RTC, or provisioning).
    pub const fn new(boot_time: DeviceTime) -> Self {
        WallClock { boot_s: boot_time.0 as i64, synced: false }
    }

    /// The wall-clock time at `now`, clamped to the [`DeviceTime`] range.
    pub fn at(&self, now: Instant) -> DeviceTime {
        let s = self.boot_s + (now.as_millis() / 1000) as i64;
        DeviceTime(u32::try_from(s.max(0)).unwrap_or(u32::MAX))
    }

    /// Sets the clock from the gateway's time received at `now`.
    pub fn sync(&mut self, now: Instant, gateway: DeviceTime) {
        self.boot_s = i64::from(gateway.0) - (now.as_millis() / 1000) as i64;
        self.synced = true;
    }

    /// Whether a time sync has been received since boot.
    pub const fn is_synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_follows_sync() {
        let mut clock = WallClock::new(DeviceTime(1_000));
        assert_eq!(clock.at(Instant::from_millis(2_500)), DeviceTime(1_002));
        clock.sync(Instant::from_secs(10), DeviceTime(50_000));
        assert!(clock.is_synced());
        assert_eq!(clock.at(Instant::from_secs(10)), DeviceTime(50_000));
        assert_eq!(clock.at(Instant::from_secs(70)), DeviceTime(50_060));
        // A sync that puts boot before the epoch clamps instead of wrapping.
        clock.sync(Instant::from_secs(100), DeviceTime(5));
        assert_eq!(clock.at(Instant::from_secs(0)), DeviceTime(0));
    }

    #[test]
    fn instants_saturate() {
        let t = Instant::from_millis(u64::MAX - 1);
        assert_eq!(t.add_millis(10).as_millis(), u64::MAX);
        assert_eq!(Instant::ZERO.millis_since(t), 0);
        assert_eq!(Instant::from_secs(3).add_secs(2), Instant::from_millis(5_000));
    }
}
