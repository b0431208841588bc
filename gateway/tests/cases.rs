//! From anomalies to cases, end to end against a real Mosquitto and the simulator: a theft
//! becomes exactly one case per stolen cover with the right codes, grid and coordinates,
//! readable through the Open311 endpoints; passing vehicles raise none; the operator API moves
//! a case through its lifecycle and shows its trace. A rainstorm's drain cases are linked per
//! grid.

// Test code: a panic is how a failure is reported.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::{collections::BTreeMap, time::Duration};

use gridsense_gateway::{
    app,
    geo::{CodeLengths, GridLayer},
};
use gridsense_simulator::{city::Counts, inventory::Kind};
use gridsense_tests::{Mosquitto, fixtures};
use serde_json::Value;

use common::config;

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn get_json(url: &str) -> Value {
    let (status, body) = get(url).await;
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn a_theft_becomes_one_case_per_stolen_cover_and_traffic_none() {
    theft(None).await;
}

/// The same product on PostgreSQL (`store.url`): ingest, rules, cases, delivery to the local
/// board, the API, Open311 and the operator's lifecycle moves, with nothing in SQLite.
#[tokio::test]
async fn a_theft_on_postgres_is_the_same_product() {
    let pg = gridsense_tests::postgres::Postgres::start().unwrap();
    let url = pg.database(None).unwrap();
    theft(Some(&url)).await;
}

async fn theft(store_url: Option<&str>) {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 11, Counts { covers: 40, drains: 0, beacons: 0 }).unwrap();
    let covers: Vec<_> = devices.iter().filter(|d| d.kind == Kind::Cover).collect();
    let stolen = [&covers[3], &covers[17], &covers[29]];
    let scenario: &'static str = Box::leak(
        fixtures::theft_scenario([&stolen[0].eui, &stolen[1].eui], &stolen[2].eui).into_boxed_str(),
    );
    let mut config = config(dir.path(), broker.addr());
    if let Some(url) = store_url {
        config.store.url = url.to_owned();
    }
    // The generated district has no separate unit-grid file: its grid file stands in for one,
    // to prove the unit-grid code reaches the case.
    config.geo.unit_grids = config.geo.grids.clone();
    common::import(&config, dir.path());
    let real = Duration::from_secs(13);
    let (gateway, stop_tx, clock) = common::start_shared(&config, 10.0, real).await;
    let http = gateway.http.unwrap();
    let sim = common::spawn_fleet(dir.path(), scenario, broker.addr(), clock, real);
    sim.await.unwrap().unwrap();
    // Let the last batch commit and the delivery worker put the cases on the board.
    for _ in 0..50 {
        if gateway.delivery.delivered.load(std::sync::atomic::Ordering::Relaxed) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let base = format!("http://{http}/open311/v2");

    // Exactly one case per stolen cover, none for the 37 covers only vehicles drove over.
    let requests = get_json(&format!("{base}/requests.json")).await;
    let requests = requests.as_array().unwrap();
    let layer =
        GridLayer::load(&dir.path().join("grids.geojson"), CodeLengths::default(), 50.0).unwrap();
    let by_device: BTreeMap<String, &Value> =
        requests.iter().map(|r| (r["device_id"].as_str().unwrap().to_owned(), r)).collect();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    assert_eq!(by_device.len(), 3, "one case per cover");
    for cover in stolen {
        let r = by_device.get(&cover.eui).unwrap_or_else(|| panic!("no case for {}", cover.eui));
        let minor = cover.minor_class.as_deref().unwrap();
        assert_eq!(r["service_code"], format!("C{minor}"));
        assert_eq!(r["object_code"], cover.component_code.as_deref().unwrap());
        let cell = layer.locate(cover.lat, cover.lon).grid().unwrap();
        assert_eq!(r["grid_code"], &*cell.grid_code);
        assert_eq!(r["street_code"], &*cell.street_code);
        assert_eq!(r["community_code"], cell.community_code);
        assert!((r["lat"].as_f64().unwrap() - cover.lat).abs() < 1e-9);
        assert!((r["long"].as_f64().unwrap() - cover.lon).abs() < 1e-9);
        assert_eq!(r["crs"], "WGS84");
        assert_eq!(r["address_id"], &*cell.grid_code, "unit grid code");
        assert_eq!(r["status"], "open");
        assert_eq!(r["source"], "IoT");
        assert!(r["requested_datetime"].as_str().unwrap().ends_with("+08:00"));
        assert!(r["address"].as_str().unwrap().contains("中山区"));
    }
    // GB/T 41401: alarm to platform within 30 s. Onset is the device's (the tilt's start);
    // detection includes the device's 2 s and the gateway's 10 s hold (simulated time).
    let store = app::open_store(&config).unwrap();
    for c in store
        .cases(&gridsense_gateway::store::CaseFilter { limit: 10, ..Default::default() })
        .unwrap()
    {
        let took = c.detected_ms - c.onset_ms;
        // Device times have whole seconds: an immediate alarm may show an onset up to a
        // second after its detection.
        assert!((-1_000..30_000).contains(&took), "case {} took {took} ms from onset", c.id);
        let delivered = c.delivered_ms.unwrap() - c.onset_ms;
        assert!(delivered < 30_000, "case {} on the board {delivered} ms after onset", c.id);
    }
    let status = get_json(&format!("http://{http}/api/v1/status")).await;
    assert_eq!(status["cases_filed"], 3);
    assert_eq!(status["devices_unassigned"], 0);
    assert_eq!(status["delivery"]["dead"], 0);
    // Removed covers are urgent from the start.
    assert_eq!(by_device[&stolen[0].eui]["urgency"], "urgent");

    // XML too, and the filters.
    let (status, xml) = get(&format!("{base}/requests.xml")).await;
    assert_eq!(status, 200);
    assert_eq!(xml.matches("<request>").count(), 3);
    let code = by_device[&stolen[2].eui]["service_code"].as_str().unwrap().to_owned();
    let one = get_json(&format!("{base}/requests.json?service_code={code}")).await;
    assert!(one.as_array().unwrap().iter().all(|r| r["service_code"] == code.as_str()));
    let none = get_json(&format!("{base}/requests.json?status=closed")).await;
    assert_eq!(none.as_array().unwrap().len(), 0);
    let (status, body) = get(&format!("{base}/requests.json?start_date=yesterday")).await;
    assert_eq!(status, 400);
    assert!(body.contains("start_date"), "{body}");
    let (status, body) = get(&format!("{base}/requests.json?status=pending")).await;
    assert_eq!((status, body.contains("status")), (400, true), "{body}");
    let services = get_json(&format!("{base}/services.json")).await;
    assert!(services.as_array().unwrap().iter().any(|s| s["service_code"] == "C0102"));
    let (status, _) = get(&format!("{base}/requests/999999.json")).await;
    assert_eq!(status, 404);

    // The displaced cover was put back: recovery is on its trace; its timers run.
    let id = by_device[&stolen[2].eui]["service_request_id"].as_str().unwrap().to_owned();
    let detail = get_json(&format!("http://{http}/api/v1/cases/{id}")).await;
    let trace = detail["trace"].as_array().unwrap();
    let kinds: Vec<&str> = trace.iter().map(|t| t["kind"].as_str().unwrap()).collect();
    for k in ["frame", "evidence", "state"] {
        assert!(kinds.contains(&k), "{k} missing from {trace:#?}");
    }
    assert!(
        trace.iter().any(|t| t["detail"].as_str().unwrap().contains("recovered")),
        "{trace:#?}"
    );
    let timers = detail["timers"].as_array().unwrap();
    assert_eq!(timers.len(), 3);
    assert!(timers.iter().all(|t| t["colour"] == "green"), "{timers:#?}");
    assert_eq!(detail["platform"], "local");

    // The operator moves it through the lifecycle; an illegal move is refused.
    let client = reqwest::Client::new();
    let post = |to: &str| {
        client
            .post(format!("http://{http}/api/v1/cases/{id}/transition"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"to":"{to}","actor":"zhang","note":"test"}}"#))
            .send()
    };
    assert_eq!(post("closed").await.unwrap().status().as_u16(), 409);
    for to in ["filed", "dispatched", "handled", "feedback", "verified", "closed"] {
        let resp = post(to).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{to}: {}", resp.text().await.unwrap());
    }
    let closed = get_json(&format!("{base}/requests/{id}.json")).await;
    assert_eq!(closed[0]["status"], "closed");
    let detail = get_json(&format!("http://{http}/api/v1/cases/{id}")).await;
    let states: Vec<&str> = detail["trace"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "state" && t["actor"] == "operator:zhang")
        .map(|t| t["detail"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 6, "{states:?}");

    // The running gateway sees the closure (it polls the board) and releases the incident.
    let store = app::open_store(&config).unwrap();
    let mut incidents = BTreeMap::new();
    for _ in 0..50 {
        incidents = store.incident_counts().unwrap();
        if incidents.contains_key("closed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(incidents.get("closed").copied(), Some(1), "{incidents:?}");
    assert_eq!(gateway.status.incidents_open.load(std::sync::atomic::Ordering::Relaxed), 2);
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    if store_url.is_some() {
        assert!(!config.store.path.exists(), "with store.url nothing is written to SQLite");
    }
}

#[tokio::test]
async fn a_rainstorm_links_drain_cases_per_grid() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 21, Counts { covers: 0, drains: 300, beacons: 0 }).unwrap();
    let scenario = r#"
description = "test: a heavy storm over the whole district"
seed = 4
[traffic]
vehicles_per_hour = 0
[battery]
low_fraction = 0.0
[[rain]]
start = "2m"
duration = "1h"
peak_mm_h = 90
"#;
    let config = config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let real = Duration::from_secs(15);
    let (gateway, stop_tx, clock) = common::start_shared(&config, 300.0, real).await;
    let sim = common::spawn_fleet(dir.path(), scenario, broker.addr(), clock, real);
    sim.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let store = app::open_store(&config).unwrap();
    let cases = store
        .cases(&gridsense_gateway::store::CaseFilter { limit: 1_000, ..Default::default() })
        .unwrap();
    assert!(cases.len() >= 5, "a storm raises drain cases: {}", cases.len());
    assert!(cases.iter().all(|c| c.class_code == "E0404"), "drain overflow is E0404");
    // Incidents of the same grid share a cluster (they were all detected within the 30-min
    // link window of the one before); different grids never do.
    let mut clusters: BTreeMap<i64, Vec<(String, i64)>> = BTreeMap::new();
    for c in &cases {
        let incident = c.incident_id.unwrap();
        let cluster = store.incident_cluster(incident).unwrap().unwrap();
        clusters.entry(cluster).or_default().push((c.grid_code.clone().unwrap(), c.detected_ms));
    }
    let linked = clusters.values().filter(|m| m.len() > 1).count();
    assert!(linked >= 1, "some grid has several flooding drains: {clusters:?}");
    for members in clusters.values() {
        assert!(members.iter().all(|m| m.0 == members[0].0), "one grid per cluster: {members:?}");
    }
    // Within a grid, an incident detected within the link window of the one before joins its
    // cluster; after a longer gap a new one starts.
    let mut by_grid: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
    for (cluster, members) in &clusters {
        for (grid, detected) in members {
            by_grid.entry(grid).or_default().push((*detected, *cluster));
        }
    }
    let window = i64::try_from(config.cases.link_window_s * 1000).unwrap();
    for (grid, members) in &mut by_grid {
        members.sort_unstable();
        for w in members.windows(2) {
            let same = w[1].0 - w[0].0 <= window;
            assert_eq!(w[0].1 == w[1].1, same, "grid {grid}: {members:?}");
        }
    }
    gridsense_tests::evidence!(
        "rainstorm: {} drain cases in {} grids, {} clusters with more than one drain",
        cases.len(),
        by_grid.len(),
        linked
    );
}

/// A repair crew's window (set with the CLI) turns a lifted cover into a recorded incident,
/// not a case; outside the window the same alarm files a case. The CLI lists, shows and
/// moves it.
#[tokio::test]
async fn maintenance_windows_record_without_filing_and_the_cli_shows_the_board() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 41, Counts { covers: 30, drains: 0, beacons: 0 }).unwrap();
    let config = config(dir.path(), broker.addr());
    let path = dir.path().join("gridsense.toml");
    std::fs::write(
        &path,
        format!(
            "[mqtt]\nurl = \"{}\"\n[store]\npath = \"{}\"\n[geo]\ngrids = \"{}\"\n[downlink]\npoll_ms = 200\n",
            config.mqtt.url,
            config.store.path.display(),
            config.geo.grids
        ),
    )
    .unwrap();
    common::import(&config, dir.path());
    let layer =
        GridLayer::load(&dir.path().join("grids.geojson"), CodeLengths::default(), 50.0).unwrap();
    let street = |d: &gridsense_simulator::inventory::DeviceRecord| {
        layer.locate(d.lat, d.lon).grid().unwrap().street_code.to_string()
    };
    // Two covers in different streets: the crew works in the first one's street.
    let a = &devices[0];
    let b = devices.iter().find(|d| street(d) != street(a)).unwrap();
    let out = common::cli(
        &path,
        &["maintenance", "add", "--scope", &street(a), "--for", "2h", "--note", "crew 7, WO-1234"],
    );
    assert!(out.contains("window 1"), "{out}");
    assert!(common::cli(&path, &["maintenance", "list"]).contains("WO-1234"));

    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let keys = fixtures::keys(dir.path()).unwrap();
    let at = common::now_device_time();
    let (ea, eb) = (a.eui.parse().unwrap(), b.eui.parse().unwrap());
    common::publish(
        broker.addr(),
        vec![(ea, common::removed(at)), (eb, common::removed(at))],
        &keys,
    )
    .await;
    let store = app::open_store(&config).unwrap();
    for _ in 0..50 {
        if store.incident_counts().unwrap().values().sum::<u64>() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let incidents = store.incident_counts().unwrap();
    assert_eq!(incidents.get("maintenance"), Some(&1), "{incidents:?}");
    assert_eq!(incidents.get("open"), Some(&1), "{incidents:?}");
    let list = common::cli(&path, &["cases", "list"]);
    assert_eq!(list.lines().count(), 2, "a header and one case:\n{list}");
    assert!(list.contains(&b.eui) && !list.contains(&a.eui), "{list}");
    let show = common::cli(&path, &["cases", "show", "1"]);
    for needle in ["timers:", "deploy", "handling", "trace:", "evidence", "collected"] {
        assert!(show.contains(needle), "{needle} missing:\n{show}");
    }
    assert!(
        common::cli(&path, &["cases", "move", "1", "--to", "filed", "--actor", "li"])
            .contains("filed")
    );
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args([
            "cases",
            "move",
            "1",
            "--to",
            "closed",
            "--actor",
            "li",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot move to closed"));
    let rules = std::process::Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(["cases", "defaults", "rules"])
        .output()
        .unwrap();
    let text = String::from_utf8(rules.stdout).unwrap();
    gridsense_gateway::rules::RulesConfig::parse(&text, "printed").unwrap();
}

/// A hold that is half elapsed when the gateway stops fires after the restart, from the
/// persisted rule state, with the original onset — no frame needed. The rules come from a
/// rules file (the tilt hold shortened to 3 s).
#[tokio::test]
async fn a_half_elapsed_hold_fires_after_a_restart() {
    use gridsense_gateway::rules::{RulesConfig, Test};
    use gridsense_protocol::{AlarmKind, AlarmRaised, Uplink};

    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 43, Counts { covers: 3, drains: 0, beacons: 0 }).unwrap();
    let mut rules = RulesConfig::default();
    for r in &mut rules.cover {
        if let Test::Threshold { levels } = &mut r.test {
            for l in levels.iter_mut().filter(|l| l.hold_s == 10) {
                l.hold_s = 3;
            }
        }
    }
    let rules_path = dir.path().join("rules.toml");
    std::fs::write(&rules_path, toml::to_string(&rules).unwrap()).unwrap();
    let mut config = config(dir.path(), broker.addr());
    config.cases.rules = rules_path.display().to_string();
    common::import(&config, dir.path());
    let keys = fixtures::keys(dir.path()).unwrap();
    let eui = devices[0].eui.parse().unwrap();

    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let since = common::now_device_time();
    let tilt = Uplink::AlarmRaised(AlarmRaised { kind: AlarmKind::CoverTilt, value: 250, since });
    common::publish(broker.addr(), vec![(eui, tilt)], &keys).await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let store = app::open_store(&config).unwrap();
    assert_eq!(store.case_counts().unwrap().values().sum::<u64>(), 0, "not yet held 3 s");
    let states = store.rule_states().unwrap();
    assert!(
        states.iter().any(|(e, id, s)| *e == eui
            && id.starts_with("cover_displaced/")
            && s.pending().is_some()),
        "{states:?}"
    );

    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let mut filed = 0;
    for _ in 0..100 {
        filed = store.case_counts().unwrap().values().sum::<u64>();
        if filed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    assert_eq!(filed, 1, "the restored timer fired");
    let case = store.case(1).unwrap().unwrap();
    assert_eq!(case.onset_ms, gridsense_gateway::rules::device_ms(since));
    assert!(case.detected_ms - case.onset_ms >= 3_000, "held its 3 s: {case:?}");
}

/// A grid worker's report becomes a case with the chosen class, placed where the worker stood;
/// check-ins become patrol records in the grid of the fix.
#[tokio::test]
async fn worker_reports_become_cases_and_check_ins_patrol_records() {
    use gridsense_protocol::{CaseClass, CheckIn, ClassKind, IncidentReport, PositionFix, Uplink};

    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 44, Counts { covers: 2, drains: 0, beacons: 2 }).unwrap();
    let config = config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let keys = fixtures::keys(dir.path()).unwrap();
    let beacon = devices.iter().find(|d| d.kind == Kind::Beacon).unwrap();
    let layer =
        GridLayer::load(&dir.path().join("grids.geojson"), CodeLengths::default(), 50.0).unwrap();
    // The worker stands in a grid other than the beacon's home grid.
    let cell =
        layer.cells().iter().find(|c| beacon.grid_code.as_deref() != Some(&*c.grid_code)).unwrap();
    let centre = geo::Centroid::centroid(&cell.shape).unwrap();
    let fix = PositionFix {
        lat_udeg: (centre.y() * 1e6).round() as i32,
        lon_udeg: (centre.x() * 1e6).round() as i32,
        accuracy_m: 5,
    };
    let at = common::now_device_time();
    let mut note = heapless::String::new();
    note.push_str("路口积水没过脚踝").unwrap();
    let report = Uplink::IncidentReport(IncidentReport {
        at,
        class: CaseClass { kind: ClassKind::Event, major: 4, minor: 6 },
        note,
        fix: Some(fix),
    });
    let checkin = Uplink::CheckIn(CheckIn { at, checkpoint: 17, fix: Some(fix) });
    let eui = beacon.eui.parse().unwrap();
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    common::publish(broker.addr(), vec![(eui, report), (eui, checkin)], &keys).await;
    let store = app::open_store(&config).unwrap();
    for _ in 0..50 {
        if store.case(1).unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let day = gridsense_gateway::calendar::Calendar::default()
        .iso(gridsense_gateway::rules::device_ms(at))[..10]
        .to_owned();
    let http = gateway.http.unwrap();
    let coverage = get_json(&format!("http://{http}/api/v1/patrols?day={day}")).await;
    assert_eq!(coverage[0]["grid_code"], &*cell.grid_code);
    assert_eq!(
        (coverage[0]["checkins"].as_u64(), coverage[0]["workers"].as_u64()),
        (Some(1), Some(1))
    );
    let (status, body) = get(&format!("http://{http}/api/v1/patrols?day=26/11/2026")).await;
    assert_eq!(status, 400);
    assert!(body.contains("day"), "{body}");
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let case = store.case(1).unwrap().expect("the report is a case");
    assert_eq!(case.class_code, "E0406");
    assert_eq!(case.grid_code.as_deref(), Some(&*cell.grid_code));
    assert!((case.lat - centre.y()).abs() < 1e-5 && (case.lon - centre.x()).abs() < 1e-5);
    assert!(case.description.contains("路口积水没过脚踝"));
    assert_eq!(case.source, "grid_worker", "a worker's report is not the IoT's");
    let day = store.patrol_coverage(&day).unwrap();
    assert_eq!(day, vec![(Some(cell.grid_code.to_string()), 1, 1)]);
}
