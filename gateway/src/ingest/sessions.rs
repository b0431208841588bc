//! The instance's broker sessions: one per owned shard and lane, and the legacy one (version
//! 1's topic) with shard 0. Each has its own client (client id and account
//! [`SessionKey::name`]), session task ([`session::run`]) and acker ([`session::acker`]); all
//! of them feed one channel to the pipeline task with each message tagged by its session and
//! run, and the pipeline's acks go back to the session (and run) the message came in on.
//!
//! Starting and stopping: a claimed shard's sessions start after its state is adopted; a
//! shard handed over has its sessions closed gracefully (acks queued, then DISCONNECT) once
//! its last batch is durable; a lost shard's sessions are aborted — no ack, no reconnect, the
//! broker keeps what was not acknowledged for the new owner.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use gridsense_protocol::{Eui, topic::parse_topic};
use rumqttc::v5::{AsyncClient, mqttbytes::v5::Publish};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    Target,
    leases::Gate,
    session::{self, Forwards, Link, Outbound, Reconnect, SessionKey, SessionOptions, Tagged},
};
use crate::status::Status;

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
    /// Downlinks and forwarded frames, likewise: at most two per frame of a committed batch.
    outbound: mpsc::UnboundedSender<Outbound>,
    session: JoinHandle<()>,
    acker: JoinHandle<()>,
}

/// The running sessions.
#[derive(Debug)]
pub struct Sessions {
    template: Template,
    tx: mpsc::Sender<Tagged>,
    status: Arc<Status>,
    gate: Arc<Gate>,
    shutdown: watch::Receiver<bool>,
    running: BTreeMap<SessionKey, Running>,
    generation: u64,
    shards: u16,
}

impl Sessions {
    /// No session yet; messages will go into `tx`.
    pub fn new(
        template: Template,
        tx: mpsc::Sender<Tagged>,
        status: Arc<Status>,
        gate: Arc<Gate>,
        shards: u16,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Sessions {
            template,
            tx,
            status,
            gate,
            shutdown,
            running: BTreeMap::new(),
            generation: 0,
            shards,
        }
    }

    fn wanted(&self) {
        self.status.want_sessions(self.running.len() as u64);
    }

    /// Starts these sessions (those not running). All count as wanted before any starts, so
    /// the instance reads as connected only once every one is subscribed.
    pub fn start(&mut self, keys: &[SessionKey]) {
        let new: Vec<SessionKey> =
            keys.iter().copied().filter(|k| !self.running.contains_key(k)).collect();
        self.status.want_sessions((self.running.len() + new.len()) as u64);
        for key in new {
            self.start_one(key);
        }
    }

    fn start_one(&mut self, key: SessionKey) {
        self.generation += 1;
        let generation = self.generation;
        let t = &self.template;
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
        let forwards = (key == SessionKey::Legacy)
            .then(|| Arc::new(std::sync::Mutex::new(Forwards::default())));
        let gate = self.gate.clone();
        let shard = key.shard();
        let link = Link {
            key,
            generation,
            publishes: self.tx.clone(),
            status: self.status.clone(),
            policy: Reconnect::new(t.reconnect_ms.0, t.reconnect_ms.1),
            may_connect: Arc::new(move || gate.holds(shard)),
            shutdown: self.shutdown.clone(),
            forwards: forwards.clone(),
        };
        let session = tokio::spawn(session::run(eventloop, client.clone(), link));
        let acker = tokio::spawn(session::acker(client, ack_rx, out_rx, forwards));
        self.running.insert(key, Running { generation, acks, outbound, session, acker });
    }

    /// Stops a session at once: no more acks, no reconnect; the broker keeps what it did not
    /// get acknowledged.
    pub fn abort(&mut self, key: SessionKey) {
        if let Some(r) = self.running.remove(&key) {
            r.session.abort();
            r.acker.abort();
        }
        self.wanted();
    }

    /// Closes sessions gracefully: the acks queued go out, then DISCONNECT (the broker keeps
    /// the session for the next owner). Waits up to 5 s for each.
    pub async fn close(&mut self, keys: &[SessionKey]) {
        let mut closing = Vec::new();
        for key in keys {
            if let Some(r) = self.running.remove(key) {
                drop(r.acks);
                drop(r.outbound);
                closing.push((r.acker, r.session));
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
        let keys: Vec<SessionKey> = self.running.keys().copied().collect();
        self.close(&keys).await;
    }

    /// Whether a message came in on a session's current run (else its ack has nowhere to go,
    /// and it must not be handled: the broker sends it again to whoever holds the session).
    pub fn current(&self, t: &Tagged) -> bool {
        self.running.get(&t.key).is_some_and(|r| r.generation == t.generation)
    }

    /// Acknowledges a message through the session it came in on (dropped when that run has
    /// ended: the broker redelivers it, and the counter window drops it then).
    pub async fn ack(&self, t: Tagged) {
        if let Some(r) = self.running.get(&t.key).filter(|r| r.generation == t.generation)
            && r.acks.send(t.publish).is_err()
        {
            tracing::warn!("ack not sent: the session has ended");
        }
    }

    /// Sends a sealed downlink through the device's shard's `up` session.
    pub async fn downlink(&self, topic: String, frame: Vec<u8>) {
        let Ok((eui, _)) = parse_topic(&topic) else { return };
        let key = self.up_session(eui);
        match self.running.get(&key) {
            Some(r) => {
                let _ = r.outbound.send(Outbound::Downlink(topic, frame));
            }
            None => tracing::warn!(%eui, "downlink not sent: its shard is no longer held here"),
        }
    }

    /// Republishes a version 1 frame to its device's shard topic through the legacy session;
    /// the original is acknowledged once the broker has the copy.
    pub async fn forward(&self, t: Tagged, to: String) {
        if let Some(r) = self.running.get(&SessionKey::Legacy)
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
        self.running.keys().copied().collect()
    }
}
