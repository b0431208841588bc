//! Alarm rules: per device-kind profiles (TOML, with per-device overrides) evaluated on every
//! observation **and** on timers, with persisted state. Pure: `now` is passed in, and what
//! changes comes out as [`ConditionChange`]s for the incident layer ([`crate::cases`]).
//!
//! An accepted message becomes [`Observation`]s of named [`Signal`]s at the device's sample
//! time (its *event time*). A value holds until the next observation of the same signal
//! (sample-and-hold). Rules:
//!
//! - **threshold**: a ladder of levels, each `above` or `below` a bound (a number, or a device
//!   attribute such as the well's `warn_mm`), with its own `clear` point (hysteresis) and
//!   `hold_s` ("held for"). A level with a hold fires when the hold elapses — on a timer at
//!   the gateway (arrival + hold), or at once if observations already span the hold in event
//!   time (a backlog after an outage). Escalates and de-escalates along the ladder. Offline
//!   (`signal = "online"`, below 0.5) and low battery (`battery_mv` below a level) are
//!   thresholds too.
//! - **repeating**: `count` upward crossings of a bound within `window_s`; clears when a whole
//!   window passes without one.
//! - **rate**: the rate of change per hour, above a bound, measured over at least `span_s`
//!   (default 300 s) so that a sensor sampled every second does not turn millimetres of noise
//!   into metres per hour.
//! - **stuck**: the value has not moved by more than `tolerance` for `for_s` while readings keep
//!   arriving.
//!
//! Several rules may feed one *condition* (e.g. tilt and the open switch both mean
//! `cover_displaced`): the condition's severity is the highest of its active rules, and one
//! [`ConditionChange`] is emitted whenever it changes. The incident layer keeps one incident
//! per (device, condition).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gridsense_protocol::{AlarmKind, DeviceTime, Eui, Sample, SwitchState, Uplink};
use serde::{Deserialize, Serialize};

use crate::registry::{Device, DeviceId, Kind};

/// How serious a condition is; ordered.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth recording (maintenance).
    #[default]
    Minor,
    /// A problem to handle.
    Major,
    /// A danger to handle at once.
    Critical,
}

impl Severity {
    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }

    /// From the stable name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minor" => Some(Severity::Minor),
            "major" => Some(Severity::Major),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// A named quantity observed from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Tilt of a routine cover reading, degrees (a point sample: a passing vehicle shows here).
    TiltDeg,
    /// Tilt as the device's debounced alarm state reports it, degrees: the alarm's value while
    /// a tilt or removed alarm is raised, the recovery value when it clears.
    AlarmTiltDeg,
    /// The cover's open switch: 1 open, 0 closed (readings and the device's open alarm).
    SwitchOpen,
    /// Water under the cover, mm.
    WaterMm,
    /// Drain level, mm above the well floor.
    LevelMm,
    /// Drain level rate as the device reports it, mm/h.
    RateMmH,
    /// Battery voltage, mV.
    BatteryMv,
    /// A sensor fault code reported by the device (0 when cleared).
    Fault,
    /// 1 online, 0 offline (from the gateway's health tracking).
    Online,
}

impl Signal {
    /// Stable name (as in the rules file).
    pub const fn as_str(self) -> &'static str {
        match self {
            Signal::TiltDeg => "tilt_deg",
            Signal::AlarmTiltDeg => "alarm_tilt_deg",
            Signal::SwitchOpen => "switch_open",
            Signal::WaterMm => "water_mm",
            Signal::LevelMm => "level_mm",
            Signal::RateMmH => "rate_mm_h",
            Signal::BatteryMv => "battery_mv",
            Signal::Fault => "fault",
            Signal::Online => "online",
        }
    }

    /// The unit shown in evidence.
    pub const fn unit(self) -> &'static str {
        match self {
            Signal::TiltDeg | Signal::AlarmTiltDeg => "°",
            Signal::WaterMm | Signal::LevelMm => "mm",
            Signal::RateMmH => "mm/h",
            Signal::BatteryMv => "mV",
            Signal::SwitchOpen | Signal::Fault | Signal::Online => "",
        }
    }
}

/// One observed value at its event time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// What was observed.
    pub signal: Signal,
    /// The value, in the signal's unit.
    pub value: f64,
    /// Event time (the device's sample time), Unix ms.
    pub at_ms: i64,
}

/// Unix ms of a device time.
pub fn device_ms(at: DeviceTime) -> i64 {
    i64::try_from(at.unix_secs().saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn sample(at: DeviceTime, s: &Sample, out: &mut Vec<Observation>) {
    let at_ms = device_ms(at);
    let mut push = |signal, value| out.push(Observation { signal, value, at_ms });
    match s {
        Sample::Cover(c) => {
            push(Signal::TiltDeg, f64::from(c.tilt_ddeg) / 10.0);
            match c.switch {
                SwitchState::Absent => {}
                SwitchState::Closed => push(Signal::SwitchOpen, 0.0),
                SwitchState::Open => push(Signal::SwitchOpen, 1.0),
            }
            if let Some(w) = c.water_mm {
                push(Signal::WaterMm, f64::from(w));
            }
        }
        Sample::Drain(d) => {
            push(Signal::LevelMm, f64::from(d.level_mm));
            push(Signal::RateMmH, f64::from(d.rate_mm_h));
        }
        Sample::Fix(_) => {}
    }
}

fn alarm_value(kind: AlarmKind, value: i32, raised: bool) -> (Signal, f64) {
    let v = f64::from(value);
    match kind {
        AlarmKind::CoverTilt | AlarmKind::CoverRemoved => (Signal::AlarmTiltDeg, v / 10.0),
        AlarmKind::CoverOpen => (Signal::SwitchOpen, if raised { 1.0 } else { 0.0 }),
        AlarmKind::CoverWater => (Signal::WaterMm, v),
        AlarmKind::DrainWarning | AlarmKind::DrainAlarm => (Signal::LevelMm, v),
        AlarmKind::LowBattery => (Signal::BatteryMv, v),
        AlarmKind::SensorFault => (Signal::Fault, if raised { v.max(1.0) } else { 0.0 }),
    }
}

/// The observations an accepted message carries, in event-time order.
pub fn observations(message: &Uplink, out: &mut Vec<Observation>) {
    match message {
        Uplink::CoverReading { at, sample: s } => sample(*at, &Sample::Cover(*s), out),
        Uplink::DrainReading { at, sample: s } => sample(*at, &Sample::Drain(*s), out),
        Uplink::Backlog(b) => {
            for (at, s) in b.timed() {
                sample(at, &s, out);
            }
        }
        Uplink::Status(s) => out.push(Observation {
            signal: Signal::BatteryMv,
            value: f64::from(s.battery_mv),
            at_ms: device_ms(s.at),
        }),
        Uplink::AlarmRaised(a) => {
            let (signal, value) = alarm_value(a.kind, a.value, true);
            out.push(Observation { signal, value, at_ms: device_ms(a.since) });
        }
        Uplink::AlarmCleared(a) => {
            let (signal, value) = alarm_value(a.kind, a.value, false);
            out.push(Observation { signal, value, at_ms: device_ms(a.at) });
        }
        Uplink::PatrolFix { .. }
        | Uplink::CheckIn(_)
        | Uplink::IncidentReport(_)
        | Uplink::Sos(_)
        | Uplink::DownlinkAck(_) => {}
    }
}

/// A threshold: a number, or the name of a device attribute (`warn_mm`, `alarm_mm`,
/// `well_depth_mm`) for per-device limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Bound {
    /// A fixed value in the signal's unit.
    Value(f64),
    /// A device attribute, optionally offset (`"alarm_mm - 100"` is written as
    /// `{ attr = "alarm_mm", offset = -100 }`).
    Attr {
        /// Attribute name.
        attr: String,
        /// Added to the attribute.
        #[serde(default)]
        offset: f64,
    },
    /// A device attribute by name.
    Name(String),
}

/// Attribute names a [`Bound`] may use.
pub const ATTRIBUTES: [&str; 3] = ["warn_mm", "alarm_mm", "well_depth_mm"];

impl Bound {
    fn resolve(&self, attrs: &Attributes) -> Option<f64> {
        match self {
            Bound::Value(v) => Some(*v),
            Bound::Attr { attr, offset } => attrs.get(attr).map(|v| v + offset),
            Bound::Name(attr) => attrs.get(attr),
        }
    }

    fn attr(&self) -> Option<&str> {
        match self {
            Bound::Value(_) => None,
            Bound::Attr { attr, .. } | Bound::Name(attr) => Some(attr),
        }
    }
}

/// A device's attributes that rules can refer to.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Attributes {
    /// Drain warning level, mm.
    pub warn_mm: Option<f64>,
    /// Drain alarm level, mm.
    pub alarm_mm: Option<f64>,
    /// Well depth, mm.
    pub well_depth_mm: Option<f64>,
}

impl Attributes {
    fn get(&self, name: &str) -> Option<f64> {
        match name {
            "warn_mm" => self.warn_mm,
            "alarm_mm" => self.alarm_mm,
            "well_depth_mm" => self.well_depth_mm,
            _ => None,
        }
    }
}

/// One step of a threshold ladder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Level {
    /// Severity while this level is active.
    pub severity: Severity,
    /// Active when the value is above this …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<Bound>,
    /// … or below this (exactly one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<Bound>,
    /// Leaves the level when the value is back past this point (hysteresis); default: the
    /// threshold itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<Bound>,
    /// The condition must hold this long before the level is entered, s.
    #[serde(default)]
    pub hold_s: u64,
}

fn default_rate_span_s() -> u64 {
    300
}

/// What a rule tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Test {
    /// A ladder of thresholds, lowest severity first.
    Threshold {
        /// The ladder.
        levels: Vec<Level>,
    },
    /// `count` upward crossings of `above` within `window_s`.
    Repeating {
        /// The crossing point.
        above: Bound,
        /// Crossings needed.
        count: u32,
        /// Window, s.
        window_s: u64,
        /// Severity when active.
        severity: Severity,
    },
    /// Rate of change per hour above `above_per_h`, between an observation and the first later
    /// one at least `span_s` after it (use `falling = true` for drops).
    Rate {
        /// Rate that raises, signal unit per hour.
        above_per_h: f64,
        /// Shortest span a rate is measured over, s (default 300: a drain's routine report
        /// interval). Observations in between are not compared with each other.
        #[serde(default = "default_rate_span_s")]
        span_s: u64,
        /// Rate below which it clears; default half the raising rate.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clear_per_h: Option<f64>,
        /// Look at falling values instead of rising ones.
        #[serde(default)]
        falling: bool,
        /// Severity when active.
        severity: Severity,
    },
    /// The value has not changed by more than `tolerance` for `for_s`.
    Stuck {
        /// Largest change still counted as "not moving".
        #[serde(default)]
        tolerance: f64,
        /// How long, s.
        for_s: u64,
        /// Severity when active.
        severity: Severity,
    },
}

/// One rule of a profile.
// No `deny_unknown_fields` here (serde cannot combine it with `flatten`); [`Test`] denies
// them, and it receives every key not taken here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleSpec {
    /// The condition this rule reports (one incident per device and condition).
    pub condition: String,
    /// What it watches.
    pub signal: Signal,
    /// How.
    #[serde(flatten)]
    pub test: Test,
}

impl RuleSpec {
    /// Identifies the rule within a profile (persisted rule state is keyed by it).
    pub fn id(&self) -> String {
        let kind = match self.test {
            Test::Threshold { .. } => "threshold",
            Test::Repeating { .. } => "repeating",
            Test::Rate { .. } => "rate",
            Test::Stuck { .. } => "stuck",
        };
        format!("{}/{}/{kind}", self.condition, self.signal.as_str())
    }
}

/// Per-device replacement of profile rules: rules with the same id are replaced (or removed
/// with `disabled = true`), others added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// Device EUIs (16 hex digits) this applies to.
    pub devices: Vec<String>,
    /// Remove the rule instead of replacing it.
    #[serde(default)]
    pub disabled: bool,
    /// The rule.
    #[serde(flatten)]
    pub rule: RuleSpec,
}

/// The rules file: one profile per device kind, and overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Manhole covers.
    pub cover: Vec<RuleSpec>,
    /// Drainage sensors.
    pub drain: Vec<RuleSpec>,
    /// Patrol beacons.
    pub beacon: Vec<RuleSpec>,
    /// Per-device overrides.
    #[serde(rename = "override")]
    pub overrides: Vec<Override>,
}

fn threshold(condition: &str, signal: Signal, levels: Vec<Level>) -> RuleSpec {
    RuleSpec { condition: condition.into(), signal, test: Test::Threshold { levels } }
}

fn above(severity: Severity, at: Bound, clear: Bound, hold_s: u64) -> Level {
    Level { severity, above: Some(at), below: None, clear: Some(clear), hold_s }
}

fn below(severity: Severity, at: Bound, clear: Bound, hold_s: u64) -> Level {
    Level { severity, above: None, below: Some(at), clear: Some(clear), hold_s }
}

fn attr(name: &str, offset: f64) -> Bound {
    Bound::Attr { attr: name.into(), offset }
}

fn device_rules(low_battery_mv: u16) -> Vec<RuleSpec> {
    use Bound::Value as V;
    // The same level and hysteresis as the device's health (one source: `[health]
    // low_battery_mv` and `health::BATTERY_HYSTERESIS_MV`).
    let low = f64::from(low_battery_mv);
    let clear = low + f64::from(crate::health::BATTERY_HYSTERESIS_MV);
    vec![
        threshold(
            "low_battery",
            Signal::BatteryMv,
            vec![below(Severity::Minor, V(low), V(clear), 0)],
        ),
        threshold(
            "device_offline",
            Signal::Online,
            vec![below(Severity::Minor, V(0.5), V(0.5), 0)],
        ),
        threshold("sensor_fault", Signal::Fault, vec![above(Severity::Minor, V(0.5), V(0.5), 0)]),
    ]
}

impl Default for RulesConfig {
    /// The built-in rules with the default low-battery level ([`RulesConfig::built_in`]).
    fn default() -> Self {
        Self::built_in(crate::health::DEFAULT_LOW_BATTERY_MV)
    }
}

impl RulesConfig {
    /// DOMAIN.md's defaults, low battery at `low_battery_mv` (`[health] low_battery_mv`, so a
    /// device's health and its incidents agree). Covers: the device debounces a tilt for 2 s; the gateway holds it
    /// another 10 s (a tilt alarm that clears sooner is a vehicle or a worker's foot); above
    /// 90° (flipped or removed) and an open switch are critical/major at once. A cover that
    /// tilts three times in an hour is loose. Drains: warning and alarm at each well's own
    /// levels with 100 mm hysteresis, a level rising faster than 1.5 m/h as an early minor
    /// level, a level that does not move for a week as a stuck sensor. Every kind: low battery,
    /// offline, sensor fault (device maintenance, recorded but filed as no case by default).
    pub fn built_in(low_battery_mv: u16) -> Self {
        use Bound::Value as V;
        let mut cover = vec![
            threshold(
                "cover_displaced",
                Signal::AlarmTiltDeg,
                vec![
                    above(Severity::Major, V(10.0), V(8.0), 10),
                    above(Severity::Critical, V(90.0), V(80.0), 0),
                ],
            ),
            threshold(
                "cover_displaced",
                Signal::SwitchOpen,
                vec![above(Severity::Major, V(0.5), V(0.5), 0)],
            ),
            RuleSpec {
                condition: "cover_loose".into(),
                signal: Signal::AlarmTiltDeg,
                test: Test::Repeating {
                    above: V(10.0),
                    count: 3,
                    window_s: 3_600,
                    severity: Severity::Minor,
                },
            },
            threshold(
                "cover_water",
                Signal::WaterMm,
                vec![above(Severity::Major, V(300.0), V(250.0), 60)],
            ),
        ];
        cover.extend(device_rules(low_battery_mv));
        let mut drain = vec![
            threshold(
                "drain_overflow",
                Signal::LevelMm,
                vec![
                    above(Severity::Major, attr("warn_mm", 0.0), attr("warn_mm", -100.0), 0),
                    above(Severity::Critical, attr("alarm_mm", 0.0), attr("alarm_mm", -100.0), 0),
                ],
            ),
            RuleSpec {
                condition: "drain_overflow".into(),
                signal: Signal::LevelMm,
                test: Test::Rate {
                    above_per_h: 1_500.0,
                    span_s: default_rate_span_s(),
                    clear_per_h: Some(300.0),
                    falling: false,
                    severity: Severity::Minor,
                },
            },
            RuleSpec {
                condition: "sensor_stuck".into(),
                signal: Signal::LevelMm,
                test: Test::Stuck { tolerance: 0.0, for_s: 7 * 86_400, severity: Severity::Minor },
            },
        ];
        drain.extend(device_rules(low_battery_mv));
        RulesConfig { cover, drain, beacon: device_rules(low_battery_mv), overrides: Vec::new() }
    }
}

/// A rules file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("rules file {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML for the rules schema.
    #[error("rules file {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// What was wrong, with the key.
        message: String,
    },
    /// A rule is inconsistent.
    #[error("rule {rule}: {problem}")]
    Invalid {
        /// The rule's id (or the override's device).
        rule: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(rule: &RuleSpec, problem: impl Into<String>) -> RulesError {
    RulesError::Invalid { rule: rule.id(), problem: problem.into() }
}

fn check_bound(rule: &RuleSpec, b: &Bound) -> Result<(), RulesError> {
    match b {
        Bound::Value(v) if !v.is_finite() => Err(invalid(rule, "a bound is not a finite number")),
        _ => match b.attr() {
            Some(a) if !ATTRIBUTES.contains(&a) => Err(invalid(
                rule,
                format!("unknown device attribute {a:?} (known: {})", ATTRIBUTES.join(", ")),
            )),
            _ => Ok(()),
        },
    }
}

fn check(rule: &RuleSpec) -> Result<(), RulesError> {
    if rule.condition.is_empty()
        || !rule.condition.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(invalid(rule, "condition must be lowercase letters, digits and _"));
    }
    match &rule.test {
        Test::Threshold { levels } => {
            if levels.is_empty() {
                return Err(invalid(rule, "a threshold needs at least one level"));
            }
            if levels.len() > usize::from(u8::MAX) {
                return Err(invalid(rule, "too many levels"));
            }
            for l in levels {
                let Some(b) = l.above.as_ref().xor(l.below.as_ref()) else {
                    return Err(invalid(rule, "each level needs exactly one of above/below"));
                };
                check_bound(rule, b)?;
                if let Some(c) = &l.clear {
                    check_bound(rule, c)?;
                }
            }
            if levels.windows(2).any(|w| matches!(w, [a, b] if a.severity > b.severity)) {
                return Err(invalid(rule, "levels must go from lowest to highest severity"));
            }
        }
        Test::Repeating { above, count, window_s, .. } => {
            check_bound(rule, above)?;
            if *count == 0 || *window_s == 0 {
                return Err(invalid(rule, "count and window_s must be above 0"));
            }
        }
        Test::Rate { above_per_h, clear_per_h, .. } => {
            if !above_per_h.is_finite() || *above_per_h <= 0.0 {
                return Err(invalid(rule, "above_per_h must be a positive number"));
            }
            if clear_per_h.is_some_and(|c| !c.is_finite() || c > *above_per_h) {
                return Err(invalid(rule, "clear_per_h must not exceed above_per_h"));
            }
        }
        Test::Stuck { tolerance, for_s, .. } => {
            if !tolerance.is_finite() || *tolerance < 0.0 || *for_s == 0 {
                return Err(invalid(rule, "stuck needs tolerance ≥ 0 and for_s > 0"));
            }
        }
    }
    Ok(())
}

impl RulesConfig {
    /// Reads a rules file; every rule is checked.
    pub fn load(path: &std::path::Path) -> Result<Self, RulesError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| RulesError::Read { path: shown.clone(), source })?;
        Self::parse(&text, &shown)
    }

    /// Parses and checks rules TOML (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self, RulesError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| RulesError::Parse { path: origin.into(), message: e.to_string() })?;
        let config: RulesConfig =
            serde_path_to_error::deserialize(de).map_err(|e| RulesError::Parse {
                path: origin.into(),
                message: format!("{}: {}", e.path(), e.inner()),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule; ids must be unique within a profile.
    pub fn validate(&self) -> Result<(), RulesError> {
        for profile in [&self.cover, &self.drain, &self.beacon] {
            let mut ids = BTreeSet::new();
            for rule in profile {
                check(rule)?;
                if !ids.insert(rule.id()) {
                    return Err(invalid(
                        rule,
                        "two rules with the same condition, signal and type",
                    ));
                }
            }
        }
        for o in &self.overrides {
            check(&o.rule)?;
            for d in &o.devices {
                d.parse::<Eui>().map_err(|_| RulesError::Invalid {
                    rule: o.rule.id(),
                    problem: format!("override device {d:?} is not a 16-hex-digit EUI"),
                })?;
            }
        }
        Ok(())
    }

    fn profile(&self, kind: Kind) -> &[RuleSpec] {
        match kind {
            Kind::Cover => &self.cover,
            Kind::Drain => &self.drain,
            Kind::Beacon => &self.beacon,
        }
    }
}

/// A condition's severity changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionChange {
    /// Device.
    pub eui: Eui,
    /// Condition.
    pub condition: String,
    /// Severity before (`None`: was clear).
    pub from: Option<Severity>,
    /// Severity now (`None`: cleared).
    pub to: Option<Severity>,
    /// When the condition began (event time), Unix ms.
    pub onset_ms: i64,
    /// Event time of the change, Unix ms (for a timer: when the hold elapsed).
    pub at_ms: i64,
    /// Gateway time of the decision, Unix ms.
    pub decided_ms: i64,
    /// What the deciding rule saw.
    pub evidence: Evidence,
}

impl ConditionChange {
    /// Raised from clear.
    pub fn is_raise(&self) -> bool {
        self.from.is_none() && self.to.is_some()
    }
}

/// The reading behind a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Rule id.
    pub rule: String,
    /// Signal.
    pub signal: Signal,
    /// The value that decided.
    pub value: f64,
    /// The bound it was compared with.
    pub threshold: Option<f64>,
    /// The hold the rule required, s.
    pub hold_s: u64,
    /// How long the condition had held, s.
    pub held_s: f64,
}

/// One rule's state for one device; persisted as JSON, so a half-elapsed hold survives a
/// restart.
///
/// Kept small, since a drain has two always-present states (its rate and stuck rules' reference
/// readings) and a city has a million devices: 56 bytes, the rarely used parts (a running
/// hold, a repeating rule's crossings) boxed apart. The JSON keeps the field-per-part layout
/// ([`StoredRuleState`]), so states saved by earlier versions load unchanged.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(from = "StoredRuleState", into = "StoredRuleState")]
pub struct RuleState {
    /// Active level: 0 clear, n = the n-th level of the ladder (1 for single-level tests).
    pub level: u8,
    /// Event time the condition began.
    pub onset_ms: Option<i64>,
    /// The reference observation (value, event time): the last one for thresholds, rates and
    /// crossings; for stuck values, the one the value has not moved from since.
    pub last: Option<(f64, i64)>,
    /// A running hold and a repeating rule's crossings, when there are any.
    extra: Option<Box<Extra>>,
}

/// The parts of a [`RuleState`] few rules use at any time.
#[derive(Debug, Clone, PartialEq, Default)]
struct Extra {
    /// A level waiting for its hold: level, event time it began, gateway deadline.
    pending: Option<(u8, i64, i64)>,
    /// Repeating: event times of recent crossings; clears at the gateway deadline.
    crossings: Vec<i64>,
    /// Repeating: gateway time at which the rule clears if no crossing comes.
    quiet_deadline: Option<i64>,
}

/// [`RuleState`] as stored (JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredRuleState {
    #[serde(default)]
    level: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    onset_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<(u8, i64, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last: Option<(f64, i64)>,
    /// Written by versions that kept the stuck rule's reference apart; read into `last`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    steady: Option<(f64, i64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    crossings: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quiet_deadline: Option<i64>,
}

impl From<StoredRuleState> for RuleState {
    fn from(s: StoredRuleState) -> Self {
        let mut state = RuleState {
            level: s.level,
            onset_ms: s.onset_ms,
            last: s.last.or(s.steady),
            extra: None,
        };
        state.set_extra(|e| {
            e.pending = s.pending;
            e.crossings = s.crossings;
            e.quiet_deadline = s.quiet_deadline;
        });
        state
    }
}

impl From<RuleState> for StoredRuleState {
    fn from(s: RuleState) -> Self {
        let extra = s.extra.map(|e| *e).unwrap_or_default();
        StoredRuleState {
            level: s.level,
            onset_ms: s.onset_ms,
            pending: extra.pending,
            last: s.last,
            steady: None,
            crossings: extra.crossings,
            quiet_deadline: extra.quiet_deadline,
        }
    }
}

impl RuleState {
    fn is_idle(&self) -> bool {
        self.level == 0 && self.extra.is_none() && self.last.is_none()
    }

    fn deadline(&self) -> Option<i64> {
        match (self.pending().map(|p| p.2), self.quiet_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A level waiting for its hold: level, event time it began, gateway deadline.
    pub fn pending(&self) -> Option<(u8, i64, i64)> {
        self.extra.as_ref().and_then(|e| e.pending)
    }

    fn set_pending(&mut self, pending: Option<(u8, i64, i64)>) {
        self.set_extra(|e| e.pending = pending);
    }

    fn crossings(&self) -> &[i64] {
        self.extra.as_ref().map_or(&[], |e| e.crossings.as_slice())
    }

    fn quiet_deadline(&self) -> Option<i64> {
        self.extra.as_ref().and_then(|e| e.quiet_deadline)
    }

    /// Changes the boxed parts, allocating them when needed and freeing them when empty.
    fn set_extra(&mut self, change: impl FnOnce(&mut Extra)) {
        let mut extra = self.extra.take().unwrap_or_default();
        change(&mut extra);
        if *extra != Extra::default() {
            self.extra = Some(extra);
        }
    }
}

/// A rule resolved for one device.
#[derive(Debug, Clone)]
struct Rule {
    id: String,
    spec: RuleSpec,
}

/// A device as the rules see it.
#[derive(Debug, Clone)]
struct DeviceRules {
    rules: std::sync::Arc<[Rule]>,
    attrs: Attributes,
}

/// What the engine keeps per device, indexed by [`DeviceId`]: 56 bytes, plus its non-idle
/// rule states in one allocation (a reporting drain has two, its rate and stuck rules'
/// reference readings; a quiet cover none).
#[derive(Debug)]
struct Slot {
    eui: Eui,
    /// Index into [`Rules::sets`]; [`NO_SET`]: not known yet (the kind's profile).
    set: u32,
    /// `warn_mm`, `alarm_mm`, `well_depth_mm`; NaN: not set.
    attrs: [f64; 3],
    states: Option<Box<[Packed]>>,
}

const NO_SET: u32 = u32::MAX;

impl Slot {
    fn attributes(&self) -> Attributes {
        let get = |i: usize| self.attrs.get(i).copied().filter(|v| !v.is_nan());
        Attributes { warn_mm: get(0), alarm_mm: get(1), well_depth_mm: get(2) }
    }

    fn states(&self) -> &[Packed] {
        self.states.as_deref().unwrap_or_default()
    }

    fn state(&self, rule: u16) -> Option<&Packed> {
        self.states().iter().find(|p| p.rule == rule)
    }

    /// Moves a rule's state out (its place stays until [`Slot::put`]).
    fn take(&mut self, rule: u16) -> RuleState {
        let states = self.states.as_deref_mut().unwrap_or_default();
        states.iter_mut().find(|p| p.rule == rule).map(Packed::take).unwrap_or_default()
    }

    /// Puts a rule's state back: in place, or added, or removed when idle.
    fn put(&mut self, rule: u16, state: RuleState) {
        let states = self.states.as_deref_mut().unwrap_or_default();
        let found = states.iter_mut().find(|p| p.rule == rule);
        match (found, state.is_idle()) {
            (Some(p), false) => *p = Packed::new(rule, state),
            (None, true) => {}
            (_, idle) => {
                // Allocated at its exact size: a million of these should leave no slack.
                let old: Vec<Packed> = self.states.take().map(Vec::from).unwrap_or_default();
                let keep = old.iter().filter(|p| p.rule != rule).count();
                let mut v = Vec::with_capacity(keep + usize::from(!idle));
                v.extend(old.into_iter().filter(|p| p.rule != rule));
                if !idle {
                    v.push(Packed::new(rule, state));
                }
                self.states = (!v.is_empty()).then(|| v.into_boxed_slice());
            }
        }
    }
}

/// A [`RuleState`] as kept in memory: 40 bytes, `i64::MIN` standing for "none".
#[derive(Debug)]
struct Packed {
    rule: u16,
    level: u8,
    onset_ms: i64,
    last_value: f64,
    last_ms: i64,
    extra: Option<Box<Extra>>,
}

impl Packed {
    fn new(rule: u16, s: RuleState) -> Self {
        let (last_value, last_ms) = s.last.unwrap_or((0.0, i64::MIN));
        Packed {
            rule,
            level: s.level,
            onset_ms: s.onset_ms.unwrap_or(i64::MIN),
            last_value,
            last_ms,
            extra: s.extra,
        }
    }

    fn onset(&self) -> Option<i64> {
        (self.onset_ms != i64::MIN).then_some(self.onset_ms)
    }

    /// The state, with its boxed parts as given.
    fn with_extra(&self, extra: Option<Box<Extra>>) -> RuleState {
        RuleState {
            level: self.level,
            onset_ms: self.onset(),
            last: (self.last_ms != i64::MIN).then_some((self.last_value, self.last_ms)),
            extra,
        }
    }

    fn state(&self) -> RuleState {
        self.with_extra(self.extra.clone())
    }

    /// The state, its boxed parts moved out rather than copied.
    fn take(&mut self) -> RuleState {
        let extra = self.extra.take();
        self.with_extra(extra)
    }
}

/// The rule engine. Per device it keeps a 56-byte slot (its rule set, attributes and EUI)
/// and only the rule states that are not idle: the kind's profile is shared, and devices
/// with overrides get their own set.
#[derive(Debug)]
pub struct Rules {
    slots: Vec<Slot>,
    /// Rule sets: the three kinds' profiles, then one per device with overrides.
    sets: Vec<std::sync::Arc<[Rule]>>,
    /// (gateway deadline, device, rule)
    timers: BTreeSet<(i64, DeviceId, u16)>,
    /// States changed since the last [`Rules::take_dirty`]: device, rule.
    dirty: BTreeSet<(DeviceId, u16)>,
    overrides: HashMap<Eui, Vec<Override>>,
}

fn resolve(specs: &[RuleSpec]) -> std::sync::Arc<[Rule]> {
    specs.iter().map(|s| Rule { id: s.id(), spec: s.clone() }).collect()
}

/// The set of a kind's profile: the first [`Kind::ALL`]`.len()` sets are the profiles.
fn kind_index(kind: Kind) -> u32 {
    u32::try_from(kind.index()).unwrap_or(NO_SET)
}

/// Whether a set is a device's own (with overrides), not a kind's profile.
fn is_own(set: u32) -> bool {
    set != NO_SET && usize::try_from(set).is_ok_and(|s| s >= Kind::ALL.len())
}

impl Rules {
    /// An engine for a (validated) configuration.
    pub fn new(config: &RulesConfig) -> Self {
        let mut overrides: HashMap<Eui, Vec<Override>> = HashMap::new();
        for o in &config.overrides {
            for d in &o.devices {
                if let Ok(eui) = d.parse::<Eui>() {
                    overrides.entry(eui).or_default().push(o.clone());
                }
            }
        }
        Rules {
            slots: Vec::new(),
            sets: Kind::ALL.map(|k| resolve(config.profile(k))).into(),
            timers: BTreeSet::new(),
            dirty: BTreeSet::new(),
            overrides,
        }
    }

    /// Room for devices numbered below `n` without growing.
    pub fn reserve(&mut self, n: usize) {
        self.slots.reserve_exact(n.saturating_sub(self.slots.len()));
    }

    /// The device's slot, made when it has none; a slot without a set gets its kind's.
    fn slot_mut(&mut self, device: Device) -> Option<&mut Slot> {
        let i = device.id.index();
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || Slot {
                eui: Eui(0),
                set: NO_SET,
                attrs: [f64::NAN; 3],
                states: None,
            });
        }
        let slot = self.slots.get_mut(i)?;
        slot.eui = device.eui;
        if slot.set == NO_SET {
            slot.set = kind_index(device.kind);
        }
        Some(slot)
    }

    /// Registers a device with its kind and attributes; its rules are its kind's profile with
    /// its overrides applied.
    pub fn add_device(&mut self, device: Device, attrs: Attributes) {
        let custom = self.overrides.get(&device.eui).map(|overrides| {
            let profile = self.profile(kind_index(device.kind));
            let mut specs: Vec<RuleSpec> = profile.iter().map(|r| r.spec.clone()).collect();
            for o in overrides {
                let id = o.rule.id();
                specs.retain(|s| s.id() != id);
                if !o.disabled {
                    specs.push(o.rule.clone());
                }
            }
            resolve(&specs)
        });
        let next = u32::try_from(self.sets.len()).unwrap_or(NO_SET);
        let Some(slot) = self.slot_mut(device) else { return };
        let own = is_own(slot.set);
        slot.attrs =
            [attrs.warn_mm, attrs.alarm_mm, attrs.well_depth_mm].map(|v| v.unwrap_or(f64::NAN));
        match custom {
            None => slot.set = kind_index(device.kind),
            // A device re-added keeps its place in `sets`.
            Some(rules) if own => {
                let set = slot.set;
                if let Some(s) = usize::try_from(set).ok().and_then(|s| self.sets.get_mut(s)) {
                    *s = rules;
                }
            }
            Some(rules) => {
                slot.set = next;
                self.sets.push(rules);
            }
        }
    }

    fn profile(&self, set: u32) -> std::sync::Arc<[Rule]> {
        let set = usize::try_from(set).ok().and_then(|s| self.sets.get(s));
        set.cloned().unwrap_or_else(|| resolve(&[]))
    }

    /// A device's rules and attributes.
    fn device(&self, device: Device) -> DeviceRules {
        match self.slots.get(device.id.index()).filter(|s| s.set != NO_SET) {
            Some(slot) => DeviceRules { rules: self.profile(slot.set), attrs: slot.attributes() },
            None => DeviceRules {
                rules: self.profile(kind_index(device.kind)),
                attrs: Attributes::default(),
            },
        }
    }

    /// Restores a persisted state (rule ids no longer configured are ignored).
    pub fn restore(&mut self, device: Device, rule_id: &str, state: RuleState) {
        let Some(index) = self.device(device).rules.iter().position(|r| r.id == rule_id) else {
            return;
        };
        let Ok(index) = u16::try_from(index) else { return };
        if let Some(d) = state.deadline() {
            self.timers.insert((d, device.id, index));
        }
        if let Some(slot) = self.slot_mut(device) {
            slot.put(index, state);
        }
    }

    /// Forgets the rule states and timers of the devices `gone` says (their shard went to
    /// another gateway instance); their rules and attributes stay.
    pub fn forget(&mut self, gone: &dyn Fn(Eui) -> bool) {
        let slots = &self.slots;
        let is_gone = |id: DeviceId| slots.get(id.index()).is_some_and(|s| gone(s.eui));
        self.timers.retain(|t| !is_gone(t.1));
        self.dirty.retain(|d| !is_gone(d.0));
        for slot in &mut self.slots {
            if slot.states.is_some() && gone(slot.eui) {
                slot.states = None;
            }
        }
    }

    /// The current severity of each of a device's active conditions.
    pub fn active(&self, device: Device) -> BTreeMap<String, Severity> {
        let mut out = BTreeMap::new();
        let rules = self.device(device);
        let Some(slot) = self.slots.get(device.id.index()) else { return out };
        for p in slot.states() {
            if let Some(rule) = rules.rules.get(usize::from(p.rule))
                && let Some(s) = severity_of(rule, p.level)
            {
                let e = out.entry(rule.spec.condition.clone()).or_insert(s);
                *e = (*e).max(s);
            }
        }
        out
    }

    /// Evaluates a device's observations (in event-time order) received at gateway time `now`.
    pub fn observe(
        &mut self,
        now: i64,
        device: Device,
        observations: &[Observation],
        out: &mut Vec<ConditionChange>,
    ) {
        if observations.is_empty() {
            return;
        }
        let rules = self.device(device);
        for obs in observations {
            for (i, rule) in rules.rules.iter().enumerate() {
                if rule.spec.signal != obs.signal {
                    continue;
                }
                let Ok(i) = u16::try_from(i) else { continue };
                self.step(now, device, &rules, i, out, |state, rule, attrs| {
                    on_observation(rule, attrs, state, obs, now)
                });
            }
        }
    }

    /// Fires the holds and windows that elapsed by `now`.
    pub fn tick(&mut self, now: i64, out: &mut Vec<ConditionChange>) {
        while let Some(&(deadline, id, i)) = self.timers.first() {
            if deadline > now {
                break;
            }
            self.timers.pop_first();
            let Some(slot) = self.slots.get(id.index()) else { continue };
            // The slot has its set: it was given one when the timer's state was stored.
            let device = Device { id, eui: slot.eui, kind: Kind::Cover };
            let rules = self.device(device);
            self.step(now, device, &rules, i, out, |state, rule, attrs| {
                on_timer(rule, attrs, state, now)
            });
        }
    }

    /// When [`Rules::tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<i64> {
        self.timers.first().map(|t| t.0)
    }

    /// States changed since the last call: device, rule id, and the state (`None`: idle, delete).
    pub fn take_dirty(&mut self) -> Vec<(Eui, String, Option<RuleState>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|(id, i)| {
                let slot = self.slots.get(id.index())?;
                let rule = self.profile(slot.set).get(usize::from(i))?.id.clone();
                Some((slot.eui, rule, slot.state(i).map(Packed::state)))
            })
            .collect()
    }

    /// Runs one rule's transition and turns a change of its condition's severity into output.
    fn step(
        &mut self,
        now: i64,
        device: Device,
        rules: &DeviceRules,
        i: u16,
        out: &mut Vec<ConditionChange>,
        f: impl FnOnce(&mut RuleState, &Rule, &Attributes) -> Option<Evidence>,
    ) {
        let Some(rule) = rules.rules.get(usize::from(i)) else { return };
        let condition = &rule.spec.condition;
        let before = self.condition(device.id, rules, condition).0;
        let Some(slot) = self.slot_mut(device) else { return };
        let mut state = slot.take(i);
        let old_deadline = state.deadline();
        let snapshot = state.clone();
        let evidence = f(&mut state, rule, &rules.attrs);
        let onset = state.onset_ms;
        let new_deadline = state.deadline();
        let changed = state != snapshot;
        slot.put(i, state);
        if old_deadline != new_deadline {
            if let Some(d) = old_deadline {
                self.timers.remove(&(d, device.id, i));
            }
            if let Some(d) = new_deadline {
                self.timers.insert((d, device.id, i));
            }
        }
        if changed {
            self.dirty.insert((device.id, i));
        }
        let (after, condition_onset) = self.condition(device.id, rules, condition);
        if before != after
            && let Some(evidence) = evidence
        {
            let at_ms = evidence_time(&evidence, onset, now);
            out.push(ConditionChange {
                eui: device.eui,
                condition: condition.clone(),
                from: before,
                to: after,
                onset_ms: condition_onset.or(onset).unwrap_or(at_ms),
                at_ms,
                decided_ms: now,
                evidence,
            });
        }
    }

    /// A condition's severity (the highest of its active rules) and onset (the earliest).
    fn condition(
        &self,
        id: DeviceId,
        rules: &DeviceRules,
        condition: &str,
    ) -> (Option<Severity>, Option<i64>) {
        let Some(slot) = self.slots.get(id.index()) else { return (None, None) };
        let mut severity = None;
        let mut onset: Option<i64> = None;
        for p in slot.states() {
            let Some(rule) = rules.rules.get(usize::from(p.rule)) else { continue };
            if rule.spec.condition != condition {
                continue;
            }
            severity = severity.max(severity_of(rule, p.level));
            if p.level > 0
                && let Some(o) = p.onset()
            {
                onset = Some(onset.map_or(o, |m| m.min(o)));
            }
        }
        (severity, onset)
    }
}

fn evidence_time(e: &Evidence, onset: Option<i64>, now: i64) -> i64 {
    // Event time of the decision: the onset plus how long it had held.
    #[allow(clippy::cast_possible_truncation)]
    onset.map_or(now, |o| o.saturating_add((e.held_s * 1000.0) as i64))
}

fn severity_of(rule: &Rule, level: u8) -> Option<Severity> {
    if level == 0 {
        return None;
    }
    match &rule.spec.test {
        Test::Threshold { levels } => {
            levels.get(usize::from(level).saturating_sub(1)).map(|l| l.severity)
        }
        Test::Repeating { severity, .. }
        | Test::Rate { severity, .. }
        | Test::Stuck { severity, .. } => Some(*severity),
    }
}

fn secs(ms: i64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let s = ms as f64 / 1000.0;
    s
}

fn hold_ms(hold_s: u64) -> i64 {
    i64::try_from(hold_s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// Whether `v` is past a level's threshold.
fn enters(level: &Level, attrs: &Attributes, v: f64) -> Option<bool> {
    match (&level.above, &level.below) {
        (Some(b), None) => Some(v > b.resolve(attrs)?),
        (None, Some(b)) => Some(v < b.resolve(attrs)?),
        _ => None,
    }
}

/// Whether `v` is back past a level's clear point.
fn leaves(level: &Level, attrs: &Attributes, v: f64) -> bool {
    let clear = level.clear.as_ref().or(level.above.as_ref()).or(level.below.as_ref());
    let Some(c) = clear.and_then(|c| c.resolve(attrs)) else { return true };
    if level.above.is_some() { v <= c } else { v >= c }
}

fn level_threshold(level: &Level, attrs: &Attributes) -> Option<f64> {
    level.above.as_ref().or(level.below.as_ref()).and_then(|b| b.resolve(attrs))
}

fn on_observation(
    rule: &Rule,
    attrs: &Attributes,
    state: &mut RuleState,
    obs: &Observation,
    now: i64,
) -> Option<Evidence> {
    let v = obs.value;
    if !v.is_finite() {
        return None;
    }
    let at = obs.at_ms;
    let previous = state.last;
    match &rule.spec.test {
        Test::Threshold { levels } => threshold_step(rule, levels, attrs, state, v, at, now),
        Test::Repeating { above, count, window_s, .. } => {
            let bound = above.resolve(attrs)?;
            state.last = Some((v, at));
            let was_below = previous.is_none_or(|(p, _)| p <= bound);
            if !(v > bound && was_below) {
                if v <= bound && state.crossings().is_empty() {
                    state.last = None; // below and nothing counted: idle
                }
                return None;
            }
            let window = hold_ms(*window_s);
            state.set_extra(|e| {
                e.crossings.push(at);
                e.crossings.retain(|t| at.saturating_sub(*t) < window);
                e.quiet_deadline = Some(now.saturating_add(window));
            });
            let n = u32::try_from(state.crossings().len()).unwrap_or(u32::MAX);
            if state.level == 0 && n >= *count {
                state.level = 1;
                state.onset_ms = state.crossings().first().copied();
                return Some(Evidence {
                    rule: rule.id.clone(),
                    signal: obs.signal,
                    value: f64::from(n),
                    threshold: Some(f64::from(*count)),
                    hold_s: *window_s,
                    held_s: secs(at.saturating_sub(state.onset_ms.unwrap_or(at))),
                });
            }
            None
        }
        Test::Rate { above_per_h, clear_per_h, falling, span_s, .. } => {
            // `last` is the reference the rate is measured from: it moves on only once the
            // span is reached (an older, late observation leaves it alone too).
            let Some((p, pt)) = previous else {
                state.last = Some((v, at));
                return None;
            };
            let dt = at.saturating_sub(pt);
            if dt <= 0 || dt < hold_ms(*span_s) {
                return None;
            }
            state.last = Some((v, at));
            let mut rate = (v - p) / secs(dt) * 3600.0;
            if *falling {
                rate = -rate;
            }
            let clear = clear_per_h.unwrap_or(above_per_h / 2.0);
            let evidence = |state: &RuleState| Evidence {
                rule: rule.id.clone(),
                signal: obs.signal,
                value: rate,
                threshold: Some(*above_per_h),
                hold_s: 0,
                held_s: secs(at.saturating_sub(state.onset_ms.unwrap_or(at))),
            };
            if state.level == 0 && rate > *above_per_h {
                state.level = 1;
                state.onset_ms = Some(pt);
                Some(evidence(state))
            } else if state.level == 1 && rate < clear {
                let e = evidence(state);
                state.level = 0;
                state.onset_ms = None;
                Some(e)
            } else {
                None
            }
        }
        Test::Stuck { tolerance, for_s, .. } => {
            let (reference, since) = *state.last.get_or_insert((v, at));
            if (v - reference).abs() > *tolerance {
                state.last = Some((v, at));
                if state.level == 1 {
                    state.level = 0;
                    state.onset_ms = None;
                    return Some(Evidence {
                        rule: rule.id.clone(),
                        signal: obs.signal,
                        value: v,
                        threshold: Some(reference),
                        hold_s: *for_s,
                        held_s: secs(at.saturating_sub(since)),
                    });
                }
                return None;
            }
            if state.level == 0 && at.saturating_sub(since) >= hold_ms(*for_s) {
                state.level = 1;
                state.onset_ms = Some(since);
                return Some(Evidence {
                    rule: rule.id.clone(),
                    signal: obs.signal,
                    value: v,
                    threshold: Some(reference),
                    hold_s: *for_s,
                    held_s: secs(at.saturating_sub(since)),
                });
            }
            None
        }
    }
}

fn threshold_step(
    rule: &Rule,
    levels: &[Level],
    attrs: &Attributes,
    state: &mut RuleState,
    v: f64,
    at: i64,
    now: i64,
) -> Option<Evidence> {
    // The last value is kept only while something is active (it is the timer's evidence).
    let result = threshold_decide(rule, levels, attrs, state, v, at, now);
    state.last = (state.level > 0 || state.pending().is_some()).then_some((v, at));
    result
}

fn threshold_decide(
    rule: &Rule,
    levels: &[Level],
    attrs: &Attributes,
    state: &mut RuleState,
    v: f64,
    at: i64,
    now: i64,
) -> Option<Evidence> {
    // The highest level whose condition the value meets.
    let target = levels
        .iter()
        .rposition(|l| enters(l, attrs, v) == Some(true))
        .map_or(0, |i| u8::try_from(i + 1).unwrap_or(u8::MAX));
    let current = state.level;
    let evidence = |level: u8, held_ms: i64| {
        let l = levels.get(usize::from(level).saturating_sub(1))?;
        Some(Evidence {
            rule: rule.id.clone(),
            signal: rule.spec.signal,
            value: v,
            threshold: level_threshold(l, attrs),
            hold_s: l.hold_s,
            held_s: secs(held_ms),
        })
    };
    if target > current {
        // Begins (or continues) a climb; the condition of every lower level holds too.
        let since = state.pending().map_or(at, |p| p.1);
        let level = levels.get(usize::from(target) - 1)?;
        let hold = hold_ms(level.hold_s);
        if state.level == 0 && state.onset_ms.is_none() {
            state.onset_ms = Some(since);
        }
        if hold == 0 || at.saturating_sub(since) >= hold {
            state.set_pending(None);
            state.level = target;
            state.onset_ms = state.onset_ms.or(Some(since));
            return evidence(target, at.saturating_sub(since));
        }
        // Keep the earliest deadline for a pending climb; a higher target restarts the wait
        // only for its own (longer or shorter) hold, measured from the same start.
        let deadline = now.saturating_add(hold.saturating_sub(at.saturating_sub(since)));
        let deadline = match state.pending() {
            Some((_, _, d)) => d.min(deadline),
            None => deadline,
        };
        state.set_pending(Some((target, since, deadline)));
        // A lower level with no hold may be entered at once while the higher one waits.
        if let Some(lower) = levels
            .iter()
            .take(usize::from(target) - 1)
            .rposition(|l| l.hold_s == 0 && enters(l, attrs, v) == Some(true))
            .map(|i| u8::try_from(i + 1).unwrap_or(u8::MAX))
            && lower > current
        {
            state.level = lower;
            return evidence(lower, 0);
        }
        return None;
    }
    // No climb: a pending one is abandoned (a spike shorter than the hold).
    if target <= current {
        state.set_pending(None);
        if current == 0 {
            state.onset_ms = None;
        }
    }
    if current == 0 {
        return None;
    }
    // De-escalate to the highest level the value has not cleared.
    let stay = levels
        .iter()
        .take(usize::from(current))
        .rposition(|l| !leaves(l, attrs, v))
        .map_or(0, |i| u8::try_from(i + 1).unwrap_or(u8::MAX));
    if stay < current {
        let e = evidence(current, at.saturating_sub(state.onset_ms.unwrap_or(at)));
        state.level = stay;
        if stay == 0 {
            state.onset_ms = None;
        }
        return e;
    }
    None
}

fn on_timer(rule: &Rule, attrs: &Attributes, state: &mut RuleState, now: i64) -> Option<Evidence> {
    if let Some((level, since, deadline)) = state.pending()
        && deadline <= now
        && let Test::Threshold { levels } = &rule.spec.test
    {
        state.set_pending(None);
        let l = levels.get(usize::from(level).saturating_sub(1))?;
        state.level = state.level.max(level);
        state.onset_ms = state.onset_ms.or(Some(since));
        return Some(Evidence {
            rule: rule.id.clone(),
            signal: rule.spec.signal,
            value: state_value(state),
            threshold: level_threshold(l, attrs),
            hold_s: l.hold_s,
            held_s: secs(hold_ms(l.hold_s)),
        });
    }
    if let Some(deadline) = state.quiet_deadline()
        && deadline <= now
    {
        state.set_extra(|e| {
            e.quiet_deadline = None;
            e.crossings.clear();
        });
        if let Test::Repeating { above, .. } = &rule.spec.test
            && let (Some((v, _)), Some(bound)) = (state.last, above.resolve(attrs))
            && v <= bound
        {
            state.last = None;
        }
        if state.level > 0 {
            let onset = state.onset_ms.unwrap_or(now);
            state.level = 0;
            state.onset_ms = None;
            return Some(Evidence {
                rule: rule.id.clone(),
                signal: rule.spec.signal,
                value: 0.0,
                threshold: None,
                hold_s: 0,
                held_s: secs(now.saturating_sub(onset)),
            });
        }
    }
    None
}

fn state_value(state: &RuleState) -> f64 {
    state.last.map_or(f64::NAN, |l| l.0)
}

#[cfg(test)]
mod low_battery_tests {
    use super::*;

    /// One source for the low-battery level: the built-in rule takes the configured level and
    /// health's hysteresis, so changing `[health] low_battery_mv` changes incidents too.
    #[test]
    fn the_built_in_low_battery_rule_takes_the_configured_level() {
        let rules = RulesConfig::built_in(3_500);
        for set in [&rules.cover, &rules.drain, &rules.beacon] {
            let rule = set.iter().find(|r| r.condition == "low_battery").unwrap();
            let Test::Threshold { levels } = &rule.test else { panic!("a threshold") };
            let expected = f64::from(3_500 + crate::health::BATTERY_HYSTERESIS_MV);
            assert!(matches!(levels[0].below, Some(Bound::Value(v)) if (v - 3_500.0).abs() < 1e-9));
            assert!(
                matches!(levels[0].clear, Some(Bound::Value(v)) if (v - expected).abs() < 1e-9)
            );
        }
        assert_eq!(
            RulesConfig::default(),
            RulesConfig::built_in(crate::health::DEFAULT_LOW_BATTERY_MV)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COVER: Eui = Eui(1);
    const DRAIN: Eui = Eui(2);

    fn engine() -> Rules {
        let mut r = Rules::new(&RulesConfig::default());
        r.add_device(dev(COVER), Attributes::default());
        let well = Attributes {
            warn_mm: Some(2_000.0),
            alarm_mm: Some(2_600.0),
            well_depth_mm: Some(3_000.0),
        };
        r.add_device(dev(DRAIN), well);
        r
    }

    /// Test devices: 1 a cover, the rest drains.
    fn kind(eui: Eui) -> Kind {
        if eui == COVER { Kind::Cover } else { Kind::Drain }
    }

    /// Test devices are numbered by their EUI.
    fn dev(eui: Eui) -> Device {
        Device { id: DeviceId(u32::try_from(eui.0).unwrap()), eui, kind: kind(eui) }
    }

    fn obs(signal: Signal, value: f64, at_ms: i64) -> Observation {
        Observation { signal, value, at_ms }
    }

    fn see(r: &mut Rules, now: i64, eui: Eui, o: Observation) -> Vec<ConditionChange> {
        let mut out = Vec::new();
        r.observe(now, dev(eui), &[o], &mut out);
        out
    }

    fn tick(r: &mut Rules, now: i64) -> Vec<ConditionChange> {
        let mut out = Vec::new();
        r.tick(now, &mut out);
        out
    }

    fn summary(changes: &[ConditionChange]) -> Vec<(&str, Option<Severity>, Option<Severity>)> {
        changes.iter().map(|c| (c.condition.as_str(), c.from, c.to)).collect()
    }

    #[test]
    fn the_default_rules_validate_and_round_trip_through_toml() {
        let config = RulesConfig::default();
        config.validate().unwrap();
        let text = toml::to_string(&config).unwrap();
        assert_eq!(RulesConfig::parse(&text, "defaults").unwrap(), config);
    }

    #[test]
    fn a_tilt_held_ten_seconds_fires_on_the_timer_not_on_the_next_frame() {
        let mut r = engine();
        // The device's tilt alarm (after its own 2 s) arrives at 2_000 with onset 0.
        assert!(see(&mut r, 2_000, COVER, obs(Signal::AlarmTiltDeg, 25.0, 0)).is_empty());
        assert_eq!(r.next_deadline(), Some(12_000));
        assert!(tick(&mut r, 11_999).is_empty());
        let fired = tick(&mut r, 12_000);
        assert_eq!(summary(&fired), [("cover_displaced", None, Some(Severity::Major))]);
        let c = &fired[0];
        assert_eq!((c.onset_ms, c.decided_ms), (0, 12_000));
        assert_eq!(c.evidence.value, 25.0);
        assert_eq!(c.evidence.threshold, Some(10.0));
        assert_eq!(c.evidence.hold_s, 10);
    }

    #[test]
    fn a_tilt_cleared_within_the_hold_is_a_vehicle_and_raises_nothing() {
        let mut r = engine();
        see(&mut r, 2_000, COVER, obs(Signal::AlarmTiltDeg, 15.0, 0));
        // Cleared at device time 5 s: below the clear point.
        assert!(see(&mut r, 5_100, COVER, obs(Signal::AlarmTiltDeg, 1.0, 5_000)).is_empty());
        // Only the loose-cover count remembers it, for an hour.
        assert_eq!(r.next_deadline(), Some(3_602_000));
        assert!(tick(&mut r, 60_000).is_empty());
        assert!(tick(&mut r, 3_602_000).is_empty());
        assert!(r.active(dev(COVER)).is_empty());
        assert!(r.take_dirty().iter().all(|(_, _, s)| s.is_none()), "idle states are deleted");
    }

    #[test]
    fn removed_fires_at_once_and_escalates_an_open_tilt_then_clears_with_hysteresis() {
        let mut r = engine();
        see(&mut r, 2_000, COVER, obs(Signal::AlarmTiltDeg, 20.0, 0));
        tick(&mut r, 12_000);
        let up = see(&mut r, 20_000, COVER, obs(Signal::AlarmTiltDeg, 170.0, 19_500));
        assert_eq!(
            summary(&up),
            [("cover_displaced", Some(Severity::Major), Some(Severity::Critical))]
        );
        assert_eq!(up[0].onset_ms, 0, "the onset stays the first tilt's");
        // 85°: below 90 but above the critical level's clear point 80: stays critical.
        assert!(see(&mut r, 21_000, COVER, obs(Signal::AlarmTiltDeg, 85.0, 21_000)).is_empty());
        let down = see(&mut r, 22_000, COVER, obs(Signal::AlarmTiltDeg, 30.0, 22_000));
        assert_eq!(
            summary(&down),
            [("cover_displaced", Some(Severity::Critical), Some(Severity::Major))]
        );
        // 9°: below 10 but above the clear point 8: still major.
        assert!(see(&mut r, 23_000, COVER, obs(Signal::AlarmTiltDeg, 9.0, 23_000)).is_empty());
        let clear = see(&mut r, 24_000, COVER, obs(Signal::AlarmTiltDeg, 2.0, 24_000));
        assert_eq!(summary(&clear), [("cover_displaced", Some(Severity::Major), None)]);
        assert!(r.active(dev(COVER)).is_empty());
    }

    #[test]
    fn an_open_switch_and_a_tilt_share_one_condition() {
        let mut r = engine();
        let open = see(&mut r, 1_000, COVER, obs(Signal::SwitchOpen, 1.0, 1_000));
        assert_eq!(summary(&open), [("cover_displaced", None, Some(Severity::Major))]);
        // The tilt too, then removed: one escalation, no second raise.
        see(&mut r, 2_000, COVER, obs(Signal::AlarmTiltDeg, 20.0, 1_500));
        assert!(tick(&mut r, 12_000).is_empty(), "already major through the switch");
        let up = see(&mut r, 13_000, COVER, obs(Signal::AlarmTiltDeg, 120.0, 13_000));
        assert_eq!(
            summary(&up),
            [("cover_displaced", Some(Severity::Major), Some(Severity::Critical))]
        );
        // The switch closes but the tilt still says removed: nothing changes.
        assert!(see(&mut r, 14_000, COVER, obs(Signal::SwitchOpen, 0.0, 14_000)).is_empty());
        let clear = see(&mut r, 15_000, COVER, obs(Signal::AlarmTiltDeg, 0.5, 15_000));
        assert_eq!(summary(&clear), [("cover_displaced", Some(Severity::Critical), None)]);
    }

    #[test]
    fn a_backlog_that_spans_the_hold_fires_at_arrival_with_the_original_onset() {
        let mut r = engine();
        // An hour-old tilt, then a reading 20 s later still tilted, all in one late batch.
        let batch = [
            obs(Signal::AlarmTiltDeg, 30.0, 1_000_000),
            obs(Signal::AlarmTiltDeg, 31.0, 1_020_000),
        ];
        let mut out = Vec::new();
        r.observe(4_600_000, dev(COVER), &batch, &mut out);
        assert_eq!(summary(&out), [("cover_displaced", None, Some(Severity::Major))]);
        assert_eq!(out[0].onset_ms, 1_000_000);
        assert_eq!(out[0].decided_ms, 4_600_000);
    }

    #[test]
    fn drain_levels_use_each_wells_own_limits() {
        let mut r = engine();
        assert!(see(&mut r, 0, DRAIN, obs(Signal::LevelMm, 1_900.0, 0)).is_empty());
        let warn = see(&mut r, 300_000, DRAIN, obs(Signal::LevelMm, 2_050.0, 300_000));
        assert_eq!(summary(&warn), [("drain_overflow", None, Some(Severity::Major))]);
        assert_eq!(warn[0].evidence.threshold, Some(2_000.0));
        let alarm = see(&mut r, 600_000, DRAIN, obs(Signal::LevelMm, 2_700.0, 600_000));
        assert_eq!(
            summary(&alarm),
            [("drain_overflow", Some(Severity::Major), Some(Severity::Critical))]
        );
        // 2_550 is within the alarm's 100 mm hysteresis; 2_450 is not.
        assert!(see(&mut r, 900_000, DRAIN, obs(Signal::LevelMm, 2_550.0, 900_000)).is_empty());
        let d = see(&mut r, 1_200_000, DRAIN, obs(Signal::LevelMm, 2_450.0, 1_200_000));
        assert_eq!(
            summary(&d),
            [("drain_overflow", Some(Severity::Critical), Some(Severity::Major))]
        );
        let c = see(&mut r, 1_500_000, DRAIN, obs(Signal::LevelMm, 1_850.0, 1_500_000));
        assert_eq!(summary(&c), [("drain_overflow", Some(Severity::Major), None)]);
    }

    #[test]
    fn a_fast_rise_is_an_early_minor_level_of_the_same_condition() {
        let mut r = engine();
        see(&mut r, 0, DRAIN, obs(Signal::LevelMm, 500.0, 0));
        // +300 mm in 5 min = 3.6 m/h.
        let rise = see(&mut r, 300_000, DRAIN, obs(Signal::LevelMm, 800.0, 300_000));
        assert_eq!(summary(&rise), [("drain_overflow", None, Some(Severity::Minor))]);
        assert_eq!(rise[0].onset_ms, 0);
        let warn = see(&mut r, 600_000, DRAIN, obs(Signal::LevelMm, 2_100.0, 600_000));
        assert_eq!(
            summary(&warn),
            [("drain_overflow", Some(Severity::Minor), Some(Severity::Major))]
        );
        assert_eq!(warn[0].onset_ms, 0, "one condition, one onset");
    }

    #[test]
    fn noise_sampled_every_second_is_not_a_fast_rise() {
        let mut r = engine();
        // ±4 mm of noise every second for ten minutes: 8 mm in 1 s would be 28.8 m/h.
        for t in 0..600 {
            let level = 500.0 + if t % 2 == 0 { 4.0 } else { -4.0 };
            let at = t * 1_000;
            assert!(see(&mut r, at, DRAIN, obs(Signal::LevelMm, level, at)).is_empty(), "{t} s");
        }
        // A real rise is still seen, over the span: +150 mm in the next five minutes.
        let mut changes = Vec::new();
        for t in 600..=900 {
            let at = t * 1_000;
            let level = 500.0 + 0.5 * (t - 600) as f64;
            changes.extend(see(&mut r, at, DRAIN, obs(Signal::LevelMm, level, at)));
        }
        assert_eq!(summary(&changes), [("drain_overflow", None, Some(Severity::Minor))]);
    }

    #[test]
    fn a_level_that_never_moves_is_a_stuck_sensor() {
        let mut r = engine();
        let day = 86_400_000;
        for d in 0..7 {
            assert!(see(&mut r, d * day, DRAIN, obs(Signal::LevelMm, 321.0, d * day)).is_empty());
        }
        let stuck = see(&mut r, 7 * day, DRAIN, obs(Signal::LevelMm, 321.0, 7 * day));
        assert_eq!(summary(&stuck), [("sensor_stuck", None, Some(Severity::Minor))]);
        let moved = see(&mut r, 8 * day, DRAIN, obs(Signal::LevelMm, 340.0, 8 * day));
        assert_eq!(summary(&moved), [("sensor_stuck", Some(Severity::Minor), None)]);
    }

    #[test]
    fn three_tilts_in_an_hour_is_a_loose_cover_that_clears_after_a_quiet_hour() {
        let mut r = engine();
        let mut loose = Vec::new();
        for k in 0..3 {
            let t = k * 600_000;
            loose.extend(see(&mut r, t, COVER, obs(Signal::AlarmTiltDeg, 12.0, t)));
            loose.extend(see(&mut r, t + 1_000, COVER, obs(Signal::AlarmTiltDeg, 0.0, t + 1_000)));
        }
        assert_eq!(summary(&loose), [("cover_loose", None, Some(Severity::Minor))]);
        assert_eq!(r.next_deadline(), Some(1_200_000 + 3_600_000));
        let quiet = tick(&mut r, 4_800_000);
        assert_eq!(summary(&quiet), [("cover_loose", Some(Severity::Minor), None)]);
    }

    #[test]
    fn offline_and_low_battery_are_thresholds_too() {
        let mut r = engine();
        let off = see(&mut r, 0, DRAIN, obs(Signal::Online, 0.0, 0));
        assert_eq!(summary(&off), [("device_offline", None, Some(Severity::Minor))]);
        let on = see(&mut r, 1, DRAIN, obs(Signal::Online, 1.0, 1));
        assert_eq!(summary(&on), [("device_offline", Some(Severity::Minor), None)]);
        let low = see(&mut r, 2, DRAIN, obs(Signal::BatteryMv, 3_250.0, 2));
        assert_eq!(summary(&low), [("low_battery", None, Some(Severity::Minor))]);
        assert!(see(&mut r, 3, DRAIN, obs(Signal::BatteryMv, 3_350.0, 3)).is_empty(), "hysteresis");
        let ok = see(&mut r, 4, DRAIN, obs(Signal::BatteryMv, 3_450.0, 4));
        assert_eq!(summary(&ok), [("low_battery", Some(Severity::Minor), None)]);
    }

    #[test]
    fn rule_states_are_small_and_load_as_earlier_versions_saved_them() {
        assert!(size_of::<RuleState>() <= 56, "{}", size_of::<RuleState>());
        assert!(size_of::<Packed>() <= 40, "{}", size_of::<Packed>());
        assert!(size_of::<Slot>() <= 56, "{}", size_of::<Slot>());
        // As written before the compact layout: a stuck rule's reference under "steady".
        let old: RuleState =
            serde_json::from_str(r#"{"level":1,"onset_ms":5,"steady":[321.0,7]}"#).unwrap();
        assert_eq!(
            (old.level, old.onset_ms, old.last, old.pending()),
            (1, Some(5), Some((321.0, 7)), None)
        );
        let held: RuleState = serde_json::from_str(
            r#"{"pending":[2,1000,12000],"crossings":[1,2],"quiet_deadline":9}"#,
        )
        .unwrap();
        assert_eq!(held.pending(), Some((2, 1_000, 12_000)));
        assert_eq!((held.crossings(), held.quiet_deadline()), (&[1, 2][..], Some(9)));
        let again: RuleState =
            serde_json::from_str(&serde_json::to_string(&held).unwrap()).unwrap();
        assert_eq!(again, held);
        // Emptied parts are freed: an idle state is idle again.
        let mut s = held;
        s.set_pending(None);
        s.set_extra(|e| {
            e.crossings.clear();
            e.quiet_deadline = None;
        });
        assert!(s.is_idle());
    }

    #[test]
    fn only_states_that_are_not_idle_are_kept() {
        let mut r = engine();
        let stored = |r: &Rules, eui: Eui| r.slots[dev(eui).id.index()].states().len();
        // A tilt raised and cleared leaves nothing behind once its crossing is out of the
        // loose-cover window (the hold and the crossing are two rules' states).
        see(&mut r, 0, COVER, obs(Signal::AlarmTiltDeg, 25.0, 0));
        assert_eq!(stored(&r, COVER), 2);
        assert_eq!(summary(&tick(&mut r, 10_000)).len(), 1);
        see(&mut r, 20_000, COVER, obs(Signal::AlarmTiltDeg, 0.0, 20_000));
        assert_eq!(stored(&r, COVER), 1);
        tick(&mut r, 4_000_000);
        assert_eq!(stored(&r, COVER), 0);
        assert!(r.slots[dev(COVER).id.index()].states.is_none());
        // A drain's level reading: its rate and stuck rules keep their reference readings,
        // each restored as it was.
        let cover = r.take_dirty();
        assert!(cover.iter().all(|(eui, _, state)| *eui == COVER && state.is_none()));
        see(&mut r, 0, DRAIN, obs(Signal::LevelMm, 600.0, 0));
        assert_eq!(stored(&r, DRAIN), 2);
        let saved = r.take_dirty();
        assert_eq!(saved.len(), 2);
        let mut again = engine();
        for (eui, id, state) in &saved {
            again.restore(dev(*eui), id, state.clone().unwrap());
        }
        assert_eq!(again.take_dirty(), []);
        for (eui, id, state) in saved {
            let slot = &again.slots[dev(eui).id.index()];
            let i = again.sets[slot.set as usize].iter().position(|r| r.id == id).unwrap();
            assert_eq!(slot.state(u16::try_from(i).unwrap()).map(Packed::state), state);
        }
    }

    #[test]
    fn a_half_elapsed_hold_survives_a_restart() {
        let mut r = engine();
        see(&mut r, 2_000, COVER, obs(Signal::AlarmTiltDeg, 25.0, 0));
        let saved = r.take_dirty();
        assert!(saved.iter().any(|(_, id, s)| id == "cover_displaced/alarm_tilt_deg/threshold"
            && s.as_ref().is_some_and(|s| s.pending().is_some())));
        // A new engine from what was persisted (through JSON, as the store keeps it).
        let mut again = engine();
        for (eui, id, state) in saved {
            let json = serde_json::to_string(&state.unwrap()).unwrap();
            again.restore(dev(eui), &id, serde_json::from_str(&json).unwrap());
        }
        assert_eq!(again.next_deadline(), Some(12_000));
        let fired = tick(&mut again, 12_500);
        assert_eq!(summary(&fired), [("cover_displaced", None, Some(Severity::Major))]);
        assert_eq!(fired[0].onset_ms, 0);
    }

    #[test]
    fn overrides_replace_disable_or_add_rules_per_device() {
        let text = r#"
            [[drain]]
            condition = "drain_overflow"
            signal = "level_mm"
            type = "threshold"
            levels = [{ severity = "major", above = "warn_mm", clear = { attr = "warn_mm", offset = -50 } }]

            [[override]]
            devices = ["0000000000000002"]
            condition = "drain_overflow"
            signal = "level_mm"
            type = "threshold"
            levels = [{ severity = "critical", above = 500.0, hold_s = 30 }]

            [[override]]
            devices = ["0000000000000003"]
            disabled = true
            condition = "drain_overflow"
            signal = "level_mm"
            type = "threshold"
            levels = [{ severity = "major", above = 0.0 }]
        "#;
        let config = RulesConfig::parse(text, "test").unwrap();
        let mut r = Rules::new(&config);
        let attrs = Attributes { warn_mm: Some(2_000.0), ..Attributes::default() };
        for eui in [Eui(2), Eui(3), Eui(4)] {
            r.add_device(dev(eui), attrs);
        }
        assert!(see(&mut r, 0, Eui(2), obs(Signal::LevelMm, 600.0, 0)).is_empty());
        assert_eq!(
            summary(&tick(&mut r, 30_000)),
            [("drain_overflow", None, Some(Severity::Critical))]
        );
        assert!(see(&mut r, 0, Eui(3), obs(Signal::LevelMm, 9_000.0, 0)).is_empty());
        assert_eq!(see(&mut r, 0, Eui(4), obs(Signal::LevelMm, 2_001.0, 0)).len(), 1);
    }

    #[test]
    fn bad_rules_are_named() {
        let bad = [
            (
                "[[cover]]\ncondition = \"x\"\nsignal = \"nope\"\ntype = \"threshold\"\nlevels = []",
                "nope",
            ),
            (
                "[[cover]]\ncondition = \"x\"\nsignal = \"tilt_deg\"\ntype = \"threshold\"\nlevels = []",
                "at least one level",
            ),
            (
                "[[drain]]\ncondition = \"x\"\nsignal = \"level_mm\"\ntype = \"threshold\"\nlevels = [{ severity = \"major\", above = \"depth\" }]",
                "unknown device attribute",
            ),
            (
                "[[drain]]\ncondition = \"x\"\nsignal = \"level_mm\"\ntype = \"threshold\"\nlevels = [{ severity = \"major\", above = 1.0, below = 2.0 }]",
                "exactly one",
            ),
            (
                "[[drain]]\ncondition = \"X Y\"\nsignal = \"level_mm\"\ntype = \"stuck\"\nfor_s = 1\nseverity = \"minor\"",
                "lowercase",
            ),
            (
                "[[override]]\ndevices = [\"zz\"]\ncondition = \"x\"\nsignal = \"level_mm\"\ntype = \"stuck\"\nfor_s = 1\nseverity = \"minor\"",
                "EUI",
            ),
            (
                "[[beacon]]\ncondition = \"x\"\nsignal = \"online\"\ntype = \"rate\"\nabove_per_h = -1.0\nseverity = \"minor\"",
                "positive",
            ),
            ("[cover]\nfoo = 1", "cover"),
        ];
        for (text, expected) in bad {
            let e = RulesConfig::parse(text, "rules.toml").unwrap_err().to_string();
            assert!(e.contains(expected), "{e:?} should mention {expected:?}");
        }
    }

    #[test]
    fn observations_come_from_readings_alarms_backlogs_and_status() {
        let mut out = Vec::new();
        for m in gridsense_protocol::examples::uplinks() {
            observations(&m, &mut out);
        }
        let signals: BTreeSet<Signal> = out.iter().map(|o| o.signal).collect();
        for s in [Signal::TiltDeg, Signal::LevelMm, Signal::RateMmH, Signal::BatteryMv] {
            assert!(signals.contains(&s), "{s:?} missing");
        }
        assert!(out.iter().all(|o| o.value.is_finite() && o.at_ms > 0));
    }
}
