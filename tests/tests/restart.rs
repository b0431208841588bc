//! A device restarted by simulated power loss, mid-stream and mid-flight, never reuses a frame
//! counter: every frame any boot sent carries a counter above every earlier one.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use gridsense_firmware::{Identity, drain::Drain};
use gridsense_protocol::{CounterVerdict, CounterWindow, ResetCause, Setting};
use gridsense_simulator::{
    city::Counts,
    clock::SimClock,
    fleet::{self, FIRMWARE},
    link::{Outages, SimPlatform},
    model::{DrainModel, Env},
    physics::{DrainWorld, RainField, Supply},
    rng::Rng,
    scenario,
    stats::Counters,
    store::SharedStore,
};
use gridsense_tests::{Mosquitto, Subscriber, fixtures};

#[tokio::test]
async fn power_loss_never_reuses_a_counter() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 31, Counts { covers: 0, drains: 1, beacons: 0 }).unwrap();
    let device =
        gridsense_simulator::inventory::load(&dir.path().join("devices.json")).unwrap().remove(0);
    let scenario = scenario::parse("t.toml", "description = \"t\"\n").unwrap();
    let subscriber = Subscriber::start(broker.addr()).await.unwrap();
    let clock = SimClock::start(600.0, Duration::from_secs(60));
    let store = SharedStore::default();
    let env = Arc::new(Env { rain: RainField::default() });
    let counters = Arc::new(Counters::default());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut rng = Rng::new(5);
    for boot in 0..5u64 {
        let identity = Identity {
            eui: device.eui,
            key: device.key.clone(),
            firmware: FIRMWARE,
            reset_cause: ResetCause::PowerOn,
        };
        let model = DrainModel {
            world: DrainWorld::new(1, boot, 4_000, 1.0, "".into()),
            supply: Supply::new(1, 0, 0, &scenario),
        };
        let platform = SimPlatform::new(clock, broker.addr(), Outages::default(), Rng::new(boot));
        // Report every 10 simulated seconds, every change: a steady stream of frames.
        let settings = vec![Setting::ReportIntervalS(10), Setting::DrainDeadbandMm(0)];
        let run = fleet::run_device(
            identity,
            Drain::new(),
            settings,
            store.clone(),
            model,
            device.record.mqtt_password.clone(),
            platform,
            clock,
            env.clone(),
            shutdown.clone(),
            counters.clone(),
        );
        // Power is lost after a random 0.7–2 s of real time, wherever the device is.
        let uptime = Duration::from_millis(700 + rng.below(1_300));
        tokio::select! {
            _ = run => panic!("the device stopped by itself"),
            () = tokio::time::sleep(uptime) => {}
        }
    }
    subscriber.settle(Duration::from_millis(300), Duration::from_secs(5)).await;
    let keys = fixtures::keys(dir.path()).unwrap();
    let counters: Vec<u32> = subscriber.decoded(&keys).iter().map(|(h, _)| h.counter).collect();
    assert!(counters.len() > 50, "only {} frames", counters.len());
    let mut window = CounterWindow::new();
    for c in &counters {
        assert!(
            matches!(window.accept(*c), CounterVerdict::New { .. }),
            "counter {c} reused: {counters:?}"
        );
    }
    assert!(counters.windows(2).all(|w| w[0] < w[1]), "{counters:?}");
    // Each boot continued from the persisted reservation: at least four jumps past 256-blocks.
    let jumps = counters.windows(2).filter(|w| w[1] > w[0] + 1).count();
    assert!(jumps >= 4, "{jumps} restarts visible in {counters:?}");
}
