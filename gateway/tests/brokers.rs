//! The firmware's MQTT client (rust-mqtt, MQTT 5) works against both brokers the project uses:
//! Mosquitto (production and tests) and rumqttd (the gateway's zero-install default). Uplinks
//! arrive and verify, PUBACKs come back, and a downlink reaches the device and is acknowledged.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use gridsense_gateway::broker::start_embedded;
use gridsense_protocol::{
    AckOutcome, Direction, Downlink, DownlinkAck, Setting, Uplink, seal, topic::topic,
};
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, Subscriber, fixtures};
use rumqttc::{AsyncClient, MqttOptions, QoS};

async fn exercise(devices_addr: SocketAddr, clients_addr: SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let inventory =
        fixtures::city(dir.path(), 41, Counts { covers: 10, drains: 5, beacons: 5 }).unwrap();
    let keys = fixtures::keys(dir.path()).unwrap();
    let subscriber = Subscriber::start(clients_addr).await.unwrap();

    // A configuration downlink for one drain, sent while the fleet runs.
    let drain =
        inventory.iter().find(|d| d.kind == gridsense_simulator::inventory::Kind::Drain).unwrap();
    let eui = drain.eui.parse().unwrap();
    let key = &keys[&eui];
    let settings = heapless::Vec::from_slice(&[Setting::ReportIntervalS(120)]).unwrap();
    let config = seal(eui, 1, &Downlink::Config { settings }, key).to_vec();
    let mut options =
        MqttOptions::new("test-downlink", clients_addr.ip().to_string(), clients_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let down = topic(eui, Direction::Downlink).to_string();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = client.publish(down, QoS::AtLeastOnce, false, config).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    });

    let scenario = "description = \"t\"\nseed = 3\n[traffic]\nvehicles_per_hour = 60\n";
    let summary = fixtures::run(dir.path(), scenario, devices_addr, 10.0, Duration::from_secs(7))
        .await
        .unwrap();
    subscriber.settle(Duration::from_millis(300), Duration::from_secs(5)).await;
    let frames = subscriber.decoded(&keys);
    assert_eq!(summary.connects, 20, "{summary:?}");
    assert_eq!(summary.connection_failures, 0, "{summary:?}");
    assert_eq!(frames.len() as u64, summary.frames(), "{summary:?}");
    assert!(summary.frames() >= 20 + 15, "{summary:?}");
    assert_eq!(summary.downlinks, 1, "{summary:?}");
    let ack = frames.iter().find_map(|(h, m)| match m {
        Uplink::DownlinkAck(a) if h.eui == eui => Some(*a),
        _ => None,
    });
    assert_eq!(ack, Some(DownlinkAck { counter: 1, outcome: AckOutcome::Applied }));
}

#[tokio::test]
async fn with_mosquitto() {
    let broker = Mosquitto::start().unwrap();
    exercise(broker.addr(), broker.addr()).await;
}

#[tokio::test]
async fn with_the_embedded_broker() {
    let broker = start_embedded(0, 0).unwrap();
    exercise(broker.devices, broker.clients).await;
}
