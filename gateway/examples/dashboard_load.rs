//! Dashboard first load and API latency at scale: a district of DEVICES devices (default
//! 20,000) and 239 grids, every device reporting through a local Mosquitto (pooled simulator),
//! then a real headless Chromium opens the dashboard RUNS times (map, markers, table and case
//! list drawn = `data-ready`), and a filtered device list is requested 50 times.
//!
//! `cargo run --release -p gridsense-gateway --example dashboard_load -- [DEVICES] [RUNS]`
//! Needs mosquitto and chromium (`scripts/test` installs them). Prints numbers; asserts nothing.

#![allow(clippy::cast_precision_loss, clippy::indexing_slicing)]

use std::{
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use anyhow::Result;
use gridsense_gateway::{app, cli::demo::counts_for, config::Config};
use gridsense_simulator::{
    city,
    fleet::{self, RunOptions},
    inventory, scenario,
};
use gridsense_tests::{Chromium, Mosquitto};

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map_or(Ok(20_000), |a| a.parse())?;
    let runs: usize = args.get(1).map_or(Ok(5), |a| a.parse())?;
    let broker = Mosquitto::start_with("max_inflight_messages 1000")?;
    let dir = tempfile::tempdir()?;
    city::generate(7, counts_for(n)).write(dir.path())?;
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", broker.addr());
    config.store.path = dir.path().join("gridsense.db");
    config.geo.grids = dir.path().join("grids.geojson").display().to_string();
    config.http.listen = "127.0.0.1:0".into();
    // Loopback only, as the demo: the page opens without a token (with the default
    // `http.auth = "tokens"` it would wait for one).
    config.http.auth = "off".into();
    app::open_store(&config)?.import(&inventory::load(&dir.path().join("devices.json"))?, 0)?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let gateway = app::start(&config, app::wall_clock(), stop)?;
    while !gateway.status.connected.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = format!("http://{}", gateway.http.unwrap_or_else(|| unreachable!()));
    // Every device reports (the load scenario: one frame per device per simulated second).
    let scenario = scenario::load("load")?;
    let plan = fleet::plan(dir.path(), &scenario)?;
    let options = RunOptions::pooled(broker.addr(), scenario, 0.5, Duration::from_secs(8));
    let (_tx, sim_stop) = tokio::sync::watch::channel(false);
    fleet::run(plan, &options, sim_stop).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "{n} devices registered, {} online, {} frames accepted",
        gateway.status.devices_online.load(Relaxed),
        gateway.status.frames_accepted.load(Relaxed)
    );

    let page = base.clone();
    let loads = tokio::task::spawn_blocking(move || -> Result<Vec<(f64, f64, u64)>> {
        let mut b = Chromium::start(1600, 1200)?;
        let mut out = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            b.navigate(&page)?;
            b.wait_for("document.body.dataset.ready === '1'", Duration::from_secs(60))?;
            let wall = millis(start.elapsed());
            let in_page = b.eval("window.gsLoadMs")?.as_f64().unwrap_or(f64::NAN);
            let markers =
                b.eval("document.querySelectorAll('#map circle').length")?.as_u64().unwrap_or(0);
            out.push((wall, in_page, markers));
            b.navigate("about:blank")?;
        }
        Ok(out)
    })
    .await??;
    for (i, (wall, in_page, markers)) in loads.iter().enumerate() {
        println!(
            "dashboard load {}: {wall:.0} ms from navigation to drawn ({in_page:.0} ms in the page's own clock), {markers} markers",
            i + 1
        );
    }

    let client = reqwest::Client::new();
    let mut times = Vec::new();
    let url = format!(
        "{base}/api/v1/devices?kind=cover&state=online&sort=battery&order=asc&per_page=100&page=3"
    );
    let mut rows = 0;
    for _ in 0..50 {
        let start = Instant::now();
        let body: serde_json::Value = client.get(&url).send().await?.json().await?;
        times.push(millis(start.elapsed()));
        rows = body["total"].as_u64().unwrap_or(0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "filtered device list ({rows} matching, page of 100): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms over 50 requests",
        times[24], times[44], times[49]
    );
    for (name, path) in
        [("map (every device)", "/api/v1/map"), ("grids with counts", "/api/v1/grids")]
    {
        let start = Instant::now();
        let bytes = client.get(format!("{base}{path}")).send().await?.bytes().await?.len();
        println!("{name}: {:.1} ms, {} KiB", millis(start.elapsed()), bytes / 1024);
    }
    stop_tx.send(true)?;
    gateway.task.await??;
    Ok(())
}
