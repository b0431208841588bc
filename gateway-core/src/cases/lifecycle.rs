//! The case lifecycle's policy in one place: which moves are legal ([`CaseState::next`]),
//! which milestone a move stamps, which move restarts which clock, and the step timers (the
//! 130 "1 day" and "3 days", and the handling limit) with their colours. The store applies a
//! [`Move`]; the board, the CLI and the platform callbacks only ask for one.

use serde::Serialize;

use super::{CaseState, LifecycleError, Milestones};
use crate::calendar::{Calendar, Colour, Limit};

/// The limit a case whose stored handling limit does not parse is held to.
pub const FALLBACK_HANDLING_LIMIT: Limit = Limit::Hours(24);

/// A time a case records when it reaches a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Milestone {
    /// Filed (立案: the case meets the filing condition).
    Filed,
    /// Dispatched to the department (the 130 "1 day" step ends; the handling clock starts).
    Dispatched,
    /// Handled by the department.
    Handled,
    /// Feedback given (the 130 "3 days" step ends).
    Feedback,
    /// Closed or voided.
    Closed,
}

impl CaseState {
    /// The milestone reaching this state stamps, if any.
    pub const fn milestone(self) -> Option<Milestone> {
        match self {
            CaseState::Filed => Some(Milestone::Filed),
            CaseState::Dispatched => Some(Milestone::Dispatched),
            CaseState::Handled => Some(Milestone::Handled),
            CaseState::Feedback => Some(Milestone::Feedback),
            CaseState::Closed | CaseState::Voided => Some(Milestone::Closed),
            _ => None,
        }
    }
}

/// What one lifecycle move does to a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The state it leaves.
    pub from: CaseState,
    /// The state it reaches.
    pub to: CaseState,
    /// The milestone stamped with the move's time.
    pub stamp: Option<Milestone>,
    /// The new handling deadline: every dispatch (the first, and again after a return, a
    /// parking or a failed verification) restarts the handling clock at the move's time.
    pub handling_due_ms: Option<i64>,
    /// A department returned the case (counted; two returns escalate it).
    pub returned: bool,
    /// Sent back to the department after its feedback failed verification (返工, counted).
    pub reworked: bool,
}

/// Decides the move of a case in state `from`, held to `handling_limit` (its stored form,
/// e.g. `3wd`), to `to` at `now_ms`.
pub fn step(
    from: CaseState,
    to: CaseState,
    handling_limit: &str,
    now_ms: i64,
    calendar: &Calendar,
) -> Result<Move, LifecycleError> {
    from.to(to)?;
    let handling_due_ms = (to == CaseState::Dispatched).then(|| {
        let limit = handling_limit.parse().unwrap_or(FALLBACK_HANDLING_LIMIT);
        calendar.deadline(now_ms, limit)
    });
    Ok(Move {
        from,
        to,
        stamp: to.milestone(),
        handling_due_ms,
        returned: to == CaseState::Returned,
        reworked: from == CaseState::Feedback && to == CaseState::Dispatched,
    })
}

/// The clock fields of a case, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clocks<'a> {
    /// Detected (the 130 clocks start here), Unix ms.
    pub detected_ms: i64,
    /// The handling limit, stored form.
    pub handling_limit: &'a str,
    /// Dispatch due (130 "1 day").
    pub deploy_due_ms: i64,
    /// Feedback due (130 "3 days").
    pub feedback_due_ms: i64,
    /// Handling due (from the last dispatch).
    pub handling_due_ms: i64,
    /// Milestones reached.
    pub dispatched_ms: Option<i64>,
    /// Handled at.
    pub handled_ms: Option<i64>,
    /// Feedback at.
    pub feedback_ms: Option<i64>,
    /// Closed or voided at.
    pub closed_ms: Option<i64>,
}

/// One step timer of a case.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Timer {
    /// `deploy` (130: 1 day), `feedback` (130: 3 days) or `handling`.
    pub step: &'static str,
    /// The limit.
    pub limit: String,
    /// Clock start, ISO 8601.
    pub start: String,
    /// Deadline, ISO 8601.
    pub due: String,
    /// Done at, if done.
    pub done: Option<String>,
    /// Share of the limit used (at done, or now).
    pub used: f64,
    /// green < 80% < yellow ≤ 100% < red.
    pub colour: Colour,
}

/// A case's three steps: name, limit, clock start, deadline and when done. Dispatch and
/// feedback run from detection; handling from the last dispatch (from detection while
/// undispatched); closing ends every clock still running.
fn steps(
    c: &Clocks<'_>,
    milestones: &Milestones,
) -> [(&'static str, Limit, i64, i64, Option<i64>); 3] {
    let handling_limit: Limit = c.handling_limit.parse().unwrap_or(FALLBACK_HANDLING_LIMIT);
    [
        ("deploy", milestones.deploy, c.detected_ms, c.deploy_due_ms, c.dispatched_ms),
        (
            "feedback",
            milestones.feedback,
            c.detected_ms,
            c.feedback_due_ms,
            c.feedback_ms.or(c.closed_ms),
        ),
        (
            "handling",
            handling_limit,
            c.dispatched_ms.unwrap_or(c.detected_ms),
            c.handling_due_ms,
            c.handled_ms.or(c.closed_ms),
        ),
    ]
}

/// A case's step timers at `now`, with their colours.
pub fn timers(c: &Clocks<'_>, milestones: &Milestones, cal: &Calendar, now: i64) -> Vec<Timer> {
    steps(c, milestones)
        .into_iter()
        .map(|(step, limit, start, due, done)| {
            let used = cal.used(start, due, limit, done.unwrap_or(now));
            Timer {
                step,
                limit: limit.to_string(),
                start: cal.iso(start),
                due: cal.iso(due),
                done: done.map(|d| cal.iso(d)),
                used: (used * 1000.0).round() / 1000.0,
                colour: Colour::of(used),
            }
        })
        .collect()
}

/// The steps still running and past their limit at `now` — the timers [`timers`] shows red
/// and not done — without making the timers (supervision and the report ask this of every
/// open case).
pub fn overdue(
    c: &Clocks<'_>,
    milestones: &Milestones,
    cal: &Calendar,
    now: i64,
) -> Vec<&'static str> {
    steps(c, milestones)
        .into_iter()
        .filter(|(_, limit, start, due, done)| {
            done.is_none() && cal.past(*start, *due, *limit, now)
        })
        .map(|(step, ..)| step)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::CalendarConfig;

    const HOUR: i64 = 3_600_000;

    fn calendar() -> Calendar {
        Calendar::new(&CalendarConfig::default()).expect("default calendar")
    }

    #[test]
    fn every_dispatch_restarts_the_handling_clock_and_other_moves_leave_it() {
        let cal = calendar();
        let first =
            step(CaseState::Filed, CaseState::Dispatched, "4h", 10 * HOUR, &cal).expect("legal");
        assert_eq!(first.handling_due_ms, Some(14 * HOUR));
        assert_eq!(first.stamp, Some(Milestone::Dispatched));
        let back =
            step(CaseState::Returned, CaseState::Dispatched, "4h", 20 * HOUR, &cal).expect("legal");
        assert_eq!(back.handling_due_ms, Some(24 * HOUR));
        let handled =
            step(CaseState::Dispatched, CaseState::Handled, "4h", 21 * HOUR, &cal).expect("legal");
        assert_eq!(handled.handling_due_ms, None);
        assert_eq!(handled.stamp, Some(Milestone::Handled));
        assert!(!handled.returned && !handled.reworked && !first.reworked);
        let returned =
            step(CaseState::Dispatched, CaseState::Returned, "4h", 0, &cal).expect("legal");
        assert!(returned.returned);
        let rework =
            step(CaseState::Feedback, CaseState::Dispatched, "4h", 0, &cal).expect("legal");
        assert!(rework.reworked && !rework.returned);
        let garbled =
            step(CaseState::Filed, CaseState::Dispatched, "soon", 0, &cal).expect("legal");
        assert_eq!(garbled.handling_due_ms, Some(24 * HOUR), "the fallback limit");
    }

    #[test]
    fn an_illegal_move_is_refused_naming_both_states() {
        let e = step(CaseState::Filed, CaseState::Closed, "4h", 0, &calendar())
            .expect_err("filed cannot close");
        assert_eq!((e.from, e.to), (CaseState::Filed, CaseState::Closed));
        assert!(step(CaseState::Closed, CaseState::Dispatched, "4h", 0, &calendar()).is_err());
    }

    #[test]
    fn overdue_names_exactly_the_red_timers_not_done() {
        // Working limits across a weekend and calendar ones, at every half hour of ten days.
        let cal = calendar();
        let milestones =
            Milestones { deploy: Limit::WorkingDays(1), feedback: Limit::WorkingHours(20) };
        let friday = 1_796_346_000_000;
        assert_eq!(cal.iso(friday), "2026-12-04T09:00:00+08:00");
        let clocks = Clocks {
            detected_ms: friday,
            handling_limit: "4wh",
            deploy_due_ms: cal.deadline(friday, Limit::WorkingDays(1)),
            feedback_due_ms: cal.deadline(friday, Limit::WorkingHours(20)),
            handling_due_ms: cal.deadline(friday + 2 * HOUR, Limit::WorkingHours(4)),
            dispatched_ms: Some(friday + 2 * HOUR),
            ..Clocks::default()
        };
        let hourly = Clocks { handling_limit: "6h", handling_due_ms: friday + 8 * HOUR, ..clocks };
        for c in [clocks, hourly] {
            for k in 0..480 {
                let now = friday + k * HOUR / 2;
                let red: Vec<&str> = timers(&c, &milestones, &cal, now)
                    .into_iter()
                    .filter(|t| t.colour == Colour::Red && t.done.is_none())
                    .map(|t| t.step)
                    .collect();
                assert_eq!(overdue(&c, &milestones, &cal, now), red, "at {}", cal.iso(now));
            }
        }
    }

    #[test]
    fn timers_turn_yellow_at_eighty_percent_and_red_past_the_limit() {
        let cal = calendar();
        let milestones = Milestones { deploy: Limit::Hours(10), feedback: Limit::Hours(30) };
        let clocks = Clocks {
            detected_ms: 0,
            handling_limit: "10h",
            deploy_due_ms: 10 * HOUR,
            feedback_due_ms: 30 * HOUR,
            handling_due_ms: 10 * HOUR,
            ..Clocks::default()
        };
        let colours = |now| {
            timers(&clocks, &milestones, &cal, now).iter().map(|t| t.colour).collect::<Vec<_>>()
        };
        assert_eq!(colours(7 * HOUR), [Colour::Green; 3]);
        assert_eq!(colours(9 * HOUR), [Colour::Yellow, Colour::Green, Colour::Yellow]);
        assert_eq!(colours(11 * HOUR), [Colour::Red, Colour::Green, Colour::Red]);
        // Dispatched at 2 h: the deploy step stops; handling runs from the dispatch.
        let dispatched =
            Clocks { dispatched_ms: Some(2 * HOUR), handling_due_ms: 12 * HOUR, ..clocks };
        let t = timers(&dispatched, &milestones, &cal, 11 * HOUR);
        assert_eq!(
            t.iter().map(|t| t.colour).collect::<Vec<_>>(),
            [Colour::Green, Colour::Green, Colour::Yellow]
        );
        assert_eq!(t.first().map(|t| t.used), Some(0.2));
    }
}
