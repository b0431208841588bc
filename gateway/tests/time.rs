//! Where the device's clock and the gateway's meet: a fleet at 60× speed against a separate
//! gateway on the wall clock (as `gridsim run --speed 60` against `gridsense run`). The gateway
//! time-syncs the devices; they map the sync onto their simulated timeline instead of jumping to
//! the wall clock and then running 60× ahead of it, so no sample is dated in the future and a
//! theft's case has its onset before its detection. (The gateway's own guard — a sample time
//! more than `health.max_ahead_s` ahead is clamped and counted — is unit-tested in the
//! pipeline; here it must not fire.)

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use gridsense_gateway::{app, store::CaseFilter};
use gridsense_simulator::{city::Counts, inventory::Kind};
use gridsense_tests::{Mosquitto, fixtures};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_fleet_synced_by_a_wall_clock_gateway_never_runs_ahead_of_it() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 12, Counts { covers: 10, drains: 0, beacons: 0 }).unwrap();
    let cover = devices.iter().find(|d| d.kind == Kind::Cover).unwrap();
    let config = common::config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    // Stolen 10 simulated minutes in (10 s of wall clock at 60×): long after the first time
    // sync, when a device that had jumped to the wall clock would be minutes ahead of it.
    let scenario = format!(
        "description = \"t\"\nseed = 5\n[traffic]\nvehicles_per_hour = 0\n[battery]\nlow_fraction = 0.0\n\
         [[theft]]\nat = \"600s\"\ncovers = 0\nmode = \"removed\"\neuis = [\"{}\"]\n",
        cover.eui
    );
    let summary =
        fixtures::run(dir.path(), &scenario, broker.addr(), 60.0, Duration::from_secs(14))
            .await
            .unwrap();
    assert!(summary.downlinks >= 1, "the gateway time-synced nobody: {summary:?}");
    let store = app::open_store(&config).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let case = loop {
        if let Some(c) = store.cases(&CaseFilter { limit: 10, ..Default::default() }).unwrap().pop()
        {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "the theft was never filed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ahead_s = (case.onset_ms - case.detected_ms) / 1000;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let future = gateway.status.samples_future.load(Relaxed);
    gridsense_tests::evidence!(
        "edge: time at --speed 60 against a wall-clock gateway: {} time syncs, case onset {}s relative to its detection, {future} sample times clamped",
        summary.downlinks,
        ahead_s
    );
    assert!(case.onset_ms <= case.detected_ms, "onset {ahead_s} s after detection");
    assert_eq!(future, 0, "sample times in the future reached the gateway");
}
