//! Patrol beacon (a grid worker's terminal): position fixes at an interval while on patrol,
//! checkpoint check-ins, incident reports with an event class, and SOS, which goes out
//! immediately, ahead of everything else.

use gridsense_protocol::{
    CaseClass, CheckIn, IncidentReport, MAX_NOTE_BYTES, PositionFix, Sample, Sos,
};
use heapless::String;

use crate::{
    Config, DeviceKind, Instant,
    outbox::Urgent,
    sensing::{Context, Sensing},
};

/// What the beacon's user or its GNSS does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeaconInput {
    /// The worker starts a patrol: fixes begin.
    PatrolStart,
    /// The worker ends the patrol: fixes stop.
    PatrolEnd,
    /// A GNSS fix.
    Fix(PositionFix),
    /// A checkpoint tag was read.
    CheckIn(u32),
    /// The worker files a report.
    Report {
        /// The class chosen.
        class: CaseClass,
        /// A short note.
        note: String<MAX_NOTE_BYTES>,
    },
    /// The SOS button.
    Sos,
}

/// The patrol-beacon policy.
#[derive(Debug, Clone, Default)]
pub struct Beacon {
    on_patrol: bool,
    last_fix: Option<PositionFix>,
    last_fix_at: Option<Instant>,
}

impl Beacon {
    /// A beacon off patrol with no fix yet.
    pub fn new() -> Self {
        Beacon::default()
    }

    /// Whether a patrol is under way.
    pub const fn on_patrol(&self) -> bool {
        self.on_patrol
    }
}

impl Sensing for Beacon {
    type Input = BeaconInput;
    const KIND: DeviceKind = DeviceKind::Beacon;

    fn on_input(&mut self, now: Instant, input: BeaconInput, cx: &mut Context<'_>) {
        let at = cx.time;
        match input {
            BeaconInput::PatrolStart => self.on_patrol = true,
            BeaconInput::PatrolEnd => self.on_patrol = false,
            BeaconInput::Fix(fix) => {
                self.last_fix = Some(fix);
                let due = self.last_fix_at.is_none_or(|t| {
                    now.millis_since(t) >= u64::from(cx.config.fix_interval_s) * 1000
                });
                if self.on_patrol && due {
                    cx.sink.sample(at, Sample::Fix(fix));
                    self.last_fix_at = Some(now);
                }
            }
            BeaconInput::CheckIn(checkpoint) => {
                cx.sink.urgent(Urgent::CheckIn(CheckIn { at, checkpoint, fix: self.last_fix }));
            }
            BeaconInput::Report { class, note } => {
                let report = IncidentReport { at, class, note, fix: self.last_fix };
                cx.sink.urgent(Urgent::Report(report));
            }
            BeaconInput::Sos => cx.sink.urgent(Urgent::Sos(Sos { at, fix: self.last_fix })),
        }
    }

    fn next_sample_at(&self, config: &Config) -> Option<Instant> {
        self.on_patrol
            .then(|| self.last_fix_at.map_or(Instant::ZERO, |t| t.add_secs(config.fix_interval_s)))
    }
}
