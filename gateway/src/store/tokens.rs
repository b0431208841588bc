//! Operators' API tokens (hashes only).

use rusqlite::{OptionalExtension, params};

use super::*;

/// Operators' API tokens (hashes only).
pub trait Tokens {
    /// Adds an API token (its SHA-256 hash; the token itself is never stored). Returns false
    /// when the name is taken.
    fn add_token(
        &mut self,
        name: &str,
        role: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// The role of a live token, by hash.
    fn token_role(&self, hash: &str) -> Result<Option<(String, String)>, StoreError>;

    /// Tokens: name, role, created, revoked.
    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError>;

    /// Revokes a token by name. Returns whether a live one was revoked.
    fn revoke_token(&mut self, name: &str, now_ms: i64) -> Result<bool, StoreError>;
}

impl Tokens for Store {
    fn add_token(
        &mut self,
        name: &str,
        role: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO api_tokens (name, role, hash, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, role, hash, now_ms],
        )?;
        Ok(n == 1)
    }

    fn token_role(&self, hash: &str) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, role FROM api_tokens WHERE hash = ?1 AND revoked_ms IS NULL",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, role, created_ms, revoked_ms FROM api_tokens ORDER BY name")?;
        Ok(stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?)
    }

    fn revoke_token(&mut self, name: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE api_tokens SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
            params![name, now_ms],
        )?;
        Ok(n == 1)
    }
}
