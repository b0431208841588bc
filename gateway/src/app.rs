//! Starting the gateway from a configuration: store, registry, broker (configured or
//! embedded), and the ingest tasks. Shared by `gridsense run` and `gridsense demo`.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use tokio::{sync::watch, task::JoinHandle};

use crate::store::prelude::*;
use crate::{
    broker,
    config::{Config, Sink},
    delivery::influx::{self as sink, SinkError, SinkStatus},
    ingest::{self, IngestError},
    pipeline::Pipeline,
    status::{Clock, Status},
    store::Backend,
};

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Live counters.
    pub status: Arc<Status>,
    /// Where MQTT tools connect: the configured broker, or the embedded broker's MQTT 3.1.1
    /// listener for tools (the gateway's own session has a listener of its own there).
    pub broker: SocketAddr,
    /// The embedded broker's device listener, when the embedded broker runs.
    pub device_listener: Option<SocketAddr>,
    /// The ingest task.
    pub task: JoinHandle<Result<(), IngestError>>,
    /// The external telemetry sink, when one is configured.
    pub sink: Option<RunningSink>,
    /// Where the HTTP API listens, when it does.
    pub http: Option<SocketAddr>,
    /// The HTTP server's task.
    pub http_task: Option<JoinHandle<()>>,
    /// Delivery counters.
    pub delivery: Arc<crate::status::DeliveryStatus>,
    /// The delivery workers (cases, alerts, and the open311 status poller when configured).
    pub workers: Workers,
}

/// Delivery worker tasks.
pub type Workers = Vec<JoinHandle<Result<(), crate::store::StoreError>>>;

/// The external telemetry sink's counters and task.
pub type RunningSink = (Arc<SinkStatus>, JoinHandle<Result<(), SinkError>>);

pub use crate::status::wall_clock;

/// Opens the store the configuration names (PostgreSQL with `store.url`, else SQLite).
pub fn open_store(config: &Config) -> Result<Box<dyn Backend>> {
    Ok(crate::store::open(&config.store, None, false)
        .with_context(|| format!("opening {}", crate::store::target(&config.store)))?
        .0)
}

/// Starts the gateway: the broker (embedded when `mqtt.url` is empty), then ingest.
pub fn start(config: &Config, clock: Clock, shutdown: watch::Receiver<bool>) -> Result<Gateway> {
    let buffered = config.telemetry.sink == Sink::Influxdb;
    let (mut store, checkpointer) = crate::store::open(
        &config.store,
        buffered.then_some(config.telemetry.buffer_max_points),
        true,
    )
    .with_context(|| format!("opening {}", crate::store::target(&config.store)))?;
    let sink = if buffered {
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
    // Built once here: a CA file that cannot be used stops the start, instead of every
    // connection attempt.
    let brokers = config.mqtt.brokers();
    let tls = if brokers.first().is_some_and(|u| broker::is_tls(u)) {
        Some(
            gridsense_common::tls::client_config(std::path::Path::new(&config.mqtt.ca_file))
                .context("mqtt.ca_file")?,
        )
    } else {
        None
    };
    let registry = store.registry()?;
    // A store several instances share (PostgreSQL): each device's hot state is read when its
    // shard is claimed (after the claim, so after the previous owner's last commit), not here
    // as well. A store only this process writes (SQLite) is read once, here.
    let exclusive = store.exclusive();
    let counters = if exclusive { store.counters()? } else { Vec::new() };
    let downlink_counters = if exclusive { store.downlink_counters()? } else { Vec::new() };
    let mut pipeline = Pipeline::new(registry, counters, Vec::new(), config.health.policy())
        .with_downlinks(config.downlink.policy(), downlink_counters, Vec::new())
        .with_rate_limit(config.health.max_frames_per_minute)
        .with_shards(store.fix_shards(config.cluster.shards)?);
    // Row by row: a million rows' strings held at once would stay behind as heap holes.
    if exclusive {
        store.each_health(&mut |eui, h| pipeline.restore_health(eui, h))?;
    }
    let mut unassigned_devices = 0;
    let mut grids_view = None;
    if let Some(layer) = grid_layer(config)? {
        let path = std::path::Path::new(&config.geo.grids);
        let grids = layer.cells().len();
        let text = std::fs::read_to_string(path).context("geo.grids")?;
        grids_view = Some(crate::http::api::GridsView {
            geojson: Arc::new(serde_json::from_str(&text).context("geo.grids")?),
            areas: Arc::new(layer.cells().iter().map(crate::assessment::Area::of).collect()),
        });
        let locations = store.locations()?;
        let layer = Arc::new(layer);
        let placements = pipeline.with_grids(layer.clone(), &locations);
        let unassigned = locations.len() - placements.len();
        store.write_placements(&mut placements.iter().filter_map(|(eui, cell, distance)| {
            let c = layer.cells().get(*cell)?;
            Some((*eui, &*c.grid_code, &*c.community_code, &*c.street_code, *distance))
        }))?;
        unassigned_devices = unassigned as u64;
        if !config.geo.unit_grids.is_empty() {
            let path = std::path::Path::new(&config.geo.unit_grids);
            let units = crate::geo::GridLayer::load(
                path,
                crate::geo::CodeLengths::default(),
                config.geo.tolerance_m,
            )
            .context("geo.unit_grids")?;
            tracing::info!(cells = units.cells().len(), "unit-grid layer loaded");
            pipeline.with_unit_grids(Arc::new(units));
        }
        if unassigned > 0 {
            tracing::warn!(unassigned, "devices outside every grid (beyond geo.tolerance_m)");
        }
        tracing::info!(grids, "grid layer loaded");
    }
    let (pipeline, tables) = with_cases(config, &*store, pipeline)?;
    let (targets, device_listener, tool_listener) = if brokers.is_empty() {
        let embedded =
            broker::start_embedded(config.broker.device_port, config.broker.client_port)?;
        let (client_id, user, password) = embedded.gateway_login;
        let target = ingest::Target {
            addr: embedded.gateway,
            host: embedded.gateway.ip().to_string(),
            tls: None,
            client_id,
            credentials: Some((user, password)),
        };
        (vec![target], Some(embedded.devices), Some(embedded.clients))
    } else {
        let m = &config.mqtt;
        let mut targets = Vec::new();
        for url in &brokers {
            targets.push(ingest::Target {
                addr: broker::parse_url(url)?,
                host: gridsense_common::tls::url_host(url).to_owned(),
                tls: tls.clone(),
                client_id: m.client_id.clone(),
                credentials: (!m.username.is_empty())
                    .then(|| (m.username.clone(), m.password.clone())),
            });
        }
        (targets, None, None)
    };
    let first = targets.first().map(|t| t.addr).context("no broker")?;
    let broker = tool_listener.unwrap_or(first);
    let status = Arc::new(Status::default());
    status.devices_unassigned.store(unassigned_devices, std::sync::atomic::Ordering::Relaxed);
    status
        .devices_registered
        .store(pipeline.registered() as u64, std::sync::atomic::Ordering::Relaxed);
    let (delivery, workers) = start_delivery(config, &tables, &clock, &status, &shutdown)?;
    let (http, http_task) = if config.http.listen.is_empty() {
        (None, None)
    } else {
        let listener = std::net::TcpListener::bind(&config.http.listen)
            .with_context(|| format!("http.listen: cannot listen on {}", config.http.listen))?;
        let board = crate::http::board::Board::new(
            open_store(config)?,
            tables.clone(),
            clock.clone(),
            config.cases.secret.clone(),
        )
        .context("cases.tables")?
        .with_jurisdiction(config.http.jurisdiction_id.clone());
        let (addr, task) = serve_http(
            listener,
            &status,
            sink.as_ref().map(|(s, _)| s.clone()),
            Some((Arc::new(board), grids_view)),
            &config.http,
            shutdown.clone(),
        )?;
        (Some(addr), Some(task))
    };
    // The lease task's own connection: a long commit never delays a renewal.
    let leases: Box<dyn crate::store::Leases + Send> = open_store(config)?;
    let task = tokio::spawn({
        let (config, status) = (config.clone(), status.clone());
        async move {
            let result =
                ingest::run(&config, targets, store, leases, pipeline, clock, status, shutdown)
                    .await;
            drop(checkpointer);
            result
        }
    });
    Ok(Gateway { status, broker, device_listener, task, sink, http, http_task, delivery, workers })
}

/// The grid layer the configuration names (`geo.grids`), checked; none when unset.
pub fn grid_layer(config: &Config) -> Result<Option<crate::geo::GridLayer>> {
    if config.geo.grids.is_empty() {
        return Ok(None);
    }
    let codes = crate::geo::CodeLengths { grid: config.geo.grid_code_digits, ..Default::default() };
    let path = std::path::Path::new(&config.geo.grids);
    Ok(Some(crate::geo::GridLayer::load(path, codes, config.geo.tolerance_m).context("geo.grids")?))
}

/// The rules and case tables the configuration names (built in when empty).
pub fn case_policy(
    config: &Config,
) -> Result<(crate::rules::RulesConfig, crate::cases::CaseTables)> {
    let rules = if config.cases.rules.is_empty() {
        crate::rules::RulesConfig::built_in(config.health.low_battery_mv)
    } else {
        crate::rules::RulesConfig::load(std::path::Path::new(&config.cases.rules))
            .context("cases.rules")?
    };
    let tables = if config.cases.tables.is_empty() {
        crate::cases::CaseTables::default()
    } else {
        crate::cases::CaseTables::load(std::path::Path::new(&config.cases.tables))
            .context("cases.tables")?
    };
    Ok((rules, tables))
}

/// Adds rules and cases to the pipeline, restoring rule states and open incidents.
fn with_cases(
    config: &Config,
    store: &dyn Backend,
    pipeline: Pipeline,
) -> Result<(Pipeline, Arc<crate::cases::CaseTables>)> {
    let (rules, tables) = case_policy(config)?;
    let tables = Arc::new(tables);
    let link_ms =
        i64::try_from(config.cases.link_window_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut cases = crate::cases::Cases::new(tables.clone(), link_ms).context("cases.tables")?;
    cases.restore(store.sequences()?, store.open_incidents()?);
    let mut pipeline = pipeline.with_case_layer(crate::rules::Rules::new(&rules), cases);
    store.each_site(&mut |eui, site, attrs| pipeline.add_site(eui, site, attrs))?;
    pipeline.seal_sites();
    // Shared store: read per shard when it is claimed (see `start`). The open incidents are
    // read here either way: they also give the open clusters of incidents their ids.
    if store.exclusive() {
        store.each_rule_state(&mut |eui, rule, state| {
            pipeline.restore_rule_state(eui, rule, state);
        })?;
    }
    Ok((pipeline, tables))
}

/// Starts the delivery workers: cases to the platform adapter, SOS alerts to the alert
/// channel, and for open311 the status poller.
fn start_delivery(
    config: &Config,
    tables: &crate::cases::CaseTables,
    clock: &Clock,
    status: &Arc<Status>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(Arc<crate::status::DeliveryStatus>, Workers)> {
    let c = &config.cases;
    let adapter = crate::delivery::Adapter::from_config(c).context("cases: HTTP client")?;
    let worker = Arc::new(crate::delivery::Worker {
        adapter: adapter.clone(),
        gcj02: c.coordinates == "gcj02",
        retry_min_ms: c.retry_min_ms,
        retry_max_ms: c.retry_max_ms,
        alert_url: c.alert_url.clone(),
        alert_secret: c.secret.clone(),
        calendar: crate::calendar::Calendar::new(&tables.calendar).context("cases.tables")?,
        concurrency: c.concurrency,
    });
    let delivery = status.delivery.clone();
    let mut workers = Vec::new();
    for (channel, wake) in [("case", &status.outbox_wake[0]), ("alert", &status.outbox_wake[1])] {
        let first: Box<dyn Outbox> = open_store(config)?;
        let (worker, clock, wake, delivery, shutdown) =
            (worker.clone(), clock.clone(), wake.clone(), delivery.clone(), shutdown.clone());
        let path = config.clone();
        // A store failure (a full disk) ends one run of the worker, not delivery: it starts
        // again on a fresh connection a second later, and what is due is still in the outbox.
        workers.push(tokio::spawn(async move {
            let mut store = Some(first);
            loop {
                let s = match store.take() {
                    Some(s) => s,
                    None => match open_store(&path) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("{channel} delivery: {e:#}; retrying in 1 s");
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                let run = crate::delivery::run(
                    worker.clone(),
                    channel,
                    s,
                    clock.clone(),
                    wake.clone(),
                    delivery.clone(),
                    shutdown.clone(),
                );
                match run.await {
                    Ok(()) => return Ok(()),
                    Err(e) if *shutdown.borrow() => return Err(e),
                    Err(e) => {
                        tracing::warn!("{channel} delivery: {e}; restarting in 1 s");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        }));
    }
    if c.supervise_s > 0 {
        workers.push(tokio::spawn(supervise(
            config.clone(),
            Arc::new(tables.clone()),
            clock.clone(),
            status.clone(),
            std::time::Duration::from_secs(c.supervise_s),
            shutdown.clone(),
        )));
    }
    if let crate::delivery::Adapter::Open311(client) = adapter {
        workers.push(tokio::spawn(crate::delivery::watch_catalogue(
            client.clone(),
            std::time::Duration::from_secs(c.services_refresh_s),
            delivery.clone(),
            shutdown.clone(),
        )));
        workers.push(tokio::spawn(crate::delivery::poll_open311(
            client,
            open_store(config)?,
            clock.clone(),
            std::time::Duration::from_secs(c.poll_status_s.max(1)),
            shutdown.clone(),
        )));
    }
    Ok((delivery, workers))
}

/// Supervision (督办) every `every`: escalates what the tables' rules call for on its own
/// store connection (a blocking thread), announces each escalation on the event stream and
/// wakes the case delivery (the platform gets the new level). Several instances may run it:
/// an escalation is applied once (the store guards it), the others find nothing to do.
async fn supervise(
    config: Config,
    tables: Arc<crate::cases::CaseTables>,
    clock: Clock,
    status: Arc<Status>,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), crate::store::StoreError> {
    // The tables were checked when the gateway started.
    let calendar = crate::calendar::Calendar::new(&tables.calendar).unwrap_or_default();
    // One connection, kept between rounds; a failed round makes it again the next time.
    let mut kept: Option<Box<dyn Backend>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        let (config, tables, calendar, now) =
            (config.clone(), tables.clone(), calendar.clone(), clock());
        let store = kept.take();
        let round = tokio::task::spawn_blocking(move || {
            let mut store = match store {
                Some(s) => s,
                None => open_store(&config).map_err(|e| format!("{e:#}"))?,
            };
            let done = store.supervise(&tables, &calendar, now).map_err(|e| e.to_string())?;
            Ok::<_, String>((store, done))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let done = round.map(|(store, done)| {
            kept = Some(store);
            done
        });
        match done {
            Ok(done) if !done.is_empty() => {
                tracing::info!(escalated = done.len(), "supervision");
                status
                    .escalations
                    .fetch_add(done.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let notice = serde_json::json!({ "sent_ms": now, "escalations": done });
                let _ = status.events.0.send(notice.to_string());
                status.outbox_wake[0].notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("supervision: {e}; again in {} s", every.as_secs()),
        }
    }
}

/// Serves the HTTP API on an already bound listener until shutdown; returns its address and
/// its task.
pub fn serve_http(
    listener: std::net::TcpListener,
    status: &Arc<Status>,
    sink: Option<Arc<SinkStatus>>,
    board: Option<(Arc<crate::http::board::Board>, Option<crate::http::api::GridsView>)>,
    http: &crate::config::Http,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut router = crate::http::router(status.clone(), sink.clone());
    if let Some((board, grids)) = board {
        router = router
            .merge(crate::http::board::routes(board.clone()))
            .merge(crate::http::api::routes(crate::http::api::ApiState {
                board: board.clone(),
                status: status.clone(),
                sink,
                grids,
            }))
            .layer(axum::middleware::from_fn_with_state(
                crate::http::auth::Guard {
                    required: http.auth == "tokens",
                    open311_public: http.open311_public,
                    board,
                    timeout: std::time::Duration::from_millis(http.timeout_ms),
                },
                crate::http::auth::check,
            ))
            .layer(axum::extract::DefaultBodyLimit::max(http.body_limit));
    }
    let tls = if http.tls_cert.is_empty() {
        None
    } else {
        Some(
            crate::http::tls::server_config(
                std::path::Path::new(&http.tls_cert),
                std::path::Path::new(&http.tls_key),
            )
            .context("http.tls_cert / http.tls_key")?,
        )
    };
    let limits = crate::http::Limits {
        max_connections: http.max_connections,
        header_timeout: std::time::Duration::from_millis(http.header_timeout_ms),
    };
    let open = status.http_connections.clone();
    let task = tokio::spawn(async move {
        let served = match tls {
            None => crate::http::serve(listener, router, limits, open, shutdown).await,
            Some(config) => match crate::http::tls::TlsListener::new(listener, config) {
                Ok(listener) => crate::http::serve(listener, router, limits, open, shutdown).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = served {
            tracing::error!("http server stopped: {e}");
        }
    });
    Ok((addr, task))
}

impl Gateway {
    /// Waits for ingest to end (shutdown, or a store failure), then turns `stop` true and
    /// waits for every other task — delivery workers, the telemetry sink, the HTTP server —
    /// each at most `grace`; returns ingest's result. (The embedded broker's threads end with
    /// the process: rumqttd has no stop.)
    pub async fn join(self, stop: &watch::Sender<bool>, grace: std::time::Duration) -> Result<()> {
        let ingest = self.task.await;
        stop.send_replace(true);
        let mut rest: Vec<(&str, JoinHandle<Result<(), String>>)> = Vec::new();
        for (i, w) in self.workers.into_iter().enumerate() {
            let name = if i < 2 { "delivery" } else { "platform" };
            rest.push((name, tokio::spawn(async move { flatten(w.await) })));
        }
        if let Some((_, sink)) = self.sink {
            rest.push(("telemetry sink", tokio::spawn(async move { flatten(sink.await) })));
        }
        if let Some(http) = self.http_task {
            rest.push(("http", tokio::spawn(async move { http.await.map_err(|e| e.to_string()) })));
        }
        for (name, task) in rest {
            match tokio::time::timeout(grace, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("{name} stopped with: {e}"),
                Ok(Err(e)) => tracing::warn!("{name}: {e}"),
                Err(_) => tracing::warn!("{name} did not stop within {grace:?}"),
            }
        }
        Ok(ingest??)
    }
}

fn flatten<E: std::fmt::Display>(
    r: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), String> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}
