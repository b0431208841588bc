//! What the external telemetry writer needs: the on-disk buffer in front of it.

use gridsense_protocol::Eui;
use rusqlite::params;

use super::*;

/// What the external telemetry writer needs: the on-disk buffer in front of it.
pub trait TelemetryBuffer: Send {
    /// The oldest `limit` buffered points.
    fn buffer_read(&self, limit: usize) -> Result<Vec<BufferedPoint>, StoreError>;

    /// Removes buffered points up to and including `id` (delivered, or undeliverable).
    fn buffer_delete_through(&mut self, id: i64) -> Result<(), StoreError>;

    /// Points waiting in the buffer.
    fn buffer_len(&self) -> Result<u64, StoreError>;
}

impl TelemetryBuffer for Store {
    fn buffer_read(&self, limit: usize) -> Result<Vec<BufferedPoint>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, eui, kind, measurement, field, at_ms, value, grid_code, street_code
             FROM telemetry_buffer ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![i(limit as u64)], |r| {
            Ok(BufferedPoint {
                id: r.get(0)?,
                eui: Eui(r.get::<_, i64>(1)? as u64),
                kind: r.get(2)?,
                measurement: r.get(3)?,
                field: r.get(4)?,
                at_ms: r.get(5)?,
                value: r.get(6)?,
                grid: r.get(7)?,
                street: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn buffer_delete_through(&mut self, id: i64) -> Result<(), StoreError> {
        let _turn = self.turns.wait();
        self.conn.execute("DELETE FROM telemetry_buffer WHERE id <= ?1", params![id])?;
        Ok(())
    }

    fn buffer_len(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            // Rows leave only from the head and ids are never reused (AUTOINCREMENT, rolled
            // back with their transaction): the id range is the count, without a scan of
            // what can be millions of rows while the server is down.
            .query_row(
                "SELECT COALESCE(MAX(id) - MIN(id) + 1, 0) FROM telemetry_buffer",
                [],
                |r| r.get::<_, i64>(0),
            )? as u64)
    }
}
