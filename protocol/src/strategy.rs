//! proptest strategies producing every message kind over its whole value range (feature
//! `proptest`; tests only).

extern crate std;

use heapless::{String, Vec};
use proptest::{collection::vec as vec_of, option, prelude::*};
use std::vec;

use crate::{
    AckOutcome, AlarmCleared, AlarmKind, AlarmRaised, Backlog, CaseClass, CheckIn, ClassKind,
    CoverSample, DeviceKey, DeviceTime, Downlink, DownlinkAck, DrainSample, Eui, FirmwareVersion,
    IncidentReport, MAX_BACKLOG_SAMPLES, MAX_NOTE_BYTES, MAX_SETTINGS, PositionFix, ResetCause,
    Sample, Setting, Sos, Status, SwitchState, TimedSample, Uplink,
};

/// Any device time.
pub fn device_time() -> impl Strategy<Value = DeviceTime> {
    any::<u32>().prop_map(DeviceTime)
}

/// Any EUI.
pub fn eui() -> impl Strategy<Value = Eui> {
    any::<u64>().prop_map(Eui)
}

/// Any key.
pub fn key() -> impl Strategy<Value = DeviceKey> {
    any::<[u8; 16]>().prop_map(DeviceKey::from_bytes)
}

fn switch() -> impl Strategy<Value = SwitchState> {
    prop_oneof![Just(SwitchState::Absent), Just(SwitchState::Closed), Just(SwitchState::Open)]
}

fn cover_sample() -> impl Strategy<Value = CoverSample> {
    // In range (§6): a tilt of at most 180°.
    (0..=crate::MAX_TILT_DDEG, switch(), option::of(any::<u16>()))
        .prop_map(|(tilt_ddeg, switch, water_mm)| CoverSample { tilt_ddeg, switch, water_mm })
}

fn drain_sample() -> impl Strategy<Value = DrainSample> {
    (any::<u16>(), any::<i32>())
        .prop_map(|(level_mm, rate_mm_h)| DrainSample { level_mm, rate_mm_h })
}

fn fix() -> impl Strategy<Value = PositionFix> {
    // In range (§6): ±90° and ±180°.
    (-90_000_000..=90_000_000i32, -180_000_000..=180_000_000i32, any::<u16>())
        .prop_map(|(lat_udeg, lon_udeg, accuracy_m)| PositionFix { lat_udeg, lon_udeg, accuracy_m })
}

fn reset_cause() -> impl Strategy<Value = ResetCause> {
    prop_oneof![
        Just(ResetCause::Unknown),
        Just(ResetCause::PowerOn),
        Just(ResetCause::Watchdog),
        Just(ResetCause::Brownout),
        Just(ResetCause::Software),
        Just(ResetCause::FirmwareUpdate),
        Just(ResetCause::Pin),
    ]
}

fn status() -> impl Strategy<Value = Status> {
    (
        device_time(),
        any::<u16>(),
        any::<i16>(),
        any::<i16>(),
        any::<(u8, u8, u16)>(),
        any::<u32>(),
        reset_cause(),
    )
        .prop_map(
            |(
                at,
                battery_mv,
                rssi_dbm,
                temperature_dc,
                (major, minor, patch),
                uptime_s,
                reset_cause,
            )| {
                Status {
                    at,
                    battery_mv,
                    rssi_dbm,
                    temperature_dc,
                    firmware: FirmwareVersion { major, minor, patch },
                    uptime_s,
                    reset_cause,
                }
            },
        )
}

fn alarm_kind() -> impl Strategy<Value = AlarmKind> {
    prop_oneof![
        Just(AlarmKind::CoverTilt),
        Just(AlarmKind::CoverRemoved),
        Just(AlarmKind::CoverOpen),
        Just(AlarmKind::CoverWater),
        Just(AlarmKind::DrainWarning),
        Just(AlarmKind::DrainAlarm),
        Just(AlarmKind::LowBattery),
        Just(AlarmKind::SensorFault),
    ]
}

/// A tilt alarm's value is a tilt, in range (§6); other kinds' values are anything.
fn alarm_value(kind: AlarmKind, value: i32) -> i32 {
    if matches!(kind, AlarmKind::CoverTilt | AlarmKind::CoverRemoved) {
        value.rem_euclid(i32::from(crate::MAX_TILT_DDEG) + 1)
    } else {
        value
    }
}

fn sample() -> impl Strategy<Value = Sample> {
    prop_oneof![
        cover_sample().prop_map(Sample::Cover),
        drain_sample().prop_map(Sample::Drain),
        fix().prop_map(Sample::Fix),
    ]
}

fn backlog() -> impl Strategy<Value = Backlog> {
    (device_time(), vec_of((any::<u32>(), sample()), 0..=MAX_BACKLOG_SAMPLES)).prop_map(
        |(base, samples)| {
            let mut out = Vec::new();
            for (delta_s, sample) in samples {
                // At most MAX_BACKLOG_SAMPLES by construction.
                let _ = out.push(TimedSample { delta_s, sample });
            }
            Backlog { base, samples: out }
        },
    )
}

/// Any UTF-8 text of at most `MAX_NOTE_BYTES` bytes, Chinese included.
fn note() -> impl Strategy<Value = String<MAX_NOTE_BYTES>> {
    "[a-z0-9 路面积水井盖丢失破损]{0,40}".prop_map(|s| {
        let mut out = String::new();
        for c in s.chars() {
            if out.push(c).is_err() {
                break;
            }
        }
        out
    })
}

fn case_class() -> impl Strategy<Value = CaseClass> {
    (prop_oneof![Just(ClassKind::Component), Just(ClassKind::Event)], any::<u8>(), any::<u8>())
        .prop_map(|(kind, major, minor)| CaseClass { kind, major, minor })
}

/// Any uplink message whose fields are in their ranges (SPEC.md §6).
pub fn uplink() -> impl Strategy<Value = Uplink> {
    prop_oneof![
        (device_time(), cover_sample())
            .prop_map(|(at, sample)| Uplink::CoverReading { at, sample }),
        (device_time(), drain_sample())
            .prop_map(|(at, sample)| Uplink::DrainReading { at, sample }),
        status().prop_map(Uplink::Status),
        (alarm_kind(), any::<i32>(), device_time()).prop_map(|(kind, value, since)| {
            let value = alarm_value(kind, value);
            Uplink::AlarmRaised(AlarmRaised { kind, value, since })
        }),
        (alarm_kind(), any::<i32>(), device_time(), device_time()).prop_map(
            |(kind, value, since, at)| Uplink::AlarmCleared(AlarmCleared {
                value: alarm_value(kind, value),
                kind,
                since,
                at
            })
        ),
        backlog().prop_map(Uplink::Backlog),
        (device_time(), fix()).prop_map(|(at, fix)| Uplink::PatrolFix { at, fix }),
        (device_time(), any::<u32>(), option::of(fix()))
            .prop_map(|(at, checkpoint, fix)| Uplink::CheckIn(CheckIn { at, checkpoint, fix })),
        (device_time(), case_class(), note(), option::of(fix())).prop_map(
            |(at, class, note, fix)| Uplink::IncidentReport(IncidentReport {
                at,
                class,
                note,
                fix
            })
        ),
        (device_time(), option::of(fix())).prop_map(|(at, fix)| Uplink::Sos(Sos { at, fix })),
        (
            any::<u32>(),
            prop_oneof![
                Just(AckOutcome::Applied),
                Just(AckOutcome::Unsupported),
                Just(AckOutcome::InvalidValue)
            ]
        )
            .prop_map(|(counter, outcome)| Uplink::DownlinkAck(DownlinkAck { counter, outcome })),
    ]
}

fn setting() -> impl Strategy<Value = Setting> {
    prop_oneof![
        any::<u32>().prop_map(Setting::ReportIntervalS),
        any::<u32>().prop_map(Setting::HeartbeatIntervalS),
        any::<u16>().prop_map(Setting::TiltThresholdDdeg),
        any::<u32>().prop_map(Setting::TiltHoldMs),
        any::<u16>().prop_map(Setting::DrainWarnMm),
        any::<u16>().prop_map(Setting::DrainAlarmMm),
        any::<u16>().prop_map(Setting::DrainHysteresisMm),
        any::<u16>().prop_map(Setting::DrainDeadbandMm),
        any::<u32>().prop_map(Setting::FastReportIntervalS),
        any::<u32>().prop_map(Setting::FixIntervalS),
        any::<u16>().prop_map(Setting::LowBatteryMv),
        any::<u16>().prop_map(Setting::CoverWaterMm),
        any::<u16>().prop_map(Setting::Shards),
    ]
}

/// Any downlink message.
pub fn downlink() -> impl Strategy<Value = Downlink> {
    prop_oneof![
        vec_of(setting(), 0..=MAX_SETTINGS).prop_map(|settings| {
            let mut out = Vec::new();
            for s in settings {
                let _ = out.push(s);
            }
            Downlink::Config { settings: out }
        }),
        device_time().prop_map(|now| Downlink::TimeSync { now }),
        any::<u32>().prop_map(|counter| Downlink::UplinkAck { counter }),
        Just(Downlink::StatusRequest),
        (any::<u32>(), any::<u64>())
            .prop_map(|(highest, seen)| Downlink::UplinkWindow { highest, seen }),
    ]
}
