//! Incidents and cases, pure (`now` passed in; rows out for the store to commit in the same
//! transaction as the frames that caused them).
//!
//! - One open **incident** per (device, condition): a [`ConditionChange`] from the rules opens
//!   it, later changes escalate or de-escalate it and add evidence, a recovery reported by the
//!   sensor marks it recovered and asks the platform to verify (sensor-verified closure).
//!   Incidents of one condition in one grid within the link window share a **cluster** (a
//!   dispatcher sees one flood area with its members).
//! - An incident whose severity reaches its condition's `case_from` gets a **case**: class
//!   code, object code, coordinates (WGS84, named), address, grid codes, description with the
//!   evidence, source IoT, urgency, onset/detection times, handling deadline by class and the
//!   "130" milestones on the working-time calendar, and an idempotency key. The case and its
//!   **outbox** entry are written with the incident, in one transaction.
//! - Maintenance windows (per device or per area code) turn what would be a case into a
//!   recorded incident in state `maintenance`.
//! - Grid workers' beacons: reports become cases with the worker's class and position; SOS
//!   becomes an urgent alert (not a case) for the alert channel; check-ins become patrol records.
//! - The case lifecycle ([`CaseState`]): collected → filed (or voided) → dispatched → handled →
//!   feedback → verified → closed, with parked and returned as side states; every transition
//!   is a trace row with who and when.

pub mod governance;
pub mod lifecycle;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
};

use gridsense_protocol::{CaseClass, ClassKind, Eui, PositionFix};
use serde::{Deserialize, Serialize};

use crate::{
    calendar::{Calendar, CalendarConfig, CalendarError, Limit},
    geo::GridCell,
    registry::Kind,
    rules::{ConditionChange, Evidence, Severity},
};

/// A class in the platform's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassInfo {
    /// Name as the platform shows it.
    pub name: String,
    /// Handling limit (from dispatch).
    pub limit: Limit,
}

/// How a rule condition becomes a case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionInfo {
    /// The filing condition as the platform words it.
    pub title: String,
    /// Class code (`E0404`), or `"component"`: `C` + the device's registered minor class.
    pub class: String,
    /// Lowest severity that files a case; absent: recorded as an incident only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_from: Option<Severity>,
}

/// The "130" supervision milestones, from filing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Milestones {
    /// Studied and deployed (dispatched) within.
    pub deploy: Limit,
    /// Completion or progress feedback within.
    pub feedback: Limit,
}

/// The platform's tables: classes, conditions, milestones and the working calendar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaseTables {
    /// Class code → name and handling limit.
    pub classes: BTreeMap<String, ClassInfo>,
    /// Rule condition → filing.
    pub conditions: BTreeMap<String, ConditionInfo>,
    /// The 130 milestones.
    pub milestones: Milestones,
    /// Working-time calendar.
    pub calendar: CalendarConfig,
    /// Departments and who handles what (`gridsense cases defaults departments`).
    pub departments: governance::Departments,
    /// How a new case's handling level is chosen.
    pub levels: governance::LevelRules,
    /// What supervision escalates.
    pub escalation: governance::EscalationRules,
    /// The assessment report's score weights.
    pub assessment: crate::assessment::Weights,
}

/// The governance part of the tables, as `gridsense cases defaults departments` prints it
/// (the same sections a tables file takes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GovernanceTables<'a> {
    /// Departments and responsibility.
    pub departments: &'a governance::Departments,
    /// Levels.
    pub levels: &'a governance::LevelRules,
    /// Escalation.
    pub escalation: &'a governance::EscalationRules,
    /// Score weights.
    pub assessment: &'a crate::assessment::Weights,
}

impl Default for CaseTables {
    /// DOMAIN.md's defaults: manhole-cover component classes 01xx (repair within 6 h, the
    /// Tianjin rule; sewage 2 h, the Taiyuan rule), events 0404 (72 h) and 0406 (4 working
    /// hours); 130 = deployed within 1 working day, feedback within 3.
    fn default() -> Self {
        let cover = [
            ("0101", "供水井盖"),
            ("0102", "污水井盖"),
            ("0103", "雨水井盖"),
            ("0104", "雨水箅子"),
            ("0105", "电力井盖"),
            ("0106", "路灯井盖"),
            ("0107", "通信井盖"),
            ("0108", "电视井盖"),
            ("0109", "网络井盖"),
            ("0110", "热力井盖"),
            ("0111", "燃气井盖"),
            ("0112", "公安井盖"),
            ("0114", "无主井盖"),
            ("0127", "中水井盖"),
            ("0128", "公交井盖"),
            ("0129", "输油（气）井盖"),
            ("0130", "特殊井盖"),
        ];
        let mut classes: BTreeMap<String, ClassInfo> = cover
            .into_iter()
            .map(|(code, name)| {
                let limit = if code == "0102" { Limit::Hours(2) } else { Limit::Hours(6) };
                (format!("C{code}"), ClassInfo { name: name.into(), limit })
            })
            .collect();
        classes.insert(
            "E0404".into(),
            ClassInfo { name: "污水管道堵塞或破损".into(), limit: Limit::Hours(72) },
        );
        classes.insert(
            "E0406".into(),
            ClassInfo { name: "道路积水".into(), limit: Limit::WorkingHours(4) },
        );
        let condition = |title: &str, class: &str, case_from: Option<Severity>| ConditionInfo {
            title: title.into(),
            class: class.into(),
            case_from,
        };
        let conditions = [
            (
                "cover_displaced",
                condition("井盖移位、破损或丢失", "component", Some(Severity::Major)),
            ),
            ("cover_loose", condition("井盖松动（反复倾斜）", "component", Some(Severity::Major))),
            ("cover_water", condition("井下积水", "E0406", Some(Severity::Major))),
            (
                "drain_overflow",
                condition("排水井水位超警戒，有冒溢风险", "E0404", Some(Severity::Major)),
            ),
            ("low_battery", condition("设备电量低", "component", None)),
            ("device_offline", condition("设备离线", "component", None)),
            ("sensor_fault", condition("传感器故障", "component", None)),
            ("sensor_stuck", condition("传感器读数长期不变", "component", None)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        CaseTables {
            classes,
            conditions,
            milestones: Milestones {
                deploy: Limit::WorkingDays(1),
                feedback: Limit::WorkingDays(3),
            },
            calendar: CalendarConfig::default(),
            departments: governance::Departments::default(),
            levels: governance::LevelRules::default(),
            escalation: governance::EscalationRules::default(),
            assessment: crate::assessment::Weights::default(),
        }
    }
}

/// Case tables that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    /// Unreadable file.
    #[error("case tables {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid for the schema.
    #[error("case tables {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// What and where.
        message: String,
    },
    /// A bad entry.
    #[error("case tables: {0}")]
    Invalid(String),
    /// A bad calendar.
    #[error("case tables: {0}")]
    Calendar(#[from] CalendarError),
}

/// Whether `code` is a class code: `C` or `E` and four digits.
pub fn is_class_code(code: &str) -> bool {
    let mut chars = code.chars();
    matches!(chars.next(), Some('C' | 'E')) && code.len() == 5 && chars.all(|c| c.is_ascii_digit())
}

impl CaseTables {
    /// Reads and checks a tables file.
    pub fn load(path: &std::path::Path) -> Result<Self, TablesError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| TablesError::Read { path: shown.clone(), source })?;
        let de = toml::Deserializer::parse(&text)
            .map_err(|e| TablesError::Parse { path: shown.clone(), message: e.to_string() })?;
        let tables: CaseTables = serde_path_to_error::deserialize(de).map_err(|e| {
            TablesError::Parse { path: shown, message: format!("{}: {}", e.path(), e.inner()) }
        })?;
        tables.validate()?;
        Ok(tables)
    }

    /// Checks codes and references.
    pub fn validate(&self) -> Result<(), TablesError> {
        for code in self.classes.keys() {
            if !is_class_code(code) {
                return Err(TablesError::Invalid(format!(
                    "classes.{code}: a class code is C or E and four digits, e.g. C0102"
                )));
            }
        }
        for (name, c) in &self.conditions {
            if c.class != "component" && !self.classes.contains_key(&c.class) {
                return Err(TablesError::Invalid(format!(
                    "conditions.{name}.class: {:?} is not in the classes table",
                    c.class
                )));
            }
        }
        Calendar::new(&self.calendar)?;
        self.departments
            .validate()
            .and_then(|()| self.levels.validate())
            .and_then(|()| self.escalation.validate())
            .and_then(|()| self.assessment.validate())
            .map_err(TablesError::Invalid)?;
        Ok(())
    }

    /// The governance sections.
    pub fn governance(&self) -> GovernanceTables<'_> {
        GovernanceTables {
            departments: &self.departments,
            levels: &self.levels,
            escalation: &self.escalation,
            assessment: &self.assessment,
        }
    }
}

/// Converts WGS84 to GCJ-02, the datum Chinese web maps use (outside China: unchanged).
pub fn wgs84_to_gcj02(lat: f64, lon: f64) -> (f64, f64) {
    use std::f64::consts::PI;
    // Krasovsky 1940 ellipsoid.
    const A: f64 = 6_378_245.0;
    const EE: f64 = 0.006_693_421_622_965_943;
    if !(72.004..=137.8347).contains(&lon) || !(0.8293..=55.8271).contains(&lat) {
        return (lat, lon);
    }
    let (x, y) = (lon - 105.0, lat - 35.0);
    let waves = |a: f64, b: f64| (a * (6.0 * x * PI).sin() + b * (2.0 * x * PI).sin()) * 2.0 / 3.0;
    let d_lat = -100.0
        + 2.0 * x
        + 3.0 * y
        + 0.2 * y * y
        + 0.1 * x * y
        + 0.2 * x.abs().sqrt()
        + waves(20.0, 20.0)
        + (20.0 * (y * PI).sin() + 40.0 * (y / 3.0 * PI).sin()) * 2.0 / 3.0
        + (160.0 * (y / 12.0 * PI).sin() + 320.0 * (y * PI / 30.0).sin()) * 2.0 / 3.0;
    let d_lon = 300.0
        + x
        + 2.0 * y
        + 0.1 * x * x
        + 0.1 * x * y
        + 0.1 * x.abs().sqrt()
        + waves(20.0, 20.0)
        + (20.0 * (x * PI).sin() + 40.0 * (x / 3.0 * PI).sin()) * 2.0 / 3.0
        + (150.0 * (x / 12.0 * PI).sin() + 300.0 * (x / 30.0 * PI).sin()) * 2.0 / 3.0;
    let rad = lat / 180.0 * PI;
    let magic = 1.0 - EE * rad.sin() * rad.sin();
    let sqrt_magic = magic.sqrt();
    let lat_out = lat + (d_lat * 180.0) / ((A * (1.0 - EE)) / (magic * sqrt_magic) * PI);
    let lon_out = lon + (d_lon * 180.0) / (A / sqrt_magic * rad.cos() * PI);
    (lat_out, lon_out)
}

/// Where a registered device stands and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// Kind.
    pub kind: Kind,
    /// Latitude, WGS84.
    pub lat: f64,
    /// Longitude, WGS84.
    pub lon: f64,
    /// Component object code (16 digits), where registered.
    pub object_code: Option<String>,
    /// Major+minor class digits (e.g. `0102`), where registered.
    pub minor_class: Option<String>,
}

/// Case lifecycle states (GB/T 30428 family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseState {
    /// 信息采集: reported, not yet filed.
    Collected,
    /// 案卷建立: filed.
    Filed,
    /// 作废: does not meet the filing condition.
    Voided,
    /// 任务派遣: dispatched; the handling clock runs.
    Dispatched,
    /// 任务处理: handled by the department.
    Handled,
    /// 处理反馈: feedback given.
    Feedback,
    /// 核查: verified on site (or by the sensor).
    Verified,
    /// 结案: closed.
    Closed,
    /// 挂账: parked long-term.
    Parked,
    /// 回退: returned to the dispatcher.
    Returned,
}

impl CaseState {
    /// Every state.
    pub const ALL: [CaseState; 10] = [
        CaseState::Collected,
        CaseState::Filed,
        CaseState::Voided,
        CaseState::Dispatched,
        CaseState::Handled,
        CaseState::Feedback,
        CaseState::Verified,
        CaseState::Closed,
        CaseState::Parked,
        CaseState::Returned,
    ];

    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            CaseState::Collected => "collected",
            CaseState::Filed => "filed",
            CaseState::Voided => "voided",
            CaseState::Dispatched => "dispatched",
            CaseState::Handled => "handled",
            CaseState::Feedback => "feedback",
            CaseState::Verified => "verified",
            CaseState::Closed => "closed",
            CaseState::Parked => "parked",
            CaseState::Returned => "returned",
        }
    }

    /// From the stable name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether the case is finished (closed or voided).
    pub const fn is_final(self) -> bool {
        matches!(self, CaseState::Closed | CaseState::Voided)
    }

    /// The states a case may move to from here.
    pub const fn next(self) -> &'static [CaseState] {
        use CaseState as S;
        match self {
            S::Collected => &[S::Filed, S::Voided],
            S::Filed => &[S::Dispatched, S::Parked, S::Voided],
            S::Dispatched => &[S::Handled, S::Returned, S::Parked],
            S::Returned => &[S::Dispatched, S::Parked, S::Voided],
            S::Parked => &[S::Dispatched, S::Filed],
            S::Handled => &[S::Feedback],
            S::Feedback => &[S::Verified, S::Dispatched],
            S::Verified => &[S::Closed],
            S::Closed | S::Voided => &[],
        }
    }

    /// Checks a transition.
    pub fn to(self, next: CaseState) -> Result<CaseState, LifecycleError> {
        if self.next().contains(&next) {
            Ok(next)
        } else {
            Err(LifecycleError { from: self, to: next })
        }
    }

    /// Open311 status: `closed` once closed or voided, `open` otherwise.
    pub const fn open311_status(self) -> &'static str {
        if self.is_final() { "closed" } else { "open" }
    }
}

impl fmt::Display for CaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a case in state {from} cannot move to {to}")]
pub struct LifecycleError {
    /// Current state.
    pub from: CaseState,
    /// Requested state.
    pub to: CaseState,
}

/// Urgency shown on the platform.
pub const fn urgency(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "urgent",
        Severity::Major => "high",
        Severity::Minor => "normal",
    }
}

/// A maintenance window: what happens to the devices in scope is recorded, not filed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceWindow {
    /// Row id.
    pub id: i64,
    /// A device (EUI hex) or an area code (district, street, community or grid; matches every
    /// grid code it prefixes).
    pub scope: String,
    /// From, Unix ms.
    pub from_ms: i64,
    /// Until, Unix ms.
    pub until_ms: i64,
    /// Who and why.
    pub note: String,
}

impl MaintenanceWindow {
    fn covers(&self, eui: Eui, grid: Option<&str>, at_ms: i64) -> bool {
        (self.from_ms..self.until_ms).contains(&at_ms)
            && (self.scope == eui.to_string()
                || grid.is_some_and(|g| !self.scope.is_empty() && g.starts_with(&self.scope)))
    }
}

/// The codes and address of where a case is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Place {
    /// Responsibility grid code.
    pub grid_code: Option<String>,
    /// Unit grid code (from the optional unit-grid layer).
    pub unit_grid_code: Option<String>,
    /// Community code.
    pub community_code: Option<String>,
    /// Street code.
    pub street_code: Option<String>,
    /// District code.
    pub district_code: Option<String>,
    /// Address.
    pub address: String,
}

impl Place {
    /// From a responsibility grid (and a unit grid code, where a unit layer is loaded).
    pub fn of(cell: Option<&GridCell>, unit_grid: Option<&str>) -> Self {
        match cell {
            None => Place { unit_grid_code: unit_grid.map(str::to_owned), ..Place::default() },
            Some(c) => Place {
                grid_code: Some(c.grid_code.to_string()),
                unit_grid_code: unit_grid.map(str::to_owned),
                community_code: Some(c.community_code.clone()),
                street_code: Some(c.street_code.to_string()),
                district_code: Some(c.district_code.clone()),
                address: c.address.clone(),
            },
        }
    }
}

/// An incident row (upserted by id).
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentRow {
    /// Id.
    pub id: i64,
    /// Device.
    pub eui: Eui,
    /// Condition.
    pub condition: String,
    /// Current severity.
    pub severity: Severity,
    /// `open`, `recovered`, `maintenance` or `closed`.
    pub state: &'static str,
    /// Onset, Unix ms.
    pub onset_ms: i64,
    /// Detected (rule decided), Unix ms.
    pub detected_ms: i64,
    /// Last change, Unix ms.
    pub updated_ms: i64,
    /// Cluster of related incidents.
    pub cluster_id: Option<i64>,
    /// Grid.
    pub grid_code: Option<String>,
    /// Its case.
    pub case_id: Option<i64>,
}

/// One piece of evidence on an incident (the trace from frame to incident).
#[derive(Debug, Clone, PartialEq)]
pub struct EvidenceRow {
    /// Incident.
    pub incident_id: i64,
    /// Gateway time, Unix ms.
    pub at_ms: i64,
    /// `raised`, `escalated`, `de-escalated`, `recovered`.
    pub change: &'static str,
    /// Severity after.
    pub severity: Option<Severity>,
    /// The frame that decided it (device counter); `None` when a timer decided.
    pub frame: Option<u32>,
    /// What the rule saw (the store writes it as JSON).
    pub evidence: Evidence,
}

/// A new case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseRow {
    /// Id.
    pub id: i64,
    /// Incident (none for a worker's report).
    pub incident_id: Option<i64>,
    /// Idempotency key: device + condition + onset.
    pub key: String,
    /// Device.
    pub eui: Eui,
    /// Class code, e.g. `C0102`.
    pub class_code: String,
    /// Class name.
    pub class_name: String,
    /// Filing condition.
    pub title: String,
    /// Component object code.
    pub object_code: Option<String>,
    /// WGS84 latitude.
    pub lat: f64,
    /// WGS84 longitude.
    pub lon: f64,
    /// Codes and address.
    pub place: Place,
    /// Description with the evidence (≤ 4,000 chars).
    pub description: String,
    /// `urgent`, `high`, `normal`.
    pub urgency: &'static str,
    /// Who reported it: [`SOURCE_IOT`] (detected from device frames) or [`SOURCE_WORKER`]
    /// (a grid worker's report from a beacon).
    pub source: &'static str,
    /// Onset, Unix ms.
    pub onset_ms: i64,
    /// Detection, Unix ms.
    pub detected_ms: i64,
    /// Handling limit (the department's own for the class, else the class's).
    pub limit: Limit,
    /// The department responsible.
    pub department: String,
    /// The handling level it is filed at.
    pub level: governance::Level,
    /// Handling deadline if dispatched at detection (recomputed at dispatch), Unix ms.
    pub handling_due_ms: i64,
    /// 130: deploy by, Unix ms.
    pub deploy_due_ms: i64,
    /// 130: feedback by, Unix ms.
    pub feedback_due_ms: i64,
}

/// A lifecycle or annotation entry of a case (the trace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseEvent {
    /// Case.
    pub case_id: i64,
    /// When, Unix ms.
    pub at_ms: i64,
    /// State before (`None` for annotations and creation).
    pub from: Option<CaseState>,
    /// State after (`None` for annotations).
    pub to: Option<CaseState>,
    /// Who or what: `gateway`, `operator:NAME`, `platform`.
    pub actor: String,
    /// What happened, readable.
    pub note: String,
}

/// Work for the delivery workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// `case` (create/update on the platform) or `alert` (the SOS channel).
    pub channel: &'static str,
    /// Case or alert id.
    pub subject: i64,
    /// `create`, `update`, `recovered`.
    pub op: &'static str,
    /// Queued at, Unix ms.
    pub at_ms: i64,
}

/// A case's source when the gateway detected it from device frames (物联网感知).
pub const SOURCE_IOT: &str = "IoT";

/// A case's source when a grid worker reported it from a beacon (网格员上报).
pub const SOURCE_WORKER: &str = "grid_worker";

/// A grid worker's SOS.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    /// Id.
    pub id: i64,
    /// Beacon.
    pub eui: Eui,
    /// Device time of the press, Unix ms.
    pub at_ms: i64,
    /// Arrival, Unix ms.
    pub received_ms: i64,
    /// Position, WGS84.
    pub position: Option<(f64, f64)>,
    /// Grid where it happened (or the beacon's).
    pub grid_code: Option<String>,
}

/// A checkpoint visit.
#[derive(Debug, Clone, PartialEq)]
pub struct PatrolRow {
    /// Beacon (the worker's terminal).
    pub eui: Eui,
    /// Device time, Unix ms.
    pub at_ms: i64,
    /// Local date `YYYY-MM-DD`.
    pub day: String,
    /// Checkpoint id.
    pub checkpoint: u32,
    /// Grid of the fix (or the beacon's grid).
    pub grid_code: Option<String>,
}

/// Everything the case layer writes with a batch.
#[derive(Debug, Default)]
pub struct Effects {
    /// Incident upserts.
    pub incidents: Vec<IncidentRow>,
    /// Evidence.
    pub evidence: Vec<EvidenceRow>,
    /// New cases.
    pub cases: Vec<CaseRow>,
    /// Urgency changes of existing cases.
    pub urgency: Vec<(i64, &'static str)>,
    /// Trace entries.
    pub events: Vec<CaseEvent>,
    /// Delivery work.
    pub outbox: Vec<OutboxRow>,
    /// SOS alerts.
    pub alerts: Vec<AlertRow>,
    /// Patrol records.
    pub patrols: Vec<PatrolRow>,
}

impl Effects {
    /// Whether nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.incidents.is_empty()
            && self.evidence.is_empty()
            && self.cases.is_empty()
            && self.urgency.is_empty()
            && self.events.is_empty()
            && self.outbox.is_empty()
            && self.alerts.is_empty()
            && self.patrols.is_empty()
    }
}

/// An open incident as the core keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenIncident {
    /// Id.
    pub id: i64,
    /// Current severity.
    pub severity: Severity,
    /// Onset.
    pub onset_ms: i64,
    /// Detected.
    pub detected_ms: i64,
    /// Its case, once filed.
    pub case_id: Option<i64>,
    /// Recovered per the sensor, waiting for the case to close.
    pub recovered: bool,
    /// Recorded under maintenance.
    pub maintenance: bool,
    /// Cluster.
    pub cluster_id: Option<i64>,
    /// Grid.
    pub grid_code: Option<String>,
}

/// Open incidents by (device, condition), as persisted.
pub type OpenIncidents = Vec<((Eui, String), OpenIncident)>;

/// Ids to continue from after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sequences {
    /// Last incident id.
    pub incident: i64,
    /// Last case id.
    pub case: i64,
    /// Last cluster id.
    pub cluster: i64,
    /// Last alert id.
    pub alert: i64,
}

/// The incident and case core.
#[derive(Debug)]
pub struct Cases {
    tables: Arc<CaseTables>,
    calendar: Calendar,
    open: HashMap<(Eui, String), OpenIncident>,
    /// (grid, condition) → (cluster id, last member's detection, members).
    clusters: HashMap<(String, String), (i64, i64, u32)>,
    seq: Sequences,
    windows: Vec<MaintenanceWindow>,
    link_window_ms: i64,
    /// With several gateway instances: the deployment's shards, and ids are minted per shard
    /// ([`next_id`]).
    sharded_ids: Option<u16>,
}

/// Ids minted for a shard's devices leave this remainder by the id stride: with several
/// gateway instances each mints ids only for the shards it owns, so two never mint the same.
pub const ID_STRIDE: i64 = gridsense_protocol::topic::MAX_SHARDS as i64;

/// The next id after `last` (the highest used): `last + 1` for a single gateway; with
/// `sharded` shards, the next id above `last` whose remainder by [`ID_STRIDE`] is the shard
/// of `eui`. An owner raises `last` from the store when it claims a shard, after the previous
/// owner's last commit for it, so ids stay unique across instances and hand-overs.
fn next_id(last: &mut i64, sharded: Option<u16>, eui: Eui) -> i64 {
    let id = match sharded {
        None => last.saturating_add(1),
        Some(shards) => {
            let shard = i64::from(gridsense_protocol::topic::shard_of(eui, shards));
            (*last / ID_STRIDE).saturating_add(1).saturating_mul(ID_STRIDE) + shard
        }
    };
    *last = id;
    id
}

/// Description limit of the platforms.
pub const DESCRIPTION_MAX_CHARS: usize = 4_000;

fn clip(mut s: String) -> String {
    if let Some((i, _)) = s.char_indices().nth(DESCRIPTION_MAX_CHARS) {
        s.truncate(i);
    }
    s
}

/// What happened to a condition, in the evidence trail's words.
fn change_name(change: &ConditionChange) -> &'static str {
    match (change.from, change.to) {
        (None, Some(_)) => "raised",
        (Some(_), None) => "recovered",
        (Some(a), Some(b)) if b > a => "escalated",
        _ => "de-escalated",
    }
}

fn describe_evidence(
    e: &Evidence,
    calendar: &Calendar,
    onset_ms: i64,
    battery_mv: Option<u16>,
) -> String {
    let unit = e.signal.unit();
    let mut s = format!("{} = {:.1}{unit}", e.signal.as_str(), e.value);
    if let Some(t) = e.threshold {
        s.push_str(&format!("，阈值 threshold {t:.1}{unit}"));
    }
    if e.hold_s > 0 {
        s.push_str(&format!("，持续 held {:.0} s (required {} s)", e.held_s, e.hold_s));
    }
    s.push_str(&format!("，起始 onset {}", calendar.iso(onset_ms)));
    if let Some(b) = battery_mv {
        s.push_str(&format!("，电池 battery {b} mV"));
    }
    s
}

impl Cases {
    /// A core for these tables (validated), linking related incidents within `link_window_ms`.
    pub fn new(tables: Arc<CaseTables>, link_window_ms: i64) -> Result<Self, TablesError> {
        tables.validate()?;
        let calendar = Calendar::new(&tables.calendar)?;
        Ok(Cases {
            tables,
            calendar,
            open: HashMap::new(),
            clusters: HashMap::new(),
            seq: Sequences::default(),
            windows: Vec::new(),
            link_window_ms,
            sharded_ids: None,
        })
    }

    /// Mints ids per shard of `shards` (several gateway instances share the store): see
    /// [`next_id`].
    pub fn set_sharded_ids(&mut self, shards: u16) {
        self.sharded_ids = Some(shards);
    }

    /// A shard claimed from another instance: the ids it used are skipped (`seq` read from
    /// the store after the claim), and its devices' open incidents replace what this
    /// instance knew of them.
    pub fn adopt(&mut self, seq: Sequences, open: OpenIncidents, mine: &dyn Fn(Eui) -> bool) {
        self.seq.incident = self.seq.incident.max(seq.incident);
        self.seq.case = self.seq.case.max(seq.case);
        self.seq.cluster = self.seq.cluster.max(seq.cluster);
        self.seq.alert = self.seq.alert.max(seq.alert);
        self.open.retain(|(eui, _), _| !mine(*eui));
        for ((eui, condition), o) in open {
            if mine(eui) {
                self.open.insert((eui, condition), o);
            }
        }
    }

    /// Forgets the open incidents of the devices `gone` says (a shard handed over or lost).
    pub fn forget(&mut self, gone: &dyn Fn(Eui) -> bool) {
        self.open.retain(|(eui, _), _| !gone(*eui));
    }

    /// Restores ids and open incidents after a restart.
    pub fn restore(&mut self, seq: Sequences, open: OpenIncidents) {
        self.seq = seq;
        for ((eui, condition), o) in open {
            if let (Some(grid), Some(cluster)) = (&o.grid_code, o.cluster_id) {
                let e = self
                    .clusters
                    .entry((grid.clone(), condition.clone()))
                    .or_insert((cluster, 0, 0));
                e.1 = e.1.max(o.detected_ms);
                e.2 = e.2.saturating_add(1);
            }
            self.open.insert((eui, condition), o);
        }
    }

    /// Replaces the maintenance windows.
    pub fn set_windows(&mut self, windows: Vec<MaintenanceWindow>) {
        self.windows = windows;
    }

    /// The working calendar.
    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// The tables.
    pub fn tables(&self) -> &CaseTables {
        &self.tables
    }

    /// The open incident of a device and condition.
    pub fn open_incident(&self, eui: Eui, condition: &str) -> Option<&OpenIncident> {
        self.open.get(&(eui, condition.to_owned()))
    }

    /// Open incidents.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    fn class_of(&self, condition: &ConditionInfo, site: &Site) -> Option<(String, ClassInfo)> {
        let code = if condition.class == "component" {
            format!("C{}", site.minor_class.as_deref()?)
        } else {
            condition.class.clone()
        };
        let info = self
            .tables
            .classes
            .get(&code)
            .cloned()
            .unwrap_or(ClassInfo { name: code.clone(), limit: Limit::Hours(24) });
        Some((code, info))
    }

    /// Who handles a new case of `class_code` at `place` and at which level: the responsible
    /// department, its handling limit (its own for the class, else `class_limit`) and the
    /// level for the class, severity and the incident's cluster size (`members`).
    fn assign(
        &self,
        class_code: &str,
        class_limit: Limit,
        place: &Place,
        severity: Severity,
        members: u32,
    ) -> (String, Limit, governance::Level) {
        let t = &self.tables;
        let department = t.departments.responsible(class_code, place.grid_code.as_deref());
        let limit = t.departments.limit(department, class_code, class_limit);
        (department.to_owned(), limit, t.levels.level(class_code, severity, members))
    }

    /// Applies a condition change of a device. `frame` is the deciding frame's counter (none
    /// when a timer decided); `battery_mv` the device's last battery reading for the evidence.
    #[allow(clippy::too_many_arguments)]
    pub fn on_change(
        &mut self,
        change: &ConditionChange,
        site: &Site,
        place: &Place,
        frame: Option<u32>,
        battery_mv: Option<u16>,
        out: &mut Effects,
    ) {
        let now = change.decided_ms;
        let key = (change.eui, change.condition.clone());
        let condition = self.tables.conditions.get(&change.condition).cloned();
        let name = change_name(change);
        if let Some(severity) = change.to
            && !self.open.contains_key(&key)
        {
            // A new incident.
            let incident = next_id(&mut self.seq.incident, self.sharded_ids, change.eui);
            // Under maintenance if the condition began or was detected during a window.
            let grid = place.grid_code.as_deref();
            let maintenance = self.windows.iter().any(|w| {
                w.covers(change.eui, grid, change.onset_ms) || w.covers(change.eui, grid, now)
            });
            let cluster_id = place.grid_code.as_ref().map(|g| {
                let k = (g.clone(), change.condition.clone());
                match self.clusters.get(&k) {
                    Some((id, last, n)) if now.saturating_sub(*last) <= self.link_window_ms => {
                        let (id, n) = (*id, n.saturating_add(1));
                        self.clusters.insert(k, (id, now, n));
                        id
                    }
                    _ => {
                        let id = next_id(&mut self.seq.cluster, self.sharded_ids, change.eui);
                        self.clusters.insert(k, (id, now, 1));
                        id
                    }
                }
            });
            let open = OpenIncident {
                id: incident,
                severity,
                onset_ms: change.onset_ms,
                detected_ms: now,
                case_id: None,
                recovered: false,
                maintenance,
                cluster_id,
                grid_code: place.grid_code.clone(),
            };
            self.open.insert(key.clone(), open);
        }
        let Some(open) = self.open.get_mut(&key) else { return };
        let id = open.id;
        out.evidence.push(EvidenceRow {
            incident_id: id,
            at_ms: now,
            change: name,
            severity: change.to,
            frame,
            evidence: change.evidence.clone(),
        });
        match change.to {
            Some(s) => {
                open.severity = s;
                open.recovered = false;
            }
            None => open.recovered = true,
        }
        let files = !open.maintenance
            && open.case_id.is_none()
            && change.to.is_some()
            && condition
                .as_ref()
                .and_then(|c| c.case_from)
                .is_some_and(|from| open.severity >= from);
        let snapshot = open.clone();
        if files
            && let Some(condition) = &condition
            && let Some(case) = self.new_case(change, &snapshot, condition, site, place, battery_mv)
        {
            let case_id = case.id;
            if let Some(o) = self.open.get_mut(&key) {
                o.case_id = Some(case_id);
            }
            out.events.push(CaseEvent {
                case_id,
                at_ms: now,
                from: None,
                to: Some(CaseState::Collected),
                actor: "gateway".into(),
                note: format!(
                    "incident {id} {name}: {} (department {}, level {})",
                    case.title, case.department, case.level
                ),
            });
            out.outbox.push(OutboxRow {
                channel: "case",
                subject: case_id,
                op: "create",
                at_ms: now,
            });
            out.cases.push(case);
        } else if let Some(case_id) = snapshot.case_id {
            // Later changes update the one case.
            let note = format!(
                "sensor {name}: {}",
                describe_evidence(&change.evidence, &self.calendar, change.onset_ms, battery_mv)
            );
            out.events.push(CaseEvent {
                case_id,
                at_ms: now,
                from: None,
                to: None,
                actor: "gateway".into(),
                note,
            });
            if let Some(s) = change.to {
                out.urgency.push((case_id, urgency(s)));
            }
            let op = if change.to.is_none() { "recovered" } else { "update" };
            out.outbox.push(OutboxRow { channel: "case", subject: case_id, op, at_ms: now });
        }
        // Without a case, a recovered incident is finished.
        let closes = change.to.is_none() && snapshot.case_id.is_none() && !files;
        let state = if closes {
            "closed"
        } else if snapshot.maintenance {
            "maintenance"
        } else if snapshot.recovered {
            "recovered"
        } else {
            "open"
        };
        out.incidents.push(IncidentRow {
            id,
            eui: change.eui,
            condition: change.condition.clone(),
            severity: snapshot.severity,
            state,
            onset_ms: snapshot.onset_ms,
            detected_ms: snapshot.detected_ms,
            updated_ms: now,
            cluster_id: snapshot.cluster_id,
            grid_code: snapshot.grid_code.clone(),
            case_id: self.open.get(&key).and_then(|o| o.case_id),
        });
        if closes {
            self.open.remove(&key);
        }
    }

    fn new_case(
        &mut self,
        change: &ConditionChange,
        open: &OpenIncident,
        condition: &ConditionInfo,
        site: &Site,
        place: &Place,
        battery_mv: Option<u16>,
    ) -> Option<CaseRow> {
        let (class_code, class) = self.class_of(condition, site)?;
        let members = place
            .grid_code
            .as_ref()
            .and_then(|g| self.clusters.get(&(g.clone(), change.condition.clone())))
            .map_or(1, |c| c.2);
        let (department, limit, level) =
            self.assign(&class_code, class.limit, place, open.severity, members);
        let id = next_id(&mut self.seq.case, self.sharded_ids, change.eui);
        let detected = change.decided_ms;
        let c = &self.calendar;
        let description = clip(format!(
            "【物联网自动上报 IoT】{title}。设备 device {eui}（{kind}）{object}。{evidence}。位置 {address}（WGS84 {lat:.6}, {lon:.6}）。",
            title = condition.title,
            eui = change.eui,
            kind = site.kind.as_str(),
            object = site
                .object_code
                .as_deref()
                .map(|o| format!("，部件编码 object {o}"))
                .unwrap_or_default(),
            evidence = describe_evidence(&change.evidence, c, open.onset_ms, battery_mv),
            address =
                if place.address.is_empty() { "未知网格 unassigned" } else { &place.address },
            lat = site.lat,
            lon = site.lon,
        ));
        Some(CaseRow {
            source: SOURCE_IOT,
            id,
            incident_id: Some(open.id),
            key: format!("{}:{}:{}", change.eui, change.condition, open.onset_ms),
            eui: change.eui,
            class_name: class.name,
            class_code,
            title: condition.title.clone(),
            object_code: site.object_code.clone(),
            lat: site.lat,
            lon: site.lon,
            place: place.clone(),
            description,
            urgency: urgency(open.severity),
            onset_ms: open.onset_ms,
            detected_ms: detected,
            limit,
            department,
            level,
            handling_due_ms: c.deadline(detected, limit),
            deploy_due_ms: c.deadline(detected, self.tables.milestones.deploy),
            feedback_due_ms: c.deadline(detected, self.tables.milestones.feedback),
        })
    }

    /// A grid worker's report: a case with the worker's class, at the worker's position (or the
    /// beacon's registered one). One per report frame: the key is the device and counter.
    #[allow(clippy::too_many_arguments)]
    pub fn on_report(
        &mut self,
        eui: Eui,
        counter: u32,
        at_ms: i64,
        now: i64,
        class: CaseClass,
        note: &str,
        position: (f64, f64),
        place: &Place,
        out: &mut Effects,
    ) {
        let prefix = match class.kind {
            ClassKind::Component => 'C',
            ClassKind::Event => 'E',
        };
        let class_code = format!("{prefix}{:02}{:02}", class.major, class.minor);
        let info = self
            .tables
            .classes
            .get(&class_code)
            .cloned()
            .unwrap_or(ClassInfo { name: class_code.clone(), limit: Limit::Hours(24) });
        let (department, limit, level) =
            self.assign(&class_code, info.limit, place, Severity::Major, 1);
        let id = next_id(&mut self.seq.case, self.sharded_ids, eui);
        let c = &self.calendar;
        let case = CaseRow {
            source: SOURCE_WORKER,
            id,
            incident_id: None,
            key: format!("{eui}:report:{counter}"),
            eui,
            class_code,
            class_name: info.name.clone(),
            title: format!("网格员上报 grid worker report: {}", info.name),
            object_code: None,
            lat: position.0,
            lon: position.1,
            place: place.clone(),
            description: clip(format!(
                "【网格员上报 worker report】{note}。终端 beacon {eui}，上报时间 {}。位置 {}（WGS84 {:.6}, {:.6}）。",
                c.iso(at_ms),
                if place.address.is_empty() { "未知网格 unassigned" } else { &place.address },
                position.0,
                position.1
            )),
            urgency: "normal",
            onset_ms: at_ms,
            detected_ms: now,
            limit,
            department,
            level,
            handling_due_ms: c.deadline(now, limit),
            deploy_due_ms: c.deadline(now, self.tables.milestones.deploy),
            feedback_due_ms: c.deadline(now, self.tables.milestones.feedback),
        };
        out.events.push(CaseEvent {
            case_id: case.id,
            at_ms: now,
            from: None,
            to: Some(CaseState::Collected),
            actor: format!("worker:{eui}"),
            note: format!("report frame {counter}"),
        });
        out.outbox.push(OutboxRow { channel: "case", subject: case.id, op: "create", at_ms: now });
        out.cases.push(case);
    }

    /// An SOS: an alert for the alert channel, not a case.
    pub fn on_sos(
        &mut self,
        eui: Eui,
        at_ms: i64,
        now: i64,
        fix: Option<&PositionFix>,
        grid_code: Option<String>,
        out: &mut Effects,
    ) {
        let id = next_id(&mut self.seq.alert, self.sharded_ids, eui);
        let position = fix.map(|f| (f64::from(f.lat_udeg) / 1e6, f64::from(f.lon_udeg) / 1e6));
        out.alerts.push(AlertRow { id, eui, at_ms, received_ms: now, position, grid_code });
        out.outbox.push(OutboxRow { channel: "alert", subject: id, op: "create", at_ms: now });
    }

    /// A check-in: a patrol record on the worker's local day.
    pub fn on_checkin(
        &self,
        eui: Eui,
        at_ms: i64,
        checkpoint: u32,
        grid_code: Option<String>,
        out: &mut Effects,
    ) {
        let day = self.calendar.local(at_ms).format("%Y-%m-%d").to_string();
        out.patrols.push(PatrolRow { eui, at_ms, day, checkpoint, grid_code });
    }

    /// A case reached a final state (closed or voided): its incident is finished; a later alarm
    /// of the same condition opens a new one.
    pub fn on_case_final(&mut self, case_id: i64, now: i64, out: &mut Effects) {
        let Some(key) =
            self.open.iter().find(|(_, o)| o.case_id == Some(case_id)).map(|(k, _)| k.clone())
        else {
            return;
        };
        if let Some(o) = self.open.remove(&key) {
            out.incidents.push(IncidentRow {
                id: o.id,
                eui: key.0,
                condition: key.1,
                severity: o.severity,
                state: "closed",
                onset_ms: o.onset_ms,
                detected_ms: o.detected_ms,
                updated_ms: now,
                cluster_id: o.cluster_id,
                grid_code: o.grid_code,
                case_id: o.case_id,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Signal;

    fn core() -> Cases {
        Cases::new(Arc::new(CaseTables::default()), 1_800_000).unwrap()
    }

    fn cover() -> Site {
        Site {
            kind: Kind::Cover,
            lat: 38.9,
            lon: 121.6,
            object_code: Some("2102020102000001".into()),
            minor_class: Some("0102".into()),
        }
    }

    fn place(grid: &str) -> Place {
        Place {
            grid_code: Some(grid.into()),
            unit_grid_code: None,
            community_code: Some(grid[..12].into()),
            street_code: Some(grid[..9].into()),
            district_code: Some(grid[..6].into()),
            address: "中山区海军广场街道第1社区第1网格".into(),
        }
    }

    fn change(
        eui: u64,
        condition: &str,
        from: Option<Severity>,
        to: Option<Severity>,
        now: i64,
    ) -> ConditionChange {
        ConditionChange {
            eui: Eui(eui),
            condition: condition.into(),
            from,
            to,
            onset_ms: 1_000,
            at_ms: now,
            decided_ms: now,
            evidence: Evidence {
                rule: "r".into(),
                signal: Signal::AlarmTiltDeg,
                value: 25.0,
                threshold: Some(10.0),
                hold_s: 10,
                held_s: 10.0,
            },
        }
    }

    const MAJOR: Option<Severity> = Some(Severity::Major);
    const CRIT: Option<Severity> = Some(Severity::Critical);
    // 2026-11-26 10:00 +08:00, a Thursday.
    const T0: i64 = 1_795_658_400_000;

    #[test]
    fn a_raise_files_one_case_with_codes_deadlines_and_an_outbox_entry() {
        let mut c = core();
        let mut fx = Effects::default();
        c.on_change(
            &change(7, "cover_displaced", None, MAJOR, T0),
            &cover(),
            &place("210202001001001"),
            Some(42),
            Some(3_600),
            &mut fx,
        );
        assert_eq!(fx.cases.len(), 1);
        let case = &fx.cases[0];
        assert_eq!(case.class_code, "C0102");
        assert_eq!(case.class_name, "污水井盖");
        assert_eq!(case.object_code.as_deref(), Some("2102020102000001"));
        assert_eq!(case.place.street_code.as_deref(), Some("210202001"));
        assert_eq!(case.key, "0000000000000007:cover_displaced:1000");
        assert_eq!(case.urgency, "high");
        assert!(
            case.description.contains("threshold 10.0°") && case.description.contains("3600 mV")
        );
        // Sewage cover: 2 h; 130 on working days from Thursday 10:00.
        assert_eq!(case.handling_due_ms - T0, 2 * 3_600_000);
        assert_eq!(c.calendar().iso(case.deploy_due_ms), "2026-11-27T10:00:00+08:00");
        assert_eq!(c.calendar().iso(case.feedback_due_ms), "2026-12-01T10:00:00+08:00");
        assert_eq!(
            fx.outbox,
            [OutboxRow { channel: "case", subject: case.id, op: "create", at_ms: T0 }]
        );
        assert_eq!(fx.evidence[0].frame, Some(42));
        assert_eq!(fx.incidents[0].state, "open");
        assert_eq!(fx.events[0].to, Some(CaseState::Collected));
    }

    #[test]
    fn ids_minted_per_shard_never_meet_across_instances_and_hand_overs() {
        use gridsense_protocol::topic::shard_of;
        // Devices of two shards (of 4), each shard at its own instance.
        let in_shard = |s: u8| (1..).map(Eui).filter(move |e| shard_of(*e, 4) == s);
        let (a, b): (Vec<Eui>, Vec<Eui>) =
            (in_shard(0).take(4).collect(), in_shard(1).take(3).collect());
        let raise = |c: &mut Cases, eui: Eui, t: i64| {
            let mut fx = Effects::default();
            let ch = ConditionChange { eui, ..change(0, "cover_displaced", None, MAJOR, t) };
            c.on_change(&ch, &cover(), &place("210202001001001"), None, None, &mut fx);
            (fx.incidents[0].id, fx.cases[0].id)
        };
        let (mut one, mut two) = (core(), core());
        one.set_sharded_ids(4);
        two.set_sharded_ids(4);
        let mut ids = Vec::new();
        for (i, (ea, eb)) in a.iter().zip(&b).enumerate() {
            let t = T0 + i64::try_from(i).unwrap() * 10;
            for (c, eui, shard) in [(&mut one, *ea, 0), (&mut two, *eb, 1)] {
                let (incident, case) = raise(c, eui, t);
                assert_eq!((incident % ID_STRIDE, case % ID_STRIDE), (shard, shard));
                ids.extend([("incident", incident), ("case", case)]);
            }
        }
        // Shard 0 moves to `two`, which raises its sequences from the store first.
        let max = |kind: &str| ids.iter().filter(|x| x.0 == kind).map(|x| x.1).max().unwrap();
        let stored =
            Sequences { incident: max("incident"), case: max("case"), ..Sequences::default() };
        two.adopt(stored, OpenIncidents::default(), &|e| shard_of(e, 4) == 0);
        let (incident, case) = raise(&mut two, a[3], T0 + 100);
        ids.extend([("incident", incident), ("case", case)]);
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");
        assert!(case > stored.case && case % ID_STRIDE == 0);
        // A single gateway keeps counting by one.
        assert_eq!(raise(&mut core(), a[0], T0), (1, 1));
    }

    #[test]
    fn later_changes_update_the_one_case_and_recovery_asks_for_verification() {
        let mut c = core();
        let (site, p) = (cover(), place("210202001001001"));
        let mut fx = Effects::default();
        c.on_change(&change(7, "cover_displaced", None, MAJOR, T0), &site, &p, None, None, &mut fx);
        c.on_change(
            &change(7, "cover_displaced", MAJOR, CRIT, T0 + 5),
            &site,
            &p,
            None,
            None,
            &mut fx,
        );
        c.on_change(
            &change(7, "cover_displaced", CRIT, None, T0 + 9),
            &site,
            &p,
            None,
            None,
            &mut fx,
        );
        assert_eq!(fx.cases.len(), 1, "one case per incident");
        let ops: Vec<_> = fx.outbox.iter().map(|o| o.op).collect();
        assert_eq!(ops, ["create", "update", "recovered"]);
        assert_eq!(fx.urgency, [(1, "urgent")]);
        assert_eq!(fx.incidents.last().unwrap().state, "recovered");
        // Raised again before the case is closed: still the same incident and case.
        c.on_change(
            &change(7, "cover_displaced", None, MAJOR, T0 + 20),
            &site,
            &p,
            None,
            None,
            &mut fx,
        );
        assert_eq!(fx.cases.len(), 1);
        assert_eq!(fx.incidents.last().unwrap().id, 1);
        // Closed on the platform: the next raise is a new incident and a new case.
        c.on_case_final(1, T0 + 30, &mut fx);
        c.on_change(
            &change(7, "cover_displaced", None, MAJOR, T0 + 40),
            &site,
            &p,
            None,
            None,
            &mut fx,
        );
        assert_eq!(fx.cases.len(), 2);
        assert_eq!(fx.incidents.last().unwrap().id, 2);
    }

    #[test]
    fn maintenance_records_without_filing_and_device_conditions_file_nothing() {
        let mut c = core();
        c.set_windows(vec![MaintenanceWindow {
            id: 1,
            scope: "210202001".into(),
            from_ms: T0 - 1,
            until_ms: T0 + 3_600_000,
            note: "crew 3 relaying covers".into(),
        }]);
        let mut fx = Effects::default();
        c.on_change(
            &change(7, "cover_displaced", None, CRIT, T0),
            &cover(),
            &place("210202001001001"),
            None,
            None,
            &mut fx,
        );
        assert!(fx.cases.is_empty() && fx.outbox.is_empty());
        assert_eq!(fx.incidents[0].state, "maintenance");
        // Another street is not in the window.
        c.on_change(
            &change(8, "cover_displaced", None, CRIT, T0),
            &cover(),
            &place("210202002001001"),
            None,
            None,
            &mut fx,
        );
        assert_eq!(fx.cases.len(), 1);
        // Low battery: an incident, no case; closed when it recovers.
        let mut fx = Effects::default();
        c.on_change(
            &change(9, "low_battery", None, Some(Severity::Minor), T0),
            &cover(),
            &place("210202002001001"),
            None,
            None,
            &mut fx,
        );
        c.on_change(
            &change(9, "low_battery", Some(Severity::Minor), None, T0 + 1),
            &cover(),
            &place("210202002001001"),
            None,
            None,
            &mut fx,
        );
        assert!(fx.cases.is_empty());
        assert_eq!(fx.incidents.last().unwrap().state, "closed");
        assert!(c.open_incident(Eui(9), "low_battery").is_none());
    }

    #[test]
    fn drains_in_one_grid_within_the_window_share_a_cluster() {
        let mut c = core();
        let drain =
            Site { kind: Kind::Drain, lat: 38.9, lon: 121.6, object_code: None, minor_class: None };
        let mut fx = Effects::default();
        for (eui, grid, t) in [
            (1, "210202001001001", 0),
            (2, "210202001001001", 600_000),
            (3, "210202001001002", 600_000),
            (4, "210202001001001", 4_000_000),
        ] {
            c.on_change(
                &change(eui, "drain_overflow", None, MAJOR, T0 + t),
                &drain,
                &place(grid),
                None,
                None,
                &mut fx,
            );
        }
        let clusters: Vec<_> = fx.incidents.iter().map(|i| i.cluster_id.unwrap()).collect();
        assert_eq!(
            clusters,
            [1, 1, 2, 3],
            "same grid within 30 min linked; other grid or later not"
        );
        assert!(fx.cases.iter().all(|c| c.class_code == "E0404"));
    }

    #[test]
    fn the_lifecycle_allows_only_its_transitions() {
        use CaseState as S;
        let path = [
            S::Collected,
            S::Filed,
            S::Dispatched,
            S::Handled,
            S::Feedback,
            S::Verified,
            S::Closed,
        ];
        for w in path.windows(2) {
            assert_eq!(w[0].to(w[1]), Ok(w[1]));
        }
        assert!(S::Collected.to(S::Closed).is_err());
        assert!(S::Closed.to(S::Filed).is_err());
        assert_eq!(S::Dispatched.to(S::Returned), Ok(S::Returned));
        assert_eq!(S::Returned.to(S::Dispatched), Ok(S::Dispatched));
        assert_eq!(S::Filed.to(S::Parked), Ok(S::Parked));
        assert_eq!(S::Feedback.to(S::Dispatched), Ok(S::Dispatched), "verification failed: redo");
        assert_eq!(S::Collected.to(S::Voided), Ok(S::Voided));
        for s in S::ALL {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
        assert_eq!(S::Voided.open311_status(), "closed");
    }

    #[test]
    fn gcj02_shifts_points_in_china_by_hundreds_of_metres_and_leaves_others() {
        let (lat, lon) = wgs84_to_gcj02(38.914, 121.614);
        let dy = (lat - 38.914) * 111_320.0;
        let dx = (lon - 121.614) * 111_320.0 * 38.914_f64.to_radians().cos();
        let d = dx.hypot(dy);
        assert!((100.0..1_000.0).contains(&d), "{d} m");
        assert_eq!(wgs84_to_gcj02(51.5, -0.12), (51.5, -0.12));
    }

    #[test]
    fn reports_sos_and_checkins() {
        let mut c = core();
        let mut fx = Effects::default();
        let class = CaseClass { kind: ClassKind::Event, major: 4, minor: 6 };
        c.on_report(
            Eui(5),
            9,
            T0 - 1_000,
            T0,
            class,
            "路口积水没过脚踝",
            (38.9, 121.6),
            &place("210202001001001"),
            &mut fx,
        );
        assert_eq!(fx.cases[0].class_code, "E0406");
        assert_eq!(fx.cases[0].key, "0000000000000005:report:9");
        // Road ponding: 4 working hours from Thursday 10:00 → 15:30 (lunch 12:00–13:30).
        assert_eq!(c.calendar().iso(fx.cases[0].handling_due_ms), "2026-11-26T15:30:00+08:00");
        c.on_sos(Eui(5), T0, T0 + 200, None, None, &mut fx);
        assert_eq!(fx.alerts.len(), 1);
        assert_eq!(fx.outbox.last().unwrap().channel, "alert");
        c.on_checkin(Eui(5), T0, 77, Some("210202001001001".into()), &mut fx);
        assert_eq!(fx.patrols[0].day, "2026-11-26");
    }

    #[test]
    fn bad_tables_are_named() {
        let mut t = CaseTables::default();
        t.classes.insert("X12".into(), ClassInfo { name: "x".into(), limit: Limit::Hours(1) });
        assert!(t.validate().unwrap_err().to_string().contains("classes.X12"));
        let mut t = CaseTables::default();
        t.conditions.get_mut("drain_overflow").unwrap().class = "E9999".into();
        assert!(t.validate().unwrap_err().to_string().contains("conditions.drain_overflow.class"));
    }
}
