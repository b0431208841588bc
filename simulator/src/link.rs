//! The per-device network path on the host: a TCP connection to the broker on loopback, seen by
//! the firmware as an `embedded_io_async` stream, and cut during the device's simulated
//! outages (reads and writes fail, new connections are refused until the outage ends).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use gridsense_firmware::{Instant, session::Platform};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream},
    net::TcpStream,
};

use crate::{clock::SimClock, physics::Window, rng::Rng};

/// Why the link failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The device is in a simulated outage.
    #[error("simulated outage")]
    Outage,
    /// The TCP connection failed or closed.
    #[error("connection: {0}")]
    Io(std::io::ErrorKind),
    /// Connecting took too long.
    #[error("connect timed out")]
    Timeout,
    /// The TLS handshake failed (the broker's certificate did not verify, or the broker does
    /// not speak TLS there).
    #[error("TLS handshake: {0}")]
    Tls(std::io::ErrorKind),
}

impl embedded_io_async::Error for LinkError {
    fn kind(&self) -> embedded_io_async::ErrorKind {
        match self {
            LinkError::Outage => embedded_io_async::ErrorKind::NotConnected,
            LinkError::Io(_) => embedded_io_async::ErrorKind::ConnectionReset,
            LinkError::Timeout => embedded_io_async::ErrorKind::TimedOut,
            LinkError::Tls(_) => embedded_io_async::ErrorKind::PermissionDenied,
        }
    }
}

/// A device's outage schedule, in simulated seconds.
#[derive(Debug, Clone, Default)]
pub struct Outages(pub Arc<[Window]>);

impl Outages {
    /// Whether the device is cut off at simulated second `t`.
    pub fn cut_at(&self, t: f64) -> bool {
        self.0.iter().any(|w| w.contains(t))
    }

    /// The next outage start after `t`.
    pub fn next_start_after(&self, t: f64) -> Option<f64> {
        self.0.iter().map(|w| w.start).filter(|s| *s > t).min_by(f64::total_cmp)
    }

    /// Whether the device is cut off now.
    pub fn cut_now(&self, clock: &SimClock) -> bool {
        self.cut_at(clock.sim_ms() as f64 / 1000.0)
    }

    /// Completes when the next outage begins (never, if none is scheduled): raced against a
    /// read, it breaks the connection the moment the device loses its network.
    pub async fn next_cut(&self, clock: &SimClock) {
        let now = clock.sim_ms() as f64 / 1000.0;
        match self.next_start_after(now) {
            Some(s) => tokio::time::sleep_until(clock.real_at((s * 1000.0) as u64)).await,
            None => std::future::pending().await,
        }
    }
}

/// One device's host platform: the simulated clock, a TCP link to the broker, randomness.
#[derive(Debug)]
pub struct SimPlatform {
    counters: Option<Arc<crate::stats::Counters>>,
    clock: SimClock,
    /// The broker connected to next; a failed attempt moves on to the next one.
    broker: SocketAddr,
    /// Every broker the device knows (the first is `broker` at boot).
    brokers: Arc<[SocketAddr]>,
    next: usize,
    tls: Option<crate::tls::Tls>,
    outages: Outages,
    rng: Rng,
}

impl SimPlatform {
    /// A platform for a device with the given outages.
    pub fn new(clock: SimClock, broker: SocketAddr, outages: Outages, rng: Rng) -> Self {
        SimPlatform {
            counters: None,
            clock,
            broker,
            brokers: Arc::from([broker]),
            next: 0,
            tls: None,
            outages,
            rng,
        }
    }

    /// Other brokers to fail over to, in turn, when a connection attempt fails.
    #[must_use]
    pub fn with_failover(mut self, others: &[SocketAddr]) -> Self {
        if !others.is_empty() {
            self.brokers = std::iter::once(self.broker).chain(others.iter().copied()).collect();
        }
        self
    }

    /// A connection attempt failed: the next one goes to the next broker.
    fn fail_over(&mut self) {
        if self.brokers.len() > 1 {
            self.next = (self.next + 1) % self.brokers.len();
            if let Some(b) = self.brokers.get(self.next) {
                self.broker = *b;
            }
        }
    }

    /// Connects over TLS, verifying the broker's certificate.
    #[must_use]
    pub fn with_tls(mut self, tls: Option<crate::tls::Tls>) -> Self {
        self.tls = tls;
        self
    }

    /// Counts connections opened in `counters`.
    #[must_use]
    pub fn counting(mut self, counters: Arc<crate::stats::Counters>) -> Self {
        self.counters = Some(counters);
        self
    }
}

impl Platform for SimPlatform {
    type Transport = Link;
    type ConnectError = LinkError;

    fn now(&self) -> Instant {
        self.clock.device_now()
    }

    async fn sleep_until(&mut self, at: Instant) {
        tokio::time::sleep_until(self.clock.real_at(at.as_millis())).await;
    }

    async fn connect(&mut self) -> Result<Link, LinkError> {
        if self.outages.cut_now(&self.clock) {
            return Err(LinkError::Outage);
        }
        let stream =
            match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(self.broker))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.fail_over();
                    return Err(LinkError::Io(e.kind()));
                }
                Err(_) => {
                    self.fail_over();
                    return Err(LinkError::Timeout);
                }
            };
        let _ = stream.set_nodelay(true);
        if let Some(c) = &self.counters {
            c.connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let stream: Box<dyn Io> = match &self.tls {
            None => Box::new(stream),
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let tls_stream = tokio::time::timeout(
                    Duration::from_secs(10),
                    connector.connect(tls.server_name.clone(), stream),
                )
                .await
                .map_err(|_| LinkError::Timeout)?
                .map_err(|e| LinkError::Tls(e.kind()))?;
                Box::new(tls_stream)
            }
        };
        // Small buffers: MQTT packets here are a few hundred bytes, and there are many devices.
        let stream = BufStream::with_capacity(1_024, 1_024, stream);
        Ok(Link { stream, clock: self.clock, outages: self.outages.clone() })
    }

    fn random(&mut self) -> u32 {
        self.rng.next_u32()
    }
}

/// A byte stream to the broker: plain TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug> Io for T {}

/// A TCP connection that breaks when the device's outage begins.
#[derive(Debug)]
pub struct Link {
    stream: BufStream<Box<dyn Io>>,
    clock: SimClock,
    outages: Outages,
}

impl embedded_io_async::ErrorType for Link {
    type Error = LinkError;
}

impl embedded_io_async::Read for Link {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        if self.outages.cut_now(&self.clock) {
            return Err(LinkError::Outage);
        }
        let outage = self.outages.next_cut(&self.clock);
        tokio::select! {
            read = self.stream.read(buf) => match read {
                Ok(0) => Err(LinkError::Io(std::io::ErrorKind::UnexpectedEof)),
                Ok(n) => Ok(n),
                Err(e) => Err(LinkError::Io(e.kind())),
            },
            () = outage => Err(LinkError::Outage),
        }
    }
}

impl embedded_io_async::Write for Link {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, LinkError> {
        if self.outages.cut_now(&self.clock) {
            return Err(LinkError::Outage);
        }
        self.stream.write(buf).await.map_err(|e| LinkError::Io(e.kind()))
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        self.stream.flush().await.map_err(|e| LinkError::Io(e.kind()))
    }
}
