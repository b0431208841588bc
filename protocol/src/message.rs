//! The message bodies carried inside a frame, for both directions.
//!
//! Every enum here is part of the wire format: postcard encodes a variant as its index, so
//! **variants are only ever appended at the end**, never reordered or removed, and struct fields
//! are never reordered, removed or added (a changed struct is a new variant or a new format
//! version). `protocol/SPEC.md` documents every field byte by byte.

use heapless::{String, Vec};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

use crate::time::DeviceTime;

/// Most samples one [`Backlog`] frame carries.
pub const MAX_BACKLOG_SAMPLES: usize = 24;
/// Most bytes of UTF-8 in an [`IncidentReport`] note (about 32 Chinese characters).
pub const MAX_NOTE_BYTES: usize = 96;
/// Most settings one [`Downlink::Config`] carries.
pub const MAX_SETTINGS: usize = 16;

/// The direction a frame travels; part of the authenticated header, so an uplink can never be
/// replayed as a downlink or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Device → gateway, on `gridsense/{eui}/up`.
    Uplink,
    /// Gateway → device, on `gridsense/{eui}/down`.
    Downlink,
}

impl Direction {
    /// The lowercase name used in topics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Uplink => "up",
            Direction::Downlink => "down",
        }
    }
}

/// A message body type: [`Uplink`] or [`Downlink`].
pub trait Message: Serialize + for<'de> Deserialize<'de> + MaxSize {
    /// The direction frames carrying this body travel.
    const DIRECTION: Direction;
    /// How many top-level variants this version of the code knows; a body whose first varint
    /// is at or above this is rejected as an unknown message.
    const KNOWN_VARIANTS: u32;
    /// The snake_case name of this message's kind, as used in logs, metrics and SPEC.md.
    fn kind_name(&self) -> &'static str;
    /// The first field outside the range SPEC.md §6 gives it, by name (`Ok` when every field
    /// is in range). Checked after decoding; a frame that fails it is `out_of_range`.
    fn check_ranges(&self) -> Result<(), &'static str> {
        Ok(())
    }
}

/// The largest cover tilt, 0.1° (180°).
pub const MAX_TILT_DDEG: u16 = 1_800;

impl CoverSample {
    /// Its fields outside their ranges (§6), by name.
    pub const fn check_ranges(&self) -> Result<(), &'static str> {
        if self.tilt_ddeg > MAX_TILT_DDEG { Err("tilt_ddeg") } else { Ok(()) }
    }
}

impl PositionFix {
    /// Its fields outside their ranges (§6), by name: latitude within ±90°, longitude
    /// within ±180°.
    pub const fn check_ranges(&self) -> Result<(), &'static str> {
        if self.lat_udeg < -90_000_000 || self.lat_udeg > 90_000_000 {
            Err("lat_udeg")
        } else if self.lon_udeg < -180_000_000 || self.lon_udeg > 180_000_000 {
            Err("lon_udeg")
        } else {
            Ok(())
        }
    }
}

fn fix_in_range(fix: Option<&PositionFix>) -> Result<(), &'static str> {
    fix.map_or(Ok(()), PositionFix::check_ranges)
}

/// Manhole-cover switch state (magnet/Hall or reed switch), where one is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum SwitchState {
    /// No switch fitted on this cover.
    Absent,
    /// Switch reports the cover seated.
    Closed,
    /// Switch reports the cover lifted.
    Open,
}

/// One manhole-cover sample, without its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct CoverSample {
    /// Angle between the current gravity vector and the installed baseline, in 0.1° (0..=1800).
    pub tilt_ddeg: u16,
    /// Open/closed switch, where fitted.
    pub switch: SwitchState,
    /// Water level under the cover in mm above the sensor's zero, where a probe is fitted.
    pub water_mm: Option<u16>,
}

/// One drainage-level sample, without its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct DrainSample {
    /// Water level in the well in mm above the well floor (0..=7000 for the usual sensors).
    pub level_mm: u16,
    /// Rate of change in mm per hour, positive when rising.
    pub rate_mm_h: i32,
}

/// A position fix in WGS84 (the datum GNSS delivers; the gateway converts when a map needs
/// GCJ-02).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct PositionFix {
    /// Latitude in micro-degrees (1e-6°, about 0.11 m), positive north.
    pub lat_udeg: i32,
    /// Longitude in micro-degrees, positive east.
    pub lon_udeg: i32,
    /// Horizontal accuracy estimate in metres.
    pub accuracy_m: u16,
}

/// What happened to a device on its last reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum ResetCause {
    /// Cause not known to the firmware.
    Unknown,
    /// First power-on or battery change.
    PowerOn,
    /// Watchdog expired.
    Watchdog,
    /// Supply dipped below the brown-out level.
    Brownout,
    /// Firmware asked for a reset.
    Software,
    /// Reset after a firmware update.
    FirmwareUpdate,
    /// External reset pin.
    Pin,
}

/// Firmware version as major.minor.patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct FirmwareVersion {
    /// Major version.
    pub major: u8,
    /// Minor version.
    pub minor: u8,
    /// Patch version.
    pub patch: u16,
}

/// Device health, sent as a periodic heartbeat and on request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct Status {
    /// When the status was taken.
    pub at: DeviceTime,
    /// Battery voltage in mV.
    pub battery_mv: u16,
    /// Received signal strength of the radio link in dBm.
    pub rssi_dbm: i16,
    /// Board temperature in 0.1 °C.
    pub temperature_dc: i16,
    /// Running firmware.
    pub firmware: FirmwareVersion,
    /// Seconds since the last reset.
    pub uptime_s: u32,
    /// Why the device last reset.
    pub reset_cause: ResetCause,
}

/// The condition an alarm is about. The `value` of an alarm is in this kind's unit.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, MaxSize,
)]
pub enum AlarmKind {
    /// |Δtilt| above the threshold for the hold time; value in 0.1°.
    CoverTilt,
    /// Tilt above 90°: cover flipped or removed; value in 0.1°.
    CoverRemoved,
    /// Open switch reports the cover lifted; value 1.
    CoverOpen,
    /// Water under the cover above its limit; value in mm.
    CoverWater,
    /// Drain level at or above the warning level; value in mm.
    DrainWarning,
    /// Drain level at or above the alarm level; value in mm.
    DrainAlarm,
    /// Battery below the low-battery threshold; value in mV.
    LowBattery,
    /// A sensor stopped answering or answers out of range; value is a device-specific code.
    SensorFault,
}

/// An alarm condition starting at the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct AlarmRaised {
    /// What the alarm is about.
    pub kind: AlarmKind,
    /// The reading that raised it, in the kind's unit.
    pub value: i32,
    /// When the condition began (its onset, before any hold time).
    pub since: DeviceTime,
}

/// An alarm condition that ended at the device (the explicit "back to normal").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct AlarmCleared {
    /// What the alarm was about.
    pub kind: AlarmKind,
    /// The reading at recovery, in the kind's unit.
    pub value: i32,
    /// When the condition began (the `since` of the matching [`AlarmRaised`]).
    pub since: DeviceTime,
    /// When the condition ended.
    pub at: DeviceTime,
}

/// One stored reading of any telemetry kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum Sample {
    /// A manhole-cover reading.
    Cover(CoverSample),
    /// A drainage-level reading.
    Drain(DrainSample),
    /// A patrol position fix.
    Fix(PositionFix),
}

/// A reading in a backlog batch, timed relative to the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct TimedSample {
    /// Seconds after the previous sample (after `Backlog::base` for the first one).
    pub delta_s: u32,
    /// The reading.
    pub sample: Sample,
}

/// Readings that waited in the device's queue (an outage, or batching to save radio time),
/// sent as one frame in sample-time order with their original times.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct Backlog {
    /// The time the sample deltas start from.
    pub base: DeviceTime,
    /// The samples, oldest first.
    pub samples: Vec<TimedSample, MAX_BACKLOG_SAMPLES>,
}

impl Backlog {
    /// The samples with their absolute times, oldest first. Times saturate at the end of the
    /// device time range instead of wrapping.
    pub fn timed(&self) -> impl Iterator<Item = (DeviceTime, Sample)> + '_ {
        self.samples.iter().scan(self.base, |at, s| {
            *at = at.saturating_add_secs(s.delta_s);
            Some((*at, s.sample))
        })
    }
}

/// Whether a case class is a component (部件, street furniture) or an event (事件).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum ClassKind {
    /// 部件: a managed object, e.g. a manhole cover.
    Component,
    /// 事件: an occurrence, e.g. road ponding.
    Event,
}

/// A case classification as the platform codes it: `C`/`E` + major (2 digits) + minor (2 digits),
/// e.g. event 04/06 "road ponding" is `E0406`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct CaseClass {
    /// Component or event.
    pub kind: ClassKind,
    /// Major class, 0..=99.
    pub major: u8,
    /// Minor class, 0..=99.
    pub minor: u8,
}

/// A problem a grid worker reports from a patrol beacon; becomes a case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct IncidentReport {
    /// When the worker made the report.
    pub at: DeviceTime,
    /// The class the worker chose.
    pub class: CaseClass,
    /// A short note in UTF-8.
    pub note: String<MAX_NOTE_BYTES>,
    /// Where the worker stood, if the beacon had a fix.
    pub fix: Option<PositionFix>,
}

/// A patrol checkpoint check-in (attendance and coverage, not a case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct CheckIn {
    /// When the worker checked in.
    pub at: DeviceTime,
    /// The checkpoint's id (from its NFC/BLE tag).
    pub checkpoint: u32,
    /// Where the beacon was, if it had a fix.
    pub fix: Option<PositionFix>,
}

/// A grid worker's personal-safety emergency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct Sos {
    /// When the button was pressed.
    pub at: DeviceTime,
    /// Where the beacon was, if it had a fix.
    pub fix: Option<PositionFix>,
}

/// The outcome a device reports for a downlink it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum AckOutcome {
    /// Applied in full.
    Applied,
    /// The device does not support (part of) it; nothing was applied.
    Unsupported,
    /// A value was out of range for this device; nothing was applied.
    InvalidValue,
}

/// A device's answer to a downlink frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub struct DownlinkAck {
    /// The frame counter of the downlink being answered.
    pub counter: u32,
    /// What the device did with it.
    pub outcome: AckOutcome,
}

/// Everything a device sends. Variants only ever grow at the end.
///
/// The `Backlog` variant makes this type as large as the biggest frame body (about 500 bytes);
/// there is no heap to box it on a device, and a message lives only from building to sealing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum Uplink {
    /// 0: a manhole-cover reading.
    CoverReading {
        /// Sample time.
        at: DeviceTime,
        /// The reading.
        sample: CoverSample,
    },
    /// 1: a drainage-level reading.
    DrainReading {
        /// Sample time.
        at: DeviceTime,
        /// The reading.
        sample: DrainSample,
    },
    /// 2: health heartbeat.
    Status(Status),
    /// 3: an alarm condition began.
    AlarmRaised(AlarmRaised),
    /// 4: an alarm condition ended.
    AlarmCleared(AlarmCleared),
    /// 5: several stored readings with their own times.
    Backlog(Backlog),
    /// 6: a patrol position fix.
    PatrolFix {
        /// Fix time.
        at: DeviceTime,
        /// The fix.
        fix: PositionFix,
    },
    /// 7: a checkpoint check-in.
    CheckIn(CheckIn),
    /// 8: an incident reported by a grid worker.
    IncidentReport(IncidentReport),
    /// 9: a personal-safety emergency.
    Sos(Sos),
    /// 10: the answer to a downlink.
    DownlinkAck(DownlinkAck),
}

impl Message for Uplink {
    const DIRECTION: Direction = Direction::Uplink;
    const KNOWN_VARIANTS: u32 = 11;

    fn kind_name(&self) -> &'static str {
        match self {
            Uplink::CoverReading { .. } => "cover_reading",
            Uplink::DrainReading { .. } => "drain_reading",
            Uplink::Status(_) => "status",
            Uplink::AlarmRaised(_) => "alarm",
            Uplink::AlarmCleared(_) => "alarm_cleared",
            Uplink::Backlog(_) => "backlog_batch",
            Uplink::PatrolFix { .. } => "patrol_fix",
            Uplink::CheckIn(_) => "checkin",
            Uplink::IncidentReport(_) => "incident_report",
            Uplink::Sos(_) => "sos",
            Uplink::DownlinkAck(_) => "downlink_ack",
        }
    }

    fn check_ranges(&self) -> Result<(), &'static str> {
        match self {
            Uplink::CoverReading { sample, .. } => sample.check_ranges(),
            Uplink::PatrolFix { fix, .. } => fix.check_ranges(),
            Uplink::CheckIn(c) => fix_in_range(c.fix.as_ref()),
            Uplink::IncidentReport(r) => fix_in_range(r.fix.as_ref()),
            Uplink::Sos(s) => fix_in_range(s.fix.as_ref()),
            Uplink::AlarmRaised(AlarmRaised { kind, value, .. })
            | Uplink::AlarmCleared(AlarmCleared { kind, value, .. })
                if matches!(kind, AlarmKind::CoverTilt | AlarmKind::CoverRemoved)
                    && !(0..=i32::from(MAX_TILT_DDEG)).contains(value) =>
            {
                Err("value")
            }
            Uplink::Backlog(b) => b.samples.iter().try_for_each(|s| match &s.sample {
                Sample::Cover(c) => c.check_ranges(),
                Sample::Fix(f) => f.check_ranges(),
                Sample::Drain(_) => Ok(()),
            }),
            _ => Ok(()),
        }
    }
}

impl Uplink {
    /// Whether this message must never be dropped for telemetry (alarms, reports, SOS).
    pub const fn is_priority(&self) -> bool {
        matches!(
            self,
            Uplink::AlarmRaised(_)
                | Uplink::AlarmCleared(_)
                | Uplink::IncidentReport(_)
                | Uplink::Sos(_)
        )
    }
}

/// One configuration value. Variants only ever grow at the end; a device answers
/// [`AckOutcome::Unsupported`] to a setting it does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum Setting {
    /// 0: seconds between regular readings.
    ReportIntervalS(u32),
    /// 1: longest silence in seconds before a status heartbeat is sent.
    HeartbeatIntervalS(u32),
    /// 2: cover tilt alarm threshold in 0.1°.
    TiltThresholdDdeg(u16),
    /// 3: how long the tilt must stay above the threshold before it alarms, in ms.
    TiltHoldMs(u32),
    /// 4: drain warning level in mm.
    DrainWarnMm(u16),
    /// 5: drain alarm level in mm.
    DrainAlarmMm(u16),
    /// 6: hysteresis below a level before it clears, in mm.
    DrainHysteresisMm(u16),
    /// 7: smallest level change worth a report, in mm.
    DrainDeadbandMm(u16),
    /// 8: seconds between readings while above the warning level.
    FastReportIntervalS(u32),
    /// 9: seconds between patrol position fixes.
    FixIntervalS(u32),
    /// 10: battery level below which the device warns, in mV.
    LowBatteryMv(u16),
    /// 11: water under a cover that alarms, in mm.
    CoverWaterMm(u16),
    /// 12: publish on the sharded topics of a deployment with this many shards (1 … 256:
    /// `gridsense/{shard}/{eui}/up`, urgent frames on `…/urgent`); 0: version 1's
    /// `gridsense/{eui}/up`. The gateway sends it to a device heard on version 1's topic.
    Shards(u16),
}

/// Everything the gateway sends to a device. Variants only ever grow at the end.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum Downlink {
    /// 0: change settings; the device applies all or none and answers with a [`DownlinkAck`].
    Config {
        /// The settings to change.
        settings: Vec<Setting, MAX_SETTINGS>,
    },
    /// 1: the gateway's clock, for the device to set its own.
    TimeSync {
        /// The gateway's time when it sealed the frame.
        now: DeviceTime,
    },
    /// 2: the gateway has stored the uplink with this counter durably.
    UplinkAck {
        /// The uplink frame counter.
        counter: u32,
    },
    /// 3: send a [`Status`] now.
    StatusRequest,
    /// 4: of the 64 uplink counters up to `highest`, the gateway has stored durably those whose
    /// bit is set in `seen` (bit `i`: counter `highest - i`) — the cumulative confirmation of
    /// telemetry, a selective acknowledgement of the gateway's counter window.
    UplinkWindow {
        /// The highest uplink counter accepted.
        highest: u32,
        /// Bit `i` set: counter `highest - i` is stored. Bit 0 (`highest` itself) is always set.
        seen: u64,
    },
}

impl Downlink {
    /// Whether an [`Downlink::UplinkWindow`] with `highest` and `seen` confirms uplink `counter`.
    pub const fn window_holds(highest: u32, seen: u64, counter: u32) -> bool {
        match highest.checked_sub(counter) {
            Some(back) if back < 64 => seen & (1u64 << back) != 0,
            _ => false,
        }
    }
}

impl Message for Downlink {
    const DIRECTION: Direction = Direction::Downlink;
    const KNOWN_VARIANTS: u32 = 5;

    fn kind_name(&self) -> &'static str {
        match self {
            Downlink::Config { .. } => "config",
            Downlink::TimeSync { .. } => "time_sync",
            Downlink::UplinkAck { .. } => "uplink_ack",
            Downlink::StatusRequest => "status_request",
            Downlink::UplinkWindow { .. } => "uplink_window",
        }
    }
}
