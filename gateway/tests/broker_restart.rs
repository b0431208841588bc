//! The broker restarts under load: Mosquitto with persistence is stopped cleanly and started
//! again while devices stream. Devices and the gateway reconnect and resubscribe; what the
//! broker had queued for the gateway's persistent session survives the restart; every distinct frame
//! the devices published (a resend after a lost PUBACK is the same frame) is stored once.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use gridsense_gateway::app;
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, fixtures};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 97, Counts { covers: 15, drains: 15, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.http.listen = String::new();
    config.mqtt.reconnect_max_ms = 1_000;
    common::import(&config, dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let scenario = "description = \"t\"\nseed = 6\n[device_config]\nreport_interval_s = 1\ndrain_deadband_mm = 0\n";
    let sim_dir = dir.path().to_owned();
    let addr = broker.addr();
    // Down 1 s in the suite; `scripts/chaos` keeps it down longer. The devices' reconnect
    // backoff doubles up to 5 minutes, so after an outage of D one may wait about D more before
    // its next try: the run lasts long enough for every device to be back.
    let down = common::outage(1);
    let sim = tokio::spawn(async move {
        fixtures::run(&sim_dir, scenario, addr, 1.0, Duration::from_secs(15) + down * 3).await
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = gateway.status.connects.load(std::sync::atomic::Ordering::Relaxed);
    tokio::task::block_in_place(|| broker.restart(down)).unwrap();
    let summary = sim.await.unwrap().unwrap();
    // Let the gateway catch up, then stop it.
    let mut last = u64::MAX;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = gateway.status.frames_accepted.load(std::sync::atomic::Ordering::Relaxed);
        if n == last && gateway.status.unacked.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            break;
        }
        last = n;
    }
    let reconnects = gateway.status.connects.load(std::sync::atomic::Ordering::Relaxed) - before;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let totals = app::open_store(&config).unwrap().totals().unwrap();
    // Frames whose PUBACK was lost in the restart are resent byte for byte (same counter):
    // the distinct frames are the publications less the resends.
    let sent = summary.frames() - summary.resends;
    gridsense_tests::evidence!(
        "chaos: broker-restart sent={sent} stored={} lost={} duplicated=0 (down {down:?}; gateway reconnected {reconnects}×; device reconnects {}; {} frames resent after lost PUBACKs; duplicates dropped as such: {})",
        totals.accepted,
        sent.saturating_sub(totals.accepted),
        summary.connects.saturating_sub(30),
        summary.resends,
        totals.rejects.get("duplicate").copied().unwrap_or(0)
    );
    assert!(reconnects >= 1, "the gateway reconnected");
    assert!(summary.connects > 30, "the devices reconnected: {summary:?}");
    assert_eq!(
        totals.accepted, sent,
        "every acknowledged frame stored once: {totals:?} {summary:?}"
    );
}
