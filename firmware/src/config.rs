//! Device settings: defaults per kind from DOMAIN.md, and the all-or-nothing application of a
//! `Config` downlink.

use gridsense_protocol::{AckOutcome, Setting};

/// The three kinds of field device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Smart manhole cover.
    Cover,
    /// Drainage-level sensor in a well.
    Drain,
    /// A grid worker's patrol beacon.
    Beacon,
}

impl DeviceKind {
    /// The lowercase name used in inventories and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cover => "cover",
            DeviceKind::Drain => "drain",
            DeviceKind::Beacon => "beacon",
        }
    }
}

/// Everything a device can be configured with. Units are in the field names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Cover: seconds between routine readings. Drain: seconds between samples in calm weather.
    pub report_interval_s: u32,
    /// Longest silence before a status heartbeat (and, for drains, a reading) is sent anyway.
    pub heartbeat_interval_s: u32,
    /// Cover: tilt alarm threshold in 0.1°.
    pub tilt_threshold_ddeg: u16,
    /// Cover: how long the tilt must hold above the threshold before it alarms, in ms.
    pub tilt_hold_ms: u32,
    /// Cover: water under the cover that alarms, in mm.
    pub cover_water_mm: u16,
    /// Drain: warning level, mm above the well floor.
    pub drain_warn_mm: u16,
    /// Drain: alarm level, mm above the well floor (a margin below the cover).
    pub drain_alarm_mm: u16,
    /// Drain: how far a level must fall below warning/alarm before it clears, mm.
    pub drain_hysteresis_mm: u16,
    /// Drain: smallest level change worth a report, mm.
    pub drain_deadband_mm: u16,
    /// Drain: seconds between samples while at or above the warning level.
    pub fast_report_interval_s: u32,
    /// Beacon: seconds between position fixes while on patrol.
    pub fix_interval_s: u32,
    /// Battery level below which a low-battery alarm is raised, mV.
    pub low_battery_mv: u16,
    /// The deployment's shards: frames go on `gridsense/{shard}/{eui}/up` and urgent ones on
    /// `…/urgent` (protocol SPEC §2); 0: version 1's `gridsense/{eui}/up`.
    pub shards: u16,
}

impl Config {
    /// Defaults from DOMAIN.md for one kind.
    pub const fn defaults(kind: DeviceKind) -> Self {
        let (report_interval_s, heartbeat_interval_s) = match kind {
            DeviceKind::Cover => (3_600, 21_600),
            DeviceKind::Drain => (300, 3_600),
            DeviceKind::Beacon => (300, 3_600),
        };
        Config {
            report_interval_s,
            heartbeat_interval_s,
            tilt_threshold_ddeg: 100,
            tilt_hold_ms: 2_000,
            cover_water_mm: 300,
            drain_warn_mm: 2_500,
            drain_alarm_mm: 4_000,
            drain_hysteresis_mm: 100,
            drain_deadband_mm: 20,
            fast_report_interval_s: 60,
            fix_interval_s: 30,
            low_battery_mv: 3_300,
            shards: 0,
        }
    }

    /// Applies every setting or none: on `Unsupported` or `InvalidValue` the config is
    /// unchanged. Returns the outcome to report in the `DownlinkAck`.
    pub fn apply(&mut self, kind: DeviceKind, settings: &[Setting]) -> AckOutcome {
        let mut next = *self;
        for setting in settings {
            if !supports(kind, setting) {
                return AckOutcome::Unsupported;
            }
            next.set(*setting);
        }
        if next.is_valid() {
            *self = next;
            AckOutcome::Applied
        } else {
            AckOutcome::InvalidValue
        }
    }

    fn set(&mut self, setting: Setting) {
        match setting {
            Setting::ReportIntervalS(v) => self.report_interval_s = v,
            Setting::HeartbeatIntervalS(v) => self.heartbeat_interval_s = v,
            Setting::TiltThresholdDdeg(v) => self.tilt_threshold_ddeg = v,
            Setting::TiltHoldMs(v) => self.tilt_hold_ms = v,
            Setting::DrainWarnMm(v) => self.drain_warn_mm = v,
            Setting::DrainAlarmMm(v) => self.drain_alarm_mm = v,
            Setting::DrainHysteresisMm(v) => self.drain_hysteresis_mm = v,
            Setting::DrainDeadbandMm(v) => self.drain_deadband_mm = v,
            Setting::FastReportIntervalS(v) => self.fast_report_interval_s = v,
            Setting::FixIntervalS(v) => self.fix_interval_s = v,
            Setting::LowBatteryMv(v) => self.low_battery_mv = v,
            Setting::CoverWaterMm(v) => self.cover_water_mm = v,
            Setting::Shards(v) => self.shards = v,
        }
    }

    /// Whether the whole config makes sense together.
    pub fn is_valid(&self) -> bool {
        const WEEK_S: u32 = 7 * 86_400;
        let interval_ok = |s: u32| (1..=WEEK_S).contains(&s);
        interval_ok(self.report_interval_s)
            && interval_ok(self.heartbeat_interval_s)
            && interval_ok(self.fast_report_interval_s)
            && interval_ok(self.fix_interval_s)
            && self.tilt_threshold_ddeg >= 10
            && self.tilt_threshold_ddeg < 900
            && self.tilt_hold_ms <= 600_000
            && self.drain_hysteresis_mm < self.drain_warn_mm
            && self.drain_warn_mm < self.drain_alarm_mm
            && self.drain_alarm_mm <= 20_000
            && self.low_battery_mv >= 1_800
            && self.low_battery_mv <= 5_000
            && self.shards <= gridsense_protocol::topic::MAX_SHARDS
    }
}

/// Whether a device of `kind` has this setting.
pub const fn supports(kind: DeviceKind, setting: &Setting) -> bool {
    match setting {
        Setting::ReportIntervalS(_)
        | Setting::HeartbeatIntervalS(_)
        | Setting::LowBatteryMv(_)
        | Setting::Shards(_) => true,
        Setting::TiltThresholdDdeg(_) | Setting::TiltHoldMs(_) | Setting::CoverWaterMm(_) => {
            matches!(kind, DeviceKind::Cover)
        }
        Setting::DrainWarnMm(_)
        | Setting::DrainAlarmMm(_)
        | Setting::DrainHysteresisMm(_)
        | Setting::DrainDeadbandMm(_)
        | Setting::FastReportIntervalS(_) => matches!(kind, DeviceKind::Drain),
        Setting::FixIntervalS(_) => matches!(kind, DeviceKind::Beacon),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_for_every_kind() {
        for kind in [DeviceKind::Cover, DeviceKind::Drain, DeviceKind::Beacon] {
            assert!(Config::defaults(kind).is_valid(), "{kind:?}");
        }
    }

    #[test]
    fn settings_apply_all_or_none() {
        let kind = DeviceKind::Drain;
        let mut config = Config::defaults(kind);
        let before = config;
        let outcome =
            config.apply(kind, &[Setting::DrainWarnMm(3_000), Setting::DrainAlarmMm(2_000)]);
        assert_eq!(outcome, AckOutcome::InvalidValue);
        assert_eq!(config, before);
        let outcome = config.apply(kind, &[Setting::DrainWarnMm(3_000), Setting::TiltHoldMs(5)]);
        assert_eq!(outcome, AckOutcome::Unsupported);
        assert_eq!(config, before);
        let outcome =
            config.apply(kind, &[Setting::DrainWarnMm(3_000), Setting::ReportIntervalS(60)]);
        assert_eq!(outcome, AckOutcome::Applied);
        assert_eq!((config.drain_warn_mm, config.report_interval_s), (3_000, 60));
    }

    #[test]
    fn zero_intervals_are_invalid() {
        let mut config = Config::defaults(DeviceKind::Cover);
        assert_eq!(
            config.apply(DeviceKind::Cover, &[Setting::ReportIntervalS(0)]),
            AckOutcome::InvalidValue
        );
    }
}
