//! The broker session: an MQTT 5 client (rumqttc `v5`) with a persistent session, manual acks,
//! a Maximum Packet Size and a Receive Maximum, and the reconnect policy.
//!
//! Why MQTT 5: an MQTT 3.1.1 client can only refuse a packet larger than its buffer by
//! dropping the connection, and with a persistent session the broker then redelivers the same
//! packet on every reconnect — one oversized publish on any device's topic stopped all
//! ingestion (a poison message). An MQTT 5 client announces its Maximum Packet Size in CONNECT
//! (MQTT 5 §3.1.2.11.4) and the broker must not send it anything larger: it drops such a
//! message for this client instead (Mosquitto counts it). So whatever reaches the session fits,
//! and is processed or rejected (`oversize` above the protocol's 484 bytes), counted and
//! acknowledged like any other frame. Receive Maximum (§3.1.2.11.3) is the in-flight window:
//! the broker holds back the rest, so what waits here is bounded by `mqtt.inflight`.
//!
//! [`Reconnect`] is the pure part: how long to wait after a lost connection, and whether the
//! same failure repeats. A connection that breaks soon after its CONNACK does not reset the
//! backoff (a broker that accepts the session and then drops it must not be hammered every
//! 200 ms); one that lasted [`STABLE_MS`] does.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use gridsense_protocol::topic::{Lane, UPLINK_FILTER, shard_filter};
use rumqttc::v5::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError,
    mqttbytes::{
        QoS,
        v5::{DisconnectReasonCode, Filter, Packet, Publish, SubscribeReasonCode},
    },
};
use tokio::sync::{mpsc, watch};

use crate::status::Status;

/// A connection that lasted this long counts as stable: the backoff starts again from the
/// shortest delay after it breaks.
pub const STABLE_MS: i64 = 10_000;

/// Why the broker connection ended, as counted in `gridsense_mqtt_disconnects_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DisconnectReason {
    /// Another client connected with our client id and the broker said so (MQTT 5 reason
    /// 0x8E). Mosquitto 2.0 does not say so: it only closes the connection
    /// ([`DisconnectReason::ClosedByBroker`]), and a takeover with clean start shows as the
    /// session missing at the next CONNACK ([`Status::session_lost`]). Client ids must be bound
    /// to accounts (`use_username_as_clientid`).
    SessionTakenOver,
    /// The broker closed the connection without a DISCONNECT (Mosquitto does so when another
    /// client connects with the same id, when it shuts down, or when it drops a client).
    ClosedByBroker,
    /// A packet larger than our Maximum Packet Size arrived anyway (a broker that ignores it).
    PacketTooLarge,
    /// The broker refused the connection (credentials, client id, server unavailable).
    Refused,
    /// The broker sent DISCONNECT with another reason.
    ServerDisconnect,
    /// No answer in time (CONNACK, PINGRESP).
    Timeout,
    /// The TLS handshake or certificate check failed.
    Tls,
    /// The connection failed or was reset (broker down, network).
    Io,
    /// Anything else the client reports (a protocol violation).
    Protocol,
}

impl DisconnectReason {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::SessionTakenOver => "session_taken_over",
            DisconnectReason::ClosedByBroker => "closed_by_broker",
            DisconnectReason::PacketTooLarge => "packet_too_large",
            DisconnectReason::Refused => "refused",
            DisconnectReason::ServerDisconnect => "server_disconnect",
            DisconnectReason::Timeout => "timeout",
            DisconnectReason::Tls => "tls",
            DisconnectReason::Io => "io",
            DisconnectReason::Protocol => "protocol",
        }
    }

    /// Classifies a connection error of the client.
    pub fn of(e: &ConnectionError) -> Self {
        match e {
            ConnectionError::MqttState(s) => match s {
                StateError::ServerDisconnect { reason_code, .. } => match reason_code {
                    DisconnectReasonCode::SessionTakenOver => DisconnectReason::SessionTakenOver,
                    DisconnectReasonCode::PacketTooLarge => DisconnectReason::PacketTooLarge,
                    DisconnectReasonCode::KeepAliveTimeout => DisconnectReason::Timeout,
                    _ => DisconnectReason::ServerDisconnect,
                },
                StateError::IncomingPacketTooLarge { .. } => DisconnectReason::PacketTooLarge,
                StateError::Deserialization(
                    rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { .. },
                ) => DisconnectReason::PacketTooLarge,
                StateError::AwaitPingResp => DisconnectReason::Timeout,
                StateError::ConnectionAborted => DisconnectReason::ClosedByBroker,
                StateError::Io(_) => DisconnectReason::Io,
                StateError::ConnFail { .. } => DisconnectReason::Refused,
                _ => DisconnectReason::Protocol,
            },
            ConnectionError::Timeout(_) => DisconnectReason::Timeout,
            ConnectionError::Tls(_) => DisconnectReason::Tls,
            ConnectionError::Io(_) => DisconnectReason::Io,
            ConnectionError::ConnectionRefused(_) => DisconnectReason::Refused,
            _ => DisconnectReason::Protocol,
        }
    }
}

/// The reconnect policy (pure: time passed in).
#[derive(Debug, Clone)]
pub struct Reconnect {
    min_ms: u64,
    max_ms: u64,
    delay_ms: u64,
    connected_at: Option<i64>,
    last: Option<DisconnectReason>,
    repeats: u32,
}

/// What to do after a lost connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Wait this long before connecting again.
    pub delay_ms: u64,
    /// How many losses in a row had this reason (1: the first).
    pub repeats: u32,
}

impl Reconnect {
    /// Delays from `min_ms`, doubling up to `max_ms`.
    pub fn new(min_ms: u64, max_ms: u64) -> Self {
        Reconnect { min_ms, max_ms, delay_ms: min_ms, connected_at: None, last: None, repeats: 0 }
    }

    /// The broker accepted the connection (CONNACK) at `now_ms`.
    pub fn connected(&mut self, now_ms: i64) {
        self.connected_at = Some(now_ms);
    }

    /// The connection (or the attempt) failed at `now_ms` for `reason`.
    pub fn lost(&mut self, now_ms: i64, reason: DisconnectReason) -> Retry {
        let stable =
            self.connected_at.take().is_some_and(|at| now_ms.saturating_sub(at) >= STABLE_MS);
        if stable {
            self.delay_ms = self.min_ms;
            self.repeats = 0;
        }
        self.repeats = if self.last == Some(reason) { self.repeats.saturating_add(1) } else { 1 };
        self.last = Some(reason);
        let delay_ms = self.delay_ms;
        self.delay_ms = self.delay_ms.saturating_mul(2).min(self.max_ms);
        Retry { delay_ms, repeats: self.repeats }
    }
}

/// The session's options. `host` is what TLS verifies the certificate against.
pub struct SessionOptions {
    /// Client id (the session is persistent under it).
    pub client_id: String,
    /// Broker host (a name with TLS) and port.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS client configuration, for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Keep-alive, s.
    pub keep_alive_s: u64,
    /// Receive Maximum: the most unacknowledged QoS 1 messages the broker may send.
    pub inflight: u16,
    /// Maximum Packet Size announced to the broker, bytes.
    pub max_packet_bytes: u32,
    /// User name and password (none when the user name is empty).
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for SessionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No password in logs.
        f.debug_struct("SessionOptions")
            .field("client_id", &self.client_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Session expiry: the broker keeps the session (subscription, queued and unacknowledged
/// messages) while the gateway is away, however long (MQTT 5 §3.1.2.11.2: `0xFFFFFFFF` never
/// expires), as a 3.1.1 persistent session does.
const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// Publishes a session may have awaiting their PUBACK; the rest wait in the client's queue.
pub const OUTGOING_INFLIGHT: u16 = 1_024;

/// The rumqttc options for `o`.
pub fn mqtt_options(o: &SessionOptions) -> MqttOptions {
    let mut options = MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
    if let Some(client) = &o.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(client.clone()),
        ));
    }
    options.set_keep_alive(Duration::from_secs(o.keep_alive_s.max(5)));
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(SESSION_NEVER_EXPIRES));
    options.set_manual_acks(true);
    options.set_receive_maximum(Some(o.inflight));
    // What this session publishes (downlinks, forwarded version 1 frames) in flight at once.
    // rumqttc allocates a slot per possible packet id up front: unbounded, 65,536 of them
    // (≈13 MiB a session, 1.7 GiB for an instance's 129 sessions).
    options.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    // Announced in CONNECT and also the client's own read limit.
    options.set_max_packet_size(Some(o.max_packet_bytes));
    if let Some((user, password)) = &o.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    options
}

/// Wall-clock Unix ms (the reconnect policy and the takeover time; never the pipeline's clock,
/// which may be simulated).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which of an instance's broker sessions a message came from: one per owned shard and lane,
/// and the `legacy` one (version 1's topic) at the owner of shard 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SessionKey {
    /// A shard's lane.
    Shard(u8, Lane),
    /// Version 1's `gridsense/{eui}/up`.
    Legacy,
}

impl SessionKey {
    /// The shard whose lease the session goes with (legacy: shard 0's).
    pub fn shard(self) -> u16 {
        match self {
            SessionKey::Shard(s, _) => u16::from(s),
            SessionKey::Legacy => 0,
        }
    }

    /// What it subscribes to.
    pub fn filter(self) -> String {
        match self {
            SessionKey::Shard(s, lane) => shard_filter(s, lane).as_str().to_owned(),
            SessionKey::Legacy => UPLINK_FILTER.to_owned(),
        }
    }

    /// Its client id (and account) from the gateway's: `BASE-SS-up`, `BASE-SS-urgent`,
    /// `BASE-legacy`.
    pub fn name(self, base: &str) -> String {
        match self {
            SessionKey::Shard(s, lane) => crate::config::shard_session_user(base, s, lane),
            SessionKey::Legacy => format!("{base}-legacy"),
        }
    }
}

/// A message and the session (and the session's run, `generation`) it came in on: its ack
/// goes back through that session, and only while that run lasts.
#[derive(Debug)]
pub struct Tagged {
    /// The broker it came through (an index into `mqtt.urls`).
    pub broker: u8,
    /// The session.
    pub key: SessionKey,
    /// Which run of the session (a session started again is a new run).
    pub generation: u64,
    /// The message.
    pub publish: Publish,
}

/// What one session needs besides its event loop and client.
pub struct Link {
    /// The broker (an index into `mqtt.urls`).
    pub broker: u8,
    /// The session and its run.
    pub key: SessionKey,
    /// Its run.
    pub generation: u64,
    /// Where its messages go (shared by every session of the instance).
    pub publishes: mpsc::Sender<Tagged>,
    /// Live counters.
    pub status: Arc<Status>,
    /// The reconnect policy.
    pub policy: Reconnect,
    /// Whether the session may connect now: its shard's lease is known to be held. A session
    /// whose lease may have lapsed (the process was paused) never connects again on its own —
    /// a client-id takeover would throw out the shard's new owner.
    pub may_connect: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Turns true when the gateway stops.
    pub shutdown: watch::Receiver<bool>,
    /// For the legacy session: frames it republished to their shard's topic, waiting for the
    /// broker's PUBACK before the original is acknowledged.
    pub forwards: Option<Arc<std::sync::Mutex<Forwards>>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("key", &self.key)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Frames republished by the legacy session to their shard's topic, by the order their
/// PUBLISH was queued and then by packet id, until the broker acknowledges them: then the
/// original is acknowledged (so a frame is never lost between the two sessions).
#[derive(Debug, Default)]
pub struct Forwards {
    queued: std::collections::VecDeque<Publish>,
    sent: std::collections::HashMap<u16, Publish>,
}

impl Forwards {
    /// A republish is about to be queued on the client; `original` is acknowledged once the
    /// broker has it.
    pub fn queue(&mut self, original: Publish) {
        self.queued.push_back(original);
    }
}

/// Drives the event loop. `EventLoop::poll` is never raced against anything else: a poll
/// dropped while it writes an outgoing packet (the socket's buffer full, the broker busy) drops
/// that packet, and a lost PUBACK holds one of the broker's in-flight slots for this session
/// until it reconnects — enough of them and the broker stops sending altogether (seen at
/// 50,000 frames/s offered, before this was a separate task). Nor does it stop polling for
/// longer than half the keep-alive: a session that stops reading misses its keep-alive, and
/// the broker then drops it and redelivers everything unacknowledged (seen when a full disk
/// held commits for a minute). When the pipeline's channel is full, messages wait in
/// `overflow` while the task waits for room (then one poll, for the ping and the acks queued
/// meanwhile), so `overflow` holds at most what the polls made while the channel was full
/// read: rumqttc reads up to 9 packets at a time (`gridsense_queue_overflowed`). The Receive
/// Maximum alone does not bound it: Mosquitto 2.0.11 (Debian 12's) keeps to it only until acks
/// flow — a probe announcing 16 and acking in groups of 8 had 4,680 outstanding (Mosquitto
/// issue #2301) — so the bound is the gateway's own: this wait, and the pipeline's channel.
pub async fn run(mut eventloop: EventLoop, client: AsyncClient, link: Link) {
    let Link {
        broker,
        key,
        generation,
        publishes,
        status,
        mut policy,
        may_connect,
        shutdown,
        forwards,
    } = link;
    let filters = vec![key.filter()];
    let keep_alive = eventloop.options.keep_alive();
    let mut overflow: std::collections::VecDeque<Publish> = std::collections::VecDeque::new();
    // What of `overflow` is counted in `status.overflowed`.
    let mut counted = 0u64;
    // Connected (CONNACK seen, no error since), ever connected; subscribed (SUBACK granted,
    // counted in the status while it lasts, however the task ends).
    let (mut connected, mut ever) = (false, false);
    let mut up = Up { status: status.clone(), broker, up: false };
    loop {
        while let Some(publish) = overflow.pop_front() {
            match publishes.try_send(Tagged { broker, key, generation, publish }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(t)) => {
                    overflow.push_front(t.publish);
                    break;
                }
                // The pipeline has ended: nothing more is handled or acknowledged.
                Err(mpsc::error::TrySendError::Closed(_)) => overflow.clear(),
            }
        }
        let now_len = overflow.len() as u64;
        if now_len != counted {
            if now_len > counted {
                status.overflowed.fetch_add(now_len - counted, Relaxed);
            } else {
                status.overflowed.fetch_sub(counted - now_len, Relaxed);
            }
            counted = now_len;
        }
        // The pipeline's channel is full and messages wait here: wait for room before reading
        // more (the broker keeps the rest), instead of polling — a poll would wait for this
        // session's next packet, and with every message it may send waiting here, none comes
        // until the keep-alive ping (seen: 100,000 messages parked, ingest stalled, with 129
        // sessions under 30,000 frames/s offered). At most half the keep-alive, then one poll:
        // the keep-alive, and acks queued meanwhile, are served even while the pipeline is
        // held for long (a full disk).
        if !overflow.is_empty() {
            match tokio::time::timeout(keep_alive / 2, publishes.reserve()).await {
                Ok(Ok(permit)) => {
                    if let Some(publish) = overflow.pop_front() {
                        permit.send(Tagged { broker, key, generation, publish });
                    }
                    continue;
                }
                // The pipeline has ended.
                Ok(Err(_)) => {
                    overflow.clear();
                    continue;
                }
                Err(_) => {}
            }
        }
        // Before (re)connecting: only while the shard's lease is held.
        while !connected && !may_connect() {
            if *shutdown.borrow() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let now = wall_ms();
                policy.connected(now);
                connected = true;
                status.connects.fetch_add(1, Relaxed);
                if ever && !ack.session_present {
                    // The broker kept no session for this id between two connections of ours:
                    // another client connected with it and a clean start (Mosquitto closes
                    // ours and discards the session), or the broker lost its state.
                    status.session_lost(now);
                    tracing::error!(
                        session = key.name(""),
                        "the broker had no session for this gateway session's client id on reconnecting: another client took the id with a clean start, or the broker lost its state — messages queued for it meanwhile are gone; bind client ids to accounts (use_username_as_clientid)"
                    );
                }
                ever = true;
                // Subscribe on every CONNACK.
                let wanted = filters.iter().map(|f| Filter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(wanted) {
                    tracing::error!("subscribe request not queued: {e}");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted =
                    ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                up.set(granted);
                if !granted {
                    tracing::error!(codes = ?ack.return_codes, ?filters, "broker refused a subscription");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                status.mqtt_received.fetch_add(1, Relaxed);
                status.unacked.fetch_add(1, Relaxed);
                overflow.push_back(publish);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::PubAck(_))) => {
                status.mqtt_acked.fetch_add(1, Relaxed);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                // A republished legacy frame went out (or out again after a reconnect).
                if let Some(f) = &forwards
                    && let Ok(mut f) = f.lock()
                    && !f.sent.contains_key(&pkid)
                    && let Some(original) = f.queued.pop_front()
                {
                    f.sent.insert(pkid, original);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let original =
                    forwards.as_ref().and_then(|f| f.lock().ok()?.sent.remove(&ack.pkid));
                if let Some(original) = original {
                    status.unacked.fetch_sub(1, Relaxed);
                    status.frames_forwarded.fetch_add(1, Relaxed);
                    // Never awaited here (PITFALLS.md); if the queue is full the broker sends
                    // it again after a reconnect, and the shard's owner drops the duplicate.
                    if let Err(e) = client.try_ack(&original) {
                        tracing::warn!("forwarded frame's ack not queued: {e}");
                    }
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                connected = false;
                up.set(false);
                if *shutdown.borrow() {
                    return;
                }
                // What waited here was not acknowledged: the broker sends it again.
                status.unacked.fetch_sub(overflow.len() as u64, Relaxed);
                overflow.clear();
                let now = wall_ms();
                let reason = DisconnectReason::of(&e);
                let retry = policy.lost(now, reason);
                let taken_over = reason == DisconnectReason::SessionTakenOver;
                status.disconnected(reason.as_str(), taken_over, &e.to_string(), now);
                let session = key.name("");
                if reason == DisconnectReason::SessionTakenOver {
                    tracing::error!(
                        session,
                        repeats = retry.repeats,
                        "broker session taken over: another client connected with this session's client id ({e}); bind client ids to accounts (use_username_as_clientid) — retrying in {} ms",
                        retry.delay_ms
                    );
                } else if retry.repeats > 1 {
                    tracing::warn!(
                        session,
                        reason = reason.as_str(),
                        repeats = retry.repeats,
                        "broker connection lost again, {} times in a row: {e}; retrying in {} ms",
                        retry.repeats,
                        retry.delay_ms
                    );
                } else {
                    tracing::warn!(
                        session,
                        reason = reason.as_str(),
                        "broker connection: {e}; retrying in {} ms",
                        retry.delay_ms
                    );
                }
                tokio::time::sleep(Duration::from_millis(retry.delay_ms)).await;
            }
        }
    }
}

/// A session's subscription counted as up in the status while it lasts (and no longer once
/// the session's task ends, aborted included).
struct Up {
    status: Arc<Status>,
    broker: u8,
    up: bool,
}

impl Up {
    fn set(&mut self, up: bool) {
        if up != self.up {
            self.status.session_up(self.broker, up);
            self.up = up;
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// A sealed downlink to a device: topic, frame, QoS.
pub type Downlink = (String, Vec<u8>, QoS);

/// What a session's client sends besides acks and downlinks.
#[derive(Debug)]
pub enum Outbound {
    /// A version 1 frame republished to its shard's topic (legacy session only); the original
    /// is acknowledged once the broker has the copy.
    Forward(String, Publish),
}

/// Hands acknowledgements (in order), downlinks and forwarded frames to the client, waiting
/// for room in its request queue (the session task keeps draining it); when the pipeline has
/// ended (or the session is handed over) and every ack is queued, asks for a DISCONNECT. The
/// session task itself never awaits the client, so the two cannot deadlock (PITFALLS.md).
pub async fn acker(
    client: AsyncClient,
    mut acks: mpsc::UnboundedReceiver<Publish>,
    (mut downlinks, mut outbound): (mpsc::Receiver<Downlink>, mpsc::UnboundedReceiver<Outbound>),
    forwards: Option<Arc<std::sync::Mutex<Forwards>>>,
) {
    let (mut outbound_open, mut downlinks_open) = (true, true);
    loop {
        tokio::select! {
            biased;
            ack = acks.recv() => match ack {
                Some(publish) => {
                    if let Err(e) = client.ack(&publish).await {
                        tracing::warn!("ack not queued: {e}");
                    }
                }
                None => break,
            },
            d = downlinks.recv(), if downlinks_open => match d {
                Some((topic, frame, qos)) => {
                    if let Err(e) = client.publish(topic, qos, false, frame).await {
                        tracing::warn!("downlink not queued: {e}");
                    }
                }
                None => downlinks_open = false,
            },
            out = outbound.recv(), if outbound_open => match out {
                Some(Outbound::Forward(topic, original)) => {
                    let payload = original.payload.clone();
                    if let Some(f) = &forwards && let Ok(mut f) = f.lock() {
                        f.queue(original);
                    }
                    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, payload).await {
                        tracing::warn!("forwarded frame not queued: {e}");
                    }
                }
                None => outbound_open = false,
            },
        }
    }
    let _ = client.disconnect().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_dropped_right_after_its_connack_backs_off_instead_of_spinning() {
        let mut r = Reconnect::new(200, 30_000);
        let mut now = 0;
        let mut delays = Vec::new();
        // A poison message: connected, then dropped 50 ms later, over and over.
        for _ in 0..10 {
            r.connected(now);
            now += 50;
            let retry = r.lost(now, DisconnectReason::PacketTooLarge);
            delays.push(retry.delay_ms);
            now += i64::try_from(retry.delay_ms).unwrap_or(0);
        }
        assert_eq!(delays, [200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000]);
        assert_eq!(r.lost(now, DisconnectReason::PacketTooLarge).repeats, 11);
    }

    #[test]
    fn a_stable_connection_resets_the_backoff_and_the_repeat_count() {
        let mut r = Reconnect::new(200, 30_000);
        for t in 0..4 {
            r.lost(t, DisconnectReason::Io);
        }
        r.connected(10);
        let retry = r.lost(10 + STABLE_MS, DisconnectReason::Io);
        assert_eq!(retry, Retry { delay_ms: 200, repeats: 1 });
        // A different reason starts its own count, the delay keeps growing.
        let retry = r.lost(20 + STABLE_MS, DisconnectReason::Refused);
        assert_eq!(retry, Retry { delay_ms: 400, repeats: 1 });
    }

    #[test]
    fn errors_are_classified_by_reason() {
        let taken = ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            reason_string: None,
        });
        assert_eq!(DisconnectReason::of(&taken), DisconnectReason::SessionTakenOver);
        let large = ConnectionError::MqttState(StateError::IncomingPacketTooLarge {
            pkt_size: 100_000,
            max: 65_536,
        });
        assert_eq!(DisconnectReason::of(&large).as_str(), "packet_too_large");
        let io = ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(DisconnectReason::of(&io), DisconnectReason::Io);
    }
}
