//! Device health, as pure state: last seen, battery, signal, temperature, firmware, counters
//! and rejects per device; online/offline transitions driven by per-device deadlines (expected
//! interval × a factor per kind) kept in a timer set, not by periodic scans; low-battery state.
//! Every transition is an event with a timestamp. Only verified frames count as activity.
//!
//! Time is passed in (`now_ms`, Unix milliseconds); the shell persists the rows and events this
//! returns, and restores them at start so deadlines survive a restart.

use std::collections::HashMap;

use gridsense_protocol::{Eui, Header, Uplink};

use crate::registry::{Device, DeviceId, Kind};

/// Battery must recover this far above the low level before it counts as fine again, mV.
pub const BATTERY_HYSTERESIS_MV: u16 = 100;

/// The low-battery level when none is configured, mV (DOMAIN.md's warning level).
pub const DEFAULT_LOW_BATTERY_MV: u16 = 3_300;

/// Health settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// Expected intervals × this = the offline deadline.
    pub offline_factor: f64,
    /// Expected longest silence per kind, ms: cover, drain, beacon.
    pub interval_ms: [i64; 3],
    /// Low battery level, mV.
    pub low_battery_mv: u16,
    /// A sample time more than this ahead of the receive time is clamped to it, ms.
    pub max_ahead_ms: i64,
}

impl HealthConfig {
    fn grace_ms(&self, kind: Kind) -> i64 {
        let base = self.interval_ms.get(kind.index()).copied().unwrap_or(3_600_000);
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

/// Health of every device, with the offline timers: one 56-byte slot per device, indexed by
/// its [`DeviceId`], and 8 bytes more for its place in the offline [`Queue`].
#[derive(Debug, Clone)]
pub struct HealthTracker {
    config: HealthConfig,
    slots: Vec<Slot>,
    /// Firmware strings restored from rows that are not `major.minor.patch` numbers.
    odd_firmware: HashMap<DeviceId, String>,
    queue: Queue,
    /// Devices online, kept current on every transition (read after every batch).
    online: usize,
}

/// One device's health, packed: [`DeviceHealth`] is its public form. The deadline is not
/// kept: it is always the last frame's time plus the kind's grace.
#[derive(Debug, Clone, Copy)]
struct Slot {
    eui: Eui,
    /// `i64::MIN`: never.
    last_seen_ms: i64,
    frames: u64,
    uptime_s: u32,
    last_counter: u32,
    /// Saturating (a device that overflows these is broken enough either way).
    rejects: u32,
    skipped: u32,
    battery_mv: u16,
    rssi_dbm: i16,
    temperature_dc: i16,
    firmware: (u8, u8, u16),
    kind: Kind,
    /// [`flag`] bits.
    flags: u16,
}

/// Bits of [`Slot::flags`]: state, and which optional fields are set.
mod flag {
    pub const KNOWN: u16 = 1;
    pub const ONLINE: u16 = 1 << 1;
    pub const LOW_BATTERY: u16 = 1 << 2;
    pub const COUNTER: u16 = 1 << 3;
    pub const BATTERY: u16 = 1 << 4;
    pub const RSSI: u16 = 1 << 5;
    pub const TEMPERATURE: u16 = 1 << 6;
    pub const FIRMWARE: u16 = 1 << 7;
    pub const UPTIME: u16 = 1 << 8;
}

impl Slot {
    const EMPTY: Slot = Slot {
        eui: Eui(0),
        last_seen_ms: i64::MIN,
        frames: 0,
        uptime_s: 0,
        last_counter: 0,
        rejects: 0,
        skipped: 0,
        battery_mv: 0,
        rssi_dbm: 0,
        temperature_dc: 0,
        firmware: (0, 0, 0),
        kind: Kind::Cover,
        flags: 0,
    };

    fn has(&self, bit: u16) -> bool {
        self.flags & bit != 0
    }

    fn set(&mut self, bit: u16, on: bool) {
        if on {
            self.flags |= bit;
        } else {
            self.flags &= !bit;
        }
    }

    fn opt<T>(&self, bit: u16, value: T) -> Option<T> {
        self.has(bit).then_some(value)
    }

    fn last_seen(&self) -> Option<i64> {
        (self.last_seen_ms != i64::MIN).then_some(self.last_seen_ms)
    }
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn parse_firmware(s: &str) -> Option<(u8, u8, u16)> {
    let mut parts = s.split('.');
    let v = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    // Only the form this module writes, so that it reads back the same.
    (parts.next().is_none() && format!("{}.{}.{}", v.0, v.1, v.2) == s).then_some(v)
}

impl HealthTracker {
    /// An empty tracker.
    pub fn new(config: HealthConfig) -> Self {
        HealthTracker {
            config,
            slots: Vec::new(),
            odd_firmware: HashMap::new(),
            queue: Queue::default(),
            online: 0,
        }
    }

    /// Room for devices numbered below `n` without growing.
    pub fn reserve(&mut self, n: usize) {
        self.slots.reserve_exact(n.saturating_sub(self.slots.len()));
    }

    fn slot_mut(&mut self, id: DeviceId) -> Option<&mut Slot> {
        if id.index() >= self.slots.len() {
            self.slots.resize(id.index() + 1, Slot::EMPTY);
        }
        self.slots.get_mut(id.index())
    }

    fn known(&self, id: DeviceId) -> Option<&Slot> {
        self.slots.get(id.index()).filter(|s| s.has(flag::KNOWN))
    }

    fn deadline(&self, slot: &Slot) -> Option<i64> {
        Some(slot.last_seen()?.saturating_add(self.config.grace_ms(slot.kind)))
    }

    /// Restores a device's persisted health (and its pending deadline, which is its last
    /// frame's time plus its kind's grace under the current settings).
    pub fn restore(&mut self, id: DeviceId, eui: Eui, health: DeviceHealth) {
        if let Some(old) = self.known(id).copied()
            && old.has(flag::ONLINE)
        {
            self.online -= 1;
            self.queue.unlink(id, old.kind);
        }
        let grace = self.config.grace_ms(health.kind);
        let h = health;
        // A row online without a last frame time (written by hand): its deadline stands for it.
        let last_seen = h.last_seen_ms.or(h.deadline_ms.map(|d| d.saturating_sub(grace)));
        let firmware = h.firmware.as_deref().map(|f| (parse_firmware(f), f));
        let mut slot = Slot {
            eui,
            last_seen_ms: last_seen.unwrap_or(i64::MIN),
            frames: h.frames,
            uptime_s: h.uptime_s.unwrap_or(0),
            last_counter: h.last_counter.unwrap_or(0),
            rejects: saturate(h.rejects),
            skipped: saturate(h.skipped),
            battery_mv: h.battery_mv.unwrap_or(0),
            rssi_dbm: h.rssi_dbm.unwrap_or(0),
            temperature_dc: h.temperature_dc.unwrap_or(0),
            firmware: firmware.and_then(|f| f.0).unwrap_or((0, 0, 0)),
            kind: h.kind,
            flags: flag::KNOWN,
        };
        slot.set(flag::LOW_BATTERY, h.low_battery);
        slot.set(flag::COUNTER, h.last_counter.is_some());
        slot.set(flag::BATTERY, h.battery_mv.is_some());
        slot.set(flag::RSSI, h.rssi_dbm.is_some());
        slot.set(flag::TEMPERATURE, h.temperature_dc.is_some());
        slot.set(flag::FIRMWARE, firmware.is_some_and(|f| f.0.is_some()));
        slot.set(flag::UPTIME, h.uptime_s.is_some());
        match firmware {
            Some((None, odd)) => self.odd_firmware.insert(id, odd.to_owned()),
            _ => self.odd_firmware.remove(&id),
        };
        // Online without any time: a row that cannot go offline is worse than one that does.
        slot.set(flag::ONLINE, h.online && slot.last_seen().is_some());
        let Some(s) = self.slot_mut(id) else { return };
        *s = slot;
        if slot.has(flag::ONLINE) {
            self.online += 1;
            self.queue.push_restored(id, slot.kind, &self.slots);
        }
    }

    /// Forgets a device's health (its shard went to another gateway instance): no deadline,
    /// no row, until [`HealthTracker::restore`] or its next frame here.
    pub fn forget(&mut self, id: DeviceId) {
        if let Some(old) = self.known(id).copied() {
            if old.has(flag::ONLINE) {
                self.online -= 1;
                self.queue.unlink(id, old.kind);
            }
            if let Some(s) = self.slots.get_mut(id.index()) {
                *s = Slot::EMPTY;
            }
            self.odd_firmware.remove(&id);
        }
    }

    /// A device's health, and its EUI.
    pub fn get(&self, id: DeviceId) -> Option<(Eui, DeviceHealth)> {
        let s = self.known(id)?;
        let firmware = s.opt(flag::FIRMWARE, s.firmware).map(|(a, b, c)| format!("{a}.{b}.{c}"));
        let health = DeviceHealth {
            kind: s.kind,
            last_seen_ms: s.last_seen(),
            last_counter: s.opt(flag::COUNTER, s.last_counter),
            battery_mv: s.opt(flag::BATTERY, s.battery_mv),
            rssi_dbm: s.opt(flag::RSSI, s.rssi_dbm),
            temperature_dc: s.opt(flag::TEMPERATURE, s.temperature_dc),
            firmware: firmware.or_else(|| self.odd_firmware.get(&id).cloned()),
            uptime_s: s.opt(flag::UPTIME, s.uptime_s),
            frames: s.frames,
            rejects: u64::from(s.rejects),
            skipped: u64::from(s.skipped),
            online: s.has(flag::ONLINE),
            low_battery: s.has(flag::LOW_BATTERY),
            deadline_ms: self.deadline(s),
        };
        Some((s.eui, health))
    }

    /// A device's last reported battery, mV.
    pub fn battery_mv(&self, id: DeviceId) -> Option<u16> {
        self.known(id).and_then(|s| s.opt(flag::BATTERY, s.battery_mv))
    }

    /// Every device's health.
    pub fn iter(&self) -> impl Iterator<Item = (Eui, DeviceHealth)> + '_ {
        (0..self.slots.len()).filter_map(|i| self.get(DeviceId(u32::try_from(i).ok()?)))
    }

    /// Devices online now.
    pub fn online_count(&self) -> usize {
        self.online
    }

    /// A verified, new frame from `device` arrived at `now_ms`.
    pub fn on_frame(
        &mut self,
        now_ms: i64,
        device: Device,
        header: &Header,
        message: &Uplink,
        skipped: u32,
        events: &mut Vec<HealthEvent>,
    ) {
        let Device { id, eui, kind } = device;
        let config = self.config;
        let Some(h) = self.slot_mut(id) else { return };
        if !h.has(flag::KNOWN) {
            *h = Slot { eui, flags: flag::KNOWN, ..Slot::EMPTY };
        }
        let was_online = h.has(flag::ONLINE).then_some(h.kind);
        h.eui = eui;
        h.kind = kind;
        h.frames += 1;
        h.skipped = h.skipped.saturating_add(skipped);
        h.last_counter =
            if h.has(flag::COUNTER) { h.last_counter.max(header.counter) } else { header.counter };
        h.set(flag::COUNTER, true);
        h.last_seen_ms = h.last_seen().map_or(now_ms, |t| t.max(now_ms));
        if was_online.is_none() {
            h.set(flag::ONLINE, true);
            events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::Online });
        }
        let mut status_changed_firmware = false;
        if let Uplink::Status(s) = message {
            if h.has(flag::UPTIME) && s.uptime_s < h.uptime_s {
                events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::Rebooted });
            }
            h.uptime_s = s.uptime_s;
            h.battery_mv = s.battery_mv;
            h.rssi_dbm = s.rssi_dbm;
            h.temperature_dc = s.temperature_dc;
            h.firmware = (s.firmware.major, s.firmware.minor, s.firmware.patch);
            h.flags |=
                flag::UPTIME | flag::BATTERY | flag::RSSI | flag::TEMPERATURE | flag::FIRMWARE;
            status_changed_firmware = true;
            let low = config.low_battery_mv;
            if !h.has(flag::LOW_BATTERY) && s.battery_mv < low {
                h.set(flag::LOW_BATTERY, true);
                events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::BatteryLow });
            } else if h.has(flag::LOW_BATTERY)
                && u32::from(s.battery_mv) >= u32::from(low) + u32::from(BATTERY_HYSTERESIS_MV)
            {
                h.set(flag::LOW_BATTERY, false);
                events.push(HealthEvent { eui, at_ms: now_ms, kind: EventKind::BatteryOk });
            }
        }
        if status_changed_firmware {
            self.odd_firmware.remove(&id);
        }
        match was_online {
            Some(old_kind) => self.queue.unlink(id, old_kind),
            None => self.online += 1,
        }
        self.queue.insert(id, kind, &self.slots);
    }

    /// A rejected frame named this device (it may not be the device's fault).
    pub fn on_reject(&mut self, id: DeviceId) {
        if let Some(h) = self.slots.get_mut(id.index()).filter(|s| s.has(flag::KNOWN)) {
            h.rejects = h.rejects.saturating_add(1);
        }
    }

    /// Devices whose deadline is at or before `now_ms` go offline, earliest first; returns
    /// who changed.
    pub fn poll_deadlines(&mut self, now_ms: i64, events: &mut Vec<HealthEvent>) -> Vec<DeviceId> {
        self.queue.sort(&self.slots);
        let mut changed = Vec::new();
        while let Some((deadline, id)) = self.earliest() {
            if deadline > now_ms {
                break;
            }
            let Some(h) = self.slots.get_mut(id.index()) else { break };
            h.set(flag::ONLINE, false);
            let (eui, kind) = (h.eui, h.kind);
            self.queue.unlink(id, kind);
            self.online -= 1;
            events.push(HealthEvent { eui, at_ms: deadline, kind: EventKind::Offline });
            changed.push(id);
        }
        changed
    }

    /// The online device with the earliest deadline, and that deadline.
    fn earliest(&self) -> Option<(i64, DeviceId)> {
        Kind::ALL
            .iter()
            .filter_map(|&kind| {
                let id = self.queue.first(kind, &self.slots)?;
                Some((self.deadline(self.slots.get(id.index())?)?, id))
            })
            .min()
    }

    /// The earliest pending deadline.
    pub fn next_deadline(&self) -> Option<i64> {
        self.earliest().map(|(d, _)| d)
    }
}

/// No device (a list end).
const NIL: u32 = u32::MAX;

/// The offline timers: the online devices of each kind in the order of their last frame, and
/// so of their deadline (that time plus the kind's grace) — a linked list per kind through 8
/// bytes per device. A frame moves its device to the end (in the rare case the clock went
/// back, a little before it); restored rows are appended as they come and the lists sorted
/// once before they are next polled.
#[derive(Debug, Clone)]
struct Queue {
    /// Per device: previous and next in its kind's list.
    links: Vec<[u32; 2]>,
    /// Per kind: first and last.
    ends: [[u32; 2]; 3],
    /// Per kind: restored out of order, to sort before polling.
    unsorted: [bool; 3],
}

impl Default for Queue {
    fn default() -> Self {
        Queue { links: Vec::new(), ends: [[NIL, NIL]; 3], unsorted: [false; 3] }
    }
}

fn seen(slots: &[Slot], id: u32) -> i64 {
    slots.get(id as usize).map_or(i64::MIN, |s| s.last_seen_ms)
}

impl Queue {
    fn link(&self, id: u32) -> [u32; 2] {
        self.links.get(id as usize).copied().unwrap_or([NIL, NIL])
    }

    fn set(&mut self, id: u32, which: usize, to: u32) {
        if id == NIL {
            return;
        }
        if id as usize >= self.links.len() {
            self.links.resize(id as usize + 1, [NIL, NIL]);
        }
        if let Some(l) = self.links.get_mut(id as usize).and_then(|l| l.get_mut(which)) {
            *l = to;
        }
    }

    fn end(&mut self, kind: Kind, which: usize) -> Option<&mut u32> {
        self.ends.get_mut(kind.index())?.get_mut(which)
    }

    /// Makes `b` follow `a` in a kind's list (`a` `NIL`: `b` is first; `b` `NIL`: `a` is last).
    fn join(&mut self, kind: Kind, a: u32, b: u32) {
        match self.end(kind, 0) {
            Some(head) if a == NIL => *head = b,
            _ => self.set(a, 1, b),
        }
        match self.end(kind, 1) {
            Some(tail) if b == NIL => *tail = a,
            _ => self.set(b, 0, a),
        }
    }

    /// Puts `id` after `prev` (`NIL`: first) in its kind's list.
    fn link_after(&mut self, id: u32, prev: u32, kind: Kind) {
        let next = if prev == NIL { self.head(kind) } else { self.link(prev)[1] };
        self.join(kind, prev, id);
        self.join(kind, id, next);
    }

    fn unlink(&mut self, id: DeviceId, kind: Kind) {
        let [prev, next] = self.link(id.0);
        self.join(kind, prev, next);
        self.set(id.0, 0, NIL);
        self.set(id.0, 1, NIL);
    }

    fn head(&self, kind: Kind) -> u32 {
        self.ends.get(kind.index()).map_or(NIL, |e| e[0])
    }

    fn tail(&self, kind: Kind) -> u32 {
        self.ends.get(kind.index()).map_or(NIL, |e| e[1])
    }

    fn is_unsorted(&self, kind: Kind) -> bool {
        self.unsorted.get(kind.index()).copied().unwrap_or(false)
    }

    fn mark_unsorted(&mut self, kind: Kind, unsorted: bool) {
        if let Some(u) = self.unsorted.get_mut(kind.index()) {
            *u = unsorted;
        }
    }

    /// A kind's list, first to last.
    fn walk(&self, kind: Kind) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors(Some(self.head(kind)).filter(|&h| h != NIL), |&at| {
            Some(self.link(at)[1]).filter(|&n| n != NIL)
        })
    }

    /// In order of the last frame, walking back from the end (a frame is almost always the
    /// newest).
    fn insert(&mut self, id: DeviceId, kind: Kind, slots: &[Slot]) {
        let at = seen(slots, id.0);
        let mut prev = self.tail(kind);
        while prev != NIL && seen(slots, prev) > at {
            prev = self.link(prev)[0];
        }
        self.link_after(id.0, prev, kind);
    }

    /// At the end, to be sorted later if out of order.
    fn push_restored(&mut self, id: DeviceId, kind: Kind, slots: &[Slot]) {
        let tail = self.tail(kind);
        if tail != NIL && seen(slots, tail) > seen(slots, id.0) {
            self.mark_unsorted(kind, true);
        }
        self.link_after(id.0, tail, kind);
    }

    /// Sorts the lists restored out of order.
    fn sort(&mut self, slots: &[Slot]) {
        for kind in Kind::ALL {
            if !self.is_unsorted(kind) {
                continue;
            }
            let mut ids: Vec<u32> = self.walk(kind).collect();
            ids.sort_by_key(|id| seen(slots, *id));
            if let Some(e) = self.ends.get_mut(kind.index()) {
                *e = [NIL, NIL];
            }
            let mut prev = NIL;
            for id in ids {
                self.link_after(id, prev, kind);
                prev = id;
            }
            self.mark_unsorted(kind, false);
        }
    }

    /// The first device of a kind's list (the earliest deadline once sorted; before the
    /// restored lists are sorted, found by looking at them all).
    fn first(&self, kind: Kind, slots: &[Slot]) -> Option<DeviceId> {
        let first = if self.is_unsorted(kind) {
            self.walk(kind).min_by_key(|id| seen(slots, *id))
        } else {
            Some(self.head(kind)).filter(|&h| h != NIL)
        };
        first.map(DeviceId)
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
            max_ahead_ms: 120_000,
        }
    }

    fn dev(eui: u64, kind: Kind) -> Device {
        Device { id: DeviceId(u32::try_from(eui).unwrap()), eui: Eui(eui), kind }
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
        t.on_frame(0, dev(1, Kind::Drain), &header(1, 0), &reading(), 0, &mut ev);
        assert_eq!(ev, [HealthEvent { eui: Eui(1), at_ms: 0, kind: EventKind::Online }]);
        ev.clear();
        // Deadline: 5 min × 2 = 10 min after the last frame.
        assert_eq!(t.next_deadline(), Some(10 * MIN));
        assert!(t.poll_deadlines(10 * MIN - 1, &mut ev).is_empty());
        // A frame before the deadline moves it.
        t.on_frame(8 * MIN, dev(1, Kind::Drain), &header(1, 1), &reading(), 0, &mut ev);
        assert!(ev.is_empty());
        assert!(t.poll_deadlines(15 * MIN, &mut ev).is_empty());
        assert_eq!(t.poll_deadlines(18 * MIN, &mut ev), [DeviceId(1)]);
        assert_eq!(ev, [HealthEvent { eui: Eui(1), at_ms: 18 * MIN, kind: EventKind::Offline }]);
        assert_eq!(t.next_deadline(), None);
        ev.clear();
        t.on_frame(30 * MIN, dev(1, Kind::Drain), &header(1, 2), &reading(), 0, &mut ev);
        assert_eq!(ev, [HealthEvent { eui: Eui(1), at_ms: 30 * MIN, kind: EventKind::Online }]);
    }

    #[test]
    fn deadlines_survive_a_restart_and_fire_with_the_time_they_passed() {
        let mut t = HealthTracker::new(config());
        let mut ev = Vec::new();
        t.on_frame(0, dev(7, Kind::Beacon), &header(7, 0), &reading(), 0, &mut ev);
        let (eui, saved) = t.get(DeviceId(7)).unwrap();
        // The gateway is down from minute 1 to minute 60; a new tracker restores the row.
        let mut restarted = HealthTracker::new(config());
        restarted.restore(DeviceId(7), eui, saved);
        ev.clear();
        assert_eq!(restarted.poll_deadlines(60 * MIN, &mut ev), [DeviceId(7)]);
        assert_eq!(ev, [HealthEvent { eui: Eui(7), at_ms: 20 * MIN, kind: EventKind::Offline }]);
    }

    #[test]
    fn status_updates_battery_with_hysteresis_and_detects_reboots() {
        let mut t = HealthTracker::new(config());
        let mut ev = Vec::new();
        t.on_frame(0, dev(3, Kind::Cover), &header(3, 0), &status(3_600, 1_000), 0, &mut ev);
        t.on_frame(1, dev(3, Kind::Cover), &header(3, 1), &status(3_250, 1_100), 0, &mut ev);
        t.on_frame(2, dev(3, Kind::Cover), &header(3, 2), &status(3_350, 1_200), 0, &mut ev);
        t.on_frame(3, dev(3, Kind::Cover), &header(3, 3), &status(3_450, 5), 4, &mut ev);
        let kinds: Vec<_> = ev.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventKind::Online, EventKind::BatteryLow, EventKind::Rebooted, EventKind::BatteryOk]
        );
        let (_, h) = t.get(DeviceId(3)).unwrap();
        assert_eq!(
            (h.frames, h.skipped, h.battery_mv, h.firmware.as_deref()),
            (4, 4, Some(3_450), Some("1.2.3"))
        );
    }

    #[test]
    fn a_row_reads_back_as_it_was_restored_from_a_56_byte_slot() {
        assert!(size_of::<Slot>() <= 56, "{}", size_of::<Slot>());
        let full = DeviceHealth {
            kind: Kind::Drain,
            last_seen_ms: Some(5 * MIN),
            last_counter: Some(41),
            battery_mv: Some(3_000),
            rssi_dbm: Some(-97),
            temperature_dc: Some(-15),
            firmware: Some("2.10.300".into()),
            uptime_s: Some(86_400),
            frames: 1 << 40,
            rejects: 3,
            skipped: 7,
            online: true,
            low_battery: true,
            deadline_ms: Some(15 * MIN),
        };
        // Written by hand or by another version: a firmware string that is not three numbers,
        // and fields missing.
        let odd = DeviceHealth {
            firmware: Some("v2-beta".into()),
            battery_mv: None,
            last_counter: None,
            online: false,
            ..full.clone()
        };
        let never = DeviceHealth::new(Kind::Cover);
        let mut t = HealthTracker::new(config());
        for (i, row) in [&full, &odd, &never].into_iter().enumerate() {
            let id = DeviceId(u32::try_from(i).unwrap());
            t.restore(id, Eui(100 + i as u64), row.clone());
            assert_eq!(t.get(id), Some((Eui(100 + i as u64), row.clone())));
        }
        assert_eq!(t.online_count(), 1);
        assert_eq!(t.next_deadline(), Some(15 * MIN));
        // A status replaces the odd firmware string.
        let mut ev = Vec::new();
        let odd_device = Device { id: DeviceId(1), eui: Eui(101), kind: Kind::Drain };
        t.on_frame(6 * MIN, odd_device, &header(101, 1), &status(3_500, 9), 0, &mut ev);
        let (_, h) = t.get(DeviceId(1)).unwrap();
        assert_eq!(h.firmware.as_deref(), Some("1.2.3"));
        assert_eq!(t.next_deadline(), Some(15 * MIN));
        // A number never restored nor heard has no health; a reject for it changes nothing.
        t.on_reject(DeviceId(9));
        assert_eq!(t.get(DeviceId(9)), None);
    }

    #[test]
    fn devices_go_offline_in_deadline_order_however_rows_and_frames_came() {
        let mut t = HealthTracker::new(config());
        let mut ev = Vec::new();
        // Rows restored in no order (drains: 10 min grace; beacons: 20 min).
        for (n, seen, kind) in
            [(1, 7, Kind::Drain), (2, 2, Kind::Drain), (3, 5, Kind::Beacon), (4, 4, Kind::Drain)]
        {
            let row = DeviceHealth {
                last_seen_ms: Some(seen * MIN),
                online: true,
                ..DeviceHealth::new(kind)
            };
            t.restore(DeviceId(n), Eui(u64::from(n)), row);
        }
        assert_eq!(t.next_deadline(), Some(12 * MIN));
        // Frames: one with a clock that stepped back (it still goes offline at its own
        // deadline), and a device that is now a beacon.
        t.on_frame(9 * MIN, dev(5, Kind::Drain), &header(5, 0), &reading(), 0, &mut ev);
        t.on_frame(3 * MIN, dev(6, Kind::Drain), &header(6, 0), &reading(), 0, &mut ev);
        t.on_frame(8 * MIN, dev(4, Kind::Beacon), &header(4, 1), &reading(), 0, &mut ev);
        ev.clear();
        let gone = t.poll_deadlines(60 * MIN, &mut ev);
        let at: Vec<_> = ev.iter().map(|e| (e.eui.0, e.at_ms / MIN)).collect();
        assert_eq!(at, [(2, 12), (6, 13), (1, 17), (5, 19), (3, 25), (4, 28)]);
        assert_eq!(gone.len(), 6);
        assert_eq!((t.online_count(), t.next_deadline()), (0, None));
    }

    #[test]
    fn thousands_of_devices_use_one_timer_set() {
        let mut t = HealthTracker::new(config());
        let mut ev = Vec::new();
        for i in 0..10_000u64 {
            t.on_frame(i as i64, dev(i, Kind::Drain), &header(i, 0), &reading(), 0, &mut ev);
        }
        ev.clear();
        let gone = t.poll_deadlines(10 * MIN + 4_999, &mut ev);
        assert_eq!(gone.len(), 5_000);
        assert_eq!(t.online_count(), 5_000);
        assert_eq!(t.online_count(), t.iter().filter(|(_, h)| h.online).count());
        // Restoring rows (a restart) counts them again, replacing what was there.
        let saved: Vec<_> = t.iter().collect();
        let mut restarted = HealthTracker::new(config());
        for (eui, h) in saved.iter().cloned().chain(saved.iter().cloned()) {
            restarted.restore(DeviceId(u32::try_from(eui.0).unwrap()), eui, h);
        }
        assert_eq!(restarted.online_count(), 5_000);
    }
}
