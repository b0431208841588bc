//! The assessment report (通报/考核), pure: periods on the platform's calendar (half-months
//! by default, +08:00), and the indicators of CJ/T 292's evaluation of areas, departments and
//! positions computed from the cases, devices and patrols the store hands over.
//!
//! A period's cases are those **detected** in it; each is judged as it stood at the report's
//! `as_of` (the period's end, or now while the period runs): a milestone stamped later counts
//! as not reached, so a report of a finished period reads the same whenever it is made.
//!
//! Definitions (one row; the totals row counts every case of the period):
//! - `sensor` / `worker_reports`: cases found by devices (source IoT) / reported by grid workers;
//! - `filed`: reached 立案; `dispatched_1d`: first dispatched within the 130 "1 day";
//!   `feedback_3d`: feedback (or closed) within the "3 days";
//! - `handled_on_time` ÷ `due` = 按期处置率, where `due` counts the dispatched cases that were
//!   handled or whose handling deadline had passed by `as_of`;
//! - `reworked` ÷ `handled` = 返工率 (sent back after feedback); `returned`: a department
//!   returned it at least once;
//! - `closed` ÷ `filed` = 结案率; `closed_on_time` ÷ `filed` = 按期结案率 (closed, handled within
//!   its limit); `first_level` ÷ `closed`: closed at the level it was filed at (no escalation);
//! - repair time: detection → handled, hours (mean, p90 by nearest rank);
//! - `repeat_objects`: objects (cover or well) with 3 or more cases in the period;
//! - devices online and low on battery: the registry's devices in the area, as of the report;
//! - `checkins` (patrol check-ins) and, per worker, `coverage`: the share of the period's days
//!   (to `as_of`) with a check-in in the worker's own grid;
//! - `score`: Σ weight × rate over the [`Weights`] (rows with nothing filed have none), rank
//!   by score with ties sharing a rank, and the change against the previous period.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{Datelike, Days, Duration, FixedOffset, Months, NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};

use crate::{
    calendar::Calendar,
    cases::{
        CaseState, Milestones,
        governance::Level,
        lifecycle::{self, Clocks},
    },
};

/// How periods are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeriodKind {
    /// 1st–15th and 16th–end of month (the platforms' 通报 rhythm).
    HalfMonth,
    /// Monday to Sunday.
    Week,
    /// A calendar month.
    Month,
    /// Any range of days.
    Range,
}

impl PeriodKind {
    /// From its name.
    pub fn parse(s: &str) -> Result<Self, ReportError> {
        match s {
            "half-month" | "half_month" => Ok(PeriodKind::HalfMonth),
            "week" => Ok(PeriodKind::Week),
            "month" => Ok(PeriodKind::Month),
            "range" => Ok(PeriodKind::Range),
            _ => Err(ReportError::Period(format!(
                "{s:?} is not a period: half-month, week or month"
            ))),
        }
    }
}

/// A report period: whole local days, `from` to `to` inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Period {
    /// How it was cut.
    pub kind: PeriodKind,
    /// First day.
    pub from: NaiveDate,
    /// Last day (inclusive: through 24:00 of it).
    pub to: NaiveDate,
}

/// A report that cannot be made as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// A bad period or date.
    #[error("period: {0}")]
    Period(String),
    /// A bad breakdown.
    #[error("by: {0:?} is not a breakdown: street, community, grid, department or worker")]
    By(String),
}

fn last_day_of_month(d: NaiveDate) -> NaiveDate {
    let first = d.with_day(1).unwrap_or(d);
    first.checked_add_months(Months::new(1)).and_then(|n| n.pred_opt()).unwrap_or(d)
}

/// Parses `YYYY-MM-DD`, naming the field.
pub fn parse_date(field: &str, s: &str) -> Result<NaiveDate, ReportError> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map_err(|_| ReportError::Period(format!("{field}: {s:?} is not a date (YYYY-MM-DD)")))
}

impl Period {
    /// The period of `kind` that contains `day`.
    pub fn containing(kind: PeriodKind, day: NaiveDate) -> Period {
        let (from, to) = match kind {
            PeriodKind::HalfMonth if day.day() <= 15 => {
                (day.with_day(1).unwrap_or(day), day.with_day(15).unwrap_or(day))
            }
            PeriodKind::HalfMonth => (day.with_day(16).unwrap_or(day), last_day_of_month(day)),
            PeriodKind::Week => {
                let back = u64::from(day.weekday().num_days_from_monday());
                let from = day.checked_sub_days(Days::new(back)).unwrap_or(day);
                (from, from.checked_add_days(Days::new(6)).unwrap_or(from))
            }
            PeriodKind::Month | PeriodKind::Range => {
                (day.with_day(1).unwrap_or(day), last_day_of_month(day))
            }
        };
        Period { kind, from, to }
    }

    /// The last period of `kind` that ended before `today` (the default report).
    pub fn last_complete(kind: PeriodKind, today: NaiveDate) -> Period {
        Period::containing(kind, today).previous()
    }

    /// A range of days, `from` to `to` inclusive.
    pub fn range(from: NaiveDate, to: NaiveDate) -> Result<Period, ReportError> {
        if to < from {
            return Err(ReportError::Period(format!("--to {to} is before --from {from}")));
        }
        if (to - from).num_days() > 3_660 {
            return Err(ReportError::Period("a report covers at most ten years".into()));
        }
        // A range that is exactly a half-month, week or month is reported as one, so its
        // comparison is with the previous one of its kind.
        let kind = [PeriodKind::HalfMonth, PeriodKind::Month, PeriodKind::Week]
            .into_iter()
            .find(|k| Period::containing(*k, from) == Period { kind: *k, from, to })
            .unwrap_or(PeriodKind::Range);
        Ok(Period { kind, from, to })
    }

    /// The period before: the previous one of the same kind; for a range, as many days
    /// right before it.
    pub fn previous(&self) -> Period {
        let before = self.from.pred_opt().unwrap_or(self.from);
        match self.kind {
            PeriodKind::Range => {
                let days = self.days();
                let from = self.from.checked_sub_days(Days::new(days)).unwrap_or(self.from);
                Period { kind: PeriodKind::Range, from, to: before }
            }
            kind => Period::containing(kind, before),
        }
    }

    /// Days in it.
    pub fn days(&self) -> u64 {
        u64::try_from((self.to - self.from).num_days() + 1).unwrap_or(1)
    }

    /// Its first instant, Unix ms.
    pub fn start_ms(&self, offset: FixedOffset) -> i64 {
        day_start_ms(self.from, offset)
    }

    /// The instant after its last day (24:00 of `to`), Unix ms.
    pub fn end_ms(&self, offset: FixedOffset) -> i64 {
        day_start_ms(self.to, offset) + Duration::days(1).num_milliseconds()
    }
}

fn day_start_ms(d: NaiveDate, offset: FixedOffset) -> i64 {
    let naive = d.and_hms_opt(0, 0, 0).unwrap_or_default();
    offset.from_local_datetime(&naive).single().map_or(0, |t| t.timestamp_millis())
}

/// The breakdown of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    /// 街道.
    Street,
    /// 社区.
    Community,
    /// 网格.
    Grid,
    /// 专业部门.
    Department,
    /// 网格员 (needs the operator role: these figures set people's pay).
    Worker,
}

impl By {
    /// From its name.
    pub fn parse(s: &str) -> Result<Self, ReportError> {
        match s {
            "street" => Ok(By::Street),
            "community" => Ok(By::Community),
            "grid" => Ok(By::Grid),
            "department" => Ok(By::Department),
            "worker" => Ok(By::Worker),
            _ => Err(ReportError::By(s.into())),
        }
    }

    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            By::Street => "street",
            By::Community => "community",
            By::Grid => "grid",
            By::Department => "department",
            By::Worker => "worker",
        }
    }

    /// The name on a Chinese report.
    pub const fn zh(self) -> &'static str {
        match self {
            By::Street => "街道",
            By::Community => "社区",
            By::Grid => "网格",
            By::Department => "部门",
            By::Worker => "网格员",
        }
    }
}

/// The weights of the composite score (rates are 0 … 1), after CJ/T 292-style local schemes,
/// e.g. on-time closure × 60. A negative weight is a penalty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// 按期结案率.
    pub closed_on_time: f64,
    /// 按期处置率.
    pub handled_on_time: f64,
    /// Dispatched within the 130 "1 day".
    pub dispatched_1d: f64,
    /// Feedback within the 130 "3 days".
    pub feedback_3d: f64,
    /// 返工率 (a penalty).
    pub rework: f64,
}

impl Default for Weights {
    /// 60 + 20 + 10 + 10 = 100 for a perfect row; rework costs up to 20.
    fn default() -> Self {
        Weights {
            closed_on_time: 60.0,
            handled_on_time: 20.0,
            dispatched_1d: 10.0,
            feedback_3d: 10.0,
            rework: -20.0,
        }
    }
}

impl Weights {
    /// Checks that every weight is a finite number.
    pub fn validate(&self) -> Result<(), String> {
        for (k, v) in [
            ("closed_on_time", self.closed_on_time),
            ("handled_on_time", self.handled_on_time),
            ("dispatched_1d", self.dispatched_1d),
            ("feedback_3d", self.feedback_3d),
            ("rework", self.rework),
        ] {
            if !v.is_finite() || v.abs() > 1_000.0 {
                return Err(format!("assessment.{k}: {v} is not a weight (a number, |w| ≤ 1000)"));
            }
        }
        Ok(())
    }
}

/// One case as the report reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseFact {
    /// Id.
    pub id: i64,
    /// Class code.
    pub class_code: String,
    /// `IoT` or `grid_worker`.
    pub source: String,
    /// Device (a worker's report: the worker's beacon), EUI hex.
    pub eui: String,
    /// The object (component code, else the device).
    pub object: String,
    /// Responsibility grid.
    pub grid_code: Option<String>,
    /// Community.
    pub community_code: Option<String>,
    /// Street.
    pub street_code: Option<String>,
    /// Responsible department.
    pub department: Option<String>,
    /// Level now.
    pub level: Level,
    /// Level when filed.
    pub first_level: Level,
    /// Detected, Unix ms.
    pub detected_ms: i64,
    /// 130 deploy due.
    pub deploy_due_ms: i64,
    /// 130 feedback due.
    pub feedback_due_ms: i64,
    /// Handling due (from the last dispatch).
    pub handling_due_ms: i64,
    /// Handling limit as stored.
    pub handling_limit: String,
    /// Filed at.
    pub filed_ms: Option<i64>,
    /// First dispatched at.
    pub first_dispatched_ms: Option<i64>,
    /// Last dispatched at.
    pub dispatched_ms: Option<i64>,
    /// Handled at.
    pub handled_ms: Option<i64>,
    /// Feedback at.
    pub feedback_ms: Option<i64>,
    /// Closed or voided at.
    pub closed_ms: Option<i64>,
    /// State now.
    pub state: CaseState,
    /// Times returned.
    pub returns: u32,
    /// Times sent back after feedback.
    pub reworks: u32,
}

impl CaseFact {
    fn clocks(&self) -> Clocks<'_> {
        Clocks {
            detected_ms: self.detected_ms,
            handling_limit: &self.handling_limit,
            deploy_due_ms: self.deploy_due_ms,
            feedback_due_ms: self.feedback_due_ms,
            handling_due_ms: self.handling_due_ms,
            dispatched_ms: self.dispatched_ms,
            handled_ms: self.handled_ms,
            feedback_ms: self.feedback_ms,
            closed_ms: self.closed_ms,
        }
    }
}

/// A grid worker (registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    /// Worker id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Responsibility grid code.
    pub grid_code: String,
    /// The beacon (patrol terminal) the worker carries, EUI hex; empty: none.
    #[serde(default)]
    pub beacon: String,
    /// First day on the grid, `YYYY-MM-DD`; empty: always.
    #[serde(default)]
    pub valid_from: String,
    /// Last day on the grid, `YYYY-MM-DD`; empty: still there.
    #[serde(default)]
    pub valid_to: String,
}

impl Worker {
    /// Whether the worker was on the grid on local day `day`.
    pub fn on_duty(&self, day: NaiveDate) -> bool {
        let after = |s: &str| s.is_empty() || parse_date("", s).is_ok_and(|d| day >= d);
        let before = |s: &str| s.is_empty() || parse_date("", s).is_ok_and(|d| day <= d);
        after(&self.valid_from) && before(&self.valid_to)
    }

    /// Checks ids, codes and dates.
    pub fn validate(&self) -> Result<(), String> {
        let who = &self.id;
        if who.trim().is_empty() || self.name.trim().is_empty() {
            return Err(format!("worker {who:?}: an id and a name are needed"));
        }
        if self.grid_code.is_empty() || !self.grid_code.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("worker {who}: grid_code {:?} is not a grid code", self.grid_code));
        }
        if !self.beacon.is_empty()
            && (self.beacon.len() != 16 || !self.beacon.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(format!("worker {who}: beacon {:?} is not an EUI (16 hex)", self.beacon));
        }
        for (k, v) in [("valid_from", &self.valid_from), ("valid_to", &self.valid_to)] {
            if !v.is_empty() {
                parse_date(&format!("worker {who}: {k}"), v).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// A device as the report reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFact {
    /// Its grid.
    pub grid_code: Option<String>,
    /// Online now.
    pub online: bool,
    /// Low on battery now.
    pub low_battery: bool,
}

/// A patrol check-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckIn {
    /// Beacon, EUI hex.
    pub eui: String,
    /// Device time, Unix ms.
    pub at_ms: i64,
    /// Grid of the fix.
    pub grid_code: Option<String>,
}

/// A named area of the grid layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Area {
    /// Grid code.
    pub grid_code: String,
    /// Grid name.
    pub grid_name: String,
    /// Community code.
    pub community_code: String,
    /// Community name.
    pub community_name: String,
    /// Street code.
    pub street_code: String,
    /// Street name.
    pub street_name: String,
}

impl Area {
    /// The area of a grid of the loaded grid layer.
    pub fn of(cell: &crate::geo::GridCell) -> Area {
        Area {
            grid_code: cell.grid_code.to_string(),
            grid_name: cell.grid_name.clone(),
            community_code: cell.community_code.clone(),
            community_name: cell.community_name.clone(),
            street_code: cell.street_code.to_string(),
            street_name: cell.street_name.clone(),
        }
    }
}

/// Everything that exists and gets a row, rows with zeros included.
#[derive(Debug, Clone, Default)]
pub struct Entities {
    /// The grid layer's grids.
    pub areas: Vec<Area>,
    /// Department code → name.
    pub departments: Vec<(String, String)>,
    /// Grid workers.
    pub workers: Vec<Worker>,
}

/// What the report is made from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Cases detected in the period.
    pub cases: Vec<CaseFact>,
    /// Cases detected in the period before (for the change).
    pub previous: Vec<CaseFact>,
    /// Devices now.
    pub devices: Vec<DeviceFact>,
    /// Check-ins in the period.
    pub checkins: Vec<CheckIn>,
}

/// One row of figures.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Row {
    /// Code (street, community, grid, department or worker id; `total`).
    pub code: String,
    /// Name.
    pub name: String,
    /// Found by sensors.
    pub sensor: u64,
    /// Reported by grid workers.
    pub worker_reports: u64,
    /// Filed (立案).
    pub filed: u64,
    /// Dispatched at least once.
    pub dispatched: u64,
    /// First dispatched within the 130 "1 day".
    pub dispatched_1d: u64,
    /// Feedback (or closed) within the 130 "3 days".
    pub feedback_3d: u64,
    /// Handled.
    pub handled: u64,
    /// Dispatched and handled or due by `as_of` (按期处置率's denominator).
    pub due: u64,
    /// Handled within the limit.
    pub handled_on_time: u64,
    /// Returned by a department at least once.
    pub returned: u64,
    /// Sent back after feedback (返工).
    pub reworked: u64,
    /// Closed (结案).
    pub closed: u64,
    /// Closed, handled within the limit.
    pub closed_on_time: u64,
    /// Closed at the level filed at.
    pub first_level: u64,
    /// Escalated (督办) at least once.
    pub escalated: u64,
    /// Overdue and open at `as_of`.
    pub overdue: u64,
    /// 按期处置率.
    pub on_time_handling_rate: Option<f64>,
    /// 返工率.
    pub rework_rate: Option<f64>,
    /// 结案率.
    pub closure_rate: Option<f64>,
    /// 按期结案率.
    pub on_time_closure_rate: Option<f64>,
    /// Closed at the first level ÷ closed.
    pub first_level_rate: Option<f64>,
    /// Mean detection → handled, hours.
    pub repair_mean_h: Option<f64>,
    /// p90 detection → handled, hours.
    pub repair_p90_h: Option<f64>,
    /// Objects with ≥ 3 cases.
    pub repeat_objects: u64,
    /// Devices (areas only).
    pub devices: u64,
    /// Online ÷ devices.
    pub online_ratio: Option<f64>,
    /// Devices low on battery.
    pub low_battery: u64,
    /// Patrol check-ins.
    pub checkins: u64,
    /// Workers: share of days with a check-in in the own grid.
    pub coverage: Option<f64>,
    /// Composite score.
    pub score: Option<f64>,
    /// Rank by score (ties share).
    pub rank: Option<u32>,
    /// Score in the previous period.
    pub previous_score: Option<f64>,
    /// Rank in the previous period.
    pub previous_rank: Option<u32>,
    /// Score change against the previous period.
    pub score_change: Option<f64>,
}

/// An overdue case (红榜/督办清单).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RedCase {
    /// Case id.
    pub id: i64,
    /// Class.
    pub class_code: String,
    /// Department.
    pub department: Option<String>,
    /// Level now.
    pub level: Level,
    /// Grid.
    pub grid_code: Option<String>,
    /// State.
    pub state: CaseState,
    /// The red timers.
    pub red: Vec<&'static str>,
    /// Hours past the earliest red deadline.
    pub overdue_h: f64,
}

/// The period as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShownPeriod {
    /// First day.
    pub from: String,
    /// Last day (inclusive).
    pub to: String,
    /// `half-month`, `week`, `month`, `range`.
    pub kind: PeriodKind,
}

/// A report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The period.
    pub period: ShownPeriod,
    /// The previous period (the comparison).
    pub previous: ShownPeriod,
    /// The breakdown.
    pub by: By,
    /// Figures as of, ISO 8601.
    pub as_of: String,
    /// One row per entity, ranked.
    pub rows: Vec<Row>,
    /// All cases of the period.
    pub totals: Row,
    /// Overdue cases.
    pub red_list: Vec<RedCase>,
    /// Overdue cases in all ([`RED_LIST_MAX`] of them, the longest overdue, are listed).
    pub red_total: u64,
}

/// The most overdue cases a report lists (a page that prints, a JSON that loads); every one
/// counts in the rows' and totals' `overdue`.
pub const RED_LIST_MAX: usize = 500;

fn shown(p: &Period) -> ShownPeriod {
    ShownPeriod { from: p.from.to_string(), to: p.to.to_string(), kind: p.kind }
}

#[allow(clippy::cast_precision_loss)]
fn rate(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| round4(n as f64 / d as f64))
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// The rest of the context a report needs.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The working calendar.
    pub calendar: &'a Calendar,
    /// The 130 milestones.
    pub milestones: &'a Milestones,
    /// The score's weights.
    pub weights: &'a Weights,
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// The keys a case counts under for `by`.
fn keys_of<'a>(c: &'a CaseFact, by: By, beacons: &Beacons<'a>, cal: &Calendar) -> Vec<&'a str> {
    match by {
        By::Street => c.street_code.as_deref().into_iter().collect(),
        By::Community => c.community_code.as_deref().into_iter().collect(),
        By::Grid => c.grid_code.as_deref().into_iter().collect(),
        By::Department => c.department.as_deref().into_iter().collect(),
        // A worker's report counts for whoever carried the beacon on the day it was made.
        By::Worker if c.source == crate::cases::SOURCE_WORKER => {
            let day = cal.local(c.detected_ms).date_naive();
            let carriers = beacons.get(c.eui.as_str()).into_iter().flatten();
            carriers.filter(|w| w.on_duty(day)).map(|w| w.id.as_str()).collect()
        }
        By::Worker => Vec::new(),
    }
}

/// The workers by the beacon they carry (lowercase EUI hex), looked up once per case or
/// check-in instead of a scan of every worker.
type Beacons<'a> = HashMap<String, Vec<&'a Worker>>;

fn beacons(workers: &[Worker]) -> Beacons<'_> {
    let mut map: Beacons<'_> = HashMap::new();
    for w in workers.iter().filter(|w| !w.beacon.is_empty()) {
        map.entry(w.beacon.to_ascii_lowercase()).or_default().push(w);
    }
    map
}

/// Counts the cases into `row` as they stood at `as_of`.
fn tally(row: &mut Row, cases: &[&CaseFact], as_of: i64, ctx: &Context<'_>) {
    let by = |t: Option<i64>| t.filter(|t| *t <= as_of);
    let mut repairs: Vec<f64> = Vec::new();
    let mut objects: HashMap<&str, u32> = HashMap::new();
    for c in cases {
        if c.source == crate::cases::SOURCE_WORKER {
            row.worker_reports += 1;
        } else {
            row.sensor += 1;
        }
        *objects.entry(c.object.as_str()).or_default() += 1;
        let filed = by(c.filed_ms).is_some() || by(c.first_dispatched_ms).is_some();
        if !filed {
            continue;
        }
        row.filed += 1;
        let dispatched = by(c.first_dispatched_ms);
        if let Some(d) = dispatched {
            row.dispatched += 1;
            if d <= c.deploy_due_ms {
                row.dispatched_1d += 1;
            }
        }
        let closed = by(c.closed_ms).filter(|_| c.state == CaseState::Closed);
        if by(c.feedback_ms).or(closed).is_some_and(|f| f <= c.feedback_due_ms) {
            row.feedback_3d += 1;
        }
        let handled = by(c.handled_ms);
        if let Some(h) = handled {
            row.handled += 1;
            #[allow(clippy::cast_precision_loss)]
            repairs.push((h - c.detected_ms) as f64 / 3_600_000.0);
        }
        let on_time = handled.is_some_and(|h| h <= c.handling_due_ms);
        if dispatched.is_some() && (handled.is_some() || c.handling_due_ms <= as_of) {
            row.due += 1;
            if on_time {
                row.handled_on_time += 1;
            }
        }
        if c.returns > 0 {
            row.returned += 1;
        }
        if c.reworks > 0 {
            row.reworked += 1;
        }
        if c.level > c.first_level {
            row.escalated += 1;
        }
        if closed.is_some() {
            row.closed += 1;
            if on_time {
                row.closed_on_time += 1;
            }
            if c.level == c.first_level {
                row.first_level += 1;
            }
        }
        if !red(c, as_of, ctx).is_empty() {
            row.overdue += 1;
        }
    }
    row.repeat_objects = objects.values().filter(|n| **n >= 3).count() as u64;
    row.on_time_handling_rate = rate(row.handled_on_time, row.due);
    row.rework_rate = rate(row.reworked, row.handled);
    row.closure_rate = rate(row.closed, row.filed);
    row.on_time_closure_rate = rate(row.closed_on_time, row.filed);
    row.first_level_rate = rate(row.first_level, row.closed);
    if !repairs.is_empty() {
        repairs.sort_by(f64::total_cmp);
        #[allow(clippy::cast_precision_loss)]
        let mean = repairs.iter().sum::<f64>() / repairs.len() as f64;
        // Nearest rank: the smallest value with at least 90 % of the values at or below it.
        let rank = (repairs.len() * 9).div_ceil(10).max(1);
        row.repair_mean_h = Some((mean * 100.0).round() / 100.0);
        row.repair_p90_h = repairs.get(rank - 1).map(|v| (v * 100.0).round() / 100.0);
    }
    let w = ctx.weights;
    row.score = (row.filed > 0).then(|| {
        let r = |x: Option<f64>| x.unwrap_or(0.0);
        let s = w.closed_on_time * r(row.on_time_closure_rate)
            + w.handled_on_time * r(row.on_time_handling_rate.or(Some(1.0)))
            + w.dispatched_1d * r(rate(row.dispatched_1d, row.filed))
            + w.feedback_3d * r(rate(row.feedback_3d, row.filed))
            + w.rework * r(row.rework_rate);
        (s * 100.0).round() / 100.0
    });
}

/// The red timers of a case at `as_of` (none once finished).
fn red(c: &CaseFact, as_of: i64, ctx: &Context<'_>) -> Vec<&'static str> {
    let finished = c.state.is_final() && c.closed_ms.is_some_and(|t| t <= as_of);
    if finished {
        return Vec::new();
    }
    // Milestones after `as_of` had not happened yet.
    let mut clocks = c.clocks();
    let cut = |t: Option<i64>| t.filter(|t| *t <= as_of);
    clocks.dispatched_ms = cut(clocks.dispatched_ms);
    clocks.handled_ms = cut(clocks.handled_ms);
    clocks.feedback_ms = cut(clocks.feedback_ms);
    clocks.closed_ms = cut(clocks.closed_ms);
    lifecycle::overdue(&clocks, ctx.milestones, ctx.calendar, as_of)
}

/// Ranks rows by score, best first; ties share a rank (1, 1, 3); rows without a score last,
/// unranked, in code order.
fn rank(rows: &mut [Row]) {
    rows.sort_by(|a, b| match (a.score, b.score) {
        (Some(x), Some(y)) => y.total_cmp(&x).then_with(|| a.code.cmp(&b.code)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.code.cmp(&b.code),
    });
    let mut last: Option<(f64, u32)> = None;
    for (i, row) in rows.iter_mut().enumerate() {
        let Some(score) = row.score else { break };
        let place = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let r = match last {
            Some((s, r)) if s == score => r,
            _ => place,
        };
        row.rank = Some(r);
        last = Some((score, r));
    }
}

/// The rows of one period: one per entity, counted and ranked.
fn rows_of<'a>(
    by: By,
    entities: &'a Entities,
    beacons: &Beacons<'a>,
    cases: &'a [CaseFact],
    as_of: i64,
    ctx: &Context<'_>,
) -> Vec<Row> {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for a in &entities.areas {
        let (code, name) = match by {
            By::Street => (&a.street_code, &a.street_name),
            By::Community => (&a.community_code, &a.community_name),
            By::Grid => (&a.grid_code, &a.grid_name),
            _ => continue,
        };
        names.entry(code.clone()).or_insert_with(|| name.clone());
    }
    if by == By::Department {
        for (code, name) in &entities.departments {
            names.insert(code.clone(), name.clone());
        }
    }
    if by == By::Worker {
        for w in &entities.workers {
            names.insert(w.id.clone(), w.name.clone());
        }
    }
    let mut groups: BTreeMap<&str, Vec<&CaseFact>> = BTreeMap::new();
    for c in cases {
        for k in keys_of(c, by, beacons, ctx.calendar) {
            groups.entry(k).or_default().push(c);
        }
    }
    names
        .iter()
        .map(|(code, name)| {
            let mut row = Row { code: code.clone(), name: name.clone(), ..Row::default() };
            tally(&mut row, groups.get(code.as_str()).map_or(&[][..], Vec::as_slice), as_of, ctx);
            row
        })
        .collect()
}

/// Makes the report of `period` by `by`.
pub fn report(
    by: By,
    period: &Period,
    entities: &Entities,
    inputs: &Inputs,
    ctx: &Context<'_>,
) -> Report {
    let offset = ctx.calendar.offset();
    let as_of = ctx.now_ms.min(period.end_ms(offset) - 1);
    let previous = period.previous();
    let prev_as_of = ctx.now_ms.min(previous.end_ms(offset) - 1);
    let beacons = beacons(&entities.workers);
    let mut rows = rows_of(by, entities, &beacons, &inputs.cases, as_of, ctx);
    rank(&mut rows);
    let mut before = rows_of(by, entities, &beacons, &inputs.previous, prev_as_of, ctx);
    rank(&mut before);
    let before: HashMap<&str, &Row> = before.iter().map(|r| (r.code.as_str(), r)).collect();
    for row in &mut rows {
        if let Some(p) = before.get(row.code.as_str()) {
            row.previous_score = p.score;
            row.previous_rank = p.rank;
            row.score_change =
                row.score.zip(p.score).map(|(a, b)| ((a - b) * 100.0).round() / 100.0);
        }
    }
    // Devices and patrols (areas: their devices and the check-ins made there; workers: their
    // own check-ins and coverage).
    let areas: HashMap<&str, &Area> =
        entities.areas.iter().map(|a| (a.grid_code.as_str(), a)).collect();
    let area_of = |grid: Option<&str>| -> Option<String> {
        let a = areas.get(grid?)?;
        Some(match by {
            By::Street => a.street_code.clone(),
            By::Community => a.community_code.clone(),
            By::Grid => a.grid_code.clone(),
            _ => return None,
        })
    };
    let index: HashMap<String, usize> =
        rows.iter().enumerate().map(|(i, r)| (r.code.clone(), i)).collect();
    let mut online: HashMap<usize, u64> = HashMap::new();
    for d in &inputs.devices {
        if let Some(i) = area_of(d.grid_code.as_deref()).and_then(|k| index.get(&k).copied())
            && let Some(row) = rows.get_mut(i)
        {
            row.devices += 1;
            row.low_battery += u64::from(d.low_battery);
            *online.entry(i).or_default() += u64::from(d.online);
        }
    }
    for (i, n) in online {
        if let Some(row) = rows.get_mut(i) {
            row.online_ratio = rate(n, row.devices);
        }
    }
    let days_so_far = {
        let start = period.start_ms(offset);
        u64::try_from((as_of - start).max(0) / 86_400_000 + 1).unwrap_or(1).min(period.days())
    };
    let mut worker_days: HashMap<usize, BTreeSet<i64>> = HashMap::new();
    for ci in inputs.checkins.iter().filter(|c| c.at_ms <= as_of) {
        if by == By::Worker {
            let day = ctx.calendar.local(ci.at_ms).date_naive();
            let carriers = beacons.get(ci.eui.to_ascii_lowercase().as_str());
            for w in carriers.into_iter().flatten().filter(|w| w.on_duty(day)) {
                if let Some(&i) = index.get(&w.id)
                    && let Some(row) = rows.get_mut(i)
                {
                    row.checkins += 1;
                    if ci.grid_code.as_deref() == Some(w.grid_code.as_str()) {
                        worker_days.entry(i).or_default().insert(day.num_days_from_ce().into());
                    }
                }
            }
        } else if let Some(i) =
            area_of(ci.grid_code.as_deref()).and_then(|k| index.get(&k).copied())
            && let Some(row) = rows.get_mut(i)
        {
            row.checkins += 1;
        }
    }
    if by == By::Worker {
        for (i, row) in rows.iter_mut().enumerate() {
            let n = worker_days.get(&i).map_or(0, BTreeSet::len) as u64;
            row.coverage = rate(n, days_so_far);
        }
    }
    let all: Vec<&CaseFact> = inputs.cases.iter().collect();
    let mut totals = Row { code: "total".into(), name: "合计".into(), ..Row::default() };
    tally(&mut totals, &all, as_of, ctx);
    totals.devices = inputs.devices.len() as u64;
    totals.low_battery = inputs.devices.iter().filter(|d| d.low_battery).count() as u64;
    totals.online_ratio =
        rate(inputs.devices.iter().filter(|d| d.online).count() as u64, totals.devices);
    totals.checkins = inputs.checkins.iter().filter(|c| c.at_ms <= as_of).count() as u64;
    let mut red_list: Vec<RedCase> = inputs
        .cases
        .iter()
        .filter_map(|c| {
            let timers = red(c, as_of, ctx);
            if timers.is_empty() {
                return None;
            }
            let due = timers
                .iter()
                .map(|t| match *t {
                    "deploy" => c.deploy_due_ms,
                    "feedback" => c.feedback_due_ms,
                    _ => c.handling_due_ms,
                })
                .min()
                .unwrap_or(as_of);
            #[allow(clippy::cast_precision_loss)]
            let overdue_h = ((as_of - due).max(0) as f64 / 3_600_000.0 * 10.0).round() / 10.0;
            Some(RedCase {
                id: c.id,
                class_code: c.class_code.clone(),
                department: c.department.clone(),
                level: c.level,
                grid_code: c.grid_code.clone(),
                state: c.state,
                red: timers,
                overdue_h,
            })
        })
        .collect();
    red_list.sort_by(|a, b| b.overdue_h.total_cmp(&a.overdue_h).then(a.id.cmp(&b.id)));
    let red_total = red_list.len() as u64;
    red_list.truncate(RED_LIST_MAX);
    Report {
        period: shown(period),
        previous: shown(&previous),
        by,
        as_of: ctx.calendar.iso(as_of),
        rows,
        totals,
        red_list,
        red_total,
    }
}

#[cfg(test)]
mod tests;
