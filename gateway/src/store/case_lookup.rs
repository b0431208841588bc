//! One case by id (the delivery workers and the board).

use rusqlite::OptionalExtension;

use super::{cases::*, *};

/// One case by id (the delivery workers and the board).
pub trait CaseLookup {
    /// One case.
    fn case(&self, id: i64) -> Result<Option<CaseView>, StoreError>;
}

impl CaseLookup for Store {
    fn case(&self, id: i64) -> Result<Option<CaseView>, StoreError> {
        Ok(self
            .conn
            .query_row(&format!("SELECT {CASE_COLUMNS} FROM cases WHERE id = ?1"), [id], case_row)
            .optional()?)
    }
}
