//! The PostgreSQL server stops at once (`pg_ctl stop -m immediate`, a crash: no checkpoint,
//! connections cut mid-transaction) under load and comes back: the gateway acknowledges
//! nothing meanwhile (the broker keeps the frames), says why (readiness, metrics), and when the
//! server is back commits what it held — every frame stored once, the theft among them a case
//! once, although a commit in flight when the server died had an unknown outcome.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use gridsense_gateway::{app, store::Queries};
use gridsense_protocol::{Uplink, examples};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures, postgres::Postgres};

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_pauses_acknowledgements_and_loses_nothing() {
    let broker = Mosquitto::start().unwrap();
    let mut pg = Postgres::start_durable().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 96, Counts { covers: 1, drains: 2, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.store.url = pg.database(None).unwrap();
    config.store.key_file = dir.path().join("store.key");
    config.health.max_frames_per_minute = 1_000_000;
    common::import(&config, dir.path());
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    let cover = devices.iter().find(|d| d.record.kind == inventory::Kind::Cover).unwrap().eui;
    let drains: Vec<_> =
        devices.iter().filter(|d| d.record.kind == inventory::Kind::Drain).map(|d| d.eui).collect();
    let keys = fixtures::keys(dir.path()).unwrap();
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let http = gateway.http.unwrap();
    let store = app::open_store(&config).unwrap();
    let reading: Uplink = examples::uplinks()[1].clone();
    let accepted = |store: &dyn Queries| store.totals().map(|t| t.accepted).unwrap_or(0);
    let wait_accepted = |n: u64| {
        let store = &store;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while accepted(&**store) < n {
                assert!(tokio::time::Instant::now() < deadline, "{n} frames not stored in 60 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let before: Vec<_> = (0..20).map(|i| (drains[i % 2], reading.clone())).collect();
    common::publish(broker.addr(), before, &keys).await;
    wait_accepted(20).await;

    // 3,000 readings and a theft; the server crashes while they arrive.
    let mut during: Vec<_> = (0..3_000).map(|i| (drains[i % 2], reading.clone())).collect();
    during.insert(1_500, (cover, common::removed(common::now_device_time())));
    let sent = 20 + during.len() as u64;
    let publisher = tokio::spawn({
        let keys = keys.clone();
        let broker = broker.addr();
        async move { common::publish_from(broker, during, &keys, 21).await }
    });
    // Some of the stream committed first, then the crash.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gateway.status.frames_accepted.load(Relaxed) < 200 {
        assert!(tokio::time::Instant::now() < deadline, "the stream did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pg.stop_immediate().unwrap();
    let stuck = gateway.status.frames_accepted.load(Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let why = loop {
        if let Some(e) = gateway.status.store_error.lock().unwrap().clone() {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "no commit failed with the server down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (ready, text) = get(&format!("http://{http}/readyz")).await;
    assert_eq!(ready, 503, "{text}");
    assert!(text.contains("nothing acknowledged"), "{text}");
    let (_, metrics) = get(&format!("http://{http}/metrics")).await;
    assert!(metrics.contains("gridsense_store_failing 1"), "{metrics}");
    let held = gateway.status.unacked.load(Relaxed);
    assert!(held > 0, "nothing held unacknowledged");
    let first = gateway.status.store_retries.load(Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gateway.status.store_retries.load(Relaxed) == first {
        assert!(tokio::time::Instant::now() < deadline, "the held batch was not retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Down a while longer under `scripts/chaos` (at once in the suite).
    tokio::time::sleep(common::outage(0)).await;
    let acked_while_down = gateway.status.frames_accepted.load(Relaxed) - stuck;

    let down_for = std::time::Instant::now();
    pg.restart().unwrap();
    wait_accepted(sent).await;
    let resumed_after = down_for.elapsed();
    publisher.await.unwrap();
    // Settle: nothing more arrives after everything is in.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gateway.status.store_error.lock().unwrap().is_none());
    let (ready, text) = get(&format!("http://{http}/readyz")).await;
    assert_eq!(ready, 200, "{text}");
    let totals = store.totals().unwrap();
    assert_eq!(acked_while_down, 0, "frames counted accepted while the server was down");
    let duplicated = totals.accepted.saturating_sub(sent);
    assert_eq!(totals.accepted, sent, "{totals:?}");
    assert_eq!(store.message_count("alarm").unwrap(), 1, "the theft's alarm stored once");
    let cases = store.cases(&gridsense_gateway::store::CaseFilter::default()).unwrap();
    assert_eq!(cases.len(), 1, "the theft's case, once");
    assert_eq!(cases[0].device_id, cover.to_string());
    let retries = gateway.status.store_retries.load(Relaxed);
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    gridsense_tests::evidence!(
        "chaos: postgres-crash sent={sent} stored={} lost={} duplicated={duplicated} (server stopped -m immediate under load after {stuck} stored; {held} held unacknowledged, {retries} commit retries ({why}); resumed {} ms after the restart; the theft's case filed once)",
        totals.accepted,
        sent - totals.accepted,
        resumed_after.as_millis()
    );
}
