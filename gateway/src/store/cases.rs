//! The store's part for rules, incidents and cases: the schema, writing a batch's effects in
//! the batch's transaction, restoring the core after a restart, and the local case board's
//! queries and lifecycle transitions (used by the HTTP API, the CLI and the delivery workers,
//! each on its own connection; SQLite WAL serialises the writers).

use gridsense_protocol::Eui;
use rusqlite::{Transaction, params};
use serde::Serialize;

use super::{Store, StoreError, kind_column};
use crate::{
    cases::{
        CaseState, Effects, LifecycleError, Site,
        lifecycle::{self, Milestone},
    },
    rules::{Attributes, RuleState, Severity},
};

pub(super) const MIGRATION: &str = "
CREATE TABLE rule_state (eui INTEGER NOT NULL, rule TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (eui, rule)) WITHOUT ROWID;
CREATE TABLE incidents (
    id INTEGER PRIMARY KEY, eui INTEGER NOT NULL, condition TEXT NOT NULL, severity TEXT NOT NULL,
    state TEXT NOT NULL, onset_ms INTEGER NOT NULL, detected_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    cluster_id INTEGER, grid_code TEXT, case_id INTEGER
);
CREATE INDEX incidents_state ON incidents (state);
CREATE INDEX incidents_cluster ON incidents (cluster_id);
CREATE TABLE incident_evidence (
    id INTEGER PRIMARY KEY, incident_id INTEGER NOT NULL, at_ms INTEGER NOT NULL, change TEXT NOT NULL,
    severity TEXT, frame INTEGER, evidence TEXT NOT NULL
);
CREATE INDEX incident_evidence_incident ON incident_evidence (incident_id);
CREATE TABLE cases (
    id INTEGER PRIMARY KEY, incident_id INTEGER, idempotency_key TEXT NOT NULL UNIQUE, eui INTEGER NOT NULL,
    class_code TEXT NOT NULL, class_name TEXT NOT NULL, title TEXT NOT NULL, object_code TEXT,
    lat REAL NOT NULL, lon REAL NOT NULL, crs TEXT NOT NULL DEFAULT 'WGS84', address TEXT NOT NULL,
    unit_grid_code TEXT, grid_code TEXT, community_code TEXT, street_code TEXT, district_code TEXT,
    description TEXT NOT NULL, source TEXT NOT NULL DEFAULT 'IoT', urgency TEXT NOT NULL,
    onset_ms INTEGER NOT NULL, detected_ms INTEGER NOT NULL, handling_limit TEXT NOT NULL,
    handling_due_ms INTEGER NOT NULL, deploy_due_ms INTEGER NOT NULL, feedback_due_ms INTEGER NOT NULL,
    state TEXT NOT NULL, updated_ms INTEGER NOT NULL, dispatched_ms INTEGER, handled_ms INTEGER,
    feedback_ms INTEGER, closed_ms INTEGER, platform TEXT, platform_id TEXT, delivered_ms INTEGER
);
CREATE INDEX cases_state ON cases (state);
CREATE INDEX cases_class ON cases (class_code);
CREATE INDEX cases_detected ON cases (detected_ms);
CREATE TABLE case_events (
    id INTEGER PRIMARY KEY, case_id INTEGER NOT NULL, at_ms INTEGER NOT NULL, from_state TEXT, to_state TEXT,
    actor TEXT NOT NULL, note TEXT NOT NULL
);
CREATE INDEX case_events_case ON case_events (case_id);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY, channel TEXT NOT NULL, subject INTEGER NOT NULL, op TEXT NOT NULL,
    created_ms INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    next_ms INTEGER NOT NULL, last_error TEXT, done_ms INTEGER
);
CREATE INDEX outbox_due ON outbox (state, next_ms);
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY, eui INTEGER NOT NULL, at_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    lat REAL, lon REAL, grid_code TEXT, delivered_ms INTEGER
);
CREATE TABLE patrols (
    eui INTEGER NOT NULL, at_ms INTEGER NOT NULL, day TEXT NOT NULL, checkpoint INTEGER NOT NULL, grid_code TEXT,
    PRIMARY KEY (eui, at_ms, checkpoint)
) WITHOUT ROWID;
CREATE INDEX patrols_day ON patrols (day, grid_code);
CREATE TABLE maintenance (
    id INTEGER PRIMARY KEY, scope TEXT NOT NULL, from_ms INTEGER NOT NULL, until_ms INTEGER NOT NULL,
    note TEXT NOT NULL, created_ms INTEGER NOT NULL
);";

/// A case move as both stores decide it from the case's stored row: its state (parsed, else
/// a bad row) and the lifecycle's verdict (`Err`: not a legal move).
pub(super) fn decide_move(
    state: &str,
    handling_limit: &str,
    to: CaseState,
    now_ms: i64,
    calendar: &crate::calendar::Calendar,
) -> Result<Result<lifecycle::Move, TransitionError>, StoreError> {
    let from = CaseState::parse(state)
        .ok_or_else(|| StoreError::BadRow { table: "cases", what: format!("state {state:?}") })?;
    Ok(lifecycle::step(from, to, handling_limit, now_ms, calendar)
        .map_err(TransitionError::Lifecycle))
}

/// The one UPDATE that applies a move (state, its time, the milestone's stamp — the first
/// filing and the first dispatch are kept apart for the 130 figures —, the handling deadline a
/// dispatch restarts, the return and rework counts), with parameters 1 id, 2 state, 3 time,
/// 4 deadline or NULL, written with `sigil` (`?` for SQLite, `$` for PostgreSQL).
pub(super) fn move_update(m: &lifecycle::Move, sigil: char) -> String {
    let mut set = String::new();
    match m.stamp {
        Some(Milestone::Filed) => set.push_str(&format!(", filed_ms = COALESCE(filed_ms, {sigil}3)")),
        Some(Milestone::Dispatched) => set.push_str(&format!(
            ", dispatched_ms = {sigil}3, first_dispatched_ms = COALESCE(first_dispatched_ms, {sigil}3)"
        )),
        Some(other) => set.push_str(&format!(", {} = {sigil}3", stamp_column(other))),
        None => {}
    }
    if m.returned {
        set.push_str(", returns = returns + 1");
    }
    if m.reworked {
        set.push_str(", reworks = reworks + 1");
    }
    format!(
        "UPDATE cases SET state = {sigil}2, updated_ms = {sigil}3,
            handling_due_ms = COALESCE({sigil}4, handling_due_ms){set} WHERE id = {sigil}1"
    )
}

/// The INSERT of a new case, parameters in [`CaseRow`]'s order (see both stores' writers),
/// written with `sigil`.
pub(super) fn case_insert(sigil: char) -> String {
    let marks: Vec<String> = (1..=27).map(|n| format!("{sigil}{n}")).collect();
    format!(
        "INSERT INTO cases (id, incident_id, idempotency_key, eui, class_code, class_name, title,
            object_code, lat, lon, address, unit_grid_code, grid_code, community_code, street_code,
            district_code, description, urgency, onset_ms, detected_ms, handling_limit,
            handling_due_ms, deploy_due_ms, feedback_due_ms, source, department, level, state,
            updated_ms, first_level)
         VALUES ({}, 'collected', {sigil}20, {sigil}27)",
        marks.join(", ")
    )
}

/// Schema for departments, levels, supervision and the assessment report (SQLite's migration
/// 13, PostgreSQL's 5; `$ms` is the type of a time in ms): the case's department, level (now
/// and when filed), return and rework counts, the causes it escalated for, its first filing
/// and dispatch — older cases get them from their trace — and the registry's grid workers.
macro_rules! governance_migration {
    ($ms:literal) => {
        concat!(
            "ALTER TABLE cases ADD COLUMN department TEXT;
            ALTER TABLE cases ADD COLUMN level TEXT NOT NULL DEFAULT 'community';
            ALTER TABLE cases ADD COLUMN first_level TEXT NOT NULL DEFAULT 'community';
            ALTER TABLE cases ADD COLUMN returns INTEGER NOT NULL DEFAULT 0;
            ALTER TABLE cases ADD COLUMN reworks INTEGER NOT NULL DEFAULT 0;
            ALTER TABLE cases ADD COLUMN escalated TEXT NOT NULL DEFAULT '';
            ALTER TABLE cases ADD COLUMN filed_ms ", $ms, ";
            ALTER TABLE cases ADD COLUMN first_dispatched_ms ", $ms, ";
            UPDATE cases SET
                filed_ms = (SELECT MIN(e.at_ms) FROM case_events e WHERE e.case_id = cases.id AND e.to_state = 'filed'),
                first_dispatched_ms = (SELECT MIN(e.at_ms) FROM case_events e WHERE e.case_id = cases.id AND e.to_state = 'dispatched'),
                returns = (SELECT COUNT(*) FROM case_events e WHERE e.case_id = cases.id AND e.to_state = 'returned'),
                reworks = (SELECT COUNT(*) FROM case_events e WHERE e.case_id = cases.id
                    AND e.from_state = 'feedback' AND e.to_state = 'dispatched');
            CREATE INDEX cases_department ON cases (department);
            CREATE INDEX cases_open ON cases (state, level);
            CREATE TABLE workers (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, grid_code TEXT NOT NULL, beacon TEXT NOT NULL DEFAULT '',
                valid_from TEXT NOT NULL DEFAULT '', valid_to TEXT NOT NULL DEFAULT ''
            );"
        )
    };
}
pub(super) use governance_migration;

/// The column that records a milestone.
pub(super) const fn stamp_column(m: Milestone) -> &'static str {
    match m {
        Milestone::Filed => "filed_ms",
        Milestone::Dispatched => "dispatched_ms",
        Milestone::Handled => "handled_ms",
        Milestone::Feedback => "feedback_ms",
        Milestone::Closed => "closed_ms",
    }
}

pub(super) fn eui_i(eui: Eui) -> i64 {
    eui.0 as i64
}

/// Writes rule states and a batch's case-layer effects inside the batch's transaction.
pub(super) fn write(
    tx: &Transaction<'_>,
    rule_states: &[(Eui, String, Option<RuleState>)],
    fx: &Effects,
) -> Result<(), StoreError> {
    if !rule_states.is_empty() {
        let mut put = tx.prepare_cached(
            "INSERT OR REPLACE INTO rule_state (eui, rule, state) VALUES (?1, ?2, ?3)",
        )?;
        let mut del = tx.prepare_cached("DELETE FROM rule_state WHERE eui = ?1 AND rule = ?2")?;
        for (eui, rule, state) in rule_states {
            match state {
                Some(state) => put.execute(params![
                    eui_i(*eui),
                    rule,
                    serde_json::to_string(state).unwrap_or_default()
                ])?,
                None => del.execute(params![eui_i(*eui), rule])?,
            };
        }
    }
    if fx.is_empty() {
        return Ok(());
    }
    let mut cases = tx.prepare_cached(&case_insert('?'))?;
    for c in &fx.cases {
        cases.execute(params![
            c.id,
            c.incident_id,
            c.key,
            eui_i(c.eui),
            c.class_code,
            c.class_name,
            c.title,
            c.object_code,
            c.lat,
            c.lon,
            c.place.address,
            c.place.unit_grid_code,
            c.place.grid_code,
            c.place.community_code,
            c.place.street_code,
            c.place.district_code,
            c.description,
            c.urgency,
            c.onset_ms,
            c.detected_ms,
            c.limit.to_string(),
            c.handling_due_ms,
            c.deploy_due_ms,
            c.feedback_due_ms,
            c.source,
            c.department,
            c.level.as_str()
        ])?;
    }
    let mut incidents = tx.prepare_cached(
        "INSERT OR REPLACE INTO incidents (id, eui, condition, severity, state, onset_ms, detected_ms,
            updated_ms, cluster_id, grid_code, case_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for i in &fx.incidents {
        incidents.execute(params![
            i.id,
            eui_i(i.eui),
            i.condition,
            i.severity.as_str(),
            i.state,
            i.onset_ms,
            i.detected_ms,
            i.updated_ms,
            i.cluster_id,
            i.grid_code,
            i.case_id
        ])?;
    }
    let mut evidence = tx.prepare_cached(
        "INSERT INTO incident_evidence (incident_id, at_ms, change, severity, frame, evidence)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for e in &fx.evidence {
        evidence.execute(params![
            e.incident_id,
            e.at_ms,
            e.change,
            e.severity.map(Severity::as_str),
            e.frame,
            serde_json::to_string(&e.evidence).unwrap_or_default()
        ])?;
    }
    for (case_id, urgency) in &fx.urgency {
        tx.execute("UPDATE cases SET urgency = ?2 WHERE id = ?1", params![case_id, urgency])?;
    }
    let mut events = tx.prepare_cached(
        "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for e in &fx.events {
        events.execute(params![
            e.case_id,
            e.at_ms,
            e.from.map(CaseState::as_str),
            e.to.map(CaseState::as_str),
            e.actor,
            e.note
        ])?;
    }
    let mut outbox = tx.prepare_cached(
        "INSERT INTO outbox (channel, subject, op, created_ms, next_ms) VALUES (?1, ?2, ?3, ?4, ?4)",
    )?;
    for o in &fx.outbox {
        outbox.execute(params![o.channel, o.subject, o.op, o.at_ms])?;
    }
    for a in &fx.alerts {
        tx.execute(
            "INSERT INTO alerts (id, eui, at_ms, received_ms, lat, lon, grid_code)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                a.id,
                eui_i(a.eui),
                a.at_ms,
                a.received_ms,
                a.position.map(|p| p.0),
                a.position.map(|p| p.1),
                a.grid_code
            ],
        )?;
    }
    let mut patrols = tx.prepare_cached(
        "INSERT OR IGNORE INTO patrols (eui, at_ms, day, checkpoint, grid_code) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for p in &fx.patrols {
        patrols.execute(params![eui_i(p.eui), p.at_ms, p.day, p.checkpoint, p.grid_code])?;
    }
    Ok(())
}

/// A trace entry for an accepted frame of the case's device.
pub(super) fn frame_entry(
    at_ms: i64,
    device: &str,
    counter: i64,
    kind: &str,
    body: &str,
) -> TraceEntry {
    TraceEntry {
        at_ms,
        kind: "frame",
        actor: format!("device:{device}"),
        detail: format!("#{counter} {kind}: {body}"),
    }
}

/// A trace entry for a piece of evidence of the case's incident.
pub(super) fn evidence_entry(
    at_ms: i64,
    incident: Option<i64>,
    change: &str,
    severity: Option<String>,
    frame: Option<i64>,
    evidence: &str,
) -> TraceEntry {
    TraceEntry {
        at_ms,
        kind: "evidence",
        actor: "rules".into(),
        detail: format!(
            "incident {} {change} → {} ({}): {evidence}",
            incident.unwrap_or_default(),
            severity.unwrap_or_else(|| "clear".into()),
            frame.map_or_else(|| "timer".to_owned(), |f| format!("frame #{f}")),
        ),
    }
}

/// A trace entry for a lifecycle move (or, without a state, a note).
pub(super) fn event_entry(
    at_ms: i64,
    from: Option<String>,
    to: Option<String>,
    actor: String,
    note: String,
) -> TraceEntry {
    TraceEntry {
        at_ms,
        kind: if to.is_some() { "state" } else { "note" },
        actor,
        detail: match (from, to) {
            (_, None) => note,
            (None, Some(t)) => format!("→ {t}: {note}"),
            (Some(f), Some(t)) => format!("{f} → {t}: {note}"),
        },
    }
}

/// A case as the board shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseView {
    /// Id.
    pub id: i64,
    /// Incident.
    pub incident_id: Option<i64>,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Device EUI.
    pub device_id: String,
    /// Class code.
    pub class_code: String,
    /// Class name.
    pub class_name: String,
    /// Filing condition.
    pub title: String,
    /// Component object code.
    pub object_code: Option<String>,
    /// Latitude (WGS84).
    pub lat: f64,
    /// Longitude (WGS84).
    pub lon: f64,
    /// Coordinate system.
    pub crs: String,
    /// Address.
    pub address: String,
    /// Unit grid.
    pub unit_grid_code: Option<String>,
    /// Responsibility grid.
    pub grid_code: Option<String>,
    /// Community.
    pub community_code: Option<String>,
    /// Street.
    pub street_code: Option<String>,
    /// District.
    pub district_code: Option<String>,
    /// Description.
    pub description: String,
    /// Source.
    pub source: String,
    /// Urgency.
    pub urgency: String,
    /// Onset, Unix ms.
    pub onset_ms: i64,
    /// Detected, Unix ms.
    pub detected_ms: i64,
    /// Handling limit.
    pub handling_limit: String,
    /// Handling deadline, Unix ms.
    pub handling_due_ms: i64,
    /// 130 deploy milestone, Unix ms.
    pub deploy_due_ms: i64,
    /// 130 feedback milestone, Unix ms.
    pub feedback_due_ms: i64,
    /// Lifecycle state.
    pub state: String,
    /// Last change, Unix ms.
    pub updated_ms: i64,
    /// Dispatched at.
    pub dispatched_ms: Option<i64>,
    /// Handled at.
    pub handled_ms: Option<i64>,
    /// Feedback at.
    pub feedback_ms: Option<i64>,
    /// Closed at.
    pub closed_ms: Option<i64>,
    /// Platform delivered to.
    pub platform: Option<String>,
    /// The platform's id.
    pub platform_id: Option<String>,
    /// Delivered at.
    pub delivered_ms: Option<i64>,
    /// The department responsible.
    pub department: Option<String>,
    /// Handling level now (`community`, `street`, `district`).
    pub level: String,
    /// The level it was filed at.
    pub first_level: String,
    /// Times a department returned it.
    pub returns: i64,
    /// Causes supervision escalated it for (comma-separated; empty: never).
    pub escalated: String,
}

impl CaseView {
    /// The case's clock fields, for the lifecycle's timers.
    pub fn clocks(&self) -> lifecycle::Clocks<'_> {
        lifecycle::Clocks {
            detected_ms: self.detected_ms,
            handling_limit: &self.handling_limit,
            deploy_due_ms: self.deploy_due_ms,
            feedback_due_ms: self.feedback_due_ms,
            handling_due_ms: self.handling_due_ms,
            dispatched_ms: self.dispatched_ms,
            handled_ms: self.handled_ms,
            feedback_ms: self.feedback_ms,
            closed_ms: self.closed_ms,
        }
    }
}

#[cfg(test)]
impl CaseView {
    /// A sewage-cover case detected at `detected_ms`, for tests.
    pub fn example(detected_ms: i64) -> Self {
        CaseView {
            id: 1,
            incident_id: Some(1),
            idempotency_key: "0000000000000001:cover_displaced:0".into(),
            device_id: "0000000000000001".into(),
            class_code: "C0102".into(),
            class_name: "污水井盖".into(),
            title: "井盖移位、破损或丢失".into(),
            object_code: Some("2102020102000001".into()),
            lat: 38.914,
            lon: 121.614,
            crs: "WGS84".into(),
            address: "中山区".into(),
            unit_grid_code: None,
            grid_code: Some("210202001001001".into()),
            community_code: Some("210202001001".into()),
            street_code: Some("210202001".into()),
            district_code: Some("210202".into()),
            description: String::new(),
            source: "IoT".into(),
            urgency: "high".into(),
            onset_ms: detected_ms,
            detected_ms,
            handling_limit: "2h".into(),
            handling_due_ms: detected_ms + 7_200_000,
            deploy_due_ms: detected_ms + 86_400_000,
            feedback_due_ms: detected_ms + 3 * 86_400_000,
            state: "collected".into(),
            updated_ms: detected_ms,
            dispatched_ms: None,
            handled_ms: None,
            feedback_ms: None,
            closed_ms: None,
            platform: None,
            platform_id: None,
            delivered_ms: None,
            department: Some("PS".into()),
            level: "community".into(),
            first_level: "community".into(),
            returns: 0,
            escalated: String::new(),
        }
    }
}

pub(super) const CASE_COLUMNS: &str =
    "id, incident_id, idempotency_key, eui, class_code, class_name, title,
    object_code, lat, lon, crs, address, unit_grid_code, grid_code, community_code, street_code,
    district_code, description, source, urgency, onset_ms, detected_ms, handling_limit,
    handling_due_ms, deploy_due_ms, feedback_due_ms, state, updated_ms, dispatched_ms, handled_ms,
    feedback_ms, closed_ms, platform, platform_id, delivered_ms, department, level, first_level,
    returns, escalated";

pub(super) fn case_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CaseView> {
    Ok(CaseView {
        id: r.get(0)?,
        incident_id: r.get(1)?,
        idempotency_key: r.get(2)?,
        device_id: Eui(r.get::<_, i64>(3)? as u64).to_string(),
        class_code: r.get(4)?,
        class_name: r.get(5)?,
        title: r.get(6)?,
        object_code: r.get(7)?,
        lat: r.get(8)?,
        lon: r.get(9)?,
        crs: r.get(10)?,
        address: r.get(11)?,
        unit_grid_code: r.get(12)?,
        grid_code: r.get(13)?,
        community_code: r.get(14)?,
        street_code: r.get(15)?,
        district_code: r.get(16)?,
        description: r.get(17)?,
        source: r.get(18)?,
        urgency: r.get(19)?,
        onset_ms: r.get(20)?,
        detected_ms: r.get(21)?,
        handling_limit: r.get(22)?,
        handling_due_ms: r.get(23)?,
        deploy_due_ms: r.get(24)?,
        feedback_due_ms: r.get(25)?,
        state: r.get(26)?,
        updated_ms: r.get(27)?,
        dispatched_ms: r.get(28)?,
        handled_ms: r.get(29)?,
        feedback_ms: r.get(30)?,
        closed_ms: r.get(31)?,
        platform: r.get(32)?,
        platform_id: r.get(33)?,
        delivered_ms: r.get(34)?,
        department: r.get(35)?,
        level: r.get(36)?,
        first_level: r.get(37)?,
        returns: r.get(38)?,
        escalated: r.get(39)?,
    })
}

/// Filters of a case list (Open311's, plus ours).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaseFilter {
    /// Only these ids.
    pub ids: Vec<i64>,
    /// Only these class codes.
    pub class_codes: Vec<String>,
    /// Detected at or after, Unix ms.
    pub start_ms: Option<i64>,
    /// Detected at or before, Unix ms.
    pub end_ms: Option<i64>,
    /// Only these lifecycle states.
    pub states: Vec<CaseState>,
    /// Grid, community, street or district code prefix.
    pub area: Option<String>,
    /// Most rows.
    pub limit: u32,
}

/// One trace entry of a case: evidence, lifecycle, frames.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceEntry {
    /// When, Unix ms.
    pub at_ms: i64,
    /// `frame`, `evidence`, `state` or `note`.
    pub kind: &'static str,
    /// Who or what.
    pub actor: String,
    /// What.
    pub detail: String,
}

/// An outbox entry due for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Id.
    pub id: i64,
    /// `case` or `alert`.
    pub channel: String,
    /// Case or alert id.
    pub subject: i64,
    /// `create`, `update`, `recovered`.
    pub op: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Queued at.
    pub created_ms: i64,
}

/// An outbox entry as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxView {
    /// Entry id (`gridsense cases redeliver ID`, `POST /api/v1/outbox/{id}/retry`).
    pub id: i64,
    /// `case` or `alert`.
    pub channel: String,
    /// Case or alert id.
    pub subject: i64,
    /// `create`, `update`, `recovered`.
    pub op: String,
    /// `pending`, `done` or `dead`.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Queued at, Unix ms.
    pub created_ms: i64,
    /// Next attempt at (pending), Unix ms.
    pub next_ms: i64,
    /// Delivered or given up at, Unix ms.
    pub done_ms: Option<i64>,
    /// The last failure.
    pub last_error: Option<String>,
}

/// An SOS alert row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertView {
    /// Id.
    pub id: i64,
    /// Beacon.
    pub device_id: String,
    /// Pressed at (device time), Unix ms.
    pub at_ms: i64,
    /// Arrived, Unix ms.
    pub received_ms: i64,
    /// Latitude.
    pub lat: Option<f64>,
    /// Longitude.
    pub lon: Option<f64>,
    /// Grid.
    pub grid_code: Option<String>,
    /// Delivered to the alert channel at.
    pub delivered_ms: Option<i64>,
}

impl Store {
    /// Sites of the active devices changed after registry position `after`.
    pub(super) fn changed_sites(
        &self,
        after: i64,
    ) -> Result<Vec<(Eui, Site, Attributes)>, StoreError> {
        let mut out = Vec::new();
        self.sites_where(
            " AND eui IN (SELECT DISTINCT eui FROM registry_log WHERE id > ?1)",
            after,
            |eui, site, attrs| out.push((eui, site, attrs)),
        )?;
        Ok(out)
    }

    pub(super) fn sites_where(
        &self,
        filter: &str,
        after: i64,
        mut f: impl FnMut(Eui, Site, Attributes),
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT eui, kind, lat, lon, component_code, minor_class, warn_mm, alarm_mm, well_depth_mm
             FROM devices WHERE status = 'active'{filter}"
        ))?;
        let params: &[&dyn rusqlite::ToSql] = if filter.is_empty() { &[] } else { &[&after] };
        let mut rows = stmt.query(params)?;
        while let Some(r) = rows.next()? {
            let site = Site {
                kind: kind_column(r, 1, "devices")?,
                lat: r.get(2)?,
                lon: r.get(3)?,
                object_code: r.get(4)?,
                minor_class: r.get(5)?,
            };
            let attrs =
                Attributes { warn_mm: r.get(6)?, alarm_mm: r.get(7)?, well_depth_mm: r.get(8)? };
            f(Eui(r.get::<_, i64>(0)? as u64), site, attrs);
        }
        Ok(())
    }
}

/// An incident of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterMember {
    /// Incident.
    pub incident_id: i64,
    /// Device EUI.
    pub device_id: String,
    /// Condition.
    pub condition: String,
    /// Severity.
    pub severity: String,
    /// Incident state.
    pub state: String,
    /// Its case.
    pub case_id: Option<i64>,
}

/// What a platform callback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// The case moved.
    Moved,
    /// It was in that state already.
    Unchanged,
    /// The same signed callback was taken before: refused.
    Replayed,
}

/// Why a lifecycle move was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// No such case.
    #[error("no case {0}")]
    NotFound(i64),
    /// Not allowed from the current state.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
}
