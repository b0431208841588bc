//! The store's part for the governance loop: routing a case to a department, supervision's
//! escalations, the registry's grid workers, and what the assessment report reads. The SQL is
//! shared by both backends where the dialects agree; the decisions are the core's
//! ([`crate::cases::governance`], [`crate::assessment`]).

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::{
    assessment::{Area, CaseFact, CheckIn, DeviceFact, Worker},
    calendar::Calendar,
    cases::{
        CaseState, CaseTables,
        governance::{self, Escalation, Level, Supervised},
        lifecycle::Clocks,
    },
};

/// An escalation supervision applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Escalated {
    /// Case id.
    pub case_id: i64,
    /// Level before.
    pub from: Level,
    /// Level after.
    pub to: Level,
    /// Why (`deploy`, `feedback`, `handling`: the timer that went red; `returned`).
    pub causes: Vec<&'static str>,
}

/// The governance loop's store.
pub trait Governance {
    /// Cases detected in `[from_ms, to_ms)`, as the report reads them.
    fn report_cases(&self, from_ms: i64, to_ms: i64) -> Result<Vec<CaseFact>, StoreError>;

    /// The active devices with their grid (where the grid layer placed them, else the
    /// registry's), online and low-battery flags.
    fn report_devices(&self) -> Result<Vec<DeviceFact>, StoreError>;

    /// The areas devices were placed in (codes only): the report's rows when no grid layer is
    /// configured where it is made.
    fn report_areas(&self) -> Result<Vec<Area>, StoreError>;

    /// Patrol check-ins in `[from_ms, to_ms)`.
    fn report_checkins(&self, from_ms: i64, to_ms: i64) -> Result<Vec<CheckIn>, StoreError>;

    /// The grid workers, by id.
    fn workers(&self) -> Result<Vec<Worker>, StoreError>;

    /// Adds or replaces grid workers (by id); returns how many.
    fn put_workers(&mut self, workers: &[Worker]) -> Result<usize, StoreError>;

    /// Routes a case to `department`, recording who and why in its trace; `false`: no such
    /// case.
    fn route(
        &mut self,
        case_id: i64,
        department: &str,
        actor: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// The unfinished cases, as supervision reads them.
    fn unfinished(&self) -> Result<Vec<OpenRow>, StoreError>;

    /// Applies one escalation of case `row` at `now_ms` in one transaction: its new level and
    /// causes, a trace entry (actor `supervision`) and an outbox update for the platform.
    /// `false`: the case changed meanwhile (another supervisor escalated it, or it finished),
    /// and nothing was written.
    fn escalate(&mut self, row: &OpenRow, e: &Escalation, now_ms: i64) -> Result<bool, StoreError>;

    /// Supervision (督办): every unfinished case whose escalation the tables' rules call for
    /// at `now_ms` moves up a level ([`Governance::escalate`]); a case another supervisor
    /// escalated meanwhile is left alone. Returns what it escalated.
    fn supervise(
        &mut self,
        tables: &CaseTables,
        calendar: &Calendar,
        now_ms: i64,
    ) -> Result<Vec<Escalated>, StoreError> {
        let mut done = Vec::new();
        for row in self.unfinished()? {
            let Some(e) = row.decide(tables, calendar, now_ms)? else { continue };
            if self.escalate(&row, &e, now_ms)? {
                done.push(Escalated { case_id: row.id, from: e.from, to: e.to, causes: e.causes });
            }
        }
        Ok(done)
    }
}

/// The UPDATE of an escalation (parameters: 1 id, 2 level, 3 causes after, 4 time, 5 causes
/// before — the guard), with `sigil`.
pub(super) fn escalation_update(sigil: char) -> String {
    format!(
        "UPDATE cases SET level = {sigil}2, escalated = {sigil}3, updated_ms = {sigil}4
         WHERE id = {sigil}1 AND escalated = {sigil}5 AND state NOT IN ('closed', 'voided')"
    )
}

/// The columns [`case_fact`] reads, in order.
pub(super) const FACT_COLUMNS: &str = "id, class_code, source, eui, object_code, grid_code,
    community_code, street_code, department, level, first_level, detected_ms, deploy_due_ms,
    feedback_due_ms, handling_due_ms, handling_limit, filed_ms, first_dispatched_ms, dispatched_ms,
    handled_ms, feedback_ms, closed_ms, state, returns, reworks";

/// The columns an open case's supervision reads, in order.
pub(super) const SUPERVISED_COLUMNS: &str = "id, state, handling_limit, detected_ms,
    deploy_due_ms, feedback_due_ms, handling_due_ms, dispatched_ms, handled_ms, feedback_ms,
    closed_ms, level, returns, escalated";

/// The unfinished cases supervision looks at.
pub(super) const SUPERVISED_WHERE: &str = "state NOT IN ('closed', 'voided') ORDER BY id";

/// The devices the report counts.
pub(super) const DEVICES_SQL: &str = "SELECT COALESCE(p.grid_code, d.grid_code),
    CASE WHEN h.online THEN 1 ELSE 0 END, CASE WHEN h.low_battery THEN 1 ELSE 0 END
    FROM devices d LEFT JOIN placements p ON p.eui = d.eui LEFT JOIN health h ON h.eui = d.eui
    WHERE d.status = 'active'";

/// The placed areas.
pub(super) const AREAS_SQL: &str = "SELECT DISTINCT grid_code, COALESCE(community_code, ''),
    COALESCE(street_code, '') FROM placements WHERE grid_code IS NOT NULL ORDER BY 1";

/// An area known by its codes only.
pub(super) fn coded_area(grid_code: String, community_code: String, street_code: String) -> Area {
    Area {
        grid_code,
        community_code,
        street_code,
        grid_name: String::new(),
        community_name: String::new(),
        street_name: String::new(),
    }
}

/// A case's fact from its stored values (both backends read the columns into these).
pub(super) struct FactRow {
    pub id: i64,
    pub class_code: String,
    pub source: String,
    pub eui: i64,
    pub object_code: Option<String>,
    pub grid_code: Option<String>,
    pub community_code: Option<String>,
    pub street_code: Option<String>,
    pub department: Option<String>,
    pub level: String,
    pub first_level: String,
    pub times: [i64; 4],
    pub handling_limit: String,
    pub stamps: [Option<i64>; 6],
    pub state: String,
    pub returns: i64,
    pub reworks: i64,
}

fn level_of(s: &str, table: &'static str) -> Result<Level, StoreError> {
    s.parse().map_err(|what| StoreError::BadRow { table, what })
}

impl FactRow {
    pub(super) fn fact(self) -> Result<CaseFact, StoreError> {
        let eui = gridsense_protocol::Eui(self.eui as u64).to_string();
        let [detected_ms, deploy_due_ms, feedback_due_ms, handling_due_ms] = self.times;
        let [filed_ms, first_dispatched_ms, dispatched_ms, handled_ms, feedback_ms, closed_ms] =
            self.stamps;
        Ok(CaseFact {
            id: self.id,
            class_code: self.class_code,
            source: self.source,
            object: self.object_code.unwrap_or_else(|| eui.clone()),
            eui,
            grid_code: self.grid_code,
            community_code: self.community_code,
            street_code: self.street_code,
            department: self.department,
            level: level_of(&self.level, "cases")?,
            first_level: level_of(&self.first_level, "cases")?,
            detected_ms,
            deploy_due_ms,
            feedback_due_ms,
            handling_due_ms,
            handling_limit: self.handling_limit,
            filed_ms,
            first_dispatched_ms,
            dispatched_ms,
            handled_ms,
            feedback_ms,
            closed_ms,
            state: CaseState::parse(&self.state).ok_or_else(|| StoreError::BadRow {
                table: "cases",
                what: format!("state {:?}", self.state),
            })?,
            returns: u32::try_from(self.returns).unwrap_or(u32::MAX),
            reworks: u32::try_from(self.reworks).unwrap_or(u32::MAX),
        })
    }
}

/// An unfinished case as stored, for supervision.
#[derive(Debug, Clone)]
pub struct OpenRow {
    /// Case id.
    pub id: i64,
    /// Lifecycle state.
    pub state: String,
    /// Handling limit, stored form.
    pub handling_limit: String,
    /// Detected, deploy due, feedback due, handling due (Unix ms).
    pub times: [i64; 4],
    /// Dispatched, handled, feedback, closed (Unix ms).
    pub stamps: [Option<i64>; 4],
    /// Level now.
    pub level: String,
    /// Times returned.
    pub returns: i64,
    /// Causes escalated for so far.
    pub escalated: String,
}

impl OpenRow {
    /// What supervision decides for it at `now`.
    pub(super) fn decide(
        &self,
        tables: &CaseTables,
        calendar: &Calendar,
        now_ms: i64,
    ) -> Result<Option<Escalation>, StoreError> {
        let [detected_ms, deploy_due_ms, feedback_due_ms, handling_due_ms] = self.times;
        let [dispatched_ms, handled_ms, feedback_ms, closed_ms] = self.stamps;
        let finished = CaseState::parse(&self.state).is_none_or(CaseState::is_final);
        let case = Supervised {
            clocks: Clocks {
                detected_ms,
                handling_limit: &self.handling_limit,
                deploy_due_ms,
                feedback_due_ms,
                handling_due_ms,
                dispatched_ms,
                handled_ms,
                feedback_ms,
                closed_ms,
            },
            finished,
            level: level_of(&self.level, "cases")?,
            returns: u32::try_from(self.returns).unwrap_or(u32::MAX),
            escalated: &self.escalated,
        };
        Ok(governance::escalation(&tables.escalation, &case, &tables.milestones, calendar, now_ms))
    }
}

/// The trace note of an escalation.
pub(super) fn escalation_note(e: &Escalation) -> String {
    let why: Vec<String> = e
        .causes
        .iter()
        .map(|c| match *c {
            governance::RETURNED => "returned repeatedly (多次退回)".to_owned(),
            timer => format!("{timer} timer red (超时)"),
        })
        .collect();
    if e.from == e.to {
        format!("督办 supervised at {} level: {}", e.to, why.join(", "))
    } else {
        format!("督办 escalated {} → {}: {}", e.from, e.to, why.join(", "))
    }
}

fn sqlite_fact(r: &rusqlite::Row<'_>) -> rusqlite::Result<FactRow> {
    Ok(FactRow {
        id: r.get(0)?,
        class_code: r.get(1)?,
        source: r.get(2)?,
        eui: r.get(3)?,
        object_code: r.get(4)?,
        grid_code: r.get(5)?,
        community_code: r.get(6)?,
        street_code: r.get(7)?,
        department: r.get(8)?,
        level: r.get(9)?,
        first_level: r.get(10)?,
        times: [r.get(11)?, r.get(12)?, r.get(13)?, r.get(14)?],
        handling_limit: r.get(15)?,
        stamps: [r.get(16)?, r.get(17)?, r.get(18)?, r.get(19)?, r.get(20)?, r.get(21)?],
        state: r.get(22)?,
        returns: r.get(23)?,
        reworks: r.get(24)?,
    })
}

fn sqlite_worker(r: &rusqlite::Row<'_>) -> rusqlite::Result<Worker> {
    Ok(Worker {
        id: r.get(0)?,
        name: r.get(1)?,
        grid_code: r.get(2)?,
        beacon: r.get(3)?,
        valid_from: r.get(4)?,
        valid_to: r.get(5)?,
    })
}

/// Adds or replaces a worker (parameters 1 … 6 in [`Worker`]'s order), with `sigil`.
pub(super) fn worker_upsert(sigil: char) -> String {
    let m: Vec<String> = (1..=6).map(|n| format!("{sigil}{n}")).collect();
    format!(
        "INSERT INTO workers (id, name, grid_code, beacon, valid_from, valid_to) VALUES ({})
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, grid_code = EXCLUDED.grid_code,
            beacon = EXCLUDED.beacon, valid_from = EXCLUDED.valid_from, valid_to = EXCLUDED.valid_to",
        m.join(", ")
    )
}

impl Governance for Store {
    fn report_cases(&self, from_ms: i64, to_ms: i64) -> Result<Vec<CaseFact>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {FACT_COLUMNS} FROM cases WHERE detected_ms >= ?1 AND detected_ms < ?2 ORDER BY id"
        ))?;
        let rows = stmt.query_map(params![from_ms, to_ms], sqlite_fact)?;
        rows.map(|r| r.map_err(StoreError::from).and_then(FactRow::fact)).collect()
    }

    fn report_devices(&self) -> Result<Vec<DeviceFact>, StoreError> {
        let mut stmt = self.conn.prepare(DEVICES_SQL)?;
        let rows = stmt.query_map([], |r| {
            Ok(DeviceFact {
                grid_code: r.get(0)?,
                online: r.get::<_, i64>(1)? != 0,
                low_battery: r.get::<_, i64>(2)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn report_areas(&self) -> Result<Vec<Area>, StoreError> {
        let mut stmt = self.conn.prepare(AREAS_SQL)?;
        let rows = stmt.query_map([], |r| Ok(coded_area(r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn report_checkins(&self, from_ms: i64, to_ms: i64) -> Result<Vec<CheckIn>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT eui, at_ms, grid_code FROM patrols WHERE at_ms >= ?1 AND at_ms < ?2 ORDER BY at_ms",
        )?;
        let rows = stmt.query_map(params![from_ms, to_ms], |r| {
            Ok(CheckIn {
                eui: gridsense_protocol::Eui(r.get::<_, i64>(0)? as u64).to_string(),
                at_ms: r.get(1)?,
                grid_code: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn workers(&self) -> Result<Vec<Worker>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, grid_code, beacon, valid_from, valid_to FROM workers ORDER BY id",
        )?;
        Ok(stmt.query_map([], sqlite_worker)?.collect::<Result<_, _>>()?)
    }

    fn put_workers(&mut self, workers: &[Worker]) -> Result<usize, StoreError> {
        let _turn = self.turns.wait();
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut put = tx.prepare_cached(&worker_upsert('?'))?;
            for w in workers {
                put.execute(params![
                    w.id,
                    w.name,
                    w.grid_code,
                    w.beacon.to_ascii_lowercase(),
                    w.valid_from,
                    w.valid_to
                ])?;
            }
        }
        tx.commit()?;
        Ok(workers.len())
    }

    fn route(
        &mut self,
        case_id: i64,
        department: &str,
        actor: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.turns.wait();
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let before: Option<Option<String>> = tx
            .query_row("SELECT department FROM cases WHERE id = ?1", [case_id], |r| r.get(0))
            .optional()?;
        let Some(before) = before else { return Ok(false) };
        tx.execute(
            "UPDATE cases SET department = ?2, updated_ms = ?3 WHERE id = ?1",
            params![case_id, department, now_ms],
        )?;
        tx.execute(
            "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
             VALUES (?1, ?2, NULL, NULL, ?3, ?4)",
            params![case_id, now_ms, actor, route_note(before.as_deref(), department, note)],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn unfinished(&self) -> Result<Vec<OpenRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {SUPERVISED_COLUMNS} FROM cases WHERE {SUPERVISED_WHERE}"))?;
        let rows = stmt.query_map([], |r| {
            Ok(OpenRow {
                id: r.get(0)?,
                state: r.get(1)?,
                handling_limit: r.get(2)?,
                times: [r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?],
                stamps: [r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?],
                level: r.get(11)?,
                returns: r.get(12)?,
                escalated: r.get(13)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn escalate(&mut self, row: &OpenRow, e: &Escalation, now_ms: i64) -> Result<bool, StoreError> {
        let _turn = self.turns.wait();
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let after = governance::escalated_after(&row.escalated, e);
        let n = tx.execute(
            &escalation_update('?'),
            params![row.id, e.to.as_str(), after, now_ms, row.escalated],
        )?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
             VALUES (?1, ?2, NULL, NULL, 'supervision', ?3)",
            params![row.id, now_ms, escalation_note(e)],
        )?;
        tx.execute(
            "INSERT INTO outbox (channel, subject, op, created_ms, next_ms) VALUES ('case', ?1, 'update', ?2, ?2)",
            params![row.id, now_ms],
        )?;
        tx.commit()?;
        Ok(true)
    }
}

/// The trace note of a routing.
pub(super) fn route_note(before: Option<&str>, department: &str, note: &str) -> String {
    let base = match before {
        Some(b) if b != department => format!("routed {b} → {department}"),
        _ => format!("routed to {department}"),
    };
    if note.is_empty() { base } else { format!("{base}: {note}") }
}
