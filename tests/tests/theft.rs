//! A theft scenario against a real Mosquitto yields exactly the expected alarm frames, decoded
//! by an independent subscriber; passing-vehicle spikes yield none.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::{collections::BTreeSet, time::Duration};

use gridsense_protocol::{AlarmKind, Uplink};
use gridsense_simulator::{city::Counts, inventory::Kind};
use gridsense_tests::{Mosquitto, Subscriber, fixtures};

#[tokio::test]
async fn thefts_alarm_exactly_once_and_traffic_never_does() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 11, Counts { covers: 40, drains: 0, beacons: 0 }).unwrap();
    let covers: Vec<_> = devices.iter().filter(|d| d.kind == Kind::Cover).collect();
    let (removed_a, removed_b, displaced) = (&covers[3], &covers[17], &covers[29]);
    let scenario = fixtures::theft_scenario([&removed_a.eui, &removed_b.eui], &displaced.eui);
    let subscriber = Subscriber::start(broker.addr()).await.unwrap();
    let summary =
        fixtures::run(dir.path(), &scenario, broker.addr(), 10.0, Duration::from_secs(13))
            .await
            .unwrap();
    subscriber.settle(Duration::from_millis(500), Duration::from_secs(5)).await;

    let keys = fixtures::keys(dir.path()).unwrap();
    let frames = subscriber.decoded(&keys);
    assert_eq!(frames.len() as u64, summary.frames(), "every frame sent arrived and verified");
    let mut alarms = BTreeSet::new();
    for (header, msg) in &frames {
        let eui = header.eui.to_string();
        match msg {
            Uplink::AlarmRaised(a) => {
                assert!(alarms.insert((eui, a.kind, "raised")), "duplicate {a:?}")
            }
            Uplink::AlarmCleared(a) => {
                assert!(alarms.insert((eui, a.kind, "cleared")), "duplicate {a:?}")
            }
            _ => {}
        }
    }
    let mut expected = BTreeSet::new();
    for cover in [removed_a, removed_b] {
        expected.insert((cover.eui.clone(), AlarmKind::CoverRemoved, "raised"));
        if cover.has_switch == Some(true) {
            expected.insert((cover.eui.clone(), AlarmKind::CoverOpen, "raised"));
        }
    }
    expected.insert((displaced.eui.clone(), AlarmKind::CoverTilt, "raised"));
    expected.insert((displaced.eui.clone(), AlarmKind::CoverTilt, "cleared"));
    if displaced.has_switch == Some(true) {
        expected.insert((displaced.eui.clone(), AlarmKind::CoverOpen, "raised"));
        expected.insert((displaced.eui.clone(), AlarmKind::CoverOpen, "cleared"));
    }
    assert_eq!(alarms, expected);

    // Onsets are the simulated moments the covers moved (20 s and 40 s into the run).
    let start = fixtures::run_start(&frames).unwrap();
    for (header, msg) in &frames {
        if let Uplink::AlarmRaised(a) = msg {
            let expected_at = if header.eui.to_string() == displaced.eui { 40 } else { 20 };
            let onset = a.since.0 - start;
            assert!(
                onset.abs_diff(expected_at) <= 5,
                "{a:?}: onset {onset}s, expected {expected_at}s"
            );
        }
    }
    // The traffic really happened: about 600 spikes per cover-hour over ~130 s of 40 covers.
    assert!(summary.sim_seconds >= 120, "{summary:?}");
}
