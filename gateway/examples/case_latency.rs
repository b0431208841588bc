//! Alarm → case latency through a local Mosquitto and the whole gateway: each of COVERS
//! covers publishes one "cover removed" alarm (QoS 1), ALARMS per second, while a pooled
//! simulator offers BACKGROUND frames/s of drain telemetry. For every alarm: publish → case
//! decided (the rule fired in the batch being built) and publish → case on the board (its
//! incident, case and outbox entry committed, then delivered by the local platform adapter).
//!
//! `cargo run --release -p gridsense-gateway --example case_latency -- [COVERS] [ALARMS] [BACKGROUND]`
//! (defaults 1000 covers, 100 alarms/s, 10000 frames/s). Needs /usr/sbin/mosquitto
//! (`scripts/test` installs it). Prints numbers; asserts nothing.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::{
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use anyhow::Result;
use gridsense_gateway::{app, config::Config, store::CaseFilter};
use gridsense_simulator::{
    city::{self, Counts},
    fleet::{self, RunOptions},
    inventory::{self, Kind},
    scenario,
};
use gridsense_tests::{Mosquitto, alarms};
use rumqttc::{AsyncClient, MqttOptions};

fn percentiles(mut v: Vec<i64>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_unstable();
    let at = |q: f64| {
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v.get(i).copied().unwrap_or_default()
    };
    format!(
        "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n = {})",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
        v.len()
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let covers: usize = args.first().map_or(Ok(1_000), |a| a.parse())?;
    let alarm_rate: f64 = args.get(1).map_or(Ok(100.0), |a| a.parse())?;
    let background: usize = args.get(2).map_or(Ok(10_000), |a| a.parse())?;

    let broker = Mosquitto::start_with("max_inflight_messages 1000")?;
    let dir = tempfile::tempdir()?;
    let drains = background.div_ceil(2).max(1);
    city::generate(5, Counts { covers, drains, beacons: 0 }).write(dir.path())?;
    let devices = inventory::load(&dir.path().join("devices.json"))?;
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", broker.addr());
    config.store.path = dir.path().join("gridsense.db");
    config.geo.grids = dir.path().join("grids.geojson").display().to_string();
    app::open_store(&config)?.import(&devices, 0)?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let gateway = app::start(&config, app::wall_clock(), stop)?;
    while !gateway.status.connected.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Background: drains only (the pooled simulator), 1 frame/s each at speed 2.
    let alarm_secs = (covers as f64 / alarm_rate).ceil() as u64;
    let sim = if background > 0 {
        let sim_dir = tempfile::tempdir()?;
        city::generate(5, Counts { covers: 0, drains, beacons: 0 }).write(sim_dir.path())?;
        let scenario = scenario::load("load")?;
        let plan = fleet::plan(sim_dir.path(), &scenario)?;
        let options =
            RunOptions::pooled(broker.addr(), scenario, 2.0, Duration::from_secs(alarm_secs + 6));
        let (_tx, sim_stop) = tokio::sync::watch::channel(false);
        Some((
            tokio::spawn(async move { fleet::run(plan, &options, sim_stop).await }),
            sim_dir,
            _tx,
        ))
    } else {
        None
    };
    // The background drains share their EUIs with the registered drains (same seed): their
    // frames are accepted as the registered devices'.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut options =
        MqttOptions::new("alarms", broker.addr().ip().to_string(), broker.addr().port());
    options.set_inflight(1_000);
    let (client, mut eventloop) = AsyncClient::new(options, 1_000);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let started = Instant::now();
    let lids = devices.iter().filter(|d| d.record.kind == Kind::Cover);
    let sent = alarms::publish_paced(
        &client,
        lids,
        (alarm_rate, gridsense_protocol::topic::DEFAULT_SHARDS),
        None,
    )
    .await?;
    let publish_secs = started.elapsed().as_secs_f64();
    // Wait for every case to be on the board.
    let store = app::open_store(&config)?;
    let all = CaseFilter { limit: 1_000_000, ..CaseFilter::default() };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cases = Vec::new();
    while Instant::now() < deadline {
        cases = store.cases(&all)?;
        if cases.len() >= covers && cases.iter().all(|c| c.delivered_ms.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let accepted_before = gateway.status.frames_accepted.load(Relaxed);
    if let Some((sim, _dir, _tx)) = sim {
        let summary = sim.await??;
        println!(
            "background: {} drain frames published ({:.0}/s)",
            summary.frames(),
            summary.frames() as f64 / (summary.real_ms as f64 / 1000.0)
        );
    }
    let mut to_case = Vec::new();
    let mut to_board = Vec::new();
    for c in &cases {
        let Some(t) = sent.get(&c.device_id) else { continue };
        to_case.push(c.detected_ms - t);
        if let Some(d) = c.delivered_ms {
            to_board.push(d - t);
        }
    }
    println!(
        "{covers} alarms at {alarm_rate:.0}/s (published over {publish_secs:.1} s) with {background} frames/s of background telemetry offered; gateway accepted {accepted_before} frames"
    );
    println!("alarm → case decided (in its batch): {}", percentiles(to_case));
    println!("alarm → case on the board (committed, delivered): {}", percentiles(to_board));
    stop_tx.send(true)?;
    gateway.task.await??;
    Ok(())
}
