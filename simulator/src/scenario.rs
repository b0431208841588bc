//! Scenario files (TOML): the weather, traffic, thefts, outages, patrols and misbehaving
//! devices of one simulated run. Six ship inside the binary (`simulator/scenarios/*.toml`);
//! `--scenario` takes one of their names or a path. Every field has a default; unknown fields
//! and bad values are errors that name the file, line and field.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Deserializer};

/// The scenarios compiled into the binary, by name.
pub const SHIPPED: [(&str, &str); 7] = [
    ("calm", include_str!("../scenarios/calm.toml")),
    ("rainstorm", include_str!("../scenarios/rainstorm.toml")),
    ("theft-spree", include_str!("../scenarios/theft-spree.toml")),
    ("area-outage", include_str!("../scenarios/area-outage.toml")),
    ("bad-actors", include_str!("../scenarios/bad-actors.toml")),
    ("showcase", include_str!("../scenarios/showcase.toml")),
    ("load", include_str!("../scenarios/load.toml")),
];

/// A duration written like `90s`, `5m` or `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Span).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration like 90s, 5m or 1h: {e}"))
        })
    }
}

impl Span {
    /// Seconds.
    pub fn secs(self) -> f64 {
        self.0.as_secs_f64()
    }
}

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// Physics seed (traffic, thefts, patrols): the same seed gives the same run.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Default `--speed` (simulated seconds per real second).
    #[serde(default = "default_speed")]
    pub speed: f64,
    /// Default `--duration` (wall clock).
    #[serde(default)]
    pub duration: Option<Span>,
    /// Passing vehicles over covers.
    #[serde(default)]
    pub traffic: Traffic,
    /// Rain events.
    #[serde(default)]
    pub rain: Vec<Rain>,
    /// Covers stolen, displaced or lifted.
    #[serde(default)]
    pub theft: Vec<Theft>,
    /// Network outages.
    #[serde(default)]
    pub outage: Vec<Outage>,
    /// Grid workers on patrol.
    #[serde(default)]
    pub patrol: Patrol,
    /// Batteries.
    #[serde(default)]
    pub battery: Battery,
    /// Misbehaving senders.
    #[serde(default)]
    pub bad_actor: Vec<BadActor>,
    /// Settings every device gets at boot (each where its kind has them), as a `Config`
    /// downlink would set them: for load runs and tests.
    #[serde(default)]
    pub device_config: DeviceConfig,
}

/// Device settings applied at boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Seconds between routine readings (drain samples, cover readings).
    pub report_interval_s: Option<u32>,
    /// Longest silence before a status heartbeat.
    pub heartbeat_interval_s: Option<u32>,
    /// Smallest drain level change worth a report, mm.
    pub drain_deadband_mm: Option<u16>,
    /// Seconds between patrol fixes.
    pub fix_interval_s: Option<u32>,
    /// The deployment's shards (devices publish on the sharded topics from the start; unset:
    /// version 1's topic until the gateway moves them).
    pub shards: Option<u16>,
}

impl DeviceConfig {
    /// The settings, for the firmware.
    pub fn settings(&self) -> Vec<gridsense_protocol::Setting> {
        use gridsense_protocol::Setting;
        let mut out = Vec::new();
        out.extend(self.report_interval_s.map(Setting::ReportIntervalS));
        out.extend(self.heartbeat_interval_s.map(Setting::HeartbeatIntervalS));
        out.extend(self.drain_deadband_mm.map(Setting::DrainDeadbandMm));
        out.extend(self.fix_interval_s.map(Setting::FixIntervalS));
        out.extend(self.shards.map(Setting::Shards));
        out
    }
}

fn default_seed() -> u64 {
    1
}
fn default_speed() -> f64 {
    1.0
}

/// Passing vehicles: short tilt spikes that must not alarm.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Traffic {
    /// Vehicles crossing each cover per hour.
    pub vehicles_per_hour: f64,
    /// Tilt of a spike, degrees (min, max).
    pub spike_deg: [f64; 2],
    /// Length of a spike, seconds (min, max); keep it under the 2 s hold.
    pub spike_s: [f64; 2],
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic { vehicles_per_hour: 6.0, spike_deg: [12.0, 25.0], spike_s: [0.3, 1.2] }
    }
}

/// Rain over the district or some streets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rain {
    /// When it starts, simulated time after the run's start.
    pub start: Span,
    /// How long it lasts.
    pub duration: Span,
    /// Peak intensity, mm/h (a heavy storm is 50+).
    pub peak_mm_h: f64,
    /// Street codes it falls on; empty for the whole district.
    #[serde(default)]
    pub streets: Vec<String>,
}

/// What happens to a cover in a theft event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TheftMode {
    /// Taken away: it lies flipped (about 180°).
    Removed,
    /// Knocked half off its seat (about 30°, held).
    Displaced,
    /// Lifted and put back askew by a repair crew or a thief (switch open, 15° held).
    Lifted,
}

/// Covers tampered with at a moment.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Theft {
    /// When, simulated time after the start.
    pub at: Span,
    /// How many covers (chosen deterministically from the seed).
    pub covers: usize,
    /// What happens to them.
    pub mode: TheftMode,
    /// When they are put back, after `at`; never if absent.
    #[serde(default)]
    pub restore_after: Option<Span>,
    /// Specific cover EUIs instead of random ones.
    #[serde(default)]
    pub euis: Vec<String>,
}

/// Devices that lose their network for a while.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// When it starts.
    pub start: Span,
    /// How long it lasts.
    pub duration: Span,
    /// Street codes affected; with neither `streets` nor `euis`, `fraction` of all devices.
    #[serde(default)]
    pub streets: Vec<String>,
    /// Specific device EUIs.
    #[serde(default)]
    pub euis: Vec<String>,
    /// Share of devices affected when no streets or EUIs are named.
    #[serde(default)]
    pub fraction: Option<f64>,
}

/// Grid workers' patrols.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Patrol {
    /// Share of workers on patrol during the run.
    pub on_patrol: f64,
    /// Incident reports per worker per hour.
    pub incidents_per_hour: f64,
    /// Checkpoints per grid, visited in turn.
    pub checkpoints_per_grid: u32,
    /// SOS presses.
    pub sos: Vec<Sos>,
}

impl Default for Patrol {
    fn default() -> Self {
        Patrol {
            on_patrol: 0.7,
            incidents_per_hour: 0.05,
            checkpoints_per_grid: 4,
            sos: Vec::new(),
        }
    }
}

/// SOS presses at a moment.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sos {
    /// When.
    pub at: Span,
    /// How many workers press it.
    #[serde(default = "one")]
    pub count: usize,
}

fn one() -> usize {
    1
}

/// Batteries.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Battery {
    /// Share of devices whose battery is already near the low level.
    pub low_fraction: f64,
    /// How fast batteries fall, mV per simulated day.
    pub drain_mv_per_day: f64,
}

impl Default for Battery {
    fn default() -> Self {
        Battery { low_fraction: 0.01, drain_mv_per_day: 1.0 }
    }
}

/// A misbehaving sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mischief {
    /// Seals its frames with a key the gateway does not have.
    WrongKey,
    /// Re-publishes frames it sent earlier.
    Replay,
    /// Publishes random bytes.
    Garbage,
    /// Publishes valid frames far faster than its schedule.
    Flood,
}

/// Some devices misbehaving.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BadActor {
    /// What they do.
    pub mode: Mischief,
    /// How many devices.
    pub devices: usize,
    /// Messages per simulated second (flood, garbage, replay).
    #[serde(default = "default_rate")]
    pub rate_per_s: f64,
}

fn default_rate() -> f64 {
    1.0
}

/// Why a scenario did not load.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// No shipped scenario has this name and no file exists at it.
    #[error("no scenario {name:?}: not a shipped one ({shipped}) and no such file")]
    Unknown {
        /// What was asked for.
        name: String,
        /// The shipped names.
        shipped: String,
    },
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not fit the schema.
    #[error("{file}:{line}:{column}: field `{field}`: {message}")]
    Schema {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The offending field path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("{file}: field `{field}`: {message}")]
    Value {
        /// The file.
        file: String,
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// A shipped scenario by name, or a file by path.
pub fn load(name_or_path: &str) -> Result<Scenario, ScenarioError> {
    if let Some((name, text)) = SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
        return parse(&format!("simulator/scenarios/{name}.toml"), text);
    }
    let path = Path::new(name_or_path);
    if !path.exists() {
        return Err(ScenarioError::Unknown {
            name: name_or_path.to_owned(),
            shipped: SHIPPED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
        });
    }
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|source| ScenarioError::Io { file: file.clone(), source })?;
    parse(&file, &text)
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses and checks scenario text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
    let de =
        toml::Deserializer::parse(text).map_err(|e| schema_error(file, text, String::new(), &e))?;
    let scenario: Scenario = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        schema_error(file, text, field, e.inner())
    })?;
    validate(&scenario).map_err(|(field, message)| ScenarioError::Value {
        file: file.to_owned(),
        field,
        message,
    })?;
    Ok(scenario)
}

fn schema_error(file: &str, text: &str, field: String, e: &toml::de::Error) -> ScenarioError {
    let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
    ScenarioError::Schema {
        file: file.to_owned(),
        line,
        column,
        field: if field.is_empty() || field == "." { "(document)".into() } else { field },
        message: e.message().to_owned(),
    }
}

fn validate(s: &Scenario) -> Result<(), (String, String)> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let share = |v: f64| (0.0..=1.0).contains(&v);
    if !positive(s.speed) || s.speed > 100_000.0 {
        return Err(("speed".into(), format!("{} must be > 0 and at most 100000", s.speed)));
    }
    let t = &s.traffic;
    if !(t.vehicles_per_hour >= 0.0 && t.vehicles_per_hour <= 3_600.0) {
        return Err(("traffic.vehicles_per_hour".into(), "must be between 0 and 3600".into()));
    }
    if !(t.spike_deg[0] <= t.spike_deg[1] && t.spike_deg[0] >= 0.0 && t.spike_deg[1] <= 90.0) {
        return Err(("traffic.spike_deg".into(), "must be [min, max] within 0..90".into()));
    }
    if !(t.spike_s[0] <= t.spike_s[1] && t.spike_s[0] > 0.0 && t.spike_s[1] <= 60.0) {
        return Err(("traffic.spike_s".into(), "must be [min, max] within 0..60".into()));
    }
    for (i, r) in s.rain.iter().enumerate() {
        if !(r.peak_mm_h >= 0.0 && r.peak_mm_h <= 500.0) {
            return Err((format!("rain[{i}].peak_mm_h"), "must be between 0 and 500".into()));
        }
        if r.duration.0.is_zero() {
            return Err((format!("rain[{i}].duration"), "must be longer than 0".into()));
        }
    }
    for (i, o) in s.outage.iter().enumerate() {
        if o.fraction.is_some_and(|f| !share(f)) {
            return Err((format!("outage[{i}].fraction"), "must be between 0 and 1".into()));
        }
        if o.streets.is_empty() && o.euis.is_empty() && o.fraction.is_none() {
            return Err((format!("outage[{i}]"), "name `streets`, `euis` or a `fraction`".into()));
        }
    }
    if !share(s.patrol.on_patrol) {
        return Err(("patrol.on_patrol".into(), "must be between 0 and 1".into()));
    }
    if !(s.patrol.incidents_per_hour >= 0.0 && s.patrol.incidents_per_hour <= 60.0) {
        return Err(("patrol.incidents_per_hour".into(), "must be between 0 and 60".into()));
    }
    let c = &s.device_config;
    let settings = c.settings();
    for kind in [
        gridsense_firmware::DeviceKind::Cover,
        gridsense_firmware::DeviceKind::Drain,
        gridsense_firmware::DeviceKind::Beacon,
    ] {
        let mut config = gridsense_firmware::Config::defaults(kind);
        let supported: Vec<_> =
            settings.iter().copied().filter(|x| gridsense_firmware::supports(kind, x)).collect();
        if config.apply(kind, &supported) == gridsense_protocol::AckOutcome::InvalidValue {
            return Err(("device_config".into(), format!("not valid for a {}", kind.as_str())));
        }
    }
    if !share(s.battery.low_fraction) {
        return Err(("battery.low_fraction".into(), "must be between 0 and 1".into()));
    }
    for (i, b) in s.bad_actor.iter().enumerate() {
        if !positive(b.rate_per_s) || b.rate_per_s > 10_000.0 {
            return Err((
                format!("bad_actor[{i}].rate_per_s"),
                "must be > 0 and at most 10000".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_loads() {
        for (name, _) in SHIPPED {
            let s = load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!s.description.is_empty(), "{name} has no description");
        }
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let err =
            parse("x.toml", "speed = 10\n[traffic]\nvehicles_per_hour = \"lots\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("x.toml:3:"), "{text}");
        assert!(text.contains("traffic.vehicles_per_hour"), "{text}");
        let err = parse("x.toml", "sped = 10\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `sped`"), "{err}");
        let err = parse("x.toml", "[[rain]]\nstart = \"soon\"\nduration = \"1h\"\npeak_mm_h = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rain[0].start") && err.contains("not a duration"), "{err}");
        let err = parse("x.toml", "speed = -1\n").unwrap_err().to_string();
        assert!(err.contains("`speed`"), "{err}");
        let err = parse("x.toml", "[[outage]]\nstart = \"1m\"\nduration = \"1m\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("outage[0]"), "{err}");
        let err = parse("x.toml", "speed = [").unwrap_err().to_string();
        assert!(err.starts_with("x.toml:1:"), "{err}");
        assert!(matches!(load("no-such-scenario"), Err(ScenarioError::Unknown { .. })));
    }
}
