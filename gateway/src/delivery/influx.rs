//! The external telemetry sink: drains the store's on-disk buffer to the InfluxDB 2 write API
//! (`POST /api/v2/write`, via the `influxdb2` crate) in batches, with explicit millisecond
//! timestamps (the device's sample times, so a replayed point overwrites itself) and the
//! device EUI and kind as tags. Points leave the buffer only after the server accepted them.
//! 429, 5xx and connection errors are retried with exponential backoff while the buffer keeps
//! filling (bounded by `telemetry.buffer_max_points`, oldest dropped and counted); any other
//! 4xx means the batch can never be written: it is dropped and counted, not retried forever.
//!
//! Delivery is at least once: if the gateway dies between the server's 204 and the buffer
//! delete, the batch is written again after the restart. InfluxDB overwrites a point with the
//! same series and timestamp, so this is harmless there; a VictoriaMetrics used as the sink
//! should run with `-dedup.minScrapeInterval=1ms` for the same effect.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use futures::stream;
use influxdb2::{
    Client, ClientBuilder, RequestError, api::write::TimestampPrecision, models::DataPoint,
};
use tokio::sync::watch;

pub use crate::status::SinkStatus;
use crate::{
    config::Telemetry,
    store::{BufferedPoint, StoreError, TelemetryBuffer},
};

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The HTTP client could not be built.
    #[error("telemetry sink: {0}")]
    Client(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking task failed.
    #[error("telemetry sink task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Whether a failed write is worth retrying.
fn retryable(error: &RequestError) -> bool {
    match error {
        RequestError::Http { status, .. } => status.as_u16() == 429 || status.is_server_error(),
        _ => true,
    }
}

fn data_points(points: &[BufferedPoint]) -> Vec<DataPoint> {
    points
        .iter()
        .filter_map(|p| {
            let mut point = DataPoint::builder(p.measurement.as_str())
                .tag("eui", p.eui.to_string())
                .tag("kind", p.kind.as_str());
            if let Some(grid) = &p.grid {
                point = point.tag("grid", grid.as_str());
            }
            if let Some(street) = &p.street {
                point = point.tag("street", street.as_str());
            }
            point.field(p.field.as_str(), p.value).timestamp(p.at_ms).build().ok()
        })
        .collect()
}

/// The InfluxDB client for the settings (the URL was validated with the configuration).
pub fn client(config: &Telemetry) -> Result<Client, SinkError> {
    let http = reqwest::Client::builder().timeout(Duration::from_millis(config.timeout_ms));
    ClientBuilder::with_builder(http, config.url.clone(), config.org.clone(), config.token.clone())
        .build()
        .map_err(|e| SinkError::Client(e.to_string()))
}

/// Drains the buffer until `shutdown` turns true.
pub async fn run(
    config: Telemetry,
    mut store: Box<dyn TelemetryBuffer>,
    status: Arc<SinkStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SinkError> {
    let client = client(&config)?;
    let mut delay = config.retry_min_ms;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let limit = config.batch_max;
        let (s, read) = tokio::task::spawn_blocking(move || {
            let r = store.buffer_read(limit).and_then(|p| Ok((p, store.buffer_len()?)));
            (store, r)
        })
        .await?;
        store = s;
        let (points, waiting) = read?;
        status.buffered.store(waiting, Relaxed);
        let Some(last) = points.last().map(|p| p.id) else {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(config.flush_ms)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        };
        let started = std::time::Instant::now();
        let result = client
            .write_with_precision(
                &config.bucket,
                stream::iter(data_points(&points)),
                TimestampPrecision::Milliseconds,
            )
            .await;
        let delivered = match result {
            Ok(()) => {
                status.written.fetch_add(points.len() as u64, Relaxed);
                status.failing.store(false, Relaxed);
                status.last_write_us.store(
                    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    Relaxed,
                );
                delay = config.retry_min_ms;
                true
            }
            Err(e) if retryable(&e) => {
                status.failures.fetch_add(1, Relaxed);
                status.failing.store(true, Relaxed);
                tracing::warn!(
                    "telemetry write failed ({e}); {waiting} points buffered; retrying in {delay} ms"
                );
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(delay)) => {}
                    _ = shutdown.changed() => {}
                }
                delay = (delay * 2).min(config.retry_max_ms);
                false
            }
            Err(e) => {
                status.rejected.fetch_add(points.len() as u64, Relaxed);
                tracing::error!("telemetry server refused {} points for good: {e}", points.len());
                true
            }
        };
        if delivered {
            let (s, deleted) = tokio::task::spawn_blocking(move || {
                let r = store.buffer_delete_through(last);
                (store, r)
            })
            .await?;
            store = s;
            deleted?;
        }
    }
}
