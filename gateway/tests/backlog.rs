//! A drain offline for hours during a storm sends its backlog when it comes back: the samples
//! are stored at their own times, in order, and the alarm they show becomes a case whose onset
//! is the sample that crossed the well's warning level, hours before the case was filed.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use gridsense_gateway::{app, rules::device_ms};
use gridsense_protocol::{Backlog, DeviceTime, DrainSample, Sample, TimedSample, Uplink};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures};

#[tokio::test]
async fn a_late_backlog_files_its_case_with_the_onset_it_shows() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 99, Counts { covers: 0, drains: 2, beacons: 0 }).unwrap();
    let config = common::config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let keys = fixtures::keys(dir.path()).unwrap();
    let drain = inventory::load(&dir.path().join("devices.json")).unwrap().remove(0);
    let warn = i32::from(drain.record.warn_mm.unwrap());
    // Two hours of 5-minute samples, taken three hours ago: rising 100 mm a step (1.2 m/h,
    // under the fast-rise rule), at the warning level at the 12th sample, above it at the 13th.
    let now = common::now_device_time();
    let base = DeviceTime(now.0 - 3 * 3_600);
    let mut samples = heapless::Vec::new();
    for i in 0..24 {
        let level = u16::try_from(warn - 1_100 + i * 100).unwrap();
        let delta_s = if i == 0 { 0 } else { 300 };
        samples
            .push(TimedSample {
                delta_s,
                sample: Sample::Drain(DrainSample { level_mm: level, rate_mm_h: 1_200 }),
            })
            .unwrap();
    }
    let backlog = Uplink::Backlog(Backlog { base, samples });
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    common::publish(broker.addr(), vec![(drain.eui, backlog)], &keys).await;
    let store = app::open_store(&config).unwrap();
    for _ in 0..50 {
        if store.case(1).unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let stored = store.telemetry_count(Some(("drain", "level_mm"))).unwrap();
    assert_eq!(stored, 24, "every sample at its own time");
    let case = store.case(1).unwrap().expect("the backlog's alarm is a case");
    let crossed = device_ms(DeviceTime(base.0 + 12 * 300));
    assert_eq!(case.class_code, "E0404");
    assert_eq!(case.onset_ms, crossed, "onset is the sample that crossed the warning level");
    let late = (case.detected_ms - case.onset_ms) / 60_000;
    assert!(late >= 119, "filed when the backlog arrived, {late} min after its onset");
    gridsense_tests::evidence!(
        "chaos: backlog-storm sent=24 stored={stored} lost=0 duplicated=0 (one case, onset {late} min before it was filed: the crossing sample's time)"
    );
}
