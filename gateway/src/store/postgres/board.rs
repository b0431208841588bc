//! The case board and the delivery outbox on PostgreSQL.

use std::collections::BTreeMap;

use tokio_postgres::{Row, types::ToSql};

use super::{Conn, PgStore, eui, wait};
use crate::{
    calendar::Calendar,
    cases::CaseState,
    store::{
        AlertView, CallbackOutcome, CaseBoard, CaseFilter, CaseLookup, CaseView, ClusterMember,
        Outbox, OutboxEntry, OutboxView, StoreError, TraceEntry, TransitionError,
        cases::{
            CASE_COLUMNS, decide_move, event_entry, evidence_entry, frame_entry, move_update,
            stamp_column,
        },
    },
};

fn case_row(r: &Row) -> CaseView {
    CaseView {
        id: r.get(0),
        incident_id: r.get(1),
        idempotency_key: r.get(2),
        device_id: eui(r.get(3)).to_string(),
        class_code: r.get(4),
        class_name: r.get(5),
        title: r.get(6),
        object_code: r.get(7),
        lat: r.get(8),
        lon: r.get(9),
        crs: r.get(10),
        address: r.get(11),
        unit_grid_code: r.get(12),
        grid_code: r.get(13),
        community_code: r.get(14),
        street_code: r.get(15),
        district_code: r.get(16),
        description: r.get(17),
        source: r.get(18),
        urgency: r.get(19),
        onset_ms: r.get(20),
        detected_ms: r.get(21),
        handling_limit: r.get(22),
        handling_due_ms: r.get(23),
        deploy_due_ms: r.get(24),
        feedback_due_ms: r.get(25),
        state: r.get(26),
        updated_ms: r.get(27),
        dispatched_ms: r.get(28),
        handled_ms: r.get(29),
        feedback_ms: r.get(30),
        closed_ms: r.get(31),
        platform: r.get(32),
        platform_id: r.get(33),
        delivered_ms: r.get(34),
        department: r.get(35),
        level: r.get(36),
        first_level: r.get(37),
        returns: i64::from(r.get::<_, i32>(38)),
        escalated: r.get(39),
    }
}

fn attempts(r: &Row, n: usize) -> u32 {
    u32::try_from(r.get::<_, i64>(n)).unwrap_or(u32::MAX)
}

/// Records a lifecycle note (no state change) on a case.
fn note_in(
    c: &(impl tokio_postgres::GenericClient + Sync),
    case_id: i64,
    actor: &str,
    note: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    wait(c.execute(
        "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
         VALUES ($1, $2, NULL, NULL, $3, $4)",
        &[&case_id, &now_ms, &actor, &note],
    ))?;
    Ok(())
}

impl CaseLookup for PgStore {
    fn case(&self, id: i64) -> Result<Option<CaseView>, StoreError> {
        self.with(|c| {
            Ok(wait(
                c.query_opt(&format!("SELECT {CASE_COLUMNS} FROM cases WHERE id = $1"), &[&id]),
            )?
            .map(|r| case_row(&r)))
        })
    }
}

impl Outbox for PgStore {
    fn outbox_due(
        &self,
        channel: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT id, channel, subject, op, attempts, created_ms FROM outbox
                 WHERE state = 'pending' AND channel = $1 AND next_ms <= $2 ORDER BY id LIMIT $3",
                &[&channel, &now_ms, &i64::from(limit)],
            ))?
            .iter()
            .map(|r| OutboxEntry {
                id: r.get(0),
                channel: r.get(1),
                subject: r.get(2),
                op: r.get(3),
                attempts: attempts(r, 4),
                created_ms: r.get(5),
            })
            .collect())
        })
    }

    fn outbox_next_due(&self, channel: &str) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_one(
                "SELECT min(next_ms) FROM outbox WHERE state = 'pending' AND channel = $1",
                &[&channel],
            ))?
            .get(0))
        })
    }

    fn outbox_begin(&mut self, entry: &OutboxEntry, now_ms: i64) -> Result<bool, StoreError> {
        // A conditional update is the claim: of two workers that both saw the entry due, the
        // second finds it no longer due (the first moved it on) and leaves it.
        self.with(|c| {
            Ok(wait(c.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_ms = $2 + $3
                 WHERE id = $1 AND state = 'pending' AND next_ms <= $2",
                &[&entry.id, &now_ms, &crate::store::OUTBOX_CLAIM_MS],
            ))? == 1)
        })
    }

    fn outbox_done(
        &mut self,
        entry: &OutboxEntry,
        platform: &str,
        platform_id: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = wait(c.transaction())?;
            wait(tx.execute(
                "UPDATE outbox SET state = 'done', done_ms = $2 WHERE id = $1",
                &[&entry.id, &now_ms],
            ))?;
            if entry.channel == "case" {
                if let Some(pid) = platform_id {
                    wait(tx.execute(
                        "UPDATE cases SET platform = $2, platform_id = $3,
                            delivered_ms = COALESCE(delivered_ms, $4) WHERE id = $1",
                        &[&entry.subject, &platform, &pid, &now_ms],
                    ))?;
                }
            } else {
                wait(tx.execute(
                    "UPDATE alerts SET delivered_ms = COALESCE(delivered_ms, $2) WHERE id = $1",
                    &[&entry.subject, &now_ms],
                ))?;
            }
            wait(tx.commit())?;
            Ok(())
        })
    }

    fn outbox_failed(
        &mut self,
        entry: &OutboxEntry,
        error: &str,
        next_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            match next_ms {
                Some(next) => wait(c.execute(
                    "UPDATE outbox SET next_ms = $2, last_error = $3 WHERE id = $1",
                    &[&entry.id, &next, &error],
                ))?,
                None => wait(c.execute(
                    "UPDATE outbox SET state = 'dead', done_ms = $2, last_error = $3 WHERE id = $1",
                    &[&entry.id, &now_ms, &error],
                ))?,
            };
            Ok(())
        })
    }

    fn case_note(
        &mut self,
        case_id: i64,
        actor: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| note_in(&**c, case_id, actor, note, now_ms))
    }

    fn alert(&self, id: i64) -> Result<Option<AlertView>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_opt(
                "SELECT id, eui, at_ms, received_ms, lat, lon, grid_code, delivered_ms FROM alerts WHERE id = $1",
                &[&id],
            ))?
            .map(|r| AlertView {
                id: r.get(0),
                device_id: eui(r.get(1)).to_string(),
                at_ms: r.get(2),
                received_ms: r.get(3),
                lat: r.get(4),
                lon: r.get(5),
                grid_code: r.get(6),
                delivered_ms: r.get(7),
            }))
        })
    }

    fn platform_state(
        &mut self,
        case_id: i64,
        to: CaseState,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = wait(c.transaction())?;
            let from = wait(
                tx.query_opt("SELECT state FROM cases WHERE id = $1 FOR UPDATE", &[&case_id]),
            )?;
            let Some(from) = from.map(|r| r.get::<_, String>(0)) else { return Ok(false) };
            if from != to.as_str() {
                wait(tx.execute(
                    "UPDATE cases SET state = $2, updated_ms = $3 WHERE id = $1",
                    &[&case_id, &to.as_str(), &now_ms],
                ))?;
                if let Some(col) = to.milestone().map(stamp_column) {
                    wait(tx.execute(
                        &format!("UPDATE cases SET {col} = $2 WHERE id = $1"),
                        &[&case_id, &now_ms],
                    ))?;
                }
                wait(tx.execute(
                    "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
                     VALUES ($1, $2, $3, $4, 'platform', $5)",
                    &[&case_id, &now_ms, &from, &to.as_str(), &note],
                ))?;
            }
            wait(tx.commit())?;
            Ok(true)
        })
    }

    fn platform_open(&self, platform: &str) -> Result<Vec<(i64, String)>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT id, platform_id FROM cases WHERE platform = $1 AND platform_id IS NOT NULL
                 AND state NOT IN ('closed', 'voided') ORDER BY id",
                &[&platform],
            ))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
    }

    fn set_platform_id(&mut self, case_id: i64, platform_id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            wait(c.execute(
                "UPDATE cases SET platform_id = $2 WHERE id = $1",
                &[&case_id, &platform_id],
            ))?;
            Ok(())
        })
    }
}

impl PgStore {
    fn transition_in(
        c: &mut Conn,
        case_id: i64,
        to: CaseState,
        actor: &str,
        note: &str,
        now_ms: i64,
        calendar: &Calendar,
    ) -> Result<Result<CaseState, TransitionError>, StoreError> {
        let tx = wait(c.transaction())?;
        let row = wait(tx.query_opt(
            "SELECT state, handling_limit FROM cases WHERE id = $1 FOR UPDATE",
            &[&case_id],
        ))?;
        let Some(row) = row else { return Ok(Err(TransitionError::NotFound(case_id))) };
        let (state, limit): (String, String) = (row.get(0), row.get(1));
        let m = match decide_move(&state, &limit, to, now_ms, calendar)? {
            Ok(m) => m,
            Err(e) => return Ok(Err(e)),
        };
        let from = m.from;
        wait(tx.execute(
            &move_update(&m, '$'),
            &[&case_id, &to.as_str(), &now_ms, &m.handling_due_ms],
        ))?;
        wait(tx.execute(
            "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&case_id, &now_ms, &from.as_str(), &to.as_str(), &actor, &note],
        ))?;
        wait(tx.commit())?;
        Ok(Ok(to))
    }
}

impl CaseBoard for PgStore {
    fn cases(&self, f: &CaseFilter) -> Result<Vec<CaseView>, StoreError> {
        let mut sql = format!("SELECT {CASE_COLUMNS} FROM cases WHERE true");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |sql: &mut String, text: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&text.replace('$', &format!("${}", args.len())));
        };
        if !f.ids.is_empty() {
            arg(&mut sql, " AND id = ANY($::bigint[])", Box::new(f.ids.clone()));
        }
        if !f.class_codes.is_empty() {
            arg(&mut sql, " AND class_code = ANY($::text[])", Box::new(f.class_codes.clone()));
        }
        if !f.states.is_empty() {
            let states: Vec<&'static str> = f.states.iter().map(|s| s.as_str()).collect();
            arg(&mut sql, " AND state = ANY($::text[])", Box::new(states));
        }
        if let Some(s) = f.start_ms {
            arg(&mut sql, " AND detected_ms >= $", Box::new(s));
        }
        if let Some(e) = f.end_ms {
            arg(&mut sql, " AND detected_ms <= $", Box::new(e));
        }
        if let Some(a) = &f.area {
            arg(
                &mut sql,
                " AND starts_with(COALESCE(grid_code, ''), $::text)",
                Box::new(a.clone()),
            );
        }
        arg(
            &mut sql,
            " ORDER BY detected_ms DESC, id DESC LIMIT $",
            Box::new(i64::from(f.limit.max(1))),
        );
        let refs: Vec<&(dyn ToSql + Sync)> =
            args.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect();
        self.with(|c| Ok(wait(c.query(&sql, &refs))?.iter().map(case_row).collect()))
    }

    fn case_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query("SELECT class_code, count(*) FROM cases GROUP BY class_code", &[]))?
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect())
        })
    }

    fn trace(&self, case_id: i64) -> Result<Vec<TraceEntry>, StoreError> {
        let Some(case) = self.case(case_id)? else { return Ok(Vec::new()) };
        let device = case.device_id.parse::<gridsense_protocol::Eui>().map_or(0, |e| e.0 as i64);
        let (frames, evidence, events) = self.with(|c| {
            // Frames from a minute before the onset to the last evidence.
            let last: i64 = wait(c.query_one(
                "SELECT COALESCE(max(at_ms), $2) FROM incident_evidence WHERE incident_id = $1",
                &[&case.incident_id, &case.detected_ms],
            ))?
            .get(0);
            let frames = wait(c.query(
                "SELECT received_ms, counter, kind, body FROM messages
                 WHERE eui = $1 AND received_ms BETWEEN $2 AND $3 ORDER BY received_ms, counter",
                &[&device, &(case.onset_ms - 60_000), &last],
            ))?;
            let evidence = wait(c.query(
                "SELECT at_ms, change, severity, frame, evidence FROM incident_evidence
                 WHERE incident_id = $1 ORDER BY id",
                &[&case.incident_id],
            ))?;
            let events = wait(c.query(
                "SELECT at_ms, from_state, to_state, actor, note FROM case_events
                 WHERE case_id = $1 ORDER BY id",
                &[&case_id],
            ))?;
            Ok((frames, evidence, events))
        })?;
        let mut out = Vec::new();
        for r in frames {
            out.push(frame_entry(r.get(0), &case.device_id, r.get(1), r.get(2), r.get(3)));
        }
        for r in evidence {
            out.push(evidence_entry(
                r.get(0),
                case.incident_id,
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
            ));
        }
        for r in events {
            out.push(event_entry(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)));
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
        self.with(|c| Self::transition_in(c, case_id, to, actor, note, now_ms, calendar))
    }

    fn outbox(
        &self,
        case: Option<i64>,
        state: Option<&str>,
        limit: u32,
    ) -> Result<Vec<OutboxView>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT id, channel, subject, op, state, attempts, created_ms, next_ms, done_ms, last_error
                 FROM outbox WHERE ($1::bigint IS NULL OR (channel = 'case' AND subject = $1))
                 AND ($2::text IS NULL OR state = $2) ORDER BY id DESC LIMIT $3",
                &[&case, &state, &i64::from(limit)],
            ))?
            .iter()
            .map(|r| OutboxView {
                id: r.get(0),
                channel: r.get(1),
                subject: r.get(2),
                op: r.get(3),
                state: r.get(4),
                attempts: attempts(r, 5),
                created_ms: r.get(6),
                next_ms: r.get(7),
                done_ms: r.get(8),
                last_error: r.get(9),
            })
            .collect())
        })
    }

    fn outbox_state(&self, id: i64) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_opt("SELECT state FROM outbox WHERE id = $1", &[&id]))?
                .map(|r| r.get(0)))
        })
    }

    fn outbox_retry(
        &mut self,
        id: Option<i64>,
        actor: &str,
        now_ms: i64,
    ) -> Result<Vec<i64>, StoreError> {
        self.with(|c| {
            let tx = wait(c.transaction())?;
            let dead = wait(tx.query(
                "SELECT id, channel, subject, last_error FROM outbox
                 WHERE state = 'dead' AND ($1::bigint IS NULL OR id = $1) ORDER BY id FOR UPDATE",
                &[&id],
            ))?;
            let mut out = Vec::with_capacity(dead.len());
            for r in dead {
                let (entry, channel, subject, error): (i64, String, i64, Option<String>) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                wait(tx.execute(
                    "UPDATE outbox SET state = 'pending', next_ms = $2, done_ms = NULL WHERE id = $1",
                    &[&entry, &now_ms],
                ))?;
                if channel == "case" {
                    let note = format!(
                        "delivery entry {entry} requeued after it was given up ({})",
                        error.as_deref().unwrap_or("no error recorded")
                    );
                    note_in(&tx, subject, actor, &note, now_ms)?;
                }
                out.push(entry);
            }
            wait(tx.commit())?;
            Ok(out)
        })
    }

    fn patrol_coverage(&self, day: &str) -> Result<Vec<(Option<String>, u64, u64)>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT grid_code, count(*), count(DISTINCT eui) FROM patrols WHERE day = $1
                 GROUP BY grid_code ORDER BY grid_code",
                &[&day],
            ))?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get::<_, i64>(2) as u64))
            .collect())
        })
    }

    fn cluster(&self, cluster_id: i64) -> Result<Vec<ClusterMember>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT id, eui, condition, severity, state, case_id FROM incidents
                 WHERE cluster_id = $1 ORDER BY id",
                &[&cluster_id],
            ))?
            .iter()
            .map(|r| ClusterMember {
                incident_id: r.get(0),
                device_id: eui(r.get(1)).to_string(),
                condition: r.get(2),
                severity: r.get(3),
                state: r.get(4),
                case_id: r.get(5),
            })
            .collect())
        })
    }

    fn incident_cluster(&self, incident: i64) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_opt("SELECT cluster_id FROM incidents WHERE id = $1", &[&incident]))?
                .and_then(|r| r.get(0)))
        })
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
        let fresh = self.with(|c| {
            wait(c.execute(
                "DELETE FROM callback_signatures WHERE seen_ms < $1",
                &[&now_ms.saturating_sub(keep_ms)],
            ))?;
            // Remembered first: a crash after the move cannot let the same callback in again.
            Ok(wait(c.execute(
                "INSERT INTO callback_signatures (signature, seen_ms) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                &[&signature, &now_ms],
            ))? == 1)
        })?;
        if !fresh {
            return Ok(Ok(CallbackOutcome::Replayed));
        }
        let Some(case) = self.case(case_id)? else {
            return Ok(Err(TransitionError::NotFound(case_id)));
        };
        if case.state == to.as_str() {
            return Ok(Ok(CallbackOutcome::Unchanged));
        }
        Ok(self
            .transition(case_id, to, "platform", note, now_ms, calendar)?
            .map(|_| CallbackOutcome::Moved))
    }
}
