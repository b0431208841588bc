//! The instance's broker sessions: one per owned shard and lane, and the legacy one (version
//! 1's topic) with shard 0 — on every broker (`mqtt.urls`: two independent brokers, the
//! devices failing over between them). Each has its own client (client id and account
//! [`SessionKey::name`]), session task ([`session::run`]) and acker ([`session::acker`]). The
//! urgent lane's sessions feed one channel to the pipeline task, every other session another,
//! and the pipeline always reads the urgent one first (an alarm never waits behind the
//! telemetry held at the gateway); each message is tagged by its session and run, and the
//! pipeline's acks go back to the session (and run) the message came in on.
//!
//! Starting and stopping: a claimed shard's sessions start after its state is adopted; a
//! shard handed over has its sessions closed gracefully (acks queued, then DISCONNECT) once
//! its last batch is durable; a lost shard's sessions are aborted — no ack, no reconnect, the
//! broker keeps what was not acknowledged for the new owner.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use gridsense_protocol::{Eui, topic::parse_topic};
use rumqttc::v5::{
    AsyncClient,
    mqttbytes::{QoS, v5::Publish},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    Target,
    leases::Gate,
    session::{self, Forwards, Link, Outbound, Reconnect, SessionKey, SessionOptions, Tagged},
};
use crate::{downlink::Route as DownlinkRoute, status::Status};

/// How to make a session: the broker, the gateway's base client id and account, the options.
#[derive(Debug)]
pub struct Template {
    /// The broker and the gateway's base login.
    pub target: Target,
    /// Host (the name TLS checks), keep-alive, limits; the client id and login are each
    /// session's.
    pub options: SessionOptions,
    /// Reconnect backoff, ms.
    pub reconnect_ms: (u64, u64),
}

#[derive(Debug)]
struct Running {
    generation: u64,
    /// Acks for the pipeline to hand over without waiting: the session's task may be waiting
    /// for room in the pipeline's channel, so a bounded queue here could close a circle. Its
    /// length is bounded by the messages of this session the pipeline holds (which are
    /// bounded by the channel and the batch size).
    acks: mpsc::UnboundedSender<Publish>,
    /// Forwarded frames, likewise (each holds its original's ack).
    outbound: mpsc::UnboundedSender<Outbound>,
    /// Downlinks, bounded ([`DOWNLINK_QUEUE`]): under overload rumqttc writes one queued
    /// request per poll and the session polls only as fast as the pipeline takes messages, so
    /// an unbounded queue here kept growing (with a million devices reporting faster than they
    /// were stored the gateway reached 2,231 MiB; 1,491 MiB with this bound, the rest not yet
    /// found). When full, a downlink is dropped and counted; each kind is made
    /// good later: a configuration is sent again when its ack does not come, a confirmation by
    /// the next one (or the one a copy earns), a time sync at a later status.
    downlinks: mpsc::Sender<session::Downlink>,
    session: JoinHandle<()>,
    acker: JoinHandle<()>,
}

/// Downlinks queued per session, at most (see [`Running::downlinks`]).
pub const DOWNLINK_QUEUE: usize = 256;

/// The running sessions.
#[derive(Debug)]
pub struct Sessions {
    /// One per broker.
    templates: Vec<Template>,
    /// Into the pipeline: every session but the urgent lane's, and the urgent lane's (read
    /// first).
    tx: mpsc::Sender<Tagged>,
    urgent_tx: mpsc::Sender<Tagged>,
    status: Arc<Status>,
    gate: Arc<Gate>,
    shutdown: watch::Receiver<bool>,
    /// By broker and session.
    running: BTreeMap<(u8, SessionKey), Running>,
    generation: u64,
    shards: u16,
    /// With two brokers: the broker each device was last heard on (its downlinks go there).
    heard: Mutex<HashMap<Eui, u8>>,
}

impl Sessions {
    /// No session yet; messages will go into `tx`.
    pub fn new(
        templates: Vec<Template>,
        (tx, urgent_tx): (mpsc::Sender<Tagged>, mpsc::Sender<Tagged>),
        status: Arc<Status>,
        gate: Arc<Gate>,
        shards: u16,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Sessions {
            templates,
            tx,
            urgent_tx,
            status,
            gate,
            shutdown,
            running: BTreeMap::new(),
            generation: 0,
            shards,
            heard: Mutex::new(HashMap::new()),
        }
    }

    fn wanted(&self) {
        self.want(self.running.keys().copied());
    }

    /// Counts `sessions` as wanted, per broker.
    fn want(&self, sessions: impl Iterator<Item = (u8, SessionKey)>) {
        let mut per_broker = vec![0u64; self.templates.len()];
        for (b, _) in sessions {
            if let Some(n) = per_broker.get_mut(usize::from(b)) {
                *n += 1;
            }
        }
        self.status.want_sessions(&per_broker);
    }

    /// Starts these sessions (those not running). All count as wanted before any starts, so
    /// the instance reads as connected only once every one is subscribed.
    pub fn start(&mut self, keys: &[SessionKey]) {
        let brokers = u8::try_from(self.templates.len()).unwrap_or(u8::MAX);
        let new: Vec<(u8, SessionKey)> = keys
            .iter()
            .flat_map(|k| (0..brokers).map(move |b| (b, *k)))
            .filter(|bk| !self.running.contains_key(bk))
            .collect();
        self.want(self.running.keys().copied().chain(new.iter().copied()));
        for (broker, key) in new {
            self.start_one(broker, key);
        }
    }

    fn start_one(&mut self, broker: u8, key: SessionKey) {
        self.generation += 1;
        let generation = self.generation;
        let Some(t) = self.templates.get(usize::from(broker)) else { return };
        let o = &t.options;
        let options = SessionOptions {
            client_id: key.name(&t.target.client_id),
            credentials: t.target.credentials.as_ref().map(|(u, p)| (key.name(u), p.clone())),
            host: o.host.clone(),
            tls: o.tls.clone(),
            ..*o
        };
        let window = usize::from(o.inflight);
        let (client, eventloop) =
            AsyncClient::new(session::mqtt_options(&options), window * 2 + 16);
        let (acks, ack_rx) = mpsc::unbounded_channel::<Publish>();
        let (outbound, out_rx) = mpsc::unbounded_channel::<Outbound>();
        let (downlinks, downlink_rx) = mpsc::channel(DOWNLINK_QUEUE);
        let forwards =
            (key == SessionKey::Legacy).then(|| Arc::new(Mutex::new(Forwards::default())));
        let gate = self.gate.clone();
        let shard = key.shard();
        let link = Link {
            broker,
            key,
            generation,
            publishes: match key {
                SessionKey::Shard(_, gridsense_protocol::topic::Lane::Urgent) => {
                    self.urgent_tx.clone()
                }
                _ => self.tx.clone(),
            },
            status: self.status.clone(),
            policy: Reconnect::new(t.reconnect_ms.0, t.reconnect_ms.1),
            may_connect: Arc::new(move || gate.holds(shard)),
            shutdown: self.shutdown.clone(),
            forwards: forwards.clone(),
        };
        let session = tokio::spawn(session::run(eventloop, client.clone(), link));
        let acker = tokio::spawn(session::acker(client, ack_rx, (downlink_rx, out_rx), forwards));
        self.running.insert(
            (broker, key),
            Running { generation, acks, outbound, downlinks, session, acker },
        );
    }

    /// The running sessions of `key`, on every broker.
    fn of(&self, key: SessionKey) -> Vec<(u8, SessionKey)> {
        self.running.keys().filter(|(_, k)| *k == key).copied().collect()
    }

    /// Stops a session at once: no more acks, no reconnect; the broker keeps what it did not
    /// get acknowledged.
    pub fn abort(&mut self, key: SessionKey) {
        for bk in self.of(key) {
            if let Some(r) = self.running.remove(&bk) {
                r.session.abort();
                r.acker.abort();
            }
        }
        self.wanted();
    }

    /// Closes sessions gracefully: the acks queued go out, then DISCONNECT (the broker keeps
    /// the session for the next owner). Waits up to 5 s for each.
    pub async fn close(&mut self, keys: &[SessionKey]) {
        let mut closing = Vec::new();
        for key in keys {
            for bk in self.of(*key) {
                if let Some(r) = self.running.remove(&bk) {
                    drop(r.acks);
                    drop(r.outbound);
                    closing.push((r.acker, r.session));
                }
            }
        }
        self.wanted();
        for (acker, session) in closing {
            let stopped = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = acker.await;
                let _ = session.await;
            })
            .await;
            if stopped.is_err() {
                tracing::warn!("a broker session did not close within 5 s");
            }
        }
    }

    /// Closes every session gracefully.
    pub async fn close_all(&mut self) {
        let keys = self.keys();
        self.close(&keys).await;
    }

    /// Whether a message came in on a session's current run (else its ack has nowhere to go,
    /// and it must not be handled: the broker sends it again to whoever holds the session).
    pub fn current(&self, t: &Tagged) -> bool {
        self.running.get(&(t.broker, t.key)).is_some_and(|r| r.generation == t.generation)
    }

    /// Brokers this instance holds its sessions on.
    pub fn brokers(&self) -> usize {
        self.templates.len()
    }

    /// With two brokers: `eui` was heard through `broker` (its downlinks go there).
    pub fn heard(&self, eui: Eui, broker: u8) {
        if self.templates.len() > 1
            && let Ok(mut h) = self.heard.lock()
            && h.get(&eui) != Some(&broker)
        {
            h.insert(eui, broker);
        }
    }

    /// Acknowledges a message through the session it came in on (dropped when that run has
    /// ended: the broker redelivers it, and the counter window drops it then).
    pub async fn ack(&self, t: Tagged) {
        if let Some(r) =
            self.running.get(&(t.broker, t.key)).filter(|r| r.generation == t.generation)
            && r.acks.send(t.publish).is_err()
        {
            tracing::warn!("ack not sent: the session has ended");
        }
    }

    /// Sends a sealed downlink (as `route` says) through the device's shard's `up` session on the broker the
    /// device was last heard on (the first broker when it was not heard yet, or that broker's
    /// session is down to none) — or, [`DownlinkRoute::Everywhere`], a send again of one not
    /// acknowledged in time, through that session on every broker (the device may have moved
    /// to the other).
    pub async fn downlink(&self, topic: String, frame: Vec<u8>, route: DownlinkRoute) {
        let Ok((eui, _)) = parse_topic(&topic) else { return };
        let key = self.up_session(eui);
        // A confirmation is made good by the next one: at most once.
        let qos = match route {
            DownlinkRoute::Confirmation => QoS::AtMostOnce,
            DownlinkRoute::LastHeard | DownlinkRoute::Everywhere => QoS::AtLeastOnce,
        };
        if route == DownlinkRoute::Everywhere && self.templates.len() > 1 {
            let mut sent = false;
            for ((_, k), r) in &self.running {
                if *k == key {
                    sent |= self.queue_downlink(r, (topic.clone(), frame.clone(), qos));
                }
            }
            if !sent {
                tracing::warn!(%eui, "downlink not sent: its shard is no longer held here");
            }
            return;
        }
        let last = self.heard.lock().ok().and_then(|h| h.get(&eui).copied()).unwrap_or(0);
        let r = self
            .running
            .get(&(last, key))
            .or_else(|| self.running.iter().find(|((_, k), _)| *k == key).map(|(_, r)| r));
        match r {
            Some(r) => {
                self.queue_downlink(r, (topic, frame, qos));
            }
            None => tracing::warn!(%eui, "downlink not sent: its shard is no longer held here"),
        }
    }

    /// Queues a downlink on a session; false when it went nowhere (full: dropped and counted,
    /// see [`Running::downlinks`]; or the session ended).
    fn queue_downlink(&self, r: &Running, downlink: session::Downlink) -> bool {
        match r.downlinks.try_send(downlink) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.status.downlinks_dropped.fetch_add(1, Relaxed);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Republishes a version 1 frame to its device's shard topic through the legacy session;
    /// the original is acknowledged once the broker has the copy.
    pub async fn forward(&self, t: Tagged, to: String) {
        if let Some(r) = self.running.get(&(t.broker, SessionKey::Legacy))
            && r.generation == t.generation
        {
            let _ = r.outbound.send(Outbound::Forward(to, t.publish));
        }
    }

    /// The `up` session of a device's shard.
    pub fn up_session(&self, eui: Eui) -> SessionKey {
        let shard = gridsense_protocol::topic::shard_of(eui, self.shards);
        SessionKey::Shard(shard, gridsense_protocol::topic::Lane::Up)
    }

    /// Sessions running.
    pub fn keys(&self) -> Vec<SessionKey> {
        let mut keys: Vec<SessionKey> = self.running.keys().map(|(_, k)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}
