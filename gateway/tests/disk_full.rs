//! The SQLite file's disk fills up under load: the gateway stops acknowledging (the broker
//! keeps the frames), says why (readiness, metrics), and when space returns commits what it
//! held and resumes — every frame stored once, the alarm among them a case.
//!
//! The store lives on a small tmpfs mounted for the test (root, as the test command runs), and
//! the disk is filled for real with a filler file: SQLite sees ENOSPC, not a simulation.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::Ordering::Relaxed,
    time::Duration,
};

use gridsense_gateway::app;
use gridsense_protocol::{Uplink, examples};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures};

/// A tmpfs of `size` mounted on a folder, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs on {} (this test needs root, as scripts/test runs): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the file system refuses: the disk is full.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    let mut written = 0;
    while file.write_all(&chunk).and_then(|()| file.flush()).is_ok() {
        written += chunk.len() as u64;
    }
    // Whatever part of the last chunk still fit.
    let _ = file.write_all(&[0u8; 512]);
    written
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_acknowledgements_and_loses_nothing() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("data");
    std::fs::create_dir(&mount).unwrap();
    let _tmpfs = Tmpfs::mount(&mount, "8m");
    fixtures::city(dir.path(), 95, Counts { covers: 1, drains: 2, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.store.path = mount.join("gridsense.db");
    // Two drains send far more than a real one would; not throttled here.
    config.health.max_frames_per_minute = 1_000_000;
    common::import(&config, dir.path());
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    let cover = devices.iter().find(|d| d.record.kind == inventory::Kind::Cover).unwrap().eui;
    let drains: Vec<_> =
        devices.iter().filter(|d| d.record.kind == inventory::Kind::Drain).map(|d| d.eui).collect();
    let keys = fixtures::keys(dir.path()).unwrap();
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let http = gateway.http.unwrap();
    let store = app::open_store(&config).unwrap();
    let reading: Uplink = examples::uplinks()[1].clone();

    // Before: 20 readings stored.
    let before: Vec<_> = (0..20).map(|i| (drains[i % 2], reading.clone())).collect();
    common::publish(broker.addr(), before, &keys).await;
    let wait_accepted = |n: u64| {
        let store = &store;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while store.totals().unwrap().accepted < n {
                assert!(tokio::time::Instant::now() < deadline, "{n} frames not stored in 30 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_accepted(20).await;

    // The disk fills; 3,000 more readings (more than the WAL holds) and a theft arrive.
    let filler = mount.join("filler");
    let filled = fill(&filler);
    let mut during: Vec<_> = (0..3_000).map(|i| (drains[i % 2], reading.clone())).collect();
    during.insert(1_500, (cover, common::removed(common::now_device_time())));
    let sent = 20 + during.len() as u64;
    // Counters continue after the first 20 (10 per drain): from 21 for everyone is fine.
    let publisher = tokio::spawn({
        let keys = keys.clone();
        let broker = broker.addr();
        async move { common::publish_from(broker, during, &keys, 21).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let why = loop {
        if let Some(e) = gateway.status.store_error.lock().unwrap().clone() {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "no commit failed on a full disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(why.contains("full"), "{why}");
    let stuck = store.totals().unwrap().accepted;
    let (ready, text) = get(&format!("http://{http}/readyz")).await;
    assert_eq!(ready, 503, "{text}");
    assert!(text.contains("nothing acknowledged") && text.contains("full"), "{text}");
    let (_, metrics) = get(&format!("http://{http}/metrics")).await;
    assert!(metrics.contains("gridsense_store_failing 1"), "{metrics}");
    // Nothing is acknowledged while full: what arrived is held, the rest waits at the broker.
    let held = gateway.status.unacked.load(Relaxed);
    assert!(held > 0, "nothing held unacknowledged");
    // Wait for the held batch's next attempt to fail too, then check nothing was stored.
    let first = gateway.status.store_retries.load(Relaxed);
    assert!(first >= 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gateway.status.store_retries.load(Relaxed) == first {
        assert!(tokio::time::Instant::now() < deadline, "the held batch was not retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.totals().unwrap().accepted, stuck, "a commit succeeded on a full disk");

    // Full for a while longer under `scripts/chaos` (at once in the suite).
    tokio::time::sleep(common::outage(0)).await;
    assert_eq!(store.totals().unwrap().accepted, stuck, "a commit succeeded on a full disk");
    // Space returns: the held batch commits, the rest follows, each frame once.
    let paused = std::time::Instant::now();
    std::fs::remove_file(&filler).unwrap();
    wait_accepted(sent).await;
    let resumed_after = paused.elapsed();
    publisher.await.unwrap();
    assert!(gateway.status.store_error.lock().unwrap().is_none());
    let (ready, text) = get(&format!("http://{http}/readyz")).await;
    assert_eq!(ready, 200, "{text}");
    let totals = store.totals().unwrap();
    // Every frame has its own counter: stored more often than sent would be a duplicate.
    assert_eq!(totals.accepted, sent, "{totals:?}");
    let duplicated = totals.accepted.saturating_sub(sent);
    // The session kept its keep-alive through the pause: the broker never dropped it, so
    // nothing was redelivered (a redelivery would be refused as a duplicate, not stored).
    assert_eq!(
        gateway.status.connects.load(Relaxed),
        gateway.status.session_counts().0,
        "the broker dropped the session"
    );
    assert!(totals.rejects.is_empty(), "{totals:?}");
    let cases = store.cases(&gridsense_gateway::store::CaseFilter::default()).unwrap();
    assert_eq!(cases.len(), 1, "the theft's case, once");
    assert_eq!(cases[0].device_id, cover.to_string());
    let retries = gateway.status.store_retries.load(Relaxed);
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    gridsense_tests::evidence!(
        "chaos: sqlite-disk-full sent={sent} stored={} lost={} duplicated={duplicated} (disk filled with {} KiB; {stuck} stored when the first commit failed, {held} held unacknowledged, {retries} commit retries, the broker session kept throughout; resumed {} ms after space returned; the theft's case filed once)",
        totals.accepted,
        sent - totals.accepted,
        filled / 1024,
        resumed_after.as_millis()
    );
}
