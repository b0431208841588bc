//! What the delivery workers need: due outbox entries, their outcomes, alerts and the platform's ids and states.

use gridsense_protocol::Eui;
use rusqlite::{OptionalExtension, params};

use super::{cases::*, *};
use crate::cases::CaseState;

/// How long a delivery worker's claim on an outbox entry holds off the others (PostgreSQL),
/// ms: longer than a request with its look-ups takes.
pub const OUTBOX_CLAIM_MS: i64 = 60_000;

/// What the delivery workers need: due outbox entries, their outcomes, alerts and the platform's ids and states.
pub trait Outbox: CaseLookup + Send {
    /// Outbox entries due at `now_ms` on a channel, oldest first.
    fn outbox_due(
        &self,
        channel: &str,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError>;

    /// The earliest time a pending entry of a channel is due.
    fn outbox_next_due(&self, channel: &str) -> Result<Option<i64>, StoreError>;

    /// Claims a due entry and records that an attempt is about to be made (before the request
    /// goes out, so a crash mid-request is known to have possibly reached the platform).
    /// False: another delivery worker (another gateway instance on a shared store) claimed it
    /// first — leave it to that one. A claim on PostgreSQL holds the entry for
    /// [`OUTBOX_CLAIM_MS`] (its outcome, or a failure's retry time, replaces it); a claimant
    /// that died is succeeded after that. A SQLite store has one gateway: always true.
    fn outbox_begin(&mut self, entry: &OutboxEntry, now_ms: i64) -> Result<bool, StoreError>;

    /// Marks an entry delivered; for a case `create`, records the platform's id.
    fn outbox_done(
        &mut self,
        entry: &OutboxEntry,
        platform: &str,
        platform_id: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Records a failed attempt: retried at `next_ms`, or dead-lettered (`next_ms` `None`).
    fn outbox_failed(
        &mut self,
        entry: &OutboxEntry,
        error: &str,
        next_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Adds a note (no state change) to a case's trace.
    fn case_note(
        &mut self,
        case_id: i64,
        actor: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// One alert.
    fn alert(&self, id: i64) -> Result<Option<AlertView>, StoreError>;

    /// Records a state the platform reports (the platform is authoritative: no lifecycle
    /// check; an unchanged state records nothing). Returns whether the case exists. The Open311
    /// status poller uses it for closures, the only state GeoReport v2 reports.
    fn platform_state(
        &mut self,
        case_id: i64,
        to: CaseState,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Delivered cases on a platform not yet final: (case, platform id).
    fn platform_open(&self, platform: &str) -> Result<Vec<(i64, String)>, StoreError>;

    /// Replaces a case's platform id (a token resolved to an id).
    fn set_platform_id(&mut self, case_id: i64, platform_id: &str) -> Result<(), StoreError>;
}

impl Outbox for Store {
    fn outbox_due(
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

    fn outbox_next_due(&self, channel: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.conn.query_row(
            "SELECT MIN(next_ms) FROM outbox WHERE state = 'pending' AND channel = ?1",
            [channel],
            |r| r.get(0),
        )?)
    }

    fn outbox_begin(&mut self, entry: &OutboxEntry, _now_ms: i64) -> Result<bool, StoreError> {
        let _turn = self.turns.wait();
        self.conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?1", [entry.id])?;
        Ok(true)
    }

    fn outbox_done(
        &mut self,
        entry: &OutboxEntry,
        platform: &str,
        platform_id: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.turns.wait();
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

    fn outbox_failed(
        &mut self,
        entry: &OutboxEntry,
        error: &str,
        next_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.turns.wait();
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

    fn case_note(
        &mut self,
        case_id: i64,
        actor: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.turns.wait();
        self.conn.execute(
            "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note) VALUES (?1, ?2, NULL, NULL, ?3, ?4)",
            params![case_id, now_ms, actor, note],
        )?;
        Ok(())
    }

    fn alert(&self, id: i64) -> Result<Option<AlertView>, StoreError> {
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

    fn platform_state(
        &mut self,
        case_id: i64,
        to: CaseState,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.turns.wait();
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
            if let Some(col) = to.milestone().map(stamp_column) {
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

    fn platform_open(&self, platform: &str) -> Result<Vec<(i64, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, platform_id FROM cases WHERE platform = ?1 AND platform_id IS NOT NULL
             AND state NOT IN ('closed', 'voided') ORDER BY id",
        )?;
        Ok(stmt.query_map([platform], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?)
    }

    fn set_platform_id(&mut self, case_id: i64, platform_id: &str) -> Result<(), StoreError> {
        let _turn = self.turns.wait();
        self.conn.execute(
            "UPDATE cases SET platform_id = ?2 WHERE id = ?1",
            params![case_id, platform_id],
        )?;
        Ok(())
    }
}
