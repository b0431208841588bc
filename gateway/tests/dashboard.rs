//! The dashboard in a real headless Chromium, on a gateway fed by the simulator through
//! Mosquitto: the map shows every grid (one SVG element per grid carrying its code), the
//! device table shows the devices with the states the API reports, and a theft in the
//! simulator appears as an alarm marker and a case row without reloading the page. Saves a
//! screenshot to `target/dashboard.png`.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use gridsense_gateway::geo::{CodeLengths, GridLayer};
use gridsense_simulator::{city::Counts, inventory::Kind};
use gridsense_tests::{Chromium, Mosquitto, fixtures};
use serde_json::Value;

fn state_of(d: &Value) -> &'static str {
    if d["alarm"] == true {
        "alarm"
    } else if d["health"] == "offline" {
        "offline"
    } else if d["low_battery"] == true {
        "low"
    } else if d["health"] == "never_seen" {
        "new"
    } else {
        "online"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_grids_devices_and_a_theft_live() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices =
        fixtures::city(dir.path(), 61, Counts { covers: 60, drains: 20, beacons: 6 }).unwrap();
    let victim = devices.iter().filter(|d| d.kind == Kind::Cover).nth(7).unwrap().eui.clone();
    let scenario: &'static str = Box::leak(
        format!(
            "description = \"test: one cover stolen\"\nseed = 4\n[traffic]\nvehicles_per_hour = 30\n\
             [[theft]]\nat = \"90s\"\ncovers = 0\nmode = \"removed\"\neuis = [\"{victim}\"]\n"
        )
        .into_boxed_str(),
    );
    let config = common::config(dir.path(), broker.addr());
    common::import(&config, dir.path());
    let real = Duration::from_secs(20);
    let (gateway, stop_tx, clock) = common::start_shared(&config, 10.0, real).await;
    let base = format!("http://{}", gateway.http.unwrap());
    let sim = common::spawn_fleet(dir.path(), scenario, broker.addr(), clock, real);
    // Let every device report once before the page loads.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let expected_rows: Value =
        reqwest::get(format!("{base}/api/v1/devices?page=1&per_page=50&sort=state&order=desc"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();

    let page = base.clone();
    let browser = tokio::task::spawn_blocking(move || -> anyhow::Result<(Chromium, Duration)> {
        let mut b = Chromium::start(1600, 1200)?;
        let start = Instant::now();
        b.navigate(&page)?;
        b.wait_for("document.body.dataset.ready === '1'", Duration::from_secs(15))?;
        // A marker that survives only as long as the page is not reloaded.
        b.eval("window.__loaded = Math.random(); window.__loaded")?;
        Ok((b, start.elapsed()))
    });
    let (mut b, first_load) = browser.await.unwrap().unwrap();
    let mut b = tokio::task::spawn_blocking(move || {
        // Every grid is drawn, each carrying its code.
        let codes = b.eval("[...document.querySelectorAll('#map path.grid[data-grid-code]')].map(e => e.dataset.gridCode)").unwrap();
        (b, codes)
    })
    .await
    .map(|(b, codes)| {
        let layer = GridLayer::load(&dir.path().join("grids.geojson"), CodeLengths::default(), 50.0).unwrap();
        let mut drawn: Vec<String> = codes.as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
        let mut want: Vec<String> = layer.cells().iter().map(|c| c.grid_code.to_string()).collect();
        drawn.sort();
        want.sort();
        assert_eq!(drawn.len(), 239);
        assert_eq!(drawn, want, "one element per grid, with its code");
        b
    })
    .unwrap();

    let (b2, rows, markers) = tokio::task::spawn_blocking(move || {
        let rows = b.eval("[...document.querySelectorAll('#device-table tbody tr')].map(r => [r.dataset.eui, r.dataset.state])").unwrap();
        let markers = b.eval("[...document.querySelectorAll('#map circle[data-eui]')].map(e => [e.dataset.eui, e.dataset.state])").unwrap();
        (b, rows, markers)
    })
    .await
    .unwrap();
    b = b2;
    let markers = markers.as_array().unwrap();
    assert_eq!(markers.len(), devices.len(), "a marker per device");
    // Markers in alarm are exactly the devices the API has in alarm (before the theft).
    let all: Value = reqwest::get(format!("{base}/api/v1/devices?per_page=5000"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api_alarms: std::collections::BTreeSet<&str> = all["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| state_of(d) == "alarm")
        .map(|d| d["eui"].as_str().unwrap())
        .collect();
    let map_alarms: std::collections::BTreeSet<&str> =
        markers.iter().filter(|m| m[1] == "alarm").map(|m| m[0].as_str().unwrap()).collect();
    assert_eq!(map_alarms, api_alarms, "alarm markers");
    let low: Vec<&Value> = markers.iter().filter(|m| m[1] == "low").collect();
    gridsense_tests::evidence!(
        "dashboard: {} markers in alarm, {} low battery before the theft",
        map_alarms.len(),
        low.len()
    );
    // The table shows the devices the API lists, in the same order, with the same states
    // (health may move on between the two reads: compare the EUIs exactly, states loosely).
    let rows = rows.as_array().unwrap();
    let api_rows = expected_rows["devices"].as_array().unwrap();
    assert_eq!(rows.len(), api_rows.len().min(50));
    let same_state =
        rows.iter().zip(api_rows).filter(|(r, a)| r[0] == a["eui"] && r[1] == state_of(a)).count();
    assert!(same_state * 10 >= rows.len() * 9, "table and API agree: {rows:?}");

    // The theft: alarm marker and case row appear without a reload.
    let victim_js = victim.clone();
    let (b2, (_, took)) = tokio::task::spawn_blocking(move || {
        let r = b
            .wait_for(
                &format!(
                    "document.querySelector('#map circle[data-eui=\"{victim_js}\"][data-state=\"alarm\"]') && document.querySelector('#case-table tr[data-device=\"{victim_js}\"]') && window.__loaded"
                ),
                Duration::from_secs(20),
            )
            .unwrap();
        (b, r)
    })
    .await
    .unwrap();
    b = b2;
    let still_same_page = b.eval("typeof window.__loaded === 'number'").unwrap();
    assert_eq!(still_same_page, true, "no reload");
    // From the gateway's commit to the marker drawn (both on this machine's wall clock).
    let lag = b.eval("window.gsCaseLagMs").unwrap().as_f64().unwrap();
    assert!(lag < 1_000.0, "live update took {lag} ms");

    // English labels on request; no console errors; a screenshot for the README.
    let (b2, title, errors, png) = tokio::task::spawn_blocking(move || {
        b.eval("document.getElementById('lang').click()").unwrap();
        let title = b.eval("document.querySelector('h1').textContent").unwrap();
        b.eval("document.getElementById('lang').click()").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let png = b.screenshot().unwrap();
        let errors = b.errors.lock().unwrap().clone();
        (b, title, errors, png)
    })
    .await
    .unwrap();
    drop(b2);
    assert!(title.as_str().unwrap().contains("operations"), "{title}");
    assert!(errors.is_empty(), "{errors:?}");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("dashboard.png"), &png).unwrap();
    gridsense_tests::evidence!(
        "dashboard: first load {first_load:?} ({} devices, 239 grids); theft on the map {lag:.0} ms after its commit (visible {took:?} after waiting began); screenshot {} bytes in target/dashboard.png",
        devices.len(),
        png.len()
    );
    sim.await.unwrap().unwrap();
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}
