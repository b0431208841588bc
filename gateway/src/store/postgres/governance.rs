//! The governance loop's store on PostgreSQL: the same SQL as SQLite's where the dialects
//! agree ([`crate::store::governance`]), row reading and transactions here.

use tokio_postgres::Row;

use super::{PgStore, wait};
use crate::{
    assessment::{Area, CaseFact, CheckIn, DeviceFact, Worker},
    cases::governance::{self, Escalation},
    store::{
        StoreError,
        governance::{
            AREAS_SQL, DEVICES_SQL, FACT_COLUMNS, FactRow, Governance, OpenRow, SUPERVISED_COLUMNS,
            SUPERVISED_WHERE, coded_area, escalation_note, escalation_update, route_note,
            worker_upsert,
        },
    },
};

fn fact_row(r: &Row) -> FactRow {
    FactRow {
        id: r.get(0),
        class_code: r.get(1),
        source: r.get(2),
        eui: r.get(3),
        object_code: r.get(4),
        grid_code: r.get(5),
        community_code: r.get(6),
        street_code: r.get(7),
        department: r.get(8),
        level: r.get(9),
        first_level: r.get(10),
        times: [r.get(11), r.get(12), r.get(13), r.get(14)],
        handling_limit: r.get(15),
        stamps: [r.get(16), r.get(17), r.get(18), r.get(19), r.get(20), r.get(21)],
        state: r.get(22),
        returns: i64::from(r.get::<_, i32>(23)),
        reworks: i64::from(r.get::<_, i32>(24)),
    }
}

impl Governance for PgStore {
    fn report_cases(&self, from_ms: i64, to_ms: i64) -> Result<Vec<CaseFact>, StoreError> {
        let mut out = Vec::new();
        self.each_row(
            &format!(
                "SELECT {FACT_COLUMNS} FROM cases WHERE detected_ms >= $1 AND detected_ms < $2 ORDER BY id"
            ),
            &[&from_ms, &to_ms],
            &mut |r| {
                out.push(fact_row(r).fact()?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    fn report_devices(&self) -> Result<Vec<DeviceFact>, StoreError> {
        let mut out = Vec::new();
        self.each_row(DEVICES_SQL, &[], &mut |r| {
            out.push(DeviceFact {
                grid_code: r.get(0),
                online: r.get::<_, i32>(1) != 0,
                low_battery: r.get::<_, i32>(2) != 0,
            });
            Ok(())
        })?;
        Ok(out)
    }

    fn report_areas(&self) -> Result<Vec<Area>, StoreError> {
        let mut out = Vec::new();
        self.each_row(AREAS_SQL, &[], &mut |r| {
            out.push(coded_area(r.get(0), r.get(1), r.get(2)));
            Ok(())
        })?;
        Ok(out)
    }

    fn report_checkins(&self, from_ms: i64, to_ms: i64) -> Result<Vec<CheckIn>, StoreError> {
        let mut out = Vec::new();
        self.each_row(
            "SELECT eui, at_ms, grid_code FROM patrols WHERE at_ms >= $1 AND at_ms < $2 ORDER BY at_ms",
            &[&from_ms, &to_ms],
            &mut |r| {
                out.push(CheckIn {
                    eui: super::eui(r.get(0)).to_string(),
                    at_ms: r.get(1),
                    grid_code: r.get(2),
                });
                Ok(())
            },
        )?;
        Ok(out)
    }

    fn workers(&self) -> Result<Vec<Worker>, StoreError> {
        self.with(|c| {
            let rows = wait(c.query(
                "SELECT id, name, grid_code, beacon, valid_from, valid_to FROM workers ORDER BY id",
                &[],
            ))?;
            Ok(rows
                .iter()
                .map(|r| Worker {
                    id: r.get(0),
                    name: r.get(1),
                    grid_code: r.get(2),
                    beacon: r.get(3),
                    valid_from: r.get(4),
                    valid_to: r.get(5),
                })
                .collect())
        })
    }

    fn put_workers(&mut self, workers: &[Worker]) -> Result<usize, StoreError> {
        let sql = worker_upsert('$');
        self.with(|c| {
            let tx = wait(c.transaction())?;
            for w in workers {
                let beacon = w.beacon.to_ascii_lowercase();
                wait(tx.execute(
                    sql.as_str(),
                    &[&w.id, &w.name, &w.grid_code, &beacon, &w.valid_from, &w.valid_to],
                ))?;
            }
            wait(tx.commit())?;
            Ok(workers.len())
        })
    }

    fn route(
        &mut self,
        case_id: i64,
        department: &str,
        actor: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = wait(c.transaction())?;
            let Some(row) = wait(
                tx.query_opt("SELECT department FROM cases WHERE id = $1 FOR UPDATE", &[&case_id]),
            )?
            else {
                return Ok(false);
            };
            let before: Option<String> = row.get(0);
            wait(tx.execute(
                "UPDATE cases SET department = $2, updated_ms = $3 WHERE id = $1",
                &[&case_id, &department, &now_ms],
            ))?;
            let text = route_note(before.as_deref(), department, note);
            wait(tx.execute(
                "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
                 VALUES ($1, $2, NULL, NULL, $3, $4)",
                &[&case_id, &now_ms, &actor, &text],
            ))?;
            wait(tx.commit())?;
            Ok(true)
        })
    }

    fn unfinished(&self) -> Result<Vec<OpenRow>, StoreError> {
        let mut open = Vec::new();
        self.each_row(
            &format!("SELECT {SUPERVISED_COLUMNS} FROM cases WHERE {SUPERVISED_WHERE}"),
            &[],
            &mut |r| {
                open.push(OpenRow {
                    id: r.get(0),
                    state: r.get(1),
                    handling_limit: r.get(2),
                    times: [r.get(3), r.get(4), r.get(5), r.get(6)],
                    stamps: [r.get(7), r.get(8), r.get(9), r.get(10)],
                    level: r.get(11),
                    returns: i64::from(r.get::<_, i32>(12)),
                    escalated: r.get(13),
                });
                Ok(())
            },
        )?;
        Ok(open)
    }

    fn escalate(&mut self, row: &OpenRow, e: &Escalation, now_ms: i64) -> Result<bool, StoreError> {
        let after = governance::escalated_after(&row.escalated, e);
        self.with(|c| {
            let tx = wait(c.transaction())?;
            let n = wait(tx.execute(
                escalation_update('$').as_str(),
                &[&row.id, &e.to.as_str(), &after, &now_ms, &row.escalated],
            ))?;
            if n == 0 {
                return Ok(false);
            }
            wait(tx.execute(
                "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
                 VALUES ($1, $2, NULL, NULL, 'supervision', $3)",
                &[&row.id, &now_ms, &escalation_note(e)],
            ))?;
            wait(tx.execute(
                "INSERT INTO outbox (channel, subject, op, created_ms, next_ms) VALUES ('case', $1, 'update', $2, $2)",
                &[&row.id, &now_ms],
            ))?;
            wait(tx.commit())?;
            Ok(true)
        })
    }
}
