//! Crash safety: `kill -9` the real `gridsense` process ten times in the middle of a stream
//! and restart it. Afterwards every authentic frame is accepted exactly once: no telemetry
//! sample lost, none processed twice (a frame acknowledged by nobody is redelivered; one whose
//! ack was lost is a counted duplicate). Counted twice over: in the SQLite store, and as raw
//! samples in VictoriaMetrics without de-duplication, fed through the gateway's InfluxDB 2 sink.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{process::Command, time::Duration};

use gridsense_gateway::{app, config};
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, Subscriber, VictoriaMetrics, fixtures};
use rumqttc::{AsyncClient, MqttOptions, QoS};

#[tokio::test]
async fn kill_9_loses_nothing_and_duplicates_nothing() {
    kill_9(None, "kill9").await;
}

/// The same on PostgreSQL: the gateway killed mid-transaction leaves nothing half-written.
#[tokio::test]
async fn kill_9_on_postgres_loses_nothing_and_duplicates_nothing() {
    let pg = gridsense_tests::postgres::Postgres::start().unwrap();
    let url = pg.database(None).unwrap();
    kill_9(Some(&url), "kill9-postgres").await;
}

async fn kill_9(store_url: Option<&str>, name: &str) {
    let broker = Mosquitto::start().unwrap();
    let vm = VictoriaMetrics::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 71, Counts { covers: 20, drains: 20, beacons: 0 }).unwrap();
    let config_path = dir.path().join("gridsense.toml");
    let db = dir.path().join("gridsense.db");
    std::fs::write(
        &config_path,
        format!(
            "[mqtt]\nurl = \"mqtt://{}\"\n[store]\npath = \"{}\"\nbatch_max = 50\nurl = \"{}\"\n\
             [telemetry]\nsink = \"influxdb\"\nurl = \"{}\"\nbatch_max = 200\n",
            broker.addr(),
            db.display(),
            store_url.unwrap_or(""),
            vm.url()
        ),
    )
    .unwrap();
    let import = Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args([
            "provision",
            "import",
            "--city",
            dir.path().to_str().unwrap(),
            "--config",
            config_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&import.stdout).contains("40 added"), "{import:?}");

    // Start the gateway and wait until it is subscribed: a probe frame reaches its audit log.
    let mut child = common::gateway_process(&config_path);
    let config = config::load(Some(&config_path), &[]).unwrap();
    let mut options =
        MqttOptions::new("crash-probe", broker.addr().ip().to_string(), broker.addr().port());
    options.set_keep_alive(Duration::from_secs(30));
    let (probe, mut probe_loop) = AsyncClient::new(options, 10);
    tokio::spawn(async move { while probe_loop.poll().await.is_ok() {} });
    loop {
        probe
            .publish("gridsense/ffffffffffffffff/up", QoS::AtLeastOnce, false, vec![0u8; 4])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if app::open_store(&config).and_then(|s| Ok(s.audit_len()?)).unwrap_or(0) > 0 {
            break;
        }
    }

    let subscriber = Subscriber::start(broker.addr()).await.unwrap();
    // Steady telemetry, and covers stolen while the gateway is being killed.
    let scenario = "description = \"t\"\nseed = 2\n[device_config]\nreport_interval_s = 2\ndrain_deadband_mm = 0\n\
        [[theft]]\nat = \"5s\"\ncovers = 3\nmode = \"removed\"\n[[theft]]\nat = \"12s\"\ncovers = 2\nmode = \"removed\"\n";
    let sim_dir = dir.path().to_owned();
    let addr = broker.addr();
    let sim = tokio::spawn(async move {
        fixtures::run(&sim_dir, scenario, addr, 1.0, Duration::from_secs(20)).await
    });
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1_200 + rand_ms())).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        child = common::gateway_process(&config_path);
    }
    let summary = sim.await.unwrap().unwrap();
    subscriber.settle(Duration::from_millis(500), Duration::from_secs(5)).await;

    // Expected: every authentic (device, counter) once, and its telemetry points.
    let common::Expected { frames: distinct, points } = common::expected(&subscriber, dir.path());
    // Wait for the restarted gateway to catch up, then stop it gracefully.
    let mut accepted = 0;
    for _ in 0..100 {
        accepted = app::open_store(&config).and_then(|s| Ok(s.totals()?.accepted)).unwrap_or(0);
        if accepted >= distinct.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..100 {
        if app::open_store(&config).and_then(|s| Ok(s.buffer_len()?)).unwrap_or(1) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();
    let store = app::open_store(&config).unwrap();
    let totals = store.totals().unwrap();
    assert!(summary.frames() > 150, "{summary:?}");
    assert_eq!(
        totals.accepted,
        distinct.len() as u64,
        "lost or duplicated: rejects {:?}",
        totals.rejects
    );
    assert_eq!(accepted, totals.accepted);
    // The buffer drained into VictoriaMetrics: every point once, as raw samples.
    assert_eq!(store.buffer_len().unwrap(), 0);
    let series = vm.export("(cover|drain|position|status)_.*").await.unwrap();
    let raw: usize = series.iter().map(|(_, samples)| samples.len()).sum();
    assert_eq!(raw, points.len(), "raw samples in VictoriaMetrics vs distinct points");
    // Every stolen cover is exactly one case, whatever the kills interrupted.
    let stolen = common::stolen_covers(&subscriber, dir.path());
    let cases = store
        .cases(&gridsense_gateway::store::CaseFilter { limit: 100, ..Default::default() })
        .unwrap();
    let case_devices: std::collections::BTreeSet<String> =
        cases.iter().map(|c| c.device_id.clone()).collect();
    assert_eq!(stolen.len(), 5, "five covers stolen");
    assert_eq!(case_devices, stolen, "one case per stolen cover");
    assert_eq!(cases.len(), stolen.len(), "no duplicate case");
    gridsense_tests::evidence!(
        "chaos: {name} sent={} stored={} lost=0 duplicated=0 (10 kills; samples in VictoriaMetrics {raw}; duplicate frames dropped as such: {}; cases {} for {} stolen covers)",
        distinct.len(),
        totals.accepted,
        totals.rejects.get("duplicate").copied().unwrap_or(0),
        cases.len(),
        stolen.len()
    );
}

/// A little jitter so the kills land at different points of a batch.
fn rand_ms() -> u64 {
    u64::from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
            % 700,
    )
}
