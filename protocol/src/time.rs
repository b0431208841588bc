//! Device time: whole seconds since the gridsense epoch, 2025-01-01T00:00:00Z.
//!
//! A `u32` of seconds from this epoch lasts until 2161 and, as a postcard varint, takes 4 bytes
//! until mid-2033 (5 after). Unix seconds would cost 5 bytes from day one.

use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// Unix time (seconds) of the gridsense epoch, 2025-01-01T00:00:00Z.
pub const EPOCH_UNIX_S: u64 = 1_735_689_600;

/// Seconds since 2025-01-01T00:00:00Z (UTC), as the device's clock reads them.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    MaxSize,
)]
#[serde(transparent)]
pub struct DeviceTime(pub u32);

impl DeviceTime {
    /// The epoch itself.
    pub const EPOCH: DeviceTime = DeviceTime(0);

    /// Device time for a Unix time in seconds; `None` before the epoch or past the `u32` range.
    pub fn from_unix_secs(unix_s: u64) -> Option<Self> {
        let since = unix_s.checked_sub(EPOCH_UNIX_S)?;
        u32::try_from(since).ok().map(DeviceTime)
    }

    /// The same instant in Unix seconds.
    pub const fn unix_secs(self) -> u64 {
        EPOCH_UNIX_S + self.0 as u64
    }

    /// Seconds since the epoch.
    pub const fn secs(self) -> u32 {
        self.0
    }

    /// This time plus `secs`, saturating at the end of the range.
    #[must_use]
    pub const fn saturating_add_secs(self, secs: u32) -> Self {
        DeviceTime(self.0.saturating_add(secs))
    }

    /// Seconds from `earlier` to `self`, or `None` if `earlier` is later.
    pub const fn secs_since(self, earlier: DeviceTime) -> Option<u32> {
        self.0.checked_sub(earlier.0)
    }
}
