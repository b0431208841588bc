//! The lease task: every `renew_ms` it reports this instance alive, looks at every shard's
//! lease, and follows [`crate::cluster::plan`] — renews what it holds, claims its share of
//! what is free or lapsed, and asks the pipeline task to hand over what is above its share.
//! It has a store connection of its own, so a long commit never delays a renewal.
//!
//! What it tells the pipeline task ([`News`]): shards claimed (adopt their state, then start
//! their sessions), shards to hand over (finish the batch, acknowledge, close the sessions,
//! forget the state, then [`Reply::Released`]), shards lost (a renewal found the epoch moved
//! on: abort the sessions at once). The [`Gate`] says, per shard, until when the lease is
//! known to be held on this process's monotonic clock — the last successful renewal's start
//! plus the lease time less one renewal period. A session only (re)connects while its gate is
//! open, so an instance paused past its lease (`SIGSTOP`, a starved VM) never takes a session
//! back from the shard's new owner; its batches are refused by the fencing check anyway.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    cluster::{self, Policy, View},
    status::Status,
    store::{Leases, StoreError},
};

/// Per shard, until when (ms on [`Gate::now_ms`]'s clock) its lease is known to be held.
#[derive(Debug)]
pub struct Gate {
    origin: std::time::Instant,
    until: Vec<AtomicI64>,
}

impl Gate {
    /// Nothing held.
    pub fn new(shards: u16) -> Self {
        Gate {
            origin: std::time::Instant::now(),
            until: (0..shards).map(|_| AtomicI64::new(i64::MIN)).collect(),
        }
    }

    /// Monotonic ms since the gate was made (a pause of the process counts).
    pub fn now_ms(&self) -> i64 {
        i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    fn hold(&self, shard: u16, until_ms: i64) {
        if let Some(u) = self.until.get(usize::from(shard)) {
            u.store(until_ms, Relaxed);
        }
    }

    fn close(&self, shard: u16) {
        self.hold(shard, i64::MIN);
    }

    /// Whether `shard`'s lease is known to be held now.
    pub fn holds(&self, shard: u16) -> bool {
        self.until.get(usize::from(shard)).is_some_and(|u| self.now_ms() < u.load(Relaxed))
    }
}

/// What the lease task tells the pipeline task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    /// Claimed at these epochs: adopt their state, then start their sessions.
    Claimed(Vec<(u16, i64)>),
    /// Above this instance's share: hand them over.
    Release(Vec<(u16, i64)>),
    /// No longer held (another instance has them now): stop at once.
    Lost(Vec<u16>),
}

/// What the pipeline task tells the lease task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Handed over: its last batch is durable and acknowledged, its sessions closed.
    Released(u16, i64),
    /// The store refused a batch (a lease had moved on): the pipeline dropped every shard and
    /// its state; claim again what is still this instance's (under new epochs).
    Reset,
}

/// The lease settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This instance.
    pub instance: String,
    /// `[cluster] lease_ms`.
    pub lease_ms: i64,
    /// `[cluster] renew_ms`.
    pub renew_ms: u64,
}

/// The lease task's state between rounds.
struct Holding {
    /// Shards held, at their epochs.
    held: BTreeMap<u16, i64>,
    /// Of those, the ones being handed over.
    releasing: BTreeSet<u16>,
}

type Store = Box<dyn Leases + Send>;

async fn blocking<T: Send + 'static>(
    store: Store,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> (Store, Result<T, StoreError>) {
    match tokio::task::spawn_blocking(move || {
        let r = f(&store);
        (store, r)
    })
    .await
    {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs until the pipeline task has ended (`replies` closed); then releases every shard still
/// held and leaves the live instances, so that the others take them at their next look
/// instead of waiting for the leases to lapse.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut store: Store,
    settings: Settings,
    gate: Arc<Gate>,
    news: mpsc::Sender<News>,
    mut replies: mpsc::Receiver<Reply>,
    status: Arc<Status>,
) {
    let me = settings.instance.clone();
    let policy = Policy { lease_ms: settings.lease_ms, ..Policy::default() };
    let mut h = Holding { held: BTreeMap::new(), releasing: BTreeSet::new() };
    let mut every = tokio::time::interval(Duration::from_millis(settings.renew_ms.max(1)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            reply = replies.recv() => {
                match reply {
                    Some(Reply::Released(shard, epoch)) => {
                        let me = me.clone();
                        let (s, r) = blocking(store, move |s| s.release(&me, shard, epoch)).await;
                        store = s;
                        if let Err(e) = r {
                            tracing::warn!(shard, "releasing a lease: {e}; it lapses instead");
                        }
                        h.held.remove(&shard);
                        h.releasing.remove(&shard);
                        gate.close(shard);
                        status.rebalances.fetch_add(1, Relaxed);
                        tracing::info!(shard, epoch, "shard handed over");
                    }
                    Some(Reply::Reset) => {
                        for shard in h.held.keys() {
                            gate.close(*shard);
                        }
                        h.held.clear();
                        h.releasing.clear();
                    }
                    // The pipeline has ended: hand everything over.
                    None => {
                        release_all(store, &me, &h, &gate).await;
                        status.shards_held.store(0, Relaxed);
                        return;
                    }
                }
                status.shards_held.store(h.held.len() as u64, Relaxed);
                continue;
            }
        }
        let started = gate.now_ms();
        let (s, r) = round(store, &settings, policy, &mut h, &gate, started).await;
        store = s;
        match r {
            Ok(told) => {
                last_error = None;
                for n in told {
                    match &n {
                        News::Claimed(c) => {
                            status.rebalances.fetch_add(c.len() as u64, Relaxed);
                            let shards: Vec<u16> = c.iter().map(|x| x.0).collect();
                            tracing::info!(?shards, "shards claimed");
                        }
                        News::Release(c) => {
                            let shards: Vec<u16> = c.iter().map(|x| x.0).collect();
                            tracing::info!(
                                ?shards,
                                "shards above this instance's share: handing them over"
                            );
                        }
                        News::Lost(l) => {
                            status.rebalances.fetch_add(l.len() as u64, Relaxed);
                            tracing::warn!(shards = ?l, "shards lost: another instance holds them now");
                        }
                    }
                    if news.send(n).await.is_err() {
                        release_all(store, &me, &h, &gate).await;
                        return;
                    }
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(&text) {
                    tracing::warn!(
                        "shard leases: {text}; held leases are renewed again next round"
                    );
                }
                last_error = Some(text);
            }
        }
        status.shards_held.store(h.held.len() as u64, Relaxed);
    }
}

/// One look at the cluster and what follows from it.
async fn round(
    store: Store,
    settings: &Settings,
    policy: Policy,
    h: &mut Holding,
    gate: &Gate,
    started: i64,
) -> (Store, Result<Vec<News>, StoreError>) {
    let (me, lease_ms) = (settings.instance.clone(), settings.lease_ms);
    let (store, view) = blocking(store, move |s| s.cluster_view(Some(&me), lease_ms)).await;
    let view = match view {
        Ok(v) => v,
        Err(e) => return (store, Err(e)),
    };
    let wall = crate::status::wall_clock()();
    let cluster::Plan { claim, release, skewed_ms: skewed, .. } =
        decide(&settings.instance, &view, wall, policy, h);
    if let Some(ms) = skewed {
        tracing::error!(
            skew_ms = ms,
            "this instance's clock is {ms} ms off the database's (more than {} ms): it holds no lease until the clocks agree",
            policy.max_skew_ms
        );
    }
    let me = settings.instance.clone();
    // Everything held is renewed (the plan's renewals are those of it the store still shows
    // as this instance's; whatever else fails to renew is lost).
    let held_now: Vec<(u16, i64)> = h.held.iter().map(|(s, e)| (*s, *e)).collect();
    let (store, renewed) = {
        let me = me.clone();
        blocking(store, move |s| s.renew(&me, &held_now, lease_ms)).await
    };
    let renewed: BTreeSet<u16> = match renewed {
        Ok(r) => r.into_iter().collect(),
        Err(e) => return (store, Err(e)),
    };
    let until = started.saturating_add(lease_ms).saturating_sub(settings.renew_ms as i64);
    let mut news = Vec::new();
    let lost: Vec<u16> = h.held.keys().copied().filter(|s| !renewed.contains(s)).collect();
    for s in &lost {
        h.held.remove(s);
        h.releasing.remove(s);
        gate.close(*s);
    }
    for s in &renewed {
        if h.held.contains_key(s) {
            gate.hold(*s, until);
        }
    }
    if !lost.is_empty() {
        news.push(News::Lost(lost));
    }
    let mut claimed = Vec::new();
    let mut store = store;
    for shard in claim {
        let me = me.clone();
        let (s, r) = blocking(store, move |s| s.claim(&me, shard, lease_ms)).await;
        store = s;
        match r {
            Ok(Some(epoch)) => {
                h.held.insert(shard, epoch);
                gate.hold(shard, until);
                claimed.push((shard, epoch));
            }
            // Taken by another instance meanwhile.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(shard, "claiming a lease: {e}; again next round");
                break;
            }
        }
    }
    if !claimed.is_empty() {
        news.push(News::Claimed(claimed));
    }
    let release: Vec<(u16, i64)> = release
        .into_iter()
        .filter(|(s, _)| h.held.contains_key(s) && h.releasing.insert(*s))
        .map(|(s, _)| (s, h.held.get(&s).copied().unwrap_or(0)))
        .collect();
    if !release.is_empty() {
        news.push(News::Release(release));
    }
    (store, Ok(news))
}

/// What to renew, claim and hand over: [`cluster::plan`] over the view, where a lease the
/// store records as this instance's but that it does not hold (it restarted, or dropped its
/// shards after a refused batch) counts as free — claiming it raises its epoch, fencing off
/// whatever held it before.
fn decide(me: &str, view: &View, wall_ms: i64, policy: Policy, h: &Holding) -> cluster::Plan {
    let mut view = view.clone();
    for l in &mut view.leases {
        if l.owner.as_deref() == Some(me) && h.held.get(&l.shard) != Some(&l.epoch) {
            l.owner = None;
        }
    }
    cluster::plan(me, &view, wall_ms, policy)
}

async fn release_all(store: Store, me: &str, h: &Holding, gate: &Gate) {
    let held: Vec<(u16, i64)> = h.held.iter().map(|(s, e)| (*s, *e)).collect();
    for (s, _) in &held {
        gate.close(*s);
    }
    let me = me.to_owned();
    let n = held.len();
    let (_, r) = blocking(store, move |s| {
        for (shard, epoch) in held {
            s.release(&me, shard, epoch)?;
        }
        s.leave(&me)
    })
    .await;
    match r {
        Ok(()) => tracing::info!(shards = n, "leases released at shutdown"),
        Err(e) => tracing::warn!("releasing leases at shutdown: {e}; they lapse instead"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Lease;

    #[test]
    fn a_lease_recorded_as_ours_but_not_held_is_claimed_again_under_a_new_epoch() {
        let view = View {
            db_now_ms: 1_000,
            instances: vec!["a".into()],
            leases: vec![
                Lease { shard: 0, owner: Some("a".into()), epoch: 4, expires_in_ms: 3_000 },
                Lease { shard: 1, owner: Some("a".into()), epoch: 2, expires_in_ms: 3_000 },
            ],
        };
        // Restarted: holds nothing in memory, so both are claimed (not merely renewed).
        let h = Holding { held: BTreeMap::new(), releasing: BTreeSet::new() };
        let p = decide("a", &view, 1_000, Policy::default(), &h);
        assert_eq!((p.renew, p.claim), (vec![], vec![0, 1]));
        // Holding shard 0 at its epoch: renewed; shard 1 at an old epoch: claimed again.
        let h = Holding { held: BTreeMap::from([(0, 4), (1, 1)]), releasing: BTreeSet::new() };
        let p = decide("a", &view, 1_000, Policy::default(), &h);
        assert_eq!((p.renew, p.claim), (vec![(0, 4)], vec![1]));
    }

    #[test]
    fn the_gate_closes_a_lease_time_after_the_last_renewal() {
        let gate = Gate::new(2);
        assert!(!gate.holds(0));
        gate.hold(0, gate.now_ms() + 60_000);
        assert!(gate.holds(0) && !gate.holds(1));
        gate.hold(1, gate.now_ms() - 1);
        assert!(!gate.holds(1), "lapsed on the monotonic clock: no reconnect");
        gate.close(0);
        assert!(!gate.holds(0));
    }
}
