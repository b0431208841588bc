//! Downlinks end to end: devices that boot get a time sync and acknowledge it; a configuration
//! requested through the store while the gateway runs reaches the device at its next frame and
//! its acknowledgement closes the request as applied; a status request brings a status.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use gridsense_gateway::{
    app,
    config::Config,
    downlink::{Request, parse_setting},
};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures};

#[tokio::test]
async fn time_sync_configuration_and_status_requests_reach_devices() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 101, Counts { covers: 0, drains: 6, beacons: 0 }).unwrap();
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", broker.addr());
    config.store.path = dir.path().join("gridsense.db");
    config.downlink.poll_ms = 200;
    common::import(&config, dir.path());
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    // The gateway shares the simulator's clock, as in `gridsense demo`.
    let (gateway, stop_tx, clock) =
        common::start_shared(&config, 10.0, Duration::from_secs(10)).await;
    let scenario = "description = \"t\"\nseed = 5\n[device_config]\nreport_interval_s = 20\ndrain_deadband_mm = 0\n";
    let sim =
        common::spawn_fleet(dir.path(), scenario, broker.addr(), clock, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (configure, status_request) = {
        let mut store = app::open_store(&config).unwrap();
        let settings = vec![
            parse_setting("report_interval_s=120").unwrap(),
            parse_setting("drain_warn_mm=1000").unwrap(),
        ];
        let a = store.add_request(devices[0].eui, &Request::Configure(settings), 0).unwrap();
        let b = store.add_request(devices[1].eui, &Request::StatusRequest, 0).unwrap();
        (a, b)
    };
    let summary = sim.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let store = app::open_store(&config).unwrap();
    assert_eq!(store.request_outcome(configure).unwrap().as_deref(), Some("applied"));
    assert_eq!(store.request_outcome(status_request).unwrap().as_deref(), Some("sent"));
    // Every device booted, got a time sync and acknowledged it; one also acknowledged its config.
    assert!(summary.downlinks >= 6 + 2, "{summary:?}");
    // Six time-sync acks and one configuration ack.
    assert!(store.message_count("downlink_ack").unwrap() >= 7);
    let counters = store.downlink_counters().unwrap();
    assert_eq!(counters.len(), 6, "{counters:?}");
}

/// Downlink counters persist: after a gateway restart, downlinks continue above every counter
/// used before, never reusing one under a device's key.
#[tokio::test]
async fn downlink_counters_survive_a_restart() {
    use gridsense_protocol::{RawFrame, topic::parse_topic};
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 111, Counts { covers: 0, drains: 3, beacons: 0 }).unwrap();
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", broker.addr());
    config.store.path = dir.path().join("gridsense.db");
    common::import(&config, dir.path());
    // Record every downlink the gateway publishes.
    let mut options =
        MqttOptions::new("down-recorder", broker.addr().ip().to_string(), broker.addr().port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client.subscribe("gridsense/+/down", QoS::AtLeastOnce).await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event
                && let (Ok((eui, _)), Ok(raw)) =
                    (parse_topic(&p.topic), RawFrame::parse(&p.payload))
            {
                sink.lock().unwrap().push((eui, raw.header().counter));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One fleet for 10 s; gateway A serves the first 4 s (boot time syncs), gateway B the rest.
    let (gateway, stop_tx, clock) =
        common::start_shared(&config, 10.0, Duration::from_secs(10)).await;
    let scenario = "description = \"t\"\nseed = 6\n[device_config]\nreport_interval_s = 10\ndrain_deadband_mm = 0\n";
    let sim =
        common::spawn_fleet(dir.path(), scenario, broker.addr(), clock, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let first = std::mem::take(&mut *seen.lock().unwrap());
    let (gateway, stop_tx) =
        common::start(&config, gridsense_gateway::cli::demo::shared_clock(clock)).await;
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    let requests: Vec<i64> = {
        let mut store = app::open_store(&config).unwrap();
        let settings = vec![parse_setting("report_interval_s=20").unwrap()];
        devices
            .iter()
            .map(|d| store.add_request(d.eui, &Request::Configure(settings.clone()), 0).unwrap())
            .collect()
    };
    sim.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let second = std::mem::take(&mut *seen.lock().unwrap());
    // The devices accepted gateway B's configurations: their counters were new to them.
    let store = app::open_store(&config).unwrap();
    for id in requests {
        assert_eq!(store.request_outcome(id).unwrap().as_deref(), Some("applied"), "request {id}");
    }
    for d in &devices {
        let a: Vec<u32> = first.iter().filter(|(e, _)| *e == d.eui).map(|(_, c)| *c).collect();
        let b: Vec<u32> = second.iter().filter(|(e, _)| *e == d.eui).map(|(_, c)| *c).collect();
        assert!(!a.is_empty() && !b.is_empty(), "{}: {a:?} {b:?}", d.eui);
        assert!(
            b.iter().all(|c| c > a.iter().max().unwrap()),
            "{}: counter reused: {a:?} then {b:?}",
            d.eui
        );
    }
}

/// With two brokers a downlink goes through the one its device was last heard on; one not
/// acknowledged in time goes again through both (the device may be on the other by then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_not_acknowledged_in_time_goes_again_through_both_brokers() {
    use gridsense_protocol::{
        Downlink, open, seal,
        topic::{Lane, uplink_topic},
    };
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let (a, b) = (Mosquitto::start().unwrap(), Mosquitto::start().unwrap());
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 121, Counts { covers: 0, drains: 1, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), a.addr());
    config.mqtt.url = String::new();
    config.mqtt.urls = vec![format!("mqtt://{}", a.addr()), format!("mqtt://{}", b.addr())];
    config.downlink.ack_timeout_s = 1;
    common::import(&config, dir.path());
    let drain = inventory::load(&dir.path().join("devices.json")).unwrap().remove(0);
    // What each broker carries to the device's downlink topic.
    let recorder = |broker: std::net::SocketAddr, name: &str| {
        let mut options = MqttOptions::new(name, broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Downlink>::new()));
        let (sink, key) = (seen.clone(), drain.key.clone());
        tokio::spawn(async move {
            client.subscribe("gridsense/+/down", QoS::AtLeastOnce).await.unwrap();
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event
                    && let Ok((_, d)) = open::<Downlink>(&p.payload, &key)
                {
                    sink.lock().unwrap().push(d);
                }
            }
        });
        seen
    };
    let configs = |seen: &std::sync::Mutex<Vec<Downlink>>| {
        seen.lock().unwrap().iter().filter(|d| matches!(d, Downlink::Config { .. })).count()
    };
    let (down_a, down_b) = (recorder(a.addr(), "down-a"), recorder(b.addr(), "down-b"));
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let request = {
        let mut store = app::open_store(&config).unwrap();
        let settings = vec![parse_setting("report_interval_s=120").unwrap()];
        store.add_request(drain.eui, &Request::Configure(settings), 0).unwrap()
    };
    let up = uplink_topic(drain.eui, 64, Lane::Up).to_string();
    let reading = gridsense_protocol::examples::uplinks()[1].clone();
    let frame = |counter| seal(drain.eui, counter, &reading, &drain.key).to_vec();
    // Heard on A (a frame every 300 ms until the gateway has read the request and answered
    // one): the configuration goes through A only.
    let mut counter = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while configs(&down_a) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no configuration through A");
        counter += 1;
        common::publish_as("the-drain", a.addr(), vec![(up.clone(), frame(counter))]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Past the ack timeout (1 s, on the gateway's wall clock) since it went out.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let first = (configs(&down_a), configs(&down_b));
    // No acknowledgement within the timeout: at its next frame, again, through both.
    common::publish_as("the-drain", a.addr(), vec![(up, frame(counter + 1))]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while configs(&down_b) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = (configs(&down_a), configs(&down_b));
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let store = app::open_store(&config).unwrap();
    assert_eq!(first, (1, 0), "first through the broker it was heard on");
    assert_eq!(second, (2, 1), "again through both");
    assert_eq!(store.request_outcome(request).unwrap(), None, "still waiting for its ack");
}
