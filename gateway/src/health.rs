//! Device health, as pure state: last seen, battery, signal, temperature, firmware, counters
//! and rejects per device; online/offline transitions driven by per-device deadlines (expected
//! interval × a factor per kind) kept in a timer set, not by periodic scans; low-battery state.
//! Every transition is an event with a timestamp. Only verified frames count as activity.
//!
//! Time is passed in (`now_ms`, Unix milliseconds); the shell persists the rows and events this
//! returns, and restores them at start so deadlines survive a restart.

use std::collections::{BTreeSet, HashMap};

use gridsense_protocol::{Eui, Header, Uplink};

use crate::registry::Kind;

/// Battery must recover this far above the low level before it counts as fine again, mV.
pub const BATTERY_HYSTERESIS_MV: u16 = 100;

/// Health settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// Expected intervals × this = the offline deadline.
    pub offline_factor: f64,
    /// Expected longest silence per kind, ms: cover, drain, beacon.
    pub interval_ms: [i64; 3],
    /// Low battery level, mV.
    pub low_battery_mv: u16,
}

impl HealthConfig {
    /// From the gateway configuration.
    pub fn from_config(c: &crate::config::Health) -> Self {
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        HealthConfig {
            offline_factor: c.offline_factor,
            interval_ms: [ms(c.cover_interval_s), ms(c.drain_interval_s), ms(c.beacon_interval_s)],
            low_battery_mv: c.low_battery_mv,
        }
    }

    fn grace_ms(&self, kind: Kind) -> i64 {
        let i = match kind {
            Kind::Cover => 0,
            Kind::Drain => 1,
            Kind::Beacon => 2,
        };
        let base = self.interval_ms.get(i).copied().unwrap_or(3_600_000);
        // The factor is validated to 1..=100, so this stays far inside i64.
        #[allow(clippy::cast_possible_truncation)]
        let grace = (base as f64 * self.offline_factor) as i64;
        grace
    }
}

/// One device's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    /// Device kind.
    pub kind: Kind,
    /// When the last verified frame arrived, Unix ms.
    pub last_seen_ms: Option<i64>,
    /// Highest frame counter accepted.
    pub last_counter: Option<u32>,
    /// Battery, mV (from the last status).
    pub battery_mv: Option<u16>,
    /// Signal, dBm.
    pub rssi_dbm: Option<i16>,
    /// Temperature, 0.1 °C.
    pub temperature_dc: Option<i16>,
    /// Firmware version, `major.minor.patch`.
    pub firmware: Option<String>,
    /// Uptime at the last status, s.
    pub uptime_s: Option<u32>,
    /// Verified frames accepted.
    pub frames: u64,
    /// Frames rejected (bad tag, replay, …) that named this device.
    pub rejects: u64,
    /// Counters skipped (frames that never arrived, or not yet).
    pub skipped: u64,
    /// Currently online.
    pub online: bool,
    /// Battery currently low.
    pub low_battery: bool,
    /// When it goes offline without another frame, Unix ms.
    pub deadline_ms: Option<i64>,
}

impl DeviceHealth {
    /// A registered device never heard from.
    pub fn new(kind: Kind) -> Self {
        DeviceHealth {
            kind,
            last_seen_ms: None,
            last_counter: None,
            battery_mv: None,
            rssi_dbm: None,
            temperature_dc: None,
            firmware: None,
            uptime_s: None,
            frames: 0,
            rejects: 0,
            skipped: 0,
            online: false,
            low_battery: false,
            deadline_ms: None,
        }
    }
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// First verified frame, or first after being offline.
    Online,
    /// No verified frame before the deadline.
    Offline,
    /// Battery fell below the low level.
    BatteryLow,
    /// Battery recovered.
    BatteryOk,
    /// The device rebooted (uptime went backwards).
    Rebooted,
    /// The device sent more frames than its budget and is being throttled (once a minute
    /// while it lasts).
    Flooding,
}

impl EventKind {
    /// Stable name for storage and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Online => "online",
            EventKind::Offline => "offline",
            EventKind::BatteryLow => "battery_low",
            EventKind::BatteryOk => "battery_ok",
            EventKind::Rebooted => "rebooted",
            EventKind::Flooding => "flooding",
        }
    }
}

/// A health transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthEvent {
    /// The device.
    pub eui: Eui,
    /// When, Unix ms (for `Offline`, the deadline that passed).
    pub at_ms: i64,
    /// What.
    pub kind: EventKind,
}

/// Health of every device, with the offline timers.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    config: HealthConfig,
    devices: HashMap<Eui, DeviceHealth>,
    deadlines: BTreeSet<(i64, Eui)>,
    /// Devices online, kept current on every transition (read after every batch).
    online: usize,
}

impl HealthTracker {
    /// An empty tracker.
    pub fn new(config: HealthConfig) -> Self {
        HealthTracker { config, devices: HashMap::new(), deadlines: BTreeSet::new(), online: 0 }
    }

    /// Restores a device's persisted health (and its pending deadline).
    pub fn restore(&mut self, eui: Eui, health: DeviceHealth) {
        if let (true, Some(d)) = (health.online, health.deadline_ms) {
            self.deadlines.insert((d, eui));
        }
        let now_online = health.online;
        if let Some(previous) = self.devices.insert(eui, health)
            && previous.online
        {
            self.online -= 1;
        }
        if now_online {
            self.online += 1;
        }
    }

    /// A device's health.
    pub fn get(&self, eui: Eui) -> Option<&DeviceHealth> {
        self.devices.get(&eui)
    }

    /// Every device's health.
    pub fn iter(&self) -> impl Iterator<Item = (&Eui, &DeviceHealth)> {
        self.devices.iter()
    }

    /// Devices online now.
    pub fn online_count(&self) -> usize {
        self.online
    }

    /// A verified, new frame from a device of `kind` arrived at `now_ms`.
    pub fn on_frame(
        &mut self,
        now_ms: i64,
        kind: Kind,
        header: &Header,
        message: &Uplink,
        skipped: u32,
        events: &mut Vec<HealthEvent>,
    ) {
        let eui = header.eui;
        let config = self.config;
        let h = self.devices.entry(eui).or_insert_with(|| DeviceHealth::new(kind));
        h.kind = kind;
        h.frames += 1;
        h.skipped += u64::from(skipped);
        h.last_counter = Some(h.last_counter.map_or(header.counter, |c| c.max(header.counter)));
        h.last_seen_ms = Some(h.last_seen_ms.map_or(now_ms, |t| t.max(now_ms)));
        if !h.online {
            h.online = true;
            self.online += 1;
            events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::Online });
        }
        if let Uplink::Status(s) = message {
            if h.uptime_s.is_some_and(|u| s.uptime_s < u) {
                events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::Rebooted });
            }
            h.uptime_s = Some(s.uptime_s);
            h.battery_mv = Some(s.battery_mv);
            h.rssi_dbm = Some(s.rssi_dbm);
            h.temperature_dc = Some(s.temperature_dc);
            h.firmware =
                Some(format!("{}.{}.{}", s.firmware.major, s.firmware.minor, s.firmware.patch));
            let low = config.low_battery_mv;
            if !h.low_battery && s.battery_mv < low {
                h.low_battery = true;
                events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::BatteryLow });
            } else if h.low_battery
                && u32::from(s.battery_mv) >= u32::from(low) + u32::from(BATTERY_HYSTERESIS_MV)
            {
                h.low_battery = false;
                events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::BatteryOk });
            }
        }
        if let Some(old) = h.deadline_ms {
            self.deadlines.remove(&(old, eui));
        }
        let deadline = h.last_seen_ms.unwrap_or(now_ms).saturating_add(config.grace_ms(kind));
        h.deadline_ms = Some(deadline);
        self.deadlines.insert((deadline, eui));
    }

    /// A rejected frame named this device (it may not be the device's fault).
    pub fn on_reject(&mut self, eui: Eui) {
        if let Some(h) = self.devices.get_mut(&eui) {
            h.rejects += 1;
        }
    }

    /// Devices whose deadline is at or before `now_ms` go offline; returns who changed.
    pub fn poll_deadlines(&mut self, now_ms: i64, events: &mut Vec<HealthEvent>) -> Vec<Eui> {
        let mut changed = Vec::new();
        while let Some(&(deadline, eui)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_first();
            if let Some(h) = self.devices.get_mut(&eui)
                && h.online
                && h.deadline_ms == Some(deadline)
            {
                h.online = false;
                self.online -= 1;
                events.push(HealthEvent { eui, at_ms: deadline, kind: EventKind::Offline });
                changed.push(eui);
            }
        }
        changed
    }

    /// The earliest pending deadline.
    pub fn next_deadline(&self) -> Option<i64> {
        self.deadlines.first().map(|(d, _)| *d)
    }
}

#[cfg(test)]
mod tests {
    use gridsense_protocol::{DeviceTime, DrainSample, FirmwareVersion, ResetCause, Status};

    use super::*;

    const MIN: i64 = 60_000;

    fn config() -> HealthConfig {
        HealthConfig {
            offline_factor: 2.0,
            interval_ms: [60 * MIN, 5 * MIN, 10 * MIN],
            low_battery_mv: 3_300,
        }
    }

    fn header(eui: u64, counter: u32) -> Header {
        Header { direction: gridsense_protocol::Direction::Uplink, eui: Eui(eui), counter }
    }

    fn reading() -> Uplink {
        Uplink::DrainReading {
            at: DeviceTime(1),
            sample: DrainSample { level_mm: 1, rate_mm_h: 0 },
        }
    }

    fn status(battery_mv: u16, uptime_s: u32) -> Uplink {
        Uplink::Status(Status {
            at: DeviceTime(1),
            battery_mv,
            rssi_dbm: -90,
            temperature_dc: 100,
            firmware: FirmwareVersion { major: 1, minor: 2, patch: 3 },
            uptime_s,
            reset_cause: ResetCause::PowerOn,
        })
    }

    #[test]
    fn a_silent_device_goes_offline_at_its_deadline_and_back_online_on_its_next_frame() {
        let mut t = HealthTracker::new(config());
        let mut ev = Vec::new();
        t.on_frame(0, Kind::Drain, &header(1, 0), &reading(), 0, &mut ev);
        assert_eq!(ev, [HealthEvent { eui: Eui(1), at_ms: 0, kind: EventKind::Online }]);
        ev.clear();
        // Deadline: 5 min × 2 = 10 min after the last frame.
        assert_eq!(t.next_deadline(), Some(10 * MIN));
        assert!(t.poll_deadlines(10 * MIN - 1, &mut ev).is_empty());
        // A frame before the deadline moves it.
        t.on_frame(8 * MIN, Kind::Drain, &header(1, 1), &reading(), 0, &mut ev);
        assert!(ev.is_empty());
        assert!(t.poll_deadlines(15 * MIN, &mut ev).is_empty());
        assert_eq!(t.poll_deadlines(18 * MIN, &mut ev), [Eui(1)]);
        assert_eq!(ev, [HealthEvent { eui: Eui(1), at_ms: 18 * MIN, kind: EventKind::Offline }]);
        assert_eq!(t.next_deadline(), None);
        ev.clear();
        t.on_frame(30 * MIN, Kind::Drain, &header(1, 2), &reading(), 0, &mut ev);
        assert_eq!(ev, [HealthEvent { eui: Eui(1), at_ms: 30 * MIN, kind: EventKind::Online }]);
    }

    #[test]
    fn deadlines_survive_a_restart_and_fire_with_the_time_they_passed() {
        let mut t = HealthTracker::new(config());
        let mut ev = Vec::new();
        t.on_frame(0, Kind::Beacon, &header(7, 0), &reading(), 0, &mut ev);
        let saved = t.get(Eui(7)).cloned().unwrap();
        // The gateway is down from minute 1 to minute 60; a new tracker restores the row.
        let mut restarted = HealthTracker::new(config());
        restarted.restore(Eui(7), saved);
        ev.clear();
        assert_eq!(restarted.poll_deadlines(60 * MIN, &mut ev), [Eui(7)]);
        assert_eq!(ev, [HealthEvent { eui: Eui(7), at_ms: 20 * MIN, kind: EventKind::Offline }]);
    }

    #[test]
    fn status_updates_battery_with_hysteresis_and_detects_reboots() {
        let mut t = HealthTracker::new(config());
        let mut ev = Vec::new();
        t.on_frame(0, Kind::Cover, &header(3, 0), &status(3_600, 1_000), 0, &mut ev);
        t.on_frame(1, Kind::Cover, &header(3, 1), &status(3_250, 1_100), 0, &mut ev);
        t.on_frame(2, Kind::Cover, &header(3, 2), &status(3_350, 1_200), 0, &mut ev);
        t.on_frame(3, Kind::Cover, &header(3, 3), &status(3_450, 5), 4, &mut ev);
        let kinds: Vec<_> = ev.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventKind::Online, EventKind::BatteryLow, EventKind::Rebooted, EventKind::BatteryOk]
        );
        let h = t.get(Eui(3)).unwrap();
        assert_eq!(
            (h.frames, h.skipped, h.battery_mv, h.firmware.as_deref()),
            (4, 4, Some(3_450), Some("1.2.3"))
        );
    }

    #[test]
    fn thousands_of_devices_use_one_timer_set() {
        let mut t = HealthTracker::new(config());
        let mut ev = Vec::new();
        for i in 0..10_000u64 {
            t.on_frame(i as i64, Kind::Drain, &header(i, 0), &reading(), 0, &mut ev);
        }
        ev.clear();
        let gone = t.poll_deadlines(10 * MIN + 4_999, &mut ev);
        assert_eq!(gone.len(), 5_000);
        assert_eq!(t.online_count(), 5_000);
        assert_eq!(t.online_count(), t.iter().filter(|(_, h)| h.online).count());
        // Restoring rows (a restart) counts them again, replacing what was there.
        let saved: Vec<_> = t.iter().map(|(e, h)| (*e, h.clone())).collect();
        let mut restarted = HealthTracker::new(config());
        for (eui, h) in saved.iter().cloned().chain(saved.iter().cloned()) {
            restarted.restore(eui, h);
        }
        assert_eq!(restarted.online_count(), 5_000);
    }
}
