//! Maintenance windows: added by operators, read by ingest (no case while one is open) and the board.

use rusqlite::params;

use super::*;
use crate::cases::MaintenanceWindow;

/// Maintenance windows: added by operators, read by ingest (no case while one is open) and the board.
pub trait Maintenance {
    /// Records a maintenance window; returns its id.
    fn add_window(
        &mut self,
        scope: &str,
        from_ms: i64,
        until_ms: i64,
        note: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError>;

    /// Maintenance windows not yet over at `now_ms`.
    fn windows(&self, now_ms: i64) -> Result<Vec<MaintenanceWindow>, StoreError>;
}

impl Maintenance for Store {
    fn add_window(
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

    fn windows(&self, now_ms: i64) -> Result<Vec<MaintenanceWindow>, StoreError> {
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
}
