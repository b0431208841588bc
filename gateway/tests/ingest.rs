//! The gateway against a real Mosquitto and a simulated fleet with misbehaving senders: every
//! authentic frame is accepted exactly once and stored (telemetry at its sample times), every
//! bad one is rejected with its reason and stores nothing, and good devices are unaffected.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, sync::atomic::Ordering::Relaxed, time::Duration};

use gridsense_gateway::{app, config::Config};
use gridsense_simulator::{city::Counts, fleet::Transport};
use gridsense_tests::{Mosquitto, Subscriber, fixtures};

#[tokio::test]
async fn authentic_frames_are_stored_once_and_bad_ones_only_counted() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 61, Counts { covers: 60, drains: 20, beacons: 10 }).unwrap();
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", broker.addr());
    config.store.path = dir.path().join("gridsense.db");
    config.store.batch_max = 64;
    assert_eq!(common::import(&config, dir.path()).added, 90);
    // The gateway shares the simulator's clock, as in `gridsense demo`.
    let (gateway, stop_tx, clock) =
        common::start_shared(&config, 20.0, Duration::from_secs(10)).await;
    let subscriber = Subscriber::start(broker.addr()).await.unwrap();

    let scenario = r#"
description = "test: good traffic and bad actors"
seed = 12
[device_config]
report_interval_s = 30
drain_deadband_mm = 0
[[bad_actor]]
mode = "wrong_key"
devices = 2
[[bad_actor]]
mode = "replay"
devices = 2
rate_per_s = 1
[[bad_actor]]
mode = "garbage"
devices = 1
rate_per_s = 1
"#;
    let summary = fixtures::run_clocked(
        dir.path(),
        scenario,
        broker.addr(),
        clock,
        Duration::from_secs(10),
        Transport::PerDevice,
    )
    .await
    .unwrap();
    subscriber.settle(Duration::from_millis(500), Duration::from_secs(5)).await;
    // Let the gateway drain, then stop it (it commits and acknowledges what it holds).
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = gateway.status.frames_accepted.load(Relaxed)
            + gateway.status.frames_rejected.load(Relaxed);
        if seen == last && gateway.status.unacked.load(Relaxed) == 0 {
            break;
        }
        last = seen;
    }
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    // What an independent observer says should have been accepted: each authentic
    // (device, counter) once.
    let common::Expected { frames: distinct, points } = common::expected(&subscriber, dir.path());
    let store = app::open_store(&config).unwrap();
    let totals = store.totals().unwrap();
    assert!(summary.mischief > 10, "{summary:?}");
    assert_eq!(totals.accepted, distinct.len() as u64, "rejects: {:?}", totals.rejects);
    assert_eq!(store.telemetry_count(None).unwrap(), points.len() as u64);
    // Wrong key, replays and garbage, each by its reason.
    assert!(totals.rejects.get("bad_tag").copied().unwrap_or(0) > 0, "{:?}", totals.rejects);
    let replays = totals.rejects.get("duplicate").copied().unwrap_or(0)
        + totals.rejects.get("replay").copied().unwrap_or(0);
    assert!(replays > 0, "{:?}", totals.rejects);
    let rejected: u64 = totals.rejects.values().sum();
    assert!(
        rejected >= summary.mischief,
        "{rejected} rejects for {} bad messages",
        summary.mischief
    );
    assert_eq!(store.audit_len().unwrap(), rejected.min(config.store.audit_max));
    // Every device that sent an authentic frame is online.
    let senders: HashSet<_> = distinct.iter().map(|(eui, _)| *eui).collect();
    let online = store.health().unwrap().iter().filter(|(_, h)| h.online).count();
    assert_eq!(online, senders.len());
}
