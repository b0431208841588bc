//! The device's MQTT session: the thin async shell around [`Device`], over any transport that
//! implements `embedded_io_async::{Read, Write}` (embassy-net's `TcpSocket` on a board, a tokio
//! stream or a simulated radio link on the host).
//!
//! MQTT 5 through `rust-mqtt` (no_std, no allocation): a persistent session (clean start off,
//! session expiry set) so downlinks queued while the device is away are delivered when it comes
//! back; the downlink subscription is made and its SUBACK checked on every connection; frames
//! go out with QoS 1, one at a time, and leave the device only on their PUBACK; after a lost
//! connection the frame in flight is resent byte-identical; reconnects back off exponentially
//! with jitter. Clocks, sockets and randomness come from a [`Platform`]; sensors and buttons from
//! a [`Board`].

use core::{fmt::Write as _, num::NonZero};

use embassy_futures::select::{Either3, select3};
use gridsense_protocol::{DeviceTime, Direction, MAX_DOWNLINK_FRAME_LEN, topic::topic};
use heapless::String;
use rust_mqtt::{
    Bytes,
    buffer::BumpBuffer,
    client::{
        Client,
        event::Event,
        options::{ConnectOptions, PublicationOptions, SubscriptionOptions, TopicReference},
    },
    config::{KeepAlive, SessionExpiryInterval},
    types::{MqttBinary, MqttString, TopicFilter, TopicName},
};

use crate::{Device, Health, Instant, backoff::Backoff, counter::CounterStore, sensing::Sensing};

/// What the session needs from the machine it runs on.
pub trait Platform {
    /// A connected, ordered byte stream to the broker.
    type Transport: embedded_io_async::Read + embedded_io_async::Write;
    /// Why a connection could not be opened.
    type ConnectError: core::fmt::Debug;
    /// The device's monotonic clock.
    fn now(&self) -> Instant;
    /// Waits until the device clock reads `at` (returns at once if it already does).
    fn sleep_until(&mut self, at: Instant) -> impl Future<Output = ()>;
    /// Opens a new connection to the broker.
    fn connect(&mut self) -> impl Future<Output = Result<Self::Transport, Self::ConnectError>>;
    /// A uniformly random number, for backoff jitter.
    fn random(&mut self) -> u32;
}

/// What woke the device other than its own timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake<I> {
    /// An interrupt or a user action with its input.
    Input(I),
    /// Stop the session (simulator only: a real device runs until its battery dies).
    Shutdown,
}

/// The device's sensors and buttons.
pub trait Board<S: Sensing> {
    /// Reads the sensors (called when the policy wants a sample).
    fn read(&mut self, now: Instant) -> S::Input;
    /// Reads battery, signal and temperature.
    fn health(&mut self, now: Instant) -> Health;
    /// Waits for an interrupt or a user action. Must be cancel-safe: it is raced against the
    /// network and the timers, and dropped when they win.
    fn wait(&mut self) -> impl Future<Output = Wake<S::Input>>;
    /// A frame was handed to the broker (for a send LED, or the simulator's counts).
    fn sent(&mut self, frame: &[u8]) {
        let _ = frame;
    }
    /// The wall-clock time to set from a gateway's time sync received at `now` (default: the
    /// gateway's time as it came). A board whose device clock runs on another timeline maps
    /// it there (the simulator at a speed other than 1 against a gateway on the wall clock).
    fn map_time_sync(&mut self, now: Instant, gateway: DeviceTime) -> DeviceTime {
        let _ = now;
        gateway
    }
}

/// Session settings. Durations are in device-clock milliseconds except `keep_alive_s`, which
/// the broker measures in its own seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Keep-alive announced in CONNECT, broker seconds.
    pub keep_alive_s: u16,
    /// Send a PINGREQ after this much silence (device ms); below the keep-alive.
    pub ping_after_ms: u64,
    /// How long the broker keeps the session (and queued downlinks) after a disconnect, s.
    pub session_expiry_s: u32,
    /// First reconnect delay, device ms.
    pub backoff_base_ms: u32,
    /// Longest reconnect delay, device ms.
    pub backoff_max_ms: u32,
    /// Longest wait for CONNACK, SUBACK or a PUBACK before the connection is dropped, device ms.
    pub response_timeout_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            keep_alive_s: 120,
            ping_after_ms: 60_000,
            session_expiry_s: 7 * 86_400,
            backoff_base_ms: 1_000,
            backoff_max_ms: 300_000,
            response_timeout_ms: 30_000,
        }
    }
}

/// The device's MQTT account: client id and user name are its EUI.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// Password (from provisioning).
    pub password: &'a str,
}

/// What the session did, for the board's diagnostics and the simulator's summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionStats {
    /// Connections established (CONNACK and SUBACK received).
    pub connects: u32,
    /// Connection attempts that failed or connections that broke.
    pub failures: u32,
    /// Frames published (first sends and resends).
    pub publishes: u32,
    /// Publications the broker refused with an error reason code.
    pub refused: u32,
    /// Downlink payloads received.
    pub downlinks: u32,
}

/// Why one connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Shutdown,
    Broken,
}

/// Client type with the limits a device needs: one subscription, one QoS1 message each way.
type DeviceClient<'c, N> = Client<'c, 'c, N, BumpBuffer<'c>, 1, 1, 1, 0, 0, 0, 0>;

/// Room for one incoming PUBLISH (topic, properties and the largest downlink frame).
const RX_BUFFER: usize = MAX_DOWNLINK_FRAME_LEN + 128;

/// Runs the device until the board says [`Wake::Shutdown`]: connects, serves, reconnects with
/// backoff. The device keeps sampling and queueing while disconnected.
pub async fn run<P, S, C, B, const U: usize, const T: usize>(
    platform: &mut P,
    device: &mut Device<S, C, U, T>,
    board: &mut B,
    credentials: Credentials<'_>,
    config: SessionConfig,
) -> SessionStats
where
    P: Platform,
    S: Sensing,
    C: CounterStore,
    B: Board<S>,
{
    let mut stats = SessionStats::default();
    let mut backoff = Backoff::new(config.backoff_base_ms, config.backoff_max_ms);
    let eui = device.eui();
    let mut client_id: String<16> = String::new();
    let _ = write!(client_id, "{eui}");
    let down = topic(eui, Direction::Downlink);
    loop {
        let ended = match platform.connect().await {
            Ok(transport) => {
                let mut rx = [0u8; RX_BUFFER];
                let mut buffer = BumpBuffer::new(&mut rx);
                let mut client: DeviceClient<'_, P::Transport> = Client::new(&mut buffer);
                let names = Names { client_id: &client_id, down: &down };
                let ended = serve(
                    platform,
                    device,
                    board,
                    &mut client,
                    transport,
                    names,
                    credentials,
                    config,
                    &mut stats,
                    &mut backoff,
                )
                .await;
                // A fresh client per connection: dropping it closes the transport, whatever
                // state the MQTT exchange was left in (our own reliability is the frame in flight).
                drop(client);
                ended
            }
            Err(_) => Ended::Broken,
        };
        if ended == Ended::Shutdown {
            return stats;
        }
        stats.failures = stats.failures.saturating_add(1);
        let resume = platform.now().add_millis(u64::from(backoff.next_delay_ms(platform.random())));
        // Keep sensing while waiting to reconnect.
        if wait_offline(platform, device, board, resume).await == Ended::Shutdown {
            return stats;
        }
    }
}

#[derive(Clone, Copy)]
struct Names<'a> {
    client_id: &'a str,
    down: &'a str,
}

/// Runs the device's sensing and timers until `resume`, with no connection.
async fn wait_offline<P, S, C, B, const U: usize, const T: usize>(
    platform: &mut P,
    device: &mut Device<S, C, U, T>,
    board: &mut B,
    resume: Instant,
) -> Ended
where
    P: Platform,
    S: Sensing,
    C: CounterStore,
    B: Board<S>,
{
    loop {
        let now = platform.now();
        tick(device, board, now);
        if now >= resume {
            return Ended::Broken;
        }
        let wake_at = device.poll_timeout().min(resume);
        match embassy_futures::select::select(platform.sleep_until(wake_at), board.wait()).await {
            embassy_futures::select::Either::First(()) => {}
            embassy_futures::select::Either::Second(Wake::Input(input)) => {
                device.handle_input(platform.now(), input);
            }
            embassy_futures::select::Either::Second(Wake::Shutdown) => return Ended::Shutdown,
        }
    }
}

/// Samples if due and runs heartbeats.
fn tick<S, C, B, const U: usize, const T: usize>(
    device: &mut Device<S, C, U, T>,
    board: &mut B,
    now: Instant,
) where
    S: Sensing,
    C: CounterStore,
    B: Board<S>,
{
    if device.sample_due(now) {
        let input = board.read(now);
        device.handle_input(now, input);
        let health = board.health(now);
        device.handle_health(now, health);
    }
    device.handle_timeout(now);
}

#[allow(clippy::too_many_arguments)]
async fn serve<'c, P, S, C, B, const U: usize, const T: usize>(
    platform: &mut P,
    device: &mut Device<S, C, U, T>,
    board: &mut B,
    client: &mut DeviceClient<'c, P::Transport>,
    transport: P::Transport,
    names: Names<'_>,
    credentials: Credentials<'_>,
    config: SessionConfig,
    stats: &mut SessionStats,
    backoff: &mut Backoff,
) -> Ended
where
    P: Platform,
    S: Sensing,
    C: CounterStore,
    B: Board<S>,
{
    let Some(keep_alive) = NonZero::new(config.keep_alive_s) else { return Ended::Broken };
    let Some(expiry) = NonZero::new(config.session_expiry_s) else { return Ended::Broken };
    let (Ok(user), Ok(password), Ok(id)) = (
        MqttString::try_from(names.client_id),
        MqttBinary::try_from(credentials.password.as_bytes()),
        MqttString::try_from(names.client_id),
    ) else {
        return Ended::Broken;
    };
    let options = ConnectOptions::new()
        .session_expiry_interval(SessionExpiryInterval::Seconds(expiry))
        .keep_alive(KeepAlive::Seconds(keep_alive))
        .user_name(user)
        .password(password);
    let deadline = platform.now().add_millis(config.response_timeout_ms);
    let connected = embassy_futures::select::select(
        client.connect(transport, &options, Some(id)),
        platform.sleep_until(deadline),
    )
    .await;
    match connected {
        embassy_futures::select::Either::First(Ok(_)) => {}
        _ => return Ended::Broken,
    }

    // Subscribe to the downlink topic and wait for a granted SUBACK, on every connection.
    let Ok(down) = MqttString::try_from(names.down) else {
        return Ended::Broken;
    };
    let Some(filter) = TopicFilter::new(down) else {
        return Ended::Broken;
    };
    if client.subscribe(filter, &SubscriptionOptions::new().at_least_once()).await.is_err() {
        return Ended::Broken;
    }
    let mut last_tx = platform.now();
    let mut awaiting_since: Option<Instant> = Some(last_tx);
    let mut subscribed = false;
    let mut blocked_until = Instant::ZERO;

    loop {
        let now = platform.now();
        tick(device, board, now);
        if let Some(since) = awaiting_since
            && now.millis_since(since) >= config.response_timeout_ms
        {
            return Ended::Broken;
        }
        if subscribed && awaiting_since.is_none() && now >= blocked_until {
            // Each frame on its own topic: its lane, once the device knows the shards.
            match device.poll_transmit_on() {
                Ok(Some(crate::device::Transmit { topic: up, frame })) => {
                    let Some(name) =
                        MqttString::try_from(up.as_str()).ok().and_then(TopicName::new)
                    else {
                        return Ended::Broken;
                    };
                    let publication =
                        PublicationOptions::new(TopicReference::Name(name)).at_least_once();
                    if client.publish(&publication, Bytes::from(frame)).await.is_err() {
                        return Ended::Broken;
                    }
                    board.sent(frame);
                    stats.publishes = stats.publishes.saturating_add(1);
                    awaiting_since = Some(now);
                    last_tx = now;
                }
                Ok(None) => {}
                // Counter storage failed: keep the connection, try again in a second.
                Err(_) => blocked_until = now.add_millis(1_000),
            }
        }
        if now.millis_since(last_tx) >= config.ping_after_ms {
            if client.ping().await.is_err() {
                return Ended::Broken;
            }
            last_tx = now;
        }
        let mut wake_at = device.poll_timeout().min(last_tx.add_millis(config.ping_after_ms));
        if let Some(since) = awaiting_since {
            wake_at = wake_at.min(since.add_millis(config.response_timeout_ms));
        }
        if subscribed && awaiting_since.is_none() && now >= blocked_until && device.has_pending() {
            // More to send: go round again at once.
            wake_at = now;
        }
        let event =
            select3(platform.sleep_until(wake_at), client.poll_header(), board.wait()).await;
        let header = match event {
            Either3::First(()) => continue,
            Either3::Third(Wake::Input(input)) => {
                device.handle_input(platform.now(), input);
                continue;
            }
            Either3::Third(Wake::Shutdown) => {
                let _ = client.disconnect(&Default::default()).await;
                return Ended::Shutdown;
            }
            Either3::Second(Err(_)) => return Ended::Broken,
            Either3::Second(Ok(header)) => header,
        };
        let now = platform.now();
        match client.poll_body(header).await {
            Ok(Event::Suback(suback)) => {
                if !suback.reason_code.is_success() {
                    return Ended::Broken;
                }
                subscribed = true;
                awaiting_since = None;
                backoff.reset();
                stats.connects = stats.connects.saturating_add(1);
                // What the gateway has not confirmed yet goes again on this connection.
                device.reconnected();
            }
            Ok(Event::PublishAcknowledged(_)) => {
                device.handle_puback();
                awaiting_since = None;
            }
            Ok(Event::PublishRejected(_)) => {
                // The broker will not take it (e.g. ACL): resending cannot help.
                device.handle_puback();
                awaiting_since = None;
                stats.refused = stats.refused.saturating_add(1);
            }
            Ok(Event::Publish(publish)) => {
                stats.downlinks = stats.downlinks.saturating_add(1);
                if let Ok(gridsense_protocol::Downlink::TimeSync { now: gateway }) =
                    device.handle_downlink(now, &publish.message)
                {
                    let time = board.map_time_sync(now, gateway);
                    if time != gateway {
                        device.set_time(now, time);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return Ended::Broken,
        }
        // SAFETY: the event above, the only value borrowing the bump buffer's contents, has
        // been dropped, so no reference into the buffer is alive.
        #[allow(unsafe_code)]
        unsafe {
            client.buffer_mut().reset();
        }
    }
}
