//! What one group commit writes: the batch a frame (or a timer) produces in the pipeline, and
//! the records in it. The store decides how they are written; nothing here knows a table or a
//! text format.

use std::{collections::BTreeMap, sync::Arc};

use gridsense_protocol::{CounterWindow, DeviceKey, Eui, Uplink};

use crate::{
    downlink::RequestUpdate,
    health::{DeviceHealth, HealthEvent},
    registry::Kind,
};

/// A beacon's last fix: latitude, longitude, time, grid.
pub type Fix = (f64, f64, i64, Option<String>);

/// Entries in a device's list of recent telemetry frames.
pub const RECENT_FRAME_SLOTS: usize = 16;

/// One telemetry value with its explicit time.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Device.
    pub eui: Eui,
    /// Its kind (a tag in the time-series store).
    pub kind: Kind,
    /// Measurement (`cover`, `drain`, `position`, `status`).
    pub measurement: &'static str,
    /// Field.
    pub field: &'static str,
    /// Sample time, Unix ms.
    pub at_ms: i64,
    /// Value.
    pub value: f64,
    /// The responsibility grid it was measured in, when the grid layer is loaded.
    pub grid: Option<Arc<str>>,
    /// That grid's street.
    pub street: Option<Arc<str>>,
}

/// A rejected frame for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// When it arrived, Unix ms.
    pub received_ms: i64,
    /// Its topic.
    pub topic: String,
    /// Reject reason code.
    pub reason: &'static str,
    /// The EUI it claimed, if readable.
    pub eui: Option<Eui>,
    /// The raw payload (bounded by the broker's packet limit).
    pub raw: Vec<u8>,
}

/// An accepted message other than plain telemetry (alarms, reports, SOS, check-ins, acks,
/// status), kept for rules, cases and the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    /// Device.
    pub eui: Eui,
    /// Frame counter.
    pub counter: u32,
    /// When it arrived, Unix ms.
    pub received_ms: i64,
    /// Message kind name.
    pub kind: &'static str,
    /// The message itself; the store decides how it is written (SPEC.md §11's JSON).
    pub message: Uplink,
}

/// An accepted telemetry frame (a reading, a fix, a backlog), remembered in its device's ring
/// of recent frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentFrame {
    /// Device.
    pub eui: Eui,
    /// Frame counter.
    pub counter: u32,
    /// When it arrived, Unix ms.
    pub received_ms: i64,
    /// Message kind name.
    pub kind: &'static str,
    /// Samples it carried.
    pub samples: u16,
}

/// Everything one group commit writes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Final counter windows of the devices touched.
    pub counters: BTreeMap<Eui, CounterWindow>,
    /// Final health rows of the devices touched.
    pub health: BTreeMap<Eui, DeviceHealth>,
    /// Health transitions.
    pub events: Vec<HealthEvent>,
    /// Accepted non-telemetry messages.
    pub messages: Vec<MessageRecord>,
    /// Telemetry.
    pub telemetry: Vec<Point>,
    /// Rejected frames.
    pub audit: Vec<AuditRecord>,
    /// Rejects by reason.
    pub rejects: BTreeMap<&'static str, u64>,
    /// Frames accepted.
    pub accepted: u64,
    /// Next downlink counter of the devices a downlink went to.
    pub downlink_counters: BTreeMap<Eui, u32>,
    /// Sealed downlinks to publish after the commit: topic, frame, and how it goes.
    pub downlinks: Vec<(String, Vec<u8>, crate::downlink::Route)>,
    /// Changes to operators' requests.
    pub request_updates: Vec<RequestUpdate>,
    /// Rule states changed: device, rule id, state (`None`: delete).
    pub rule_states: Vec<(Eui, String, Option<crate::rules::RuleState>)>,
    /// Incidents, cases, outbox, alerts and patrol records.
    pub cases: crate::cases::Effects,
    /// Beacons' newest fixes.
    pub fixes: BTreeMap<Eui, Fix>,
    /// The shards the batch was decided under: the store commits it only while they are
    /// still this instance's (`None`: a single instance, nothing to check).
    pub fence: Option<crate::cluster::Fence>,
    /// Sample times clamped to the receive time (more than `health.max_ahead_s` ahead).
    pub future_samples: u64,
    /// Accepted telemetry frames, for their devices' rings of recent frames.
    pub recent: Vec<RecentFrame>,
}

impl Batch {
    /// Whether nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
            && self.health.is_empty()
            && self.events.is_empty()
            && self.messages.is_empty()
            && self.telemetry.is_empty()
            && self.audit.is_empty()
            && self.rejects.is_empty()
            && self.accepted == 0
            && self.downlink_counters.is_empty()
            && self.downlinks.is_empty()
            && self.request_updates.is_empty()
            && self.rule_states.is_empty()
            && self.cases.is_empty()
            && self.fixes.is_empty()
            && self.recent.is_empty()
    }
}

/// A device as it is after a registry change.
#[derive(Debug, Clone)]
pub struct RegistryChange {
    /// Device.
    pub eui: Eui,
    /// Its key, site and attributes when active; `None`: no longer accepted.
    pub active: Option<(DeviceKey, crate::cases::Site, crate::rules::Attributes)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_only_held_back_recent_frames_is_not_empty() {
        // The sweep of frames held back for fast senders can be all a batch holds (a poll
        // with no frame): it must still be committed, not dropped as empty.
        let batch = Batch {
            recent: vec![RecentFrame {
                eui: Eui(1),
                counter: 7,
                received_ms: 1_000,
                kind: "drain_reading",
                samples: 1,
            }],
            ..Batch::default()
        };
        assert!(!batch.is_empty());
        assert!(Batch::default().is_empty());
    }
}
