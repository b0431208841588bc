//! The simulated world each device senses: traffic and thefts on covers, rain filling wells,
//! grid workers walking their patrols, batteries running down. Every model is a deterministic
//! function of the seed and the simulated time it is asked about (times only move forward), so
//! a run does not depend on how often or in which order devices are woken.

use std::{f64::consts::PI, sync::Arc};

use gridsense_firmware::{Health, beacon::BeaconInput, cover::CoverInput, drain::DrainInput};
use gridsense_protocol::{CaseClass, ClassKind, PositionFix, SwitchState};

use crate::{
    city::Grid,
    rng::Rng,
    scenario::{Rain, Scenario, TheftMode, Traffic},
};

/// Rain intensity over time and place.
#[derive(Debug, Clone, Default)]
pub struct RainField {
    events: Vec<Rain>,
}

impl RainField {
    /// The scenario's rain.
    pub fn new(events: &[Rain]) -> Self {
        RainField { events: events.to_vec() }
    }

    /// Intensity in mm/h at simulated second `t` in street `street`.
    pub fn mm_h(&self, t: f64, street: &str) -> f64 {
        self.events
            .iter()
            .filter(|r| r.streets.is_empty() || r.streets.iter().any(|s| s == street))
            .map(|r| {
                let x = (t - r.start.secs()) / r.duration.secs();
                if (0.0..1.0).contains(&x) { r.peak_mm_h * (PI * x).sin() } else { 0.0 }
            })
            .sum()
    }
}

/// A window of simulated seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Start, simulated seconds after the run's start.
    pub start: f64,
    /// End; `f64::INFINITY` for never.
    pub end: f64,
}

impl Window {
    /// Whether `t` falls inside.
    pub fn contains(&self, t: f64) -> bool {
        t >= self.start && t < self.end
    }
}

/// A tampering of one cover.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tamper {
    /// When it lasts.
    pub window: Window,
    /// What happens.
    pub mode: TheftMode,
}

/// Shortest time between two vehicles over one cover, seconds.
const MIN_VEHICLE_GAP_S: f64 = 1.0;

/// Vehicles passing over one cover: a Poisson stream of short tilt spikes.
#[derive(Debug, Clone)]
struct Vehicles {
    rng: Rng,
    traffic: Traffic,
    /// The current or next spike: start, end, tilt degrees.
    spike: (f64, f64, f64),
}

impl Vehicles {
    fn new(mut rng: Rng, traffic: Traffic) -> Self {
        let spike = Self::draw(&mut rng, &traffic, 0.0);
        Vehicles { rng, traffic, spike }
    }

    fn draw(rng: &mut Rng, traffic: &Traffic, after: f64) -> (f64, f64, f64) {
        if traffic.vehicles_per_hour <= 0.0 {
            return (f64::INFINITY, f64::INFINITY, 0.0);
        }
        // Vehicles are at least a second apart: the cover settles between them.
        let start = after + MIN_VEHICLE_GAP_S + rng.exp(3_600.0 / traffic.vehicles_per_hour);
        let len = rng.range(traffic.spike_s[0], traffic.spike_s[1]);
        let deg = rng.range(traffic.spike_deg[0], traffic.spike_deg[1]);
        (start, start + len, deg)
    }

    /// Tilt from traffic at `t`, advancing past spikes that ended.
    fn tilt_at(&mut self, t: f64) -> f64 {
        while self.spike.1 <= t {
            self.spike = Self::draw(&mut self.rng, &self.traffic, self.spike.1);
        }
        if t >= self.spike.0 { self.spike.2 } else { 0.0 }
    }

    fn next_start_after(&mut self, t: f64) -> f64 {
        self.tilt_at(t);
        if self.spike.0 > t { self.spike.0 } else { self.spike.1 }
    }
}

/// The world around one manhole cover.
#[derive(Debug, Clone)]
pub struct CoverWorld {
    baseline: [f64; 3],
    axis: [f64; 3],
    vehicles: Vehicles,
    tampers: Vec<Tamper>,
    has_switch: bool,
    water_probe: bool,
    noise: Rng,
    street: Arc<str>,
}

impl CoverWorld {
    /// A cover installed at `baseline_mg`, in `street`.
    pub fn new(
        seed: u64,
        index: u64,
        baseline_mg: [i16; 3],
        has_switch: bool,
        water_probe: bool,
        traffic: &Traffic,
        street: Arc<str>,
    ) -> Self {
        let b = baseline_mg.map(f64::from);
        let norm = (b[0] * b[0] + b[1] * b[1] + b[2] * b[2]).sqrt().max(1.0);
        let baseline = [b[0] / norm, b[1] / norm, b[2] / norm];
        // A horizontal axis perpendicular to the baseline to tilt around.
        let mut rng = Rng::derive(seed, 10, index);
        let angle = rng.range(0.0, 2.0 * PI);
        let h = [angle.cos(), angle.sin(), 0.0];
        let axis = normalize(cross(baseline, h));
        CoverWorld {
            baseline,
            axis,
            vehicles: Vehicles::new(Rng::derive(seed, 11, index), traffic.clone()),
            tampers: Vec::new(),
            has_switch,
            water_probe,
            noise: Rng::derive(seed, 12, index),
            street,
        }
    }

    /// Adds a tampering.
    pub fn tamper(&mut self, tamper: Tamper) {
        self.tampers.push(tamper);
    }

    fn tamper_at(&self, t: f64) -> Option<TheftMode> {
        self.tampers.iter().rev().find(|x| x.window.contains(t)).map(|x| x.mode)
    }

    /// The sensors at simulated second `t`.
    pub fn read(&mut self, t: f64, rain: &RainField) -> CoverInput {
        let traffic = self.vehicles.tilt_at(t);
        let tamper = self.tamper_at(t);
        let tilt_deg = match tamper {
            Some(TheftMode::Removed) => 178.0,
            Some(TheftMode::Displaced) => 32.0,
            Some(TheftMode::Lifted) => 15.0,
            None => traffic,
        } + self.noise.range(-0.15, 0.15);
        let v = rotate(self.baseline, self.axis, tilt_deg.to_radians());
        let accel_mg = v.map(|c| (c * 1000.0 + self.noise.range(-2.0, 2.0)).round() as i16);
        let switch = if !self.has_switch {
            SwitchState::Absent
        } else if tamper.is_some() {
            SwitchState::Open
        } else {
            SwitchState::Closed
        };
        let water_mm = self.water_probe.then(|| {
            // Water under a storm-water cover follows the rain with a lag-free toy model.
            let r = rain.mm_h(t, &self.street);
            (r * 6.0).min(2_000.0) as u16
        });
        CoverInput { accel_mg, switch, water_mm }
    }

    /// The next moment after `t` something moves the cover (a motion interrupt).
    pub fn next_interrupt(&mut self, t: f64) -> f64 {
        let tampers = self
            .tampers
            .iter()
            .flat_map(|x| [x.window.start, x.window.end])
            .filter(|s| *s > t)
            .fold(f64::INFINITY, f64::min);
        self.vehicles.next_start_after(t).min(tampers)
    }
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn normalize(v: [f64; 3]) -> [f64; 3] {
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    if n < 1e-12 { [1.0, 0.0, 0.0] } else { [v[0] / n, v[1] / n, v[2] / n] }
}

/// Rodrigues' rotation of `v` around unit `axis` by `angle` radians.
fn rotate(v: [f64; 3], axis: [f64; 3], angle: f64) -> [f64; 3] {
    let (s, c) = angle.sin_cos();
    let k = axis;
    let kxv = cross(k, v);
    let kdv = k[0] * v[0] + k[1] * v[1] + k[2] * v[2];
    [0, 1, 2].map(|i| v[i] * c + kxv[i] * s + k[i] * kdv * (1.0 - c))
}

/// Integration step of the well model, simulated seconds.
const WELL_STEP_S: f64 = 10.0;

/// The water in one drainage well.
#[derive(Debug, Clone)]
pub struct DrainWorld {
    level: f64,
    base: f64,
    depth: f64,
    catchment: f64,
    drain_k: f64,
    drain_max: f64,
    t: f64,
    street: Arc<str>,
    noise: Rng,
}

impl DrainWorld {
    /// A well `depth_mm` deep with a `catchment` factor, in `street`.
    pub fn new(seed: u64, index: u64, depth_mm: u16, catchment: f64, street: Arc<str>) -> Self {
        let mut rng = Rng::derive(seed, 20, index);
        let base = rng.range(200.0, 600.0);
        DrainWorld {
            level: base,
            base,
            depth: f64::from(depth_mm),
            catchment,
            drain_k: (2f64).ln() / rng.range(400.0, 900.0),
            drain_max: rng.range(1.0, 1.6),
            t: 0.0,
            street,
            noise: Rng::derive(seed, 21, index),
        }
    }

    fn advance(&mut self, t: f64, rain: &RainField) {
        while self.t + WELL_STEP_S <= t {
            let r = rain.mm_h(self.t, &self.street);
            // Runoff from the catchment (about 150× the well's cross-section) flows in;
            // the outlet drains the excess above the base level, up to its capacity.
            let inflow = self.catchment * r * 150.0 / 3_600.0;
            let outflow = (self.drain_k * (self.level - self.base)).clamp(0.0, self.drain_max);
            self.level = (self.level + (inflow - outflow) * WELL_STEP_S).clamp(0.0, self.depth);
            self.t += WELL_STEP_S;
        }
    }

    /// The level sensor at simulated second `t`.
    pub fn read(&mut self, t: f64, rain: &RainField) -> DrainInput {
        self.advance(t, rain);
        let mm = (self.level + self.noise.range(-3.0, 3.0)).clamp(0.0, 7_000.0);
        DrainInput { level_mm: mm.round() as u16 }
    }
}

/// Something a grid worker does at a moment.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerAction {
    /// Reaches a checkpoint.
    CheckIn(u32),
    /// Files a report.
    Report(CaseClass),
    /// Presses SOS.
    Sos,
}

/// A grid worker and their beacon.
#[derive(Debug, Clone)]
pub struct BeaconWorld {
    grid: [f64; 4],
    checkpoints: Vec<(f64, f64, u32)>,
    rng: Rng,
    on_patrol: bool,
    leg: Leg,
    next_cp: usize,
    incidents_per_hour: f64,
    next_incident: f64,
    sos: Vec<f64>,
    pending: Vec<(f64, WorkerAction)>,
    started: bool,
}

/// One straight walk of a patrol.
#[derive(Debug, Clone, Copy)]
struct Leg {
    from: (f64, f64),
    to: (f64, f64),
    start: f64,
    end: f64,
    /// The checkpoint reached at the end, if any.
    checkpoint: Option<u32>,
}

/// Walking speed, m/s.
const WALK_M_S: f64 = 1.2;
/// Metres per degree of latitude.
const M_PER_DEG: f64 = 111_320.0;

/// Incident classes grid workers report: road ponding, sewer blocked, broken cover.
const REPORT_CLASSES: [CaseClass; 3] = [
    CaseClass { kind: ClassKind::Event, major: 4, minor: 6 },
    CaseClass { kind: ClassKind::Event, major: 4, minor: 4 },
    CaseClass { kind: ClassKind::Component, major: 1, minor: 2 },
];

impl BeaconWorld {
    /// A worker patrolling `grid` (index for the seed), with the scenario's patrol settings.
    pub fn new(seed: u64, index: u64, grid: &Grid, scenario: &Scenario, sos: Vec<f64>) -> Self {
        let mut rng = Rng::derive(seed, 30, index);
        let mut cp_rng = Rng::derive(seed, 31, index);
        let checkpoints = (0..scenario.patrol.checkpoints_per_grid)
            .map(|i| {
                let (lat, lon) = grid.random_point(&mut cp_rng);
                // Checkpoint ids: grid sequence in the high digits, checkpoint in the low.
                (lat, lon, (index as u32 + 1) * 100 + i + 1)
            })
            .collect::<Vec<_>>();
        let on_patrol = rng.chance(scenario.patrol.on_patrol);
        let start = grid.random_point(&mut rng);
        let incidents_per_hour = scenario.patrol.incidents_per_hour;
        let next_incident = if incidents_per_hour > 0.0 {
            rng.exp(3_600.0 / incidents_per_hour)
        } else {
            f64::INFINITY
        };
        let mut world = BeaconWorld {
            grid: grid.bbox,
            checkpoints,
            rng,
            on_patrol,
            leg: Leg { from: start, to: start, start: 0.0, end: 0.0, checkpoint: None },
            next_cp: 0,
            incidents_per_hour,
            next_incident,
            sos,
            pending: Vec::new(),
            started: false,
        };
        world.plan_leg();
        world
    }

    /// Whether the worker patrols during this run.
    pub fn on_patrol(&self) -> bool {
        self.on_patrol
    }

    fn plan_leg(&mut self) {
        let from = self.leg.to;
        let t0 = self.leg.end;
        let (to, cp) = if self.checkpoints.is_empty() || self.rng.chance(0.5) {
            let [s, w, n, e] = self.grid;
            ((self.rng.range(s, n), self.rng.range(w, e)), None)
        } else {
            let (lat, lon, id) = self.checkpoints[self.next_cp % self.checkpoints.len()];
            self.next_cp += 1;
            ((lat, lon), Some(id))
        };
        let dy = (to.0 - from.0) * M_PER_DEG;
        let dx = (to.1 - from.1) * M_PER_DEG * from.0.to_radians().cos();
        let secs = (dx.hypot(dy) / WALK_M_S).max(5.0) + self.rng.range(0.0, 60.0);
        self.leg = Leg { from, to, start: t0, end: t0 + secs, checkpoint: cp };
    }

    fn advance(&mut self, t: f64) {
        if !self.on_patrol {
            return;
        }
        while self.leg.end <= t {
            if let Some(cp) = self.leg.checkpoint {
                self.pending.push((self.leg.end, WorkerAction::CheckIn(cp)));
            }
            self.plan_leg();
        }
        while self.next_incident <= t {
            let class = REPORT_CLASSES[self.rng.below(REPORT_CLASSES.len() as u64) as usize];
            self.pending.push((self.next_incident, WorkerAction::Report(class)));
            self.next_incident += self.rng.exp(3_600.0 / self.incidents_per_hour);
        }
    }

    /// Where the worker is at `t` (a GNSS fix with a little error).
    pub fn fix(&mut self, t: f64) -> PositionFix {
        self.advance(t);
        let Leg { from: (la0, lo0), to: (la1, lo1), start: t0, end: t1, .. } = self.leg;
        let x = if t1 > t0 { ((t - t0) / (t1 - t0)).clamp(0.0, 1.0) } else { 1.0 };
        let lat = la0 + (la1 - la0) * x + self.rng.range(-2e-5, 2e-5);
        let lon = lo0 + (lo1 - lo0) * x + self.rng.range(-2e-5, 2e-5);
        PositionFix {
            lat_udeg: (lat * 1e6).round() as i32,
            lon_udeg: (lon * 1e6).round() as i32,
            accuracy_m: 3 + self.rng.below(6) as u16,
        }
    }

    /// The next action after `t`, if any, without taking it.
    pub fn next_action_at(&mut self, t: f64) -> f64 {
        if !self.started {
            // The patrol start (or nothing) is taken at once.
            return t;
        }
        self.advance(t);
        let pending = self.pending.iter().map(|(at, _)| *at).fold(f64::INFINITY, f64::min);
        let sos = self.sos.iter().copied().filter(|s| *s > t).fold(f64::INFINITY, f64::min);
        let leg_end = if self.on_patrol && self.leg.checkpoint.is_some() {
            self.leg.end
        } else {
            f64::INFINITY
        };
        let incident = if self.on_patrol { self.next_incident } else { f64::INFINITY };
        pending.min(sos).min(leg_end).min(incident)
    }

    /// The actions due by `t`, oldest first; the patrol start comes first of all.
    pub fn take_actions(&mut self, t: f64) -> Vec<BeaconInput> {
        self.advance(t);
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            if self.on_patrol {
                out.push(BeaconInput::PatrolStart);
            }
        }
        let mut due: Vec<(f64, WorkerAction)> = Vec::new();
        self.pending.retain(|(at, a)| {
            if *at <= t {
                due.push((*at, a.clone()));
                false
            } else {
                true
            }
        });
        for s in self.sos.iter_mut() {
            if *s <= t {
                due.push((*s, WorkerAction::Sos));
                *s = f64::INFINITY;
            }
        }
        due.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, action) in due {
            out.push(match action {
                WorkerAction::CheckIn(id) => BeaconInput::CheckIn(id),
                WorkerAction::Sos => BeaconInput::Sos,
                WorkerAction::Report(class) => {
                    let text = match (class.kind, class.minor) {
                        (ClassKind::Event, 6) => "路面积水",
                        (ClassKind::Event, _) => "下水道堵塞冒水",
                        (ClassKind::Component, _) => "井盖破损",
                    };
                    let mut note = heapless::String::new();
                    let _ = note.push_str(text);
                    BeaconInput::Report { class, note }
                }
            });
        }
        out
    }
}

/// A device's battery, radio and temperature.
#[derive(Debug, Clone)]
pub struct Supply {
    start_mv: f64,
    mv_per_s: f64,
    rssi: f64,
    temperature: f64,
    noise: Rng,
}

impl Supply {
    /// The supply of device `index` of a stream, per the scenario's battery settings.
    pub fn new(seed: u64, stream: u64, index: u64, scenario: &Scenario) -> Self {
        let mut rng = Rng::derive(seed, 40 + stream, index);
        let low = rng.chance(scenario.battery.low_fraction);
        Supply {
            start_mv: if low { rng.range(3_200.0, 3_290.0) } else { rng.range(3_450.0, 3_650.0) },
            mv_per_s: scenario.battery.drain_mv_per_day / 86_400.0,
            rssi: rng.range(-105.0, -65.0),
            temperature: rng.range(80.0, 260.0),
            noise: Rng::derive(seed, 50 + stream, index),
        }
    }

    /// Readings at `t`.
    pub fn health(&mut self, t: f64) -> Health {
        Health {
            battery_mv: (self.start_mv - self.mv_per_s * t + self.noise.range(-3.0, 3.0)).max(0.0)
                as u16,
            rssi_dbm: (self.rssi + self.noise.range(-4.0, 4.0)).round() as i16,
            temperature_dc: (self.temperature + self.noise.range(-5.0, 5.0)).round() as i16,
        }
    }
}

#[cfg(test)]
mod tests {
    use gridsense_firmware::cover::Cover;

    use super::*;
    use crate::scenario::Span;

    fn span(s: u64) -> Span {
        Span(std::time::Duration::from_secs(s))
    }

    #[test]
    fn cover_tilt_follows_traffic_and_tampering() {
        let traffic =
            Traffic { vehicles_per_hour: 3_600.0, spike_deg: [20.0, 20.0], spike_s: [0.5, 0.5] };
        let mut world = CoverWorld::new(1, 0, [30, -20, 998], true, false, &traffic, "s".into());
        let cover = Cover::new([30, -20, 998]);
        let rain = RainField::default();
        let mut max_tilt = 0;
        let mut t = 0.0;
        while t < 60.0 {
            let r = world.read(t, &rain);
            max_tilt = max_tilt.max(cover.tilt_ddeg(r.accel_mg));
            t += 0.1;
        }
        assert!((195..=205).contains(&max_tilt), "{max_tilt}");
        world.tamper(Tamper {
            window: Window { start: 100.0, end: 200.0 },
            mode: TheftMode::Removed,
        });
        let r = world.read(150.0, &rain);
        assert!(cover.tilt_ddeg(r.accel_mg) > 1_700);
        assert_eq!(r.switch, SwitchState::Open);
        assert_eq!(world.next_interrupt(60.0).min(100.0), world.next_interrupt(60.0).min(100.0));
    }

    #[test]
    fn a_heavy_storm_fills_a_well_and_it_drains_afterwards() {
        let rain = RainField::new(&[Rain {
            start: span(0),
            duration: span(3_600),
            peak_mm_h: 80.0,
            streets: vec![],
        }]);
        let mut well = DrainWorld::new(1, 0, 5_000, 1.0, "s".into());
        let before = well.read(0.0, &rain).level_mm;
        let peak =
            (1..=72).map(|i| well.read(f64::from(i) * 60.0, &rain).level_mm).max().unwrap_or(0);
        let after = well.read(4.0 * 3_600.0, &rain).level_mm;
        assert!(peak > 3_000, "{before} -> {peak}");
        assert!(after < 1_000, "{after}");
        // Rain in another street does not reach it.
        let elsewhere = RainField::new(&[Rain {
            start: span(0),
            duration: span(3_600),
            peak_mm_h: 80.0,
            streets: vec!["x".into()],
        }]);
        let mut dry = DrainWorld::new(1, 0, 5_000, 1.0, "s".into());
        assert!(dry.read(1_800.0, &elsewhere).level_mm < 700);
    }
}
