//! The seam between the common device core and each kind's sensing policy.

use gridsense_protocol::{AlarmCleared, AlarmKind, AlarmRaised, DeviceTime};

use crate::{
    Config, DeviceKind, Instant,
    outbox::{Sink, Urgent},
};

/// What a sensing policy gets when it runs: the settings, the time, and where to put messages.
pub struct Context<'a> {
    /// The device's current settings.
    pub config: &'a Config,
    /// Wall-clock time at `now`, for sample times.
    pub time: DeviceTime,
    /// Where messages go.
    pub sink: &'a mut dyn Sink,
}

impl core::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Context").field("config", self.config).field("time", &self.time).finish()
    }
}

/// One device kind's sensing policy: pure, driven by `now` and readings.
pub trait Sensing {
    /// What the board (or the simulator) feeds in: a sensor reading or a user action.
    type Input;
    /// The kind this policy is for.
    const KIND: DeviceKind;
    /// Handles one input taken at `now`.
    fn on_input(&mut self, now: Instant, input: Self::Input, cx: &mut Context<'_>);
    /// When the policy wants the next sensor reading (`None`: it has no periodic sensor).
    fn next_sample_at(&self, config: &Config) -> Option<Instant>;
}

/// Raises/clears one level-type alarm with hysteresis, remembering its onset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latch {
    since: Option<DeviceTime>,
}

/// A change of a [`Latch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatchChange {
    /// The condition began at the given onset.
    Raised(DeviceTime),
    /// The condition that began at `since` ended.
    Cleared(DeviceTime),
}

impl Latch {
    /// Whether the alarm is raised.
    pub const fn is_raised(&self) -> bool {
        self.since.is_some()
    }

    /// When the raised alarm began.
    pub const fn since(&self) -> Option<DeviceTime> {
        self.since
    }

    /// Feeds the condition: raises when `on`, clears when `off` (the hysteresis band is where
    /// neither holds).
    pub fn update(&mut self, now: DeviceTime, on: bool, off: bool) -> Option<LatchChange> {
        match self.since {
            None if on => {
                self.since = Some(now);
                Some(LatchChange::Raised(now))
            }
            Some(since) if off => {
                self.since = None;
                Some(LatchChange::Cleared(since))
            }
            _ => None,
        }
    }
}

/// The message for a latch change of alarm `kind` with reading `value` at `now`.
pub fn latch_message(change: LatchChange, kind: AlarmKind, value: i32, now: DeviceTime) -> Urgent {
    match change {
        LatchChange::Raised(since) => Urgent::AlarmRaised(AlarmRaised { kind, value, since }),
        LatchChange::Cleared(since) => {
            Urgent::AlarmCleared(AlarmCleared { kind, value, since, at: now })
        }
    }
}
