//! One contract, two backends: the same store tests against SQLite and against a real
//! PostgreSQL (Debian's server, a private cluster on a free loopback port, one database per
//! case copied from a migrated template). Covers the interfaces both backends implement
//! today: the ingest commit and restore, the registry and its change feed, tokens,
//! maintenance windows, the telemetry buffer, and opening (newer schema, wrong key, bad URL,
//! unreachable server, wrong password).

#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::path::Path;

use gridsense_common::inventory::Device as InventoryDevice;
use gridsense_gateway::{
    config::Synchronous,
    downlink::{Request, RequestUpdate},
    health::{DeviceHealth, EventKind, HealthEvent},
    registry::Kind,
    store::{
        AuditRecord, Batch, CaseBoard, DeviceFilter, Governance, IngestStore, Leases, Maintenance,
        Outbox, Point, Queries, RecentFrame, Registry, Store, StoreError, TelemetryBuffer, Tokens,
        postgres::PgStore,
    },
};
use gridsense_protocol::{CounterWindow, DeviceKey, Eui};
use gridsense_tests::postgres::Postgres;

/// What both backends implement.
trait Contract:
    IngestStore
    + Registry
    + Tokens
    + Maintenance
    + TelemetryBuffer
    + Queries
    + Outbox
    + CaseBoard
    + Governance
{
}
impl<
    T: IngestStore
        + Registry
        + Tokens
        + Maintenance
        + TelemetryBuffer
        + Queries
        + Outbox
        + CaseBoard
        + Governance,
> Contract for T
{
}

/// Opens a fresh store of one backend (`buffer`: telemetry goes to the sink's buffer, at most
/// that many points); `reopen` opens the same one again.
trait Backend {
    fn name(&self) -> &'static str;
    fn fresh(&mut self, buffer: Option<u64>) -> Box<dyn Contract>;
    fn reopen(&mut self) -> Box<dyn Contract>;
}

struct Sqlite {
    dir: tempfile::TempDir,
    n: u32,
}

impl Backend for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    fn fresh(&mut self, buffer: Option<u64>) -> Box<dyn Contract> {
        self.n += 1;
        let mut s = Store::open(&self.path(), Synchronous::Normal, 3).expect("sqlite");
        if let Some(b) = buffer {
            s.buffer_telemetry(b);
        }
        Box::new(s)
    }
    fn reopen(&mut self) -> Box<dyn Contract> {
        Box::new(Store::open(&self.path(), Synchronous::Normal, 3).expect("sqlite reopen"))
    }
}

impl Sqlite {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join(format!("s{}.db", self.n))
    }
}

struct Pg {
    pg: Postgres,
    template: String,
    url: String,
    dir: tempfile::TempDir,
}

impl Backend for Pg {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn fresh(&mut self, buffer: Option<u64>) -> Box<dyn Contract> {
        self.url = self.pg.database(Some(&self.template)).expect("database");
        let mut s = PgStore::open(&self.url, &self.dir.path().join("k"), 3).expect("postgres");
        if let Some(b) = buffer {
            s.buffer_telemetry(b);
        }
        Box::new(s)
    }
    fn reopen(&mut self) -> Box<dyn Contract> {
        Box::new(PgStore::open(&self.url, &self.dir.path().join("k"), 3).expect("pg reopen"))
    }
}

fn inventory(n: u64, seed: u8) -> Vec<InventoryDevice> {
    let records: Vec<serde_json::Value> = (1..=n)
        .map(|i| {
            serde_json::json!({
                "eui": format!("{:016x}", 0x2102_0201_0000_0000_u64 + i),
                "kind": if i % 2 == 0 { "drain" } else { "cover" },
                "key": hex::encode([seed.wrapping_add(u8::try_from(i).unwrap()); 16]),
                "mqtt_password": format!("password-{seed}-{i}"),
                "lat": 38.9 + i as f64 * 1e-3,
                "lon": 121.6,
                "component_code": format!("21020201060{i:05}"),
                "minor_class": "0106",
                "warn_mm": 150,
                "alarm_mm": 300,
                "well_depth_mm": 2000
            })
        })
        .collect();
    gridsense_common::inventory::parse("inv.json", &serde_json::Value::Array(records).to_string())
        .expect("inventory")
}

fn point(eui: u64, at_ms: i64, value: f64) -> Point {
    Point {
        eui: Eui(eui),
        kind: Kind::Drain,
        measurement: "drain",
        field: "level_mm",
        at_ms,
        value,
        grid: Some("g1".into()),
        street: None,
    }
}

fn registry_and_change_feed(b: &mut dyn Backend) {
    let mut s = b.fresh(None);
    let start = s.registry_position().expect("position");
    let devices = inventory(4, 1);
    let r = s.import(&devices, 10).expect("import");
    assert_eq!((r.added, r.updated, r.unchanged), (4, 0, 0));
    let r = s.import(&devices, 11).expect("again");
    assert_eq!((r.added, r.updated, r.unchanged), (0, 0, 4), "idempotent");
    let mut moved = inventory(4, 1);
    if let Some(d) = moved.first_mut() {
        d.record.lat += 0.01;
    }
    let r = s.import(&moved, 12).expect("moved");
    assert_eq!((r.added, r.updated, r.unchanged), (0, 1, 3));
    let mut keys: Vec<(Eui, [u8; 16])> =
        s.registry().expect("registry").iter().map(|r| (r.eui, *r.key.expose_bytes())).collect();
    keys.sort();
    let want: Vec<(Eui, [u8; 16])> =
        devices.iter().map(|d| (d.eui, *d.key.expose_bytes())).collect();
    assert_eq!(keys, want);
    let creds = s.credentials().expect("credentials");
    assert_eq!(creds.len(), 4);
    assert!(creds.iter().any(|(u, p)| u == &devices[0].record.eui && p == "password-1-1"));

    let (pos, changes) = s.registry_changes(start).expect("changes");
    assert!(pos > start);
    assert_eq!(changes.len(), 4, "every imported device");
    assert!(changes.iter().all(|c| c.active.is_some()));
    assert_eq!(s.registry_changes(pos).expect("none").1.len(), 0, "nothing after the position");

    let [a, b2, c, _] = [devices[0].eui, devices[1].eui, devices[2].eui, devices[3].eui];
    assert!(s.retire(a, 20).expect("retire"));
    assert!(!s.retire(a, 21).expect("retire twice"));
    let (pos2, changes) = s.registry_changes(pos).expect("changes");
    assert_eq!(changes.len(), 1);
    assert!(changes.iter().all(|c| c.eui == a && c.active.is_none()), "retired");
    assert_eq!(s.device_status(a).expect("status").as_deref(), Some("retired"));

    let mut batch = Batch::default();
    let mut w = CounterWindow::new();
    w.accept(7);
    batch.counters.insert(b2, w);
    s.commit(&batch).expect("commit");
    let new_key = DeviceKey::from_bytes([0xaa; 16]);
    assert!(s.rekey(b2, &new_key, 30).expect("rekey"));
    assert!(s.counters().expect("counters").iter().all(|(e, _)| *e != b2), "a new counter space");
    let (_, changes) = s.registry_changes(pos2).expect("rekey change");
    let k = changes.iter().find(|ch| ch.eui == b2).and_then(|ch| ch.active.as_ref());
    assert_eq!(k.map(|(k, _, _)| *k.expose_bytes()), Some([0xaa; 16]));

    let new = Eui(0x2102_0201_0000_9003);
    assert!(s.replace(c, new, &DeviceKey::from_bytes([0xbb; 16]), "newpw", 40).expect("replace"));
    assert_eq!(s.device_status(c).expect("old").as_deref(), Some("replaced"));
    assert_eq!(s.device_status(new).expect("new").as_deref(), Some("active"));
    assert!(s.credentials().expect("creds").iter().any(|(_, p)| p == "newpw"));
    let sites = {
        let mut n = 0;
        s.each_site(&mut |_, _, attrs| {
            assert_eq!(attrs.alarm_mm, Some(300.0));
            n += 1;
        })
        .expect("sites");
        n
    };
    assert_eq!(sites, 3, "active devices: two left of the four, and the replacement");
    assert!(s.relocate(new, 39.0, 121.0, 50).expect("relocate"));
    assert!(s.locations().expect("loc").iter().any(|(e, lat, _)| *e == new && *lat == 39.0));
}

fn commit_and_restore(b: &mut dyn Backend) {
    let mut s = b.fresh(None);
    let devices = inventory(2, 3);
    s.import(&devices, 0).expect("import");
    let d = devices[1].eui;
    let mut batch = Batch::default();
    let mut w = CounterWindow::new();
    w.accept(41);
    w.accept(39);
    batch.counters.insert(d, w);
    let mut h = DeviceHealth::new(Kind::Drain);
    h.last_seen_ms = Some(1_000);
    h.last_counter = Some(41);
    h.battery_mv = Some(3_550);
    h.rssi_dbm = Some(-97);
    h.temperature_dc = Some(-35);
    h.firmware = Some("1.2.3".into());
    h.frames = 2;
    h.online = true;
    h.deadline_ms = Some(99_000);
    batch.health.insert(d, h.clone());
    batch.events.push(HealthEvent { eui: d, at_ms: 1_000, kind: EventKind::Online });
    batch.telemetry.push(point(d.0, 1_000, 5.0));
    batch.telemetry.push(point(d.0, 1_000, 6.0));
    batch.recent.push(RecentFrame {
        eui: d,
        counter: 41,
        received_ms: 1_000,
        kind: "drain_reading",
        samples: 2,
    });
    batch.audit = (0..5)
        .map(|n| AuditRecord {
            received_ms: n,
            topic: "gridsense/x/up".into(),
            reason: "bad_tag",
            eui: Some(d),
            raw: vec![u8::try_from(n).unwrap(); 8],
        })
        .collect();
    *batch.rejects.entry("bad_tag").or_default() += 5;
    batch.downlink_counters.insert(d, 9);
    batch.accepted = 2;
    let id = s.add_request(d, &Request::StatusRequest, 500).expect("request");
    batch.request_updates.push(RequestUpdate::Sent { id, counter: 9, at_ms: 900, attempts: 1 });
    s.commit(&batch).expect("commit");
    assert_eq!(s.open_requests(0).expect("open").len(), 1);
    // The same batch again (a redelivery after a crash): nothing doubles, nothing fails.
    s.commit(&batch).expect("commit again");
    let mut done = Batch::default();
    done.request_updates.push(RequestUpdate::Done { id, at_ms: 950, outcome: "sent" });
    let mut lower = Batch::default();
    lower.downlink_counters.insert(d, 4);
    s.commit(&done).expect("done");
    s.commit(&lower).expect("a lower downlink counter");
    drop(s);

    let s = b.reopen();
    assert_eq!(s.counters().expect("counters"), vec![(d, w)]);
    let mut healths = Vec::new();
    s.each_health(&mut |e, h| healths.push((e, h))).expect("health");
    assert_eq!(healths, vec![(d, h)]);
    assert_eq!(s.downlink_counters().expect("dl"), vec![(d, 9)], "never goes back");
    assert_eq!(s.request_outcome(id).expect("outcome").as_deref(), Some("sent"));
    assert!(s.open_requests(0).expect("open").is_empty());
    assert_eq!(s.sequences().expect("seq").case, 0);
    assert!(s.open_incidents().expect("incidents").is_empty());
}

fn telemetry_buffer(b: &mut dyn Backend) {
    let mut s = b.fresh(Some(3));
    let batch =
        Batch { telemetry: (0..5).map(|n| point(1, n, n as f64)).collect(), ..Batch::default() };
    s.commit(&batch).expect("commit");
    assert_eq!(s.buffer_len().expect("len"), 3, "bounded: the oldest dropped");
    let read = s.buffer_read(10).expect("read");
    assert_eq!(read.iter().map(|p| p.at_ms).collect::<Vec<_>>(), vec![2, 3, 4], "oldest first");
    let first = read.first().map_or(0, |p| p.id);
    s.buffer_delete_through(first).expect("delete");
    assert_eq!(s.buffer_len().expect("len"), 2);
    assert_eq!(read.first().and_then(|p| p.grid.clone()).as_deref(), Some("g1"));
}

/// Telemetry past its retention goes; what is within it stays. Cut at a UTC day boundary, both
/// backends agree (PostgreSQL drops whole days, SQLite rows).
fn telemetry_retention(b: &mut dyn Backend) {
    const DAY: i64 = 86_400_000;
    let mut s = b.fresh(None);
    let day = 20_000 * DAY;
    let at = [day - 3 * DAY + 5, day - DAY, day - 1, day, day + 3_600_000, day + 2 * DAY + 7];
    let telemetry = at.iter().map(|t| point(1, *t, 1.0)).collect();
    s.commit(&Batch { telemetry, ..Batch::default() }).expect("commit");
    assert_eq!(s.telemetry_count(None).expect("count"), 6);
    assert_eq!(s.prune_telemetry(day, day + 3_600_000).expect("prune"), 3, "the three before");
    assert_eq!(s.telemetry_count(None).expect("count"), 3);
    assert_eq!(s.prune_telemetry(day, day + 3_600_000).expect("again"), 0, "nothing twice");
    // Samples that arrive later for days already made (or not) are stored and pruned alike.
    let late = vec![point(2, day + 5, 2.0), point(2, day + 40 * DAY, 2.0)];
    s.commit(&Batch { telemetry: late, ..Batch::default() }).expect("commit");
    assert_eq!(s.telemetry_count(None).expect("count"), 5);
    assert_eq!(s.prune_telemetry(day + DAY, day + DAY).expect("prune"), 3, "day's three");
}

fn shards_are_fixed_when_the_store_is_made(b: &mut dyn Backend) {
    let s = b.fresh(None);
    assert_eq!(s.fix_shards(64).expect("first start records it"), 64);
    assert_eq!(s.fix_shards(64).expect("the same again"), 64);
    drop(s);
    let s = b.reopen();
    let e = s.fix_shards(32).expect_err("another number");
    assert!(matches!(e, StoreError::Shards { stored: 64, configured: 32 }), "{e}");
    assert!(e.to_string().contains("set cluster.shards = 64"), "{e}");
}

fn tokens_and_windows(b: &mut dyn Backend) {
    let mut s = b.fresh(None);
    assert!(s.add_token("ops", "operator", "h1", 1).expect("add"));
    assert!(!s.add_token("ops", "read", "h2", 2).expect("name taken"));
    assert_eq!(s.token_role("h1").expect("role"), Some(("ops".into(), "operator".into())));
    assert!(s.revoke_token("ops", 3).expect("revoke"));
    assert!(!s.revoke_token("ops", 4).expect("revoked already"));
    assert_eq!(s.token_role("h1").expect("role"), None);
    assert_eq!(s.tokens().expect("list"), vec![("ops".into(), "operator".into(), 1, Some(3))]);
    let w1 = s.add_window("2102020100000001", 0, 100, "pump", 0).expect("window");
    let w2 = s.add_window("210202", 50, 200, "works", 0).expect("window");
    assert!(w2 > w1);
    let open: Vec<i64> = s.windows(150).expect("windows").iter().map(|w| w.id).collect();
    assert_eq!(open, vec![w2]);
}

fn placements_are_rewritten_only_when_they_change(b: &mut dyn Backend) {
    let mut s = b.fresh(None);
    let devices = inventory(2, 6);
    s.import(&devices, 0).expect("import");
    let (d1, d2) = (devices[0].eui, devices[1].eui);
    let in_grid = |s: &dyn Contract, g: &str| {
        s.devices(&DeviceFilter {
            grid: Some(g.into()),
            page: 1,
            per_page: 10,
            ..DeviceFilter::default()
        })
        .expect("devices")
        .total
    };
    let write = |s: &mut Box<dyn Contract>, rows: Vec<(Eui, &str)>| {
        s.write_placements(&mut rows.into_iter().map(|(e, g)| (e, g, "c1", "s1", None)))
            .expect("placements");
    };
    write(&mut s, vec![(d1, "g1"), (d2, "g1")]);
    assert_eq!(in_grid(&*s, "g1"), 2);
    write(&mut s, vec![(d1, "g1"), (d2, "g1")]);
    assert_eq!(in_grid(&*s, "g1"), 2, "unchanged: the same");
    write(&mut s, vec![(d1, "g2"), (d2, "g1")]);
    assert_eq!((in_grid(&*s, "g1"), in_grid(&*s, "g2")), (1, 1), "a moved device rewritten");
    write(&mut s, vec![(d2, "g1")]);
    assert_eq!((in_grid(&*s, "g1"), in_grid(&*s, "g2")), (1, 0), "an unplaced device removed");
}

fn the_outbox_delivers_retries_gives_up_and_requeues(b: &mut dyn Backend) {
    use gridsense_gateway::cases::{AlertRow, OutboxRow};
    let mut s = b.fresh(None);
    let mut batch = Batch::default();
    for id in [1, 2] {
        batch.cases.alerts.push(AlertRow {
            id,
            eui: Eui(40 + id as u64),
            at_ms: 100,
            received_ms: 110,
            position: Some((38.9, 121.6)),
            grid_code: Some("g1".into()),
        });
        batch.cases.outbox.push(OutboxRow {
            channel: "alert",
            subject: id,
            op: "create",
            at_ms: 120,
        });
    }
    s.commit(&batch).expect("commit");
    assert_eq!(s.outbox_next_due("alert").expect("next"), Some(120));
    assert!(s.outbox_due("alert", 119, 10).expect("due").is_empty(), "not due before its time");
    let due = s.outbox_due("alert", 120, 10).expect("due");
    assert_eq!(due.iter().map(|e| e.subject).collect::<Vec<_>>(), vec![1, 2], "in order");
    let (first, second) = (&due[0], &due[1]);
    assert!(s.outbox_begin(first, 120).expect("begin"), "claimed");
    s.outbox_done(first, "webhook", None, 130).expect("done");
    assert_eq!(s.alert(1).expect("alert").and_then(|a| a.delivered_ms), Some(130));
    assert!(s.outbox_begin(second, 120).expect("begin"), "claimed");
    s.outbox_failed(second, "503", Some(500), 140).expect("retry later");
    assert!(s.outbox_due("alert", 499, 10).expect("due").is_empty());
    let again = s.outbox_due("alert", 500, 10).expect("due");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
    s.outbox_failed(&again[0], "gave up", None, 510).expect("dead");
    assert_eq!(s.outbox_state(again[0].id).expect("state").as_deref(), Some("dead"));
    let counts = s.outbox_counts().expect("counts");
    assert_eq!((counts.get("done"), counts.get("dead")), (Some(&1), Some(&1)), "{counts:?}");
    let views = s.outbox(None, Some("dead"), 10).expect("views");
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].last_error.as_deref(), Some("gave up"));
    assert_eq!(s.outbox_retry(None, "operator:li", 600).expect("retry"), vec![again[0].id]);
    assert_eq!(s.outbox_due("alert", 600, 10).expect("due").len(), 1, "requeued");
}

/// Departments, returns, supervision and the report's facts: a case filed, dispatched,
/// returned twice (re-routed in between) escalates once for its returns; the report reads its
/// first filing and dispatch, its counts and levels; workers and check-ins round-trip.
fn the_governance_loop(b: &mut dyn Backend) {
    use gridsense_gateway::{
        assessment::Worker,
        calendar::{Calendar, Limit},
        cases::{CaseRow, CaseState, CaseTables, PatrolRow, Place, governance::Level},
    };
    const HOUR: i64 = 3_600_000;
    let mut s = b.fresh(None);
    let tables = CaseTables::default();
    let cal = Calendar::new(&tables.calendar).expect("calendar");
    let t0 = 1_796_000_000_000; // 2026-11-30
    let mut batch = Batch::default();
    batch.cases.cases.push(CaseRow {
        id: 7,
        incident_id: None,
        key: "k7".into(),
        eui: Eui(0x77),
        class_code: "C0111".into(),
        class_name: "燃气井盖".into(),
        title: "井盖移位".into(),
        object_code: Some("2102020111000007".into()),
        lat: 38.9,
        lon: 121.6,
        place: Place {
            grid_code: Some("210202001001001".into()),
            community_code: Some("210202001001".into()),
            street_code: Some("210202001".into()),
            district_code: Some("210202".into()),
            ..Place::default()
        },
        description: "d".into(),
        urgency: "high",
        source: "IoT",
        onset_ms: t0,
        detected_ms: t0,
        limit: Limit::Hours(6),
        department: "PS".into(),
        level: Level::Community,
        handling_due_ms: t0 + 6 * HOUR,
        deploy_due_ms: t0 + 24 * HOUR,
        feedback_due_ms: t0 + 72 * HOUR,
    });
    batch.cases.patrols.push(PatrolRow {
        eui: Eui(0xb1),
        at_ms: t0 + HOUR,
        day: "2026-11-30".into(),
        checkpoint: 3,
        grid_code: Some("210202001001001".into()),
    });
    s.commit(&batch).expect("commit");
    let view = s.case(7).expect("case").expect("stored");
    assert_eq!((view.department.as_deref(), view.level.as_str()), (Some("PS"), "community"));
    let go = |s: &mut Box<dyn Contract>, to: CaseState, at: i64| {
        s.transition(7, to, "operator:li", "", at, &cal).expect("store").expect("legal");
    };
    go(&mut s, CaseState::Filed, t0 + HOUR);
    go(&mut s, CaseState::Dispatched, t0 + 2 * HOUR);
    go(&mut s, CaseState::Returned, t0 + 3 * HOUR);
    assert!(s.route(7, "RQ", "operator:li", "gas cover", t0 + 3 * HOUR).expect("route"));
    assert!(!s.route(99, "RQ", "operator:li", "", t0).expect("route"), "no case 99");
    go(&mut s, CaseState::Dispatched, t0 + 4 * HOUR);
    // Within every deadline: no escalation yet.
    assert_eq!(s.supervise(&tables, &cal, t0 + 4 * HOUR).expect("supervise"), vec![]);
    go(&mut s, CaseState::Returned, t0 + 5 * HOUR);
    let escalated = s.supervise(&tables, &cal, t0 + 5 * HOUR).expect("supervise");
    assert_eq!(escalated.len(), 1, "{escalated:?}");
    assert_eq!((escalated[0].from, escalated[0].to), (Level::Community, Level::Street));
    assert_eq!(escalated[0].causes, vec!["returned"]);
    assert!(s.supervise(&tables, &cal, t0 + 5 * HOUR).expect("again").is_empty(), "once");
    let view = s.case(7).expect("case").expect("stored");
    assert_eq!(
        (view.department.as_deref(), view.level.as_str(), view.first_level.as_str(), view.returns),
        (Some("RQ"), "street", "community", 2)
    );
    let trace: Vec<String> = s.trace(7).expect("trace").into_iter().map(|e| e.detail).collect();
    assert!(trace.iter().any(|d| d.contains("routed PS → RQ")), "{trace:?}");
    assert!(trace.iter().any(|d| d.contains("escalated community → street")), "{trace:?}");
    assert_eq!(s.outbox(Some(7), None, 10).expect("outbox").len(), 1, "the platform hears");
    let facts = s.report_cases(t0, t0 + 24 * HOUR).expect("facts");
    assert_eq!(facts.len(), 1);
    let f = &facts[0];
    assert_eq!(
        (f.filed_ms, f.first_dispatched_ms, f.dispatched_ms),
        (Some(t0 + HOUR), Some(t0 + 2 * HOUR), Some(t0 + 4 * HOUR))
    );
    assert_eq!(
        (f.returns, f.reworks, f.level, f.first_level),
        (2, 0, Level::Street, Level::Community)
    );
    assert_eq!((f.state, f.object.as_str()), (CaseState::Returned, "2102020111000007"));
    assert!(s.report_cases(t0 + 1, t0 + HOUR).expect("facts").is_empty(), "detected before");
    let w = Worker {
        id: "W1".into(),
        name: "张三".into(),
        grid_code: "210202001001001".into(),
        beacon: "00000000000000B1".into(),
        valid_from: "2026-11-01".into(),
        valid_to: String::new(),
    };
    assert_eq!(s.put_workers(std::slice::from_ref(&w)).expect("put"), 1);
    assert_eq!(s.put_workers(&[Worker { name: "张三丰".into(), ..w }]).expect("put"), 1);
    let ws = s.workers().expect("workers");
    assert_eq!(
        ws.iter().map(|w| (w.name.as_str(), w.beacon.as_str())).collect::<Vec<_>>(),
        [("张三丰", "00000000000000b1")]
    );
    let checkins = s.report_checkins(t0, t0 + 24 * HOUR).expect("checkins");
    assert_eq!(checkins.len(), 1);
    assert_eq!(checkins[0].eui, "00000000000000b1");
    assert!(s.report_devices().expect("devices").is_empty(), "none registered");
    assert!(s.report_areas().expect("areas").is_empty(), "none placed");
    // Devices count in the grid the layer placed them in; without a layer configured, the
    // report's areas are those the devices were placed in.
    let devices = inventory(2, 7);
    s.import(&devices, 0).expect("import");
    s.write_placements(
        &mut devices.iter().map(|d| (d.eui, "210202001001001", "210202001001", "210202001", None)),
    )
    .expect("placements");
    let placed = s.report_devices().expect("devices");
    assert_eq!(placed.len(), 2);
    assert!(placed.iter().all(|d| d.grid_code.as_deref() == Some("210202001001001")), "{placed:?}");
    let areas = s.report_areas().expect("areas");
    assert_eq!(
        areas
            .iter()
            .map(|a| (&*a.grid_code, &*a.community_code, &*a.street_code))
            .collect::<Vec<_>>(),
        [("210202001001001", "210202001001", "210202001")]
    );
}

type Case = fn(&mut dyn Backend);
const CASES: [(&str, Case); 9] = [
    ("the_governance_loop", the_governance_loop),
    (
        "the_outbox_delivers_retries_gives_up_and_requeues",
        the_outbox_delivers_retries_gives_up_and_requeues,
    ),
    (
        "placements_are_rewritten_only_when_they_change",
        placements_are_rewritten_only_when_they_change,
    ),
    ("registry_and_change_feed", registry_and_change_feed),
    ("commit_and_restore", commit_and_restore),
    ("telemetry_buffer", telemetry_buffer),
    ("telemetry_retention", telemetry_retention),
    ("shards_are_fixed_when_the_store_is_made", shards_are_fixed_when_the_store_is_made),
    ("tokens_and_windows", tokens_and_windows),
];

fn run_all(b: &mut dyn Backend) {
    for (name, case) in CASES {
        eprintln!("contract ({}): {name}", b.name());
        case(b);
    }
}

#[test]
fn the_contract_on_sqlite() {
    run_all(&mut Sqlite { dir: tempfile::tempdir().expect("dir"), n: 0 });
}

#[test]
fn the_contract_on_postgres() {
    let pg = Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("dir");
    // A migrated template: each case's database is a copy of it.
    let template = pg.database(None).expect("template");
    drop(PgStore::open(&template, &dir.path().join("k"), 3).expect("migrate the template"));
    let name = template.rsplit('/').next().expect("name").to_owned();
    run_all(&mut Pg { pg, template: name, url: String::new(), dir });
}

#[test]
fn postgres_refuses_what_it_cannot_use_and_says_why() {
    let pg = Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("k");
    let url = pg.database(None).expect("db");
    drop(PgStore::open(&url, &key, 3).expect("open"));

    let wrong_key = PgStore::open(&url, &dir.path().join("other"), 3).expect_err("wrong key");
    assert!(matches!(wrong_key, StoreError::WrongKey { .. }), "{wrong_key}");

    let db = url.rsplit('/').next().expect("db");
    pg.psql(db, "INSERT INTO schema_version (version) VALUES (99)").expect("bump");
    let newer = PgStore::open(&url, &key, 3).expect_err("newer schema");
    assert!(matches!(newer, StoreError::TooNew { found: 99, .. }), "{newer}");

    let bad = PgStore::open("postgres://x@127.0.0.1:notaport/db", &key, 3).expect_err("bad url");
    assert!(bad.to_string().contains("store.url"), "{bad}");

    let password = url.replace(gridsense_tests::postgres::PASSWORD, "wrong");
    let denied = PgStore::open(&password, &key, 3).expect_err("wrong password").to_string();
    assert!(denied.contains("password authentication failed"), "{denied}");
    assert!(!denied.contains("wrong@"), "the password is not in the message: {denied}");

    let missing = pg.url("no_such_db");
    let e = PgStore::open(&missing, &key, 3).expect_err("no database").to_string();
    assert!(e.contains("no_such_db") && e.contains("does not exist"), "{e}");

    let port = gridsense_tests::broker::free_port().expect("port");
    let started = std::time::Instant::now();
    let nobody = format!("postgres://gridsense@127.0.0.1:{port}/db?connect_timeout=2");
    let e = PgStore::open(&nobody, &key, 3).expect_err("unreachable").to_string();
    assert!(e.contains("cannot connect") && e.contains(&port.to_string()), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "bounded by connect_timeout");
    assert!(Path::new(&key).exists());
}

#[test]
fn a_postgres_server_that_goes_away_is_an_error_then_the_store_reconnects() {
    let mut pg = Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("dir");
    let url = pg.database(None).expect("db");
    let mut s = PgStore::open(&url, &dir.path().join("k"), 3).expect("open");
    s.import(&inventory(1, 5), 0).expect("import");
    pg.stop_immediate().expect("stop");
    let mut batch = Batch::default();
    batch.counters.insert(Eui(1), CounterWindow::new());
    let e = s.commit(&batch).expect_err("server gone");
    assert!(matches!(e, StoreError::Postgres { transient: true, .. }), "{e}");
    pg.restart().expect("restart");
    s.commit(&batch).expect("committed after the server came back");
    assert_eq!(s.registry().expect("registry").len(), 1);
}

#[test]
fn registry_changes_wake_their_reader_on_postgres_and_again_after_a_server_restart() {
    use std::{sync::Arc, time::Duration};
    let mut pg = Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("dir");
    let url = pg.database(None).expect("db");
    let key = dir.path().join("k");
    let (reader, mut writer) = (
        PgStore::open(&url, &key, 3).expect("reader"),
        PgStore::open(&url, &key, 3).expect("writer"),
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let wake = Arc::new(tokio::sync::Notify::new());
    assert!(reader.wake_on_registry_changes(Arc::downgrade(&wake)).expect("listen"));
    let woken = |what: &str| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), wake.notified()).await })
            .unwrap_or_else(|_| panic!("not woken {what}"));
    };
    // Nothing pending: a wake must come from what happens next.
    let drain = || {
        while rt
            .block_on(async {
                tokio::time::timeout(Duration::from_millis(300), wake.notified()).await
            })
            .is_ok()
        {}
    };
    woken("once listening (a look at what changed before)");
    drain();
    let before = reader.registry_position().expect("position");
    writer.import(&inventory(2, 1), 0).expect("import");
    woken("by an import in another connection");
    let (_, changes) = reader.registry_changes(before).expect("feed");
    assert_eq!(changes.len(), 2, "the feed, read by position, has both");
    drain();
    // The server restarts: the listener connects again and wakes its reader once (notices
    // sent meanwhile are lost; the reader's position is not).
    pg.stop_immediate().expect("stop");
    pg.restart().expect("restart");
    woken("after the server came back");
    drain();
    let before = reader.registry_position().expect("position");
    writer.import(&inventory(3, 2), 0).expect("import after the restart");
    woken("by a change after the restart");
    assert!(!reader.registry_changes(before).expect("feed").1.is_empty());
    // The reader gone, the listener ends (its thread checks the wake's owner).
    drop(wake);
}

#[test]
fn shard_leases_on_postgres_claim_lapse_fence_and_hand_over() {
    use gridsense_gateway::cluster::{Fence, Policy, plan};
    let pg = Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("dir");
    let url = pg.database(None).expect("db");
    let key = dir.path().join("k");
    let (mut a, b) =
        (PgStore::open(&url, &key, 3).expect("a"), PgStore::open(&url, &key, 3).expect("b"));
    a.fix_shards(4).expect("shards");
    let view = a.cluster_view(Some("a"), 5_000).expect("view");
    assert_eq!(view.instances, ["a"]);
    assert!(view.leases.iter().all(|l| l.owner.is_none()), "{view:?}");
    // The policy, on the database's clock: a lone instance claims every shard.
    let p = plan("a", &view, view.db_now_ms, Policy::default());
    assert_eq!(p.claim, [0, 1, 2, 3]);
    for shard in p.claim {
        assert_eq!(a.claim("a", shard, 5_000).expect("claim"), Some(1));
    }
    assert_eq!(b.claim("b", 0, 5_000).expect("claim"), None, "held: not taken");
    // A batch fenced at the current epochs commits; at a stale one it is refused, unwritten.
    let fenced = |epochs: Vec<i64>, eui: u64| {
        let mut batch = Batch::default();
        batch.counters.insert(Eui(eui), CounterWindow::new());
        batch.fence =
            Some(Fence { instance: "a".into(), held: vec![(0, epochs[0]), (1, epochs[1])] });
        batch
    };
    a.commit(&fenced(vec![1, 1], 1)).expect("held: committed");
    let e = a.commit(&fenced(vec![1, 0], 2)).expect_err("a stale epoch");
    assert!(matches!(e, StoreError::Fenced { lost: 1, .. }), "{e}");
    let counters: Vec<u64> = a.counters().expect("counters").iter().map(|(e, _)| e.0).collect();
    assert_eq!(counters, [1], "nothing of the refused batch written");
    // Shard 0's lease lapses (renewed for 0 ms, as if `a` had stalled): `b` claims it.
    assert_eq!(a.renew("a", &[(0, 1)], 0).expect("renew"), [0]);
    assert_eq!(b.claim("b", 0, 5_000).expect("claim"), Some(2), "a lapsed lease is claimed");
    // The zombie: its renewal and its batches for shard 0 are refused from now on.
    assert_eq!(a.renew("a", &[(0, 1), (1, 1)], 5_000).expect("renew"), [1], "0 was lost");
    assert!(matches!(a.commit(&fenced(vec![1, 1], 3)), Err(StoreError::Fenced { .. })));
    // Both are live; `b` hands shard 0 back, and `a` may claim it at a new epoch.
    let view = b.cluster_view(Some("b"), 5_000).expect("view");
    assert_eq!(view.instances, ["a", "b"]);
    assert_eq!(view.leases[0].owner.as_deref(), Some("b"));
    assert!(b.release("b", 0, 2).expect("release"));
    assert!(!b.release("b", 0, 2).expect("released already"));
    assert_eq!(a.claim("a", 0, 5_000).expect("claim"), Some(3));
    // `gridsense cluster status` shows it (and, only looking, does not count as an instance).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(["cluster", "status"])
        .env("GRIDSENSE_STORE_URL", &url)
        .env("GRIDSENSE_STORE_KEY_FILE", &key)
        .output()
        .expect("gridsense cluster status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("cluster: 4 shards on postgres://"), "{text}");
    assert!(text.contains("instances seen within a lease: 2"), "{text}");
    assert!(text.contains("  a: 4 shards") && text.contains("  b: 0 shards"), "{text}");
    assert!(text.contains("held by nobody: 0"), "{text}");
    assert!(!text.contains(gridsense_tests::postgres::PASSWORD), "no password shown: {text}");
    // A SQLite store is one process's: it owns every shard.
    let sqlite = Store::open(&dir.path().join("s.db"), Synchronous::Normal, 3).expect("sqlite");
    sqlite.fix_shards(4).expect("shards");
    let view = sqlite.cluster_view(Some("only"), 5_000).expect("view");
    assert!(
        view.leases.len() == 4 && view.leases.iter().all(|l| l.owner.as_deref() == Some("only"))
    );
}

#[test]
fn two_delivery_workers_on_one_postgres_outbox_never_both_send_an_entry() {
    use gridsense_gateway::store::OUTBOX_CLAIM_MS;
    let pg = Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("dir");
    let url = pg.database(None).expect("db");
    let key = dir.path().join("k");
    let (mut a, mut b) =
        (PgStore::open(&url, &key, 3).expect("a"), PgStore::open(&url, &key, 3).expect("b"));
    let mut batch = Batch::default();
    for id in 1..=20 {
        batch.cases.outbox.push(gridsense_gateway::cases::OutboxRow {
            channel: "alert",
            subject: id,
            op: "create",
            at_ms: 100,
        });
    }
    a.commit(&batch).expect("commit");
    // Both see the same twenty due; each claims as it goes; every entry is claimed once.
    let (due_a, due_b) = (
        a.outbox_due("alert", 100, 50).expect("due"),
        b.outbox_due("alert", 100, 50).expect("due"),
    );
    assert_eq!((due_a.len(), due_b.len()), (20, 20));
    let mut claimed = Vec::new();
    for (ea, eb) in due_a.iter().zip(due_b.iter().rev()) {
        if a.outbox_begin(ea, 100).expect("a") {
            claimed.push(("a", ea.subject));
        }
        if b.outbox_begin(eb, 100).expect("b") {
            claimed.push(("b", eb.subject));
        }
    }
    let mut subjects: Vec<i64> = claimed.iter().map(|(_, s)| *s).collect();
    subjects.sort_unstable();
    assert_eq!(subjects, (1..=20).collect::<Vec<_>>(), "each once: {claimed:?}");
    assert!(claimed.iter().any(|(w, _)| *w == "a") && claimed.iter().any(|(w, _)| *w == "b"));
    // A claim holds the entry off the others; a claimant that died is succeeded after it.
    assert!(b.outbox_due("alert", 100 + OUTBOX_CLAIM_MS - 1, 50).expect("due").is_empty());
    let after = b.outbox_due("alert", 100 + OUTBOX_CLAIM_MS, 50).expect("due");
    assert_eq!(after.len(), 20, "nothing was done: all due again after the claim");
    assert!(b.outbox_begin(&after[0], 100 + OUTBOX_CLAIM_MS).expect("b"));
    assert_eq!(b.outbox_due("alert", 100 + OUTBOX_CLAIM_MS, 50).expect("due").len(), 19);
}

/// A TCP proxy in front of PostgreSQL that, once armed, forwards the next `COMMIT` and then
/// cuts the connection before the server's answer comes back: the commit's outcome is
/// unknown to the client although it landed.
struct CutAfterCommit {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CutAfterCommit {
    fn start(server: std::net::SocketAddr) -> Self {
        use std::{io::Read, io::Write, net::TcpListener, sync::atomic::Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = std::net::TcpStream::connect(server) else { continue };
                let (mut c_read, mut u_write) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let (mut u_read, mut c_write) = (upstream, client);
                let flag = flag.clone();
                let c_shut = c_write.try_clone().unwrap();
                let u_shut = u_write.try_clone().unwrap();
                // Set before the COMMIT goes upstream, so no answer read after it passes.
                let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let swallow = cut.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65_536];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let commit = buf[..n].windows(7).any(|w| w == b"COMMIT\0");
                        let cutting = commit && flag.swap(false, Ordering::SeqCst);
                        if cutting {
                            cut.store(true, Ordering::SeqCst);
                        }
                        if u_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if cutting {
                            // The server commits; its answer never reaches the client.
                            let _ = c_shut.shutdown(std::net::Shutdown::Both);
                            std::thread::sleep(std::time::Duration::from_millis(300));
                            let _ = u_shut.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                    }
                });
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65_536];
                    while let Ok(n) = u_read.read(&mut buf) {
                        if n == 0
                            || swallow.load(Ordering::SeqCst)
                            || c_write.write_all(&buf[..n]).is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        CutAfterCommit { port, armed }
    }
}

#[test]
fn a_commit_whose_answer_was_lost_is_applied_once_when_retried() {
    let pg = Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("dir");
    let url = pg.database(None).expect("db");
    let proxy = CutAfterCommit::start(pg.addr());
    let via_proxy = url.replace(&format!(":{}/", pg.port()), &format!(":{}/", proxy.port));
    let mut s = PgStore::open(&via_proxy, &dir.path().join("k"), 3).expect("open");
    let mut batch = Batch { accepted: 5, ..Batch::default() };
    batch.events.push(HealthEvent { eui: Eui(7), at_ms: 1, kind: EventKind::Online });
    proxy.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let cut = s.commit(&batch).expect_err("the answer to COMMIT never came");
    assert!(cut.is_transient(), "{cut}");
    // The retry (as ingest does: the same batch until it is durable) finds it landed.
    s.commit(&batch).expect("retry");
    use gridsense_gateway::store::Queries;
    assert_eq!(s.totals().expect("totals").accepted, 5, "applied once");
    assert_eq!(s.events_of(Eui(7)).expect("events").len(), 1, "applied once");
    // And the next batch is a new one.
    s.commit(&batch).expect("next");
    assert_eq!(s.totals().expect("totals").accepted, 10);
}

#[test]
fn a_runtime_role_without_ddl_rights_runs_a_migrated_database() {
    let pg = Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("k");
    let owner_url = pg.database(None).expect("db");
    drop(PgStore::open(&owner_url, &key, 3).expect("migrated by the owner"));
    let db = owner_url.rsplit('/').next().expect("db").to_owned();
    pg.psql(
        &db,
        &format!(
            "CREATE ROLE gridsense_app LOGIN PASSWORD 'app-password';
         GRANT CONNECT ON DATABASE {db} TO gridsense_app;
         GRANT USAGE ON SCHEMA public TO gridsense_app;
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO gridsense_app;
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO gridsense_app;"
        ),
    )
    .expect("roles");
    let app_url = format!("postgres://gridsense_app:app-password@127.0.0.1:{}/{db}", pg.port());
    let mut s = PgStore::open(&app_url, &key, 3).expect("the runtime role opens it");
    s.import(&inventory(2, 9), 0).expect("import");
    let mut batch = Batch { accepted: 1, ..Batch::default() };
    batch.events.push(HealthEvent { eui: Eui(1), at_ms: 1, kind: EventKind::Online });
    s.commit(&batch).expect("commit");
    assert_eq!(s.registry().expect("registry").len(), 2);
    // Telemetry's day partitions are made and dropped by the migrator's function: the runtime
    // role writes, prunes and makes the coming days without a DDL right of its own.
    const DAY: i64 = 86_400_000;
    let now = 20_500 * DAY + 5;
    let telemetry = vec![point(1, now - 10 * DAY, 1.0), point(1, now, 2.0)];
    s.commit(&Batch { telemetry, ..Batch::default() }).expect("telemetry");
    assert_eq!(s.prune_telemetry(now - DAY, now).expect("prune as the runtime role"), 1);
    s.commit(&Batch { telemetry: vec![point(1, now + DAY, 3.0)], ..Batch::default() })
        .expect("into a day made ahead");
    // Days 20,499 … 20,502 (keep_from's day to two after now); the day before was not made.
    let days = pg
        .psql(
            &db,
            "SELECT string_agg(c.relname, ' ' ORDER BY c.relname) FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'telemetry'::regclass
             AND c.relname BETWEEN 'telemetry_20260214' AND 'telemetry_20260219'",
        )
        .expect("partitions");
    assert_eq!(
        days.split_whitespace().collect::<Vec<_>>(),
        ["telemetry_20260215", "telemetry_20260216", "telemetry_20260217", "telemetry_20260218"],
        "{days}"
    );
    let denied = pg
        .psql(&db, "SET ROLE gridsense_app; CREATE TABLE x (y int)")
        .expect_err("no DDL for the runtime role");
    assert!(denied.to_string().contains("permission denied"), "{denied}");
}

#[test]
fn tls_to_postgres_verifies_the_server_and_never_falls_back_to_plain() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = gridsense_tests::TestPki::generate(dir.path()).expect("pki");
    let pg = Postgres::start_tls(&pki.cert, &pki.key).expect("PostgreSQL with TLS");
    let key = dir.path().join("k");
    let url = pg.database(None).expect("db").replace("@127.0.0.1:", "@localhost:");
    let mut s = PgStore::open_tls(&url, &key, 3, Some(&pki.ca)).expect("TLS with the right CA");
    s.import(&inventory(1, 4), 0).expect("import over TLS");
    let ssl: String = pg
        .psql("postgres", "SELECT string_agg(ssl::text, ',') FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'gridsense'")
        .expect("pg_stat_ssl");
    assert!(ssl.contains("true") && !ssl.contains("false"), "the store's connection is TLS: {ssl}");
    let wrong = PgStore::open_tls(&url, &key, 3, Some(&pki.other_ca)).expect_err("another CA");
    assert!(wrong.to_string().contains("cannot connect"), "{wrong}");
    let required = format!("{url}?sslmode=require");
    let e = PgStore::open(&required, &key, 3).expect_err("require without a CA").to_string();
    assert!(e.contains("store.ca_file"), "{e}");
    // A server without TLS, with a CA configured: refused, not plain.
    let plain = Postgres::start().expect("PostgreSQL without TLS");
    let url = plain.database(None).expect("db").replace("@127.0.0.1:", "@localhost:");
    let e = PgStore::open_tls(&url, &key, 3, Some(&pki.ca)).expect_err("no TLS there").to_string();
    assert!(e.contains("cannot connect"), "{e}");
}
