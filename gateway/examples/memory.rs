//! Hot state per registered device: the pipeline's registry keys, counter windows and health
//! (with its offline timer), and the rules and case layer's per-device site and rule set (covers
//! with their object code and class), for N devices that have each sent one frame. Prints
//! bytes per device from the process's resident memory before and after.
//!
//! `cargo run --release -p gridsense-gateway --example memory -- [N] [cover|drain]` (default
//! 1,000,000 covers, each sending the status a booted device sends, which is answered with a time
//! sync; drains carry their well's levels as attributes and also send one level reading, which
//! their rate and stuck rules keep state for).

use std::sync::Arc;

use gridsense_gateway::{
    cases::{CaseTables, Cases, Site},
    health::HealthConfig,
    pipeline::Pipeline,
    registry::{Kind, Registered},
    rules::{Attributes, Rules, RulesConfig},
    store::Batch,
};
use gridsense_protocol::{DeviceKey, Direction, Eui, Status, Uplink, examples, seal, topic::topic};

/// Gateway time of the frames (2026-11-26).
const NOW_MS: i64 = 1_795_650_000_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let drains = std::env::args().nth(2).is_some_and(|k| k == "drain");
    let (kind, base) = if drains {
        (Kind::Drain, 0x2102_0202_0000_0000)
    } else {
        (Kind::Cover, 0x2102_0201_0000_0000)
    };
    let attrs = if drains {
        Attributes { warn_mm: Some(2_000.0), alarm_mm: Some(2_500.0), well_depth_mm: Some(3_000.0) }
    } else {
        Attributes::default()
    };
    let key = DeviceKey::from_bytes([7; 16]);
    let registry: Vec<Registered> =
        (0..n).map(|i| Registered { eui: Eui(base + i), kind, key: key.clone() }).collect();
    let config = HealthConfig {
        offline_factor: 2.5,
        interval_ms: [3_600_000; 3],
        low_battery_mv: 3_300,
        max_ahead_ms: 120_000,
    };
    let before = rss_kib();
    let sites = (0..n)
        .map(|i| {
            let site = Site {
                kind,
                lat: 38.9,
                lon: 121.6,
                object_code: Some(format!("210202010{:07}", i % 10_000_000)),
                minor_class: Some("0102".into()),
            };
            (Eui(base + i), site, attrs)
        })
        .collect();
    let cases = Cases::new(Arc::new(CaseTables::default()), 1_800_000).expect("default tables");
    let mut pipeline = Pipeline::new(registry, Vec::new(), Vec::new(), config).with_cases(
        Rules::new(&RulesConfig::default()),
        cases,
        sites,
        Vec::new(),
    );
    let uplinks = examples::uplinks();
    // As a device reports after it boots: a status (answered with a time sync), then for a
    // drain its level.
    let (Some(Uplink::Status(status)), Some(level)) = (uplinks.get(2), uplinks.get(1)) else {
        return;
    };
    let booted = Uplink::Status(Status { uptime_s: 5, ..*status });
    let messages = if drains { vec![&booted, level] } else { vec![&booted] };
    let mut batch = Batch::default();
    for i in 0..n {
        let eui = Eui(base + i);
        for (counter, message) in (1..).zip(&messages) {
            let frame = seal(eui, counter, *message, &key);
            pipeline.handle(NOW_MS, &topic(eui, Direction::Uplink), &frame, &mut batch);
        }
        if i % 10_000 == 0 {
            pipeline.finish(&mut batch, NOW_MS, true);
            batch = Batch::default();
        }
    }
    drop(batch);
    let after = rss_kib();
    println!(
        "{n} {}: resident memory +{} KiB after registering and one frame each = {:.0} bytes per device",
        if drains { "drains" } else { "covers" },
        after - before,
        (after - before) as f64 * 1024.0 / n as f64
    );
    println!("online: {}", pipeline.health().online_count());
}
