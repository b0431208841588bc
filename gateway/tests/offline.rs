//! Offline detection in virtual time, through the store: a device that stops reporting goes
//! offline at its deadline and back online on its next frame, and the deadline survives a
//! gateway restart in between (the offline event carries the time the deadline passed).

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use gridsense_gateway::store::prelude::*;
use gridsense_gateway::{
    config::{self, Synchronous},
    pipeline::{Outcome, Pipeline},
    registry::{Kind, Registered},
    store::{Batch, Store},
};
use gridsense_protocol::{DeviceKey, Direction, Eui, examples, seal, topic::topic};

const MIN: i64 = 60_000;

fn pipeline(store: &Store, config: &config::Health) -> Pipeline {
    Pipeline::new(
        store.registry().unwrap(),
        store.counters().unwrap(),
        store.health().unwrap(),
        config.policy(),
    )
}

#[test]
fn offline_at_the_deadline_online_again_and_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    let key = DeviceKey::from_bytes([8; 16]);
    let eui = Eui(0x2102_0202_0000_0001);
    // Registry row, as an import would write it.
    {
        let city = gridsense_simulator::city::generate(
            1,
            gridsense_simulator::city::Counts { covers: 0, drains: 1, beacons: 0 },
        );
        let mut text = serde_json::to_string(&city.devices).unwrap();
        text = text.replace(&city.devices[0].key, &hex_key(&key));
        let devices = gridsense_simulator::inventory::parse("devices.json", &text).unwrap();
        assert_eq!(devices[0].eui, eui);
        Store::open(&path, Synchronous::Normal, 100).unwrap().import(&devices, 0).unwrap();
    }
    let health =
        config::Health { drain_interval_s: 300, offline_factor: 2.0, ..config::Health::default() };
    let up = topic(eui, Direction::Uplink);
    let reading = &examples::uplinks()[1];
    let mut store = Store::open(&path, Synchronous::Normal, 100).unwrap();
    assert_eq!(
        store.registry().unwrap(),
        vec![Registered { eui, kind: Kind::Drain, key: key.clone() }]
    );
    let mut p = pipeline(&store, &health);
    let mut batch = Batch::default();
    assert_eq!(
        p.handle(0, &up, &seal(eui, 1, reading, &key), &mut batch),
        Outcome::Accepted("drain_reading")
    );
    p.finish(&mut batch, 0, true);
    store.commit(&batch).unwrap();
    // 9 minutes later: still online (deadline 10 min).
    let mut batch = Batch::default();
    p.tick(9 * MIN, &mut batch);
    assert!(batch.events.is_empty());
    drop(p);
    drop(store);

    // The gateway is down from minute 9 to minute 30, then restarts from the store.
    let mut store = Store::open(&path, Synchronous::Normal, 100).unwrap();
    let mut p = pipeline(&store, &health);
    let mut batch = Batch::default();
    p.tick(30 * MIN, &mut batch);
    p.finish(&mut batch, 0, true);
    store.commit(&batch).unwrap();
    // Back online with its next frame; the replayed old frame is a duplicate after the restart.
    let mut batch = Batch::default();
    assert_eq!(
        p.handle(31 * MIN, &up, &seal(eui, 1, reading, &key), &mut batch),
        Outcome::Rejected("duplicate")
    );
    assert_eq!(
        p.handle(31 * MIN, &up, &seal(eui, 2, reading, &key), &mut batch),
        Outcome::Accepted("drain_reading")
    );
    p.finish(&mut batch, 0, true);
    store.commit(&batch).unwrap();
    assert_eq!(
        store.events_of(eui).unwrap(),
        vec![
            (0, "online".to_owned()),
            (10 * MIN, "offline".to_owned()),
            (31 * MIN, "online".to_owned())
        ]
    );
}

fn hex_key(key: &DeviceKey) -> String {
    key.expose_bytes().iter().map(|b| format!("{b:02x}")).collect()
}
