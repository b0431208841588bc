//! TLS end to end, with certificates made at test time: Mosquitto started from the shipped
//! `deploy/mosquitto.conf` (TLS listener, provisioned accounts and ACL), the gateway over
//! `mqtts://` verifying the broker against the test CA, the simulator's per-device firmware
//! clients and pooled publishers over TLS verifying it too, and the API over HTTPS. A client
//! that trusts another CA, or speaks plain MQTT or HTTP to a TLS port, gets nowhere.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{path::Path, sync::atomic::Ordering::Relaxed, time::Duration};

use gridsense_gateway::app;
use gridsense_simulator::{
    city::Counts,
    fleet::{self, RunOptions, Transport},
    scenario,
    tls::{Tls, client_config},
};
use gridsense_tests::{Mosquitto, TestPki, fixtures};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

/// What a client trusting `ca` gets from the broker's TLS port: the CONNACK or the error.
async fn first_event(host: &str, port: u16, ca: Option<&Path>) -> Result<(), String> {
    let mut options = MqttOptions::new("probe", host, port);
    options.set_credentials("nobody", "nothing");
    if let Some(ca) = ca {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(client_config(ca).unwrap()),
        ));
    }
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok(()),
        Ok(Ok(other)) => Err(format!("{other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_devices_and_api_speak_tls_and_verify_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path()).unwrap();
    fixtures::city(dir.path(), 61, Counts { covers: 3, drains: 4, beacons: 0 }).unwrap();
    let (accounts, user, password) = common::provision(dir.path());
    let broker = common::shipped_mosquitto(&pki, &accounts);
    let port = broker.addr().port();

    // Clients that must not get in: another CA (by IP and by name), and plain MQTT.
    for host in ["127.0.0.1", "localhost"] {
        let refused = first_event(host, port, Some(&pki.other_ca)).await.unwrap_err();
        assert!(
            refused.contains("UnknownIssuer") || refused.contains("invalid peer certificate"),
            "{host}: {refused}"
        );
    }
    assert!(first_event("127.0.0.1", port, None).await.is_err(), "plain MQTT on the TLS port");

    // The gateway over mqtts://, with its provisioned account, and the API over HTTPS.
    let mut config = common::config(dir.path(), broker.addr());
    config.mqtt.url = format!("mqtts://127.0.0.1:{port}");
    config.mqtt.ca_file = pki.ca.display().to_string();
    config.mqtt.username = user;
    config.mqtt.password = password;
    config.http.tls_cert = pki.cert.display().to_string();
    config.http.tls_key = pki.key.display().to_string();
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;

    // The simulator's devices, each with its own account (firmware MQTT client, per-device
    // transport), verifying the broker against the CA.
    let scenario = scenario::load("load").unwrap();
    let tls = Tls::new(&pki.ca, "127.0.0.1").unwrap();
    let summary = simulate(dir.path(), &scenario, broker.addr(), &tls, Transport::PerDevice).await;
    assert!(summary.frames() > 0, "nothing sent");
    // Every device reached the gateway through TLS.
    let store = app::open_store(&config).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = store.health().unwrap().len();
        if seen == 7 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{seen} of 7 devices heard over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gateway.status.frames_accepted.load(Relaxed) > 7);

    // HTTPS with the CA; plain HTTP on the same port gets no answer.
    let http = gateway.http.unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap();
    let client = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let ok = client.get(format!("https://localhost:{}/healthz", http.port())).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "ok");
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&pki.other_ca).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let refused = untrusting.get(format!("https://localhost:{}/healthz", http.port())).send().await;
    assert!(refused.is_err(), "a client trusting another CA was answered");
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{}/healthz", http.port()))
        .send()
        .await;
    assert!(plain.map_or(true, |r| r.status() != 200), "plain HTTP was served on the TLS port");

    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}

async fn simulate(
    city: &Path,
    scenario: &scenario::Scenario,
    broker: std::net::SocketAddr,
    tls: &Tls,
    transport: Transport,
) -> gridsense_simulator::stats::Summary {
    let options = RunOptions {
        tls: Some(tls.clone()),
        transport,
        ..RunOptions::pooled(broker, scenario.clone(), 1.0, Duration::from_secs(4))
    };
    let (_keep, never) = tokio::sync::watch::channel(false);
    fleet::run(fleet::plan(city, scenario).unwrap(), &options, never).await.unwrap()
}

/// The pooled load generator (one connection publishing for many devices, so for brokers
/// without per-device accounts) verifies the broker too: it delivers through a TLS broker it
/// trusts, and sends nothing through one it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_load_verifies_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path()).unwrap();
    fixtures::city(dir.path(), 62, Counts { covers: 0, drains: 20, beacons: 0 }).unwrap();
    let broker = Mosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        pki.ca.display(),
        pki.cert.display(),
        pki.key.display()
    ))
    .unwrap();
    let subscriber = gridsense_tests::Subscriber::start_tls(broker.addr(), &pki.ca).await.unwrap();
    let scenario = scenario::load("load").unwrap();
    let pooled = Transport::Pooled { connections: 2, qos1: true };
    let trusted = Tls::new(&pki.ca, "127.0.0.1").unwrap();
    let summary = simulate(dir.path(), &scenario, broker.addr(), &trusted, pooled).await;
    let sent = summary.frames();
    assert!(sent >= 20, "{sent}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while subscriber.frames().len() < usize::try_from(sent).unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "{} of {sent}", subscriber.frames().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = subscriber.frames().len();
    let untrusted = Tls::new(&pki.other_ca, "127.0.0.1").unwrap();
    let summary = simulate(dir.path(), &scenario, broker.addr(), &untrusted, pooled).await;
    assert_eq!(summary.broker_acked, 0, "a broker it does not trust acknowledged frames");
    assert_eq!(subscriber.frames().len(), before, "frames went through an untrusted broker");
}

#[test]
fn a_tls_url_without_a_ca_and_an_unusable_ca_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = gridsense_gateway::config::Config::default();
    config.mqtt.url = "mqtts://127.0.0.1:8883".into();
    config.store.path = dir.path().join("g.db");
    let path = dir.path().join("g.toml");
    std::fs::write(&path, "[mqtt]\nurl = \"mqtts://127.0.0.1:8883\"\n").unwrap();
    let e = gridsense_gateway::config::load(Some(&path), &[]).unwrap_err().to_string();
    assert!(e.contains("mqtt.ca_file"), "{e}");
    config.mqtt.ca_file = dir.path().join("missing-ca.pem").display().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(async {
            app::start(&config, app::wall_clock(), tokio::sync::watch::channel(false).1)
        })
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap();
    assert!(e.contains("mqtt.ca_file") && e.contains("missing-ca.pem"), "{e}");
}
