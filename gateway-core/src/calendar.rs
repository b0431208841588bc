//! Working time and deadlines, pure (`now` passed in).
//!
//! Chinese platforms count handling limits in calendar hours, working hours or working days,
//! on a working-time calendar: weekends off, public holidays off, and make-up workdays (调休)
//! on some weekend days. Times are shown in ISO 8601 at the platform's fixed offset (+08:00;
//! China has no daylight saving).

use std::{collections::BTreeSet, fmt, str::FromStr};

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveTime, TimeZone, Weekday};
use serde::{Deserialize, Serialize};

/// A limit: calendar hours/days or working hours/days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Calendar hours.
    Hours(u32),
    /// Calendar days.
    Days(u32),
    /// Working hours on the calendar.
    WorkingHours(u32),
    /// Working days on the calendar (the limit falls at the same time of day).
    WorkingDays(u32),
}

/// A limit that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a limit: write a number followed by h, d, wh (working hours) or wd (working days), e.g. 4wh"
)]
pub struct LimitError(String);

impl FromStr for Limit {
    type Err = LimitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(digits);
        let n: u32 = n.parse().map_err(|_| LimitError(s.into()))?;
        match unit {
            "h" => Ok(Limit::Hours(n)),
            "d" => Ok(Limit::Days(n)),
            "wh" => Ok(Limit::WorkingHours(n)),
            "wd" => Ok(Limit::WorkingDays(n)),
            _ => Err(LimitError(s.into())),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Hours(n) => write!(f, "{n}h"),
            Limit::Days(n) => write!(f, "{n}d"),
            Limit::WorkingHours(n) => write!(f, "{n}wh"),
            Limit::WorkingDays(n) => write!(f, "{n}wd"),
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The working-time calendar, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalendarConfig {
    /// Offset of local time from UTC, minutes (+480 = +08:00).
    pub utc_offset_min: i32,
    /// Working periods of a working day, `HH:MM-HH:MM`, in order.
    pub hours: Vec<String>,
    /// Days off every week (`sat`, `sun`, …).
    pub weekend: Vec<String>,
    /// Public holidays, `YYYY-MM-DD`.
    pub holidays: Vec<String>,
    /// Make-up workdays (调休) that fall on a weekend day, `YYYY-MM-DD`.
    pub workdays: Vec<String>,
}

impl Default for CalendarConfig {
    /// 08:30–12:00 and 13:30–17:30, Monday to Friday, +08:00, with the 2026 public holidays
    /// and make-up workdays as we read the State Council's notice. Deployments must check
    /// them against the official notice and add each new year's list.
    fn default() -> Self {
        let days = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        CalendarConfig {
            utc_offset_min: 480,
            hours: days(&["08:30-12:00", "13:30-17:30"]),
            weekend: days(&["sat", "sun"]),
            holidays: days(&[
                "2026-01-01",
                "2026-01-02",
                "2026-01-03",
                "2026-02-15",
                "2026-02-16",
                "2026-02-17",
                "2026-02-18",
                "2026-02-19",
                "2026-02-20",
                "2026-02-21",
                "2026-02-22",
                "2026-02-23",
                "2026-04-04",
                "2026-04-05",
                "2026-04-06",
                "2026-05-01",
                "2026-05-02",
                "2026-05-03",
                "2026-05-04",
                "2026-05-05",
                "2026-06-19",
                "2026-06-20",
                "2026-06-21",
                "2026-09-25",
                "2026-09-26",
                "2026-09-27",
                "2026-10-01",
                "2026-10-02",
                "2026-10-03",
                "2026-10-04",
                "2026-10-05",
                "2026-10-06",
                "2026-10-07",
            ]),
            workdays: days(&[
                "2026-01-04",
                "2026-02-14",
                "2026-02-28",
                "2026-05-09",
                "2026-09-20",
                "2026-10-10",
            ]),
        }
    }
}

/// A calendar setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("calendar.{key}: {problem}")]
pub struct CalendarError {
    key: &'static str,
    problem: String,
}

/// The working-time calendar.
#[derive(Debug, Clone)]
pub struct Calendar {
    offset: FixedOffset,
    periods: Vec<(NaiveTime, NaiveTime)>,
    weekend: Vec<Weekday>,
    holidays: BTreeSet<NaiveDate>,
    workdays: BTreeSet<NaiveDate>,
}

impl Default for Calendar {
    fn default() -> Self {
        #[allow(clippy::expect_used)]
        Calendar::new(&CalendarConfig::default()).expect("the default calendar is valid")
    }
}

fn dates(key: &'static str, v: &[String]) -> Result<BTreeSet<NaiveDate>, CalendarError> {
    v.iter()
        .map(|d| {
            NaiveDate::parse_from_str(d, "%Y-%m-%d")
                .map_err(|e| CalendarError { key, problem: format!("{d:?}: {e}") })
        })
        .collect()
}

impl Calendar {
    /// Builds and checks a calendar.
    pub fn new(c: &CalendarConfig) -> Result<Self, CalendarError> {
        let offset =
            FixedOffset::east_opt(c.utc_offset_min.saturating_mul(60)).ok_or_else(|| {
                CalendarError {
                    key: "utc_offset_min",
                    problem: format!("{} is out of range", c.utc_offset_min),
                }
            })?;
        let mut periods = Vec::new();
        for h in &c.hours {
            let bad = |p: &str| CalendarError { key: "hours", problem: format!("{h:?}: {p}") };
            let (a, b) = h.split_once('-').ok_or_else(|| bad("write HH:MM-HH:MM"))?;
            let a =
                NaiveTime::parse_from_str(a.trim(), "%H:%M").map_err(|e| bad(&e.to_string()))?;
            let b =
                NaiveTime::parse_from_str(b.trim(), "%H:%M").map_err(|e| bad(&e.to_string()))?;
            if b <= a || periods.last().is_some_and(|(_, end)| a < *end) {
                return Err(bad("periods must be increasing and must not overlap"));
            }
            periods.push((a, b));
        }
        if periods.is_empty() {
            return Err(CalendarError {
                key: "hours",
                problem: "at least one working period".into(),
            });
        }
        let weekend = c
            .weekend
            .iter()
            .map(|d| {
                d.parse::<Weekday>().map_err(|_| CalendarError {
                    key: "weekend",
                    problem: format!("{d:?} is not a weekday (mon … sun)"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Calendar {
            offset,
            periods,
            weekend,
            holidays: dates("holidays", &c.holidays)?,
            workdays: dates("workdays", &c.workdays)?,
        })
    }

    /// Local time of a Unix ms instant.
    /// The platform's fixed offset.
    pub fn offset(&self) -> FixedOffset {
        self.offset
    }

    /// The instant `ms` at the platform's offset.
    pub fn local(&self, ms: i64) -> DateTime<FixedOffset> {
        self.offset.timestamp_millis_opt(ms).single().unwrap_or_else(|| {
            self.offset
                .timestamp_millis_opt(0)
                .single()
                .unwrap_or_default()
                .with_timezone(&self.offset)
        })
    }

    /// ISO 8601 with the calendar's offset, seconds precision (e.g. `2026-11-26T17:05:00+08:00`).
    pub fn iso(&self, ms: i64) -> String {
        self.local(ms).format("%Y-%m-%dT%H:%M:%S%:z").to_string()
    }

    /// Whether a local date is a working day.
    pub fn is_workday(&self, d: NaiveDate) -> bool {
        if self.workdays.contains(&d) {
            return true;
        }
        !(self.holidays.contains(&d) || self.weekend.contains(&d.weekday()))
    }

    fn at(&self, d: NaiveDate, t: NaiveTime) -> i64 {
        self.offset
            .from_local_datetime(&d.and_time(t))
            .single()
            .map_or(i64::MAX, |dt| dt.timestamp_millis())
    }

    /// The deadline `limit` after `start_ms`.
    pub fn deadline(&self, start_ms: i64, limit: Limit) -> i64 {
        const HOUR: i64 = 3_600_000;
        match limit {
            Limit::Hours(h) => start_ms.saturating_add(i64::from(h) * HOUR),
            Limit::Days(d) => start_ms.saturating_add(i64::from(d) * 24 * HOUR),
            Limit::WorkingHours(h) => self.add_working_ms(start_ms, i64::from(h) * HOUR),
            Limit::WorkingDays(n) => {
                // The same local time of day, `n` working days later; from a day off, the
                // count starts at the next working day's opening.
                let local = self.local(start_ms);
                let mut day = local.date_naive();
                let mut time = local.time();
                if !self.is_workday(day) {
                    time = self.periods.first().map_or(time, |p| p.0);
                }
                let mut left = n;
                while left > 0 {
                    day = day.succ_opt().unwrap_or(day);
                    if self.is_workday(day) {
                        left -= 1;
                    }
                }
                self.at(day, time)
            }
        }
    }

    /// Adds `ms` of working time to `start_ms`.
    fn add_working_ms(&self, start_ms: i64, mut ms: i64) -> i64 {
        let local = self.local(start_ms);
        let mut day = local.date_naive();
        let mut from = local.time();
        // Bounded: at most a few years of days off in a row.
        for _ in 0..3_660 {
            if self.is_workday(day) {
                for (a, b) in &self.periods {
                    let begin = from.max(*a);
                    if begin >= *b {
                        continue;
                    }
                    let span = (*b - begin).num_milliseconds();
                    if ms <= span {
                        return self.at(day, begin) + ms;
                    }
                    ms -= span;
                }
            }
            day = day.succ_opt().unwrap_or(day);
            from = NaiveTime::MIN;
        }
        i64::MAX
    }

    /// Working time between two instants, ms (for how much of a limit has been used).
    pub fn working_ms_between(&self, from_ms: i64, to_ms: i64) -> i64 {
        if to_ms <= from_ms {
            return 0;
        }
        let mut total = 0;
        let mut day = self.local(from_ms).date_naive();
        let last = self.local(to_ms).date_naive();
        while day <= last {
            if self.is_workday(day) {
                for (a, b) in &self.periods {
                    let s = self.at(day, *a).max(from_ms);
                    let e = self.at(day, *b).min(to_ms);
                    total += (e - s).max(0);
                }
            }
            let Some(next) = day.succ_opt() else { break };
            day = next;
        }
        total
    }

    /// Whether any working time lies between two instants (it stops at the first found, so
    /// a deadline long past is answered as fast as one just past).
    pub fn works_between(&self, from_ms: i64, to_ms: i64) -> bool {
        if to_ms <= from_ms {
            return false;
        }
        let mut day = self.local(from_ms).date_naive();
        let last = self.local(to_ms).date_naive();
        while day <= last {
            if self.is_workday(day)
                && self
                    .periods
                    .iter()
                    .any(|(a, b)| self.at(day, *b).min(to_ms) > self.at(day, *a).max(from_ms))
            {
                return true;
            }
            let Some(next) = day.succ_opt() else { break };
            day = next;
        }
        false
    }

    /// Whether a step that started at `start_ms` and is due at `deadline_ms` is past its limit
    /// at `now_ms` — the same verdict as [`Calendar::used`] over 1, without measuring all the
    /// working time since the start.
    pub fn past(&self, start_ms: i64, deadline_ms: i64, limit: Limit, now_ms: i64) -> bool {
        let due = deadline_ms.max(start_ms);
        match limit {
            Limit::Hours(_) | Limit::Days(_) => now_ms > due,
            Limit::WorkingHours(_) | Limit::WorkingDays(_) => self.works_between(due, now_ms),
        }
    }

    /// The share of a step's limit used at `now`: elapsed time over allowed time, measured on
    /// the working calendar for working limits.
    pub fn used(&self, start_ms: i64, deadline_ms: i64, limit: Limit, now_ms: i64) -> f64 {
        let (used, allowed) = match limit {
            Limit::Hours(_) | Limit::Days(_) => (now_ms - start_ms, deadline_ms - start_ms),
            Limit::WorkingHours(_) | Limit::WorkingDays(_) => (
                self.working_ms_between(start_ms, now_ms),
                self.working_ms_between(start_ms, deadline_ms),
            ),
        };
        #[allow(clippy::cast_precision_loss)]
        if allowed <= 0 {
            if used > 0 { f64::INFINITY } else { 0.0 }
        } else {
            used as f64 / allowed as f64
        }
    }
}

/// Step timer colour: green below 80% of the limit, yellow to 100%, red beyond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Under 80%.
    Green,
    /// 80% to 100%.
    Yellow,
    /// Over the limit.
    Red,
}

impl Colour {
    /// The colour for a used share of a limit.
    pub fn of(used: f64) -> Self {
        if used < 0.8 {
            Colour::Green
        } else if used <= 1.0 {
            Colour::Yellow
        } else {
            Colour::Red
        }
    }

    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Colour::Green => "green",
            Colour::Yellow => "yellow",
            Colour::Red => "red",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn limits_parse_and_print() {
        for s in ["2h", "6h", "1d", "4wh", "3wd"] {
            assert_eq!(s.parse::<Limit>().unwrap().to_string(), s);
        }
        for bad in ["", "h", "4", "4 weeks", "-1h", "1.5h"] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn working_hours_skip_lunch_evenings_weekends_and_holidays() {
        let c = Calendar::default();
        // Thursday 2026-11-26 16:00 +08:00 + 4 working hours: 1.5 h today, 2.5 h Friday
        // morning from 08:30 → 11:00 Friday.
        let d = c.deadline(ms("2026-11-26T16:00:00+08:00"), Limit::WorkingHours(4));
        assert_eq!(c.iso(d), "2026-11-27T11:00:00+08:00");
        // Friday 17:00 + 2 wh: 0.5 h Friday, 1.5 h Monday → Monday 10:00.
        let d = c.deadline(ms("2026-11-27T17:00:00+08:00"), Limit::WorkingHours(2));
        assert_eq!(c.iso(d), "2026-11-30T10:00:00+08:00");
        // Through lunch: 11:00 + 2 wh → 1 h before lunch, 1 h after 13:30 → 14:30.
        let d = c.deadline(ms("2026-11-26T11:00:00+08:00"), Limit::WorkingHours(2));
        assert_eq!(c.iso(d), "2026-11-26T14:30:00+08:00");
        // National Day: 2026-09-30 (Wed) 17:00 + 1 wh → past the holiday week to Thursday
        // 10-08 (10-01..07 off), 09:00.
        let d = c.deadline(ms("2026-09-30T17:00:00+08:00"), Limit::WorkingHours(1));
        assert_eq!(c.iso(d), "2026-10-08T09:00:00+08:00");
        // Calendar hours ignore all that.
        let d = c.deadline(ms("2026-11-27T17:00:00+08:00"), Limit::Hours(6));
        assert_eq!(c.iso(d), "2026-11-27T23:00:00+08:00");
    }

    #[test]
    fn working_days_count_make_up_workdays_and_skip_holidays() {
        let c = Calendar::default();
        // Friday 10:00 + 1 wd → Monday 10:00.
        let d = c.deadline(ms("2026-11-27T10:00:00+08:00"), Limit::WorkingDays(1));
        assert_eq!(c.iso(d), "2026-11-30T10:00:00+08:00");
        // Friday 2026-10-09 + 1 wd → Saturday 10-10, a make-up workday.
        let d = c.deadline(ms("2026-10-09T10:00:00+08:00"), Limit::WorkingDays(1));
        assert_eq!(c.iso(d), "2026-10-10T10:00:00+08:00");
        // Filed on a Sunday night: 3 wd from Monday's opening → Wednesday... counted from the
        // day off: Mon, Tue, Wed → Wednesday 08:30.
        let d = c.deadline(ms("2026-11-29T22:00:00+08:00"), Limit::WorkingDays(3));
        assert_eq!(c.iso(d), "2026-12-02T08:30:00+08:00");
    }

    #[test]
    fn step_colours_follow_the_share_of_the_limit_used() {
        let c = Calendar::default();
        let start = ms("2026-11-26T09:00:00+08:00");
        let deadline = c.deadline(start, Limit::Hours(10));
        let at = |h: i64| start + h * 360_000; // tenths of the limit
        assert_eq!(Colour::of(c.used(start, deadline, Limit::Hours(10), at(79))), Colour::Green);
        assert_eq!(Colour::of(c.used(start, deadline, Limit::Hours(10), at(80))), Colour::Yellow);
        assert_eq!(Colour::of(c.used(start, deadline, Limit::Hours(10), at(100))), Colour::Yellow);
        assert_eq!(Colour::of(c.used(start, deadline, Limit::Hours(10), at(101))), Colour::Red);
        // On working time, a night does not use the limit: 4 wh from 16:00 Thursday, at 08:00
        // Friday only 1.5 h of 4 are used.
        let start = ms("2026-11-26T16:00:00+08:00");
        let d = c.deadline(start, Limit::WorkingHours(4));
        let used = c.used(start, d, Limit::WorkingHours(4), ms("2026-11-27T08:00:00+08:00"));
        assert!((used - 0.375).abs() < 1e-9, "{used}");
    }

    #[test]
    fn bad_calendars_are_named() {
        let with = |f: fn(&mut CalendarConfig)| {
            let mut c = CalendarConfig::default();
            f(&mut c);
            Calendar::new(&c).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(with(|c| c.hours = vec!["9-17".into()]).unwrap_err().contains("calendar.hours"));
        let e = with(|c| c.holidays.push("2026-13-01".into())).unwrap_err();
        assert!(e.contains("calendar.holidays"));
        let e = with(|c| c.weekend = vec!["caturday".into()]).unwrap_err();
        assert!(e.contains("calendar.weekend"));
        assert!(with(|c| c.hours = vec!["13:00-17:00".into(), "08:00-12:00".into()]).is_err());
        assert!(with(|_| {}).is_ok());
    }
}
