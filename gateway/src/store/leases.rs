//! Shard leases: which gateway instance owns which shard ([`crate::cluster`] decides, this
//! records), on the database's clock. PostgreSQL holds them for a cluster of instances; a
//! SQLite store is held by one gateway process (its `PATH.lock`), which owns every shard at
//! epoch 1 for as long as it runs.

use super::*;
use crate::cluster::{Lease, View};

/// Shard leases, on the store's clock.
pub trait Leases {
    /// Records that `instance` is alive (now, on the database's clock; `None`: only looking,
    /// as `gridsense cluster status` does) and returns what the cluster looks like: the
    /// database's time, the instances seen within `lease_ms`, and every shard's lease.
    fn cluster_view(&self, instance: Option<&str>, lease_ms: i64) -> Result<View, StoreError>;

    /// True when only this process can write the store (SQLite): what it read at start is
    /// what is there, and it holds every shard.
    fn exclusive(&self) -> bool;

    /// Claims `shard` for `instance` if it is free, lapsed, or recorded as `instance`'s own (a
    /// restarted instance taking its leases back): its new epoch — raised, so whatever held
    /// it before is fenced off — or `None` when another instance holds it.
    fn claim(&self, instance: &str, shard: u16, lease_ms: i64) -> Result<Option<i64>, StoreError>;

    /// Renews the leases `instance` holds at these epochs (a lapsed one too, while nobody
    /// claimed it: its epoch is still the current one); returns the shards renewed — any
    /// other was lost.
    fn renew(
        &self,
        instance: &str,
        held: &[(u16, i64)],
        lease_ms: i64,
    ) -> Result<Vec<u16>, StoreError>;

    /// `instance` stops (after releasing its leases): it no longer counts among the live
    /// instances, so the others take its share at their next look instead of a lease time
    /// later.
    fn leave(&self, instance: &str) -> Result<(), StoreError>;

    /// Hands a shard over (after its last batch is committed and acknowledged): free for the
    /// next claim at once. False when `instance` no longer held it at that epoch.
    fn release(&self, instance: &str, shard: u16, epoch: i64) -> Result<bool, StoreError>;
}

impl Leases for Store {
    fn exclusive(&self) -> bool {
        true
    }

    fn cluster_view(&self, instance: Option<&str>, lease_ms: i64) -> Result<View, StoreError> {
        // The one gateway holding this file (or the one that will).
        let instance = instance.unwrap_or("this gateway");
        let shards: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM store_meta WHERE name = 'shards'", [], |r| r.get(0))
            .optional()?;
        let shards = match shards {
            Some(v) => decode_shards(&v)?,
            None => gridsense_protocol::topic::DEFAULT_SHARDS,
        };
        let leases = (0..shards)
            .map(|shard| Lease {
                shard,
                owner: Some(instance.to_owned()),
                epoch: 1,
                expires_in_ms: lease_ms,
            })
            .collect();
        Ok(View {
            db_now_ms: crate::status::wall_clock()(),
            instances: vec![instance.to_owned()],
            leases,
        })
    }

    fn claim(&self, _: &str, _: u16, _: i64) -> Result<Option<i64>, StoreError> {
        Ok(Some(1))
    }

    fn renew(&self, _: &str, held: &[(u16, i64)], _: i64) -> Result<Vec<u16>, StoreError> {
        Ok(held.iter().map(|(s, _)| *s).collect())
    }

    fn release(&self, _: &str, _: u16, _: i64) -> Result<bool, StoreError> {
        Ok(true)
    }

    fn leave(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
}
