//! Who handles a case and at which level, and when supervision (督办) escalates it — the
//! policy in one place, pure (`now` passed in):
//!
//! - **Departments** (专业部门/责任单位) with their level, contact, optional webhook and their own
//!   handling limits per class; **responsibility** by class code (a component class names the
//!   object's owner: `C0111` gas cover → the gas company; an event class its department:
//!   `E0404` → drainage), optionally narrowed to an area code prefix; the most specific entry
//!   wins, and the fallback department (the district's city-management bureau) takes the rest.
//! - **Handling level** (三级联动: community → street → district) by class, severity and the
//!   size of the incident's cluster (one displaced cover: community; many drains in one storm:
//!   street or district).
//! - **Escalation**: a case whose 130 milestone or handling deadline goes red, or that was
//!   returned [`EscalationRules::returns`] times, moves up one level — each cause once per case.

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use super::{
    Milestones,
    lifecycle::{self, Clocks},
};
use crate::{
    calendar::{Calendar, Limit},
    rules::Severity,
};

/// A handling level (三级联动).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// 社区: handles what it can ("小事不出村").
    #[default]
    Community,
    /// 街道: coordinates ("大事不出镇").
    Street,
    /// 区指挥中心: takes the big ones ("矛盾不上交").
    District,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 3] = [Level::Community, Level::Street, Level::District];

    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Community => "community",
            Level::Street => "street",
            Level::District => "district",
        }
    }

    /// The name on a Chinese report.
    pub const fn zh(self) -> &'static str {
        match self {
            Level::Community => "社区",
            Level::Street => "街道",
            Level::District => "区",
        }
    }

    /// One level up (none above the district).
    pub const fn up(self) -> Option<Level> {
        match self {
            Level::Community => Some(Level::Street),
            Level::Street => Some(Level::District),
            Level::District => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Level::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a level: community, street or district"))
    }
}

/// A department that handles cases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Department {
    /// Name as the platform shows it.
    pub name: String,
    /// The level it sits at.
    pub level: Level,
    /// Who to call (phone, duty desk).
    #[serde(default)]
    pub contact: String,
    /// A URL its cases are announced to (signed like the platform webhook); empty: none.
    #[serde(default)]
    pub webhook: String,
    /// Its own handling limits, class code → limit (override the class's default).
    #[serde(default)]
    pub limits: BTreeMap<String, Limit>,
}

/// Who is responsible for a class (in an area).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Responsibility {
    /// Class code (`C0111`, `E0404`).
    pub class: String,
    /// Only cases whose grid code starts with this area code; empty: everywhere.
    #[serde(default)]
    pub area: String,
    /// The department's code.
    pub department: String,
}

/// The departments and who handles what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Departments {
    /// The department that takes what no entry names (owner unknown, unlisted classes).
    pub fallback: String,
    /// Code → department.
    pub list: BTreeMap<String, Department>,
    /// Responsibility entries; the one with the longest matching area wins.
    pub responsibility: Vec<Responsibility>,
}

impl Default for Departments {
    /// DOMAIN.md's owners: the minor class says whose a cover is (0101 water company,
    /// 0102/0103/0104 drainage, 0105 power, 0106 street lighting, 0107–0109 telecom operators,
    /// 0110 heating, 0111 gas company, 0112 police, 0114 owner unknown → the district's
    /// city-management bureau); events by class (0404 blocked sewer and 0406 road ponding →
    /// drainage). Contacts are placeholders for a city to fill in.
    fn default() -> Self {
        let dept = |name: &str, level: Level| Department {
            name: name.into(),
            level,
            contact: String::new(),
            webhook: String::new(),
            limits: BTreeMap::new(),
        };
        let list: BTreeMap<String, Department> = [
            ("CGJ", dept("区城市管理局", Level::District)),
            ("GS", dept("供水公司", Level::District)),
            ("PS", dept("排水管理处", Level::District)),
            ("DL", dept("供电公司", Level::District)),
            ("LD", dept("路灯管理处", Level::District)),
            ("TX", dept("通信运营商", Level::District)),
            ("RL", dept("热力公司", Level::District)),
            ("RQ", dept("燃气公司", Level::District)),
            ("GA", dept("公安分局", Level::District)),
            ("JD", dept("街道城管科", Level::Street)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let owners = [
            ("C0101", "GS"),
            ("C0102", "PS"),
            ("C0103", "PS"),
            ("C0104", "PS"),
            ("C0105", "DL"),
            ("C0106", "LD"),
            ("C0107", "TX"),
            ("C0108", "TX"),
            ("C0109", "TX"),
            ("C0110", "RL"),
            ("C0111", "RQ"),
            ("C0112", "GA"),
            ("C0127", "GS"),
            ("E0404", "PS"),
            ("E0406", "PS"),
        ];
        Departments {
            fallback: "CGJ".into(),
            list,
            responsibility: owners
                .into_iter()
                .map(|(class, d)| Responsibility {
                    class: class.into(),
                    area: String::new(),
                    department: d.into(),
                })
                .collect(),
        }
    }
}

impl Departments {
    /// The department responsible for `class_code` at `grid_code`: the entry for the class
    /// with the longest area prefixing the grid code (an entry without area matches
    /// everywhere), else the fallback.
    pub fn responsible(&self, class_code: &str, grid_code: Option<&str>) -> &str {
        self.responsibility
            .iter()
            .filter(|r| r.class == class_code)
            .filter(|r| r.area.is_empty() || grid_code.is_some_and(|g| g.starts_with(&r.area)))
            .max_by_key(|r| r.area.len())
            .map_or(self.fallback.as_str(), |r| r.department.as_str())
    }

    /// The handling limit of `class_code` at `department`: its own, else `default`.
    pub fn limit(&self, department: &str, class_code: &str, default: Limit) -> Limit {
        self.list.get(department).and_then(|d| d.limits.get(class_code)).copied().unwrap_or(default)
    }

    /// Checks codes and references (`what` names a bad entry).
    pub fn validate(&self) -> Result<(), String> {
        if !self.list.contains_key(&self.fallback) {
            return Err(format!(
                "departments.fallback: {:?} is not in departments.list",
                self.fallback
            ));
        }
        for (code, d) in &self.list {
            if code.trim().is_empty() || d.name.trim().is_empty() {
                return Err(format!(
                    "departments.list.{code:?}: a department needs a code and a name"
                ));
            }
            for class in d.limits.keys() {
                if !super::is_class_code(class) {
                    return Err(format!(
                        "departments.list.{code}.limits.{class}: a class code is C or E and four digits"
                    ));
                }
            }
            if !d.webhook.is_empty()
                && !d.webhook.starts_with("http://")
                && !d.webhook.starts_with("https://")
            {
                return Err(format!(
                    "departments.list.{code}.webhook: {:?} is not an http(s) URL",
                    d.webhook
                ));
            }
        }
        for (i, r) in self.responsibility.iter().enumerate() {
            if !super::is_class_code(&r.class) {
                return Err(format!(
                    "departments.responsibility[{i}].class: {:?} is not a class code (C or E and four digits)",
                    r.class
                ));
            }
            if !r.area.chars().all(|c| c.is_ascii_digit()) {
                return Err(format!(
                    "departments.responsibility[{i}].area: {:?} is not an area code (digits)",
                    r.area
                ));
            }
            if !self.list.contains_key(&r.department) {
                return Err(format!(
                    "departments.responsibility[{i}].department: {:?} is not in departments.list",
                    r.department
                ));
            }
        }
        Ok(())
    }
}

/// How the handling level of a new case is chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LevelRules {
    /// The level of a case no other rule lifts.
    pub default: Level,
    /// Class code → its lowest level.
    pub classes: BTreeMap<String, Level>,
    /// The lowest level of a critical case.
    pub critical: Level,
    /// A case whose incident cluster has this many members (or more) goes to the street.
    pub cluster_street: u32,
    /// … and with this many, to the district.
    pub cluster_district: u32,
    /// Level → a URL escalations to that level are announced to (signed like the platform
    /// webhook); a level not listed: the event stream and the trace only.
    pub webhooks: BTreeMap<Level, String>,
}

impl Default for LevelRules {
    /// Community by default; road ponding (E0406, traffic affected) at least the street;
    /// critical cases at least the street; a cluster of 3 wells the street, of 10 the district.
    fn default() -> Self {
        LevelRules {
            default: Level::Community,
            classes: [("E0406".to_owned(), Level::Street)].into_iter().collect(),
            critical: Level::Street,
            cluster_street: 3,
            cluster_district: 10,
            webhooks: BTreeMap::new(),
        }
    }
}

impl LevelRules {
    /// The level of a new case of `class_code` at `severity` whose incident's cluster has
    /// `cluster_size` members: the highest level any rule asks for.
    pub fn level(&self, class_code: &str, severity: Severity, cluster_size: u32) -> Level {
        let mut level = self.default;
        if let Some(l) = self.classes.get(class_code) {
            level = level.max(*l);
        }
        if severity == Severity::Critical {
            level = level.max(self.critical);
        }
        if cluster_size >= self.cluster_district {
            level = Level::District;
        } else if cluster_size >= self.cluster_street {
            level = level.max(Level::Street);
        }
        level
    }

    /// Checks the rule's numbers and codes.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_street == 0 || self.cluster_district < self.cluster_street {
            return Err(format!(
                "levels: cluster_street ({}) must be at least 1 and cluster_district ({}) at least cluster_street",
                self.cluster_street, self.cluster_district
            ));
        }
        for class in self.classes.keys() {
            if !super::is_class_code(class) {
                return Err(format!(
                    "levels.classes.{class}: a class code is C or E and four digits"
                ));
            }
        }
        Ok(())
    }
}

/// What supervision escalates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationRules {
    /// The timers whose going red escalates: `deploy` (130 "1 day"), `feedback` ("3 days"),
    /// `handling` (the handling limit).
    pub on_red: Vec<String>,
    /// A case returned this many times escalates (0: never).
    pub returns: u32,
}

impl Default for EscalationRules {
    fn default() -> Self {
        EscalationRules {
            on_red: vec!["deploy".into(), "feedback".into(), "handling".into()],
            returns: 2,
        }
    }
}

impl EscalationRules {
    /// Checks the timer names.
    pub fn validate(&self) -> Result<(), String> {
        for t in &self.on_red {
            if !["deploy", "feedback", "handling"].contains(&t.as_str()) {
                return Err(format!(
                    "escalation.on_red: {t:?} is not a timer (deploy, feedback, handling)"
                ));
            }
        }
        Ok(())
    }
}

/// Why a case escalated: a timer that went red (`deploy`, `feedback`, `handling`) or
/// `returned` (returned as often as the rules allow). Each cause escalates a case once.
pub type Cause = &'static str;

/// The cause of returns.
pub const RETURNED: Cause = "returned";

/// An escalation supervision decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    /// The level before.
    pub from: Level,
    /// The level after (the same at the district: listed for supervision, no higher level).
    pub to: Level,
    /// The causes that fired now (timers in order, then `returned`).
    pub causes: Vec<Cause>,
}

/// What supervision needs to know of one case.
#[derive(Debug, Clone, Copy)]
pub struct Supervised<'a> {
    /// Its clocks as stored.
    pub clocks: Clocks<'a>,
    /// Whether it is finished (closed or voided): nothing escalates then.
    pub finished: bool,
    /// Its current level.
    pub level: Level,
    /// Times returned.
    pub returns: u32,
    /// Causes that escalated it already (comma-separated, as stored).
    pub escalated: &'a str,
}

/// Decides whether a case escalates at `now`: causes that fire and have not fired before. One
/// step up per call, whatever the number of causes (each is then recorded as done).
pub fn escalation(
    rules: &EscalationRules,
    case: &Supervised<'_>,
    milestones: &Milestones,
    cal: &Calendar,
    now: i64,
) -> Option<Escalation> {
    if case.finished {
        return None;
    }
    let done = |c: &str| case.escalated.split(',').any(|d| d == c);
    let mut causes: Vec<Cause> = lifecycle::overdue(&case.clocks, milestones, cal, now)
        .into_iter()
        .filter(|s| rules.on_red.iter().any(|r| r == s) && !done(s))
        .collect();
    if rules.returns > 0 && case.returns >= rules.returns && !done(RETURNED) {
        causes.push(RETURNED);
    }
    if causes.is_empty() {
        return None;
    }
    Some(Escalation { from: case.level, to: case.level.up().unwrap_or(case.level), causes })
}

/// The stored list of causes after `e`.
pub fn escalated_after(before: &str, e: &Escalation) -> String {
    let mut all: Vec<&str> = before.split(',').filter(|s| !s.is_empty()).collect();
    all.extend(e.causes.iter().copied());
    all.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::CalendarConfig;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn the_owner_of_the_cover_and_the_most_specific_area_are_responsible() {
        let mut d = Departments::default();
        assert_eq!(d.responsible("C0111", Some("210202001001001")), "RQ", "gas cover");
        assert_eq!(d.responsible("C0102", None), "PS", "sewage cover");
        assert_eq!(d.responsible("E0404", Some("210202001001001")), "PS", "blocked sewer");
        assert_eq!(d.responsible("C0114", Some("210202001001001")), "CGJ", "owner unknown");
        assert_eq!(d.responsible("C0199", None), "CGJ", "unlisted class");
        d.list.insert(
            "PS2".into(),
            Department {
                name: "北片排水所".into(),
                level: Level::Street,
                contact: String::new(),
                webhook: String::new(),
                limits: [("E0404".to_owned(), Limit::Hours(24))].into_iter().collect(),
            },
        );
        d.responsibility.push(Responsibility {
            class: "E0404".into(),
            area: "210202001".into(),
            department: "PS2".into(),
        });
        assert_eq!(d.responsible("E0404", Some("210202001001001")), "PS2");
        assert_eq!(d.responsible("E0404", Some("210202002001001")), "PS");
        assert_eq!(d.limit("PS2", "E0404", Limit::Hours(72)), Limit::Hours(24));
        assert_eq!(d.limit("PS", "E0404", Limit::Hours(72)), Limit::Hours(72));
        d.validate().expect("valid");
    }

    #[test]
    fn bad_departments_are_named() {
        let mut d = Departments::default();
        d.responsibility[0].department = "NOPE".into();
        let e = d.validate().expect_err("unknown department");
        assert!(e.contains("responsibility[0].department") && e.contains("NOPE"), "{e}");
        let mut d = Departments { fallback: "X".into(), ..Departments::default() };
        assert!(d.validate().expect_err("fallback").contains("fallback"));
        d.fallback = "CGJ".into();
        d.responsibility[1].class = "0102".into();
        assert!(d.validate().expect_err("class").contains("responsibility[1].class"));
        let bad = LevelRules { cluster_street: 5, cluster_district: 2, ..LevelRules::default() };
        assert!(bad.validate().expect_err("levels").contains("cluster_district"));
        let bad = EscalationRules { on_red: vec!["lunch".into()], returns: 2 };
        assert!(bad.validate().expect_err("timer").contains("lunch"));
    }

    #[test]
    fn the_level_follows_class_severity_and_cluster_size() {
        let r = LevelRules::default();
        assert_eq!(r.level("C0102", Severity::Major, 1), Level::Community);
        assert_eq!(r.level("E0406", Severity::Major, 1), Level::Street);
        assert_eq!(r.level("C0102", Severity::Critical, 1), Level::Street);
        assert_eq!(r.level("E0404", Severity::Major, 3), Level::Street);
        assert_eq!(r.level("E0404", Severity::Major, 10), Level::District);
        assert_eq!(Level::Community.up(), Some(Level::Street));
        assert_eq!(Level::District.up(), None);
    }

    fn calendar() -> Calendar {
        Calendar::new(&CalendarConfig::default()).expect("default calendar")
    }

    #[test]
    fn a_red_timer_escalates_once_and_two_returns_escalate_again() {
        let cal = calendar();
        let milestones = Milestones { deploy: Limit::Hours(24), feedback: Limit::Hours(72) };
        let clocks = Clocks {
            detected_ms: 0,
            handling_limit: "4h",
            deploy_due_ms: 24 * HOUR,
            feedback_due_ms: 72 * HOUR,
            handling_due_ms: 6 * HOUR,
            dispatched_ms: Some(2 * HOUR),
            ..Clocks::default()
        };
        let rules = EscalationRules::default();
        let case = Supervised {
            clocks,
            finished: false,
            level: Level::Community,
            returns: 0,
            escalated: "",
        };
        // Yellow at 5.5 h of a 4 h limit from 2 h: not yet.
        assert_eq!(escalation(&rules, &case, &milestones, &cal, 5 * HOUR + HOUR / 2), None);
        let e = escalation(&rules, &case, &milestones, &cal, 7 * HOUR).expect("handling red");
        assert_eq!(
            (e.from, e.to, e.causes.clone()),
            (Level::Community, Level::Street, vec!["handling"])
        );
        let after = escalated_after("", &e);
        assert_eq!(after, "handling");
        let case = Supervised { level: Level::Street, escalated: &after, ..case };
        assert_eq!(escalation(&rules, &case, &milestones, &cal, 8 * HOUR), None, "once per cause");
        let returned = Supervised { returns: 2, ..case };
        let e = escalation(&rules, &returned, &milestones, &cal, 8 * HOUR).expect("returns");
        assert_eq!((e.to, e.causes), (Level::District, vec![RETURNED]));
        // At the district it stays there, listed for supervision; a finished case never.
        let top = Supervised { level: Level::District, escalated: "", ..case };
        let e = escalation(&rules, &top, &milestones, &cal, 25 * HOUR).expect("handling red");
        assert_eq!((e.to, e.causes), (Level::District, vec!["handling"]));
        let done = Supervised { finished: true, ..top };
        assert_eq!(escalation(&rules, &done, &milestones, &cal, 100 * HOUR), None);
        // The deploy step went red before the dispatch (at 2 h of 24 h, no): an undispatched
        // case 25 h old has a red deploy timer.
        let undispatched = Supervised {
            clocks: Clocks { dispatched_ms: None, handling_due_ms: 4 * HOUR, ..clocks },
            level: Level::Community,
            escalated: "",
            ..case
        };
        let e = escalation(&rules, &undispatched, &milestones, &cal, 25 * HOUR).expect("red");
        assert_eq!(e.causes, vec!["deploy", "handling"]);
    }
}
