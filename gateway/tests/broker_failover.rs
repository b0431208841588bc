//! Two independent Mosquittos: the gateway holds every shard's sessions on both, and every
//! device knows both. The gateway's link to one of them freezes for 2 s (that broker goes on
//! acknowledging the devices' frames and holds them for the gateway), then that broker is
//! killed with `kill -9` and the link cut — what it held is gone — and it is not started again: the devices
//! move to the other after their backoff, and no frame the dead broker acknowledged is lost —
//! telemetry included — because every frame is confirmed end to end (urgent ones by
//! `UplinkAck`, the rest cumulatively by `UplinkWindow`) and a device resends, on the other
//! broker, what the dead one acknowledged but never delivered. The devices' own books say
//! what the brokers acknowledged: every frame they kept after its PUBACK was confirmed, or is
//! still awaiting its confirmation at the end and then must be in the gateway's stored counter
//! window. The thefts' alarms are stored once and filed as one case per stolen cover.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeSet, HashSet},
    time::Duration,
};

use gridsense_gateway::app;
use gridsense_protocol::{AlarmKind, Uplink, topic::lane_of};
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, Subscriber, fixtures};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_under_load_loses_no_alarm_and_the_devices_move_to_the_other() {
    let mut a = Mosquitto::start().unwrap();
    let b = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 91, Counts { covers: 60, drains: 40, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), a.addr());
    config.mqtt.url = String::new();
    // The gateway reaches broker A through a link the test freezes and cuts.
    let link = gridsense_tests::Link::start(a.addr()).await.unwrap();
    config.mqtt.urls = vec![format!("mqtt://{}", link.addr()), format!("mqtt://{}", b.addr())];
    config.health.max_frames_per_minute = 1_000_000;
    common::import(&config, dir.path());
    let (gateway, stop) = common::start(&config, app::wall_clock()).await;
    // Ready once one broker has every session; then the other's come up too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gateway.status.session_counts() != (2 * 129, 2 * 129) {
        let counts = gateway.status.broker_sessions();
        assert!(tokio::time::Instant::now() < deadline, "sessions per broker: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (sub_a, sub_b) =
        (Subscriber::start(a.addr()).await.unwrap(), Subscriber::start(b.addr()).await.unwrap());
    let scenario = "description = \"two brokers\"\nseed = 6\n[device_config]\nshards = 64\nreport_interval_s = 2\ndrain_deadband_mm = 0\n\
        [[theft]]\nat = \"4s\"\ncovers = 2\nmode = \"removed\"\n[[theft]]\nat = \"9s\"\ncovers = 3\nmode = \"removed\"\n";
    let (sim_dir, brokers) = (dir.path().to_owned(), [a.addr(), b.addr()]);
    let sim = tokio::spawn(async move {
        fixtures::run_two_brokers(&sim_dir, scenario, brokers, 1.0, Duration::from_secs(24)).await
    });
    // Mid-stream the gateway's link to A freezes: A acknowledges and holds for the gateway.
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    link.hold();
    let held_from = sub_a.frames().len();
    // With the second theft's alarms about to come, A dies with what it held.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    tokio::task::block_in_place(|| a.kill()).unwrap();
    link.cut();
    let held_to = sub_a.frames().len();
    let summary = sim.await.unwrap().unwrap();
    // One broker whole: ready, with a warning naming the dead one.
    let http = gateway.http.unwrap();
    let ready = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    let (code, text) = (ready.status().as_u16(), ready.text().await.unwrap());
    sub_b.settle(Duration::from_millis(500), Duration::from_secs(5)).await;
    let keys = fixtures::keys(dir.path()).unwrap();
    // What A acknowledged while its link to the gateway was frozen: it never reached the
    // gateway from A, only as the devices' copies through B.
    let held_by_a: HashSet<_> = sub_a.frames()[held_from..held_to]
        .iter()
        .filter_map(|r| {
            let raw = gridsense_protocol::RawFrame::parse(&r.payload).ok()?;
            Some((raw.header().eui, raw.header().counter))
        })
        .collect();
    let via_b: HashSet<_> = sub_b.decoded(&keys).iter().map(|(h, _)| (h.eui, h.counter)).collect();
    let held_resent = held_by_a.intersection(&via_b).count();
    // What the brokers acknowledged and passed on, as their independent subscribers saw it.
    let mut seen = HashSet::new();
    let mut urgent = HashSet::new();
    let mut stolen = BTreeSet::new();
    for (h, m) in sub_a.decoded(&keys).into_iter().chain(sub_b.decoded(&keys)) {
        if !seen.insert((h.eui, h.counter)) {
            continue;
        }
        if lane_of(&m) == gridsense_protocol::topic::Lane::Urgent {
            urgent.insert((h.eui, h.counter));
        }
        if let Uplink::AlarmRaised(r) = &m
            && r.kind == AlarmKind::CoverRemoved
        {
            stolen.insert(h.eui.to_string());
        }
    }
    let store = app::open_store(&config).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let cases = loop {
        let cases = store
            .cases(&gridsense_gateway::store::CaseFilter { limit: 100, ..Default::default() })
            .unwrap();
        if cases.len() >= stolen.len() || tokio::time::Instant::now() > deadline {
            break cases;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Settle, then count what was stored.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let totals = store.totals().unwrap();
    stop.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
    let alarms_stored = store.message_count("alarm").unwrap();
    // Every urgent kind, as stored (each frame once: the messages table is keyed by frame).
    let urgent_stored: u64 = ["alarm", "alarm_cleared", "sos", "incident_report"]
        .iter()
        .map(|k| store.message_count(k).unwrap())
        .sum();
    let urgent_sent = urgent.len() as u64;
    let alarms_seen = sub_a
        .decoded(&keys)
        .into_iter()
        .chain(sub_b.decoded(&keys))
        .filter(|(_, m)| matches!(m, Uplink::AlarmRaised(_)))
        .map(|(h, _)| (h.eui, h.counter))
        .collect::<HashSet<_>>()
        .len() as u64;
    let case_devices: BTreeSet<String> = cases.iter().map(|c| c.device_id.clone()).collect();
    // The devices' books: what a broker acknowledged was confirmed, given up, or is held.
    let books = common::Books::check(&summary, &*store);
    let c = &summary.confirm;
    let (sent, stored, lost, held_stored) =
        (books.sent, books.stored, books.lost(), books.held_stored);
    // Counted twice: an urgent frame stored more than once, a second case for one cover.
    let duplicated = urgent_stored.saturating_sub(urgent_sent)
        + (cases.len() as u64).saturating_sub(stolen.len() as u64);
    gridsense_tests::evidence!(
        "chaos: broker-kill9 sent={sent} stored={stored} lost={lost} duplicated={duplicated} (brokers=2, the gateway's link to one frozen at 6.5 s, that broker killed with kill -9 at 8.5 s under load and not restarted; {} frames it acknowledged meanwhile and never passed to the gateway, {held_resent} of them stored from the devices' copies through the other; {} frames confirmed end to end, {} still awaiting confirmation at the end of which {held_stored} in the stored window, {} given up; {} copies resent for want of a confirmation, {} dropped as duplicates; /readyz {code} with one broker dead; alarm frames a broker passed on {alarms_seen}, stored {alarms_stored}; urgent {urgent_sent}, stored {urgent_stored}; cases={} stolen={}; devices' connections {}, failed attempts {}; {} frames passed on by the brokers, {} stored in all)",
        held_by_a.len(),
        c.confirmed,
        c.held.len(),
        c.given_up,
        c.resent,
        totals.rejects.get("duplicate").copied().unwrap_or(0),
        cases.len(),
        stolen.len(),
        summary.connects,
        summary.connection_failures,
        seen.len(),
        totals.accepted,
    );
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("broker 1 of 2") && text.contains("0 of 129 sessions up"), "{text}");
    assert_eq!(stolen.len(), 5, "five covers stolen");
    assert!(sent > 300 && c.confirmed > 0, "a load: {sent} frames, {} confirmed", c.confirmed);
    assert_eq!(c.given_up, 0, "nothing given up unconfirmed");
    assert!(!held_by_a.is_empty(), "the dead broker took frames it had acknowledged with it");
    assert_eq!(held_resent, held_by_a.len(), "each came again through the other broker");
    assert_eq!(lost, 0, "every frame a broker acknowledged is stored: {books:?}");
    assert!(totals.accepted >= seen.len() as u64, "everything the brokers passed on is stored");
    assert_eq!(alarms_stored, alarms_seen, "every alarm a broker passed on, stored once");
    assert_eq!(urgent_stored, urgent_sent, "every urgent frame a broker passed on, stored once");
    assert_eq!(case_devices, stolen, "one case per stolen cover");
    assert_eq!(cases.len(), stolen.len(), "no duplicate case");
    assert!(summary.connects > 100, "the devices reconnected to the other broker: {summary:?}");
}
