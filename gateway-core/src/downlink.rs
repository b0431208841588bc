//! Downlinks, as pure state: when to send a device its time, its configuration or a status
//! request, with acknowledgement tracking and retries. The pipeline calls it with every
//! accepted frame (a device that just spoke is awake and listening) and on ticks; it returns
//! downlinks to seal and publish, and request updates to persist.
//!
//! - **Time sync** when a device (re)boots (a status with a small uptime) or its clock is off by
//!   more than `time_drift_ms` (judged on status messages, whose time is when they were taken),
//!   at most once per `sync_every_ms`.
//! - **Configuration** requested by an operator (`gridsense devices configure`) is sent at the
//!   device's next frame, then re-sent every `ack_timeout_ms` until the device's `DownlinkAck`
//!   for that counter arrives, at most `max_attempts` times.
//! - **Status requests** are sent once at the next frame (the answer is the status itself).
//!
//! Downlink counters per device only grow and are persisted with the batch before anything is
//! published, so a counter is never reused under a key, even across a crash.

use std::collections::HashMap;

use gridsense_protocol::{AckOutcome, DeviceTime, Downlink, Eui, Setting, Uplink};

use crate::registry::{Device, DeviceId};

/// Downlink policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownlinkConfig {
    /// Clock error that triggers a time sync, ms.
    pub time_drift_ms: i64,
    /// Fewest ms between two time syncs of one device.
    pub sync_every_ms: i64,
    /// A status with less uptime than this means the device just booted, s.
    pub boot_uptime_s: u32,
    /// Re-send an unacknowledged configuration after this long, ms.
    pub ack_timeout_ms: i64,
    /// Give up on a configuration after this many sends.
    pub max_attempts: u32,
    /// A device's `…/up` frames stored since its last `UplinkWindow` that make the next one
    /// due (SPEC §7.2).
    pub confirm_every_frames: u16,
    /// Time since a device's last `UplinkWindow` after which its next stored `…/up` frame
    /// makes one due, ms.
    pub confirm_every_ms: i64,
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        DownlinkConfig {
            time_drift_ms: 30_000,
            sync_every_ms: 3_600_000,
            boot_uptime_s: 600,
            ack_timeout_ms: 600_000,
            max_attempts: 5,
            confirm_every_frames: 8,
            confirm_every_ms: 30_000,
        }
    }
}

/// An operator's request waiting for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// New settings.
    Configure(Vec<Setting>),
    /// Ask for a status now.
    StatusRequest,
}

/// A request's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its id in the store.
    pub id: i64,
    /// What.
    pub request: Request,
    /// The downlink counter of the last send.
    pub counter: Option<u32>,
    /// When it was last sent, Unix ms.
    pub sent_ms: Option<i64>,
    /// Sends so far.
    pub attempts: u32,
}

/// A downlink to seal and publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The device.
    pub eui: Eui,
    /// Its downlink counter.
    pub counter: u32,
    /// The message.
    pub message: Downlink,
    /// How it goes out.
    pub route: Route,
}

/// How a sealed downlink goes out (the shell's sessions carry it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Through the broker its device was last heard on, QoS 1.
    LastHeard,
    /// A send again of one not acknowledged in time: through every broker (the device may
    /// have moved to the other), QoS 1.
    Everywhere,
    /// A confirmation (`UplinkAck`, `UplinkWindow`): through the broker last heard on, QoS 0 —
    /// each is made good by the next (a copy of the frame brings another), so a lost one costs
    /// a device's resend, not a frame.
    Confirmation,
}

impl Route {
    /// A first send, or a send again of one not acknowledged in time.
    const fn again(again: bool) -> Self {
        if again { Route::Everywhere } else { Route::LastHeard }
    }
}

/// A change to persist for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestUpdate {
    /// Sent (again) with this counter.
    Sent {
        /// Request id.
        id: i64,
        /// Counter.
        counter: u32,
        /// When.
        at_ms: i64,
        /// Sends so far.
        attempts: u32,
    },
    /// Finished: acknowledged with an outcome, or given up.
    Done {
        /// Request id.
        id: i64,
        /// When.
        at_ms: i64,
        /// `applied`, `unsupported`, `invalid_value`, `sent` (status requests) or `no_answer`.
        outcome: &'static str,
    },
}

/// Downlink state of every device: its next counter, last time sync and move, and what its
/// next `UplinkWindow` waits for (32 bytes, indexed by
/// [`DeviceId`]), and the few operator requests waiting.
#[derive(Debug, Clone, Default)]
pub struct Downlinks {
    config: DownlinkConfig,
    slots: Vec<Slot>,
    pending: HashMap<Eui, Pending>,
    /// Devices with `…/up` frames in the batch being built, for [`Downlinks::windows`].
    stored: Vec<Device>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    next_counter: u32,
    /// `i64::MIN`: never.
    last_sync_ms: i64,
    /// When the device was last told the deployment's shards (`i64::MIN`: never).
    last_move_ms: i64,
    /// When it was last sent an `UplinkWindow` (`i64::MIN`: never).
    last_window_ms: i64,
    /// Its `…/up` frames stored since then.
    unconfirmed: u16,
    /// In [`Downlinks::stored`] already.
    queued: bool,
    /// A copy came: its window is due whatever the count.
    copy: bool,
}

const NEVER: Slot = Slot {
    next_counter: 0,
    last_sync_ms: i64::MIN,
    last_move_ms: i64::MIN,
    last_window_ms: i64::MIN,
    unconfirmed: 0,
    queued: false,
    copy: false,
};

/// The outcome's stable name.
pub const fn outcome_name(o: AckOutcome) -> &'static str {
    match o {
        AckOutcome::Applied => "applied",
        AckOutcome::Unsupported => "unsupported",
        AckOutcome::InvalidValue => "invalid_value",
    }
}

impl Downlinks {
    /// Empty state.
    pub fn new(config: DownlinkConfig) -> Self {
        Downlinks { config, ..Downlinks::default() }
    }

    fn slot_mut(&mut self, id: DeviceId) -> Option<&mut Slot> {
        if id.index() >= self.slots.len() {
            self.slots.resize(id.index() + 1, NEVER);
        }
        self.slots.get_mut(id.index())
    }

    /// Restores a device's next downlink counter.
    pub fn restore_counter(&mut self, id: DeviceId, next: u32) {
        if let Some(slot) = self.slot_mut(id) {
            slot.next_counter = next;
        }
    }

    /// Queues a request (one at a time per device; a newer one replaces an unsent older one).
    pub fn request(&mut self, eui: Eui, pending: Pending) {
        self.pending.insert(eui, pending);
    }

    /// Requests waiting.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn next(&mut self, id: DeviceId) -> u32 {
        let Some(slot) = self.slot_mut(id) else { return u32::MAX };
        let value = slot.next_counter;
        slot.next_counter = value.saturating_add(1);
        value
    }

    /// The counter the device's next downlink will use (to persist).
    pub fn next_counter(&self, id: DeviceId) -> u32 {
        self.slots.get(id.index()).map_or(0, |s| s.next_counter)
    }

    fn send_pending(
        &mut self,
        now_ms: i64,
        Device { id, eui, .. }: Device,
        out: &mut Vec<Outgoing>,
        updates: &mut Vec<RequestUpdate>,
    ) {
        let Some(p) = self.pending.get(&eui).cloned() else { return };
        let due = p.sent_ms.is_none_or(|t| now_ms - t >= self.config.ack_timeout_ms);
        if !due {
            return;
        }
        if p.attempts >= self.config.max_attempts {
            self.pending.remove(&eui);
            updates.push(RequestUpdate::Done { id: p.id, at_ms: now_ms, outcome: "no_answer" });
            return;
        }
        let counter = self.next(id);
        let message = match &p.request {
            Request::Configure(settings) => {
                let mut list = heapless::Vec::new();
                for s in settings {
                    // Requests are checked against MAX_SETTINGS when they are made.
                    let _ = list.push(*s);
                }
                Downlink::Config { settings: list }
            }
            Request::StatusRequest => Downlink::StatusRequest,
        };
        out.push(Outgoing { eui, counter, message, route: Route::again(p.attempts > 0) });
        let attempts = p.attempts + 1;
        updates.push(RequestUpdate::Sent { id: p.id, counter, at_ms: now_ms, attempts });
        if p.request == Request::StatusRequest {
            // Nothing to acknowledge: the status itself is the answer.
            self.pending.remove(&eui);
            updates.push(RequestUpdate::Done { id: p.id, at_ms: now_ms, outcome: "sent" });
        } else if let Some(entry) = self.pending.get_mut(&eui) {
            entry.counter = Some(counter);
            entry.sent_ms = Some(now_ms);
            entry.attempts = attempts;
        }
    }

    /// An accepted frame from `device` at `now_ms`.
    pub fn on_frame(
        &mut self,
        now_ms: i64,
        device: Device,
        message: &Uplink,
        out: &mut Vec<Outgoing>,
        updates: &mut Vec<RequestUpdate>,
    ) {
        let Device { id, eui, .. } = device;
        match message {
            Uplink::Status(s) => {
                let device_ms =
                    i64::try_from(s.at.unix_secs()).unwrap_or(i64::MAX).saturating_mul(1000);
                let drifted = (device_ms - now_ms).abs() > self.config.time_drift_ms;
                let booted = s.uptime_s < self.config.boot_uptime_s;
                let last = self.slots.get(id.index()).map_or(i64::MIN, |s| s.last_sync_ms);
                let recently =
                    last != i64::MIN && now_ms.saturating_sub(last) < self.config.sync_every_ms;
                if (drifted || booted) && !recently {
                    let secs = u64::try_from(now_ms.max(0) / 1000).unwrap_or(0);
                    if let Some(now) = DeviceTime::from_unix_secs(secs) {
                        let counter = self.next(id);
                        let message = Downlink::TimeSync { now };
                        out.push(Outgoing { eui, counter, message, route: Route::LastHeard });
                        if let Some(slot) = self.slot_mut(id) {
                            slot.last_sync_ms = now_ms;
                        }
                    }
                }
            }
            Uplink::DownlinkAck(ack) => {
                if let Some(p) = self.pending.get(&eui)
                    && p.counter == Some(ack.counter)
                {
                    updates.push(RequestUpdate::Done {
                        id: p.id,
                        at_ms: now_ms,
                        outcome: outcome_name(ack.outcome),
                    });
                    self.pending.remove(&eui);
                }
            }
            _ => {}
        }
        // The device just spoke: it is awake, a good moment for what waits.
        self.send_pending(now_ms, device, out, updates);
    }

    /// An urgent frame with `counter` is durable (it is sent with the batch that stores it, so
    /// after the commit): the device may forget it (`UplinkAck`, protocol SPEC §7.2). Sent
    /// again for every copy that arrives, since a copy means the device did not get it.
    pub fn confirm(&mut self, device: Device, counter: u32, out: &mut Vec<Outgoing>) {
        let next = self.next(device.id);
        out.push(Outgoing {
            eui: device.eui,
            counter: next,
            message: Downlink::UplinkAck { counter },
            route: Route::Confirmation,
        });
    }

    /// A `…/up` frame of `device` on a sharded topic goes into the batch being built (`copy`:
    /// it was a copy, dropped — the device missed a window): [`Downlinks::windows`] decides at
    /// the batch's end whether its window is due.
    pub fn stored_up(&mut self, device: Device, copy: bool) {
        let Some(slot) = self.slot_mut(device.id) else { return };
        slot.unconfirmed = slot.unconfirmed.saturating_add(u16::from(!copy));
        slot.copy |= copy;
        if !core::mem::replace(&mut slot.queued, true) {
            self.stored.push(device);
        }
    }

    /// The batch is complete: every device of [`Downlinks::stored_up`] whose window is due
    /// (`confirm_every_frames` stored since its last, or `confirm_every_ms` passed, or a copy
    /// came) is sent `window_of` its counter window as the batch stores it — with the batch,
    /// so only once it is durable (SPEC §7.2).
    pub fn windows(
        &mut self,
        now_ms: i64,
        window_of: impl Fn(DeviceId) -> Option<gridsense_protocol::CounterWindow>,
        out: &mut Vec<Outgoing>,
    ) {
        let (every, every_ms) = (self.config.confirm_every_frames, self.config.confirm_every_ms);
        for device in core::mem::take(&mut self.stored) {
            let Some(slot) = self.slots.get_mut(device.id.index()) else { continue };
            slot.queued = false;
            let due = slot.copy
                || slot.unconfirmed >= every
                || slot.last_window_ms == i64::MIN
                || now_ms.saturating_sub(slot.last_window_ms) >= every_ms;
            let Some(highest) = window_of(device.id)
                .filter(|_| due)
                .and_then(|w| w.highest().map(|h| (h, w.seen_bits() | 1)))
            else {
                continue;
            };
            (slot.last_window_ms, slot.unconfirmed, slot.copy) = (now_ms, 0, false);
            let counter = self.next(device.id);
            let (highest, seen) = highest;
            out.push(Outgoing {
                eui: device.eui,
                counter,
                message: Downlink::UplinkWindow { highest, seen },
                route: Route::Confirmation,
            });
        }
    }

    /// A frame arrived on version 1's topic: the device is told the deployment's shards (a
    /// `Config` of [`Setting::Shards`]), so that it moves to the sharded topics — again after
    /// the ack timeout while it keeps using the old one (the setting is idempotent).
    pub fn move_topics(
        &mut self,
        now_ms: i64,
        device: Device,
        shards: u16,
        out: &mut Vec<Outgoing>,
    ) {
        let timeout = self.config.ack_timeout_ms;
        let Some(slot) = self.slot_mut(device.id) else { return };
        if slot.last_move_ms != i64::MIN && now_ms.saturating_sub(slot.last_move_ms) < timeout {
            return;
        }
        let route = Route::again(slot.last_move_ms != i64::MIN);
        slot.last_move_ms = now_ms;
        let counter = self.next(device.id);
        let mut settings = heapless::Vec::new();
        let _ = settings.push(Setting::Shards(shards));
        let message = Downlink::Config { settings };
        out.push(Outgoing { eui: device.eui, counter, message, route });
    }

    /// Gives up on configurations whose last send timed out `max_attempts` times.
    pub fn tick(&mut self, now_ms: i64, updates: &mut Vec<RequestUpdate>) {
        let timeout = self.config.ack_timeout_ms;
        let max = self.config.max_attempts;
        let expired: Vec<Eui> = self
            .pending
            .iter()
            .filter(|(_, p)| p.attempts >= max && p.sent_ms.is_some_and(|t| now_ms - t >= timeout))
            .map(|(e, _)| *e)
            .collect();
        for eui in expired {
            if let Some(p) = self.pending.remove(&eui) {
                updates.push(RequestUpdate::Done { id: p.id, at_ms: now_ms, outcome: "no_answer" });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use gridsense_protocol::{DownlinkAck, FirmwareVersion, ResetCause, Status};

    use super::*;
    use crate::registry::Kind;

    const MIN: i64 = 60_000;
    const NOW: i64 = 1_800_000_000_000;

    fn status(at_ms: i64, uptime_s: u32) -> Uplink {
        Uplink::Status(Status {
            at: DeviceTime::from_unix_secs(u64::try_from(at_ms / 1000).unwrap()).unwrap(),
            battery_mv: 3_600,
            rssi_dbm: -80,
            temperature_dc: 100,
            firmware: FirmwareVersion { major: 1, minor: 0, patch: 0 },
            uptime_s,
            reset_cause: ResetCause::PowerOn,
        })
    }

    /// Test devices are numbered by their EUI.
    fn dev(n: u32) -> Device {
        Device { id: DeviceId(n), eui: Eui(u64::from(n)), kind: Kind::Cover }
    }

    fn config() -> DownlinkConfig {
        DownlinkConfig { ack_timeout_ms: 10 * MIN, max_attempts: 3, ..DownlinkConfig::default() }
    }

    #[test]
    fn boot_and_drift_get_a_time_sync_at_most_hourly() {
        let mut d = Downlinks::new(config());
        let (mut out, mut up) = (Vec::new(), Vec::new());
        d.on_frame(NOW, dev(1), &status(NOW, 5), &mut out, &mut up);
        assert!(matches!(
            out[..],
            [Outgoing { counter: 0, message: Downlink::TimeSync { .. }, .. }]
        ));
        out.clear();
        // Booted again ten minutes later: not yet (hourly at most).
        d.on_frame(NOW + 10 * MIN, dev(1), &status(NOW + 10 * MIN, 5), &mut out, &mut up);
        assert!(out.is_empty());
        // An hour later its clock is 2 minutes fast: synced, counter 1.
        d.on_frame(NOW + 70 * MIN, dev(1), &status(NOW + 72 * MIN, 50_000), &mut out, &mut up);
        assert!(matches!(out[..], [Outgoing { counter: 1, .. }]));
        out.clear();
        // A device whose clock is right and that did not boot gets nothing.
        d.on_frame(NOW, dev(2), &status(NOW + 1_000, 50_000), &mut out, &mut up);
        assert!(out.is_empty());
    }

    #[test]
    fn a_configuration_is_sent_at_the_next_frame_retried_and_closed_by_its_ack() {
        let mut d = Downlinks::new(config());
        d.restore_counter(DeviceId(3), 40);
        let settings = vec![Setting::ReportIntervalS(60)];
        d.request(
            Eui(3),
            Pending {
                id: 7,
                request: Request::Configure(settings.clone()),
                counter: None,
                sent_ms: None,
                attempts: 0,
            },
        );
        let (mut out, mut up) = (Vec::new(), Vec::new());
        let reading = Uplink::Sos(gridsense_protocol::Sos { at: DeviceTime(1), fix: None });
        d.on_frame(NOW, dev(3), &reading, &mut out, &mut up);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].counter, out[0].route), (40, Route::LastHeard));
        assert_eq!(up, [RequestUpdate::Sent { id: 7, counter: 40, at_ms: NOW, attempts: 1 }]);
        out.clear();
        up.clear();
        // No ack; the next frame within the timeout sends nothing, after it a retry.
        d.on_frame(NOW + MIN, dev(3), &reading, &mut out, &mut up);
        assert!(out.is_empty());
        d.on_frame(NOW + 11 * MIN, dev(3), &reading, &mut out, &mut up);
        // Not acknowledged in time: the device may be on the other broker now.
        assert_eq!(out.iter().map(|o| o.route).collect::<Vec<_>>(), [Route::Everywhere]);
        assert_eq!(
            up,
            [RequestUpdate::Sent { id: 7, counter: 41, at_ms: NOW + 11 * MIN, attempts: 2 }]
        );
        up.clear();
        // An ack for the old counter does not count; for the new one it closes the request.
        let ack =
            |counter| Uplink::DownlinkAck(DownlinkAck { counter, outcome: AckOutcome::Applied });
        d.on_frame(NOW + 12 * MIN, dev(3), &ack(40), &mut out, &mut up);
        assert!(up.is_empty());
        d.on_frame(NOW + 12 * MIN, dev(3), &ack(41), &mut out, &mut up);
        assert_eq!(up, [RequestUpdate::Done { id: 7, at_ms: NOW + 12 * MIN, outcome: "applied" }]);
        assert_eq!(d.pending(), 0);
        assert_eq!(d.next_counter(DeviceId(3)), 42);
    }

    #[test]
    fn an_unanswered_configuration_is_given_up_after_max_attempts() {
        let mut d = Downlinks::new(config());
        d.request(
            Eui(4),
            Pending {
                id: 1,
                request: Request::Configure(vec![]),
                counter: None,
                sent_ms: None,
                attempts: 0,
            },
        );
        let (mut out, mut up) = (Vec::new(), Vec::new());
        let reading = Uplink::Sos(gridsense_protocol::Sos { at: DeviceTime(1), fix: None });
        for i in 0..3 {
            d.on_frame(NOW + i * 11 * MIN, dev(4), &reading, &mut out, &mut up);
        }
        assert_eq!(out.len(), 3);
        d.tick(NOW + 40 * MIN, &mut up);
        assert_eq!(
            up.last(),
            Some(&RequestUpdate::Done { id: 1, at_ms: NOW + 40 * MIN, outcome: "no_answer" })
        );
    }

    #[test]
    fn a_status_request_goes_once() {
        let mut d = Downlinks::new(config());
        d.request(
            Eui(5),
            Pending {
                id: 2,
                request: Request::StatusRequest,
                counter: None,
                sent_ms: None,
                attempts: 0,
            },
        );
        let (mut out, mut up) = (Vec::new(), Vec::new());
        let reading = Uplink::Sos(gridsense_protocol::Sos { at: DeviceTime(1), fix: None });
        d.on_frame(NOW, dev(5), &reading, &mut out, &mut up);
        d.on_frame(NOW + 20 * MIN, dev(5), &reading, &mut out, &mut up);
        assert_eq!(out.iter().filter(|o| o.message == Downlink::StatusRequest).count(), 1);
        assert!(up.contains(&RequestUpdate::Done { id: 2, at_ms: NOW, outcome: "sent" }));
    }
}

/// Parses `name=value` into a setting; the names are the `Config` fields of the firmware.
pub fn parse_setting(text: &str) -> Result<Setting, String> {
    let (name, value) =
        text.split_once('=').ok_or_else(|| format!("{text:?}: expected name=value"))?;
    let bad = |e: std::num::ParseIntError| format!("{name}: {value:?} is not a valid number ({e})");
    let u32v = || value.trim().parse::<u32>().map_err(bad);
    let u16v = || value.trim().parse::<u16>().map_err(bad);
    Ok(match name.trim() {
        "report_interval_s" => Setting::ReportIntervalS(u32v()?),
        "heartbeat_interval_s" => Setting::HeartbeatIntervalS(u32v()?),
        "tilt_threshold_ddeg" => Setting::TiltThresholdDdeg(u16v()?),
        "tilt_hold_ms" => Setting::TiltHoldMs(u32v()?),
        "drain_warn_mm" => Setting::DrainWarnMm(u16v()?),
        "drain_alarm_mm" => Setting::DrainAlarmMm(u16v()?),
        "drain_hysteresis_mm" => Setting::DrainHysteresisMm(u16v()?),
        "drain_deadband_mm" => Setting::DrainDeadbandMm(u16v()?),
        "fast_report_interval_s" => Setting::FastReportIntervalS(u32v()?),
        "fix_interval_s" => Setting::FixIntervalS(u32v()?),
        "low_battery_mv" => Setting::LowBatteryMv(u16v()?),
        "cover_water_mm" => Setting::CoverWaterMm(u16v()?),
        "shards" => Setting::Shards(u16v()?),
        other => return Err(format!("no setting named {other:?}")),
    })
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn settings_parse_by_name_and_errors_say_which() {
        assert_eq!(parse_setting("report_interval_s=60"), Ok(Setting::ReportIntervalS(60)));
        assert_eq!(parse_setting("drain_warn_mm = 2500"), Ok(Setting::DrainWarnMm(2_500)));
        assert!(parse_setting("drain_warn_mm=70000").unwrap_err().contains("drain_warn_mm"));
        assert!(parse_setting("speed=3").unwrap_err().contains("no setting"));
        assert!(parse_setting("report_interval_s").unwrap_err().contains("name=value"));
    }
}
