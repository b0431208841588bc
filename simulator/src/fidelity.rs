//! Fidelity transport: a device's whole network path as on the board. The firmware's MQTT
//! session runs over an embassy-net (smoltcp) TCP socket in the device's own IP stack; IP
//! packets cross a simulated radio link with latency, jitter, loss and outages; on the far side
//! a second embassy-net stack (the "base station") terminates TCP and a user-space bridge copies
//! the bytes to the real broker on loopback.
//!
//! ```text
//! firmware ── TcpSocket ── device stack 10.0.0.2 ══ radio ══ base stack 10.0.0.1:1883 ── bridge ── TCP ── broker
//! ```
//!
//! The 10.0.0.0/24 addresses exist only inside this process; nothing is sent to them. Radio
//! timing is real time (embassy-time's std driver), device logic runs on simulated time.
//! embassy-time's generic timer queue holds 128 timers for the whole process: one per stack is
//! in use, so keep fidelity runs to a few dozen devices.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    net::SocketAddr,
    rc::Rc,
    task::{Context, Waker},
    time::Duration,
};

use embassy_net::{Ipv4Cidr, Stack, StackResources, StaticConfigV4, tcp::TcpSocket};
use embassy_net_driver::{Capabilities, Driver, HardwareAddress, LinkState, RxToken, TxToken};
use gridsense_firmware::{Instant, session::Platform};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream, time::Instant as RealInstant};

use crate::{clock::SimClock, link::Outages, rng::Rng};

/// Radio link quality.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RadioConfig {
    /// One-way latency, ms (NB-IoT: hundreds of ms).
    pub latency_ms: u64,
    /// Extra random latency up to this, ms.
    pub jitter_ms: u64,
    /// Probability that a packet is lost.
    pub loss: f64,
}

impl Default for RadioConfig {
    fn default() -> Self {
        RadioConfig { latency_ms: 60, jitter_ms: 40, loss: 0.01 }
    }
}

const MTU: usize = 1_280;
const DEVICE_IP: [u8; 4] = [10, 0, 0, 2];
const BASE_IP: [u8; 4] = [10, 0, 0, 1];
const MQTT_PORT: u16 = 1_883;
const SOCKET_BUFFER: usize = 2_048;

/// Packets in flight one way, each with its delivery time.
#[derive(Debug, Default)]
struct Air {
    packets: VecDeque<(RealInstant, Vec<u8>)>,
    waker: Option<Waker>,
    wake_at: Option<RealInstant>,
}

/// One end of the radio link.
#[derive(Debug)]
pub struct RadioEnd {
    rx: Rc<RefCell<Air>>,
    tx: Rc<RefCell<Air>>,
    config: RadioConfig,
    rng: Rng,
    clock: SimClock,
    outages: Outages,
}

/// A radio link: the device's end and the base station's end.
pub fn radio(
    config: RadioConfig,
    clock: SimClock,
    outages: Outages,
    seed: u64,
) -> (RadioEnd, RadioEnd) {
    let up = Rc::new(RefCell::new(Air::default()));
    let down = Rc::new(RefCell::new(Air::default()));
    let device = RadioEnd {
        rx: down.clone(),
        tx: up.clone(),
        config,
        rng: Rng::derive(seed, 1, 0),
        clock,
        outages: outages.clone(),
    };
    let base = RadioEnd { rx: up, tx: down, config, rng: Rng::derive(seed, 2, 0), clock, outages };
    (device, base)
}

impl RadioEnd {
    fn cut(&self) -> bool {
        self.outages.cut_now(&self.clock)
    }
}

/// A received packet.
#[derive(Debug)]
pub struct Rx(Vec<u8>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, f: F) -> R {
        f(&mut self.0)
    }
}

/// Room to send one packet.
#[derive(Debug)]
pub struct Tx<'a> {
    end: &'a mut RadioEnd,
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let r = f(&mut packet);
        let end = self.end;
        let lost = end.cut() || end.rng.chance(end.config.loss);
        if !lost {
            let delay = end.config.latency_ms + end.rng.below(end.config.jitter_ms + 1);
            let at = RealInstant::now() + Duration::from_millis(delay);
            let mut air = end.tx.borrow_mut();
            // Keep order: a packet never overtakes the one before it.
            let at = air.packets.back().map_or(at, |(last, _)| at.max(*last));
            air.packets.push_back((at, packet));
            if let Some(w) = air.waker.take() {
                w.wake();
            }
        }
        r
    }
}

impl Driver for RadioEnd {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, cx: &mut Context<'_>) -> Option<(Rx, Tx<'_>)> {
        let now = RealInstant::now();
        let packet = {
            let mut air = self.rx.borrow_mut();
            match air.packets.front() {
                Some((at, _)) if *at <= now => air.packets.pop_front().map(|(_, p)| p),
                Some((at, _)) => {
                    let at = *at;
                    air.waker = Some(cx.waker().clone());
                    // Wake the stack when the next packet lands, once per landing time.
                    if air.wake_at.is_none_or(|w| w > at || w <= now) {
                        air.wake_at = Some(at);
                        let waker = cx.waker().clone();
                        tokio::task::spawn_local(async move {
                            tokio::time::sleep_until(at).await;
                            waker.wake();
                        });
                    }
                    None
                }
                None => {
                    air.waker = Some(cx.waker().clone());
                    None
                }
            }
        }?;
        Some((Rx(packet), Tx { end: self }))
    }

    fn transmit(&mut self, _cx: &mut Context<'_>) -> Option<Tx<'_>> {
        Some(Tx { end: self })
    }

    fn link_state(&mut self, _cx: &mut Context<'_>) -> LinkState {
        LinkState::Up
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.max_transmission_unit = MTU;
        caps
    }

    fn hardware_address(&self) -> HardwareAddress {
        HardwareAddress::Ip
    }
}

fn leak_buffer() -> &'static mut [u8] {
    Box::leak(vec![0u8; SOCKET_BUFFER].into_boxed_slice())
}

/// Starts an IP stack on `end` with `address`; its runner runs on the current `LocalSet`.
/// The stack lives as long as the process (a board's stack is static too).
fn stack(
    end: RadioEnd,
    address: [u8; 4],
    seed: u64,
) -> (Stack<'static>, tokio::task::JoinHandle<()>) {
    let resources: &'static mut StackResources<2> = Box::leak(Box::new(StackResources::new()));
    let [a, b, c, d] = address;
    let config = embassy_net::Config::ipv4_static(StaticConfigV4 {
        address: Ipv4Cidr::new(core::net::Ipv4Addr::new(a, b, c, d), 24),
        gateway: None,
        dns_servers: heapless::Vec::new(),
    });
    let (stack, mut runner) = embassy_net::new(end, config, resources, seed);
    let task = tokio::task::spawn_local(async move { runner.run().await });
    (stack, task)
}

/// The base station: accepts the device's TCP connections and bridges each to the broker.
async fn base_station(stack: Stack<'static>, broker: SocketAddr) {
    let mut socket = TcpSocket::new(stack, leak_buffer(), leak_buffer());
    loop {
        // A device that vanished (outage) is noticed by keep-alive, so the base accepts again.
        dead_peer_detection(&mut socket);
        socket.abort();
        if socket.accept(MQTT_PORT).await.is_err() {
            continue;
        }
        let Ok(mut upstream) = TcpStream::connect(broker).await else {
            socket.abort();
            continue;
        };
        let _ = upstream.set_nodelay(true);
        let mut from_device = [0u8; 1_024];
        let mut from_broker = [0u8; 1_024];
        loop {
            tokio::select! {
                read = socket.read(&mut from_device) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if upstream.write_all(&from_device[..n]).await.is_err() { break; }
                    }
                },
                read = upstream.read(&mut from_broker) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if embedded_io_async::Write::write_all(&mut socket, &from_broker[..n]).await.is_err() { break; }
                        let _ = embedded_io_async::Write::flush(&mut socket).await;
                    }
                },
            }
        }
        socket.close();
        let _ = socket.flush().await;
    }
}

/// Keep-alive probes every 2 s and a 6 s timeout (real time), so a connection whose peer
/// vanished behind an outage is dropped instead of waiting forever.
fn dead_peer_detection(socket: &mut TcpSocket<'_>) {
    socket.set_keep_alive(Some(embassy_time::Duration::from_secs(2)));
    socket.set_timeout(Some(embassy_time::Duration::from_secs(6)));
}

/// A device platform whose network is its own embassy-net stack over the simulated radio.
pub struct FidelityPlatform {
    clock: SimClock,
    stack: Stack<'static>,
    socket: Rc<Cell<Option<TcpSocket<'static>>>>,
    outages: Outages,
    rng: Rng,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for FidelityPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FidelityPlatform").field("outages", &self.outages).finish_non_exhaustive()
    }
}

impl FidelityPlatform {
    /// Builds the device stack, the radio and the base station (with its bridge to `broker`)
    /// on the current `LocalSet`.
    pub fn start(
        clock: SimClock,
        broker: SocketAddr,
        outages: Outages,
        radio_config: RadioConfig,
        seed: u64,
    ) -> Self {
        let (device_end, base_end) = radio(radio_config, clock, outages.clone(), seed);
        let (device_stack, device_runner) = stack(device_end, DEVICE_IP, seed);
        let (base_stack, base_runner) = stack(base_end, BASE_IP, seed ^ 1);
        let bridge = tokio::task::spawn_local(base_station(base_stack, broker));
        let socket = TcpSocket::new(device_stack, leak_buffer(), leak_buffer());
        FidelityPlatform {
            clock,
            stack: device_stack,
            socket: Rc::new(Cell::new(Some(socket))),
            outages,
            rng: Rng::derive(seed, 3, 0),
            tasks: vec![device_runner, base_runner, bridge],
        }
    }
}

impl Drop for FidelityPlatform {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Why the radio path failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RadioError {
    /// The modem reports no network (simulated outage).
    #[error("no network")]
    NoNetwork,
    /// The TCP connection through the radio failed.
    #[error("tcp: {0:?}")]
    Tcp(embassy_net::tcp::Error),
    /// Connecting failed or timed out.
    #[error("connect failed")]
    Connect,
}

impl embedded_io_async::Error for RadioError {
    fn kind(&self) -> embedded_io_async::ErrorKind {
        match self {
            RadioError::NoNetwork => embedded_io_async::ErrorKind::NotConnected,
            RadioError::Tcp(_) | RadioError::Connect => {
                embedded_io_async::ErrorKind::ConnectionReset
            }
        }
    }
}

/// The device's TCP connection through its own stack. Dropping it hands the socket back to
/// the platform for the next connection.
pub struct RadioLink {
    socket: Option<TcpSocket<'static>>,
    slot: Rc<Cell<Option<TcpSocket<'static>>>>,
    clock: SimClock,
    outages: Outages,
}

impl std::fmt::Debug for RadioLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadioLink").finish_non_exhaustive()
    }
}

impl Drop for RadioLink {
    fn drop(&mut self) {
        if let Some(mut socket) = self.socket.take() {
            socket.abort();
            self.slot.set(Some(socket));
        }
    }
}

impl RadioLink {
    fn check(&mut self) -> Result<&mut TcpSocket<'static>, RadioError> {
        // The modem tells the MCU when it loses the network; the connection is gone.
        if self.outages.cut_now(&self.clock) {
            return Err(RadioError::NoNetwork);
        }
        self.socket.as_mut().ok_or(RadioError::Connect)
    }
}

impl embedded_io_async::ErrorType for RadioLink {
    type Error = RadioError;
}

impl embedded_io_async::Read for RadioLink {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, RadioError> {
        let (clock, outages) = (self.clock, self.outages.clone());
        let outage = outages.next_cut(&clock);
        let socket = self.check()?;
        tokio::select! {
            read = socket.read(buf) => match read {
                Ok(0) => Err(RadioError::Connect),
                Ok(n) => Ok(n),
                Err(e) => Err(RadioError::Tcp(e)),
            },
            () = outage => Err(RadioError::NoNetwork),
        }
    }
}

impl embedded_io_async::Write for RadioLink {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, RadioError> {
        let socket = self.check()?;
        socket.write(buf).await.map_err(RadioError::Tcp)
    }

    async fn flush(&mut self) -> Result<(), RadioError> {
        let socket = self.check()?;
        socket.flush().await.map_err(RadioError::Tcp)
    }
}

impl Platform for FidelityPlatform {
    type Transport = RadioLink;
    type ConnectError = RadioError;

    fn now(&self) -> Instant {
        self.clock.device_now()
    }

    async fn sleep_until(&mut self, at: Instant) {
        tokio::time::sleep_until(self.clock.real_at(at.as_millis())).await;
    }

    async fn connect(&mut self) -> Result<RadioLink, RadioError> {
        if self.outages.cut_now(&self.clock) {
            return Err(RadioError::NoNetwork);
        }
        let mut socket = match self.socket.take() {
            Some(s) => s,
            None => TcpSocket::new(self.stack, leak_buffer(), leak_buffer()),
        };
        socket.abort();
        dead_peer_detection(&mut socket);
        let [a, b, c, d] = BASE_IP;
        let remote = (core::net::Ipv4Addr::new(a, b, c, d), MQTT_PORT);
        let connected = tokio::time::timeout(Duration::from_secs(10), socket.connect(remote)).await;
        let link = RadioLink {
            socket: Some(socket),
            slot: self.socket.clone(),
            clock: self.clock,
            outages: self.outages.clone(),
        };
        match connected {
            Ok(Ok(())) => Ok(link),
            _ => Err(RadioError::Connect),
        }
    }

    fn random(&mut self) -> u32 {
        self.rng.next_u32()
    }
}
