//! The built-in board as an Open311 GeoReport v2 server, as an outside client sees it, and the
//! signed platform callbacks: `service_request_id` overrides every other parameter; every W3C
//! date-time form is read; a search defaults to the last 90 days and spans no more; every error
//! is an Open311 error array (JSON or XML), a POST included; JSON and XML carry the same
//! fields; the board names its jurisdiction and refuses others; a callback cannot be replayed
//! and follows the lifecycle rules; an oversized callback gets the JSON error envelope.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering::Relaxed},
    },
    time::Duration,
};

use gridsense_gateway::{app, platform::sign};
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, fixtures};
use serde_json::Value;

const DAY_MS: i64 = 86_400_000;
const SECRET: &str = "board-secret";

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// An Open311 error array with one element carrying the status as its code.
fn open311_error(status: u16, body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert_eq!(v[0]["code"], status, "{body}");
    v[0]["description"].as_str().unwrap().to_owned()
}

fn ids(body: &str) -> BTreeSet<String> {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["service_request_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_speaks_open311_as_the_standard_says() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 97, Counts { covers: 2, drains: 0, beacons: 0 }).unwrap();
    let keys = fixtures::keys(dir.path()).unwrap();
    let covers: Vec<_> = keys.keys().copied().collect();
    let mut config = common::config(dir.path(), broker.addr());
    config.http.jurisdiction_id = "zhongshan.dalian".into();
    config.cases.secret = SECRET.into();
    common::import(&config, dir.path());
    // The gateway's clock starts 100 days ago: the first case is older than the default span.
    let now = app::wall_clock()();
    let offset = Arc::new(AtomicI64::new(-100 * DAY_MS));
    let clock: gridsense_gateway::status::Clock = {
        let offset = offset.clone();
        Arc::new(move || app::wall_clock()() + offset.load(Relaxed))
    };
    let (gateway, stop_tx) = common::start(&config, clock).await;
    let base = format!("http://{}/open311/v2", gateway.http.unwrap());
    let store = app::open_store(&config).unwrap();
    let wait_case = |id: i64| {
        let store = &store;
        async move {
            for _ in 0..100 {
                if store.case(id).unwrap().is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("case {id} never filed");
        }
    };
    common::publish(
        broker.addr(),
        vec![(covers[0], common::removed(common::now_device_time()))],
        &keys,
    )
    .await;
    wait_case(1).await;
    offset.store(0, Relaxed);
    common::publish(
        broker.addr(),
        vec![(covers[1], common::removed(common::now_device_time()))],
        &keys,
    )
    .await;
    wait_case(2).await;

    // The default span is the last 90 days: only the recent case.
    let (status, body) = get(&format!("{base}/requests.json")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body), BTreeSet::from(["2".to_owned()]));
    // service_request_id overrides everything else, even a filter that excludes it.
    let (_, body) = get(&format!(
        "{base}/requests.json?service_request_id=1&status=closed&start_date=2020-01-01"
    ))
    .await;
    assert_eq!(ids(&body), BTreeSet::from(["1".to_owned()]));
    // Every W3C form: a day, a month, minutes with a zone, seconds in UTC.
    let day = gridsense_gateway::calendar::Calendar::default().iso(now)[..10].to_owned();
    let month = &day[..7];
    let minutes = gridsense_gateway::calendar::Calendar::default().iso(now - 3_600_000)[..16]
        .to_owned()
        + "+08:00";
    let utc = chrono::DateTime::from_timestamp_millis(now - 3_600_000)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    for start in [day.as_str(), month, minutes.as_str(), utc.as_str()] {
        let (status, body) =
            get(&format!("{base}/requests.json?start_date={}", urlencode(start))).await;
        assert_eq!(status, 200, "{start}: {body}");
        assert!(ids(&body).contains("2"), "{start}: {body}");
    }
    let (status, body) = get(&format!("{base}/requests.json?end_date={day}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(ids(&body).contains("2"), "an end date names its whole day: {body}");
    let (status, body) =
        get(&format!("{base}/requests.json?start_date=2026-01-01&end_date=2026-12-31")).await;
    assert_eq!(status, 400);
    assert!(open311_error(400, &body).contains("90 days"));
    let (status, body) = get(&format!("{base}/requests.json?start_date=yesterday")).await;
    assert_eq!(status, 400);
    assert!(open311_error(400, &body).contains("start_date"));

    // Every error is an Open311 error array: unknown resources, a POST, XML too.
    let client = reqwest::Client::new();
    let post = client
        .post(format!("{base}/requests.json"))
        .form(&[("service_code", "C0102")])
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);
    assert!(open311_error(405, &post.text().await.unwrap()).contains("read-only"));
    for path in ["/tokens/x.json", "/requests/999.json", "/nothing.json"] {
        let (status, body) = get(&format!("{base}{path}")).await;
        assert_eq!(status, 404, "{path}");
        open311_error(404, &body);
    }
    let (status, body) = get(&format!("{base}/tokens/x.xml")).await;
    assert_eq!(status, 404);
    assert!(body.contains("<errors><error><code>404</code>"), "{body}");

    // JSON and XML carry the same fields.
    let (_, json) = get(&format!("{base}/requests/2.json")).await;
    let (_, xml) = get(&format!("{base}/requests/2.xml")).await;
    let v: Value = serde_json::from_str(&json).unwrap();
    let json_fields: BTreeSet<String> = v[0].as_object().unwrap().keys().cloned().collect();
    let inner = xml.split("<request>").nth(1).unwrap().split("</request>").next().unwrap();
    let xml_fields: BTreeSet<String> = inner
        .split('<')
        .filter(|t| !t.is_empty() && !t.starts_with('/'))
        .map(|t| t.split('>').next().unwrap().to_owned())
        .collect();
    assert_eq!(json_fields, xml_fields);
    assert!(json_fields.contains("source"));
    assert_eq!(v[0]["source"], "IoT");

    // The jurisdiction: its own, none or an empty one are served; another is refused by name.
    for j in ["?jurisdiction_id=zhongshan.dalian", "?jurisdiction_id=", ""] {
        let (status, _) = get(&format!("{base}/services.json{j}")).await;
        assert_eq!(status, 200, "{j}");
    }
    let (status, body) = get(&format!("{base}/services.json?jurisdiction_id=shenzhen")).await;
    assert_eq!(status, 404);
    let why = open311_error(404, &body);
    assert!(why.contains("shenzhen") && why.contains("zhongshan.dalian"), "{why}");

    // Callbacks: a replay is refused, the lifecycle is the operator API's, a repeat of the
    // same state with a fresh signature changes nothing, an oversized body gets the envelope.
    let callback = format!("http://{}/api/v1/platform/callback", gateway.http.unwrap());
    let send = |body: String, t: i64| {
        let signature = sign(SECRET, t, body.as_bytes());
        client
            .post(&callback)
            .header("content-type", "application/json")
            .header("x-gridsense-signature", signature)
            .body(body)
            .send()
    };
    let now_s = app::wall_clock()() / 1000;
    let body =
        |state: &str| format!(r#"{{"case_id":2,"state":"{state}","note":"by the platform"}}"#);
    assert_eq!(send(body("filed"), now_s).await.unwrap().status().as_u16(), 200);
    let replay = send(body("filed"), now_s).await.unwrap();
    assert_eq!(replay.status().as_u16(), 409);
    assert!(replay.text().await.unwrap().contains("replay"));
    assert_eq!(
        send(body("filed"), now_s + 1).await.unwrap().status().as_u16(),
        200,
        "same state, fresh signature"
    );
    let skip = send(body("closed"), now_s + 2).await.unwrap();
    assert_eq!(skip.status().as_u16(), 409, "filed → closed skips the lifecycle");
    for (i, state) in ["dispatched", "handled", "feedback", "verified", "closed"].iter().enumerate()
    {
        let r = send(body(state), now_s + 3 + i as i64).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{state}: {}", r.text().await.unwrap());
    }
    let reopen = send(body("collected"), now_s + 10).await.unwrap();
    assert_eq!(reopen.status().as_u16(), 409, "a closed case does not reopen");
    assert_eq!(store.case(2).unwrap().unwrap().state, "closed");
    let huge = format!(r#"{{"case_id":2,"state":"closed","note":"{}"}}"#, "x".repeat(100_000));
    let too_large = send(huge, now_s).await.unwrap();
    assert_eq!(too_large.status().as_u16(), 413);
    let v: Value = serde_json::from_str(&too_large.text().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "too_large");
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}
