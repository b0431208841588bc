//! Moving a pilot to production: `gridsense store migrate` copies a SQLite store with every
//! kind of row (the schema-11 fixture) into PostgreSQL and verifies the counts; it is refused
//! while a gateway holds the source; a gateway started on the target carries on where the
//! source stopped (its counter windows refuse a replay, its open incidents are restored).

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{path::Path, process::Command, time::Duration};

use gridsense_gateway::{
    app,
    store::{Backend, CaseFilter, IngestStore, Store, migrate, postgres::PgStore},
};
use gridsense_protocol::examples;
use gridsense_tests::{Mosquitto, postgres::Postgres};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-v11");

fn migrate_cli(from: &Path, to: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(["store", "migrate", "--from", &format!("sqlite:{}", from.display()), "--to", to])
        .output()
        .unwrap()
}

/// What a store holds, compared across backends.
fn summary(s: &dyn Backend) -> String {
    let mut registry: Vec<_> =
        s.registry().unwrap().iter().map(|r| (r.eui, *r.key.expose_bytes())).collect();
    registry.sort();
    let mut counters = s.counters().unwrap();
    counters.sort_by_key(|(e, _)| *e);
    let mut health = s.health().unwrap();
    health.sort_by_key(|(e, _)| *e);
    let mut rules = s.rule_states().unwrap();
    rules.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut creds = s.credentials().unwrap();
    creds.sort();
    let cases = s.cases(&CaseFilter { limit: 1_000, ..CaseFilter::default() }).unwrap();
    let traces: Vec<_> = cases.iter().map(|c| s.trace(c.id).unwrap()).collect();
    format!(
        "{registry:?}\n{counters:?}\n{health:?}\n{rules:?}\n{creds:?}\n{:?}\n{:?}\n{cases:?}\n{traces:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{}\n{:?}",
        s.open_incidents().unwrap(),
        s.sequences().unwrap(),
        s.outbox(None, None, 1_000).unwrap(),
        s.tokens().unwrap(),
        s.totals().unwrap(),
        s.downlink_counters().unwrap(),
        s.telemetry_count(None).unwrap(),
        s.map_devices().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pilot_store_moves_to_postgres_and_the_gateway_carries_on() {
    let pg = Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gridsense.db");
    std::fs::copy(Path::new(FIXTURE).join("gridsense.db"), &db).unwrap();
    let url = pg.database(None).unwrap();

    // A gateway (here: its lock) on the source: refused, nothing copied.
    let held = migrate::hold(&db).unwrap();
    let out = migrate_cli(&db, &url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use"), "{err}");
    drop(held);
    let not_sqlite = Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(["store", "migrate", "--from", db.to_str().unwrap(), "--to", &url])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&not_sqlite.stderr).contains("sqlite:PATH"));

    // The pilot ran with 16 shards: its devices' topics name them, so the target keeps them.
    Store::open(&db, gridsense_gateway::config::Synchronous::Normal, 10)
        .unwrap()
        .fix_shards(16)
        .unwrap();
    let started = std::time::Instant::now();
    let out = migrate_cli(&db, &url);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("verified"), "{text}");
    let took = started.elapsed();
    let copied: u64 = text
        .lines()
        .filter_map(|l| l.split('→').nth(1))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum();
    // The target's URL carries a password; what the command prints does not.
    let out_all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out_all.contains(gridsense_tests::postgres::PASSWORD), "{out_all}");
    // Into a database that has devices already: refused.
    let again = migrate_cli(&db, &url);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has"), "{again:?}");

    let key = gridsense_gateway::store::keys::default_key_file(&db);
    let source: Box<dyn Backend> = Box::new(
        Store::open_keyed(&db, gridsense_gateway::config::Synchronous::Normal, 10_000, &key)
            .unwrap(),
    );
    let target: Box<dyn Backend> = Box::new(PgStore::open(&url, &key, 10_000).unwrap());
    assert_eq!(target.fix_shards(16).unwrap(), 16, "the source's shards");
    assert!(target.fix_shards(64).is_err(), "fixed: the default is refused");
    assert_eq!(summary(&*target), summary(&*source), "the target holds what the source held");

    // A gateway on the target: a replayed frame is refused, the next one accepted.
    let broker = Mosquitto::start().unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.geo.grids = String::new();
    config.store.url = url.clone();
    config.store.key_file = key.clone();
    config.cluster.shards = 16;
    // The gateway carries on at the moment the source stopped (its last frame), not days later:
    // on the wall clock every fixture device's offline deadline is long past, and the incidents
    // that opens would depend on today's date.
    let stopped =
        source.health().unwrap().iter().filter_map(|(_, h)| h.last_seen_ms).max().unwrap();
    let offset = stopped + 1_000 - app::wall_clock()();
    let clock: gridsense_gateway::status::Clock =
        std::sync::Arc::new(move || app::wall_clock()() + offset);
    let (gateway, stop) = common::start(&config, clock).await;
    let (eui, window) = source
        .counters()
        .unwrap()
        .into_iter()
        .find(|(_, w)| w.highest().is_some_and(|h| h > 2))
        .unwrap();
    let highest = window.highest().unwrap();
    let keys = gridsense_tests::fixtures::keys(Path::new(FIXTURE)).unwrap();
    let status = examples::uplinks()[2].clone();
    let before = target.totals().unwrap();
    common::publish_from(broker.addr(), vec![(eui, status.clone())], &keys, highest).await;
    common::publish_from(broker.addr(), vec![(eui, status)], &keys, highest + 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let t = target.totals().unwrap();
        if t.accepted > before.accepted
            && t.rejects.values().sum::<u64>() > before.rejects.values().sum::<u64>()
        {
            break t;
        }
        assert!(tokio::time::Instant::now() < deadline, "{t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(after.accepted, before.accepted + 1, "the next counter accepted");
    let replayed: u64 = ["duplicate", "replay"]
        .iter()
        .map(|r| {
            after.rejects.get(*r).copied().unwrap_or(0)
                - before.rejects.get(*r).copied().unwrap_or(0)
        })
        .sum();
    assert_eq!(replayed, 1, "the replay refused: {after:?}");
    assert_eq!(
        gateway.status.incidents_open.load(std::sync::atomic::Ordering::Relaxed),
        source.open_incidents().unwrap().len() as u64,
        "open incidents restored"
    );
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    gridsense_tests::evidence!(
        "store: migrate sqlite → postgres: {copied} rows of the schema-11 fixture copied and verified in {} ms; the target gateway refused the replay and accepted the next counter",
        took.as_millis()
    );
}
