//! Sustained ingest through a local Mosquitto: QoS 1, ack after the SQLite commit, the full
//! pipeline, against the rate a bare subscriber receives the same stream in the same run.
//!
//! `cargo run --release -p gridsense-gateway --example ingest_bench -- [DEVICES] [SPEED] [SECONDS]`
//! (defaults 20000 drains, speed 2 = 40,000 frames/s offered, 20 s). Needs /usr/sbin/mosquitto
//! (`scripts/test` installs it). Prints numbers; asserts nothing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use gridsense_gateway::{app, config::Config};
use gridsense_simulator::{
    city::{self, Counts},
    fleet::{self, RunOptions},
    inventory, scenario,
};
use gridsense_tests::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let devices: usize = args.first().map_or(Ok(20_000), |a| a.parse())?;
    let speed: f64 = args.get(1).map_or(Ok(2.0), |a| a.parse())?;
    let seconds: u64 = args.get(2).map_or(Ok(20), |a| a.parse())?;

    let broker = Mosquitto::start_with("max_inflight_messages 1000")?;
    let dir = tempfile::tempdir()?;
    city::generate(3, Counts { covers: 0, drains: devices, beacons: 0 }).write(dir.path())?;
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", broker.addr());
    config.store.path = dir.path().join("gridsense.db");
    // STORE=postgres: a durable PostgreSQL started here instead of SQLite.
    let pg = match std::env::var("STORE").as_deref() {
        Ok("postgres") => Some(gridsense_tests::postgres::Postgres::start_durable()?),
        _ => None,
    };
    if let Some(pg) = &pg {
        config.store.url = pg.database(None)?;
    }
    app::open_store(&config)?.import(&inventory::load(&dir.path().join("devices.json"))?, 0)?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let gateway = app::start(&config, app::wall_clock(), stop)?;
    while !gateway.status.connected.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The bare subscriber: QoS 1, acked on receipt, does nothing else.
    let bare = Arc::new(AtomicU64::new(0));
    let mut options =
        MqttOptions::new("bare-subscriber", broker.addr().ip().to_string(), broker.addr().port());
    options.set_inflight(1_000);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    // Version 1's topic and both lanes of every shard (the load publishes on its shards').
    for filter in ["gridsense/+/up", "gridsense/+/+/up", "gridsense/+/+/urgent"] {
        client.subscribe(filter, QoS::AtLeastOnce).await?;
    }
    let counter = bare.clone();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(_)) = event {
                counter.fetch_add(1, Relaxed);
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let scenario = scenario::load("load")?;
    let plan = fleet::plan(dir.path(), &scenario)?;
    let options = RunOptions::pooled(broker.addr(), scenario, speed, Duration::from_secs(seconds));
    let (_sim_stop_tx, sim_stop) = tokio::sync::watch::channel(false);
    let sim = tokio::spawn(async move { fleet::run(plan, &options, sim_stop).await });
    // Measure the middle of the run: skip the first 3 s (connections, first boot statuses).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (g0, b0, t0) =
        (gateway.status.frames_accepted.load(Relaxed), bare.load(Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds.saturating_sub(5).max(1))).await;
    let (g1, b1, t1) =
        (gateway.status.frames_accepted.load(Relaxed), bare.load(Relaxed), Instant::now());
    let summary = sim.await??;
    let secs = (t1 - t0).as_secs_f64();
    let gateway_rate = (g1 - g0) as f64 / secs;
    let bare_rate = (b1 - b0) as f64 / secs;
    println!(
        "devices {devices}, offered {:.0} frames/s, measured over {secs:.1} s",
        devices as f64 * speed
    );
    println!(
        "simulator published {} frames ({:.0}/s over the run)",
        summary.frames(),
        summary.frames() as f64 / (summary.real_ms as f64 / 1000.0)
    );
    println!("bare subscriber   {bare_rate:>9.0} frames/s");
    println!(
        "gateway (durable) {gateway_rate:>9.0} frames/s  ({:.2} of bare)",
        gateway_rate / bare_rate.max(1.0)
    );
    println!(
        "gateway batches {}, last commit {} µs",
        gateway.status.batches.load(Relaxed),
        gateway.status.last_commit_us.load(Relaxed)
    );
    stop_tx.send(true)?;
    gateway.task.await??;
    Ok(())
}
