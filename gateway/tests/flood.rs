//! A flooding device (thousands of authentic frames a minute) is throttled before its frames
//! cost any crypto, flagged in its health history, and does not stop another device's alarm
//! from becoming a case.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use gridsense_gateway::app;
use gridsense_protocol::{Uplink, examples};
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, fixtures};

#[tokio::test]
async fn a_flooding_device_is_throttled_and_flagged_and_others_still_get_cases() {
    let broker = Mosquitto::start_with("max_inflight_messages 1000").unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 91, Counts { covers: 3, drains: 1, beacons: 0 }).unwrap();
    let config = common::config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let keys = fixtures::keys(dir.path()).unwrap();
    let mut devices: Vec<_> = keys.keys().copied().collect();
    devices.sort();
    let (flooder, victim) = (devices[3], devices[0]);
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let reading: Uplink = examples::uplinks()[1].clone();
    let mut frames: Vec<_> = (0..2_000).map(|_| (flooder, reading.clone())).collect();
    // The stolen cover's alarm arrives in the middle of the flood.
    let at = common::now_device_time();
    let started = Instant::now();
    frames.insert(1_000, (victim, common::removed(at)));
    common::publish_from(broker.addr(), frames, &keys, 1).await;
    let store = app::open_store(&config).unwrap();
    let mut case = None;
    for _ in 0..100 {
        case = store.case(1).unwrap();
        if case.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = started.elapsed();
    // Let the rest of the flood drain.
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = gateway.status.frames_accepted.load(std::sync::atomic::Ordering::Relaxed)
            + gateway.status.frames_rejected.load(std::sync::atomic::Ordering::Relaxed);
        if n == last {
            break;
        }
        last = n;
    }
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let case = case.expect("the alarm became a case during the flood");
    assert_eq!(case.device_id, victim.to_string());
    let totals = store.totals().unwrap();
    let limited = totals.rejects.get("rate_limited").copied().unwrap_or(0);
    assert_eq!(totals.accepted, 300 + 1, "the budget and the alarm: {totals:?}");
    assert_eq!(limited, 1_700, "{totals:?}");
    let events = store.events_of(flooder).unwrap();
    assert_eq!(events.iter().filter(|(_, e)| e == "flooding").count(), 1, "{events:?}");
    assert!(store.audit_len().unwrap() <= 2, "a flood is counted, not audited frame by frame");
    gridsense_tests::evidence!(
        "flood: 2001 frames sent, {} accepted (300 of the flooder's, the alarm), 1700 throttled; the other device's case was in the store {seen:?} after publishing began (the publisher itself takes 500 ms)",
        totals.accepted
    );
}
