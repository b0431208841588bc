//! Malformed files never panic: thousands of mutated versions (bytes changed, deleted,
//! inserted, truncated) of a valid inventory, scenario, grid GeoJSON, gateway configuration,
//! rules file and case tables each give a value or a typed error with a message — never a
//! panic.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use gridsense_gateway::{
    cases::CaseTables,
    config,
    geo::{CodeLengths, GridLayer},
    rules::RulesConfig,
};
use gridsense_simulator::{city::Counts, inventory, scenario};
use proptest::prelude::*;

/// Applies edits to `text`: (position, operation, byte).
fn mutate(text: &str, edits: &[(usize, u8, u8)]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for (pos, op, byte) in edits {
        if bytes.is_empty() {
            bytes.push(*byte);
            continue;
        }
        let at = pos % bytes.len();
        match op % 4 {
            0 => bytes[at] = *byte,
            1 => {
                bytes.remove(at);
            }
            2 => bytes.insert(at, *byte),
            _ => bytes.truncate(at),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)
}

struct Files {
    inventory: String,
    scenario: String,
    grids: String,
    config: String,
    rules: String,
    tables: String,
}

fn files() -> &'static Files {
    static FILES: std::sync::OnceLock<Files> = std::sync::OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        gridsense_simulator::city::generate(3, Counts { covers: 4, drains: 2, beacons: 1 })
            .write(dir.path())
            .unwrap();
        let grids: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("grids.geojson")).unwrap(),
        )
        .unwrap();
        // A dozen grids keep each case fast.
        let mut small = grids.clone();
        small["features"] =
            serde_json::Value::Array(grids["features"].as_array().unwrap()[..12].to_vec());
        Files {
            inventory: std::fs::read_to_string(dir.path().join("devices.json")).unwrap(),
            scenario: std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../simulator/scenarios/showcase.toml"),
            )
            .unwrap(),
            grids: serde_json::to_string_pretty(&small).unwrap(),
            config: std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("gridsense.example.toml"),
            )
            .unwrap(),
            rules: toml::to_string(&RulesConfig::default()).unwrap(),
            tables: toml::to_string(&CaseTables::default()).unwrap(),
        }
    })
}

fn typed<T, E: std::fmt::Display>(r: Result<T, E>) {
    if let Err(e) = r {
        assert!(!e.to_string().is_empty(), "an error says what is wrong");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn inventories(e in edits()) {
        typed(inventory::parse("devices.json", &mutate(&files().inventory, &e)));
    }

    #[test]
    fn scenarios(e in edits()) {
        typed(scenario::parse("showcase.toml", &mutate(&files().scenario, &e)));
    }

    #[test]
    fn grid_layers(e in edits()) {
        typed(GridLayer::parse("grids.geojson", &mutate(&files().grids, &e), CodeLengths::default(), 50.0));
    }

    #[test]
    fn rules_files(e in edits()) {
        typed(RulesConfig::parse(&mutate(&files().rules, &e), "rules.toml"));
    }

    #[test]
    fn case_tables(e in edits()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tables.toml");
        std::fs::write(&path, mutate(&files().tables, &e)).unwrap();
        typed(CaseTables::load(&path));
    }

    #[test]
    fn gateway_configs(e in edits()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gridsense.toml");
        std::fs::write(&path, mutate(&files().config, &e)).unwrap();
        typed(config::load(Some(&path), &[]));
    }
}
