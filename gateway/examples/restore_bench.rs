//! What a gateway's start-up reads from its store, step by step, SQLite against PostgreSQL in
//! one run: N registered drains, each with a counter window, a health row and a rule state (as
//! after every device reported once); then each restore call timed (registry with its keys
//! unsealed, counters, health, locations, placements written again (as at a restart), sites,
//! rule states, open incidents). PostgreSQL is a durable cluster started here on a free loopback port.
//!
//! `cargo run --release -p gridsense-gateway --example restore_bench [N]` (default 1,000,000)

use std::time::Instant;

use anyhow::Result;
use gridsense_gateway::{
    config::Synchronous,
    health::DeviceHealth,
    registry::Kind,
    store::{Backend, Batch, Store, postgres::PgStore},
};
use gridsense_protocol::CounterWindow;
use gridsense_simulator::{
    city::{self, Counts},
    inventory,
};

fn fill(store: &mut dyn Backend, devices: &[inventory::Device]) -> Result<()> {
    store.import(devices, 0)?;
    for chunk in devices.chunks(10_000) {
        let mut b = Batch::default();
        for d in chunk {
            let mut w = CounterWindow::new();
            w.accept(1);
            b.counters.insert(d.eui, w);
            let mut h = DeviceHealth::new(Kind::Drain);
            h.last_seen_ms = Some(1_000);
            h.online = true;
            h.frames = 1;
            b.health.insert(d.eui, h);
        }
        store.commit(&b)?;
    }
    Ok(())
}

fn time<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let started = Instant::now();
    let out = f()?;
    let s = started.elapsed().as_secs_f64();
    println!("  {what:<22} {:>8.0} ms", s * 1_000.0);
    Ok((out, s))
}

fn restore(name: &str, store: &mut dyn Backend) -> Result<f64> {
    println!("{name}:");
    let mut total = 0.0;
    let (registry, s) = time("registry (unsealed)", || Ok(store.registry()?))?;
    total += s;
    total += time("counters", || Ok(store.counters()?.len()))?.1;
    total += time("downlink counters", || Ok(store.downlink_counters()?.len()))?.1;
    let mut n = 0;
    total += time("health", || {
        store.each_health(&mut |_, _| n += 1)?;
        Ok(())
    })?
    .1;
    let (locations, s) = time("locations", || Ok(store.locations()?))?;
    total += s;
    let rows: Vec<_> = locations
        .iter()
        .map(|(e, _, _)| (*e, "210202010101", "2102020101", "21020201", None))
        .collect();
    // The first start writes every placement; a restart finds them unchanged (timed).
    time("placements (first)", || Ok(store.write_placements(&mut rows.clone().into_iter())?))?;
    total +=
        time(
            "placements (restart)",
            || Ok(store.write_placements(&mut rows.clone().into_iter())?),
        )?
        .1;
    total += time("sites", || {
        store.each_site(&mut |_, _, _| {})?;
        Ok(())
    })?
    .1;
    total += time("rule states", || {
        store.each_rule_state(&mut |_, _, _| {})?;
        Ok(())
    })?
    .1;
    total += time("sequences + incidents", || {
        store.sequences()?;
        Ok(store.open_incidents()?.len())
    })?
    .1;
    println!(
        "  {:<22} {:>8.0} ms ({} devices, {n} health rows)",
        "total",
        total * 1_000.0,
        registry.len()
    );
    Ok(total)
}

fn main() -> Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    city::generate(11, Counts { covers: 0, drains: n, beacons: 0 }).write(dir.path())?;
    let devices = inventory::load(&dir.path().join("devices.json"))?;
    let key = dir.path().join("k");
    let mut sqlite =
        Store::open_keyed(&dir.path().join("s.db"), Synchronous::Normal, 10_000, &key)?;
    fill(&mut sqlite, &devices)?;
    let pg = gridsense_tests::postgres::Postgres::start_durable()?;
    let mut postgres = PgStore::open(&pg.database(None)?, &key, 10_000)?;
    fill(&mut postgres, &devices)?;
    drop(devices);
    let a = restore("sqlite", &mut sqlite)?;
    let b = restore("postgres", &mut postgres)?;
    println!("postgres ÷ sqlite = {:.2}", b / a);
    Ok(())
}
