//! Small districts and scenario runs for tests.

use std::{collections::HashMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::Result;
use gridsense_protocol::{DeviceKey, Eui};
use gridsense_simulator::{
    city::{self, Counts},
    clock::SimClock,
    fleet::{self, RunOptions, Transport},
    inventory::{self, DeviceRecord},
    scenario,
    stats::Summary,
};

/// Writes a district with the given device counts into `dir`; returns its inventory.
pub fn city(dir: &Path, seed: u64, counts: Counts) -> Result<Vec<DeviceRecord>> {
    let city = city::generate(seed, counts);
    city.write(dir)?;
    Ok(city.devices)
}

/// The keys of an inventory, for decoding.
pub fn keys(dir: &Path) -> Result<HashMap<Eui, DeviceKey>> {
    Ok(inventory::load(&dir.join("devices.json"))?.into_iter().map(|d| (d.eui, d.key)).collect())
}

/// Runs scenario text over the city in `dir` against `broker` for `real` wall-clock time, one
/// connection per device.
pub async fn run(
    dir: &Path,
    scenario_text: &str,
    broker: SocketAddr,
    speed: f64,
    real: Duration,
) -> Result<Summary> {
    run_with(dir, scenario_text, broker, speed, real, Transport::PerDevice).await
}

/// As [`run`], with a chosen transport.
pub async fn run_with(
    dir: &Path,
    scenario_text: &str,
    broker: SocketAddr,
    speed: f64,
    real: Duration,
    transport: Transport,
) -> Result<Summary> {
    // The fleet's own clock: a gateway under test keeps the wall clock.
    run_on(dir, scenario_text, broker, (speed, None), real, transport).await
}

/// As [`run`], on a clock the caller shares (with a gateway under test, so its time syncs and
/// deadlines agree with the simulated devices).
pub async fn run_clocked(
    dir: &Path,
    scenario_text: &str,
    broker: SocketAddr,
    clock: SimClock,
    real: Duration,
    transport: Transport,
) -> Result<Summary> {
    run_on(dir, scenario_text, broker, (clock.speed(), Some(clock)), real, transport).await
}

/// As [`run`] (per device), with every device knowing two brokers: it starts on the first and
/// fails over to the second when a connection attempt fails.
pub async fn run_two_brokers(
    dir: &Path,
    scenario_text: &str,
    brokers: [SocketAddr; 2],
    speed: f64,
    real: Duration,
) -> Result<Summary> {
    run_on(dir, scenario_text, &brokers, (speed, None), real, Transport::PerDevice).await
}

async fn run_on(
    dir: &Path,
    scenario_text: &str,
    broker: impl Brokers,
    (speed, clock): (f64, Option<SimClock>),
    real: Duration,
    transport: Transport,
) -> Result<Summary> {
    let scenario = scenario::parse("test.toml", scenario_text)?;
    let plan = fleet::plan(dir, &scenario)?;
    let (broker, failover) = broker.split();
    let options = RunOptions {
        tls: None,
        broker,
        failover,
        scenario,
        speed,
        duration: Some(real),
        transport,
        limit: None,
        progress: false,
        clock,
    };
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    fleet::run(plan, &options, stop).await
}

/// One broker, or a first one and the others to fail over to.
trait Brokers {
    fn split(self) -> (SocketAddr, Vec<SocketAddr>);
}

impl Brokers for SocketAddr {
    fn split(self) -> (SocketAddr, Vec<SocketAddr>) {
        (self, Vec::new())
    }
}

impl Brokers for &[SocketAddr; 2] {
    fn split(self) -> (SocketAddr, Vec<SocketAddr>) {
        (self[0], vec![self[1]])
    }
}

/// The device time at which the run started: the earliest status (every device sends one at
/// boot), so tests can speak of "20 s into the run".
pub fn run_start(
    frames: &[(gridsense_protocol::Header, gridsense_protocol::Uplink)],
) -> Option<u32> {
    frames
        .iter()
        .filter_map(|(_, m)| match m {
            gridsense_protocol::Uplink::Status(s) => Some(s.at.0),
            _ => None,
        })
        .min()
}

/// A night of thefts among heavy traffic (600 vehicles an hour): `removed` covers taken at 20 s,
/// `displaced` knocked aside at 40 s and put back 50 s later (simulated time).
pub fn theft_scenario(removed: [&str; 2], displaced: &str) -> String {
    format!(
        r#"
description = "test: thefts among heavy traffic"
seed = 9
[traffic]
vehicles_per_hour = 600
[battery]
low_fraction = 0.0
[[theft]]
at = "20s"
covers = 0
mode = "removed"
euis = ["{}", "{}"]
[[theft]]
at = "40s"
covers = 0
mode = "displaced"
restore_after = "50s"
euis = ["{displaced}"]
"#,
        removed[0], removed[1]
    )
}
