//! The broker edge, hostile: no message can stall the gateway's session, and no client can take
//! it over.
//!
//! - A poison message — one publish far larger than any frame, QoS 0 or 1, 100 kB or 20 MB,
//!   on a device's uplink topic — against Mosquitto with no size limit of its own (the worst
//!   case: only the gateway's MQTT 5 Maximum Packet Size protects it), while the gateway runs
//!   and while it is away (queued in its persistent session, then the gateway restarted):
//!   other devices' frames keep flowing, the session never drops, and messages up to the
//!   Maximum Packet Size that are not frames are acknowledged and counted as `oversize`.
//! - The same against the embedded broker, which refuses large packets itself.
//! - The shipped `deploy/mosquitto.conf`: the largest payload it accepts, and a device that
//!   asks for the gateway's client id gets its own (`use_username_as_clientid`).
//! - A takeover where ids are not bound: the gateway notices, counts and reports it.
//!
//! Each prints `edge: …` lines with what was measured.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use gridsense_gateway::{app, status::Status};
use gridsense_protocol::{DeviceKey, Direction, Eui, seal, topic::topic};
use gridsense_simulator::{city::Counts, tls::client_config};
use gridsense_tests::{Mosquitto, TestPki, fixtures};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};

const KB100: usize = 100 * 1024;
const MB20: usize = 20 * 1024 * 1024;

/// How a client reaches a broker.
#[derive(Clone)]
struct Link {
    addr: SocketAddr,
    tls: Option<std::path::PathBuf>,
    login: Option<(String, String)>,
}

impl Link {
    fn plain(addr: SocketAddr) -> Self {
        Link { addr, tls: None, login: None }
    }

    fn options(&self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.addr.ip().to_string(), self.addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(64 * 1024 * 1024, 64 * 1024 * 1024);
        if let Some(ca) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                client_config(ca).unwrap(),
            )));
        }
        if let Some((user, password)) = &self.login {
            o.set_credentials(user.clone(), password.clone());
        }
        o
    }
}

/// Publishes one message from a fresh MQTT 3.1.1 connection. QoS 1: `Ok` when the broker
/// acknowledged it; QoS 0: `Ok` when it was written and the connection still stood 300 ms
/// later. `Err` says how the broker refused it.
async fn publish_one(
    link: &Link,
    client_id: &str,
    topic: &str,
    payload: Vec<u8>,
    qos: QoS,
) -> Result<(), String> {
    let (client, mut eventloop) = AsyncClient::new(link.options(client_id), 10);
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        let mut sent = false;
        let mut written_at = None;
        let mut payload = Some(payload);
        loop {
            let event = match written_at {
                Some(t) => match tokio::time::timeout_at(t, eventloop.poll()).await {
                    Err(_) => return Ok(()),
                    Ok(e) => e,
                },
                None => eventloop.poll().await,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) if !sent => {
                    sent = true;
                    client.try_publish(topic, qos, false, payload.take().unwrap()).unwrap();
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                    written_at = Some(tokio::time::Instant::now() + Duration::from_millis(300));
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer within 30 s".into()));
    let _ = client.try_disconnect();
    result
}

/// The largest payload (bytes) the broker acknowledges on `topic`, by bisection up to `max`.
async fn largest_accepted(link: &Link, client_id: &str, topic: &str, max: usize) -> usize {
    let (mut ok, mut bad) = (1usize, max + 1);
    assert!(publish_one(link, client_id, topic, vec![0; ok], QoS::AtLeastOnce).await.is_ok());
    while bad - ok > 1 {
        let mid = ok + (bad - ok) / 2;
        if publish_one(link, client_id, topic, vec![0; mid], QoS::AtLeastOnce).await.is_ok() {
            ok = mid;
        } else {
            bad = mid;
        }
    }
    ok
}

struct District {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    /// (EUI, key, MQTT password) of the two covers.
    covers: Vec<(Eui, DeviceKey, String)>,
}

fn district(seed: u64) -> District {
    let dir = tempfile::tempdir().unwrap();
    let inventory =
        fixtures::city(dir.path(), seed, Counts { covers: 2, drains: 0, beacons: 0 }).unwrap();
    let keys = fixtures::keys(dir.path()).unwrap();
    let covers = inventory
        .iter()
        .map(|d| {
            let eui: Eui = d.eui.parse().unwrap();
            (eui, keys[&eui].clone(), d.mqtt_password.clone())
        })
        .collect();
    let path = dir.path().to_owned();
    District { _dir: dir, path, covers }
}

fn up(eui: Eui) -> String {
    topic(eui, Direction::Uplink).to_string()
}

/// A cover's status frame with counter `n`.
fn frame(eui: Eui, key: &DeviceKey, n: u32) -> Vec<u8> {
    let status = gridsense_protocol::Uplink::CoverReading {
        at: common::now_device_time(),
        sample: gridsense_protocol::CoverSample {
            tilt_ddeg: 12,
            switch: gridsense_protocol::SwitchState::Closed,
            water_mm: None,
        },
    };
    seal(eui, n, &status, key).to_vec()
}

async fn wait_accepted(status: &Status, n: u64, what: &str) -> Duration {
    let started = Instant::now();
    while status.frames_accepted.load(Relaxed) < n {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: {} of {n} frames accepted",
            status.frames_accepted.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

fn rejects(status: &Status, reason: &str) -> u64 {
    status.rejects.lock().unwrap().get(reason).copied().unwrap_or(0)
}

fn disconnects(status: &Status) -> u64 {
    status.disconnects.lock().unwrap().values().sum()
}

/// Publishes the good device's next frame and measures until the gateway accepted it.
async fn good_frame_through(
    link: &Link,
    d: &District,
    status: &Status,
    counter: &mut u32,
    what: &str,
) -> Duration {
    let (eui, key, _) = &d.covers[1];
    *counter += 1;
    let before = status.frames_accepted.load(Relaxed);
    let started = Instant::now();
    publish_one(link, "good-device", &up(*eui), frame(*eui, key, *counter), QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_accepted(status, before + 1, what).await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_cannot_stall_the_session_on_mosquitto_without_a_limit() {
    let d = district(71);
    // Persistent, anonymous, no size limit: the broker queues anything for the gateway.
    let broker = Mosquitto::start_persistent().unwrap();
    let link = Link::plain(broker.addr());
    let config = common::config(&d.path, broker.addr());
    common::import(&config, &d.path);
    let (poisoned, _, _) = &d.covers[0];
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let mut counter = 0;
    let baseline = good_frame_through(&link, &d, &gateway.status, &mut counter, "baseline").await;
    gridsense_tests::evidence!(
        "edge: mosquitto (no limit) good frame stored in {} ms without poison",
        baseline.as_millis()
    );

    for (size, qos, name) in [
        (KB100, QoS::AtLeastOnce, "qos1 100 kB"),
        (MB20, QoS::AtLeastOnce, "qos1 20 MB"),
        (KB100, QoS::AtMostOnce, "qos0 100 kB"),
        (MB20, QoS::AtMostOnce, "qos0 20 MB"),
    ] {
        publish_one(&link, "rogue", &up(*poisoned), vec![0x10; size], qos).await.unwrap();
        let took = good_frame_through(&link, &d, &gateway.status, &mut counter, name).await;
        gridsense_tests::evidence!(
            "edge: mosquitto (no limit) poison {name} while running: another device's frame stored {} ms later",
            took.as_millis()
        );
    }
    // Not frames, but within the Maximum Packet Size: handled, acknowledged, counted.
    for qos in [QoS::AtLeastOnce, QoS::AtMostOnce] {
        publish_one(&link, "rogue", &up(*poisoned), vec![0x10; 10_000], qos).await.unwrap();
    }
    good_frame_through(&link, &d, &gateway.status, &mut counter, "after 10 kB").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rejects(&gateway.status, "oversize") < 2 {
        assert!(
            Instant::now() < deadline,
            "oversize counted {}",
            rejects(&gateway.status, "oversize")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        gateway.status.connects.load(Relaxed),
        gateway.status.session_counts().0,
        "the session dropped"
    );
    assert_eq!(disconnects(&gateway.status), 0, "{:?}", gateway.status.disconnects.lock().unwrap());
    assert_eq!(gateway.status.unacked.load(Relaxed), 0, "something was left unacknowledged");
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    // While the gateway is away its persistent session queues the poison; then it restarts.
    for (size, qos) in
        [(KB100, QoS::AtLeastOnce), (MB20, QoS::AtLeastOnce), (KB100, QoS::AtMostOnce)]
    {
        publish_one(&link, "rogue", &up(*poisoned), vec![0x10; size], qos).await.unwrap();
    }
    let (eui, key, _) = &d.covers[1];
    counter += 1;
    publish_one(&link, "good-device", &up(*eui), frame(*eui, key, counter), QoS::AtLeastOnce)
        .await
        .unwrap();
    let started = Instant::now();
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let took = wait_accepted(&gateway.status, 1, "queued behind the poison").await;
    gridsense_tests::evidence!(
        "edge: mosquitto (no limit) poison queued while away: the frame queued behind it stored {} ms after the restart began",
        (started.elapsed().max(took)).as_millis()
    );
    good_frame_through(&link, &d, &gateway.status, &mut counter, "after the restart").await;
    assert_eq!(
        gateway.status.connects.load(Relaxed),
        gateway.status.session_counts().0,
        "the restarted session dropped"
    );
    assert_eq!(disconnects(&gateway.status), 0, "{:?}", gateway.status.disconnects.lock().unwrap());
    // What reaches an MQTT 5 session announcing 65,536 bytes: the largest payload the broker
    // delivers to it (then counted as `oversize`), by bisection.
    let (mut delivered, mut dropped) = (485usize, 1usize << 20);
    while dropped - delivered > 1 {
        let probe = delivered + (dropped - delivered) / 2;
        let before = rejects(&gateway.status, "oversize");
        publish_one(&link, "rogue", &up(*poisoned), vec![0x10; probe], QoS::AtLeastOnce)
            .await
            .unwrap();
        // A frame behind it: once it is stored, the probe was handled or dropped.
        good_frame_through(&link, &d, &gateway.status, &mut counter, "behind a probe").await;
        if rejects(&gateway.status, "oversize") > before {
            delivered = probe;
        } else {
            dropped = probe;
        }
    }
    gridsense_tests::evidence!(
        "edge: mosquitto (no limit) delivers to the gateway's MQTT 5 session payloads up to {delivered} bytes (Maximum Packet Size {}), drops larger ones for it",
        config.mqtt.max_packet_bytes
    );
    assert!(delivered < 65_536 && delivered > 65_000, "{delivered}");
    assert_eq!(
        gateway.status.connects.load(Relaxed),
        gateway.status.session_counts().0,
        "a probe dropped the session"
    );
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_large_messages_and_the_gateway_keeps_ingesting() {
    let d = district(72);
    let mut config = common::config(&d.path, "127.0.0.1:1".parse().unwrap());
    config.mqtt.url = String::new();
    common::import(&config, &d.path);
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let tools = Link::plain(gateway.broker);
    let (poisoned, _, password) = &d.covers[0];
    let mut counter = 0;
    for (size, qos, name) in [
        (KB100, QoS::AtLeastOnce, "qos1 100 kB"),
        (MB20, QoS::AtLeastOnce, "qos1 20 MB"),
        (KB100, QoS::AtMostOnce, "qos0 100 kB"),
    ] {
        let refused = publish_one(&tools, "rogue", &up(*poisoned), vec![0x10; size], qos).await;
        if qos == QoS::AtLeastOnce {
            assert!(refused.is_err(), "{name}: the embedded broker acknowledged it");
        }
        let took = good_frame_through(&tools, &d, &gateway.status, &mut counter, name).await;
        gridsense_tests::evidence!(
            "edge: embedded broker poison {name}: refused at the edge, another device's frame stored {} ms later",
            took.as_millis()
        );
    }
    let largest = largest_accepted(&tools, "probe", &up(*poisoned), 1 << 20).await;
    gridsense_tests::evidence!(
        "edge: embedded broker largest payload accepted = {largest} bytes (limit {} per packet)",
        gridsense_gateway::broker::MAX_MESSAGE_BYTES
    );
    assert!(largest < gridsense_gateway::broker::MAX_MESSAGE_BYTES && largest > 484, "{largest}");
    // The probes up to the limit reached the gateway: counted as oversize, acknowledged.
    good_frame_through(&tools, &d, &gateway.status, &mut counter, "after the probes").await;
    assert!(rejects(&gateway.status, "oversize") >= 1);
    assert_eq!(
        gateway.status.connects.load(Relaxed),
        gateway.status.session_counts().0,
        "the session dropped"
    );
    assert_eq!(disconnects(&gateway.status), 0);

    // Devices log in with their EUI as user name and client id; another id is refused.
    let devices = Link {
        addr: gateway.device_listener.unwrap(),
        tls: None,
        login: Some((poisoned.to_string(), password.clone())),
    };
    let v5 = |client_id: &str| {
        let mut o = rumqttc::v5::MqttOptions::new(
            client_id,
            devices.addr.ip().to_string(),
            devices.addr.port(),
        );
        o.set_credentials(poisoned.to_string(), password.clone());
        o
    };
    assert!(v5_connects(v5(&poisoned.to_string())).await.is_ok());
    let refused = v5_connects(v5("gridsense-gateway")).await;
    assert!(refused.is_err(), "a device took another client id");
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}

/// Whether an MQTT 5 client gets a CONNACK.
async fn v5_connects(options: rumqttc::v5::MqttOptions) -> Result<(), String> {
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
        Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(a)))) => {
            if a.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success {
                Ok(())
            } else {
                Err(format!("{:?}", a.code))
            }
        }
        Ok(Ok(other)) => Err(format!("{other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_mosquitto_config_binds_client_ids_and_limits_message_size() {
    let d = district(73);
    let pki = TestPki::generate(&d.path).unwrap();
    let (accounts, user, password) = common::provision(&d.path);
    let broker = common::shipped_mosquitto(&pki, &accounts);
    let mut config = common::config(&d.path, broker.addr());
    config.mqtt.url = format!("mqtts://127.0.0.1:{}", broker.addr().port());
    config.mqtt.ca_file = pki.ca.display().to_string();
    config.mqtt.username = user.clone();
    config.mqtt.password = password;
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let (eui, key, device_password) = &d.covers[0];
    let device = Link {
        addr: broker.addr(),
        tls: Some(pki.ca.clone()),
        login: Some((eui.to_string(), device_password.clone())),
    };

    // The largest payload a device may publish; a larger one is refused before it is read.
    let largest = largest_accepted(&device, "ignored", &up(*eui), 1 << 20).await;
    gridsense_tests::evidence!(
        "edge: shipped mosquitto.conf largest payload accepted = {largest} bytes (max_packet_size 4096)"
    );
    assert!(largest > 484 && largest < 4096, "{largest}");
    assert!(
        publish_one(&device, "ignored", &up(*eui), vec![0; KB100], QoS::AtLeastOnce).await.is_err()
    );

    // A device asking for the gateway's client id (and the gateway's user name as id) with clean
    // start gets its own user name as id: the gateway's session stays.
    for id in [config.mqtt.client_id.as_str(), user.as_str()] {
        let (client, mut eventloop) = AsyncClient::new(device.options(id), 10);
        let connected = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(Event::Incoming(Packet::ConnAck(_))) = eventloop.poll().await {
                    return;
                }
            }
        })
        .await;
        assert!(connected.is_ok(), "the device could not connect at all");
        // Held open a moment: time for the broker to kick anyone it would.
        let hold = tokio::spawn(async move {
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while tokio::time::timeout_at(until, eventloop.poll()).await.is_ok() {}
        });
        hold.await.unwrap();
        drop(client);
    }
    let mut counter = 0;
    let frames = (1..=3).map(|n| frame(*eui, key, n)).collect::<Vec<_>>();
    for f in frames {
        counter += 1;
        publish_one(&device, "ignored", &up(*eui), f, QoS::AtLeastOnce).await.unwrap();
    }
    wait_accepted(&gateway.status, counter, "frames through the shipped config").await;
    assert_eq!(
        gateway.status.connects.load(Relaxed),
        gateway.status.session_counts().0,
        "the gateway's session was closed"
    );
    assert_eq!(disconnects(&gateway.status), 0, "{:?}", gateway.status.disconnects.lock().unwrap());
    gridsense_tests::evidence!(
        "edge: shipped mosquitto.conf: a device asking for the gateway's client id left its session alone (connects 1, disconnects 0)"
    );
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_taken_over_is_noticed_counted_and_reported() {
    let d = district(74);
    // Ids not bound to accounts: anyone may connect as the gateway.
    let broker = Mosquitto::start().unwrap();
    let mut config = common::config(&d.path, broker.addr());
    config.mqtt.reconnect_min_ms = 1_000;
    common::import(&config, &d.path);
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let http = gateway.http.unwrap();
    // An MQTT 5 intruder with the id of the gateway's session for version 1's topic (the one
    // the frames below arrive on) and a clean start.
    let mut options = rumqttc::v5::MqttOptions::new(
        format!("{}-legacy", config.mqtt.client_id),
        "127.0.0.1",
        broker.addr().port(),
    );
    options.set_clean_start(true);
    let (intruder, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    let _ = tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await;
    // Mosquitto 2.0 only closes the gateway's connection (no DISCONNECT 0x8E); the gateway
    // reconnects, finds its session gone, and says so.
    let deadline = Instant::now() + Duration::from_secs(15);
    while gateway.status.sessions_lost.load(Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the takeover went unnoticed: {:?} {:?}",
            gateway.status.disconnects.lock().unwrap(),
            gateway.status.last_disconnect.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(intruder);
    assert_eq!(gateway.status.disconnects.lock().unwrap().get("closed_by_broker"), Some(&1));
    let ready = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let text = ready.text().await.unwrap();
    assert!(text.contains("taken over or lost"), "{text}");
    let metrics =
        reqwest::get(format!("http://{http}/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("gridsense_mqtt_disconnects_total{reason=\"closed_by_broker\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gridsense_mqtt_sessions_lost_total 1"), "{metrics}");
    // The gateway's resubscribed session works again.
    let (eui, key, _) = &d.covers[0];
    publish_one(
        &Link::plain(broker.addr()),
        "device",
        &up(*eui),
        frame(*eui, key, 1),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    wait_accepted(&gateway.status, 1, "after the takeover").await;
    gridsense_tests::evidence!("edge: session takeover noticed: /readyz 503 \"{}\"", text.trim());
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}
