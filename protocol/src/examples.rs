//! One representative message of every kind, in both directions: the source of the SPEC.md
//! test vectors, the `sizes` example, the benchmarks and the demo.

use heapless::{String, Vec};

use crate::{
    AckOutcome, AlarmCleared, AlarmKind, AlarmRaised, Backlog, CaseClass, CheckIn, ClassKind,
    CoverSample, DeviceTime, Downlink, DownlinkAck, DrainSample, FirmwareVersion, IncidentReport,
    PositionFix, ResetCause, Sample, Setting, Sos, Status, SwitchState, TimedSample, Uplink,
};

/// 2026-11-26T08:30:00+08:00, the time the examples are taken at.
pub const EXAMPLE_TIME: DeviceTime = DeviceTime(59_963_400);

/// A fix in Zhongshan District, Dalian.
pub const EXAMPLE_FIX: PositionFix =
    PositionFix { lat_udeg: 38_914_210, lon_udeg: 121_646_530, accuracy_m: 4 };

fn at(offset_s: u32) -> DeviceTime {
    EXAMPLE_TIME.saturating_add_secs(offset_s)
}

/// One uplink of every kind, in variant order.
pub fn uplinks() -> [Uplink; 11] {
    let cover = CoverSample { tilt_ddeg: 12, switch: SwitchState::Closed, water_mm: None };
    let drain = DrainSample { level_mm: 1830, rate_mm_h: 420 };
    let mut samples = Vec::new();
    // A well filling during a storm, one reading every 5 minutes.
    for (delta_s, level_mm, rate_mm_h) in [
        (0, 1210u16, 0),
        (300, 1265, 660),
        (300, 1330, 780),
        (300, 1420, 1080),
        (300, 1535, 1380),
        (300, 1680, 1740),
    ] {
        let sample = Sample::Drain(DrainSample { level_mm, rate_mm_h });
        // Six samples fit: the bound is MAX_BACKLOG_SAMPLES.
        let _ = samples.push(TimedSample { delta_s, sample });
    }
    let mut note = String::new();
    let _ = note.push_str("路面积水约20厘米");
    [
        Uplink::CoverReading { at: at(0), sample: cover },
        Uplink::DrainReading { at: at(0), sample: drain },
        Uplink::Status(Status {
            at: at(0),
            battery_mv: 3590,
            rssi_dbm: -87,
            temperature_dc: 64,
            firmware: FirmwareVersion { major: 1, minor: 4, patch: 2 },
            uptime_s: 1_209_600,
            reset_cause: ResetCause::PowerOn,
        }),
        Uplink::AlarmRaised(AlarmRaised { kind: AlarmKind::CoverTilt, value: 235, since: at(0) }),
        Uplink::AlarmCleared(AlarmCleared {
            kind: AlarmKind::CoverTilt,
            value: 8,
            since: at(0),
            at: at(1_260),
        }),
        Uplink::Backlog(Backlog { base: at(0), samples }),
        Uplink::PatrolFix { at: at(0), fix: EXAMPLE_FIX },
        Uplink::CheckIn(CheckIn { at: at(0), checkpoint: 2_102_020_117, fix: Some(EXAMPLE_FIX) }),
        Uplink::IncidentReport(IncidentReport {
            at: at(0),
            class: CaseClass { kind: ClassKind::Event, major: 4, minor: 6 },
            note,
            fix: Some(EXAMPLE_FIX),
        }),
        Uplink::Sos(Sos { at: at(0), fix: Some(EXAMPLE_FIX) }),
        Uplink::DownlinkAck(DownlinkAck { counter: 3, outcome: AckOutcome::Applied }),
    ]
}

/// One downlink of every kind, in variant order.
pub fn downlinks() -> [Downlink; 5] {
    let mut settings = Vec::new();
    for s in [
        Setting::ReportIntervalS(300),
        Setting::HeartbeatIntervalS(21_600),
        Setting::DrainWarnMm(2_500),
        Setting::DrainAlarmMm(4_000),
        Setting::FastReportIntervalS(60),
    ] {
        let _ = settings.push(s);
    }
    [
        Downlink::Config { settings },
        Downlink::TimeSync { now: at(2) },
        Downlink::UplinkAck { counter: 1_029 },
        Downlink::StatusRequest,
        Downlink::UplinkWindow { highest: 1_037, seen: 0xff7f },
    ]
}
