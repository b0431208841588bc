//! The gateway's HTTP surface: `GET /api/v1/status` (JSON counters), `GET /healthz`, and the
//! operators' dashboard at `/` (`dashboard.html`: map, device health, cases, live updates; no
//! external assets). The API it uses is in [`crate::http::api`] and [`crate::http::board`].

pub mod api;
pub mod auth;
pub mod board;
pub mod tls;

use std::sync::{Arc, atomic::Ordering::Relaxed};

use axum::{Json, Router, extract::State, response::Html, routing::get};
use serde::Serialize;
use tokio::sync::watch;

use crate::status::{SinkStatus, Status};

#[derive(Clone)]
struct AppState {
    status: Arc<Status>,
    sink: Option<Arc<SinkStatus>>,
}

/// The JSON of `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusBody {
    /// Frames accepted since start.
    pub frames_accepted: u64,
    /// Frames rejected since start.
    pub frames_rejected: u64,
    /// Devices online.
    pub devices_online: u64,
    /// Devices registered.
    pub devices_registered: u64,
    /// Broker connected and subscribed.
    pub broker_connected: bool,
    /// Messages received, not yet acknowledged.
    pub unacked: u64,
    /// Group commits.
    pub batches: u64,
    /// External telemetry sink, if any.
    pub telemetry: Option<TelemetryBody>,
    /// Registered devices outside every grid.
    pub devices_unassigned: u64,
    /// Cases filed since start.
    pub cases_filed: u64,
    /// Incidents open now.
    pub incidents_open: u64,
    /// SOS alerts since start.
    pub alerts: u64,
    /// Deliveries to the platform and the alert channel.
    pub delivery: DeliveryBody,
}

/// Delivery part of the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryBody {
    /// Outbox entries delivered.
    pub delivered: u64,
    /// Failed attempts, retried.
    pub retries: u64,
    /// Entries given up (dead letters).
    pub dead: u64,
}

/// Telemetry sink part of the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TelemetryBody {
    /// Points written.
    pub written: u64,
    /// Points waiting in the on-disk buffer.
    pub buffered: u64,
    /// Failed writes (retried).
    pub failures: u64,
}

fn body(state: &AppState) -> StatusBody {
    let s = &state.status;
    StatusBody {
        frames_accepted: s.frames_accepted.load(Relaxed),
        frames_rejected: s.frames_rejected.load(Relaxed),
        devices_online: s.devices_online.load(Relaxed),
        devices_registered: s.devices_registered.load(Relaxed),
        broker_connected: s.connected.load(Relaxed),
        unacked: s.unacked.load(Relaxed),
        batches: s.batches.load(Relaxed),
        devices_unassigned: s.devices_unassigned.load(Relaxed),
        cases_filed: s.cases_filed.load(Relaxed),
        incidents_open: s.incidents_open.load(Relaxed),
        alerts: s.alerts.load(Relaxed),
        delivery: DeliveryBody {
            delivered: s.delivery.delivered.load(Relaxed),
            retries: s.delivery.retries.load(Relaxed),
            dead: s.delivery.dead.load(Relaxed),
        },
        telemetry: state.sink.as_ref().map(|t| TelemetryBody {
            written: t.written.load(Relaxed),
            buffered: t.buffered.load(Relaxed),
            failures: t.failures.load(Relaxed),
        }),
    }
}

async fn get_status(State(state): State<AppState>) -> Json<StatusBody> {
    Json(body(&state))
}

/// The operators' dashboard: one self-contained page (no external assets; it works offline).
const PAGE: &str = include_str!("dashboard.html");

/// The router.
pub fn router(status: Arc<Status>, sink: Option<Arc<SinkStatus>>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/status", get(get_status))
        .with_state(AppState { status, sink })
}

/// Limits on the connections the HTTP server takes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once; beyond it new ones wait in the listen queue until one
    /// closes.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers (also while a kept-alive
    /// connection sits idle before its next request); then the connection is closed.
    pub header_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 512, header_timeout: std::time::Duration::from_secs(10) }
    }
}

/// Counts an open connection while it lives.
struct Open(Arc<std::sync::atomic::AtomicU64>);

impl Open {
    fn new(gauge: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        gauge.fetch_add(1, Relaxed);
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Serves until `shutdown` turns true (plain TCP or [`crate::http::tls::TlsListener`]), HTTP/1.1,
/// within `limits`: a connection that sends nothing, or its headers a byte a second, is closed
/// after `header_timeout`; at most `max_connections` are open (the permit is taken before
/// accepting, so the rest wait in the kernel's queue). On shutdown, connections finish the
/// request under way (at most five seconds).
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    open: Arc<std::sync::atomic::AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => continue,
        };
        let (io, peer) = tokio::select! {
            c = listener.accept() => c,
            _ = shutdown.changed() => continue,
        };
        // Finished connections' results, so the set does not grow.
        while connections.try_join_next().is_some() {}
        let connection = builder.serve_connection(TokioIo::new(io), service.clone());
        let mut stop = shutdown.clone();
        let counted = Open::new(&open);
        connections.spawn(async move {
            let _permit = (permit, counted);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                r = connection.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(?peer, "http connection: {e}");
                    }
                }
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;
                }
            }
        });
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(6), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_is_served_as_json_on_loopback() {
        let status = Arc::new(Status::default());
        status.frames_accepted.store(42, Relaxed);
        status.devices_online.store(7, Relaxed);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            router(status, None),
            Limits::default(),
            Arc::default(),
            stop,
        ));
        let body: serde_json::Value = reqwest::get(format!("http://{addr}/api/v1/status"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["frames_accepted"], 42);
        assert_eq!(body["devices_online"], 7);
        assert_eq!(body["frames_rejected"], 0);
        let page = reqwest::get(format!("http://{addr}/")).await.unwrap().text().await.unwrap();
        // Self-contained: no external script, style, font, image or map tile.
        assert!(page.contains("/api/v1/status"));
        for external in ["src=\"http", "href=\"http", "url(http", "@import", "//cdn", "https://"] {
            assert!(!page.contains(external), "{external}");
        }
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
    }
}
