//! The gateway gives the reason SPEC.md names for every uplink vector in it — the frame-level
//! ones and the gateway's own steps (`receiver: gateway`: topic, registry, counter window,
//! frame budget), each with what the vector says the gateway knows beforehand — through the
//! whole pipeline (`Pipeline::handle`), as a frame from the broker would go.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::collections::BTreeMap;

use gridsense_gateway::{
    health::HealthConfig,
    pipeline::{Outcome, Pipeline},
    registry::{Kind, Registered},
    store::Batch,
};
use gridsense_protocol::{DeviceKey, Direction, Eui, examples, seal, topic::topic};

const SPEC: &str = include_str!("../../protocol/SPEC.md");

fn vector_blocks() -> Vec<BTreeMap<String, String>> {
    let mut blocks = Vec::new();
    let mut current: Option<BTreeMap<String, String>> = None;
    for line in SPEC.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```vector") => current = Some(BTreeMap::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(fields), text) => {
                let (k, v) = text.split_once(": ").unwrap();
                fields.insert(k.to_owned(), v.to_owned());
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn the_gateway_gives_every_reason_spec_md_names() {
    let mut checked = 0;
    for v in vector_blocks().iter().filter(|v| v["direction"] == "up") {
        let name = &v["name"];
        let key = DeviceKey::from_hex(&v["key"]).unwrap();
        let eui: Eui = v["eui"].parse().unwrap();
        let registry = if v.get("known").is_some_and(|k| k == "no") {
            Vec::new()
        } else {
            vec![Registered { eui, kind: Kind::Cover, key: key.clone() }]
        };
        let config = HealthConfig {
            offline_factor: 2.5,
            interval_ms: [3_600_000; 3],
            low_battery_mv: 3_300,
            max_ahead_ms: 120_000,
        };
        let mut pipeline = Pipeline::new(registry, vec![], vec![], config).with_rate_limit(300);
        let up = topic(eui, Direction::Uplink).to_string();
        let now = 1_796_000_000_000;
        let mut batch = Batch::default();
        for counter in v.get("accepted").into_iter().flat_map(|a| a.split(',')) {
            let frame = seal(eui, counter.parse().unwrap(), &examples::uplinks()[0], &key);
            let outcome = pipeline.handle(now, &up, &frame, &mut batch);
            assert!(matches!(outcome, Outcome::Accepted(_)), "{name}: setup {outcome:?}");
        }
        for _ in 0..v.get("frames_this_minute").map_or(0, |n| n.parse::<u32>().unwrap()) {
            pipeline.handle(now, &up, b"x", &mut batch);
        }
        let frame = hex::decode(v["frame"].replace(' ', "")).unwrap();
        let arrives_on = v.get("topic").cloned().unwrap_or(up);
        let outcome = pipeline.handle(now, &arrives_on, &frame, &mut batch);
        match (v.get("message"), v.get("error")) {
            (Some(_), None) => {
                assert!(matches!(outcome, Outcome::Accepted(_)), "{name}: {outcome:?}")
            }
            (None, Some(code)) => {
                let Outcome::Rejected(reason) = outcome else { panic!("{name}: {outcome:?}") };
                assert_eq!(reason, code, "{name}");
            }
            _ => panic!("{name}: message or error"),
        }
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} uplink vectors");
}
