//! Smart manhole cover: tilt relative to the installed baseline, debounced against passing
//! vehicles; flipped or removed covers alarm at once; open switch and water under the cover
//! where fitted; routine readings at the report interval.

use gridsense_protocol::{
    AlarmCleared, AlarmKind, AlarmRaised, CoverSample, DeviceTime, Sample, SwitchState,
};

use crate::{
    Config, DeviceKind, Instant,
    outbox::Urgent,
    sensing::{Context, Latch, Sensing, latch_message},
};

/// Above this tilt (0.1°) the cover is flipped or off its frame: alarm at once.
pub const REMOVED_DDEG: u16 = 900;
/// How far below the threshold (0.1°) the tilt must fall before the alarm can clear.
pub const TILT_HYSTERESIS_DDEG: u16 = 20;
/// How far below the limit (mm) water must fall before its alarm clears.
pub const WATER_HYSTERESIS_MM: u16 = 50;
/// Accelerometer sampling while the cover is at rest (a motion interrupt wakes it sooner).
pub const IDLE_SAMPLE_MS: u64 = 10_000;
/// Accelerometer sampling while a tilt is being debounced or cleared.
pub const ACTIVE_SAMPLE_MS: u64 = 250;

/// One accelerometer and switch reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoverInput {
    /// Acceleration in mg along x, y, z.
    pub accel_mg: [i16; 3],
    /// Open/closed switch, where fitted.
    pub switch: SwitchState,
    /// Water level under the cover in mm, where a probe is fitted.
    pub water_mm: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tilt {
    /// Within the threshold.
    Normal,
    /// Above the threshold since `onset`, not yet for the hold time.
    Pending { onset: Instant, since: DeviceTime },
    /// Alarm raised (`removed`: above 90°).
    Alarm { since: DeviceTime, removed: bool, below_since: Option<Instant> },
}

/// The manhole-cover sensing policy.
#[derive(Debug, Clone)]
pub struct Cover {
    baseline: [f32; 3],
    tilt: Tilt,
    open: Latch,
    water: Latch,
    last_sample: Option<Instant>,
    last_report: Option<Instant>,
    last: Option<CoverSample>,
}

impl Cover {
    /// A cover whose installed, at-rest acceleration (its gravity vector) is `baseline_mg`.
    pub fn new(baseline_mg: [i16; 3]) -> Self {
        Cover {
            baseline: baseline_mg.map(f32::from),
            tilt: Tilt::Normal,
            open: Latch::default(),
            water: Latch::default(),
            last_sample: None,
            last_report: None,
            last: None,
        }
    }

    /// Angle between `accel_mg` and the baseline in 0.1° (0..=1800).
    pub fn tilt_ddeg(&self, accel_mg: [i16; 3]) -> u16 {
        let a = accel_mg.map(f32::from);
        let dot: f32 = a.iter().zip(self.baseline.iter()).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32; 3]| libm::sqrtf(v.iter().map(|x| x * x).sum());
        let denom = norm(&a) * norm(&self.baseline);
        if denom <= f32::EPSILON {
            // Free fall or a dead sensor reads as no tilt; the fault shows in the readings.
            return 0;
        }
        let cos = (dot / denom).clamp(-1.0, 1.0);
        let ddeg = libm::acosf(cos).to_degrees() * 10.0;
        // acos is in 0..=π, so this is in 0..=1800.
        #[allow(clippy::cast_possible_truncation)]
        let ddeg = libm::roundf(ddeg) as u16;
        ddeg
    }

    /// The most recent sample.
    pub const fn last(&self) -> Option<CoverSample> {
        self.last
    }

    /// Whether a tilt or removal alarm is raised.
    pub const fn tilt_alarm(&self) -> bool {
        matches!(self.tilt, Tilt::Alarm { .. })
    }

    fn update_tilt(&mut self, now: Instant, tilt: u16, cx: &mut Context<'_>) {
        let threshold = cx.config.tilt_threshold_ddeg;
        let hold_ms = u64::from(cx.config.tilt_hold_ms);
        let raise = |cx: &mut Context<'_>, removed: bool, since: DeviceTime| {
            let kind = if removed { AlarmKind::CoverRemoved } else { AlarmKind::CoverTilt };
            cx.sink.urgent(Urgent::AlarmRaised(AlarmRaised {
                kind,
                value: i32::from(tilt),
                since,
            }));
        };
        self.tilt = match self.tilt {
            Tilt::Normal if tilt > REMOVED_DDEG => {
                raise(cx, true, cx.time);
                Tilt::Alarm { since: cx.time, removed: true, below_since: None }
            }
            Tilt::Normal if tilt > threshold => Tilt::Pending { onset: now, since: cx.time },
            Tilt::Normal => Tilt::Normal,
            Tilt::Pending { since, .. } if tilt > REMOVED_DDEG => {
                raise(cx, true, since);
                Tilt::Alarm { since, removed: true, below_since: None }
            }
            // A passing vehicle: the spike ended before the hold time.
            Tilt::Pending { .. } if tilt <= threshold => Tilt::Normal,
            Tilt::Pending { onset, since } if now.millis_since(onset) >= hold_ms => {
                raise(cx, false, since);
                Tilt::Alarm { since, removed: false, below_since: None }
            }
            pending @ Tilt::Pending { .. } => pending,
            Tilt::Alarm { since, removed: false, .. } if tilt > REMOVED_DDEG => {
                raise(cx, true, since);
                Tilt::Alarm { since, removed: true, below_since: None }
            }
            Tilt::Alarm { since, removed, below_since } => {
                if tilt + TILT_HYSTERESIS_DDEG > threshold {
                    Tilt::Alarm { since, removed, below_since: None }
                } else {
                    let below = below_since.unwrap_or(now);
                    if now.millis_since(below) >= hold_ms {
                        let kind =
                            if removed { AlarmKind::CoverRemoved } else { AlarmKind::CoverTilt };
                        cx.sink.urgent(Urgent::AlarmCleared(AlarmCleared {
                            kind,
                            value: i32::from(tilt),
                            since,
                            at: cx.time,
                        }));
                        Tilt::Normal
                    } else {
                        Tilt::Alarm { since, removed, below_since: Some(below) }
                    }
                }
            }
        };
    }
}

impl Sensing for Cover {
    type Input = CoverInput;
    const KIND: DeviceKind = DeviceKind::Cover;

    fn on_input(&mut self, now: Instant, input: CoverInput, cx: &mut Context<'_>) {
        let tilt = self.tilt_ddeg(input.accel_mg);
        let sample =
            CoverSample { tilt_ddeg: tilt, switch: input.switch, water_mm: input.water_mm };
        let alarms_before = (self.tilt, self.open, self.water);
        self.update_tilt(now, tilt, cx);
        let open = input.switch == SwitchState::Open;
        if let Some(change) = self.open.update(cx.time, open, !open) {
            cx.sink.urgent(latch_message(change, AlarmKind::CoverOpen, i32::from(open), cx.time));
        }
        if let Some(water) = input.water_mm {
            let limit = cx.config.cover_water_mm;
            let on = water > limit;
            let off = water + WATER_HYSTERESIS_MM <= limit;
            if let Some(change) = self.water.update(cx.time, on, off) {
                cx.sink.urgent(latch_message(
                    change,
                    AlarmKind::CoverWater,
                    i32::from(water),
                    cx.time,
                ));
            }
        }
        // A routine reading at the report interval, and one as evidence with every alarm change.
        let report_due = self
            .last_report
            .is_none_or(|at| now.millis_since(at) >= u64::from(cx.config.report_interval_s) * 1000);
        let alarm_changed = (self.tilt_alarm(), self.open, self.water)
            != (matches!(alarms_before.0, Tilt::Alarm { .. }), alarms_before.1, alarms_before.2);
        if report_due || alarm_changed {
            cx.sink.sample(cx.time, Sample::Cover(sample));
            self.last_report = Some(now);
        }
        self.last_sample = Some(now);
        self.last = Some(sample);
    }

    fn next_sample_at(&self, _config: &Config) -> Option<Instant> {
        let period = match self.tilt {
            Tilt::Normal => IDLE_SAMPLE_MS,
            Tilt::Pending { .. } | Tilt::Alarm { below_since: Some(_), .. } => ACTIVE_SAMPLE_MS,
            Tilt::Alarm { .. } => IDLE_SAMPLE_MS / 2,
        };
        Some(self.last_sample.map_or(Instant::ZERO, |t| t.add_millis(period)))
    }
}
