//! The ingest shell: MQTT 5 in, the store out, acknowledgements only after the commit.
//!
//! The tasks:
//! - one **session task** per broker session ([`session::run`], started and stopped by
//!   [`sessions::Sessions`]): one persistent session per shard this instance holds and lane,
//!   and version 1's with shard 0. Each owns its rumqttc (`v5`) event loop and only drives
//!   `EventLoop::poll`, never racing it against anything (a poll dropped mid-write drops an
//!   outgoing PUBACK): clean start off, a session that never expires, manual acks, a Maximum
//!   Packet Size and a Receive Maximum announced in CONNECT, subscribe and check the SUBACK on
//!   every CONNACK, reconnect with a backoff that a connection dropped right after its CONNACK
//!   does not reset — and only while the shard's lease is known to be held ([`leases::Gate`]).
//!   It forwards each PUBLISH, tagged with its session and run, into the pipeline's channel;
//!   when that is full it waits for room (at most half the keep-alive, then one poll for the
//!   ping and the queued acks) and the broker keeps the rest.
//! - one **acker** per session ([`session::acker`]) hands the acks the pipeline returns (in
//!   order), the sealed downlinks and the forwarded version 1 frames to the client. It awaits
//!   the client's bounded request queue, which the session task drains; the session task
//!   never awaits the client, and the pipeline never awaits the acker, so none can close a
//!   circle (PITFALLS.md).
//! - the **lease task** ([`leases::run`]) renews, claims and hands over shard leases and tells
//!   the pipeline task ([`leases::News`]).
//! - the **pipeline task** runs each message through [`Pipeline::handle`] as it arrives,
//!   collecting up to `batch_max` messages or `batch_max_ms` (less when a message queued a case
//!   or an alert: those are committed at once), commits the batch in one transaction — fenced
//!   by the epochs of the shards held — then hands the messages back for acknowledgement in
//!   arrival order, each through the session it came in on. The commit runs as a task of its
//!   own while the next batch is decided (two batches in flight at most: a batch's commit
//!   starts only once the one before it is durable and acknowledged). What it decides — when a
//!   batch closes, what is held for acknowledgement, how long to wait before retrying a commit,
//!   when the periodic work is due — is [`batcher`]'s, plain state tested in virtual time; the
//!   task only waits, reads, commits and sends. Between batches it follows the lease news:
//!   adopt a claimed shard's state and start its sessions; hand one over (its last batch
//!   committed and acknowledged, its sessions closed, its state forgotten); drop a lost one at
//!   once. Offline deadlines are ticked on the same task, so health events are committed the
//!   same way. If a commit fails nothing is acknowledged. A full disk (or another failure that
//!   may pass) holds the batch and retries it until it is durable, saying why in the status,
//!   readiness and metrics; a batch refused by the fencing check starts the instance over from
//!   the store for the shards still its own; any other failure stops the task with the error:
//!   the broker redelivers to the restarted gateway, and every step downstream is idempotent.
//!   Every message is acknowledged once handled — accepted or rejected — so no message can
//!   hold a session.
//!
//! Flow control: what the gateway holds unacknowledged is bounded by its own queues, not by
//! the broker's good manners — the pipeline's channel (every session's window: the Receive
//! Maximum it announces, `mqtt.inflight` shared by the shards, at least 16 each), the two
//! batches the pipeline holds, and per session what one poll reads while the channel is full
//! (a session stops reading then; see [`session::run`], and why the Receive Maximum alone does
//! not bound it). Past capacity the rest waits at the broker, in the persistent sessions. The
//! acks and forwards to a session are bounded by what the pipeline holds of that session's
//! messages; its downlinks by a queue of their own (dropped and counted when full).

pub mod batcher;
pub mod leases;
pub mod session;
pub mod sessions;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use crate::downlink::Route as DownlinkRoute;
use gridsense_protocol::topic::{Lane, Route, parse_route, shard_of, uplink_topic};
use tokio::sync::{mpsc, watch};

use self::{
    leases::{News, Reply},
    session::{SessionKey, Tagged},
    sessions::Sessions,
};
use crate::{
    batch::Batch,
    cluster::ShardMask,
    config::Config,
    pipeline::{Outcome, Pipeline, ShardState},
    status::{Changes, Clock, Status},
    store::{IngestStore, Leases, StoreError},
};

/// Why ingest stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The store failed: nothing of the failed batch was acknowledged.
    #[error("ingest stopped, nothing more acknowledged: {0}")]
    Store(#[from] StoreError),
    /// A task panicked or was cancelled.
    #[error("ingest task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Where, and as which client, the session connects.
#[derive(Debug, Clone)]
pub struct Target {
    /// The broker's address.
    pub addr: SocketAddr,
    /// The broker's host as its URL names it (what TLS checks the certificate against).
    pub host: String,
    /// TLS (built once at start from `mqtt.ca_file`) for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The client id: `mqtt.client_id`, or the embedded broker's own for the gateway.
    pub client_id: String,
    /// User name and password: `mqtt.username` and `mqtt.password` (none when the user name
    /// is empty), or the embedded broker's own for the gateway.
    pub credentials: Option<(String, String)>,
}

/// The sessions' options from the configuration (each session has its own client id and
/// account, [`SessionKey::name`]), with each session's in-flight window.
fn session_options(config: &Config, target: &Target, window: u16) -> session::SessionOptions {
    let m = &config.mqtt;
    // With TLS, rumqttc verifies the broker's certificate against this host name.
    let host =
        if target.tls.is_some() { target.host.clone() } else { target.addr.ip().to_string() };
    session::SessionOptions {
        client_id: target.client_id.clone(),
        host,
        port: target.addr.port(),
        tls: target.tls.clone(),
        keep_alive_s: m.keep_alive_s,
        inflight: window,
        max_packet_bytes: m.max_packet_bytes,
        credentials: target.credentials.clone(),
    }
}

/// Each session's in-flight window (its Receive Maximum): `mqtt.inflight` shared by the
/// shards' `up` sessions, at least 16. What an instance holds unacknowledged is bounded by
/// this times its sessions (two per shard and the legacy one).
pub fn session_window(inflight: u16, shards: u16) -> u16 {
    (inflight / shards.max(1)).max(16)
}

/// Runs ingest until `shutdown` turns true (then commits and acknowledges what it holds,
/// disconnects, and hands its shards over) or the store fails. `leases` is a store connection
/// of the lease task's own.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &Config,
    targets: Vec<Target>,
    store: Box<dyn IngestStore>,
    leases: Box<dyn Leases + Send>,
    pipeline: Pipeline,
    clock: Clock,
    status: Arc<Status>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let shards = config.cluster.shards;
    let window = session_window(config.mqtt.inflight, shards);
    // Every session's window: the sessions never find the channel full for long.
    let brokers = targets.len().max(1);
    let (up_sessions, urgent_sessions) =
        ((usize::from(shards) + 1) * brokers, usize::from(shards) * brokers);
    let capacity = up_sessions * usize::from(window);
    let urgent_capacity = urgent_sessions * usize::from(window);
    let (tx, rx) = mpsc::channel::<Tagged>(capacity);
    let (urgent_tx, urgent_rx) = mpsc::channel::<Tagged>(urgent_capacity);
    let rx = Inbox { urgent: urgent_rx, up: rx, urgent_open: true, up_open: true };
    status.queue_capacity.store((capacity + urgent_capacity) as u64, Relaxed);
    status.devices_registered.store(pipeline.registered() as u64, Relaxed);
    let gate = Arc::new(leases::Gate::new(shards));
    let exclusive = leases.exclusive();
    let templates = targets
        .into_iter()
        .map(|target| sessions::Template {
            options: session_options(config, &target, window),
            target,
            reconnect_ms: (config.mqtt.reconnect_min_ms, config.mqtt.reconnect_max_ms),
        })
        .collect();
    let sessions = Sessions::new(
        templates,
        (tx, urgent_tx),
        status.clone(),
        gate.clone(),
        shards,
        shutdown.clone(),
    );
    let instance = config.cluster.instance();
    let _ = status.instance.set(instance.clone());
    let lease_ms = config.cluster.lease_ms();
    let _ = status.lease_ms.set(lease_ms);
    let (news_tx, news_rx) = mpsc::channel::<News>(16);
    // At most one reply per shard held, and a reset: never full.
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(usize::from(shards) + 8);
    let lease_task = tokio::spawn(leases::run(
        leases,
        leases::Settings {
            instance: instance.clone(),
            lease_ms,
            renew_ms: config.cluster.renew_ms,
        },
        gate,
        news_tx,
        reply_rx,
        status.clone(),
    ));
    tracing::info!(instance, shards, "gateway instance starting");
    let retention_ms = (config.telemetry.sink == crate::config::Sink::Store)
        .then(|| i64::from(config.store.telemetry_retention_days) * 86_400_000);
    let batching = Batching {
        max: config.store.batch_max,
        max_wait_ms: config.store.batch_max_ms,
        retention_ms,
        poll_ms: config.downlink.poll_ms,
    };
    let mut out = Outputs {
        sessions,
        status: status.clone(),
        clock: clock.clone(),
        cluster: Cluster {
            instance,
            shards,
            exclusive,
            held: BTreeMap::new(),
            replies: reply_tx,
            news: news_rx,
            told: false,
        },
    };
    let result = pipeline_task(rx, &mut out, store, pipeline, batching, shutdown).await;
    // Every ack queued, then DISCONNECT; then the leases are handed over.
    out.sessions.close_all().await;
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    status.connected.store(false, Relaxed);
    result
}

/// This instance among the gateway instances: the shards the pipeline holds (state adopted,
/// sessions running) and the link to the lease task.
struct Cluster {
    instance: String,
    shards: u16,
    /// A SQLite store: this process holds every shard, nothing to adopt or fence.
    exclusive: bool,
    held: BTreeMap<u16, i64>,
    replies: mpsc::Sender<Reply>,
    news: mpsc::Receiver<News>,
    /// Whether any news came yet (the state restored at start is then cut to the shards held).
    told: bool,
}

impl Cluster {
    fn holds(&self, shard: u16) -> bool {
        self.held.contains_key(&shard)
    }

    /// These shards, as a set.
    fn mask(&self, shards: impl IntoIterator<Item = u16>) -> ShardMask {
        ShardMask::of(self.shards, shards)
    }

    /// The fence of a batch decided now (none for a SQLite store).
    fn fence(&self) -> Option<crate::cluster::Fence> {
        (!self.exclusive).then(|| crate::cluster::Fence {
            instance: self.instance.clone(),
            held: self.held.iter().map(|(s, e)| (*s, *e)).collect(),
        })
    }

    fn reply(&self, r: Reply) {
        if self.replies.try_send(r).is_err() {
            tracing::warn!("lease task not told: {r:?}");
        }
    }
}

/// A shard's sessions: both lanes, and the legacy one with shard 0.
fn sessions_of(shard: u16) -> Vec<SessionKey> {
    let Ok(s) = u8::try_from(shard) else { return Vec::new() };
    let mut keys = vec![SessionKey::Shard(s, Lane::Up), SessionKey::Shard(s, Lane::Urgent)];
    if shard == 0 {
        keys.push(SessionKey::Legacy);
    }
    keys
}

/// What the store holds for the devices of the shards in `mine`, read after their claim.
fn shard_state(store: &dyn IngestStore, mine: &ShardMask) -> Result<ShardState, StoreError> {
    let of = |eui: gridsense_protocol::Eui| mine.has_device(eui);
    let mut state = ShardState {
        counters: store.counters()?.into_iter().filter(|(e, _)| of(*e)).collect(),
        downlink_counters: store.downlink_counters()?.into_iter().filter(|(e, _)| of(*e)).collect(),
        open: store.open_incidents()?.into_iter().filter(|((e, _), _)| of(*e)).collect(),
        sequences: store.sequences()?,
        ..ShardState::default()
    };
    store.each_health(&mut |eui, h| {
        if of(eui) {
            state.health.push((eui, h));
        }
    })?;
    store.each_rule_state(&mut |eui, rule, st| {
        if of(eui) {
            state.rule_states.push((eui, rule.to_owned(), st));
        }
    })?;
    Ok(state)
}

#[derive(Debug, Clone, Copy)]
struct Batching {
    max: usize,
    max_wait_ms: u64,
    /// Telemetry in the store older than this is pruned (hourly), ms; `None` with an external
    /// sink.
    retention_ms: Option<i64>,
    /// How often to look for operators' requests in the store, ms.
    poll_ms: u64,
}

/// How often embedded telemetry is pruned, ms.
const PRUNE_EVERY_MS: u64 = 3_600_000;

/// The pipeline's two inputs: the urgent lane's sessions feed one, every other session the
/// other. The urgent one is always read first, so an alarm never waits behind the telemetry
/// held at the gateway (ARCHITECTURE: alarms first).
struct Inbox {
    urgent: mpsc::Receiver<Tagged>,
    up: mpsc::Receiver<Tagged>,
    urgent_open: bool,
    up_open: bool,
}

impl Inbox {
    /// The next message, an urgent one first; `None` once every session has ended. Cancel
    /// safe (it only awaits `recv`).
    async fn recv(&mut self) -> Option<Tagged> {
        loop {
            tokio::select! {
                biased;
                m = self.urgent.recv(), if self.urgent_open => match m {
                    Some(m) => return Some(m),
                    None => self.urgent_open = false,
                },
                m = self.up.recv(), if self.up_open => match m {
                    Some(m) => return Some(m),
                    None => self.up_open = false,
                },
                else => return None,
            }
        }
    }
}

async fn pipeline_task(
    mut rx: Inbox,
    out: &mut Outputs,
    store: Box<dyn IngestStore>,
    mut pipeline: Pipeline,
    batching: Batching,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let (status, clock) = (out.status.clone(), out.clock.clone());
    if !out.cluster.exclusive {
        pipeline.set_sharded_ids();
    }
    // A registry change announced by the store (PostgreSQL's NOTIFY) makes the poll due at
    // once; the poll reads the change feed by position either way.
    let registry_wake = Arc::new(tokio::sync::Notify::new());
    match store.wake_on_registry_changes(Arc::downgrade(&registry_wake)) {
        Ok(true) => tracing::debug!("registry changes wake the reader"),
        Ok(false) => {}
        Err(e) => tracing::warn!("registry changes are polled only: {e}"),
    }
    let mut w = Writer { store: Some(store), committing: None, fenced: false };
    // The shell's monotonic time, ms since the task started, for the batching policy.
    let origin = tokio::time::Instant::now();
    let mono = || i64::try_from(origin.elapsed().as_millis()).unwrap_or(i64::MAX);
    let at = |ms: i64| origin + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    let mut batcher: batcher::Batcher<Tagged> =
        batcher::Batcher::new(batching.max, batching.max_wait_ms);
    let mut poll = batcher::Every::new(batching.poll_ms);
    let mut prune = batcher::Every::new(PRUNE_EVERY_MS);
    let mut last_request = 0;
    // Cases finished (closed or voided) on the board since start are looked for after this.
    let mut last_case_event = match w.store.as_ref().map(|s| s.last_case_event()) {
        Some(r) => r?,
        None => 0,
    };
    // Registry changes (re-keyed, retired, new devices) since start are applied as they come.
    let mut last_registry = match w.store.as_ref().map(|s| s.registry_position()) {
        Some(r) => r?,
        None => 0,
    };
    loop {
        // A batch the store refused (a lease moved on): start over from the store.
        if w.fenced {
            reset(&mut w, out, &mut pipeline, &mut batcher);
        }
        // Operators' new requests (`gridsense devices configure`) from the store, once the
        // commit in flight is settled.
        let polling = poll.due(mono());
        if polling {
            w.settle(None, out, &pipeline, &mut batcher).await?;
        }
        if polling && let Some(s) = w.store.take() {
            let (after, events_after, now) = (last_request, last_case_event, clock());
            let registry_after = last_registry;
            let (s, found) = tokio::task::spawn_blocking(move || {
                let r = s.open_requests(after).and_then(|requests| {
                    Ok((
                        requests,
                        s.finished_cases(events_after)?,
                        s.windows(now)?,
                        s.registry_changes(registry_after)?,
                    ))
                });
                (s, r)
            })
            .await?;
            w.store = Some(s);
            // A store that is away (PostgreSQL restarting) is asked again at the next poll;
            // the batch commit is what waits for it.
            let found = match found {
                Err(e) if e.is_transient() => {
                    tracing::warn!("polling the store: {e}; again at the next poll");
                    None
                }
                other => Some(other?),
            };
            if let Some((requests, finished, windows, (registry_position, registry))) = found {
                // Registry first, so a request for a device registered meanwhile is not dropped.
                if !registry.is_empty() {
                    tracing::info!(devices = registry.len(), "registry changes applied");
                    pipeline.apply_registry(registry);
                    status.devices_registered.store(pipeline.registered() as u64, Relaxed);
                }
                last_registry = registry_position;
                for (eui, pending) in requests {
                    last_request = last_request.max(pending.id);
                    pipeline.request(eui, pending);
                }
                pipeline.set_windows(windows);
                if !finished.is_empty() {
                    // Release the incidents of cases closed on the board (the incident rows are
                    // idempotent upserts), and tell live views.
                    let mut batch = Batch::default();
                    for (event, case) in finished {
                        last_case_event = last_case_event.max(event);
                        pipeline.case_finished(case, now, &mut batch);
                    }
                    batch.fence = out.cluster.fence();
                    // Only when a live view listens: it allocates per changed row.
                    let changes =
                        (status.events.0.receiver_count() > 0).then(|| Changes::of(&batch));
                    if let Some(s) = w.store.take() {
                        let c = commit_until_durable(s, batch, status.clone(), shutdown.clone())
                            .await?;
                        w.fenced |= c.fenced;
                        w.store = Some(c.store);
                    }
                    if let Some(changes) = changes.filter(Changes::is_visible) {
                        let changes = Changes { sent_ms: crate::status::wall_clock()(), ..changes };
                        let _ = status
                            .events
                            .0
                            .send(serde_json::to_string(&changes).unwrap_or_default());
                    }
                    status.incidents_open.store(pipeline.open_incidents() as u64, Relaxed);
                }
            }
        }
        // Wait for the first message, the next offline deadline, the next poll, the commit in
        // flight, news of the leases, or shutdown.
        let poll_in =
            at(poll.next().unwrap_or(0)).saturating_duration_since(tokio::time::Instant::now());
        let deadline_in = pipeline
            .next_deadline()
            .map(|d| Duration::from_millis(u64::try_from(d.saturating_sub(clock())).unwrap_or(0)))
            .map_or(poll_in, |d| d.min(poll_in));
        let deadline_in = Some(deadline_in);
        let first = tokio::select! {
            joined = done(&mut w.committing) => {
                let joined = Some(joined);
                w.settle(joined, out, &pipeline, &mut batcher).await?;
                continue;
            }
            news = out.cluster.news.recv() => {
                if let Some(news) = news {
                    on_news(news, &mut w, out, &mut pipeline, &mut batcher, &shutdown).await?;
                }
                continue;
            }
            msg = rx.recv() => match msg {
                Some(msg) => Some(msg),
                // Every session has ended (it only happens on shutdown).
                None => {
                    w.settle(None, out, &pipeline, &mut batcher).await?;
                    return Ok(());
                }
            },
            () = registry_wake.notified() => {
                poll.now();
                continue;
            }
            () = sleep_or_never(deadline_in) => None,
            _ = shutdown.changed() => None,
        };
        let stopping = *shutdown.borrow();
        let mut now = clock();
        let mut batch = Batch::default();
        pipeline.tick(now, &mut batch);
        let mut rejected = 0;
        if let Some(msg) = first {
            // Each message is handled as it arrives; the batcher says when the batch closes
            // (`batch_max`, `batch_max_ms`, or at once when something urgent is queued: a
            // case, an update, an SOS, committed and delivered without waiting). The commit in
            // flight, if any, is settled (acknowledged) the moment it is durable.
            let mut next = Some(msg);
            while let Some(msg) = next.take() {
                now = clock();
                let until = match admit(msg, out).await {
                    Some(msg) => {
                        // A topic that is not UTF-8 is no device's: rejected as `bad_topic`.
                        let topic = std::str::from_utf8(&msg.publish.topic).unwrap_or("");
                        let verdict = pipeline.handle(now, topic, &msg.publish.payload, &mut batch);
                        if let Outcome::Rejected(_) = verdict {
                            rejected += 1;
                        }
                        let urgent = !batch.cases.outbox.is_empty();
                        match batcher.handled(mono(), msg, urgent) {
                            batcher::Next::TakeMoreUntil(until) => until,
                            batcher::Next::Commit(_) => break,
                        }
                    }
                    // Not this instance's to handle (forwarded, or its session's run ended).
                    None => match batcher.deadline() {
                        Some(until) => until,
                        None => break,
                    },
                };
                next = loop {
                    tokio::select! {
                        biased;
                        joined = done(&mut w.committing) => {
                            let joined = Some(joined);
                            w.settle(joined, out, &pipeline, &mut batcher).await?;
                            if w.fenced {
                                break None;
                            }
                        }
                        m = tokio::time::timeout_at(at(until), rx.recv()) => break m.ok().flatten(),
                    }
                };
            }
        }
        if w.fenced {
            // What this batch holds rests on the refused one: nothing of it is written.
            continue;
        }
        pipeline.finish(&mut batch, now, stopping);
        // The batch is decided: the one before it must be durable (and acknowledged) before
        // this one is written.
        w.settle(None, out, &pipeline, &mut batcher).await?;
        if w.fenced {
            continue;
        }
        batcher.seal();
        let downlinks_sealed = std::mem::take(&mut batch.downlinks);
        if !batch.is_empty() || !downlinks_sealed.is_empty() {
            let Some(s) = w.store.take() else { break };
            batch.fence = out.cluster.fence();
            let effects = Effects::of(&batch, &status, rejected, downlinks_sealed);
            let (status, shutdown) = (status.clone(), shutdown.clone());
            w.committing = Some(Committing {
                handle: tokio::spawn(commit_until_durable(s, batch, status, shutdown)),
                effects,
            });
        } else {
            // Nothing to write (duplicates, rejects): acknowledged now, after the batch before.
            status.frames_rejected.fetch_add(rejected, Relaxed);
            acknowledge(&mut batcher, out).await;
        }
        if let Some(retention) = batching.retention_ms
            && prune.due(now)
        {
            w.settle(None, out, &pipeline, &mut batcher).await?;
            if let Some(mut s) = w.store.take() {
                let (s, pruned) = tokio::task::spawn_blocking(move || {
                    let r = s.prune_telemetry(now.saturating_sub(retention), now);
                    (s, r)
                })
                .await?;
                w.store = Some(s);
                if let Ok(n) = pruned.inspect_err(|e| tracing::warn!("pruning telemetry: {e}"))
                    && n > 0
                {
                    tracing::info!(rows = n, "pruned telemetry past its retention");
                }
            }
        }
        if stopping {
            w.settle(None, out, &pipeline, &mut batcher).await?;
            return Ok(());
        }
    }
    Ok(())
}

/// Whether a message is handled here: not when its session's run has ended (its ack would go
/// nowhere; the broker sends it again to the session's holder), and a version 1 frame whose
/// device's shard is another instance's is republished to that shard's topic instead.
async fn admit(t: Tagged, out: &Outputs) -> Option<Tagged> {
    if !out.sessions.current(&t) {
        out.status.unacked.fetch_sub(1, Relaxed);
        out.status.left_for_next_owner.fetch_add(1, Relaxed);
        return None;
    }
    let route = parse_route(std::str::from_utf8(&t.publish.topic).unwrap_or(""));
    if out.sessions.brokers() > 1
        && let Ok(Route::Uplink { eui, .. } | Route::LegacyUplink(eui)) = route
    {
        out.sessions.heard(eui, t.broker);
    }
    if t.key == SessionKey::Legacy
        && let Ok(Route::LegacyUplink(eui)) = route
        && !out.cluster.holds(u16::from(shard_of(eui, out.cluster.shards)))
    {
        let to = uplink_topic(eui, out.cluster.shards, Lane::Up);
        out.sessions.forward(t, to.as_str().to_owned()).await;
        return None;
    }
    Some(t)
}

/// Follows the lease task's news.
async fn on_news(
    news: News,
    w: &mut Writer,
    out: &mut Outputs,
    pipeline: &mut Pipeline,
    batcher: &mut batcher::Batcher<Tagged>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), IngestError> {
    // The commit in flight first: what it holds is acknowledged (or refused) before anything
    // moves.
    w.settle(None, out, pipeline, batcher).await?;
    if w.fenced {
        return Ok(());
    }
    let first = !std::mem::replace(&mut out.cluster.told, true);
    match news {
        News::Claimed(claimed) => {
            let mine = out.cluster.mask(claimed.iter().map(|c| c.0));
            if !out.cluster.exclusive
                && let Some(s) = w.store.take()
            {
                // Read after the claim: after the previous owner's last commit for them.
                let m = mine.clone();
                let (s, state) = tokio::task::spawn_blocking(move || {
                    let r = shard_state(&*s, &m);
                    (s, r)
                })
                .await?;
                w.store = Some(s);
                pipeline.adopt_shards(&mine, state?);
            }
            out.cluster.held.extend(claimed.iter().copied());
            let keys: Vec<SessionKey> = claimed.iter().flat_map(|c| sessions_of(c.0)).collect();
            out.sessions.start(&keys);
        }
        News::Release(release) => {
            // Every changed health row goes with the last batch of these shards.
            let mut batch = Batch::default();
            pipeline.finish(&mut batch, (out.clock)(), true);
            batch.fence = out.cluster.fence();
            if !batch.is_empty()
                && let Some(s) = w.store.take()
            {
                let c =
                    commit_until_durable(s, batch, out.status.clone(), shutdown.clone()).await?;
                w.fenced |= c.fenced;
                w.store = Some(c.store);
                if w.fenced {
                    return Ok(());
                }
            }
            let keys: Vec<SessionKey> = release.iter().flat_map(|r| sessions_of(r.0)).collect();
            out.sessions.close(&keys).await;
            pipeline.forget_shards(&out.cluster.mask(release.iter().map(|r| r.0)));
            for (shard, epoch) in release {
                out.cluster.held.remove(&shard);
                out.cluster.reply(Reply::Released(shard, epoch));
            }
        }
        News::Lost(lost) => {
            for shard in &lost {
                for key in sessions_of(*shard) {
                    out.sessions.abort(key);
                }
                out.cluster.held.remove(shard);
            }
            pipeline.forget_shards(&out.cluster.mask(lost.iter().copied()));
        }
    }
    if first && !out.cluster.exclusive {
        // What was restored at start for the shards held elsewhere goes.
        let held = out.cluster.mask(out.cluster.held.keys().copied());
        pipeline.forget_shards(&held.complement());
    }
    out.status.shards_held.store(out.cluster.held.len() as u64, Relaxed);
    status_devices(out, pipeline);
    Ok(())
}

fn status_devices(out: &Outputs, pipeline: &Pipeline) {
    out.status.devices_online.store(pipeline.health().online_count() as u64, Relaxed);
    out.status.incidents_open.store(pipeline.open_incidents() as u64, Relaxed);
}

/// After a batch the store refused (a shard's lease moved on while it was decided): nothing
/// held is acknowledged, every session stops, every shard's state is dropped, and the lease
/// task claims again what is still this instance's — whose state is then read from the store
/// and whose sessions start again, so the broker sends what was not acknowledged once more.
/// A lease lost to a pause is a rebalance, not an error.
fn reset(
    w: &mut Writer,
    out: &mut Outputs,
    pipeline: &mut Pipeline,
    batcher: &mut batcher::Batcher<Tagged>,
) {
    w.fenced = false;
    let dropped = batcher.discard_all() as u64;
    out.status.unacked.fetch_sub(dropped, Relaxed);
    out.status.left_for_next_owner.fetch_add(dropped, Relaxed);
    out.status.fenced.fetch_add(1, Relaxed);
    for key in out.sessions.keys() {
        out.sessions.abort(key);
    }
    tracing::warn!(
        shards = out.cluster.held.len(),
        dropped,
        "the store refused a batch: a shard's lease moved on while it was decided (this instance was paused or cut off); starting over from the store for the shards still this instance's"
    );
    pipeline.forget_shards(&ShardMask::all(out.cluster.shards));
    out.cluster.held.clear();
    out.cluster.reply(Reply::Reset);
    out.status.shards_held.store(0, Relaxed);
    status_devices(out, pipeline);
}

/// Where the pipeline task's results go once a batch is durable.
struct Outputs {
    sessions: Sessions,
    status: Arc<Status>,
    clock: Clock,
    cluster: Cluster,
}

/// What a batch does once durable: the figures it adds, the live notice, the delivery workers
/// to wake, the downlinks sealed with it.
struct Effects {
    rejected: u64,
    filed: u64,
    future: u64,
    queued_alerts: u64,
    queued_cases: bool,
    /// When each of its cases was decided, for the latency histogram.
    decided: Vec<i64>,
    /// Only when a live view listens: it allocates per changed row.
    changes: Option<Changes>,
    /// Topic, frame, and how it goes.
    downlinks: Vec<(String, Vec<u8>, DownlinkRoute)>,
}

impl Effects {
    fn of(
        batch: &Batch,
        status: &Status,
        rejected: u64,
        downlinks: Vec<(String, Vec<u8>, DownlinkRoute)>,
    ) -> Self {
        if let Ok(mut r) = status.rejects.lock() {
            for (reason, n) in &batch.rejects {
                *r.entry(reason).or_default() += n;
            }
        }
        Effects {
            rejected,
            filed: batch.cases.cases.len() as u64,
            future: batch.future_samples,
            queued_alerts: batch.cases.alerts.len() as u64,
            queued_cases: batch.cases.outbox.iter().any(|o| o.channel == "case"),
            decided: batch.cases.cases.iter().map(|c| c.detected_ms).collect(),
            changes: (status.events.0.receiver_count() > 0).then(|| Changes::of(batch)),
            downlinks,
        }
    }
}

/// A batch being written while the next one is decided.
struct Committing {
    handle: tokio::task::JoinHandle<Result<Committed, IngestError>>,
    effects: Effects,
}

/// A commit task's end.
type Joined = Result<Result<Committed, IngestError>, tokio::task::JoinError>;

/// A commit in flight's result (pending forever when there is none).
async fn done(committing: &mut Option<Committing>) -> Joined {
    match committing {
        Some(c) => (&mut c.handle).await,
        None => std::future::pending().await,
    }
}

/// A durable batch: its figures, its live notice, the delivery workers woken, its downlinks
/// sent and its messages acknowledged in arrival order. Returns the store for the next commit;
/// a failed commit is the task's error (nothing of it acknowledged).
async fn settle(
    effects: Effects,
    joined: Joined,
    out: &Outputs,
    pipeline: &Pipeline,
    batcher: &mut batcher::Batcher<Tagged>,
) -> Result<Committed, IngestError> {
    let committed = joined??;
    if committed.fenced {
        // Refused: nothing of it happened; the caller starts over.
        return Ok(committed);
    }
    let (status, e) = (&out.status, effects);
    status.last_commit_us.store(committed.took_us, Relaxed);
    status.frames_accepted.fetch_add(committed.accepted, Relaxed);
    status.frames_rejected.fetch_add(e.rejected, Relaxed);
    status.batches.fetch_add(1, Relaxed);
    status_devices(out, pipeline);
    status.cases_filed.fetch_add(e.filed, Relaxed);
    status.samples_future.fetch_add(e.future, Relaxed);
    status.alerts.fetch_add(e.queued_alerts, Relaxed);
    let durable = (out.clock)();
    for d in e.decided {
        status.case_latency.observe(u64::try_from(durable.saturating_sub(d)).unwrap_or(0));
    }
    if let Some(changes) = e.changes.filter(Changes::is_visible) {
        let changes = Changes { sent_ms: crate::status::wall_clock()(), ..changes };
        let _ = status.events.0.send(serde_json::to_string(&changes).unwrap_or_default());
    }
    // Durable: the delivery workers may send them now.
    if e.queued_cases {
        status.outbox_wake[0].notify_one();
    }
    if e.queued_alerts > 0 {
        status.outbox_wake[1].notify_one();
    }
    // Committed with their counters: now they may go out.
    for (topic, frame, route) in e.downlinks {
        out.sessions.downlink(topic, frame, route).await;
    }
    acknowledge(batcher, out).await;
    Ok(committed)
}

/// The store, and the batch being written with it while the next one is decided.
struct Writer {
    /// The store, while no commit has it.
    store: Option<Box<dyn IngestStore>>,
    committing: Option<Committing>,
    /// The store refused the last batch (fencing): start over before anything else.
    fenced: bool,
}

impl Writer {
    /// Settles the commit in flight, if any ([`settle`]): `joined` when it is known to be
    /// done, else waited for.
    async fn settle(
        &mut self,
        joined: Option<Joined>,
        out: &Outputs,
        pipeline: &Pipeline,
        batcher: &mut batcher::Batcher<Tagged>,
    ) -> Result<(), IngestError> {
        if let Some(c) = self.committing.take() {
            let joined = match joined {
                Some(j) => j,
                None => c.handle.await,
            };
            let committed = settle(c.effects, joined, out, pipeline, batcher).await?;
            self.fenced |= committed.fenced;
            self.store = Some(committed.store);
        }
        Ok(())
    }
}

/// Acknowledges the oldest sealed batch's messages, in arrival order.
async fn acknowledge(batcher: &mut batcher::Batcher<Tagged>, out: &Outputs) {
    for msg in batcher.committed() {
        out.status.unacked.fetch_sub(1, Relaxed);
        out.sessions.ack(msg).await;
    }
}

/// Commits `batch`; while the failure is [`StoreError::is_transient`] (a full disk above all), retries the
/// same batch every second — up to five between attempts — holding its messages
/// unacknowledged: the session's channel fills, reading from the broker stops, and the broker
/// keeps the rest. `status.store_error` says why meanwhile (readiness, metrics). Returns the
/// frames accepted; a batch refused because a shard's lease moved on comes back `fenced`
/// (nothing of it written); any other failure, or shutdown while it waits, is returned as an
/// error (nothing of the batch acknowledged).
async fn commit_until_durable(
    mut store: Box<dyn IngestStore>,
    batch: Batch,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Committed, IngestError> {
    let mut batch = batch;
    let started = std::time::Instant::now();
    let mut since: Option<std::time::Instant> = None;
    let mut retry = batcher::CommitRetry::new();
    loop {
        let (s, b, r) = tokio::task::spawn_blocking(move || {
            let r = store.commit(&batch);
            (store, batch, r)
        })
        .await?;
        (store, batch) = (s, b);
        match r {
            Ok(()) => {
                if let Some(t) = since {
                    tracing::warn!(
                        paused_s = t.elapsed().as_secs(),
                        "store writable again: committed the held batch, acknowledging resumes"
                    );
                    if let Ok(mut e) = status.store_error.lock() {
                        *e = None;
                    }
                }
                let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                return Ok(Committed { store, accepted: batch.accepted, took_us, fenced: false });
            }
            Err(e @ StoreError::Fenced { .. }) => {
                tracing::warn!("{e}");
                return Ok(Committed { store, accepted: 0, took_us: 0, fenced: true });
            }
            Err(e) if e.is_transient() => {
                if since.is_none() {
                    tracing::error!(
                        "commit failed: {e}; holding {} frames unacknowledged and retrying (the broker keeps the rest)",
                        batch.accepted
                    );
                    since = Some(std::time::Instant::now());
                }
                if let Ok(mut slot) = status.store_error.lock() {
                    *slot = Some(e.to_string());
                }
                status.store_retries.fetch_add(1, Relaxed);
                let wait = Duration::from_millis(retry.failed());
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return Err(IngestError::Store(e));
                }
            }
            Err(e) => return Err(IngestError::Store(e)),
        }
    }
}

/// A batch made durable.
struct Committed {
    store: Box<dyn IngestStore>,
    /// Frames accepted in it.
    accepted: u64,
    /// How long the commit took (retries included), µs.
    took_us: u64,
    /// Refused by the fencing check: nothing written.
    fenced: bool,
}

async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
