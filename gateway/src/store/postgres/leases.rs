//! Shard leases on PostgreSQL: a row per shard (made when the store's shards are fixed), every
//! time on the server's clock (`now()`), every change one conditional `UPDATE` — a claim only
//! of a free or lapsed lease, raising its epoch; a renewal or release only at the holder's
//! epoch. The batch commit checks the epochs under `FOR SHARE` ([`FENCE`]), so a claim waits
//! for a batch in flight and a batch after a lost claim is refused.

use super::{PgStore, wait};
use crate::{
    cluster::{Lease, View},
    store::{Leases, StoreError},
};

/// The fencing check of a batch: the rows of the shards the batch was decided under that
/// `$1` still holds at those epochs, locked until the batch's transaction ends (a claim of one
/// of them waits for it). Fewer rows than shards: the batch is refused.
pub(crate) const FENCE: &str = "SELECT l.shard FROM shard_leases l
    JOIN unnest($2::int[], $3::bigint[]) AS h (shard, epoch) ON l.shard = h.shard
    WHERE l.epoch = h.epoch AND l.owner = $1 FOR SHARE OF l";

impl Leases for PgStore {
    fn exclusive(&self) -> bool {
        false
    }

    fn cluster_view(&self, instance: Option<&str>, lease_ms: i64) -> Result<View, StoreError> {
        self.with(|c| {
            let now = match instance {
                Some(instance) => wait(c.query_one(
                    "INSERT INTO cluster_instances (instance, seen_at) VALUES ($1, now())
                     ON CONFLICT (instance) DO UPDATE SET seen_at = now()
                     RETURNING (extract(epoch FROM now()) * 1000)::bigint",
                    &[&instance],
                ))?,
                None => {
                    wait(c.query_one("SELECT (extract(epoch FROM now()) * 1000)::bigint", &[]))?
                }
            }
            .get(0);
            let instances = wait(c.query(
                "SELECT instance FROM cluster_instances
                 WHERE seen_at > now() - $1 * interval '1 millisecond' ORDER BY instance",
                &[&(lease_ms as f64)],
            ))?
            .iter()
            .map(|r| r.get(0))
            .collect();
            let leases = wait(c.query(
                "SELECT shard, owner, epoch,
                        (extract(epoch FROM expires_at - now()) * 1000)::bigint
                 FROM shard_leases ORDER BY shard",
                &[],
            ))?
            .iter()
            .map(|r| Lease {
                shard: u16::try_from(r.get::<_, i32>(0)).unwrap_or(u16::MAX),
                owner: r.get(1),
                epoch: r.get(2),
                expires_in_ms: r.get(3),
            })
            .collect();
            Ok(View { db_now_ms: now, instances, leases })
        })
    }

    fn claim(&self, instance: &str, shard: u16, lease_ms: i64) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_opt(
                "UPDATE shard_leases SET owner = $1, epoch = epoch + 1,
                        expires_at = now() + $3 * interval '1 millisecond'
                 WHERE shard = $2 AND (owner IS NULL OR expires_at <= now() OR owner = $1)
                 RETURNING epoch",
                &[&instance, &i32::from(shard), &(lease_ms as f64)],
            ))?
            .map(|r| r.get(0)))
        })
    }

    fn renew(
        &self,
        instance: &str,
        held: &[(u16, i64)],
        lease_ms: i64,
    ) -> Result<Vec<u16>, StoreError> {
        let shards: Vec<i32> = held.iter().map(|(s, _)| i32::from(*s)).collect();
        let epochs: Vec<i64> = held.iter().map(|(_, e)| *e).collect();
        self.with(|c| {
            Ok(wait(c.query(
                "UPDATE shard_leases l SET expires_at = now() + $4 * interval '1 millisecond'
                 FROM unnest($2::int[], $3::bigint[]) AS h (shard, epoch)
                 WHERE l.shard = h.shard AND l.epoch = h.epoch AND l.owner = $1
                 RETURNING l.shard",
                &[&instance, &shards, &epochs, &(lease_ms as f64)],
            ))?
            .iter()
            .map(|r| u16::try_from(r.get::<_, i32>(0)).unwrap_or(u16::MAX))
            .collect())
        })
    }

    fn release(&self, instance: &str, shard: u16, epoch: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(wait(c.execute(
                "UPDATE shard_leases SET owner = NULL, expires_at = 'epoch'
                 WHERE shard = $2 AND epoch = $3 AND owner = $1",
                &[&instance, &i32::from(shard), &epoch],
            ))? == 1)
        })
    }

    fn leave(&self, instance: &str) -> Result<(), StoreError> {
        self.with(|c| {
            wait(c.execute("DELETE FROM cluster_instances WHERE instance = $1", &[&instance]))?;
            Ok(())
        })
    }
}
