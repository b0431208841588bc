//! Which shards an instance should hold: the lease policy, as plain decisions over what the
//! store reports (times on the database's clock, passed in), so it is tested in virtual time.
//!
//! Devices are partitioned into shards by EUI (`gridsense_protocol::topic::shard_of`); each
//! shard is owned through a lease — owner, epoch, expiry on the database's clock — that its
//! owner renews every `renew_ms` and that lapses `lease_ms` after the last renewal. A claim
//! takes a lease that is free or lapsed and raises its epoch; every batch an owner commits
//! carries its shards' epochs ([`Fence`]), and the store refuses the batch when one is not the
//! current one, so an instance that lost a shard (paused, partitioned) cannot commit for it.
//!
//! [`plan`] says what to do next from a [`View`]: the live instances share the shards evenly
//! (the first `S mod N` of them, in name order, one more), an instance above its share
//! releases the excess — its highest shards, after finishing their batch — and one below it
//! claims free or lapsed shards, its own "home" shards first so that instances starting
//! together rarely race for the same one. An instance whose clock is more than `max_skew_ms`
//! off the database's holds nothing: its idea of a lease's time would be wrong.

/// One shard's lease as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The shard.
    pub shard: u16,
    /// Who holds it (`None`: released, or never claimed).
    pub owner: Option<String>,
    /// Raised by every claim.
    pub epoch: i64,
    /// Time left until it lapses, ms (zero or less: lapsed), on the database's clock.
    pub expires_in_ms: i64,
}

/// What the store reports in one look.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    /// The database's clock, Unix ms.
    pub db_now_ms: i64,
    /// Instances seen within a lease time, this one included, in name order.
    pub instances: Vec<String>,
    /// Every shard's lease, by shard.
    pub leases: Vec<Lease>,
}

impl View {
    /// The leases `instance` holds and that have not lapsed.
    pub fn held_by<'a>(&'a self, instance: &'a str) -> impl Iterator<Item = &'a Lease> + 'a {
        self.leases
            .iter()
            .filter(move |l| l.owner.as_deref() == Some(instance) && l.expires_in_ms > 0)
    }

    /// The leases nobody holds: never claimed, released, or lapsed.
    pub fn unheld(&self) -> impl Iterator<Item = &Lease> {
        self.leases.iter().filter(|l| l.owner.is_none() || l.expires_in_ms <= 0)
    }

    /// Shard claims since the store was made: every claim raises a shard's epoch.
    pub fn claims(&self) -> i64 {
        self.leases.iter().map(|l| l.epoch.max(0)).sum()
    }

    /// Rebalances: the claims past each shard's first (hand-overs, failovers, restarts).
    pub fn rebalances(&self) -> i64 {
        self.leases.iter().map(|l| (l.epoch - 1).max(0)).sum()
    }
}

/// The lease settings (`[cluster]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long a lease lasts after its last renewal, ms.
    pub lease_ms: i64,
    /// How far this instance's clock may be off the database's, ms.
    pub max_skew_ms: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { lease_ms: 5_000, max_skew_ms: 2_000 }
    }
}

/// What to do after a look.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Held shards to renew, with their epochs.
    pub renew: Vec<(u16, i64)>,
    /// Shards to claim (free or lapsed), in order of preference.
    pub claim: Vec<u16>,
    /// Held shards to hand over (finish the batch, acknowledge, release).
    pub release: Vec<(u16, i64)>,
    /// This instance's fair share.
    pub share: usize,
    /// The clock is off the database's by this much (more than allowed): nothing is held.
    pub skewed_ms: Option<i64>,
}

/// The shards `me` should renew, claim and release, seen at `local_now_ms` on its own clock.
pub fn plan(me: &str, view: &View, local_now_ms: i64, policy: Policy) -> Plan {
    let mine: Vec<&Lease> = view.leases.iter().filter(|l| l.owner.as_deref() == Some(me)).collect();
    let skew = local_now_ms.saturating_sub(view.db_now_ms);
    if skew.abs() > policy.max_skew_ms {
        return Plan {
            release: mine.iter().map(|l| (l.shard, l.epoch)).collect(),
            skewed_ms: Some(skew),
            ..Plan::default()
        };
    }
    let shards = view.leases.len();
    let mut instances: Vec<&str> = view.instances.iter().map(String::as_str).collect();
    if !instances.contains(&me) {
        instances.push(me);
    }
    instances.sort_unstable();
    let n = instances.len().max(1);
    let rank = instances.iter().position(|i| *i == me).unwrap_or(0);
    let share = shards / n + usize::from(rank < shards % n);
    // Held, highest shard last: the excess handed over is the highest.
    let mut held: Vec<(u16, i64)> = mine.iter().map(|l| (l.shard, l.epoch)).collect();
    held.sort_unstable();
    let release = held.split_off(held.len().min(share));
    let mut free: Vec<u16> =
        view.unheld().filter(|l| l.owner.as_deref() != Some(me)).map(|l| l.shard).collect();
    // Home shards (shard mod N = rank) first, then the rest, each in shard order.
    free.sort_by_key(|s| (usize::from(*s) % n != rank, *s));
    free.truncate(share.saturating_sub(held.len()));
    Plan { renew: held, claim: free, release, share, skewed_ms: None }
}

/// A set of shards, and whether a device is in one of them (its EUI's shard among `shards`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMask {
    shards: u16,
    bits: Vec<bool>,
}

impl ShardMask {
    /// These of `shards` shards (others out of range are ignored).
    pub fn of(shards: u16, set: impl IntoIterator<Item = u16>) -> Self {
        let mut bits = vec![false; usize::from(shards)];
        for s in set {
            if let Some(b) = bits.get_mut(usize::from(s)) {
                *b = true;
            }
        }
        ShardMask { shards, bits }
    }

    /// Every shard.
    pub fn all(shards: u16) -> Self {
        ShardMask { shards, bits: vec![true; usize::from(shards)] }
    }

    /// The other shards.
    #[must_use]
    pub fn complement(&self) -> Self {
        ShardMask { shards: self.shards, bits: self.bits.iter().map(|b| !b).collect() }
    }

    /// Whether `shard` is in the set.
    pub fn contains(&self, shard: u16) -> bool {
        self.bits.get(usize::from(shard)).copied().unwrap_or(false)
    }

    /// Whether the device's shard is in the set.
    pub fn has_device(&self, eui: gridsense_protocol::Eui) -> bool {
        self.contains(u16::from(gridsense_protocol::topic::shard_of(eui, self.shards)))
    }
}

/// The shards a batch was decided under, checked by the store in the batch's transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fence {
    /// The instance that decided the batch.
    pub instance: String,
    /// Its shards and the epoch it holds each at.
    pub held: Vec<(u16, i64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(shard: u16, owner: Option<&str>, epoch: i64, expires_in_ms: i64) -> Lease {
        Lease { shard, owner: owner.map(str::to_owned), epoch, expires_in_ms }
    }

    fn view(instances: &[&str], leases: Vec<Lease>) -> View {
        View {
            db_now_ms: 1_000_000,
            instances: instances.iter().map(|s| (*s).to_owned()).collect(),
            leases,
        }
    }

    #[test]
    fn a_lone_instance_claims_every_shard_its_home_ones_first() {
        let v = view(&["a"], (0..8).map(|s| lease(s, None, 0, 0)).collect());
        let p = plan("a", &v, 1_000_000, Policy::default());
        assert_eq!((p.share, p.claim.len(), p.release.len()), (8, 8, 0));
        // Two instances starting together prefer different shards.
        let v = view(&["a", "b"], (0..8).map(|s| lease(s, None, 0, 0)).collect());
        let (pa, pb) = (
            plan("a", &v, 1_000_000, Policy::default()),
            plan("b", &v, 1_000_000, Policy::default()),
        );
        assert_eq!(pa.claim, [0, 2, 4, 6]);
        assert_eq!(pb.claim, [1, 3, 5, 7]);
    }

    #[test]
    fn a_joining_instance_gets_its_share_by_hand_over_and_a_dead_ones_shards_are_claimed() {
        // `a` holds all 5; `b` joins: `a`'s share is 3 (5 = 3 + 2), it releases its highest two.
        let held: Vec<Lease> = (0..5).map(|s| lease(s, Some("a"), 7, 4_000)).collect();
        let v = view(&["a", "b"], held.clone());
        let pa = plan("a", &v, 1_000_000, Policy::default());
        assert_eq!(pa.renew, [(0, 7), (1, 7), (2, 7)]);
        assert_eq!(pa.release, [(3, 7), (4, 7)]);
        // Nothing free yet for `b`: it waits for the hand-over, it never takes a live lease.
        assert!(plan("b", &v, 1_000_000, Policy::default()).claim.is_empty());
        // After the release, `b` claims them.
        let mut after = held;
        for l in after.iter_mut().skip(3) {
            l.owner = None;
        }
        assert_eq!(
            plan("b", &view(&["a", "b"], after.clone()), 1_000_000, Policy::default()).claim,
            [3, 4]
        );
        // `a` dies: its leases lapse and it drops out of the live list; `b` takes them all.
        for l in after.iter_mut().take(3) {
            l.expires_in_ms = -1;
        }
        for l in after.iter_mut().skip(3) {
            (l.owner, l.epoch, l.expires_in_ms) = (Some("b".into()), 8, 4_000);
        }
        let pb = plan("b", &view(&["b"], after), 1_000_000, Policy::default());
        assert_eq!(pb.renew, [(3, 8), (4, 8)]);
        assert_eq!(pb.claim, [0, 1, 2]);
    }

    #[test]
    fn a_lease_of_its_own_that_lapsed_is_renewed_while_its_epoch_is_still_the_current_one() {
        // Starved past its lease (nobody claimed it meanwhile): the epoch is unchanged, so
        // renewing is safe — the store renews by owner and epoch.
        let v = view(&["a"], vec![lease(0, Some("a"), 3, -200), lease(1, None, 0, 0)]);
        let p = plan("a", &v, 1_000_000, Policy::default());
        assert_eq!((p.renew, p.claim), (vec![(0, 3)], vec![1]));
    }

    #[test]
    fn a_clock_off_the_databases_by_more_than_allowed_holds_nothing() {
        let v = view(&["a"], vec![lease(0, Some("a"), 3, 4_000), lease(1, None, 0, 0)]);
        let p = plan("a", &v, 1_002_001, Policy::default());
        assert_eq!(p.skewed_ms, Some(2_001));
        assert_eq!((p.renew.len(), p.claim.len(), p.release), (0, 0, vec![(0, 3)]));
        let ok = plan("a", &v, 998_000, Policy::default());
        assert_eq!((ok.skewed_ms, ok.renew.len(), ok.claim.len()), (None, 1, 1), "2 s is allowed");
    }

    #[test]
    fn shares_are_even_and_cover_every_shard() {
        for (shards, n) in [(64u16, 3usize), (64, 1), (5, 7), (256, 10)] {
            let names: Vec<String> = (0..n).map(|i| format!("i{i:02}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let v = view(&refs, (0..shards).map(|s| lease(s, None, 0, 0)).collect());
            let shares: Vec<usize> =
                refs.iter().map(|me| plan(me, &v, 1_000_000, Policy::default()).share).collect();
            assert_eq!(shares.iter().sum::<usize>(), usize::from(shards), "{shards}/{n}");
            let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(max - min <= 1, "{shards}/{n}: {shares:?}");
        }
    }
}
