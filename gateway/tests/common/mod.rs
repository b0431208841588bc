//! What the gateway's end-to-end tests share: starting a gateway against a broker and knowing
//! what it should have stored, from an independent subscriber's view of the traffic.

#![allow(dead_code, clippy::unwrap_used)]

pub mod platform;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    path::Path,
    sync::atomic::Ordering::Relaxed,
    time::Duration,
};

use gridsense_gateway::{
    app::{self, Gateway},
    config::Config,
    registry::{ImportReport, Kind},
    status::Clock,
    telemetry,
};
use gridsense_protocol::{DeviceKey, DeviceTime, Direction, Eui, Uplink, seal, topic::topic};
use gridsense_simulator::{clock::SimClock, fleet::Transport, inventory, stats::Summary};
use gridsense_tests::{Subscriber, fixtures};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::{sync::watch, task::JoinHandle};

/// Imports the city in `dir` into the store `config` names.
pub fn import(config: &Config, dir: &Path) -> ImportReport {
    let devices = inventory::load(&dir.join("devices.json")).unwrap();
    app::open_store(config).unwrap().import(&devices, 0).unwrap()
}

/// Starts a gateway and waits until it is subscribed; the sender stops it.
pub async fn start(config: &Config, clock: Clock) -> (Gateway, watch::Sender<bool>) {
    let (stop_tx, stop) = watch::channel(false);
    let gateway = app::start(config, clock, stop).unwrap();
    while !gateway.status.connected.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (gateway, stop_tx)
}

/// Starts a gateway on a simulated clock (`speed`, `real` horizon), as `gridsense demo` does,
/// so its time syncs and deadlines agree with the fleet that will share the clock.
pub async fn start_shared(
    config: &Config,
    speed: f64,
    real: Duration,
) -> (Gateway, watch::Sender<bool>, SimClock) {
    let clock = SimClock::start(speed, real);
    let (gateway, stop) = start(config, gridsense_gateway::cli::demo::shared_clock(clock)).await;
    (gateway, stop, clock)
}

/// Runs the district in `dir` as a per-device fleet on `clock` for `real` wall-clock time, in
/// the background.
pub fn spawn_fleet(
    dir: &Path,
    scenario: &'static str,
    broker: SocketAddr,
    clock: SimClock,
    real: Duration,
) -> JoinHandle<anyhow::Result<Summary>> {
    let dir = dir.to_owned();
    tokio::spawn(async move {
        fixtures::run_clocked(&dir, scenario, broker, clock, real, Transport::PerDevice).await
    })
}

/// What should have been stored.
#[derive(Debug, Default)]
pub struct Expected {
    /// Every authentic (device, counter), once.
    pub frames: HashSet<(Eui, u32)>,
    /// Their telemetry: (series name `measurement_field`, EUI, kind, time ms), once each.
    pub points: BTreeSet<((String, String, String), i64)>,
}

/// The covers the subscriber saw report "cover removed" (stolen), by EUI.
pub fn stolen_covers(subscriber: &Subscriber, dir: &Path) -> BTreeSet<String> {
    let keys = fixtures::keys(dir).unwrap();
    subscriber
        .decoded(&keys)
        .into_iter()
        .filter_map(|(h, m)| match m {
            Uplink::AlarmRaised(a) if a.kind == gridsense_protocol::AlarmKind::CoverRemoved => {
                Some(h.eui.to_string())
            }
            _ => None,
        })
        .collect()
}

/// Decodes what the subscriber saw with the inventory's keys.
pub fn expected(subscriber: &Subscriber, dir: &Path) -> Expected {
    let devices = inventory::load(&dir.join("devices.json")).unwrap();
    let kinds: HashMap<Eui, Kind> =
        devices.iter().map(|d| (d.eui, gridsense_gateway::store::kind_of(d.record.kind))).collect();
    let keys = fixtures::keys(dir).unwrap();
    let mut out = Expected::default();
    for (header, msg) in subscriber.decoded(&keys) {
        if out.frames.insert((header.eui, header.counter)) {
            let mut points = Vec::new();
            telemetry::points(header.eui, kinds[&header.eui], &msg, &mut points);
            for p in points {
                let series = (
                    format!("{}_{}", p.measurement, p.field),
                    p.eui.to_string(),
                    p.kind.as_str().to_owned(),
                );
                out.points.insert((series, p.at_ms));
            }
        }
    }
    out
}

/// The current time as device time.
pub fn now_device_time() -> DeviceTime {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    DeviceTime::from_unix_secs(s).unwrap()
}

/// How long the chaos tests keep a component down: `default_s` in the test suite, or
/// `CHAOS_OUTAGE_S` seconds when `scripts/chaos` runs them with long outages. (Not a
/// `GRIDSENSE_` name: the gateway reads those as configuration and refuses unknown ones.)
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn outage(default_s: u64) -> Duration {
    let s = std::env::var("CHAOS_OUTAGE_S").ok().and_then(|v| v.parse().ok());
    Duration::from_secs(s.unwrap_or(default_s))
}

/// Runs the real `gridsense` binary with `args` and `--config CONFIG`; its stdout. Fails the
/// test, with its stderr, when the command does.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn cli(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(args)
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Publishes frames (counters from 1), as the devices would, and waits for them to go out.
pub async fn publish(
    broker: SocketAddr,
    frames: Vec<(Eui, Uplink)>,
    keys: &HashMap<Eui, DeviceKey>,
) {
    publish_from(broker, frames, keys, 1).await;
}

/// As [`publish`], counters from `first`.
pub async fn publish_from(
    broker: SocketAddr,
    frames: Vec<(Eui, Uplink)>,
    keys: &HashMap<Eui, DeviceKey>,
    first: u32,
) {
    let sealed = (first..)
        .zip(frames)
        .map(|(counter, (eui, message))| (eui, seal(eui, counter, &message, &keys[&eui]).to_vec()))
        .collect();
    publish_raw(broker, sealed).await;
}

/// Publishes ready-made frames on their devices' uplink topics (QoS 1) and waits for them to
/// go out.
pub async fn publish_raw(broker: SocketAddr, frames: Vec<(Eui, Vec<u8>)>) {
    let on_topics =
        frames.into_iter().map(|(eui, f)| (topic(eui, Direction::Uplink).to_string(), f)).collect();
    publish_on(broker, on_topics).await;
}

/// Publishes ready-made frames on the given topics (QoS 1), waits until the broker has
/// acknowledged every one (so each counts as sent), then 500 ms more: several tests stop the
/// gateway right after and rely on it having taken them by then (they should wait for what
/// they need instead; not all do yet).
pub async fn publish_on(broker: SocketAddr, frames: Vec<(String, Vec<u8>)>) {
    publish_as("fake-devices", broker, frames).await;
}

/// As [`publish_on`], as MQTT client `id` (two publishers at once need two ids).
pub async fn publish_as(id: &str, broker: SocketAddr, frames: Vec<(String, Vec<u8>)>) {
    let mut options = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut event_loop) = AsyncClient::new(options, 100);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = acked.clone();
    let driver = tokio::spawn(async move {
        while let Ok(event) = event_loop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
                count.fetch_add(1, Relaxed);
            }
        }
    });
    let n = frames.len();
    for (topic, frame) in frames {
        client.publish(topic, QoS::AtLeastOnce, false, frame).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.load(Relaxed) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker acknowledged {} of {n} frames in 60 s",
            acked.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    driver.abort();
}

/// A cover-removed alarm.
pub fn removed(at: DeviceTime) -> Uplink {
    gridsense_tests::alarms::cover_removed(at)
}

/// A gateway configuration for a test district in `dir`: the broker, a store, the grid layer,
/// the HTTP API on a free loopback port, requests polled every 200 ms.
pub fn config(dir: &Path, broker: SocketAddr) -> Config {
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{broker}");
    config.store.path = dir.join("gridsense.db");
    config.geo.grids = dir.join("grids.geojson").display().to_string();
    config.http.listen = "127.0.0.1:0".into();
    // Loopback, as the demo: no tokens (tests/auth.rs covers them).
    config.http.auth = "off".into();
    config.downlink.poll_ms = 200;
    config
}

/// Starts the real `gridsense run` binary with a configuration file (for `kill -9` tests).
pub fn gateway_process(config: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `gridsense provision import` and `provision broker` for the district in `dir`: the folder
/// with the password file and the ACL, and the gateway's user name and password.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn provision(dir: &Path) -> (std::path::PathBuf, String, String) {
    let config = dir.join("provision.toml");
    std::fs::write(
        &config,
        format!("[store]\npath = \"{}\"\n", dir.join("gridsense.db").display()),
    )
    .unwrap();
    let out_dir = dir.join("broker");
    cli(&config, &["provision", "import", "--city", dir.to_str().unwrap()]);
    cli(&config, &["provision", "broker", "--out", out_dir.to_str().unwrap()]);
    let credentials = std::fs::read_to_string(out_dir.join("gateway.credentials")).unwrap();
    let (user, password) = credentials.trim().split_once(':').unwrap();
    (out_dir, user.to_owned(), password.to_owned())
}

/// Mosquitto from the shipped `deploy/mosquitto.conf`, with the test's certificates and the
/// accounts `provision` wrote.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn shipped_mosquitto(
    pki: &gridsense_tests::TestPki,
    accounts: &Path,
) -> gridsense_tests::Mosquitto {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto.conf");
    gridsense_tests::Mosquitto::start_shipped(
        &shipped,
        &[
            ("/etc/mosquitto/ca_certificates/gridsense-ca.crt", &pki.ca),
            ("/etc/mosquitto/certs/gridsense-broker.crt", &pki.cert),
            ("/etc/mosquitto/certs/gridsense-broker.key", &pki.key),
            ("/etc/mosquitto/gridsense/passwd", &accounts.join("passwd")),
            ("/etc/mosquitto/gridsense/acl", &accounts.join("acl")),
        ],
    )
    .unwrap()
}

/// The devices' own books of a simulated run, checked against the store: every frame a broker
/// acknowledged and a device kept for the gateway's end-to-end confirmation was confirmed, or
/// is still awaiting its confirmation at the end and then must be in the device's stored
/// counter window; what was given up unconfirmed counts as lost.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
#[derive(Debug)]
pub struct Books {
    /// Frames a broker acknowledged (and the device kept).
    pub sent: u64,
    /// Of them, stored: confirmed, or held at the end and in the stored window.
    pub stored: u64,
    /// Held at the end, and of them in the stored window.
    pub held: u64,
    pub held_stored: u64,
    /// A few held frames the store does not have, for the failure message.
    pub missing: Vec<(Eui, u32)>,
}

#[allow(dead_code)] // Not every test binary that includes this module uses it.
impl Books {
    /// Reads the store's counter windows and checks the summary's books against them.
    pub fn check(summary: &Summary, store: &dyn gridsense_gateway::store::IngestStore) -> Books {
        let windows: HashMap<_, _> = store.counters().unwrap().into_iter().collect();
        let stored_window = |(eui, counter): &(Eui, u32)| {
            windows.get(eui).is_some_and(|w| {
                w.highest().is_some_and(|h| {
                    gridsense_protocol::Downlink::window_holds(h, w.seen_bits() | 1, *counter)
                })
            })
        };
        let c = &summary.confirm;
        let missing: Vec<_> = c.held.iter().filter(|f| !stored_window(f)).copied().collect();
        let held = c.held.len() as u64;
        let held_stored = held - missing.len() as u64;
        Books {
            sent: c.confirmed + c.given_up + held,
            stored: c.confirmed + held_stored,
            held,
            held_stored,
            missing: missing.into_iter().take(10).collect(),
        }
    }

    /// Acknowledged by a broker and not stored.
    pub fn lost(&self) -> u64 {
        self.sent - self.stored
    }
}
