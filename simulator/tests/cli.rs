//! The `gridsim` binary: city generation writes what the gateway and the simulator read, and
//! bad input files stop it before anything starts, with the file, line and field named.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::process::Command;

fn gridsim(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gridsim")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn city_writes_grids_and_inventory_deterministically() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for dir in [&a, &b] {
        let (ok, stdout, stderr) = gridsim(&[
            "city",
            "--seed",
            "9",
            "--out",
            dir.path().to_str().unwrap(),
            "--covers",
            "50",
            "--drains",
            "10",
        ]);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("239 grids, 299 devices"), "{stdout}");
    }
    for file in ["grids.geojson", "devices.json", "city.json"] {
        let x = std::fs::read(a.path().join(file)).unwrap();
        let y = std::fs::read(b.path().join(file)).unwrap();
        assert_eq!(x, y, "{file} differs between two runs with the same seed");
    }
    let grids: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.path().join("grids.geojson")).unwrap()).unwrap();
    let first = &grids["features"][0]["properties"];
    assert_eq!(first["grid_code"].as_str().unwrap().len(), 15);
    assert_eq!(first["community_code"].as_str().unwrap().len(), 12);
    assert_eq!(first["street_code"].as_str().unwrap().len(), 9);
}

#[test]
fn a_malformed_inventory_or_scenario_stops_the_run_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    assert!(
        gridsim(&[
            "city",
            "--seed",
            "1",
            "--out",
            path,
            "--covers",
            "3",
            "--drains",
            "0",
            "--beacons",
            "0"
        ])
        .0
    );
    let devices = dir.path().join("devices.json");
    let text = std::fs::read_to_string(&devices).unwrap().replacen("\"cover\"", "\"hydrant\"", 1);
    std::fs::write(&devices, text).unwrap();
    let (ok, _, stderr) = gridsim(&[
        "run",
        "--broker",
        "mqtt://127.0.0.1:9",
        "--city",
        path,
        "--duration",
        "1s",
        "--quiet",
    ]);
    assert!(!ok);
    assert!(stderr.contains("devices.json:4:") && stderr.contains("[0].kind"), "{stderr}");

    let scenario = dir.path().join("bad.toml");
    std::fs::write(&scenario, "description = \"x\"\n[traffic]\nvehicles_per_hour = -5\n").unwrap();
    let (ok, _, stderr) = gridsim(&[
        "run",
        "--broker",
        "mqtt://127.0.0.1:9",
        "--city",
        path,
        "--scenario",
        scenario.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("traffic.vehicles_per_hour"),
        "{stderr}"
    );

    let (ok, _, stderr) = gridsim(&["run", "--broker", "http://x/y", "--city", path, "--quiet"]);
    assert!(!ok);
    assert!(stderr.contains("--broker"), "{stderr}");
}
