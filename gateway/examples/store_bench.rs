//! The store's group commit alone, SQLite against PostgreSQL in one run: batches shaped like
//! a drain fleet's (per frame a counter window, a health row, a recent-frame entry and two
//! telemetry points; one status message in ten) committed back to back, and the time per
//! batch and frames per second printed for each. PostgreSQL is a durable cluster (fsync on)
//! started here on a free loopback port; it runs twice, the second time with every batch
//! fenced by the leases of the 64 shards it touches (the cost of fencing per batch).
//!
//! `cargo run --release -p gridsense-gateway --example store_bench [FRAMES_PER_BATCH BATCHES DEVICES]`

use std::time::Instant;

use anyhow::Result;
use gridsense_gateway::{
    cluster::Fence,
    config::Synchronous,
    health::DeviceHealth,
    registry::Kind,
    store::{
        Batch, IngestStore, Leases, MessageRecord, Point, RecentFrame, Store, postgres::PgStore,
    },
};
use gridsense_protocol::{CounterWindow, Eui, examples};

fn batch(n: usize, devices: u64, round: u64) -> Batch {
    let mut b = Batch::default();
    let status = examples::uplinks()[2].clone();
    for i in 0..n as u64 {
        let eui = Eui(1 + (round * n as u64 + i) % devices);
        let counter = u32::try_from(round * 10 + i / devices + 1).unwrap_or(u32::MAX);
        let at = i64::try_from(round * 1_000 + i).unwrap_or(0);
        let mut w = CounterWindow::new();
        w.accept(counter);
        b.counters.insert(eui, w);
        let mut h = DeviceHealth::new(Kind::Drain);
        h.last_seen_ms = Some(at);
        h.last_counter = Some(counter);
        h.battery_mv = Some(3_600);
        h.frames = round + 1;
        h.online = true;
        b.health.insert(eui, h);
        b.recent.push(RecentFrame {
            eui,
            counter,
            received_ms: at,
            kind: "drain_reading",
            samples: 1,
        });
        for field in ["level_mm", "battery_mv"] {
            b.telemetry.push(Point {
                eui,
                kind: Kind::Drain,
                measurement: "drain",
                field,
                at_ms: at,
                value: 1.0,
                grid: Some("210202010101".into()),
                street: None,
            });
        }
        if i % 10 == 0 {
            b.messages.push(MessageRecord {
                eui,
                counter,
                received_ms: at,
                kind: "status",
                message: status.clone(),
            });
        }
    }
    b.accepted = n as u64;
    b
}

fn run(
    name: &str,
    store: &mut dyn IngestStore,
    (n, batches, devices): (usize, u64, u64),
    fence: Option<&Fence>,
) -> Result<f64> {
    let make = |r| Batch { fence: fence.cloned(), ..batch(n, devices, r) };
    // One batch to warm statement caches.
    store.commit(&make(0))?;
    let prepared: Vec<Batch> = (1..=batches).map(make).collect();
    let started = Instant::now();
    for b in &prepared {
        store.commit(b)?;
    }
    let s = started.elapsed().as_secs_f64();
    let per_s = (n as f64 * batches as f64) / s;
    println!(
        "{name:<10} {batches} batches of {n} frames: {:.2} ms per batch, {per_s:.0} frames/s",
        1_000.0 * s / batches as f64
    );
    Ok(per_s)
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let n = args.first().copied().unwrap_or(500);
    let batches = args.get(1).copied().unwrap_or(200) as u64;
    let devices = args.get(2).copied().unwrap_or(20_000) as u64;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("k");
    let mut sqlite =
        Store::open_keyed(&dir.path().join("s.db"), Synchronous::Normal, 10_000, &key)?;
    let shape = (n, batches, devices);
    let a = run("sqlite", &mut sqlite, shape, None)?;
    let mut full = Store::open_keyed(&dir.path().join("f.db"), Synchronous::Full, 10_000, &key)?;
    let b = run("sqlite-full", &mut full, shape, None)?;
    let pg = gridsense_tests::postgres::Postgres::start_durable()?;
    let mut postgres = PgStore::open(&pg.database(None)?, &key, 10_000)?;
    let c = run("postgres", &mut postgres, shape, None)?;
    println!("postgres ÷ sqlite (normal) = {:.2}; postgres ÷ sqlite (full) = {:.2}", c / a, c / b);
    // The same with every batch fenced by its 64 shards' leases.
    let mut fenced = PgStore::open(&pg.database(None)?, &key, 10_000)?;
    fenced.fix_shards(64)?;
    let mut fence = Fence { instance: "bench".into(), ..Fence::default() };
    for shard in 0..64u16 {
        let epoch = fenced.claim("bench", shard, 600_000)?.unwrap_or(0);
        fence.held.push((shard, epoch));
    }
    let d = run("fenced", &mut fenced, shape, Some(&fence))?;
    println!(
        "fenced ÷ postgres = {:.2}; fencing costs {:.3} ms per batch",
        d / c,
        1_000.0 * n as f64 * (1.0 / d - 1.0 / c)
    );
    Ok(())
}
