//! The store's part for rules, incidents and cases: the schema, writing a batch's effects in
//! the batch's transaction, restoring the core after a restart, and the local case board's
//! queries and lifecycle transitions (used by the HTTP API, the CLI and the delivery workers,
//! each on its own connection; SQLite WAL serialises the writers).

use std::collections::BTreeMap;

use gridsense_protocol::Eui;
use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;

use super::{Store, StoreError, kind_column};
use crate::{
    cases::{CaseState, Effects, LifecycleError, MaintenanceWindow, OpenIncident, Sequences, Site},
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

/// The column that records when a case reached `state`, if one does.
const fn stamp_column(state: CaseState) -> Option<&'static str> {
    match state {
        CaseState::Dispatched => Some("dispatched_ms"),
        CaseState::Handled => Some("handled_ms"),
        CaseState::Feedback => Some("feedback_ms"),
        CaseState::Closed | CaseState::Voided => Some("closed_ms"),
        _ => None,
    }
}

fn eui_i(eui: Eui) -> i64 {
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
    for c in &fx.cases {
        tx.execute(
            "INSERT INTO cases (id, incident_id, idempotency_key, eui, class_code, class_name, title,
                object_code, lat, lon, address, unit_grid_code, grid_code, community_code, street_code,
                district_code, description, urgency, onset_ms, detected_ms, handling_limit,
                handling_due_ms, deploy_due_ms, feedback_due_ms, state, updated_ms, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                ?19, ?20, ?21, ?22, ?23, ?24, 'collected', ?20, ?25)",
            params![
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
                c.source
            ],
        )?;
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
        }
    }
}

const CASE_COLUMNS: &str = "id, incident_id, idempotency_key, eui, class_code, class_name, title,
    object_code, lat, lon, crs, address, unit_grid_code, grid_code, community_code, street_code,
    district_code, description, source, urgency, onset_ms, detected_ms, handling_limit,
    handling_due_ms, deploy_due_ms, feedback_due_ms, state, updated_ms, dispatched_ms, handled_ms,
    feedback_ms, closed_ms, platform, platform_id, delivered_ms";

fn case_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CaseView> {
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
    /// Registered devices as the rules and cases see them (site, kind and rule attributes),
    /// one at a time, for loading a million without holding them all.
    pub fn each_site(&self, f: impl FnMut(Eui, Site, Attributes)) -> Result<(), StoreError> {
        self.sites_where("", i64::MAX, f)
    }

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

    fn sites_where(
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

    /// Persisted rule states.
    pub fn rule_states(&self) -> Result<Vec<(Eui, String, RuleState)>, StoreError> {
        let mut out = Vec::new();
        self.each_rule_state(|eui, rule, state| out.push((eui, rule.to_owned(), state)))?;
        Ok(out)
    }

    /// [`Store::rule_states`] one at a time; the first row that does not parse is the error.
    pub fn each_rule_state(
        &self,
        mut f: impl FnMut(Eui, &str, RuleState),
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare("SELECT eui, rule, state FROM rule_state")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let rule = r.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
            let json = r.get_ref(2)?.as_str().map_err(rusqlite::Error::from)?;
            let state = serde_json::from_str(json).map_err(|e| StoreError::BadRow {
                table: "rule_state",
                what: format!("{rule}: {e}"),
            })?;
            f(Eui(r.get::<_, i64>(0)? as u64), rule, state);
        }
        Ok(())
    }

    /// The highest ids used, to continue from.
    pub fn sequences(&self) -> Result<Sequences, StoreError> {
        let max = |table: &str, col: &str| -> Result<i64, StoreError> {
            Ok(self.conn.query_row(
                &format!("SELECT COALESCE(MAX({col}), 0) FROM {table}"),
                [],
                |r| r.get(0),
            )?)
        };
        Ok(Sequences {
            incident: max("incidents", "id")?,
            case: max("cases", "id")?,
            cluster: max("incidents", "cluster_id")?,
            alert: max("alerts", "id")?,
        })
    }

    /// Incidents not closed, for the core after a restart.
    pub fn open_incidents(&self) -> Result<crate::cases::OpenIncidents, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT eui, condition, id, severity, state, onset_ms, detected_ms, case_id, cluster_id, grid_code
             FROM incidents WHERE state != 'closed'",
        )?;
        let rows = stmt.query_map([], |r| {
            let severity: String = r.get(3)?;
            let state: String = r.get(4)?;
            Ok((
                (Eui(r.get::<_, i64>(0)? as u64), r.get::<_, String>(1)?),
                OpenIncident {
                    id: r.get(2)?,
                    severity: Severity::parse(&severity).unwrap_or_default(),
                    onset_ms: r.get(5)?,
                    detected_ms: r.get(6)?,
                    case_id: r.get(7)?,
                    recovered: state == "recovered",
                    maintenance: state == "maintenance",
                    cluster_id: r.get(8)?,
                    grid_code: r.get(9)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a maintenance window; returns its id.
    pub fn add_window(
        &mut self,
        scope: &str,
        from_ms: i64,
        until_ms: i64,
        note: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO maintenance (scope, from_ms, until_ms, note, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![scope, from_ms, until_ms, note, now_ms],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Maintenance windows not yet over at `now_ms`.
    pub fn windows(&self, now_ms: i64) -> Result<Vec<MaintenanceWindow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, scope, from_ms, until_ms, note FROM maintenance WHERE until_ms > ?1 ORDER BY id",
        )?;
        Ok(stmt
            .query_map([now_ms], |r| {
                Ok(MaintenanceWindow {
                    id: r.get(0)?,
                    scope: r.get(1)?,
                    from_ms: r.get(2)?,
                    until_ms: r.get(3)?,
                    note: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    /// Cases, newest first, filtered.
    pub fn cases(&self, f: &CaseFilter) -> Result<Vec<CaseView>, StoreError> {
        let mut sql = format!("SELECT {CASE_COLUMNS} FROM cases WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut list = |sql: &mut String, col: &str, values: Vec<rusqlite::types::Value>| {
            if !values.is_empty() {
                let marks = vec!["?"; values.len()].join(", ");
                sql.push_str(&format!(" AND {col} IN ({marks})"));
                args.extend(values);
            }
        };
        list(&mut sql, "id", f.ids.iter().map(|i| (*i).into()).collect());
        list(&mut sql, "class_code", f.class_codes.iter().map(|c| c.clone().into()).collect());
        list(&mut sql, "state", f.states.iter().map(|s| s.as_str().to_owned().into()).collect());
        if let Some(s) = f.start_ms {
            sql.push_str(" AND detected_ms >= ?");
            args.push(s.into());
        }
        if let Some(e) = f.end_ms {
            sql.push_str(" AND detected_ms <= ?");
            args.push(e.into());
        }
        if let Some(a) = &f.area {
            sql.push_str(" AND substr(grid_code, 1, length(?)) = ?");
            args.push(a.clone().into());
            args.push(a.clone().into());
        }
        sql.push_str(" ORDER BY detected_ms DESC, id DESC LIMIT ?");
        args.push(i64::from(f.limit.max(1)).into());
        let mut stmt = self.conn.prepare(&sql)?;
        Ok(stmt.query_map(rusqlite::params_from_iter(args), case_row)?.collect::<Result<_, _>>()?)
    }

    /// One case.
    pub fn case(&self, id: i64) -> Result<Option<CaseView>, StoreError> {
        Ok(self
            .conn
            .query_row(&format!("SELECT {CASE_COLUMNS} FROM cases WHERE id = ?1"), [id], case_row)
            .optional()?)
    }

    /// Number of cases per class code.
    pub fn case_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT class_code, COUNT(*) FROM cases GROUP BY class_code")?;
        Ok(stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?)
    }

    /// The full trace of a case: the frames of its device from the incident's onset to its
    /// detection, the evidence of its incident, and every lifecycle entry, in time order.
    pub fn trace(&self, case_id: i64) -> Result<Vec<TraceEntry>, StoreError> {
        let Some(case) = self.case(case_id)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let eui = case.device_id.parse::<Eui>().map_or(0, |e| e.0 as i64);
        let mut frames = self.conn.prepare(
            "SELECT received_ms, counter, kind, body FROM messages
             WHERE eui = ?1 AND received_ms BETWEEN ?2 AND ?3 ORDER BY received_ms, counter",
        )?;
        // Frames from a minute before the onset to the last evidence.
        let last: i64 = self.conn.query_row(
            "SELECT COALESCE(MAX(at_ms), ?2) FROM incident_evidence WHERE incident_id = ?1",
            params![case.incident_id, case.detected_ms],
            |r| r.get(0),
        )?;
        for row in frames.query_map(params![eui, case.onset_ms - 60_000, last], |r| {
            Ok(TraceEntry {
                at_ms: r.get(0)?,
                kind: "frame",
                actor: format!("device:{}", case.device_id),
                detail: format!(
                    "#{} {}: {}",
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?
                ),
            })
        })? {
            out.push(row?);
        }
        let mut evidence = self.conn.prepare(
            "SELECT at_ms, change, severity, frame, evidence FROM incident_evidence WHERE incident_id = ?1 ORDER BY id",
        )?;
        for row in evidence.query_map([case.incident_id], |r| {
            let frame: Option<i64> = r.get(3)?;
            Ok(TraceEntry {
                at_ms: r.get(0)?,
                kind: "evidence",
                actor: "rules".into(),
                detail: format!(
                    "incident {} {} → {} ({}): {}",
                    case.incident_id.unwrap_or_default(),
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?.unwrap_or_else(|| "clear".into()),
                    frame.map_or_else(|| "timer".to_owned(), |f| format!("frame #{f}")),
                    r.get::<_, String>(4)?
                ),
            })
        })? {
            out.push(row?);
        }
        let mut events = self.conn.prepare(
            "SELECT at_ms, from_state, to_state, actor, note FROM case_events WHERE case_id = ?1 ORDER BY id",
        )?;
        for row in events.query_map([case_id], |r| {
            let from: Option<String> = r.get(1)?;
            let to: Option<String> = r.get(2)?;
            let note: String = r.get(4)?;
            Ok(TraceEntry {
                at_ms: r.get(0)?,
                kind: if to.is_some() { "state" } else { "note" },
                actor: r.get(3)?,
                detail: match (from, to) {
                    (_, None) => note,
                    (None, Some(t)) => format!("→ {t}: {note}"),
                    (Some(f), Some(t)) => format!("{f} → {t}: {note}"),
                },
            })
        })? {
            out.push(row?);
        }
        out.sort_by_key(|e| e.at_ms);
        Ok(out)
    }

    /// Moves a case through its lifecycle (operator or platform), recording who and why.
    /// Dispatch restarts the handling clock: the handling deadline is recomputed from it with
    /// `deadline` (the class's limit on the working calendar).
    pub fn transition(
        &mut self,
        case_id: i64,
        to: CaseState,
        actor: &str,
        note: &str,
        now_ms: i64,
        deadline: impl FnOnce(&str, i64) -> Option<i64>,
    ) -> Result<Result<CaseState, TransitionError>, StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(String, String)> = tx
            .query_row("SELECT state, handling_limit FROM cases WHERE id = ?1", [case_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((state, limit)) = row else { return Ok(Err(TransitionError::NotFound(case_id))) };
        let from = CaseState::parse(&state).ok_or_else(|| StoreError::BadRow {
            table: "cases",
            what: format!("state {state:?}"),
        })?;
        if let Err(e) = from.to(to) {
            return Ok(Err(TransitionError::Lifecycle(e)));
        }
        tx.execute(
            "UPDATE cases SET state = ?2, updated_ms = ?3 WHERE id = ?1",
            params![case_id, to.as_str(), now_ms],
        )?;
        if let Some(col) = stamp_column(to) {
            tx.execute(
                &format!("UPDATE cases SET {col} = ?2 WHERE id = ?1"),
                params![case_id, now_ms],
            )?;
        }
        if to == CaseState::Dispatched
            && let Some(due) = deadline(&limit, now_ms)
        {
            tx.execute(
                "UPDATE cases SET handling_due_ms = ?2 WHERE id = ?1",
                params![case_id, due],
            )?;
        }
        tx.execute(
            "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![case_id, now_ms, from.as_str(), to.as_str(), actor, note],
        )?;
        tx.commit()?;
        Ok(Ok(to))
    }

    /// Lifecycle entries that finished a case (closed or voided) after entry `after`: (entry,
    /// case). The ingest task polls this to release the cases' incidents.
    pub fn finished_cases(&self, after: i64) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, case_id FROM case_events WHERE id > ?1 AND to_state IN ('closed', 'voided') ORDER BY id",
        )?;
        Ok(stmt.query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?)
    }

    /// The last lifecycle entry id (to poll from).
    pub fn last_case_event(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT COALESCE(MAX(id), 0) FROM case_events", [], |r| r.get(0))?)
    }

    /// Outbox entries due at `now_ms` on a channel, oldest first.
    pub fn outbox_due(
        &self,
        channel: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, channel, subject, op, attempts, created_ms FROM outbox
             WHERE state = 'pending' AND channel = ?1 AND next_ms <= ?2 ORDER BY id LIMIT ?3",
        )?;
        Ok(stmt
            .query_map(params![channel, now_ms, limit], |r| {
                Ok(OutboxEntry {
                    id: r.get(0)?,
                    channel: r.get(1)?,
                    subject: r.get(2)?,
                    op: r.get(3)?,
                    attempts: r.get(4)?,
                    created_ms: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    /// The earliest time a pending entry of a channel is due.
    pub fn outbox_next_due(&self, channel: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.conn.query_row(
            "SELECT MIN(next_ms) FROM outbox WHERE state = 'pending' AND channel = ?1",
            [channel],
            |r| r.get(0),
        )?)
    }

    /// Records that an attempt is about to be made (before the request goes out, so a crash
    /// mid-request is known to have possibly reached the platform).
    pub fn outbox_begin(&mut self, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?1", [entry.id])?;
        Ok(())
    }

    /// Marks an entry delivered; for a case `create`, records the platform's id.
    pub fn outbox_done(
        &mut self,
        entry: &OutboxEntry,
        platform: &str,
        platform_id: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE outbox SET state = 'done', done_ms = ?2 WHERE id = ?1",
            params![entry.id, now_ms],
        )?;
        match entry.channel.as_str() {
            "case" => {
                if let Some(pid) = platform_id {
                    tx.execute(
                        "UPDATE cases SET platform = ?2, platform_id = ?3, delivered_ms = COALESCE(delivered_ms, ?4) WHERE id = ?1",
                        params![entry.subject, platform, pid, now_ms],
                    )?;
                }
            }
            _ => {
                tx.execute(
                    "UPDATE alerts SET delivered_ms = COALESCE(delivered_ms, ?2) WHERE id = ?1",
                    params![entry.subject, now_ms],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a failed attempt: retried at `next_ms`, or dead-lettered (`next_ms` `None`).
    pub fn outbox_failed(
        &mut self,
        entry: &OutboxEntry,
        error: &str,
        next_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        match next_ms {
            Some(next) => self.conn.execute(
                "UPDATE outbox SET next_ms = ?2, last_error = ?3 WHERE id = ?1",
                params![entry.id, next, error],
            )?,
            None => self.conn.execute(
                "UPDATE outbox SET state = 'dead', done_ms = ?2, last_error = ?3 WHERE id = ?1",
                params![entry.id, now_ms, error],
            )?,
        };
        Ok(())
    }

    /// Outbox entries, newest first: of one case (`case`), or in one state (`state`), or all.
    pub fn outbox(
        &self,
        case: Option<i64>,
        state: Option<&str>,
        limit: u32,
    ) -> Result<Vec<OutboxView>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, channel, subject, op, state, attempts, created_ms, next_ms, done_ms, last_error
             FROM outbox WHERE (?1 IS NULL OR (channel = 'case' AND subject = ?1))
             AND (?2 IS NULL OR state = ?2) ORDER BY id DESC LIMIT ?3",
        )?;
        Ok(stmt
            .query_map(params![case, state, limit], |r| {
                Ok(OutboxView {
                    id: r.get(0)?,
                    channel: r.get(1)?,
                    subject: r.get(2)?,
                    op: r.get(3)?,
                    state: r.get(4)?,
                    attempts: r.get(5)?,
                    created_ms: r.get(6)?,
                    next_ms: r.get(7)?,
                    done_ms: r.get(8)?,
                    last_error: r.get(9)?,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    /// The state of one outbox entry, if it exists.
    pub fn outbox_state(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT state FROM outbox WHERE id = ?1", [id], |r| r.get(0))
            .optional()?)
    }

    /// Puts dead-lettered entries back in the queue, due now: entry `id`, or every dead entry
    /// when `id` is `None`. Attempts are kept, so a case that may have reached the platform
    /// is looked for before it is posted again. Each case's trace notes who asked. Returns
    /// the entries requeued (none: `id` is not dead, or does not exist).
    pub fn outbox_retry(
        &mut self,
        id: Option<i64>,
        actor: &str,
        now_ms: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let dead: Vec<(i64, String, i64, Option<String>)> = {
            let mut stmt = tx.prepare(
                "SELECT id, channel, subject, last_error FROM outbox
                 WHERE state = 'dead' AND (?1 IS NULL OR id = ?1) ORDER BY id",
            )?;
            stmt.query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?
        };
        for (entry, channel, subject, error) in &dead {
            tx.execute(
                "UPDATE outbox SET state = 'pending', next_ms = ?2, done_ms = NULL WHERE id = ?1",
                params![entry, now_ms],
            )?;
            if channel == "case" {
                tx.execute(
                    "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note) VALUES (?1, ?2, NULL, NULL, ?3, ?4)",
                    params![
                        subject,
                        now_ms,
                        actor,
                        format!(
                            "delivery entry {entry} requeued after it was given up ({})",
                            error.as_deref().unwrap_or("no error recorded")
                        )
                    ],
                )?;
            }
        }
        tx.commit()?;
        Ok(dead.into_iter().map(|(entry, ..)| entry).collect())
    }

    /// Adds a note (no state change) to a case's trace.
    pub fn case_note(
        &mut self,
        case_id: i64,
        actor: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note) VALUES (?1, ?2, NULL, NULL, ?3, ?4)",
            params![case_id, now_ms, actor, note],
        )?;
        Ok(())
    }

    /// Outbox entries by state (`pending`, `done`, `dead`).
    pub fn outbox_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT state, COUNT(*) FROM outbox GROUP BY state")?;
        Ok(stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?)
    }

    /// One alert.
    pub fn alert(&self, id: i64) -> Result<Option<AlertView>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, eui, at_ms, received_ms, lat, lon, grid_code, delivered_ms FROM alerts WHERE id = ?1",
                [id],
                |r| {
                    Ok(AlertView {
                        id: r.get(0)?,
                        device_id: Eui(r.get::<_, i64>(1)? as u64).to_string(),
                        at_ms: r.get(2)?,
                        received_ms: r.get(3)?,
                        lat: r.get(4)?,
                        lon: r.get(5)?,
                        grid_code: r.get(6)?,
                        delivered_ms: r.get(7)?,
                    })
                },
            )
            .optional()?)
    }

    /// Patrol visits per (grid, day).
    pub fn patrol_coverage(
        &self,
        day: &str,
    ) -> Result<Vec<(Option<String>, u64, u64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT grid_code, COUNT(*), COUNT(DISTINCT eui) FROM patrols WHERE day = ?1 GROUP BY grid_code ORDER BY grid_code",
        )?;
        Ok(stmt
            .query_map([day], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<_, _>>()?)
    }

    /// Incidents of a cluster: (incident, device, condition, severity, state, case).
    pub fn cluster(&self, cluster_id: i64) -> Result<Vec<ClusterMember>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, eui, condition, severity, state, case_id FROM incidents WHERE cluster_id = ?1 ORDER BY id",
        )?;
        Ok(stmt
            .query_map([cluster_id], |r| {
                Ok(ClusterMember {
                    incident_id: r.get(0)?,
                    device_id: Eui(r.get::<_, i64>(1)? as u64).to_string(),
                    condition: r.get(2)?,
                    severity: r.get(3)?,
                    state: r.get(4)?,
                    case_id: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    /// The cluster of an incident.
    pub fn incident_cluster(&self, incident: i64) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT cluster_id FROM incidents WHERE id = ?1", [incident], |r| r.get(0))
            .optional()?
            .flatten())
    }

    /// A signed platform callback that moves a case: refused when its signature was taken
    /// before (a replay; signatures are remembered for `keep_ms`), then the same lifecycle
    /// rules as an operator's move ([`Store::transition`]); the same state again changes
    /// nothing. Every signature is remembered, taken or refused.
    #[allow(clippy::too_many_arguments)]
    pub fn platform_callback(
        &mut self,
        signature: &str,
        keep_ms: i64,
        case_id: i64,
        to: CaseState,
        note: &str,
        now_ms: i64,
        deadline: impl FnOnce(&str, i64) -> Option<i64>,
    ) -> Result<Result<CallbackOutcome, TransitionError>, StoreError> {
        self.conn.execute(
            "DELETE FROM callback_signatures WHERE seen_ms < ?1",
            [now_ms.saturating_sub(keep_ms)],
        )?;
        // Remembered first: a crash after the move cannot let the same callback in again.
        let fresh = self.conn.execute(
            "INSERT OR IGNORE INTO callback_signatures (signature, seen_ms) VALUES (?1, ?2)",
            params![signature, now_ms],
        )?;
        if fresh == 0 {
            return Ok(Ok(CallbackOutcome::Replayed));
        }
        let state: Option<String> = self
            .conn
            .query_row("SELECT state FROM cases WHERE id = ?1", [case_id], |r| r.get(0))
            .optional()?;
        let Some(state) = state else { return Ok(Err(TransitionError::NotFound(case_id))) };
        let outcome = if state == to.as_str() {
            CallbackOutcome::Unchanged
        } else {
            match self.transition(case_id, to, "platform", note, now_ms, deadline)? {
                Ok(_) => CallbackOutcome::Moved,
                Err(e) => return Ok(Err(e)),
            }
        };
        Ok(Ok(outcome))
    }

    /// Records a state the platform reports (the platform is authoritative: no lifecycle
    /// check; an unchanged state records nothing). Returns whether the case exists. The Open311
    /// status poller uses it for closures, the only state GeoReport v2 reports.
    pub fn platform_state(
        &mut self,
        case_id: i64,
        to: CaseState,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let from: Option<String> = tx
            .query_row("SELECT state FROM cases WHERE id = ?1", [case_id], |r| r.get(0))
            .optional()?;
        let Some(from) = from else { return Ok(false) };
        if from != to.as_str() {
            tx.execute(
                "UPDATE cases SET state = ?2, updated_ms = ?3 WHERE id = ?1",
                params![case_id, to.as_str(), now_ms],
            )?;
            if let Some(col) = stamp_column(to) {
                tx.execute(
                    &format!("UPDATE cases SET {col} = ?2 WHERE id = ?1"),
                    params![case_id, now_ms],
                )?;
            }
            tx.execute(
                "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note) VALUES (?1, ?2, ?3, ?4, 'platform', ?5)",
                params![case_id, now_ms, from, to.as_str(), note],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Delivered cases on a platform not yet final: (case, platform id).
    pub fn platform_open(&self, platform: &str) -> Result<Vec<(i64, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, platform_id FROM cases WHERE platform = ?1 AND platform_id IS NOT NULL
             AND state NOT IN ('closed', 'voided') ORDER BY id",
        )?;
        Ok(stmt.query_map([platform], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?)
    }

    /// Replaces a case's platform id (a token resolved to an id).
    pub fn set_platform_id(&mut self, case_id: i64, platform_id: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE cases SET platform_id = ?2 WHERE id = ?1",
            params![case_id, platform_id],
        )?;
        Ok(())
    }

    /// Incidents by state.
    pub fn incident_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT state, COUNT(*) FROM incidents GROUP BY state")?;
        Ok(stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?)
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
