//! A device offline in the middle of a rainstorm: after it reconnects its backlog arrives in
//! order with the original sample times and nothing lost up to the queue bound; beyond the
//! bound only plain telemetry is dropped, and the count says how much.

// Test code: a panic is how a failure is reported.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use std::{collections::BTreeMap, time::Duration};

use gridsense_protocol::{AlarmKind, Sample, Uplink};
use gridsense_simulator::{city::Counts, fleet::PER_DEVICE_QUEUES, inventory::Kind};
use gridsense_tests::{Mosquitto, Subscriber, fixtures};

/// Drain sample times (simulated seconds after the run's start) per device, in arrival order.
type Series = BTreeMap<String, Vec<u32>>;

#[tokio::test]
async fn backlog_after_an_outage_arrives_in_order_and_only_telemetry_beyond_the_bound_is_dropped() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 21, Counts { covers: 0, drains: 6, beacons: 0 }).unwrap();
    let drains: Vec<_> =
        devices.iter().filter(|d| d.kind == Kind::Drain).map(|d| d.eui.clone()).collect();
    let (short, long) = (&drains[0..2], &drains[2..4]);
    let scenario = format!(
        r#"
description = "test: outages during a storm"
seed = 4
[battery]
low_fraction = 0.0
[[rain]]
start = "0s"
duration = "4h"
peak_mm_h = 150
[[outage]]
start = "100m"
duration = "20m"
euis = [{}]
[[outage]]
start = "80m"
duration = "150m"
euis = [{}]
"#,
        short.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", "),
        long.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", "),
    );
    let subscriber = Subscriber::start(broker.addr()).await.unwrap();
    let summary =
        fixtures::run(dir.path(), &scenario, broker.addr(), 900.0, Duration::from_secs(20))
            .await
            .unwrap();
    subscriber.settle(Duration::from_millis(500), Duration::from_secs(5)).await;
    assert!(summary.sim_seconds > 14_000, "{summary:?}");

    let keys = fixtures::keys(dir.path()).unwrap();
    // A frame resent after a lost PUBACK is the same frame (same counter), which any receiver
    // drops by its counter window (SPEC §4): count each frame once, as the gateway does. A
    // sample sent twice in two frames would still show as out of order below.
    let mut seen = std::collections::HashSet::new();
    let frames: Vec<_> = subscriber
        .decoded(&keys)
        .into_iter()
        .filter(|(header, _)| seen.insert((header.eui, header.counter)))
        .collect();
    let start = fixtures::run_start(&frames).unwrap();
    let mut series = Series::new();
    let mut alarms: BTreeMap<String, Vec<(AlarmKind, u32)>> = BTreeMap::new();
    for (header, msg) in &frames {
        let eui = header.eui.to_string();
        match msg {
            Uplink::DrainReading { at, .. } => series.entry(eui).or_default().push(at.0 - start),
            Uplink::Backlog(b) => {
                for (at, sample) in b.timed() {
                    assert!(matches!(sample, Sample::Drain(_)));
                    series.entry(eui.clone()).or_default().push(at.0 - start);
                }
            }
            Uplink::AlarmRaised(a) => {
                alarms.entry(eui).or_default().push((a.kind, a.since.0 - start))
            }
            _ => {}
        }
    }
    // In order, with their original times, for every device.
    for (eui, times) in &series {
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{eui} out of order: {times:?}");
    }
    // Short outage (100–120 min): nothing lost. The storm keeps every well in fast sampling (60 s).
    for eui in short {
        let times = &series[eui];
        let in_outage = times.iter().filter(|t| (6_000..7_200).contains(*t)).count();
        // About 20 at 60 s; fewer only if CPU load stretched intervals (losses show as gaps below).
        assert!(in_outage >= 15, "{eui}: {in_outage} samples in the outage");
        let warned = alarms[eui].iter().find(|(k, _)| *k == AlarmKind::DrainWarning).unwrap().1;
        // A lost sample leaves two intervals (120 s) between neighbours; load only stretches one.
        let gaps: Vec<_> = times
            .windows(2)
            .filter(|w| w[0] > warned && w[1] < 12_000 && w[1] - w[0] >= 120)
            .collect();
        assert!(gaps.is_empty(), "{eui}: gaps {gaps:?}");
    }
    // Long outage (80–230 min, about 150 samples): the queue keeps the newest 128.
    let bound = PER_DEVICE_QUEUES.1;
    let mut holes = 0;
    for eui in long {
        let times = &series[eui];
        let kept = times.iter().filter(|t| (4_800..13_800).contains(*t)).count();
        assert!(
            kept <= bound && kept + 3 >= bound,
            "{eui}: kept {kept} of the outage, bound {bound}"
        );
        let hole = times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        holes += (hole / 60) as u64 - 1;
        // Its alarms, raised while it was offline, arrived with their onsets.
        let raised: Vec<_> = alarms[eui].iter().map(|(k, _)| *k).collect();
        assert!(
            raised.contains(&AlarmKind::DrainWarning) && raised.contains(&AlarmKind::DrainAlarm),
            "{eui}: {raised:?}"
        );
    }
    assert!(summary.telemetry_dropped > 0, "{summary:?}");
    assert_eq!(summary.urgent_refused, 0);
    // The count says how much: the holes in the two long series are the dropped samples.
    assert!(
        holes.abs_diff(summary.telemetry_dropped) <= 2,
        "holes {holes}, dropped {}",
        summary.telemetry_dropped
    );
}
