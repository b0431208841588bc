//! A million (or N) mutated frames through the gateway's whole decode-and-verify path
//! (`Pipeline::handle`: topic, envelope, key, tag, body, counter window, health, telemetry,
//! rules, cases): valid frames of every message kind for registered devices, each mutated by
//! byte flips, truncation, extension, splices, topic/EUI swaps and counter changes, plus
//! unmodified frames so the accepting paths run too. Panics fail the run; the verdicts are
//! counted by reason. A long-running command, not part of the test suite.
//!
//! `cargo run --release -p gridsense-gateway --example frame_fuzz -- [N] [SEED]`

#![allow(clippy::cast_possible_truncation, clippy::indexing_slicing, clippy::cast_precision_loss)]

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use gridsense_gateway::{
    cases::{CaseTables, Cases, Site},
    health::HealthConfig,
    pipeline::{Outcome, Pipeline},
    registry::{Kind, Registered},
    rules::{Attributes, Rules, RulesConfig},
    store::Batch,
};
use gridsense_protocol::{DeviceKey, Direction, Eui, examples, seal, topic::topic};

/// xorshift64*: fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let seed: u64 = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    let devices: Vec<(Eui, Kind, DeviceKey)> = (0..64u64)
        .map(|i| {
            let kind = [Kind::Cover, Kind::Drain, Kind::Beacon][(i % 3) as usize];
            (Eui(0x2102_0200_0000_0000 + i), kind, DeviceKey::from_bytes([i as u8 + 1; 16]))
        })
        .collect();
    let registry = devices
        .iter()
        .map(|(eui, kind, key)| Registered { eui: *eui, kind: *kind, key: key.clone() })
        .collect();
    let config = HealthConfig {
        offline_factor: 2.5,
        interval_ms: [3_600_000; 3],
        low_battery_mv: 3_300,
        max_ahead_ms: 120_000,
    };
    let sites = devices
        .iter()
        .map(|(eui, kind, _)| {
            let site = Site {
                kind: *kind,
                lat: 38.9,
                lon: 121.6,
                object_code: None,
                minor_class: Some("0102".into()),
            };
            let attrs = Attributes {
                warn_mm: Some(1_500.0),
                alarm_mm: Some(2_500.0),
                well_depth_mm: Some(3_000.0),
            };
            (*eui, site, attrs)
        })
        .collect();
    let cases = Cases::new(Arc::new(CaseTables::default()), 1_800_000).expect("default tables");
    let mut pipeline = Pipeline::new(registry, Vec::new(), Vec::new(), config)
        .with_cases(Rules::new(&RulesConfig::default()), cases, sites, Vec::new())
        .with_rate_limit(0);
    let messages = examples::uplinks();
    let mut rng = Rng(seed.max(1));
    let mut counters = vec![0u32; devices.len()];
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut batch = Batch::default();
    let started = Instant::now();
    for i in 0..n {
        let d = rng.below(devices.len());
        let (eui, _, key) = &devices[d];
        counters[d] += 1;
        let message = &messages[rng.below(messages.len())];
        let mut frame = seal(*eui, counters[d], message, key).to_vec();
        let mut topic_eui = *eui;
        // One in eight frames goes through untouched, so accepting paths run too.
        if rng.below(8) != 0 {
            for _ in 0..=rng.below(4) {
                let len = frame.len();
                match rng.below(8) {
                    0 => frame[rng.below(len)] ^= 1 << rng.below(8),
                    1 => frame[rng.below(len)] = rng.next() as u8,
                    2 => frame.truncate(rng.below(len + 1)),
                    3 => frame.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
                    4 => {
                        // Splice a piece of another kind's frame.
                        let other =
                            seal(*eui, counters[d], &messages[rng.below(messages.len())], key);
                        let at = rng.below(len.min(other.len()));
                        frame.truncate(at);
                        frame.extend_from_slice(&other[at..]);
                    }
                    5 => topic_eui = devices[rng.below(devices.len())].0,
                    6 if len > 13 => {
                        // Another counter (a replay or a jump), tag not recomputed.
                        let c = rng.next() as u32;
                        frame[9..13].copy_from_slice(&c.to_be_bytes());
                    }
                    _ => frame.insert(rng.below(len + 1), rng.next() as u8),
                }
                if frame.is_empty() {
                    break;
                }
            }
        }
        let t = topic(topic_eui, Direction::Uplink);
        let now = 1_795_000_000_000 + i as i64 * 5;
        let outcome = pipeline.handle(now, &t, &frame, &mut batch);
        let name = match outcome {
            Outcome::Accepted(_) => "accepted",
            Outcome::Rejected(r) => r,
        };
        *outcomes.entry(name).or_default() += 1;
        if i % 10_000 == 0 {
            pipeline.tick(now, &mut batch);
            pipeline.finish(&mut batch, now, true);
            batch = Batch::default();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{n} frames (seed {seed}) through Pipeline::handle in {secs:.1} s ({:.0} frames/s), no panic",
        n as f64 / secs
    );
    for (reason, count) in &outcomes {
        println!("  {reason:<18} {count}");
    }
}
