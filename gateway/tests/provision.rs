//! `gridsense provision broker` output works with the real Mosquitto: every device's password
//! (Mosquitto's PBKDF2 format) is accepted, a wrong one refused, and the ACL lets a device
//! publish only on its own uplink topic, which the gateway account can read.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::{net::SocketAddr, process::Command, time::Duration};

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
    let credentials = std::fs::read_to_string(out_dir.join("gateway.credentials")).unwrap();
    let (gw_user, gw_password) = credentials.trim().split_once(':').unwrap();

    let broker = Mosquitto::start_secured(&out_dir.join("passwd"), &out_dir.join("acl")).unwrap();
    let (gateway, mut gateway_loop, code) = connect(broker.addr(), gw_user, gw_password).await;
    assert_eq!(code, ConnectReturnCode::Success, "{}", broker.log());
    gateway.subscribe("gridsense/+/up", QoS::AtLeastOnce).await.unwrap();
    let (a, b) = (&devices[0], &devices[1]);
    let (device_a, mut a_loop, code) = connect(broker.addr(), &a.eui, &a.mqtt_password).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (_, _, wrong) = connect(broker.addr(), &b.eui, "not-its-password").await;
    assert_ne!(wrong, ConnectReturnCode::Success);
    tokio::spawn(async move { while a_loop.poll().await.is_ok() {} });
    // Give the gateway's subscription a moment to be acknowledged before publishing.
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut sent = false;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), gateway_loop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) if !sent => {
                device_a
                    .publish(
                        format!("gridsense/{}/up", a.eui),
                        QoS::AtLeastOnce,
                        false,
                        b"own".to_vec(),
                    )
                    .await
                    .unwrap();
                // Another device's topic: the ACL drops it.
                device_a
                    .publish(
                        format!("gridsense/{}/up", b.eui),
                        QoS::AtLeastOnce,
                        false,
                        b"forged".to_vec(),
                    )
                    .await
                    .unwrap();
                sent = true;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                received.push((p.topic, p.payload.to_vec()))
            }
            _ => {}
        }
    }
    assert_eq!(received, vec![(format!("gridsense/{}/up", a.eui), b"own".to_vec())]);
}
