//! Starting the gateway from a configuration: store, registry, broker (configured or
//! embedded), and the ingest tasks. Shared by `gridsense run` and `gridsense demo`.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    broker,
    config::{Config, Sink},
    health::HealthConfig,
    ingest::{self, Clock, IngestError, Status},
    pipeline::Pipeline,
    sink::{self, SinkError, SinkStatus},
    store::Store,
};

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Live counters.
    pub status: Arc<Status>,
    /// Where the gateway's own MQTT client connects.
    pub broker: SocketAddr,
    /// The embedded broker's device listener, when the embedded broker runs.
    pub device_listener: Option<SocketAddr>,
    /// The ingest task.
    pub task: JoinHandle<Result<(), IngestError>>,
    /// The external telemetry sink, when one is configured.
    pub sink: Option<RunningSink>,
    /// Where the HTTP API listens, when it does.
    pub http: Option<SocketAddr>,
}

/// The external telemetry sink's counters and task.
pub type RunningSink = (Arc<SinkStatus>, JoinHandle<Result<(), SinkError>>);

/// The wall clock in Unix ms.
pub fn wall_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// A simulator's clock as the gateway's (demo and tests): device times, health deadlines
/// and time syncs then agree with the simulated devices.
pub fn shared_clock(sim: gridsense_simulator::clock::SimClock) -> Clock {
    Arc::new(move || i64::try_from(sim.unix_ms(sim.sim_ms())).unwrap_or(i64::MAX))
}

/// Opens the store the configuration names.
pub fn open_store(config: &Config) -> Result<Store> {
    Store::open(&config.store.path, config.store.synchronous, config.store.audit_max)
        .with_context(|| format!("opening {}", config.store.path.display()))
}

/// Starts the gateway: the broker (embedded when `mqtt.url` is empty), then ingest.
pub fn start(config: &Config, clock: Clock, shutdown: watch::Receiver<bool>) -> Result<Gateway> {
    let mut store = open_store(config)?;
    let sink = if config.telemetry.sink == Sink::Influxdb {
        store.buffer_telemetry(config.telemetry.buffer_max_points);
        let status = Arc::new(SinkStatus::default());
        let task = tokio::spawn(sink::run(
            config.telemetry.clone(),
            open_store(config)?,
            status.clone(),
            shutdown.clone(),
        ));
        Some((status, task))
    } else {
        None
    };
    let registry = store.registry()?;
    let counters = store.counters()?;
    let health = store.health()?;
    let mut pipeline =
        Pipeline::new(registry, counters, health, HealthConfig::from_config(&config.health))
            .with_downlinks(config.downlink.policy(), store.downlink_counters()?, Vec::new());
    if !config.geo.grids.is_empty() {
        let codes =
            crate::geo::CodeLengths { grid: config.geo.grid_code_digits, ..Default::default() };
        let path = std::path::Path::new(&config.geo.grids);
        let layer = crate::geo::GridLayer::load(path, codes, config.geo.tolerance_m)
            .context("geo.grids")?;
        let grids = layer.cells().len();
        let unassigned = pipeline.with_grids(Arc::new(layer), &store.locations()?);
        if unassigned > 0 {
            tracing::warn!(unassigned, "devices outside every grid (beyond geo.tolerance_m)");
        }
        tracing::info!(grids, "grid layer loaded");
    }
    let (broker, device_listener) = if config.mqtt.url.is_empty() {
        let embedded =
            broker::start_embedded(config.broker.device_port, config.broker.client_port)?;
        (embedded.clients, Some(embedded.devices))
    } else {
        (broker::parse_url(&config.mqtt.url)?, None)
    };
    let status = Arc::new(Status::default());
    status
        .devices_registered
        .store(pipeline.registered() as u64, std::sync::atomic::Ordering::Relaxed);
    let http = if config.http.listen.is_empty() {
        None
    } else {
        let listener = std::net::TcpListener::bind(&config.http.listen)
            .with_context(|| format!("http.listen: cannot listen on {}", config.http.listen))?;
        Some(serve_http(
            listener,
            &status,
            sink.as_ref().map(|(s, _)| s.clone()),
            shutdown.clone(),
        )?)
    };
    let task = tokio::spawn({
        let (config, status) = (config.clone(), status.clone());
        async move { ingest::run(&config, broker, store, pipeline, clock, status, shutdown).await }
    });
    Ok(Gateway { status, broker, device_listener, task, sink, http })
}

/// Serves the HTTP API on an already bound listener until shutdown; returns its address.
pub fn serve_http(
    listener: std::net::TcpListener,
    status: &Arc<Status>,
    sink: Option<Arc<SinkStatus>>,
    shutdown: watch::Receiver<bool>,
) -> Result<SocketAddr> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let router = crate::http::router(status.clone(), sink);
    tokio::spawn(async move {
        if let Err(e) = crate::http::serve(listener, router, shutdown).await {
            tracing::error!("http server stopped: {e}");
        }
    });
    Ok(addr)
}
