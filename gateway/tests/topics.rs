//! The topic scheme through a real Mosquitto (protocol/SPEC.md §2): the gateway takes a
//! device's frames on both lanes of its shard and on version 1's topic, and refuses — counted
//! as `wrong_shard`, acknowledged, nothing stored — a frame whose shard level is not its EUI's.
//! A store made with one number of shards refuses a gateway configured with another, and a
//! SQLite store refuses a second gateway instance while one runs on it.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use gridsense_gateway::app;
use gridsense_protocol::{
    examples, seal,
    topic::{Lane, shard_of, uplink_topic},
};
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, fixtures};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_lanes_of_a_devices_shard_and_version_1s_topic_are_taken_another_shard_is_not() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 41, Counts { covers: 1, drains: 0, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.cluster.shards = 16;
    common::import(&config, dir.path());
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let keys = fixtures::keys(dir.path()).unwrap();
    let eui = *keys.keys().next().unwrap();
    let status = &examples::uplinks()[2];
    let frame = |n| seal(eui, n, status, &keys[&eui]).to_vec();
    let wrong = (shard_of(eui, 16) + 1) % 16;
    let frames = vec![
        (uplink_topic(eui, 16, Lane::Up).to_string(), frame(1)),
        (uplink_topic(eui, 16, Lane::Urgent).to_string(), frame(2)),
        (format!("gridsense/{eui}/up"), frame(3)),
        (format!("gridsense/{wrong:02x}/{eui}/up"), frame(4)),
        // With the default 64 shards the EUI's shard differs: not this deployment's.
        (uplink_topic(eui, 64, Lane::Up).to_string(), frame(5)),
    ];
    // Each shard's lanes are a session of their own: a frame on a shard level this deployment
    // does not have (64 shards' level above 0f) reaches no session at all.
    let (s16, s64) = (shard_of(eui, 16), shard_of(eui, 64));
    let delivered = 4 + u64::from(s64 < 16);
    let expect_wrong = 1 + u64::from(s64 < 16 && s64 != s16);
    common::publish_on(broker.addr(), frames).await;
    let store = app::open_store(&config).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let totals = loop {
        let t = store.totals().unwrap();
        if t.accepted + t.rejects.values().sum::<u64>() >= delivered {
            break t;
        }
        assert!(tokio::time::Instant::now() < deadline, "{t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(totals.rejects.get("wrong_shard").copied().unwrap_or(0), expect_wrong, "{totals:?}");
    assert_eq!(totals.accepted, delivered - expect_wrong, "{totals:?}");
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    // The store now says 16 shards: a gateway configured with 64 is refused, and says why.
    config.cluster.shards = 64;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let Err(e) = app::start(&config, app::wall_clock(), stop_rx) else {
        panic!("a store made with 16 shards took a gateway configured with 64")
    };
    assert!(format!("{e:#}").contains("made with 16 shards"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_one_sqlite_store_is_refused_and_says_why() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 42, Counts { covers: 1, drains: 0, beacons: 0 }).unwrap();
    let config = common::config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let Err(e) = app::start(&config, app::wall_clock(), stop_rx) else {
        panic!("two gateways on one SQLite store")
    };
    let said = format!("{e:#}");
    assert!(said.contains("is in use") && said.contains(".lock"), "{said}");
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    // Once the first has stopped, a gateway starts on it again.
    let (again, stop) = common::start(&config, app::wall_clock()).await;
    stop.send(true).unwrap();
    again.task.await.unwrap().unwrap();
}

/// A version 1 device (the firmware with its default configuration publishes on
/// `gridsense/{eui}/up`) is moved by the gateway: a `Config` with the deployment's shards, after
/// which its frames come on its shard's lanes — telemetry on `up`, the theft's alarm on
/// `urgent` — and nothing is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_device_is_moved_to_its_shards_topics_by_a_configuration_downlink() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 42, Counts { covers: 3, drains: 3, beacons: 0 }).unwrap();
    let config = common::config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let subscriber = gridsense_tests::Subscriber::start(broker.addr()).await.unwrap();
    let scenario = "description = \"v1\"\nseed = 5\n[device_config]\nreport_interval_s = 1\ndrain_deadband_mm = 0\n\
        [[theft]]\nat = \"6s\"\ncovers = 1\nmode = \"removed\"\n";
    let summary = fixtures::run(dir.path(), scenario, broker.addr(), 1.0, Duration::from_secs(10))
        .await
        .unwrap();
    subscriber.settle(Duration::from_millis(500), Duration::from_secs(5)).await;
    let frames = subscriber.frames();
    let keys = fixtures::keys(dir.path()).unwrap();
    let mut legacy = std::collections::BTreeMap::<String, usize>::new();
    let mut moved = std::collections::BTreeMap::<String, usize>::new();
    let mut urgent_alarm = 0;
    for f in &frames {
        match gridsense_protocol::topic::parse_route(&f.topic).unwrap() {
            gridsense_protocol::topic::Route::LegacyUplink(e) => {
                *legacy.entry(e.to_string()).or_default() += 1;
            }
            gridsense_protocol::topic::Route::Uplink { eui, lane, .. } => {
                *moved.entry(eui.to_string()).or_default() += 1;
                let message =
                    gridsense_protocol::open::<gridsense_protocol::Uplink>(&f.payload, &keys[&eui])
                        .unwrap()
                        .1;
                assert_eq!(lane, gridsense_protocol::topic::lane_of(&message), "{message:?}");
                if lane == Lane::Urgent {
                    urgent_alarm += 1;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(moved.len(), 6, "every device moved: {moved:?} (still on version 1: {legacy:?})");
    assert!(legacy.values().all(|n| *n <= 3), "moved after its first frames: {legacy:?}");
    assert!(urgent_alarm >= 1, "the theft's alarm came on the urgent lane");
    let expected = common::expected(&subscriber, dir.path()).frames.len() as u64;
    let store = app::open_store(&config).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store.totals().unwrap().accepted < expected {
        assert!(tokio::time::Instant::now() < deadline, "not all stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.totals().unwrap().accepted, expected);
    gridsense_tests::evidence!(
        "edge: version 1 devices moved by a configuration downlink: {} frames on gridsense/{{eui}}/up before the move (at most {} per device), {} on the shard lanes after, {urgent_alarm} alarm frames on urgent, {expected} stored of {} published",
        legacy.values().sum::<usize>(),
        legacy.values().max().copied().unwrap_or(0),
        moved.values().sum::<usize>(),
        summary.frames()
    );
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}
