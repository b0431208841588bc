//! Telemetry through the InfluxDB 2 write API into a real VictoriaMetrics (no de-duplication,
//! so a duplicate would show): every accepted sample arrives once, at its device sample time,
//! tagged with EUI and kind; VictoriaMetrics is stopped for a while under load and restarted,
//! and nothing is lost: the gateway's on-disk buffer holds the points and drains when it returns.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{collections::BTreeSet, sync::atomic::Ordering::Relaxed, time::Duration};

use gridsense_gateway::{
    app,
    config::{Config, Sink},
};
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, Subscriber, VictoriaMetrics, fixtures};

#[tokio::test]
async fn every_sample_reaches_victoria_metrics_once_across_an_outage() {
    let broker = Mosquitto::start().unwrap();
    let mut vm = VictoriaMetrics::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 81, Counts { covers: 20, drains: 20, beacons: 5 }).unwrap();
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", broker.addr());
    config.store.path = dir.path().join("gridsense.db");
    config.telemetry.sink = Sink::Influxdb;
    config.telemetry.url = vm.url();
    config.telemetry.batch_max = 500;
    config.telemetry.retry_max_ms = 500;
    config.geo.grids = dir.path().join("grids.geojson").display().to_string();
    common::import(&config, dir.path());
    // The gateway shares the simulator's clock, as in `gridsense demo`.
    let (gateway, stop_tx, clock) =
        common::start_shared(&config, 20.0, Duration::from_secs(10)).await;
    let subscriber = Subscriber::start(broker.addr()).await.unwrap();
    let scenario = "description = \"t\"\nseed = 4\n[device_config]\nreport_interval_s = 10\ndrain_deadband_mm = 0\nfix_interval_s = 10\n[patrol]\non_patrol = 1.0\n";
    let sim =
        common::spawn_fleet(dir.path(), scenario, broker.addr(), clock, Duration::from_secs(10));
    // An outage of the telemetry server in the middle of the run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    vm.stop().unwrap();
    // 3 s in the suite; `scripts/chaos` keeps it down for minutes.
    let down = common::outage(3);
    tokio::time::sleep(down).await;
    let (sink_status, sink_task) = gateway.sink.as_ref().unwrap();
    let buffered_during_outage = sink_status.buffered.load(Relaxed);
    vm.restart().unwrap();
    sim.await.unwrap().unwrap();
    subscriber.settle(Duration::from_millis(500), Duration::from_secs(5)).await;

    let common::Expected { frames: distinct, points: expected } =
        common::expected(&subscriber, dir.path());
    // Wait for the gateway to take everything and the sink to drain its buffer.
    for _ in 0..150 {
        let done = app::open_store(&config).unwrap().totals().unwrap().accepted
            >= distinct.len() as u64
            && sink_status.buffered.load(Relaxed) == 0
            && sink_status.written.load(Relaxed) >= expected.len() as u64;
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!sink_task.is_finished(), "the telemetry sink stopped");
    let series = vm.export("(cover|drain|position|status)_.*").await.unwrap();
    let mut stored = BTreeSet::new();
    let mut raw = 0;
    for (labels, samples) in &series {
        raw += samples.len();
        for (t, _) in samples {
            stored.insert((
                (labels["__name__"].clone(), labels["eui"].clone(), labels["kind"].clone()),
                *t,
            ));
        }
    }
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    assert!(sink_status.failures.load(Relaxed) > 0, "the outage was not noticed");
    assert!(buffered_during_outage > 0, "nothing was buffered during the outage");
    assert_eq!(
        stored.len(),
        expected.len(),
        "missing: {:?}",
        expected.difference(&stored).take(5).collect::<Vec<_>>()
    );
    assert_eq!(stored, expected);
    assert_eq!(raw, expected.len(), "duplicate samples stored");
    // Tagged with grid and street: a device's readings with its own grid, fixes with theirs.
    let grids = gridsense_simulator::city::load_grids(dir.path()).unwrap();
    let devices = gridsense_simulator::inventory::load(&dir.path().join("devices.json")).unwrap();
    for (labels, _) in &series {
        let grid = labels.get("grid").unwrap_or_else(|| panic!("no grid tag: {labels:?}"));
        let street = &labels["street"];
        assert!(grid.starts_with(street.as_str()), "{labels:?}");
        if !labels["__name__"].starts_with("position_") {
            let d = devices.iter().find(|d| d.eui.to_string() == labels["eui"]).unwrap();
            let home = grids.iter().find(|g| g.contains(d.record.lat, d.record.lon)).unwrap();
            assert_eq!(*grid, home.grid_code, "{labels:?}");
        }
    }
    gridsense_tests::evidence!(
        "chaos: telemetry-outage sent={} stored={} lost=0 duplicated={} (samples; the telemetry server down {down:?}; {} points buffered during the outage; {} failed writes retried)",
        expected.len(),
        stored.len(),
        raw - stored.len(),
        buffered_during_outage,
        sink_status.failures.load(Relaxed)
    );
}
