//! The device registry as the core sees it: kinds, dense device numbers, what the intake
//! needs of a registered device. The gateway's store keeps the registry and imports it from a
//! `gridsim city` folder (or a city's own inventory in the same format).

use gridsense_protocol::{DeviceKey, Eui};

/// Device kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Manhole cover.
    Cover,
    /// Drainage sensor.
    Drain,
    /// Patrol beacon.
    Beacon,
}

impl Kind {
    /// Every kind, in [`Kind::index`] order.
    pub const ALL: [Kind; 3] = [Kind::Cover, Kind::Drain, Kind::Beacon];

    /// Position in [`Kind::ALL`], for per-kind arrays.
    pub const fn index(self) -> usize {
        match self {
            Kind::Cover => 0,
            Kind::Drain => 1,
            Kind::Beacon => 2,
        }
    }

    /// Stable lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Cover => "cover",
            Kind::Drain => "drain",
            Kind::Beacon => "beacon",
        }
    }

    /// From the stable name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cover" => Some(Kind::Cover),
            "drain" => Some(Kind::Drain),
            "beacon" => Some(Kind::Beacon),
            _ => None,
        }
    }
}

/// A device's dense number in this process: given by the [`crate::intake::Intake`] when it
/// first hears of the EUI (registration or a restored counter window), never reused, not
/// persisted. The per-device state of health and rules lives in vectors indexed by it, so a
/// million devices cost one hash index, not one hash table per module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

impl DeviceId {
    /// Index into a per-device vector.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// A registered device as the per-device modules are handed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// Dense number.
    pub id: DeviceId,
    /// EUI.
    pub eui: Eui,
    /// Kind.
    pub kind: Kind,
}

/// A registered device as the intake needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// EUI.
    pub eui: Eui,
    /// Kind.
    pub kind: Kind,
    /// Frame key.
    pub key: DeviceKey,
}

/// What an import changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportReport {
    /// Devices new to the registry.
    pub added: usize,
    /// Devices whose record changed.
    pub updated: usize,
    /// Devices already registered exactly so.
    pub unchanged: usize,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} added, {} updated, {} unchanged", self.added, self.updated, self.unchanged)
    }
}
