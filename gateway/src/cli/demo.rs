//! `gridsense demo`: the whole job with nothing installed. It starts the embedded broker, the
//! gateway with SQLite in a data folder, and an in-process simulated district running a
//! scenario (every device the real firmware, each with its own MQTT connection); prints live
//! progress and a summary at the end. The gateway shares the simulator's clock, so device
//! times, health deadlines and telemetry times agree. Loopback only, no credentials.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::{Context, Result};
use gridsense_simulator::{
    city::{self, Counts},
    clock::SimClock,
    fleet::{self, RunOptions, Transport},
    inventory, scenario,
    stats::Summary,
};
use tokio::sync::watch;

use crate::{app, config::Config, status::Status, store::Totals};

/// A simulator's clock as the gateway's (demo and tests): device times, health deadlines
/// and time syncs then agree with the simulated devices.
pub fn shared_clock(sim: SimClock) -> crate::status::Clock {
    Arc::new(move || i64::try_from(sim.unix_ms(sim.sim_ms())).unwrap_or(i64::MAX))
}

/// `gridsense demo` options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Devices in the simulated district (covers, drains and beacons in the city's proportions).
    pub devices: usize,
    /// Scenario name or path.
    pub scenario: String,
    /// Simulated seconds per real second (default: the scenario's).
    pub speed: Option<f64>,
    /// How long to run (default: until Ctrl-C).
    pub duration: Option<Duration>,
    /// Data folder (the generated district; and the store, `store.path`, when given):
    /// `gridsense-data` when `None`.
    pub data: Option<PathBuf>,
    /// Where to serve the API and the dashboard (loopback; a free port if taken), when given:
    /// sets `http.listen`.
    pub http: Option<String>,
    /// A configuration file over the demo's own defaults.
    pub config: Option<PathBuf>,
    /// The environment (`GRIDSENSE_*` overrides).
    pub env: Vec<(String, String)>,
}

/// The demo's data folder when `--data` is not given.
pub const DEFAULT_DATA: &str = "gridsense-data";

/// The demo's own defaults, under the configuration file and the environment: the store in
/// the data folder, the generated district's grid layer, the API on 127.0.0.1:8080 without
/// credentials (loopback only).
fn demo_defaults(data: &std::path::Path) -> toml::Table {
    let mut t = toml::Table::new();
    let section = |pairs: &[(&str, String)]| {
        toml::Value::Table(
            pairs.iter().map(|(k, v)| ((*k).to_owned(), toml::Value::String(v.clone()))).collect(),
        )
    };
    t.insert("store".into(), section(&[("path", data.join("gridsense.db").display().to_string())]));
    t.insert(
        "geo".into(),
        section(&[("grids", data.join("city").join("grids.geojson").display().to_string())]),
    );
    t.insert(
        "http".into(),
        section(&[("listen", "127.0.0.1:8080".into()), ("auth", "off".into())]),
    );
    t
}

/// The demo's configuration: its defaults < `--config` < `GRIDSENSE_*` < the flags given.
pub fn demo_config(options: &DemoOptions) -> Result<Config> {
    let data = options.data.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    let mut config =
        crate::config::load_over(demo_defaults(&data), options.config.as_deref(), &options.env)?;
    if options.data.is_some() {
        config.store.path = data.join("gridsense.db");
    }
    if let Some(http) = &options.http {
        config.http.listen.clone_from(http);
    }
    if !config.mqtt.url.is_empty() {
        anyhow::bail!(
            "mqtt.url = {:?}: the demo runs its own embedded broker (use `gridsense run` for another)",
            config.mqtt.url
        );
    }
    Ok(config)
}

/// Device counts for `n` devices in the default district's proportions (2000:300:239).
pub fn counts_for(n: usize) -> Counts {
    let beacons = (n * 239).div_ceil(2_539).max(1).min(n);
    let drains = (n * 300 / 2_539).min(n - beacons);
    Counts { covers: n - beacons - drains, drains, beacons }
}

/// What the demo did.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The simulator's summary.
    pub simulator: Summary,
    /// The gateway's store totals.
    pub gateway: Totals,
    /// Devices online at the end.
    pub devices_online: u64,
    /// Telemetry rows stored.
    pub telemetry_rows: u64,
    /// Cases filed, by class code.
    pub cases: std::collections::BTreeMap<String, u64>,
    /// Incidents by state (open, recovered, maintenance, closed).
    pub incidents: std::collections::BTreeMap<String, u64>,
    /// SOS alerts raised.
    pub alerts: u64,
}

impl DemoReport {
    /// The summary printed at the end.
    pub fn render(&self) -> String {
        let rejects: Vec<String> =
            self.gateway.rejects.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let list = |m: &std::collections::BTreeMap<String, u64>| {
            if m.is_empty() {
                "none".to_owned()
            } else {
                m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            }
        };
        format!(
            "{}gateway: {} frames accepted, rejected: {}; {} devices online; {} telemetry rows stored\n\
             cases: {} filed ({}); incidents: {}; SOS alerts: {}\n",
            self.simulator.render(),
            self.gateway.accepted,
            if rejects.is_empty() { "none".to_owned() } else { rejects.join(", ") },
            self.devices_online,
            self.telemetry_rows,
            self.cases.values().sum::<u64>(),
            list(&self.cases),
            list(&self.incidents),
            self.alerts,
        )
    }
}

fn progress_line(status: &Status, sim: &SimClock, last: &mut (u64, std::time::Instant)) -> String {
    let accepted = status.frames_accepted.load(Relaxed);
    let elapsed = last.1.elapsed().as_secs_f64().max(1e-3);
    let rate = (accepted - last.0) as f64 / elapsed;
    *last = (accepted, std::time::Instant::now());
    format!(
        "sim +{:>6}s | {:>8} frames accepted ({:>6.0}/s) | {:>5} devices online | {} rejected | {} cases, {} incidents open",
        sim.sim_ms() / 1000,
        accepted,
        rate,
        status.devices_online.load(Relaxed),
        status.frames_rejected.load(Relaxed),
        status.cases_filed.load(Relaxed),
        status.incidents_open.load(Relaxed),
    )
}

/// Runs the demo until its duration passes or `stop` turns true.
pub async fn run(options: DemoOptions, mut stop: watch::Receiver<bool>) -> Result<DemoReport> {
    let scenario = scenario::load(&options.scenario)?;
    let data = options.data.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    let city_dir = data.join("city");
    if !city_dir.join("devices.json").exists() {
        city::generate(1, counts_for(options.devices.max(1))).write(&city_dir)?;
    }
    let mut config = demo_config(&options)?;
    // The demo stays on loopback (so its default is no credentials, which `gridsense run`
    // requires): a taken port falls back to a free one.
    let http_addr: std::net::SocketAddr =
        config.http.listen.parse().context("http.listen (--http): expected IP:PORT")?;
    if !http_addr.ip().is_loopback() {
        anyhow::bail!("http.listen {http_addr}: the demo serves on loopback only");
    }
    config.http.listen = match std::net::TcpListener::bind(http_addr) {
        Ok(probe) => probe.local_addr()?.to_string(),
        Err(_) => {
            std::net::SocketAddr::from(([127, 0, 0, 1], crate::broker::free_port()?)).to_string()
        }
    };
    {
        let mut store = app::open_store(&config)?;
        let devices = inventory::load(&city_dir.join("devices.json"))?;
        let report = store.import(&devices, app::wall_clock()())?;
        eprintln!(
            "gridsense demo: registry {report}; district in {}, store {}",
            city_dir.display(),
            config.store.path.display()
        );
    }
    let speed = options.speed.unwrap_or(scenario.speed);
    let horizon = options.duration.unwrap_or(Duration::from_secs(3_600));
    let sim = SimClock::start(speed, horizon);
    let clock = shared_clock(sim);
    let (gateway_stop_tx, gateway_stop) = watch::channel(false);
    let gateway = app::start(&config, clock, gateway_stop)?;
    let devices_addr = gateway.device_listener.context("the demo runs the embedded broker")?;
    eprintln!(
        "gridsense demo: embedded broker on {devices_addr} (devices, MQTT 5) and {} (gateway); scenario {} at speed {speed}",
        gateway.broker, options.scenario
    );
    // Wait until the gateway is subscribed before devices start sending.
    let ready_by = tokio::time::Instant::now() + Duration::from_secs(10);
    while !gateway.status.connected.load(Relaxed) && tokio::time::Instant::now() < ready_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(http) = gateway.http {
        eprintln!("gridsense demo: status page http://{http}/ and http://{http}/api/v1/status");
        eprintln!(
            "gridsense demo: cases as Open311 http://{http}/open311/v2/requests.json, with timers and trace http://{http}/api/v1/cases"
        );
    }

    let plan = fleet::plan(&city_dir, &scenario)?;
    let run_options = RunOptions {
        tls: None,
        broker: devices_addr,
        failover: Vec::new(),
        scenario,
        speed,
        duration: options.duration,
        transport: Transport::PerDevice,
        limit: None,
        progress: false,
        clock: Some(sim),
    };
    let (sim_stop_tx, sim_stop) = watch::channel(false);
    let simulator = tokio::spawn(async move { fleet::run(plan, &run_options, sim_stop).await });
    let status = gateway.status.clone();
    let mut last = (0, std::time::Instant::now());
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = ticker.tick() => eprintln!("{}", progress_line(&status, &sim, &mut last)),
            _ = stop.changed() => { let _ = sim_stop_tx.send(true); }
        }
        if simulator.is_finished() {
            break;
        }
    }
    let summary = simulator.await.context("the simulator task")??;
    // Let the last frames through, then stop the gateway: it commits and acks what it holds.
    let settle_by = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut previous = u64::MAX;
    while tokio::time::Instant::now() < settle_by {
        let now = status.frames_accepted.load(Relaxed) + status.frames_rejected.load(Relaxed);
        if now == previous && status.unacked.load(Relaxed) == 0 {
            break;
        }
        previous = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = gateway_stop_tx.send(true);
    gateway.task.await.context("the gateway task")??;
    let store = app::open_store(&config)?;
    Ok(DemoReport {
        simulator: summary,
        gateway: store.totals()?,
        devices_online: status.devices_online.load(Relaxed),
        telemetry_rows: store.telemetry_count(None)?,
        cases: store.case_counts()?,
        incidents: store.incident_counts()?,
        alerts: status.alerts.load(Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(config: Option<PathBuf>, env: &[(&str, &str)]) -> DemoOptions {
        DemoOptions {
            devices: 10,
            scenario: "showcase".into(),
            speed: None,
            duration: None,
            data: None,
            http: None,
            config,
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    #[test]
    fn the_demo_takes_its_defaults_then_the_file_then_the_environment_then_the_flags() {
        let c = demo_config(&options(None, &[])).unwrap();
        assert_eq!(c.store.path, PathBuf::from("gridsense-data/gridsense.db"));
        assert_eq!((c.http.listen.as_str(), c.http.auth.as_str()), ("127.0.0.1:8080", "off"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("demo.toml");
        std::fs::write(&file, "[store]\nbatch_max = 7\n[http]\nlisten = \"127.0.0.1:9090\"\n")
            .unwrap();
        let c = demo_config(&options(Some(file.clone()), &[])).unwrap();
        assert_eq!(c.store.batch_max, 7);
        assert_eq!(c.http.listen, "127.0.0.1:9090", "the file over the demo's default");
        assert_eq!(c.http.auth, "off", "a key the file leaves alone keeps the demo's default");
        assert_eq!(c.store.path, PathBuf::from("gridsense-data/gridsense.db"));
        let env = [("GRIDSENSE_STORE_BATCH_MAX", "9"), ("GRIDSENSE_STORE_PATH", "/tmp/x.db")];
        let c = demo_config(&options(Some(file.clone()), &env)).unwrap();
        assert_eq!(c.store.batch_max, 9, "the environment over the file");
        assert_eq!(
            c.store.path,
            PathBuf::from("/tmp/x.db"),
            "--data not given: the variable holds"
        );
        let mut flags = options(Some(file), &env);
        flags.data = Some(PathBuf::from("elsewhere"));
        flags.http = Some("127.0.0.1:7070".into());
        let c = demo_config(&flags).unwrap();
        assert_eq!(c.store.path, PathBuf::from("elsewhere/gridsense.db"), "a flag given wins");
        assert_eq!(c.http.listen, "127.0.0.1:7070");
        let e = demo_config(&options(None, &[("GRIDSENSE_MQTT_URL", "mqtt://127.0.0.1:1")]))
            .unwrap_err();
        assert!(e.to_string().contains("embedded broker"), "{e}");
        let e = demo_config(&options(None, &[("GRIDSENSE_STORE_BATCH_MAX", "many")])).unwrap_err();
        assert!(format!("{e:#}").contains("store.batch_max"), "{e:#}");
    }

    #[test]
    fn counts_keep_the_district_proportions() {
        let c = counts_for(2_539);
        assert_eq!((c.covers, c.drains, c.beacons), (2_000, 300, 239));
        let c = counts_for(100);
        assert_eq!(c.covers + c.drains + c.beacons, 100);
        assert!(c.drains > 0 && c.beacons > 0);
        let c = counts_for(1);
        assert_eq!(c.covers + c.drains + c.beacons, 1);
    }
}
