//! Alarms first under load: with the gateway saturated by telemetry (thousands of frames held,
//! received and not yet stored), a stolen cover's alarm on its shard's urgent lane becomes a
//! case before the telemetry that was waiting at the gateway ahead of it — the test asserts
//! the order, not a time: when the case is committed, far fewer frames have been stored since
//! the alarm was published than were held at the gateway then. Meanwhile what the gateway
//! holds unacknowledged stays within its own queues (flow control): the rest of the flood
//! waits at the broker, and all of it is stored in the end.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use gridsense_gateway::app;
use gridsense_protocol::{
    DrainSample, Uplink, seal,
    topic::{Lane, uplink_topic},
};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_overtakes_the_telemetry_held_ahead_of_it() {
    let broker = Mosquitto::start_with("max_inflight_messages 1000").unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 93, Counts { covers: 1, drains: 200, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.health.max_frames_per_minute = 1_000_000;
    config.store.batch_max = 50;
    common::import(&config, dir.path());
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    let cover = devices.iter().find(|d| d.record.kind == inventory::Kind::Cover).unwrap();
    let drains: Vec<_> =
        devices.iter().filter(|d| d.record.kind == inventory::Kind::Drain).collect();
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    // 60,000 readings on the drains' up lanes, faster than the gateway stores them.
    // Dry wells: readings no rule makes a case of.
    let at = common::now_device_time();
    let flood: Vec<(String, Vec<u8>)> = (1..=300u32)
        .flat_map(|counter| {
            let level_mm = 300 + u16::try_from(counter % 7).unwrap();
            let reading =
                Uplink::DrainReading { at, sample: DrainSample { level_mm, rate_mm_h: 0 } };
            drains.iter().map(move |d| {
                let topic = uplink_topic(d.eui, 64, Lane::Up).to_string();
                (topic, seal(d.eui, counter, &reading, &d.key).to_vec())
            })
        })
        .collect();
    let total = flood.len() as u64;
    let publisher = tokio::spawn(common::publish_on(broker.addr(), flood));
    // Flow control: what the gateway holds unacknowledged never passes its sessions' windows
    // (each session's Receive Maximum), however far the flood runs ahead; the rest waits at
    // the broker.
    let most_held = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (status, most) = (gateway.status.clone(), most_held.clone());
        tokio::spawn(async move {
            loop {
                most.fetch_max(status.unacked.load(Relaxed), Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    // Saturated: hundreds held at the gateway, received and not yet stored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gateway.status.unacked.load(Relaxed) < 800 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never held 800 frames: {} stored",
            gateway.status.frames_accepted.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let held = gateway.status.unacked.load(Relaxed);
    let stored_then = gateway.status.frames_accepted.load(Relaxed);
    let alarm = common::removed(common::now_device_time());
    let topic = uplink_topic(cover.eui, 64, Lane::Urgent).to_string();
    let frame = seal(cover.eui, 1, &alarm, &cover.key).to_vec();
    let broker_addr = broker.addr();
    let published = std::time::Instant::now();
    tokio::spawn(async move {
        common::publish_as("the-cover", broker_addr, vec![(topic, frame)]).await;
    });
    // The case counts as filed once its batch is committed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let stored_at_case = loop {
        let accepted = gateway.status.frames_accepted.load(Relaxed);
        if gateway.status.cases_filed.load(Relaxed) > 0 {
            break accepted;
        }
        assert!(tokio::time::Instant::now() < deadline, "no case in 60 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let took = published.elapsed();
    let still_held = gateway.status.unacked.load(Relaxed);
    publisher.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while gateway.status.frames_accepted.load(Relaxed) < total + 1 {
        assert!(tokio::time::Instant::now() < deadline, "the flood was not all stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sampler.abort();
    let most_held = most_held.load(Relaxed);
    // The gateway's own queues: the pipeline's channel (every session's window), the two
    // batches the pipeline holds, and per session one read of rumqttc's (at most 9 packets)
    // made while the channel was full. (Mosquitto 2.0.11 does not keep to the Receive
    // Maximum once acks flow, so the windows alone would not bound it.)
    let shards = u64::from(config.cluster.shards);
    let sessions = 2 * shards + 1;
    let bound = gateway.status.queue_capacity.load(Relaxed)
        + 2 * config.store.batch_max as u64
        + 9 * sessions;
    let store = app::open_store(&config).unwrap();
    let case = store.case(1).unwrap().expect("the theft's case");
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    assert_eq!(case.device_id, cover.eui.to_string());
    // Only the order matters: the case committed before most of what was held ahead of the
    // alarm was stored.
    let stored_since = stored_at_case - stored_then;
    gridsense_tests::evidence!(
        "edge: urgent lane: {held} frames held at the gateway when a cover's alarm was published; its case committed {} ms later, after {stored_since} more frames were stored ({still_held} still held then); {total} telemetry frames in all",
        took.as_millis()
    );
    gridsense_tests::evidence!(
        "edge: flow control: at most {most_held} frames held unacknowledged while {total} were published faster than stored (the gateway's bound: {bound}; {sessions} sessions)"
    );
    assert!(most_held <= bound, "{most_held} held, more than the gateway's queues hold ({bound})");
    assert!(most_held >= 800, "never saturated: at most {most_held} held");
    // Behind the telemetry it would wait for every frame held ahead of it (and more).
    assert!(
        stored_since < held * 3 / 4,
        "the alarm waited behind the telemetry: {stored_since} frames stored before its case, {held} held ahead of it"
    );
}
