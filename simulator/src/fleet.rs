//! `gridsim run`: builds the simulated district from a `gridsim city` folder and a scenario,
//! and runs every device's real firmware against a broker.
//!
//! Transports:
//! - **per-device** (default): every device is its own tokio task running the firmware's MQTT
//!   session over its own TCP connection and credentials, exactly as on a board.
//! - **pooled** (load generation): a few rumqttc connections publish on behalf of many devices.
//!   The firmware core decides what and when, as always; a frame counts as delivered once it is
//!   handed to rumqttc, whose own session state retransmits it. Device-level PUBACK handling is
//!   what the per-device transport exercises.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use gridsense_firmware::{
    Device, DeviceStats, Identity, Instant, WallClock,
    beacon::Beacon,
    counter::{CounterStore, RamStore},
    cover::Cover,
    drain::Drain,
    outbox::OutboxStats,
    sensing::Sensing,
    session::{self, Credentials, Platform, SessionConfig, SessionStats},
};
use gridsense_protocol::{
    DeviceKey, Direction, FirmwareVersion, ResetCause, Setting, topic::topic,
};
use tokio::{sync::watch, task::JoinSet};

use crate::{
    city::{self, Grid},
    clock::SimClock,
    fidelity::{FidelityPlatform, RadioConfig},
    inventory::{self, Device as Record, Kind},
    link::{Outages, SimPlatform},
    mischief,
    model::{BeaconModel, CoverModel, DrainModel, Env, Model, SimBoard, secs},
    physics::{BeaconWorld, CoverWorld, DrainWorld, RainField, Supply, Tamper, Window},
    rng::Rng,
    scenario::{Mischief, Scenario},
    stats::{Counters, KIND_NAMES, Summary},
};

/// Firmware version the simulated devices run.
pub const FIRMWARE: FirmwareVersion = FirmwareVersion { major: 1, minor: 0, patch: 0 };

/// Urgent-queue and telemetry-queue sizes of a per-device simulated device.
pub const PER_DEVICE_QUEUES: (usize, usize) = (8, 128);
/// The same for pooled devices, kept small for memory per device.
pub const POOLED_QUEUES: (usize, usize) = (4, 16);

/// How devices reach the broker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transport {
    /// One connection per device through the firmware's own client.
    PerDevice,
    /// One connection per device through the firmware's own client, over the device's own
    /// embassy-net TCP/IP stack and a simulated radio link (see [`crate::fidelity`]).
    Fidelity(RadioConfig),
    /// A few rumqttc connections on behalf of all devices.
    Pooled {
        /// Connections.
        connections: usize,
        /// QoS of the publishes.
        qos1: bool,
    },
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Broker address (loopback in tests).
    pub broker: SocketAddr,
    /// Other brokers a per-device device fails over to when a connection attempt fails (in
    /// turn, after its backoff).
    pub failover: Vec<SocketAddr>,
    /// TLS to the broker, verifying its certificate (per-device and pooled transports).
    pub tls: Option<crate::tls::Tls>,
    /// Scenario.
    pub scenario: Scenario,
    /// Simulated seconds per real second.
    pub speed: f64,
    /// Wall-clock length of the run; `None` until the shutdown signal.
    pub duration: Option<Duration>,
    /// How devices connect.
    pub transport: Transport,
    /// Only the first N devices of the inventory (after bad actors are chosen).
    pub limit: Option<usize>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// The run's clock, when the caller shares it (the gateway in `gridsense demo`); `None`
    /// starts one from `speed` and `duration`.
    pub clock: Option<SimClock>,
}

impl RunOptions {
    /// Load generation: the pooled transport (4 connections, QoS 1) for `duration` of wall
    /// clock on its own clock, plain MQTT, no progress bar.
    pub fn pooled(broker: SocketAddr, scenario: Scenario, speed: f64, duration: Duration) -> Self {
        RunOptions {
            broker,
            failover: Vec::new(),
            tls: None,
            scenario,
            speed,
            duration: Some(duration),
            transport: Transport::Pooled { connections: 4, qos1: true },
            limit: None,
            progress: false,
            clock: None,
        }
    }
}

/// One device, ready to run.
#[derive(Debug)]
pub struct Planned {
    /// Its inventory record.
    pub record: Record,
    /// The key it seals with (differs from the inventory for wrong-key actors).
    pub key: DeviceKey,
    /// Its outages.
    pub outages: Outages,
    /// Its world.
    pub model: AnyModel,
}

/// A device's world, by kind.
#[derive(Debug)]
pub enum AnyModel {
    /// A cover, its installed baseline and boot settings.
    Cover(CoverModel, [i16; 3], Vec<Setting>),
    /// A drain and its boot settings (its well's levels among them).
    Drain(DrainModel, Vec<Setting>),
    /// A beacon and its boot settings.
    Beacon(BeaconModel, Vec<Setting>),
}

/// The district and scenario turned into devices and actors.
#[derive(Debug)]
pub struct Plan {
    /// Devices that run the firmware.
    pub devices: Vec<Planned>,
    /// Misbehaving senders.
    pub actors: Vec<mischief::Actor>,
    /// Shared world facts.
    pub env: Arc<Env>,
}

fn street_of(grids: &[Grid], lat: f64, lon: f64) -> Option<&Grid> {
    grids.iter().find(|g| g.contains(lat, lon))
}

fn secs_of(span: crate::scenario::Span) -> f64 {
    span.secs()
}

/// Reads the city folder and lays out the run.
pub fn plan(city_dir: &Path, scenario: &Scenario) -> Result<Plan> {
    let records = inventory::load(&city_dir.join("devices.json"))?;
    let grids = city::load_grids(city_dir)?;
    if records.is_empty() {
        bail!("{}: no devices", city_dir.join("devices.json").display());
    }
    let seed = scenario.seed;
    let by_kind = |k: Kind| -> Vec<usize> {
        records.iter().enumerate().filter(|(_, r)| r.record.kind == k).map(|(i, _)| i).collect()
    };
    let covers = by_kind(Kind::Cover);
    let beacons = by_kind(Kind::Beacon);
    let mut pick_rng = Rng::derive(seed, 60, 0);
    let mut choose = |pool: &[usize], n: usize, taken: &BTreeSet<usize>| -> Vec<usize> {
        let free: Vec<usize> = pool.iter().copied().filter(|i| !taken.contains(i)).collect();
        let mut out = Vec::new();
        let mut candidates = free;
        while out.len() < n && !candidates.is_empty() {
            let at = pick_rng.below(candidates.len() as u64) as usize;
            out.push(candidates.swap_remove(at));
        }
        out
    };
    let index_of: HashMap<&str, usize> =
        records.iter().enumerate().map(|(i, r)| (r.record.eui.as_str(), i)).collect();
    let named = |euis: &[String], what: &str| -> Result<Vec<usize>> {
        euis.iter()
            .map(|e| {
                index_of
                    .get(e.as_str())
                    .copied()
                    .with_context(|| format!("{what}: no device {e} in the inventory"))
            })
            .collect()
    };

    // Thefts.
    let mut tampers: HashMap<usize, Vec<Tamper>> = HashMap::new();
    let mut taken = BTreeSet::new();
    for (i, theft) in scenario.theft.iter().enumerate() {
        let targets = if theft.euis.is_empty() {
            choose(&covers, theft.covers, &taken)
        } else {
            named(&theft.euis, &format!("theft[{i}]"))?
        };
        let start = secs_of(theft.at);
        let end = theft.restore_after.map_or(f64::INFINITY, |r| start + secs_of(r));
        for t in targets {
            taken.insert(t);
            tampers
                .entry(t)
                .or_default()
                .push(Tamper { window: Window { start, end }, mode: theft.mode });
        }
    }
    // Misbehaving devices (never theft targets).
    let mut wrong_key = BTreeSet::new();
    let mut actors = Vec::new();
    for (i, bad) in scenario.bad_actor.iter().enumerate() {
        let chosen = choose(&covers, bad.devices, &taken);
        taken.extend(chosen.iter().copied());
        match bad.mode {
            Mischief::WrongKey => wrong_key.extend(chosen),
            mode => {
                for t in chosen {
                    let r = &records[t];
                    actors.push(mischief::Actor {
                        mode,
                        eui: r.eui,
                        key: r.key.clone(),
                        rate_per_s: bad.rate_per_s,
                        seed: Rng::derive(seed, 70 + i as u64, t as u64).next_u64(),
                    });
                }
            }
        }
    }
    let flooders: BTreeSet<_> =
        actors.iter().filter(|a| a.mode == Mischief::Flood).map(|a| a.eui).collect();

    // Outages.
    let mut outages: HashMap<usize, Vec<Window>> = HashMap::new();
    for (i, o) in scenario.outage.iter().enumerate() {
        let window =
            Window { start: secs_of(o.start), end: secs_of(o.start) + secs_of(o.duration) };
        let mut targets = named(&o.euis, &format!("outage[{i}]"))?;
        if !o.streets.is_empty() {
            targets.extend(records.iter().enumerate().filter_map(|(idx, r)| {
                let g = street_of(&grids, r.record.lat, r.record.lon)?;
                o.streets.contains(&g.street_code).then_some(idx)
            }));
        }
        if o.streets.is_empty() && o.euis.is_empty() {
            let mut rng = Rng::derive(seed, 80, i as u64);
            let share = o.fraction.unwrap_or(0.0);
            targets.extend((0..records.len()).filter(|_| rng.chance(share)));
        }
        for t in targets {
            outages.entry(t).or_default().push(window);
        }
    }
    // SOS presses go to workers on patrol.
    let mut sos: HashMap<usize, Vec<f64>> = HashMap::new();
    for s in &scenario.patrol.sos {
        for t in choose(&beacons, s.count, &BTreeSet::new()) {
            sos.entry(t).or_default().push(secs_of(s.at));
        }
    }

    let boot_settings = scenario.device_config.settings();
    // One shared string per street, not one per device.
    let streets: HashMap<&str, Arc<str>> =
        grids.iter().map(|g| (g.street_code.as_str(), Arc::from(g.street_code.as_str()))).collect();
    let no_street: Arc<str> = Arc::from("");
    let street_code = |r: &Record| -> Arc<str> {
        street_of(&grids, r.record.lat, r.record.lon)
            .and_then(|g| streets.get(g.street_code.as_str()).cloned())
            .unwrap_or_else(|| no_street.clone())
    };
    let mut devices = Vec::new();
    for (idx, r) in records.iter().enumerate() {
        if flooders.contains(&r.eui) {
            continue;
        }
        let i = idx as u64;
        let supply = Supply::new(seed, 0, i, scenario);
        let rec = &r.record;
        let model = match rec.kind {
            Kind::Cover => {
                let baseline = rec.baseline_mg.unwrap_or([0, 0, 1000]);
                let mut world = CoverWorld::new(
                    seed,
                    i,
                    baseline,
                    rec.has_switch.unwrap_or(false),
                    rec.has_water_probe.unwrap_or(false),
                    &scenario.traffic,
                    street_code(r),
                );
                for t in tampers.remove(&idx).unwrap_or_default() {
                    world.tamper(t);
                }
                AnyModel::Cover(CoverModel { world, supply }, baseline, boot_settings.clone())
            }
            Kind::Drain => {
                let world = DrainWorld::new(
                    seed,
                    i,
                    rec.well_depth_mm.unwrap_or(5_000),
                    rec.catchment.unwrap_or(1.0),
                    street_code(r),
                );
                let mut settings = boot_settings.clone();
                if let (Some(warn), Some(alarm)) = (rec.warn_mm, rec.alarm_mm) {
                    settings.push(Setting::DrainWarnMm(warn));
                    settings.push(Setting::DrainAlarmMm(alarm));
                }
                AnyModel::Drain(DrainModel { world, supply }, settings)
            }
            Kind::Beacon => {
                let grid = rec
                    .grid_code
                    .as_ref()
                    .and_then(|c| grids.iter().find(|g| &g.grid_code == c))
                    .or_else(|| street_of(&grids, rec.lat, rec.lon))
                    .or(grids.first())
                    .context("the city has no grids")?;
                let world =
                    BeaconWorld::new(seed, i, grid, scenario, sos.remove(&idx).unwrap_or_default());
                AnyModel::Beacon(BeaconModel { world, supply }, boot_settings.clone())
            }
        };
        let key = if wrong_key.contains(&idx) {
            DeviceKey::from_bytes(Rng::derive(seed, 90, i).bytes::<16>())
        } else {
            r.key.clone()
        };
        let outages = Outages(outages.remove(&idx).unwrap_or_default().into());
        devices.push(Planned { record: r.clone(), key, outages, model });
    }
    Ok(Plan { devices, actors, env: Arc::new(Env { rain: RainField::new(&scenario.rain) }) })
}

/// What one device's task reports at the end.
#[derive(Debug, Clone, Default)]
pub struct DeviceReport {
    /// Device counters.
    pub device: DeviceStats,
    /// Outbox counters.
    pub outbox: OutboxStats,
    /// Session counters.
    pub session: SessionStats,
    /// End-to-end confirmations (both lanes).
    pub confirm: ConfirmReport,
}

/// What became of the frames a device kept for the gateway's confirmation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfirmReport {
    /// Confirmed by the gateway.
    pub confirmed: u64,
    /// Given up unconfirmed (no room, or too far behind the gateway's window).
    pub given_up: u64,
    /// Copies sent for want of a confirmation.
    pub resent: u64,
    /// Still awaiting confirmation at the end: the device and the counters.
    pub held: Vec<(gridsense_protocol::Eui, u32)>,
}

impl ConfirmReport {
    /// A device's, as it ends.
    pub fn of<S: Sensing, C: CounterStore, const U: usize, const T: usize>(
        device: &Device<S, C, U, T>,
    ) -> Self {
        let (u, t) = (device.confirmations(), device.telemetry_confirmations());
        ConfirmReport {
            confirmed: u64::from(u.confirmed) + u64::from(t.confirmed),
            given_up: u64::from(u.dropped)
                + u64::from(u.expired)
                + u64::from(t.dropped)
                + u64::from(t.expired),
            resent: u64::from(u.resent) + u64::from(t.resent),
            held: u.counters().chain(t.counters()).map(|c| (device.eui(), c)).collect(),
        }
    }

    /// Adds another's.
    pub fn add(&mut self, other: ConfirmReport) {
        self.confirmed += other.confirmed;
        self.given_up += other.given_up;
        self.resent += other.resent;
        self.held.extend(other.held);
    }
}

fn identity(planned: &Planned) -> Identity {
    Identity {
        eui: planned.record.eui,
        key: planned.key.clone(),
        firmware: FIRMWARE,
        reset_cause: ResetCause::PowerOn,
    }
}

/// Session settings for a simulated device: keep-alive and timeouts are real-time facts of
/// the broker, so they are stretched by the speed in device time.
pub fn session_config(speed: f64) -> SessionConfig {
    let stretch = |real_ms: f64| (real_ms * speed.max(1.0)) as u64;
    SessionConfig {
        keep_alive_s: 120,
        ping_after_ms: stretch(60_000.0),
        session_expiry_s: 7 * 86_400,
        backoff_base_ms: 1_000,
        backoff_max_ms: 120_000,
        response_timeout_ms: stretch(20_000.0).max(30_000),
    }
}

/// Applies the boot settings the device's kind has.
pub fn configure<S: Sensing, C: CounterStore, const U: usize, const T: usize>(
    device: &mut Device<S, C, U, T>,
    settings: &[Setting],
) {
    let supported: Vec<Setting> =
        settings.iter().copied().filter(|s| gridsense_firmware::supports(S::KIND, s)).collect();
    device.configure(&supported);
}

/// Runs one device through the firmware's MQTT session until shutdown.
#[allow(clippy::too_many_arguments)]
pub async fn run_device<M, C, P>(
    planned_identity: Identity,
    sensing: M::Sensing,
    settings: Vec<Setting>,
    store: C,
    model: M,
    password: String,
    platform: P,
    clock: SimClock,
    env: Arc<Env>,
    shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Result<(DeviceReport, C)>
where
    M: Model,
    <M::Sensing as Sensing>::Input: Send,
    C: CounterStore + Send,
    P: Platform,
{
    const U: usize = PER_DEVICE_QUEUES.0;
    const T: usize = PER_DEVICE_QUEUES.1;
    let mut device: Device<M::Sensing, C, U, T> = Device::boot(
        planned_identity,
        sensing,
        store,
        WallClock::new(clock.start_device_time()),
        clock.device_now(),
    )
    .map_err(|e| anyhow::anyhow!("counter store: {e:?}"))?;
    configure(&mut device, &settings);
    let mut board = SimBoard::new(model, env, clock, shutdown, counters);
    let mut platform = platform;
    let config = session_config(clock.speed());
    let session = session::run(
        &mut platform,
        &mut device,
        &mut board,
        Credentials { password: &password },
        config,
    )
    .await;
    let report = DeviceReport {
        device: device.stats(),
        outbox: device.outbox_stats(),
        session,
        confirm: ConfirmReport::of(&device),
    };
    Ok((report, device.into_store()))
}

/// What every per-device task of a run shares.
#[derive(Clone)]
struct Shared {
    broker: SocketAddr,
    failover: Arc<[SocketAddr]>,
    clock: SimClock,
    env: Arc<Env>,
    shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
    seed: u64,
    radio: Option<RadioConfig>,
    tls: Option<crate::tls::Tls>,
}

fn spawn_planned(set: &mut JoinSet<Result<DeviceReport>>, planned: Planned, shared: &Shared) {
    let Shared {
        broker,
        ref failover,
        clock,
        ref env,
        ref shutdown,
        ref counters,
        seed,
        radio,
        ref tls,
    } = *shared;
    let env = env.clone();
    let id = identity(&planned);
    let radio = radio.map(|r| {
        (
            r,
            broker,
            planned.outages.clone(),
            Rng::derive(seed, 110, planned.record.eui.0).next_u64(),
        )
    });
    let platform = SimPlatform::new(
        clock,
        broker,
        planned.outages.clone(),
        Rng::derive(seed, 100, planned.record.eui.0),
    )
    .with_tls(tls.clone())
    .with_failover(failover)
    .counting(counters.clone());
    let password = planned.record.record.mqtt_password.clone();
    let (shutdown, counters) = (shutdown.clone(), counters.clone());
    let launch = Launch { id, password, platform, radio, clock, env, shutdown, counters };
    match planned.model {
        AnyModel::Cover(model, baseline, settings) => {
            launch.spawn(set, Cover::new(baseline), settings, model)
        }
        AnyModel::Drain(model, settings) => launch.spawn(set, Drain::new(), settings, model),
        AnyModel::Beacon(model, settings) => launch.spawn(set, Beacon::new(), settings, model),
    }
}

/// What every device task needs besides its kind.
struct Launch {
    id: Identity,
    password: String,
    platform: SimPlatform,
    radio: Option<(RadioConfig, SocketAddr, Outages, u64)>,
    clock: SimClock,
    env: Arc<Env>,
    shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
}

impl Launch {
    fn spawn<M: Model>(
        self,
        set: &mut JoinSet<Result<DeviceReport>>,
        sensing: M::Sensing,
        settings: Vec<Setting>,
        model: M,
    ) where
        <M::Sensing as Sensing>::Input: Send,
    {
        let Launch { id, password, platform, radio, clock, env, shutdown, counters } = self;
        set.spawn_local(async move {
            let store = RamStore::default();
            let report = match radio {
                None => {
                    let run = run_device(
                        id, sensing, settings, store, model, password, platform, clock, env,
                        shutdown, counters,
                    );
                    run.await
                }
                Some((config, broker, outages, seed)) => {
                    let platform = FidelityPlatform::start(clock, broker, outages, config, seed);
                    let run = run_device(
                        id, sensing, settings, store, model, password, platform, clock, env,
                        shutdown, counters,
                    );
                    run.await
                }
            };
            report.map(|(report, _)| report)
        });
    }
}

/// Per-device sessions are not `Send` (the no_std MQTT client holds raw buffers), so they run
/// on one single-threaded runtime per core, each with its share of the devices.
fn spawn_threads(
    devices: Vec<Planned>,
    shared: &Shared,
) -> Result<Vec<std::thread::JoinHandle<Result<Vec<DeviceReport>>>>> {
    let workers = std::thread::available_parallelism().map_or(2, usize::from).max(1);
    let mut shares: Vec<Vec<Planned>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, d) in devices.into_iter().enumerate() {
        if let Some(share) = shares.get_mut(i % workers) {
            share.push(d);
        }
    }
    let mut handles = Vec::new();
    for (n, share) in shares.into_iter().enumerate() {
        let shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("gridsim-devices-{n}"))
            .spawn(move || -> Result<Vec<DeviceReport>> {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let mut set = JoinSet::new();
                    for planned in share {
                        spawn_planned(&mut set, planned, &shared);
                    }
                    let mut reports = Vec::new();
                    while let Some(joined) = set.join_next().await {
                        reports.push(joined.context("a device task failed")??);
                    }
                    Ok(reports)
                })
            })
            .context("starting a device thread")?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Runs the plan until the duration elapses or `stop` turns true. Returns the summary.
pub async fn run(
    plan: Plan,
    options: &RunOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<Summary> {
    let horizon = options.duration.unwrap_or(Duration::from_secs(3_600));
    // A clock the caller passes is the gateway's too (`gridsense demo`): its time syncs are on
    // the devices' timeline. Otherwise the gateway keeps the wall clock (SimClock::map_time_sync).
    let clock = options
        .clock
        .map(SimClock::shared_with_gateway)
        .unwrap_or_else(|| SimClock::start(options.speed, horizon));
    let counters = Arc::new(Counters::default());
    let (shutdown_tx, shutdown) = watch::channel(false);
    let seed = options.scenario.seed;
    let mut devices = plan.devices;
    if let Some(limit) = options.limit {
        devices.truncate(limit);
    }
    let device_count = devices.len();
    let mut set = JoinSet::new();
    let mut threads = Vec::new();
    match options.transport {
        Transport::PerDevice | Transport::Fidelity(_) => {
            let radio = match options.transport {
                Transport::Fidelity(r) => Some(r),
                _ => None,
            };
            if radio.is_some() && options.tls.is_some() {
                bail!(
                    "TLS is not available with the fidelity transport (its radio bridge carries plain MQTT): use per-device or pooled"
                );
            }
            let shared = Shared {
                broker: options.broker,
                failover: options.failover.clone().into(),
                clock,
                env: plan.env.clone(),
                shutdown: shutdown.clone(),
                counters: counters.clone(),
                seed,
                radio,
                tls: options.tls.clone(),
            };
            threads = spawn_threads(devices, &shared)?;
        }
        Transport::Pooled { connections, qos1 } => {
            crate::pooled::spawn(
                &mut set,
                devices,
                (options.broker, options.tls.as_ref()),
                clock,
                plan.env.clone(),
                &shutdown,
                &counters,
                (connections, qos1),
                // Devices boot at different times: their readings are spread over one report
                // interval instead of arriving in one burst per interval.
                options
                    .scenario
                    .device_config
                    .report_interval_s
                    .map_or(1_000, |s| u64::from(s) * 1_000),
            )?;
        }
    }
    let mut actor_set = JoinSet::new();
    for actor in plan.actors {
        actor_set.spawn(mischief::run(
            actor,
            options.broker,
            clock,
            shutdown.clone(),
            counters.clone(),
        ));
    }

    let progress = options.progress.then(|| crate::progress::bar(options.duration));
    let started = tokio::time::Instant::now();
    let deadline = options.duration.map(|d| started + d);
    loop {
        let tick = tokio::time::sleep(Duration::from_millis(250));
        tokio::select! {
            () = tick => {}
            _ = stop.changed() => break,
        }
        if let Some(bar) = &progress {
            crate::progress::update(bar, &clock, &counters, started);
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) || *stop.borrow() {
            break;
        }
    }
    let sim_seconds = clock.sim_ms() / 1000;
    let running_rss_kib = crate::stats::rss_kib();
    let _ = shutdown_tx.send(true);
    let mut summary =
        Summary { devices: device_count, sim_seconds, running_rss_kib, ..Summary::default() };
    let mut reports = Vec::new();
    while let Some(joined) = set.join_next().await {
        reports.push(joined.context("a device task failed")??);
    }
    for thread in threads {
        let joined = tokio::task::spawn_blocking(move || thread.join()).await?;
        let per_thread = joined.map_err(|_| anyhow::anyhow!("a device thread panicked"))??;
        reports.extend(per_thread);
    }
    for report in reports {
        summary.telemetry_dropped += u64::from(report.outbox.telemetry_dropped);
        summary.urgent_refused += u64::from(report.outbox.urgent_refused);
        summary.resends += u64::from(report.device.resends);
        summary.connects += u64::from(report.session.connects);
        summary.connection_failures += u64::from(report.session.failures);
        summary.downlinks += u64::from(report.session.downlinks);
        summary.confirm.add(report.confirm);
    }
    while actor_set.join_next().await.is_some() {}
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    summary.real_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    summary.sent =
        KIND_NAMES.iter().zip(counters.sent.iter()).map(|(k, c)| (*k, c.load(Relaxed))).collect();
    summary.bytes = counters.bytes.load(Relaxed);
    summary.alarms_raised = counters.sent[3].load(Relaxed);
    summary.alarms_cleared = counters.sent[4].load(Relaxed);
    summary.backlog_samples = counters.backlog_samples.load(Relaxed);
    summary.mischief = counters.mischief.load(Relaxed);
    summary.peak_rss_kib = crate::stats::peak_rss_kib();
    summary.broker_acked = counters.broker_acked.load(Relaxed);
    Ok(summary)
}

/// The uplink topic of a device.
pub fn uplink_topic(eui: gridsense_protocol::Eui) -> String {
    topic(eui, Direction::Uplink).to_string()
}

/// Device instant to simulated seconds (re-export for the pooled runner).
pub fn instant_secs(now: Instant) -> f64 {
    secs(now)
}
