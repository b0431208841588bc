//! The local case board: the operators' lifecycle moves, lists, traces, clusters, patrols, outbox views and platform callbacks.

use std::collections::BTreeMap;

use gridsense_protocol::Eui;
use rusqlite::{OptionalExtension, params};

use super::{cases::*, *};
use crate::{calendar::Calendar, cases::CaseState};

/// The local case board: the operators' lifecycle moves, lists, traces, clusters, patrols, outbox views and platform callbacks.
pub trait CaseBoard: CaseLookup + Maintenance {
    /// Cases, newest first, filtered.
    fn cases(&self, f: &CaseFilter) -> Result<Vec<CaseView>, StoreError>;

    /// Number of cases per class code.
    fn case_counts(&self) -> Result<BTreeMap<String, u64>, StoreError>;

    /// The full trace of a case: the frames of its device from the incident's onset to its
    /// detection, the evidence of its incident, and every lifecycle entry, in time order.
    fn trace(&self, case_id: i64) -> Result<Vec<TraceEntry>, StoreError>;

    /// Moves a case through its lifecycle (operator or platform), recording who and why: the
    /// move is decided by [`lifecycle::step`] (legality, the milestone stamped, the handling
    /// clock a dispatch restarts on `calendar`) and applied in one transaction.
    fn transition(
        &mut self,
        case_id: i64,
        to: CaseState,
        actor: &str,
        note: &str,
        now_ms: i64,
        calendar: &Calendar,
    ) -> Result<Result<CaseState, TransitionError>, StoreError>;

    /// Outbox entries, newest first: of one case (`case`), or in one state (`state`), or all.
    fn outbox(
        &self,
        case: Option<i64>,
        state: Option<&str>,
        limit: u32,
    ) -> Result<Vec<OutboxView>, StoreError>;

    /// The state of one outbox entry, if it exists.
    fn outbox_state(&self, id: i64) -> Result<Option<String>, StoreError>;

    /// Puts dead-lettered entries back in the queue, due now: entry `id`, or every dead entry
    /// when `id` is `None`. Attempts are kept, so a case that may have reached the platform
    /// is looked for before it is posted again. Each case's trace notes who asked. Returns
    /// the entries requeued (none: `id` is not dead, or does not exist).
    fn outbox_retry(
        &mut self,
        id: Option<i64>,
        actor: &str,
        now_ms: i64,
    ) -> Result<Vec<i64>, StoreError>;

    /// Patrol visits per (grid, day).
    fn patrol_coverage(&self, day: &str) -> Result<Vec<(Option<String>, u64, u64)>, StoreError>;

    /// Incidents of a cluster: (incident, device, condition, severity, state, case).
    fn cluster(&self, cluster_id: i64) -> Result<Vec<ClusterMember>, StoreError>;

    /// The cluster of an incident.
    fn incident_cluster(&self, incident: i64) -> Result<Option<i64>, StoreError>;

    /// A signed platform callback that moves a case: refused when its signature was taken
    /// before (a replay; signatures are remembered for `keep_ms`), then the same lifecycle
    /// rules as an operator's move ([`Store::transition`]); the same state again changes
    /// nothing. Every signature is remembered, taken or refused.
    #[allow(clippy::too_many_arguments)]
    fn platform_callback(
        &mut self,
        signature: &str,
        keep_ms: i64,
        case_id: i64,
        to: CaseState,
        note: &str,
        now_ms: i64,
        calendar: &Calendar,
    ) -> Result<Result<CallbackOutcome, TransitionError>, StoreError>;
}

impl CaseBoard for Store {
    fn cases(&self, f: &CaseFilter) -> Result<Vec<CaseView>, StoreError> {
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

    fn case_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT class_code, COUNT(*) FROM cases GROUP BY class_code")?;
        Ok(stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?)
    }

    fn trace(&self, case_id: i64) -> Result<Vec<TraceEntry>, StoreError> {
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
            Ok(frame_entry(
                r.get(0)?,
                &case.device_id,
                r.get(1)?,
                &r.get::<_, String>(2)?,
                &r.get::<_, String>(3)?,
            ))
        })? {
            out.push(row?);
        }
        let mut evidence = self.conn.prepare(
            "SELECT at_ms, change, severity, frame, evidence FROM incident_evidence WHERE incident_id = ?1 ORDER BY id",
        )?;
        for row in evidence.query_map([case.incident_id], |r| {
            Ok(evidence_entry(
                r.get(0)?,
                case.incident_id,
                &r.get::<_, String>(1)?,
                r.get(2)?,
                r.get(3)?,
                &r.get::<_, String>(4)?,
            ))
        })? {
            out.push(row?);
        }
        let mut events = self.conn.prepare(
            "SELECT at_ms, from_state, to_state, actor, note FROM case_events WHERE case_id = ?1 ORDER BY id",
        )?;
        for row in events.query_map([case_id], |r| {
            Ok(event_entry(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })? {
            out.push(row?);
        }
        out.sort_by_key(|e| e.at_ms);
        Ok(out)
    }

    fn transition(
        &mut self,
        case_id: i64,
        to: CaseState,
        actor: &str,
        note: &str,
        now_ms: i64,
        calendar: &Calendar,
    ) -> Result<Result<CaseState, TransitionError>, StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(String, String)> = tx
            .query_row("SELECT state, handling_limit FROM cases WHERE id = ?1", [case_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((state, limit)) = row else { return Ok(Err(TransitionError::NotFound(case_id))) };
        let m = match decide_move(&state, &limit, to, now_ms, calendar)? {
            Ok(m) => m,
            Err(e) => return Ok(Err(e)),
        };
        let from = m.from;
        tx.execute(
            &move_update(&m, '?'),
            params![case_id, to.as_str(), now_ms, m.handling_due_ms],
        )?;
        tx.execute(
            "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![case_id, now_ms, from.as_str(), to.as_str(), actor, note],
        )?;
        tx.commit()?;
        Ok(Ok(to))
    }

    fn outbox(
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

    fn outbox_state(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT state FROM outbox WHERE id = ?1", [id], |r| r.get(0))
            .optional()?)
    }

    fn outbox_retry(
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

    fn patrol_coverage(&self, day: &str) -> Result<Vec<(Option<String>, u64, u64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT grid_code, COUNT(*), COUNT(DISTINCT eui) FROM patrols WHERE day = ?1 GROUP BY grid_code ORDER BY grid_code",
        )?;
        Ok(stmt
            .query_map([day], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<_, _>>()?)
    }

    fn cluster(&self, cluster_id: i64) -> Result<Vec<ClusterMember>, StoreError> {
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

    fn incident_cluster(&self, incident: i64) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT cluster_id FROM incidents WHERE id = ?1", [incident], |r| r.get(0))
            .optional()?
            .flatten())
    }

    #[allow(clippy::too_many_arguments)]
    fn platform_callback(
        &mut self,
        signature: &str,
        keep_ms: i64,
        case_id: i64,
        to: CaseState,
        note: &str,
        now_ms: i64,
        calendar: &Calendar,
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
            match self.transition(case_id, to, "platform", note, now_ms, calendar)? {
                Ok(_) => CallbackOutcome::Moved,
                Err(e) => return Ok(Err(e)),
            }
        };
        Ok(Ok(outcome))
    }
}
