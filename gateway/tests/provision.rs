//! `gridsense provision broker` output works with the real Mosquitto: every device's password
//! (Mosquitto's PBKDF2 format) is accepted, a wrong one refused, and the ACL lets a device
//! publish only on its own uplink topic, which the gateway account can read.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use gridsense_gateway::broker::provision::shard_session_user;
use gridsense_protocol::topic::Lane;
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, fixtures};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS};

async fn connect(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> (AsyncClient, EventLoop, ConnectReturnCode) {
    let mut options = MqttOptions::new(format!("{user}-test"), addr.ip().to_string(), addr.port());
    options.set_credentials(user, password);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await.unwrap() {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack.code,
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    (client, eventloop, code)
}

#[tokio::test]
async fn devices_get_their_own_topics_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 91, Counts { covers: 3, drains: 0, beacons: 0 }).unwrap();
    let config = dir.path().join("gridsense.toml");
    std::fs::write(&config, format!("[store]\npath = \"{}\"\n", dir.path().join("g.db").display()))
        .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gridsense")).args(args).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    run(&[
        "provision",
        "import",
        "--city",
        dir.path().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let out_dir = dir.path().join("broker");
    let said = run(&[
        "provision",
        "broker",
        "--out",
        out_dir.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(said.contains("3 device accounts") && said.contains("kill -HUP"), "{said}");
    let shown = out_dir.display();
    for file in ["passwd", "acl", "gateway.credentials"] {
        assert!(said.contains(&format!("{shown}/{file}")), "{file} not at its path: {said}");
    }
    assert!(!said.contains("  "), "no runs of spaces from a wrapped string: {said}");
    let credentials = std::fs::read_to_string(out_dir.join("gateway.credentials")).unwrap();
    let (gw_user, gw_password) = credentials.trim().split_once(':').unwrap();

    let broker = Mosquitto::start_secured(&out_dir.join("passwd"), &out_dir.join("acl")).unwrap();
    let (gateway, mut gateway_loop, code) = connect(broker.addr(), gw_user, gw_password).await;
    assert_eq!(code, ConnectReturnCode::Success, "{}", broker.log());
    for filter in ["gridsense/+/+/up", "gridsense/+/+/urgent", "gridsense/+/up"] {
        gateway.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }
    let (a, b) = (&devices[0], &devices[1]);
    // Its own topics: both lanes of any shard level (the gateway checks the shard), version
    // 1's; another device's, on any of them, the ACL drops.
    let own = [
        format!("gridsense/{}/up", a.eui),
        format!("gridsense/1d/{}/up", a.eui),
        format!("gridsense/00/{}/urgent", a.eui),
    ];
    let forged = [
        format!("gridsense/{}/up", b.eui),
        format!("gridsense/1d/{}/up", b.eui),
        format!("gridsense/00/{}/urgent", b.eui),
        format!("gridsense/{}/down", b.eui),
    ];
    let (device_a, mut a_loop, code) = connect(broker.addr(), &a.eui, &a.mqtt_password).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (_, _, wrong) = connect(broker.addr(), &b.eui, "not-its-password").await;
    assert_ne!(wrong, ConnectReturnCode::Success);
    tokio::spawn(async move { while a_loop.poll().await.is_ok() {} });
    // Give the gateway's subscription a moment to be acknowledged before publishing.
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut sent = false;
    let mut subacks = 0;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), gateway_loop.poll()).await {
            // Once all three subscriptions are acknowledged.
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) if !sent && subacks < 2 => subacks += 1,
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) if !sent => {
                for (topic, body) in
                    own.iter().map(|t| (t, "own")).chain(forged.iter().map(|t| (t, "forged")))
                {
                    device_a
                        .publish(topic.clone(), QoS::AtLeastOnce, false, body.as_bytes().to_vec())
                        .await
                        .unwrap();
                }
                sent = true;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                received.push((p.topic, p.payload.to_vec()))
            }
            _ => {}
        }
    }
    received.sort();
    let mut wanted: Vec<_> = own.iter().map(|t| (t.clone(), b"own".to_vec())).collect();
    wanted.sort();
    assert_eq!(received, wanted);

    // A shard's session account reads that shard's lane only, whatever it subscribes to: the
    // 64 shards' two lanes and the legacy topic each have one (with the gateway's password).
    assert!(said.contains("129 shard-session accounts"), "{said}");
    let user = shard_session_user(gw_user, 0x1d, Lane::Up);
    let (shard, mut shard_loop, code) = connect(broker.addr(), &user, gw_password).await;
    assert_eq!(code, ConnectReturnCode::Success, "{}", broker.log());
    shard.subscribe("gridsense/+/+/up", QoS::AtLeastOnce).await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut sent = false;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), shard_loop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) if !sent => {
                for level in ["1d", "00", "1e"] {
                    let topic = format!("gridsense/{level}/{}/up", a.eui);
                    device_a
                        .publish(topic, QoS::AtLeastOnce, false, level.as_bytes().to_vec())
                        .await
                        .unwrap();
                }
                sent = true;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p.payload.to_vec()),
            _ => {}
        }
    }
    assert_eq!(got, [b"1d".to_vec()], "only its own shard");
}

/// A running gateway applies registry changes without a restart: a re-keyed device starts a
/// new counter space (counters are per key, SPEC §4) — a device whose counter was exhausted
/// comes back at 1, its new key's frames are de-duplicated as before, its old key no longer
/// verifies — and a retired device is refused.
#[tokio::test]
async fn rekey_and_retire_reach_a_running_gateway_and_a_new_key_resets_the_counters() {
    use gridsense_protocol::DeviceKey;

    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 81, Counts { covers: 2, drains: 1, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.http.listen = String::new();
    let path = dir.path().join("gridsense.toml");
    std::fs::write(&path, format!("[store]\npath = \"{}\"\n", config.store.path.display()))
        .unwrap();
    common::import(&config, dir.path());
    let mut keys = fixtures::keys(dir.path()).unwrap();
    let devices: Vec<_> = keys.keys().copied().collect();
    let (a, b) = (devices[0], devices[1]);
    let (gateway, stop_tx) = common::start(&config, gridsense_gateway::app::wall_clock()).await;
    let at = common::now_device_time();
    let status = |battery| {
        let gridsense_protocol::Uplink::Status(s) = &gridsense_protocol::examples::uplinks()[2]
        else {
            panic!("example 2 is a status")
        };
        gridsense_protocol::Uplink::Status(gridsense_protocol::Status {
            at,
            battery_mv: battery,
            ..*s
        })
    };
    // `a`'s counter is exhausted (0xFFFFFFFF): under this key it can never send again.
    let exhausted = gridsense_protocol::seal(a, u32::MAX, &status(3_600), &keys[&a]).to_vec();
    common::publish_raw(broker.addr(), vec![(a, exhausted)]).await;
    common::publish_from(broker.addr(), vec![(b, status(3_600))], &keys, 10).await;

    // Re-key `a` (a key given) and retire `b`, through the CLI, while the gateway runs.
    let new_key = "00112233445566778899aabbccddeeff";
    let cli = |args: &[&str]| common::cli(&path, args);
    let out = cli(&["provision", "rekey", &a.to_string(), "--key", new_key]);
    assert!(out.contains("new counter space") && !out.contains(new_key), "{out}");
    cli(&["provision", "retire", &b.to_string()]);
    let generated = cli(&["provision", "rekey", &devices[2].to_string()]);
    assert!(generated.contains("new key"), "a generated key is shown once: {generated}");
    // Wait until the gateway has applied the changes (the retirement shows in its count; the
    // re-key was logged before it and is applied in the same or an earlier poll).
    for _ in 0..100 {
        if gateway.status.devices_registered.load(std::sync::atomic::Ordering::Relaxed) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gateway.status.devices_registered.load(std::sync::atomic::Ordering::Relaxed), 2);

    let old_key = keys[&a].clone();
    keys.insert(a, DeviceKey::from_hex(new_key).unwrap());
    // New key, counter 1 (it starts again): accepted. New key, the same counter again: a
    // duplicate. Old key: refused.
    common::publish_from(broker.addr(), vec![(a, status(3_500)), (b, status(3_500))], &keys, 1)
        .await;
    common::publish_from(broker.addr(), vec![(a, status(3_400))], &keys, 1).await;
    keys.insert(a, old_key);
    common::publish_from(broker.addr(), vec![(a, status(3_300))], &keys, 12).await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let store = gridsense_gateway::app::open_store(&config).unwrap();
    let totals = store.totals().unwrap();
    assert_eq!(totals.accepted, 3, "a and b before, a after the re-key: {totals:?}");
    assert_eq!(totals.rejects.get("unknown_device"), Some(&1), "b is retired: {totals:?}");
    assert_eq!(totals.rejects.get("duplicate"), Some(&1), "the new window works: {totals:?}");
    assert_eq!(totals.rejects.get("bad_tag"), Some(&1), "the old key is refused: {totals:?}");
}
