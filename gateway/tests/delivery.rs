//! Delivery under platform faults, against a stand-in Open311 / webhook platform: 503s and
//! timeouts for a while, then recovery → every case delivered exactly once (a request that
//! reached the platform while the gateway timed out is found again, not re-posted); webhook
//! deliveries are signed and carry one idempotency key per entry; an SOS reaches the alert
//! channel within a second of arrival; `kill -9` of the real gateway between the alarm and
//! delivery, and during a delivery, still gives exactly one platform case per incident.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    process::Command,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use common::{
    now_device_time,
    platform::{self, API_KEY, Fault, Platform, SECRET},
    publish, removed,
};
use gridsense_gateway::{
    app,
    config::{Config, Platform as Kind},
};
use gridsense_protocol::{DeviceKey, Eui, Sos, Uplink};
use gridsense_simulator::{city::Counts, inventory};
use gridsense_tests::{Mosquitto, fixtures};

struct Setup {
    broker: Mosquitto,
    dir: tempfile::TempDir,
    keys: HashMap<Eui, DeviceKey>,
    covers: Vec<Eui>,
    beacons: Vec<Eui>,
}

fn setup(seed: u64, covers: usize, beacons: usize) -> Setup {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), seed, Counts { covers, drains: 0, beacons }).unwrap();
    let devices = inventory::load(&dir.path().join("devices.json")).unwrap();
    let of = |k| devices.iter().filter(|d| d.record.kind == k).map(|d| d.eui).collect();
    Setup {
        keys: fixtures::keys(dir.path()).unwrap(),
        covers: of(inventory::Kind::Cover),
        beacons: of(inventory::Kind::Beacon),
        broker,
        dir,
    }
}

fn config(s: &Setup, platform: Kind, url: String) -> Config {
    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{}", s.broker.addr());
    config.store.path = s.dir.path().join("gridsense.db");
    config.cases.platform = platform;
    config.cases.url = url;
    config.cases.api_key = API_KEY.into();
    config.cases.secret = SECRET.into();
    config.cases.timeout_ms = 300;
    config.cases.retry_min_ms = 100;
    config.cases.retry_max_ms = 400;
    config
}

async fn wait_for(what: &str, max: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < max, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn open311_outage_and_timeouts_then_each_case_delivered_once() {
    let s = setup(31, 6, 0);
    let platform = Platform::start().await;
    // Two 503s, then two requests the platform takes but answers too late, then healthy.
    let slow = Fault::Slow(Duration::from_millis(1_500));
    platform.then(&[Fault::Unavailable, Fault::Unavailable, slow, slow]);
    let config = config(&s, Kind::Open311, platform.open311_url());
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let at = now_device_time();
    publish(s.broker.addr(), s.covers.iter().map(|e| (*e, removed(at))).collect(), &s.keys).await;
    wait_for("six cases on the platform", Duration::from_secs(20), || {
        gateway.delivery.delivered.load(Relaxed) >= 6
    })
    .await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let requests = platform.requests();
    let keys: BTreeSet<_> =
        requests.iter().map(|r| r.form["attribute[idempotency_key]"].clone()).collect();
    assert_eq!(requests.len(), 6, "one platform case per incident: {requests:#?}");
    assert_eq!(keys.len(), 6);
    assert!(gateway.delivery.retries.load(Relaxed) >= 4, "the faults were retried");
    let store = app::open_store(&config).unwrap();
    let cases = store
        .cases(&gridsense_gateway::store::CaseFilter { limit: 100, ..Default::default() })
        .unwrap();
    let ids: BTreeSet<_> = cases.iter().map(|c| c.platform_id.clone().unwrap()).collect();
    let platform_ids: BTreeSet<_> = requests.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, platform_ids, "every case keeps the platform's id");
    for r in &requests {
        assert!(r.form["service_code"].starts_with("C01"));
        assert!(r.form.contains_key("attribute[object_code]"));
        assert!(r.form["description"].contains("[gridsense:"));
    }
    gridsense_tests::evidence!(
        "delivery: open311 6 cases, {} POSTs seen by the platform, {} retries, 0 duplicates",
        platform.inner.lock().unwrap().posts,
        gateway.delivery.retries.load(Relaxed)
    );
}

#[tokio::test]
async fn webhook_retries_503s_signs_and_delivers_sos_within_a_second() {
    let s = setup(32, 3, 1);
    let platform = Platform::start().await;
    platform.then(&[Fault::Unavailable, Fault::Unavailable, Fault::Unavailable]);
    let mut config = config(&s, Kind::Webhook, platform.hook_url());
    config.cases.alert_url = platform.hook_url();
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let at = now_device_time();
    let mut frames: Vec<_> = s.covers.iter().map(|e| (*e, removed(at))).collect();
    frames.push((s.beacons[0], Uplink::Sos(Sos { at, fix: None })));
    let sent = Instant::now();
    publish(s.broker.addr(), frames, &s.keys).await;
    wait_for("three cases and one alert", Duration::from_secs(20), || {
        gateway.delivery.delivered.load(Relaxed) >= 4
    })
    .await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();

    let hooks = platform.hooks();
    let sos: Vec<_> = hooks.iter().filter(|h| h.body["kind"] == "sos").collect();
    let cases: Vec<_> = hooks.iter().filter(|h| h.body["op"] == "create").collect();
    assert_eq!(sos.len(), 1, "{hooks:#?}");
    assert_eq!(cases.len(), 3, "{hooks:#?}");
    let keys: BTreeSet<_> = cases.iter().map(|h| h.idempotency_key.clone()).collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(platform.inner.lock().unwrap().bad_signatures, 0);
    let sos_latency = sos[0].received.duration_since(sent);
    // The 503s hit the case channel only: alerts have their own worker and queue.
    assert!(sos_latency < Duration::from_secs(1), "SOS took {sos_latency:?}");
    gridsense_tests::evidence!(
        "delivery: webhook 3 cases after 3 503s, SOS delivered {sos_latency:?} after publishing"
    );
    for h in &cases {
        assert!(h.body["service_code"].as_str().unwrap().starts_with("C01"));
        assert_eq!(h.body["crs"], "WGS84");
        assert!(h.body["onset"].as_str().unwrap().ends_with("+08:00"));
    }
}

/// The platform answers 503 for a stretch of time (seconds here, minutes under
/// `scripts/chaos`) while thefts keep coming, then recovers: every case reaches it once.
#[tokio::test]
async fn a_platform_down_for_a_while_gets_every_case_once_when_back() {
    let s = setup(33, 8, 0);
    let platform = Platform::start().await;
    platform.set(Fault::Unavailable);
    let mut config = config(&s, Kind::Webhook, platform.hook_url());
    config.cases.retry_max_ms = 2_000;
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let down = common::outage(3);
    let began = Instant::now();
    // Half the thefts at the start of the outage, the rest halfway through.
    let at = now_device_time();
    let (first, second) = s.covers.split_at(s.covers.len() / 2);
    publish(s.broker.addr(), first.iter().map(|e| (*e, removed(at))).collect(), &s.keys).await;
    tokio::time::sleep(down / 2).await;
    // Counters continue from the first publication's.
    let n = u32::try_from(first.len()).unwrap();
    common::publish_from(
        s.broker.addr(),
        second.iter().map(|e| (*e, removed(at))).collect(),
        &s.keys,
        n + 1,
    )
    .await;
    tokio::time::sleep(down.saturating_sub(began.elapsed())).await;
    let refused = gateway.delivery.retries.load(Relaxed);
    platform.set(Fault::None);
    let back = Instant::now();
    wait_for("every case after the outage", Duration::from_secs(30), || {
        gateway.delivery.delivered.load(Relaxed) >= 8
    })
    .await;
    let caught_up = back.elapsed();
    let retries = gateway.delivery.retries.load(Relaxed);
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let cases: Vec<_> = platform.hooks().into_iter().filter(|h| h.body["op"] == "create").collect();
    let keys: BTreeSet<_> = cases.iter().map(|h| h.body["case_key"].to_string()).collect();
    assert_eq!(cases.len(), 8, "one delivery per case");
    assert_eq!(keys.len(), 8, "eight distinct cases");
    assert!(refused >= 1, "the outage was never hit");
    gridsense_tests::evidence!(
        "chaos: platform-outage sent=8 stored={} lost={} duplicated={} (platform answered 503 for {down:?}: {refused} refused attempts, {retries} retries; all delivered {caught_up:?} after it came back)",
        keys.len(),
        8 - keys.len(),
        cases.len() - keys.len()
    );
}

#[tokio::test]
async fn kill_9_between_alarm_and_delivery_still_delivers_exactly_once() {
    let s = setup(33, 8, 0);
    let platform = Platform::start().await;
    platform.set(Fault::Unavailable);
    let config_path = s.dir.path().join("gridsense.toml");
    std::fs::write(
        &config_path,
        format!(
            "[mqtt]\nurl = \"mqtt://{}\"\n[store]\npath = \"{}\"\n[cases]\nplatform = \"open311\"\n\
             url = \"{}\"\napi_key = \"{API_KEY}\"\ntimeout_ms = 300\nretry_min_ms = 100\nretry_max_ms = 300\n",
            s.broker.addr(),
            s.dir.path().join("gridsense.db").display(),
            platform.open311_url()
        ),
    )
    .unwrap();
    let config = gridsense_gateway::config::load(Some(&config_path), &[]).unwrap();
    common::import(&config, s.dir.path());
    let mut child = common::gateway_process(&config_path);
    // The gateway's session is persistent: frames published before it subscribes are queued
    // for it only once it has connected once, so wait for its first connection.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let at = now_device_time();
    publish(s.broker.addr(), s.covers.iter().map(|e| (*e, removed(at))).collect(), &s.keys).await;
    // 1. The platform is down: the cases are committed, delivery keeps failing. Kill -9.
    let cases = |config: &Config| {
        app::open_store(config).and_then(|st| Ok(st.cases(&Default::default())?.len())).unwrap_or(0)
    };
    let all = || gridsense_gateway::store::CaseFilter { limit: 100, ..Default::default() };
    wait_for("eight committed cases", Duration::from_secs(20), || {
        app::open_store(&config).and_then(|st| Ok(st.cases(&all())?.len())).unwrap_or(0) == 8
    })
    .await;
    let _ = cases;
    child.kill().unwrap();
    child.wait().unwrap();
    // 2. The platform takes requests but answers late: kill -9 while requests are in flight.
    platform.set(Fault::Slow(Duration::from_secs(3)));
    child = common::gateway_process(&config_path);
    wait_for("requests in flight", Duration::from_secs(20), || platform.requests().len() >= 2)
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let in_flight = platform.requests().len();
    // 3. Healthy again: everything is delivered, nothing twice.
    platform.set(Fault::None);
    child = common::gateway_process(&config_path);
    wait_for("every case delivered", Duration::from_secs(30), || {
        app::open_store(&config)
            .and_then(|st| Ok(st.cases(&all())?.iter().all(|c| c.platform_id.is_some())))
            .unwrap_or(false)
    })
    .await;
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();

    let requests = platform.requests();
    let keys: BTreeSet<_> =
        requests.iter().map(|r| r.form["attribute[idempotency_key]"].clone()).collect();
    gridsense_tests::evidence!(
        "chaos: kill9-delivery sent=8 stored={} lost={} duplicated={} (platform took {in_flight} requests during a kill)",
        keys.len(),
        8 - keys.len(),
        requests.len() - keys.len()
    );
    assert_eq!(keys.len(), 8, "every incident reached the platform");
    assert_eq!(requests.len(), 8, "none twice: {requests:#?}");
    let store = app::open_store(&config).unwrap();
    let ids: BTreeSet<_> =
        store.cases(&all()).unwrap().into_iter().map(|c| c.platform_id.unwrap()).collect();
    let platform_ids: BTreeSet<_> = requests.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, platform_ids);
}

#[tokio::test]
async fn open311_tokens_resolve_and_platform_closures_come_back() {
    let s = setup(34, 2, 0);
    let platform = Platform::start().await;
    platform.inner.lock().unwrap().tokens = true;
    let mut config = config(&s, Kind::Open311, platform.open311_url());
    config.cases.poll_status_s = 1;
    config.downlink.poll_ms = 200;
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let at = now_device_time();
    publish(s.broker.addr(), s.covers.iter().map(|e| (*e, removed(at))).collect(), &s.keys).await;
    let store = app::open_store(&config).unwrap();
    let all = || gridsense_gateway::store::CaseFilter { limit: 10, ..Default::default() };
    wait_for("two delivered cases", Duration::from_secs(10), || {
        store.cases(&all()).unwrap().iter().filter(|c| c.platform_id.is_some()).count() == 2
    })
    .await;
    // The platform answered with tokens; the ids behind them are kept.
    let mut ids: Vec<String> =
        store.cases(&all()).unwrap().into_iter().map(|c| c.platform_id.unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["R1", "R2"]);
    // The platform closes R1: the poller records it, the gateway releases the incident.
    platform.close("R1");
    wait_for("the closure to come back", Duration::from_secs(10), || {
        store.incident_counts().unwrap().get("closed") == Some(&1)
    })
    .await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let closed: Vec<_> =
        store.cases(&all()).unwrap().into_iter().filter(|c| c.state == "closed").collect();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].platform_id.as_deref(), Some("R1"));
    let trace = store.trace(closed[0].id).unwrap();
    assert!(
        trace.iter().any(|t| t.actor == "platform" && t.detail.contains("closed")),
        "{trace:?}"
    );
}

#[tokio::test]
async fn webhook_status_callbacks_must_be_signed_and_fresh() {
    let s = setup(35, 1, 0);
    let platform = Platform::start().await;
    let mut config = config(&s, Kind::Webhook, platform.hook_url());
    config.http.listen = "127.0.0.1:0".into();
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let at = now_device_time();
    publish(s.broker.addr(), vec![(s.covers[0], removed(at))], &s.keys).await;
    wait_for("one delivered case", Duration::from_secs(10), || {
        gateway.delivery.delivered.load(Relaxed) >= 1
    })
    .await;
    let url = format!("http://{}/api/v1/platform/callback", gateway.http.unwrap());
    let now = i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let send = |body: &'static str, signature: String| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-gridsense-signature", signature)
            .body(body)
            .send()
    };
    let body = r#"{"case_id":1,"state":"dispatched","note":"sent to the water company"}"#;
    let sign = gridsense_gateway::platform::sign;
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(send(body, sign("wrong", now, body.as_bytes())).await.unwrap()), 401);
    assert_eq!(status(send(body, sign(SECRET, now - 3_600, body.as_bytes())).await.unwrap()), 401);
    assert_eq!(status(send(body, "t=1".into()).await.unwrap()), 401);
    let bad = r#"{"case_id":1,"state":"fixed"}"#;
    assert_eq!(status(send(bad, sign(SECRET, now, bad.as_bytes())).await.unwrap()), 400);
    // The lifecycle is the operator API's: a collected case is filed before it is dispatched.
    assert_eq!(status(send(body, sign(SECRET, now, body.as_bytes())).await.unwrap()), 409);
    let filed = r#"{"case_id":1,"state":"filed","note":"accepted by the platform"}"#;
    assert_eq!(status(send(filed, sign(SECRET, now, filed.as_bytes())).await.unwrap()), 200);
    assert_eq!(status(send(body, sign(SECRET, now + 1, body.as_bytes())).await.unwrap()), 200);
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let store = app::open_store(&config).unwrap();
    let case = store.case(1).unwrap().unwrap();
    assert_eq!(case.state, "dispatched");
    assert!(case.dispatched_ms.is_some(), "the handling clock started");
}

/// The requests the platform holds, grouped by the case key they carry.
fn by_key(platform: &Platform) -> HashMap<String, usize> {
    let mut keys = HashMap::new();
    for r in platform.requests() {
        *keys.entry(r.form["attribute[idempotency_key]"].clone()).or_default() += 1;
    }
    keys
}

/// A platform without search (404 on `GET /requests.json`): after a burst of 503s every
/// attempt was uncertain, and no look-up can answer — the cases are posted again with their
/// marker instead of being dead-lettered.
#[tokio::test]
async fn a_platform_without_search_still_gets_every_case_after_a_503_burst() {
    let s = setup(36, 7, 0);
    let platform = Platform::start().await;
    platform.inner.lock().unwrap().search = platform::Search::Unsupported;
    platform.then(&[Fault::Unavailable; 7]);
    let config = config(&s, Kind::Open311, platform.open311_url());
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let at = now_device_time();
    publish(s.broker.addr(), s.covers.iter().map(|e| (*e, removed(at))).collect(), &s.keys).await;
    wait_for("seven cases on the platform", Duration::from_secs(20), || {
        gateway.delivery.delivered.load(Relaxed) >= 7
    })
    .await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let keys = by_key(&platform);
    let inner = platform.inner.lock().unwrap();
    assert_eq!(keys.len(), 7, "every case arrived: {keys:?}");
    assert!(keys.values().all(|n| *n == 1), "none twice (503s were never stored): {keys:?}");
    assert_eq!(gateway.delivery.dead.load(Relaxed), 0, "nothing dead-lettered");
    assert!(gateway.delivery.resent_unverified.load(Relaxed) >= 1);
    gridsense_tests::evidence!(
        "delivery: open311 without search after 7×503: 7 of 7 cases arrived once, {} POSTs, {} searches refused, {} re-sent without a look-up, 0 dead letters",
        inner.posts,
        inner.searches,
        gateway.delivery.resent_unverified.load(Relaxed)
    );
    // The trace says why the case was posted again.
    let store = app::open_store(&config).unwrap();
    let noted = (1..=7).any(|id| {
        store.trace(id).unwrap().iter().any(|t| t.detail.contains("re-sent without a look-up"))
    });
    assert!(noted, "no trace note for the unverified re-send");
}

/// A platform whose clock is behind ours stores a request "before" the case was detected; the
/// look-up after an uncertain attempt must still find it (its window opens an hour early), so
/// the case is not posted twice.
#[tokio::test]
async fn a_platform_clock_behind_ours_does_not_duplicate_a_case() {
    for skew_s in [1, 5, 60] {
        let s = setup(37, 4, 0);
        let platform = Platform::start().await;
        platform.inner.lock().unwrap().skew_ms = -skew_s * 1_000;
        // The first two POSTs are taken but answered too late: uncertain, looked up.
        let slow = Fault::Slow(Duration::from_millis(1_500));
        platform.then(&[slow, slow]);
        let config = config(&s, Kind::Open311, platform.open311_url());
        common::import(&config, s.dir.path());
        let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
        let at = now_device_time();
        publish(s.broker.addr(), s.covers.iter().map(|e| (*e, removed(at))).collect(), &s.keys)
            .await;
        wait_for("four cases delivered", Duration::from_secs(20), || {
            gateway.delivery.delivered.load(Relaxed) >= 4
        })
        .await;
        stop_tx.send(true).unwrap();
        gateway.task.await.unwrap().unwrap();
        let keys = by_key(&platform);
        let posts = platform.inner.lock().unwrap().posts;
        assert_eq!(keys.len(), 4, "skew {skew_s} s: {keys:?}");
        assert!(keys.values().all(|n| *n == 1), "skew {skew_s} s: a case posted twice: {keys:?}");
        gridsense_tests::evidence!(
            "delivery: open311 clock {skew_s} s behind, 2 answers too late: 4 of 4 cases once, {posts} POSTs"
        );
    }
}

/// One request that hangs holds back only its own case: the others are delivered meanwhile,
/// and one case's entries still go out in order (its creation before its recovery).
#[tokio::test]
async fn a_hanging_request_does_not_hold_back_other_cases() {
    let s = setup(38, 6, 0);
    let platform = Platform::start().await;
    platform.then(&[Fault::Slow(Duration::from_secs(4))]);
    let mut config = config(&s, Kind::Webhook, platform.hook_url());
    config.cases.timeout_ms = 10_000;
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let at = now_device_time();
    // The first cover is stolen and put back: its case's creation, then its recovery.
    publish(s.broker.addr(), vec![(s.covers[0], removed(at))], &s.keys).await;
    wait_for("the first request hanging", Duration::from_secs(10), || {
        platform.inner.lock().unwrap().posts >= 1
    })
    .await;
    let hung = Instant::now();
    let cleared = Uplink::AlarmCleared(gridsense_protocol::AlarmCleared {
        kind: gridsense_protocol::AlarmKind::CoverRemoved,
        value: 0,
        since: at,
        at: now_device_time(),
    });
    common::publish_from(s.broker.addr(), vec![(s.covers[0], cleared)], &s.keys, 2).await;
    publish(s.broker.addr(), s.covers[1..].iter().map(|e| (*e, removed(at))).collect(), &s.keys)
        .await;
    wait_for("the other five cases", Duration::from_secs(3), || {
        platform.hooks().iter().filter(|h| h.body["op"] == "create").count() >= 5
    })
    .await;
    assert!(hung.elapsed() < Duration::from_secs(4), "the others waited for the hanging request");
    wait_for("the first case and its recovery", Duration::from_secs(15), || {
        platform.hooks().iter().filter(|h| h.body["case_id"] == 1).count() >= 2
    })
    .await;
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let first: Vec<String> = platform
        .hooks()
        .iter()
        .filter(|h| h.body["case_id"] == 1)
        .map(|h| h.body["op"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(first, ["create", "recovered"], "one case's entries in order");
    // Detection to delivery of the other cases, while the first request hung.
    let store = app::open_store(&config).unwrap();
    let all = gridsense_gateway::store::CaseFilter { limit: 10, ..Default::default() };
    let worst = store
        .cases(&all)
        .unwrap()
        .iter()
        .filter(|c| c.id != 1)
        .map(|c| c.delivered_ms.unwrap() - c.detected_ms)
        .max()
        .unwrap();
    gridsense_tests::evidence!(
        "delivery: one request hanging 4 s: the other 5 cases delivered at most {worst} ms after detection meanwhile; its own recovery waited for it"
    );
}

/// A catalogue without the cover class: the case is dead-lettered before it is posted, with
/// the reason, counted and shown in /readyz; once the platform offers the service an operator
/// puts it back (API, then CLI for the rest) and it is delivered.
#[tokio::test]
async fn cases_the_platform_does_not_offer_are_dead_lettered_with_the_reason_and_redelivered() {
    let s = setup(39, 3, 0);
    let platform = Platform::start().await;
    let service = |code: &str, attributes: Option<Vec<(String, bool)>>| platform::Service {
        code: code.into(),
        attributes,
    };
    platform.inner.lock().unwrap().services =
        Some(vec![service("E0404", None), service("E0406", Some(vec![("photo".into(), true)]))]);
    let mut config = config(&s, Kind::Open311, platform.open311_url());
    config.cases.services_refresh_s = 1;
    config.http.listen = "127.0.0.1:0".into();
    config.http.auth = "off".into();
    common::import(&config, s.dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let http = gateway.http.unwrap();
    let at = now_device_time();
    publish(s.broker.addr(), s.covers.iter().map(|e| (*e, removed(at))).collect(), &s.keys).await;
    wait_for("three dead letters", Duration::from_secs(10), || {
        gateway.delivery.dead.load(Relaxed) >= 3
    })
    .await;
    assert_eq!(platform.inner.lock().unwrap().posts, 0, "nothing posted that it cannot take");
    let store = app::open_store(&config).unwrap();
    let dead = store.outbox(None, Some("dead"), 10).unwrap();
    assert_eq!(dead.len(), 3);
    let why = dead[0].last_error.clone().unwrap();
    assert!(why.contains("does not offer service_code C01"), "{why}");
    let ready = reqwest::get(format!("http://{http}/readyz")).await.unwrap().text().await.unwrap();
    assert!(ready.starts_with("ready (warnings: the platform does not offer"), "{ready}");
    assert!(ready.contains("dead-lettered") && ready.contains("C01"), "{ready}");
    let metrics =
        reqwest::get(format!("http://{http}/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("gridsense_delivery_unsupported_total{what=\"service_code C01"),
        "{metrics}"
    );
    // The platform now offers the class; an operator retries one entry by the API …
    let class = store.case(dead[0].subject).unwrap().unwrap().class_code;
    platform.inner.lock().unwrap().services.as_mut().unwrap().push(service(&class, None));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let client = reqwest::Client::new();
    let retried = client
        .post(format!("http://{http}/api/v1/outbox/{}/retry", dead[0].id))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let again = client
        .post(format!("http://{http}/api/v1/outbox/{}/retry", dead[0].id))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409, "a pending entry is not dead-lettered");
    wait_for("the retried case", Duration::from_secs(10), || platform.requests().len() == 1).await;
    // … and the rest by the CLI (those of another class stay dead if still unoffered).
    for d in &dead[1..] {
        let c = store.case(d.subject).unwrap().unwrap().class_code;
        let mut inner = platform.inner.lock().unwrap();
        let list = inner.services.as_mut().unwrap();
        if !list.iter().any(|x| x.code == c) {
            list.push(service(&c, None));
        }
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let config_path = s.dir.path().join("gridsense.toml");
    std::fs::write(&config_path, format!("[store]\npath = \"{}\"\n", config.store.path.display()))
        .unwrap();
    let out = common::cli(&config_path, &["cases", "redeliver", "--dead"]);
    assert!(out.contains("2 entries back in the queue"), "{out}");
    wait_for("every case delivered", Duration::from_secs(10), || platform.requests().len() == 3)
        .await;
    let trace = store.trace(dead[0].subject).unwrap();
    assert!(trace.iter().any(|t| t.detail.contains("requeued")), "{trace:?}");
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    gridsense_tests::evidence!(
        "delivery: open311 catalogue without {class}: 3 dead-lettered before any POST (reason in /readyz and metrics), redelivered by API and CLI: 3 POSTs, 3 cases"
    );
}
