//! The operator API end to end: every `/api/v1` endpoint, `/readyz`, `/metrics` and the live
//! event stream, against a gateway fed through a real Mosquitto, including bad parameters
//! (400 with a stable code naming the parameter).

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use gridsense_gateway::app;
use gridsense_protocol::{
    CheckIn, DeviceKey, DeviceTime, Eui, PositionFix, Status, Uplink, examples,
};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures};
use serde_json::Value;

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn json(url: &str) -> Value {
    let (status, body) = get(url).await;
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A 400 whose JSON error has the stable code and names the parameter.
async fn bad(url: &str, parameter: &str) {
    let (status, body) = get(url).await;
    assert_eq!(status, 400, "{url}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert_eq!(v["error"]["code"], "bad_parameter", "{body}");
    assert!(v["error"]["message"].as_str().unwrap().contains(parameter), "{url}: {body}");
}

/// The street codes of a `gridsim city` folder's grid layer.
fn fixtures_streets(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(dir.join("grids.geojson")).unwrap();
    let layer: Value = serde_json::from_str(&text).unwrap();
    layer["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["properties"]["street_code"].as_str().unwrap().to_owned())
        .collect()
}

fn status_now(at: DeviceTime, battery_mv: u16) -> Uplink {
    let Uplink::Status(s) = &examples::uplinks()[2] else { panic!("example 2 is a status") };
    Uplink::Status(Status { at, battery_mv, ..*s })
}

// Several threads: the CLI calls below block one while the gateway answers them on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_and_bad_parameters_are_named() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 51, Counts { covers: 20, drains: 10, beacons: 3 }).unwrap();
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    let keys: HashMap<Eui, DeviceKey> = fixtures::keys(dir.path()).unwrap();
    let config = common::config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let base = format!("http://{}", gateway.http.unwrap());

    // Every device reports a status (one with a low battery); a cover is removed; a beacon
    // checks in with a fix; a forged frame arrives for a drain.
    let at = common::now_device_time();
    let of = |k| devices.iter().filter(|d| d.record.kind == k).map(|d| d.eui).collect::<Vec<_>>();
    let (covers, drains, beacons) =
        (of(inventory::Kind::Cover), of(inventory::Kind::Drain), of(inventory::Kind::Beacon));
    let mut frames: Vec<(Eui, Uplink)> =
        devices.iter().map(|d| (d.eui, status_now(at, 3_600))).collect();
    frames[0].1 = status_now(at, 3_100);
    frames.push((covers[1], common::removed(at)));
    let fix = PositionFix { lat_udeg: 38_900_000, lon_udeg: 121_620_000, accuracy_m: 4 };
    frames.push((beacons[0], Uplink::CheckIn(CheckIn { at, checkpoint: 3, fix: Some(fix) })));
    common::publish(broker.addr(), frames, &keys).await;
    let forged = gridsense_protocol::seal(
        drains[0],
        999,
        &status_now(at, 3_600),
        &DeviceKey::from_bytes([9; 16]),
    );
    common::publish_raw(broker.addr(), vec![(drains[0], forged.to_vec())]).await;
    // And a plain drain reading (telemetry only: its values go to telemetry, not messages).
    let reading = Uplink::DrainReading {
        at,
        sample: gridsense_protocol::DrainSample { level_mm: 420, rate_mm_h: 0 },
    };
    common::publish_from(broker.addr(), vec![(drains[0], reading)], &keys, 1_000).await;
    let store = app::open_store(&config).unwrap();
    for _ in 0..50 {
        if store.case(1).unwrap().is_some() && store.audit_len().unwrap() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Health rows are flushed at most every 2 s: wait until every device shows online.
    for _ in 0..100 {
        let online: Value =
            serde_json::from_str(&get(&format!("{base}/api/v1/devices?state=online")).await.1)
                .unwrap();
        if online["total"] == 33 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Devices: filters, sorting, paging, sparklines.
    let all = json(&format!("{base}/api/v1/devices")).await;
    assert_eq!(all["total"], 33);
    assert_eq!(json(&format!("{base}/api/v1/devices?kind=cover")).await["total"], 20);
    let alarm = json(&format!("{base}/api/v1/devices?state=alarm")).await;
    assert_eq!(alarm["total"], 1);
    assert_eq!(alarm["devices"][0]["eui"], covers[1].to_string());
    assert_eq!(json(&format!("{base}/api/v1/devices?state=online")).await["total"], 33);
    let low = json(&format!("{base}/api/v1/devices?battery_below=3300")).await;
    assert_eq!(low["total"], 1);
    assert_eq!(low["devices"][0]["eui"], devices[0].eui.to_string());
    assert_eq!(json(&format!("{base}/api/v1/devices?silent_for=1h")).await["total"], 0);
    let grid = all["devices"][0]["grid_code"].as_str().unwrap().to_owned();
    let in_grid = json(&format!("{base}/api/v1/devices?grid={grid}")).await;
    assert!(in_grid["devices"].as_array().unwrap().iter().all(|d| d["grid_code"] == grid.as_str()));
    let street = &grid[..9];
    assert!(
        json(&format!("{base}/api/v1/devices?street={street}")).await["total"].as_u64().unwrap()
            >= 1
    );
    let page2 =
        json(&format!("{base}/api/v1/devices?per_page=10&page=2&sort=battery&order=desc")).await;
    assert_eq!(page2["devices"].as_array().unwrap().len(), 10);
    let beacon = json(&format!("{base}/api/v1/devices?kind=beacon&spark=1")).await;
    assert!(beacon["sparklines"].is_object());
    let with_fix = beacon["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["eui"] == beacons[0].to_string())
        .unwrap();
    assert_eq!(with_fix["fix"][0], 38.9);
    bad(&format!("{base}/api/v1/devices?kind=car"), "kind").await;
    bad(&format!("{base}/api/v1/devices?state=asleep"), "state").await;
    bad(&format!("{base}/api/v1/devices?page=x"), "page").await;
    bad(&format!("{base}/api/v1/devices?per_page=0"), "per_page").await;
    bad(&format!("{base}/api/v1/devices?silent_for=soon"), "silent_for").await;
    bad(&format!("{base}/api/v1/devices?battery_below=low"), "battery_below").await;
    bad(&format!("{base}/api/v1/devices?grid=abc"), "grid").await;
    bad(&format!("{base}/api/v1/devices?sort=colour"), "sort").await;
    bad(&format!("{base}/api/v1/devices?colour=red"), "colour").await;

    // One device: telemetry, health transitions, frames with verdicts.
    let drain = json(&format!("{base}/api/v1/devices/{}", drains[0])).await;
    let verdicts: Vec<&str> = drain["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["verdict"].as_str().unwrap())
        .collect();
    assert!(verdicts.contains(&"accepted") && verdicts.contains(&"rejected"), "{drain:#}");
    let frames = drain["frames"].as_array().unwrap();
    let forged = frames.iter().find(|f| f["detail"] == "bad_tag").unwrap();
    assert_eq!(forged["counter"], 999, "a rejected frame's counter, from its header");
    let reading = frames.iter().find(|f| f["detail"] == "drain_reading");
    assert_eq!(
        reading.map(|f| (&f["verdict"], &f["counter"])),
        Some((&"accepted".into(), &1_000.into())),
        "{drain:#}"
    );
    assert_eq!(drain["health_events"][0][1], "online");
    assert!(drain["telemetry"]["status_battery_mv"].is_array(), "{drain:#}");
    bad(&format!("{base}/api/v1/devices/xyz"), "eui").await;
    let (status, body) = get(&format!("{base}/api/v1/devices/00000000000000ff")).await;
    assert_eq!(status, 404);
    assert!(body.contains("not_found"));

    // Grids with counts.
    let grids = json(&format!("{base}/api/v1/grids")).await;
    let features = grids["features"].as_array().unwrap();
    assert_eq!(features.len(), 239);
    let placed: u64 = features.iter().map(|f| f["properties"]["devices"].as_u64().unwrap()).sum();
    assert_eq!(placed, 33);
    let open: u64 = features.iter().map(|f| f["properties"]["open_cases"].as_u64().unwrap()).sum();
    assert_eq!(open, 1);

    // The map's compact device list: every device, the stolen cover in alarm, the beacon at its fix.
    let map = json(&format!("{base}/api/v1/map")).await;
    let map = map["devices"].as_array().unwrap();
    assert_eq!(map.len(), 33);
    let victim = map.iter().find(|d| d[0] == covers[1].to_string()).unwrap();
    assert_eq!((victim[1].as_str(), victim[5].as_bool()), (Some("cover"), Some(true)));
    let walker = map.iter().find(|d| d[0] == beacons[0].to_string()).unwrap();
    assert_eq!((walker[7].as_f64(), walker[8].as_f64()), (Some(38.9), Some(121.62)));

    // Incidents, cases, statistics.
    let incidents = json(&format!("{base}/api/v1/incidents?state=open")).await;
    assert!(incidents.as_array().unwrap().iter().any(|i| i["condition"] == "cover_displaced"));
    assert!(incidents.as_array().unwrap().iter().any(|i| i["condition"] == "low_battery"));
    bad(&format!("{base}/api/v1/incidents?state=sleeping"), "state").await;
    bad(&format!("{base}/api/v1/incidents?limit=all"), "limit").await;
    let cases = json(&format!("{base}/api/v1/cases")).await;
    assert_eq!(cases.as_array().unwrap().len(), 1);
    bad(&format!("{base}/api/v1/cases?state=lost"), "state").await;
    bad(&format!("{base}/api/v1/cases/abc"), "id").await;
    // The case went to the cover's owner (a water-supply cover: the water company) at the
    // street level (a removed cover is critical: at least the street).
    let case = &cases.as_array().unwrap()[0];
    assert_eq!(case["class_code"], "C0101", "{case}");
    assert_eq!(case["department"], "GS", "{case}");
    assert_eq!((&case["level"], &case["first_level"]), (&"street".into(), &"street".into()));

    // The assessment report of today: a row per street of the grid layer, the case counted.
    let today = chrono::Utc::now()
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .date_naive()
        .to_string();
    let report = json(&format!("{base}/api/v1/reports?from={today}&to={today}&by=street")).await;
    let streets: std::collections::BTreeSet<String> = fixtures_streets(dir.path());
    let rows: std::collections::BTreeSet<String> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(rows, streets, "one row per street, zeros included");
    assert_eq!(report["totals"]["sensor"], 1, "{}", report["totals"]);
    let placed: u64 =
        report["rows"].as_array().unwrap().iter().map(|r| r["devices"].as_u64().unwrap()).sum();
    assert_eq!(placed, 33, "every device counts in its street: {}", report["totals"]);
    assert_eq!(report["period"]["from"], today.as_str());
    let resp = reqwest::get(format!("{base}/api/v1/reports?from={today}&to={today}&format=html"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    assert!(resp.text().await.unwrap().contains("网格化管理考核通报"));
    bad(&format!("{base}/api/v1/reports?by=city"), "city").await;
    bad(&format!("{base}/api/v1/reports?from={today}"), "from and to").await;
    bad(&format!("{base}/api/v1/reports?from=2026-02-30&to=2026-03-01"), "from").await;
    bad(&format!("{base}/api/v1/reports?format=pdf"), "pdf").await;
    let stats = json(&format!("{base}/api/v1/stats?from=2026-01-01")).await;
    assert_eq!(stats["collected"], 1);
    assert_eq!(stats["devices"], 33);
    assert_eq!(stats["online"], 33);
    assert_eq!(stats["online_ratio"], 1.0);
    let area = json(&format!("{base}/api/v1/stats?from=2026-01-01&area={street}")).await;
    assert!(area["devices"].as_u64().unwrap() <= 33);
    bad(&format!("{base}/api/v1/stats?from=yesterday"), "from").await;
    bad(&format!("{base}/api/v1/stats?from=2026-12-01&to=2026-11-01"), "from").await;
    bad(&format!("{base}/api/v1/stats?area=zz"), "area").await;

    // Supervisors and Prometheus.
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    let (ready, text) = get(&format!("{base}/readyz")).await;
    assert_eq!((ready, text.trim()), (200, "ready"));
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    for needle in [
        "gridsense_frames_accepted_total 36",
        "gridsense_frames_rejected_total{reason=\"bad_tag\"} 1",
        "gridsense_devices{state=\"online\"} 33",
        "gridsense_case_latency_seconds_count 1",
        "gridsense_outbox_entries{state=\"pending\"}",
        "gridsense_queue_unacked",
        "gridsense_mqtt_publishes_received_total",
        "gridsense_mqtt_pubacks_sent_total",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }

    // The same from a terminal: through the running gateway's API, or on the store.
    let config_path = dir.path().join("gridsense.toml");
    std::fs::write(&config_path, format!("[store]\npath = \"{}\"\n", config.store.path.display()))
        .unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gridsense"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = cli(&["devices", "list", "--api", &base, "--state", "alarm"]);
    assert!(
        ok && text.contains(&covers[1].to_string())
            && text.contains("ALARM")
            && text.contains("1 of 1 devices"),
        "{text}"
    );
    let (ok, text) =
        cli(&["devices", "list", "--config", config_path.to_str().unwrap(), "--kind", "beacon"]);
    assert!(ok && text.contains("3 of 3 devices"), "{text}");
    let (ok, text) = cli(&["devices", "show", &drains[0].to_string(), "--api", &base]);
    assert!(ok && text.contains("bad_tag") && text.contains("rejected"), "{text}");
    let (ok, text) = cli(&[
        "devices",
        "show",
        &drains[0].to_string(),
        "--config",
        config_path.to_str().unwrap(),
    ]);
    assert!(ok && text.contains("bad_tag"), "{text}");
    let (ok, text) = cli(&["cases", "list", "--api", &base]);
    assert!(ok && text.contains("C01"), "{text}");
    let (ok, text) = cli(&["devices", "list", "--api", &base, "--state", "asleep"]);
    assert!(!ok && text.contains("state"), "{text}");

    // Live events: a theft shows up on the stream within a second.
    let mut stream = reqwest::get(format!("{base}/api/v1/events")).await.unwrap();
    let started = std::time::Instant::now();
    common::publish_from(broker.addr(), vec![(covers[5], common::removed(at))], &keys, 100).await;
    let mut seen = String::new();
    while !seen.contains("\"cases\":[[") {
        let chunk = tokio::time::timeout(Duration::from_secs(3), stream.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains(&covers[5].to_string()), "{seen}");
    gridsense_tests::evidence!(
        "api: a theft reached the event stream {:?} after publishing began",
        started.elapsed()
    );
    drop(stream);

    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}
