//! The fidelity transport end to end: each device's traffic goes through its own embassy-net
//! (smoltcp) TCP/IP stack over a simulated radio link with latency and loss, and an outage,
//! bridged to a real Mosquitto. A stolen cover's alarm arrives; a drain's backlog after its
//! outage arrives in order.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::time::Duration;

use gridsense_protocol::{AlarmKind, Uplink};
use gridsense_simulator::{city::Counts, fidelity::RadioConfig, fleet::Transport, inventory::Kind};
use gridsense_tests::{Mosquitto, Subscriber, fixtures};

#[tokio::test]
async fn alarms_and_backlog_cross_a_lossy_radio_link() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 51, Counts { covers: 3, drains: 2, beacons: 0 }).unwrap();
    let cover = devices.iter().find(|d| d.kind == Kind::Cover).unwrap();
    let drain = devices.iter().find(|d| d.kind == Kind::Drain).unwrap();
    let scenario = format!(
        r#"
description = "test: fidelity"
seed = 8
[battery]
low_fraction = 0.0
[device_config]
report_interval_s = 20
drain_deadband_mm = 0
[[theft]]
at = "30s"
covers = 0
mode = "removed"
euis = ["{}"]
[[outage]]
start = "60s"
duration = "120s"
euis = ["{}"]
"#,
        cover.eui, drain.eui
    );
    let subscriber = Subscriber::start(broker.addr()).await.unwrap();
    let radio = RadioConfig { latency_ms: 40, jitter_ms: 20, loss: 0.02 };
    let summary = fixtures::run_with(
        dir.path(),
        &scenario,
        broker.addr(),
        20.0,
        Duration::from_secs(15),
        Transport::Fidelity(radio),
    )
    .await
    .unwrap();
    subscriber.settle(Duration::from_millis(500), Duration::from_secs(5)).await;
    let keys = fixtures::keys(dir.path()).unwrap();
    let frames = subscriber.decoded(&keys);
    assert!(summary.connects >= 5, "{summary:?}");
    let removed = frames.iter().any(|(h, m)| {
        h.eui.to_string() == cover.eui
            && matches!(m, Uplink::AlarmRaised(a) if a.kind == AlarmKind::CoverRemoved)
    });
    assert!(removed, "no removal alarm in {} frames", frames.len());
    // The drain's readings: every 20 s, in order, the outage's included (sent as backlog).
    let mut times = Vec::new();
    let mut batches = 0;
    for (h, m) in &frames {
        if h.eui.to_string() != drain.eui {
            continue;
        }
        match m {
            Uplink::DrainReading { at, .. } => times.push(at.0),
            Uplink::Backlog(b) => {
                batches += 1;
                times.extend(b.timed().map(|(t, _)| t.0));
            }
            _ => {}
        }
    }
    assert!(batches >= 1, "no backlog batch after the outage");
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    // A lost reading leaves a gap of two intervals (40 s); scheduling jitter under load only
    // stretches one interval a little (the next sample is due 20 s after the actual one).
    let gaps: Vec<u32> = times.windows(2).map(|w| w[1] - w[0]).filter(|g| *g >= 40).collect();
    assert!(gaps.is_empty(), "readings lost: gaps {gaps:?} in {times:?}");
    assert!(times.len() >= 12, "{times:?}");
}
