//! Shutdown like a server: SIGTERM (what a service manager sends) stops the real `gridsense
//! run` process cleanly under load — the batch in hand committed and acknowledged, every task
//! joined, exit status 0 — so a restart finds nothing it has already stored redelivered: every
//! frame stored once, no duplicate at all (a `kill -9` leaves some, counted as such).

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gridsense_gateway::{app, config};
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, Subscriber, fixtures};

fn start(config: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGTERM, then the exit status and what the process said, and how long it took.
fn terminate(mut child: std::process::Child) -> (std::process::ExitStatus, String, Duration) {
    let asked = Instant::now();
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let deadline = asked + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 20 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = asked.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_a_restart_sees_no_duplicate() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 15, Counts { covers: 0, drains: 30, beacons: 0 }).unwrap();
    let config_path = dir.path().join("gridsense.toml");
    std::fs::write(
        &config_path,
        format!(
            "[mqtt]\nurl = \"mqtt://{}\"\n[store]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\nauth = \"off\"\n",
            broker.addr(),
            dir.path().join("gridsense.db").display()
        ),
    )
    .unwrap();
    let config = config::load(Some(&config_path), &[]).unwrap();
    common::import(&config, dir.path());
    let child = start(&config_path);
    // The session is persistent once it has connected once: wait for that.
    let deadline = Instant::now() + Duration::from_secs(20);
    while app::open_store(&config).and_then(|s| Ok(s.audit_len()?)).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the gateway never connected");
        common::publish_raw(broker.addr(), vec![(gridsense_protocol::Eui(u64::MAX), vec![0; 4])])
            .await;
    }
    let subscriber = Subscriber::start(broker.addr()).await.unwrap();
    let scenario = "description = \"t\"\nseed = 4\n[device_config]\nreport_interval_s = 1\ndrain_deadband_mm = 0\n";
    let sim_dir = dir.path().to_owned();
    let addr = broker.addr();
    let sim = tokio::spawn(async move {
        fixtures::run(&sim_dir, scenario, addr, 1.0, Duration::from_secs(8)).await
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Mid-stream: SIGTERM.
    let (status, said, took) = terminate(child);
    assert!(status.success(), "exit {status}: {said}");
    assert!(said.contains("stopped"), "{said}");
    let summary = sim.await.unwrap().unwrap();
    subscriber.settle(Duration::from_millis(500), Duration::from_secs(5)).await;
    let expected = common::expected(&subscriber, dir.path()).frames.len() as u64;
    // Restarted, it takes what was queued for it meanwhile, and nothing twice.
    let child = start(&config_path);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let accepted = app::open_store(&config).and_then(|s| Ok(s.totals()?.accepted)).unwrap_or(0);
        if accepted >= expected {
            break;
        }
        assert!(Instant::now() < deadline, "{accepted} of {expected} after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, said_again, _) = terminate(child);
    assert!(status.success(), "{}", said_again);
    let totals = app::open_store(&config).unwrap().totals().unwrap();
    assert!(summary.frames() > 100, "{summary:?}");
    assert_eq!(totals.accepted, expected, "every frame once: {:?}", totals.rejects);
    let duplicates = totals.rejects.get("duplicate").copied().unwrap_or(0);
    assert_eq!(duplicates, 0, "a clean stop acknowledged all it had stored");
    gridsense_tests::evidence!(
        "chaos: sigterm sent={expected} stored={} lost=0 duplicated=0 (SIGTERM mid-stream: exit 0 after {} ms, every task joined; restarted: 0 duplicates redelivered)",
        totals.accepted,
        took.as_millis()
    );
}
