//! The telemetry server is unreachable and the on-disk buffer fills: the oldest plain
//! telemetry is dropped and counted (a metric says so), nothing else is lost — an alarm in the
//! middle still becomes a case, every frame is accepted.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use gridsense_gateway::{app, config::Sink};
use gridsense_protocol::{Uplink, examples};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures, free_port};

#[tokio::test]
async fn a_full_buffer_drops_the_oldest_telemetry_never_a_case() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 93, Counts { covers: 1, drains: 1, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    // Nothing listens there: every write fails and is retried.
    config.telemetry.sink = Sink::Influxdb;
    config.telemetry.url = format!("http://127.0.0.1:{}", free_port().unwrap());
    config.telemetry.buffer_max_points = 100;
    config.telemetry.retry_min_ms = 50;
    config.telemetry.retry_max_ms = 200;
    config.telemetry.timeout_ms = 500;
    common::import(&config, dir.path());
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    let cover = devices.iter().find(|d| d.record.kind == inventory::Kind::Cover).unwrap().eui;
    let drain = devices.iter().find(|d| d.record.kind == inventory::Kind::Drain).unwrap().eui;
    let keys = fixtures::keys(dir.path()).unwrap();
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    // 80 drain readings (2 points each) with the cover's theft in the middle.
    let reading: Uplink = examples::uplinks()[1].clone();
    let mut frames: Vec<_> = (0..80).map(|_| (drain, reading.clone())).collect();
    frames.insert(40, (cover, common::removed(common::now_device_time())));
    common::publish(broker.addr(), frames, &keys).await;
    let store = app::open_store(&config).unwrap();
    for _ in 0..50 {
        if store.case(1).unwrap().is_some() && store.totals().unwrap().accepted == 81 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let http = gateway.http.unwrap();
    let metrics =
        reqwest::get(format!("http://{http}/metrics")).await.unwrap().text().await.unwrap();
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let totals = store.totals().unwrap();
    let dropped = store.stat("telemetry_dropped").unwrap();
    assert_eq!(totals.accepted, 81, "every frame accepted: {totals:?}");
    assert!(store.case(1).unwrap().is_some(), "the alarm became a case");
    assert_eq!(store.buffer_len().unwrap(), 100, "the buffer holds its bound");
    // Examples' drain reading: 2 points; the alarm: none; 160 points, 100 kept.
    assert_eq!(dropped, 60, "the oldest dropped and counted");
    assert!(metrics.contains("gridsense_sink_dropped_points_total 60"), "{metrics}");
    assert!(metrics.contains("gridsense_sink_failures_total"), "{metrics}");
    gridsense_tests::evidence!(
        "chaos: buffer-full sent=81 stored={} lost=0 duplicated=0 (telemetry server unreachable; buffer bound 100 points; {dropped} oldest points dropped and counted; 1 case filed)",
        totals.accepted
    );
}
