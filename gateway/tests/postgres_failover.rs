//! PostgreSQL with a synchronous streaming standby; the gateway's store URL names both hosts
//! with `target_session_attrs=read-write`. Under the per-device fleet (a storm of readings,
//! thefts) the primary is killed with `kill -9` and, after an outage, the standby promoted:
//! the gateway acknowledges nothing while no server takes writes (the broker keeps the
//! frames), follows the promotion on its own, and no frame the broker acknowledged is lost:
//! every distinct frame the broker passed on (to an independent subscriber) is stored once on
//! the promoted server, and the devices' own books agree (every frame they kept after its
//! PUBACK was confirmed end to end, or is awaiting it and in the stored counter window). No
//! theft gets a second case, although the commit in flight at the kill had an unknown outcome.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeSet, HashSet},
    sync::atomic::Ordering::Relaxed,
    time::Duration,
};

use gridsense_gateway::app;
use gridsense_protocol::{AlarmKind, Uplink};
use gridsense_simulator::city::Counts;
use gridsense_tests::{
    Mosquitto, Subscriber, fixtures,
    postgres::{PASSWORD, Postgres, SUPERUSER},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_killed_and_the_standby_promoted_loses_no_acknowledged_frame() {
    let broker = Mosquitto::start().unwrap();
    let (primary, standby) = tokio::task::block_in_place(Postgres::start_replicated).unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 97, Counts { covers: 60, drains: 40, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    let one = primary.database(None).unwrap();
    let db = one.rsplit('/').next().unwrap();
    config.store.url = format!(
        "postgres://{SUPERUSER}:{PASSWORD}@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    config.store.key_file = dir.path().join("store.key");
    config.health.max_frames_per_minute = 1_000_000;
    common::import(&config, dir.path());
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    let sub = Subscriber::start(broker.addr()).await.unwrap();
    let scenario = "description = \"postgres failover\"\nseed = 8\n[device_config]\nshards = 64\nreport_interval_s = 2\ndrain_deadband_mm = 0\n\
        [[theft]]\nat = \"4s\"\ncovers = 2\nmode = \"removed\"\n[[theft]]\nat = \"9s\"\ncovers = 3\nmode = \"removed\"\n";
    let (sim_dir, at) = (dir.path().to_owned(), broker.addr());
    // Under scripts/chaos the outage is long: the fleet runs past it.
    let outage = Duration::from_secs(2).max(common::outage(0));
    let real = Duration::from_secs(22) + outage;
    let sim = tokio::spawn(async move { fixtures::run(&sim_dir, scenario, at, 1.0, real).await });
    // Mid-stream, the second theft's alarms about to come: the primary dies.
    tokio::time::sleep(Duration::from_millis(7_000)).await;
    let stored_before = gateway.status.frames_accepted.load(Relaxed);
    tokio::task::block_in_place(|| primary.kill9()).unwrap();
    let killed = std::time::Instant::now();
    // What a failover manager does after its own detection time; longer under scripts/chaos.
    tokio::time::sleep(outage).await;
    let accepted_while_down = gateway.status.frames_accepted.load(Relaxed);
    let held = gateway.status.unacked.load(Relaxed);
    tokio::task::block_in_place(|| standby.promote()).unwrap();
    let promoted = std::time::Instant::now();
    // The gateway follows on its own: its next retry finds the writable host.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while gateway.status.frames_accepted.load(Relaxed) == accepted_while_down {
        assert!(tokio::time::Instant::now() < deadline, "nothing stored after the promotion");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed_ms = promoted.elapsed().as_millis();
    let down_ms = killed.elapsed().as_millis();
    let summary = sim.await.unwrap().unwrap();
    sub.settle(Duration::from_millis(500), Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let store = app::open_store(&config).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let keys = fixtures::keys(dir.path()).unwrap();
    let decoded = sub.decoded(&keys);
    let sent = decoded.iter().map(|(h, _)| (h.eui, h.counter)).collect::<HashSet<_>>().len() as u64;
    let stolen: BTreeSet<String> = decoded
        .into_iter()
        .filter_map(|(h, m)| match m {
            Uplink::AlarmRaised(r) if r.kind == AlarmKind::CoverRemoved => Some(h.eui.to_string()),
            _ => None,
        })
        .collect();
    let filter = gridsense_gateway::store::CaseFilter { limit: 100, ..Default::default() };
    let cases = loop {
        let cases = store.cases(&filter).unwrap();
        if cases.len() >= stolen.len() || tokio::time::Instant::now() > deadline {
            break cases;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let retries = gateway.status.store_retries.load(Relaxed);
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let books = common::Books::check(&summary, &*store);
    let stored = store.totals().unwrap().accepted;
    let case_devices: BTreeSet<String> = cases.iter().map(|c| c.device_id.clone()).collect();
    let duplicated =
        stored.saturating_sub(sent) + (cases.len() as u64).saturating_sub(stolen.len() as u64);
    let in_recovery = standby.in_recovery().unwrap();
    gridsense_tests::evidence!(
        "chaos: postgres-failover sent={sent} stored={stored} lost={} duplicated={duplicated} (synchronous standby; primary killed with kill -9 after {stored_before} frames stored, standby promoted {} ms later; {held} frames held unacknowledged meanwhile, {} stored while no server took writes; {retries} commit retries; first commit on the promoted server {resumed_ms} ms after the promotion, {down_ms} ms after the kill; the devices' books: {} frames the broker acknowledged, {} confirmed end to end, {} awaiting confirmation at the end of which {} in the stored window, {} given up unconfirmed; cases={} stolen={})",
        sent.saturating_sub(stored),
        promoted.duration_since(killed).as_millis(),
        accepted_while_down - stored_before,
        books.sent,
        summary.confirm.confirmed,
        books.held,
        books.held_stored,
        summary.confirm.given_up,
        cases.len(),
        stolen.len(),
    );
    assert!(!in_recovery, "the standby was promoted");
    assert!(books.sent > 300, "a load: {books:?}");
    assert_eq!(accepted_while_down, stored_before, "nothing counted stored with no server");
    assert_eq!(stored, sent, "every frame the broker passed on stored once");
    assert!(books.missing.is_empty(), "held by the devices, not stored: {books:?}");
    if outage <= Duration::from_secs(10) {
        // A device keeps 16 unconfirmed frames: a longer outage makes it give up the oldest
        // (still in the broker's queue, so not lost: the count above says so).
        assert_eq!(summary.confirm.given_up, 0, "nothing given up unconfirmed");
        assert_eq!(books.lost(), 0, "the devices' books: {books:?}");
    }
    assert_eq!(stolen.len(), 5, "five covers stolen");
    assert_eq!(case_devices, stolen, "one case per stolen cover");
    assert_eq!(cases.len(), stolen.len(), "no duplicate case");
}
