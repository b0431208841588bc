//! What the cluster's leases and fencing cost on PostgreSQL (a durable server started here):
//! the same batches committed with and without the fencing check (the batch's shards and
//! epochs, checked in its transaction), alternating so that drift hits both alike; and one
//! instance's lease renewal and claim, the lease task's statements.
//!
//! `cargo run --release -p gridsense-gateway --example fence_cost -- [BATCHES] [FRAMES] [SHARDS]`
//! (defaults 400 batches of 100 frames each, 22 shards held: a third of 64). Needs Debian's
//! PostgreSQL server (`scripts/test` installs it). Prints numbers; asserts nothing.

use std::time::Instant;

use anyhow::Result;
use gridsense_gateway::{
    batch::Batch,
    cluster::Fence,
    health::{EventKind, HealthEvent},
    store::{IngestStore, Leases, Registry, postgres::PgStore},
};
use gridsense_protocol::CounterWindow;
use gridsense_simulator::city::{self, Counts};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let batches: usize = args.first().map_or(Ok(400), |a| a.parse())?;
    let frames: usize = args.get(1).map_or(Ok(100), |a| a.parse())?;
    let shards: u16 = args.get(2).map_or(Ok(22), |a| a.parse())?;

    let pg = gridsense_tests::postgres::Postgres::start_durable()?;
    let dir = tempfile::tempdir()?;
    let devices = city::generate(5, Counts { covers: 0, drains: frames, beacons: 0 }).devices;
    let inventory =
        gridsense_simulator::inventory::parse("devices.json", &serde_json::to_string(&devices)?)?;
    let mut store = PgStore::open(&pg.database(None)?, &dir.path().join("k"), 1_000)?;
    store.import(&inventory, 0)?;
    store.fix_shards(64)?;
    let instance = "bench";
    let lease_ms = 5_000;
    let mut held = Vec::new();
    for shard in 0..shards {
        if let Some(epoch) = store.claim(instance, shard, lease_ms)? {
            held.push((shard, epoch));
        }
    }
    anyhow::ensure!(held.len() == usize::from(shards), "claimed {} of {shards}", held.len());
    let fence = Fence { instance: instance.to_owned(), held: held.clone() };
    // A batch as ingest builds it, short of telemetry (so the share below is an upper bound):
    // every frame a counter and a health event.
    let batch = |n: usize, fenced: bool| {
        let mut b = Batch { accepted: frames as u64, ..Batch::default() };
        for (i, d) in inventory.iter().enumerate() {
            let mut w = CounterWindow::new();
            w.accept(u32::try_from(n * frames + i).unwrap_or(u32::MAX));
            b.counters.insert(d.eui, w);
            let at_ms = i64::try_from(n).unwrap_or(0);
            b.events.push(HealthEvent { eui: d.eui, at_ms, kind: EventKind::Online });
        }
        b.fence = fenced.then(|| fence.clone());
        b
    };
    let (mut plain, mut fenced) = (Vec::new(), Vec::new());
    for n in 0..batches {
        let with = n % 2 == 1;
        let b = batch(n, with);
        let t = Instant::now();
        store.commit(&b)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if with { fenced.push(us) } else { plain.push(us) }
    }
    let (p, f) = (median(&mut plain), median(&mut fenced));
    println!(
        "commit of {frames} frames, median over {} each: {p:.0} µs plain, {f:.0} µs fenced ({shards} shards checked): fencing costs {:.0} µs per batch ({:.1} %)",
        batches / 2,
        f - p,
        (f - p) / p * 100.0
    );
    // The lease task's statements, each as often as it runs them.
    let mut renew = Vec::new();
    let mut view = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        store.renew(instance, &held, lease_ms)?;
        renew.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        store.cluster_view(Some(instance), lease_ms)?;
        view.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (r, v) = (median(&mut renew), median(&mut view));
    println!(
        "lease task per renewal period: renew {shards} leases {r:.0} µs, cluster view {v:.0} µs (median of 200): at renew_ms 1000 it waits on the database {:.2} % of the time",
        (r + v) / 10_000.0
    );
    let t = Instant::now();
    let mut claimed = 0;
    for shard in shards..shards.saturating_mul(2).min(64) {
        claimed += usize::from(store.claim(instance, shard, lease_ms)?.is_some());
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / claimed.max(1) as f64;
    println!("claim: {per:.0} µs per shard ({claimed} claimed)");
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
