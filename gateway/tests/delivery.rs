//! Delivery under platform faults, against a stand-in Open311 / webhook platform: 503s and
//! timeouts for a while, then recovery → every case delivered exactly once (a request that
//! reached the platform while the gateway timed out is found again, not re-posted); webhook
//! deliveries are signed and carry one idempotency key per entry; an SOS reaches the alert
//! channel within a second of arrival; `kill -9` of the real gateway between the alarm and
//! delivery, and during a delivery, still gives exactly one platform case per incident.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use common::{
    now_device_time,
    platform::{API_KEY, Fault, Platform, SECRET},
    publish, removed,
};
use gridsense_gateway::{
    app,
    config::{Config, Platform as Kind},
};
use gridsense_protocol::{DeviceKey, Eui, Sos, Uplink};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures};

struct Setup {
    broker: Mosquitto,
    dir: tempfile::TempDir,
    keys: HashMap<Eui, DeviceKey>,
    covers: Vec<Eui>,
    beacons: Vec<Eui>,
}

fn setup(seed: u64, covers: usize, beacons: usize) -> Setup {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), seed, Counts { covers, drains: 0, beacons }).unwrap();
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    let of = |k| devices.iter().filter(|d| d.record.kind == k).map(|d| d.eui).collect();
    Setup {
        keys: fixtures::keys(dir.path()).unwrap(),
        covers: of(inventory::Kind::Cover),
        beacons: of(inventory::Kind::Beacon),
        broker,
        dir,
    }
}

fn config(s: &Setup, platform: Kind, url: String) -> Config {
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", s.broker.addr());
    config.store.path = s.dir.path().join("gridsense.db");
    config.cases.platform = platform;
    config.cases.url = url;
    config.cases.api_key = API_KEY.into();
    config.cases.secret = SECRET.into();
    config.cases.timeout_ms = 300;
    config.cases.retry_min_ms = 100;
    config.cases.retry_max_ms = 400;
    config
}

async fn wait_for(what: &str, max: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < max, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn open311_outage_and_timeouts_then_each_case_delivered_once() {
    let s = setup(31, 6, 0);
    let platform = Platform::start().await;
    // Two 503s, then two requests the platform takes but answers too late, then healthy.
    let slow = Fault::Slow(Duration::from_millis(1_500));
    platform.then(&[Fault::Unavailable, Fault::Unavailable, slow, slow]);
    let config = config(&s, Kind::Open311, platform.open311_url());
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let at = now_device_time();
    publish(s.broker.addr(), s.covers.iter().map(|e| (*e, removed(at))).collect(), &s.keys).await;
    wait_for("six cases on the platform", Duration::from_secs(20), || {
        gateway.delivery.delivered.load(Relaxed) >= 6
    })
    .await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let requests = platform.requests();
    let keys: BTreeSet<_> =
        requests.iter().map(|r| r.form["attribute[idempotency_key]"].clone()).collect();
    assert_eq!(requests.len(), 6, "one platform case per incident: {requests:#?}");
    assert_eq!(keys.len(), 6);
    assert!(gateway.delivery.retries.load(Relaxed) >= 4, "the faults were retried");
    let store = app::open_store(&config).unwrap();
    let cases = store
        .cases(&gridsense_gateway::store::CaseFilter { limit: 100, ..Default::default() })
        .unwrap();
    let ids: BTreeSet<_> = cases.iter().map(|c| c.platform_id.clone().unwrap()).collect();
    let platform_ids: BTreeSet<_> = requests.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, platform_ids, "every case keeps the platform's id");
    for r in &requests {
        assert!(r.form["service_code"].starts_with("C01"));
        assert!(r.form.contains_key("attribute[object_code]"));
        assert!(r.form["description"].contains("[gridsense:"));
    }
    println!(
        "delivery: open311 6 cases, {} POSTs seen by the platform, {} retries, 0 duplicates",
        platform.inner.lock().unwrap().posts,
        gateway.delivery.retries.load(Relaxed)
    );
}

#[tokio::test]
async fn webhook_retries_503s_signs_and_delivers_sos_within_a_second() {
    let s = setup(32, 3, 1);
    let platform = Platform::start().await;
    platform.then(&[Fault::Unavailable, Fault::Unavailable, Fault::Unavailable]);
    let mut config = config(&s, Kind::Webhook, platform.hook_url());
    config.cases.alert_url = platform.hook_url();
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let at = now_device_time();
    let mut frames: Vec<_> = s.covers.iter().map(|e| (*e, removed(at))).collect();
    frames.push((s.beacons[0], Uplink::Sos(Sos { at, fix: None })));
    let sent = Instant::now();
    publish(s.broker.addr(), frames, &s.keys).await;
    wait_for("three cases and one alert", Duration::from_secs(20), || {
        gateway.delivery.delivered.load(Relaxed) >= 4
    })
    .await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let hooks = platform.hooks();
    let sos: Vec<_> = hooks.iter().filter(|h| h.body["kind"] == "sos").collect();
    let cases: Vec<_> = hooks.iter().filter(|h| h.body["op"] == "create").collect();
    assert_eq!(sos.len(), 1, "{hooks:#?}");
    assert_eq!(cases.len(), 3, "{hooks:#?}");
    let keys: BTreeSet<_> = cases.iter().map(|h| h.idempotency_key.clone()).collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(platform.inner.lock().unwrap().bad_signatures, 0);
    let sos_latency = sos[0].received.duration_since(sent);
    // The 503s hit the case channel only: alerts have their own worker and queue.
    assert!(sos_latency < Duration::from_secs(1), "SOS took {sos_latency:?}");
    println!(
        "delivery: webhook 3 cases after 3 503s, SOS delivered {sos_latency:?} after publishing"
    );
    for h in &cases {
        assert!(h.body["service_code"].as_str().unwrap().starts_with("C01"));
        assert_eq!(h.body["crs"], "WGS84");
        assert!(h.body["onset"].as_str().unwrap().ends_with("+08:00"));
    }
}

fn gateway_process(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn kill_9_between_alarm_and_delivery_still_delivers_exactly_once() {
    let s = setup(33, 8, 0);
    let platform = Platform::start().await;
    platform.set(Fault::Unavailable);
    let config_path = s.dir.path().join("gridsense.toml");
    std::fs::write(
        &config_path,
        format!(
            "[mqtt]\nurl = \"mqtt://{}\"\n[store]\npath = \"{}\"\n[cases]\nplatform = \"open311\"\n\
             url = \"{}\"\napi_key = \"{API_KEY}\"\ntimeout_ms = 300\nretry_min_ms = 100\nretry_max_ms = 300\n",
            s.broker.addr(),
            s.dir.path().join("gridsense.db").display(),
            platform.open311_url()
        ),
    )
    .unwrap();
    let config = gridsense_gateway::config::load(Some(&config_path), &[]).unwrap();
    common::import(&config, s.dir.path());
    let mut child = gateway_process(&config_path);
    // The gateway's session is persistent: frames published before it subscribes are queued
    // for it only once it has connected once, so wait for its first connection.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let at = now_device_time();
    publish(s.broker.addr(), s.covers.iter().map(|e| (*e, removed(at))).collect(), &s.keys).await;
    // 1. The platform is down: the cases are committed, delivery keeps failing. Kill -9.
    let cases = |config: &Config| {
        app::open_store(config).and_then(|st| Ok(st.cases(&Default::default())?.len())).unwrap_or(0)
    };
    let all = || gridsense_gateway::store::CaseFilter { limit: 100, ..Default::default() };
    wait_for("eight committed cases", Duration::from_secs(20), || {
        app::open_store(&config).and_then(|st| Ok(st.cases(&all())?.len())).unwrap_or(0) == 8
    })
    .await;
    let _ = cases;
    child.kill().unwrap();
    child.wait().unwrap();
    // 2. The platform takes requests but answers late: kill -9 while requests are in flight.
    platform.set(Fault::Slow(Duration::from_secs(3)));
    child = gateway_process(&config_path);
    wait_for("requests in flight", Duration::from_secs(20), || platform.requests().len() >= 2)
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let in_flight = platform.requests().len();
    // 3. Healthy again: everything is delivered, nothing twice.
    platform.set(Fault::None);
    child = gateway_process(&config_path);
    wait_for("every case delivered", Duration::from_secs(30), || {
        app::open_store(&config)
            .and_then(|st| Ok(st.cases(&all())?.iter().all(|c| c.platform_id.is_some())))
            .unwrap_or(false)
    })
    .await;
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();

    let requests = platform.requests();
    let keys: BTreeSet<_> =
        requests.iter().map(|r| r.form["attribute[idempotency_key]"].clone()).collect();
    println!(
        "chaos: kill9-delivery sent=8 stored={} lost={} duplicated={} (platform took {in_flight} requests during a kill)",
        keys.len(),
        8 - keys.len(),
        requests.len() - keys.len()
    );
    assert_eq!(keys.len(), 8, "every incident reached the platform");
    assert_eq!(requests.len(), 8, "none twice: {requests:#?}");
    let store = app::open_store(&config).unwrap();
    let ids: BTreeSet<_> =
        store.cases(&all()).unwrap().into_iter().map(|c| c.platform_id.unwrap()).collect();
    let platform_ids: BTreeSet<_> = requests.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, platform_ids);
}
