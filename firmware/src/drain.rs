//! Drainage-level sensor: sampled every report interval in calm weather and every fast
//! interval near the warning level; reports only changes beyond the deadband, or after the
//! heartbeat's maximum silence; warning and alarm levels with hysteresis; rate of change.

use gridsense_protocol::{AlarmKind, DrainSample, Sample};

use crate::{
    Config, DeviceKind, Instant,
    sensing::{Context, Latch, Sensing, latch_message},
};

/// One level reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainInput {
    /// Water level above the well floor, mm.
    pub level_mm: u16,
}

/// The drainage-level sensing policy.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    warning: Latch,
    alarm: Latch,
    previous: Option<(Instant, u16)>,
    reported: Option<(Instant, u16)>,
    last_sample: Option<Instant>,
}

impl Drain {
    /// A drain sensor with nothing measured yet.
    pub fn new() -> Self {
        Drain::default()
    }

    /// Whether the level is at or above the warning level (fast sampling).
    pub const fn in_warning(&self) -> bool {
        self.warning.is_raised()
    }

    fn rate_mm_h(&self, now: Instant, level: u16) -> i32 {
        let Some((at, prev)) = self.previous else { return 0 };
        let dt_ms = now.millis_since(at);
        if dt_ms == 0 {
            return 0;
        }
        let delta = i64::from(level) - i64::from(prev);
        let rate = delta * 3_600_000 / i64::try_from(dt_ms).unwrap_or(i64::MAX);
        i32::try_from(rate).unwrap_or(if rate > 0 { i32::MAX } else { i32::MIN })
    }
}

impl Sensing for Drain {
    type Input = DrainInput;
    const KIND: DeviceKind = DeviceKind::Drain;

    fn on_input(&mut self, now: Instant, input: DrainInput, cx: &mut Context<'_>) {
        let level = input.level_mm;
        let c = cx.config;
        let rate_mm_h = self.rate_mm_h(now, level);
        let mut changed = false;
        for (latch, kind, limit) in [
            (&mut self.warning, AlarmKind::DrainWarning, c.drain_warn_mm),
            (&mut self.alarm, AlarmKind::DrainAlarm, c.drain_alarm_mm),
        ] {
            let on = level >= limit;
            let off = u32::from(level) + u32::from(c.drain_hysteresis_mm) < u32::from(limit);
            if let Some(change) = latch.update(cx.time, on, off) {
                cx.sink.urgent(latch_message(change, kind, i32::from(level), cx.time));
                changed = true;
            }
        }
        let report = match self.reported {
            None => true,
            Some((at, reported)) => {
                changed
                    || self.warning.is_raised()
                    || level.abs_diff(reported) >= c.drain_deadband_mm
                    || now.millis_since(at) >= u64::from(c.heartbeat_interval_s) * 1000
            }
        };
        if report {
            cx.sink.sample(cx.time, Sample::Drain(DrainSample { level_mm: level, rate_mm_h }));
            self.reported = Some((now, level));
        }
        self.previous = Some((now, level));
        self.last_sample = Some(now);
    }

    fn next_sample_at(&self, config: &Config) -> Option<Instant> {
        let interval = if self.warning.is_raised() {
            config.fast_report_interval_s
        } else {
            config.report_interval_s
        };
        Some(self.last_sample.map_or(Instant::ZERO, |t| t.add_secs(interval)))
    }
}
