//! What the running gateway shares between its tasks: the clock, and the live status and
//! metrics hub (counters, gauges, the alarm → case histogram, the live-view notices). Ingest,
//! delivery and the HTTP side all read or write it; it depends on none of them.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
};

use crate::batch::Batch;

/// The current time in Unix ms (the wall clock, or the demo's simulated clock).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock in Unix ms.
pub fn wall_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// Live counters, read by the status endpoint and the demo's progress line.
#[derive(Debug, Default)]
pub struct Status {
    /// Frames accepted since start.
    pub frames_accepted: AtomicU64,
    /// Frames rejected since start.
    pub frames_rejected: AtomicU64,
    /// Devices online after the last commit.
    pub devices_online: AtomicU64,
    /// Devices registered.
    pub devices_registered: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// On some broker every session this instance wants is connected with its subscription
    /// granted (and it wants at least one): with two brokers, one may be down.
    pub connected: AtomicBool,
    /// Per broker: sessions wanted (one per owned shard and lane, and the legacy one) and
    /// connected with their subscription granted; `connected` follows from them.
    pub sessions: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Shards this instance holds.
    pub shards_held: AtomicU64,
    /// Shards claimed, handed over or lost since start (each one counted).
    pub rebalances: AtomicU64,
    /// Version 1 frames republished to their shard's topic (their shard is another
    /// instance's).
    pub frames_forwarded: AtomicU64,
    /// Messages left unacknowledged for a shard's next owner (they came in while the shard
    /// was handed over, or after it was lost).
    pub left_for_next_owner: AtomicU64,
    /// Batches the store refused because a shard's lease had moved on (fencing).
    pub fenced: AtomicU64,
    /// This instance's name among the gateway instances (`[cluster] instance_id`).
    pub instance: std::sync::OnceLock<String>,
    /// Its `[cluster] lease_ms` (what "live within a lease" means for the cluster view).
    pub lease_ms: std::sync::OnceLock<i64>,
    /// Broker connections made.
    pub connects: AtomicU64,
    /// Messages received but not yet acknowledged.
    pub unacked: AtomicU64,
    /// Of those, waiting at their session for room in the pipeline's channel.
    pub overflowed: AtomicU64,
    /// Downlinks dropped because their session's queue was full (each is made good later).
    pub downlinks_dropped: AtomicU64,
    /// PUBLISH packets received from the broker since start.
    pub mqtt_received: AtomicU64,
    /// PUBACK packets written to the broker since start.
    pub mqtt_acked: AtomicU64,
    /// Cases filed since start.
    pub cases_filed: AtomicU64,
    /// Incidents open after the last commit.
    pub incidents_open: AtomicU64,
    /// SOS alerts since start.
    pub alerts: AtomicU64,
    /// Registered devices outside every grid (beyond the tolerance).
    pub devices_unassigned: AtomicU64,
    /// Delivery counters (the workers count here).
    pub delivery: Arc<DeliveryStatus>,
    /// Woken after a commit that queued deliveries: `[cases, alerts]`.
    pub outbox_wake: [Arc<tokio::sync::Notify>; 2],
    /// Rejected frames by reason since start.
    pub rejects: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Gateway time from the frame (or timer) that decided a case to the case being durable.
    pub case_latency: Histogram,
    /// What each commit changed, for live views (server-sent events).
    pub events: Events,
    /// Cases supervision escalated (督办) since start.
    pub escalations: AtomicU64,
    /// Commit duration of the last batch, µs.
    pub last_commit_us: AtomicU64,
    /// Capacity of the channel from the session to the pipeline (the in-flight window).
    pub queue_capacity: AtomicU64,
    /// Why the last commit failed while it is being retried (a full disk); `None` when the
    /// store takes writes.
    pub store_error: std::sync::Mutex<Option<String>>,
    /// Commit attempts that failed and were retried.
    pub store_retries: AtomicU64,
    /// Broker connections lost (or attempts failed), by reason.
    pub disconnects: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// The last lost connection: reason, what the client said, wall-clock Unix ms.
    pub last_disconnect: std::sync::Mutex<Option<(&'static str, String, i64)>>,
    /// When another client last took this gateway's session over, or the broker last had no
    /// session for it on reconnecting (wall-clock Unix ms; 0: never). Readiness fails for a
    /// minute after it.
    pub session_trouble_ms: std::sync::atomic::AtomicI64,
    /// Reconnections on which the broker had kept no session for this client id.
    pub sessions_lost: AtomicU64,
    /// Sample times clamped to the receive time since start (more than `health.max_ahead_s`
    /// ahead of it).
    pub samples_future: AtomicU64,
    /// HTTP connections open now.
    pub http_connections: Arc<AtomicU64>,
}

impl Status {
    /// Records a lost broker connection: its reason's label, whether the broker said another
    /// client took the session over, what the client said.
    pub fn disconnected(&self, reason: &'static str, taken_over: bool, detail: &str, now_ms: i64) {
        if let Ok(mut d) = self.disconnects.lock() {
            *d.entry(reason).or_default() += 1;
        }
        if let Ok(mut last) = self.last_disconnect.lock() {
            *last = Some((reason, detail.to_owned(), now_ms));
        }
        if taken_over {
            self.session_trouble_ms.store(now_ms, Relaxed);
        }
    }

    /// A session's subscription on `broker` came up (`true`) or went down.
    pub fn session_up(&self, broker: u8, up: bool) {
        self.with_sessions(usize::from(broker), |s| {
            s.1 = if up { s.1 + 1 } else { s.1.saturating_sub(1) }
        });
    }

    /// Sets how many sessions are wanted on each broker (before new ones start, so that
    /// `connected` waits for all of them).
    pub fn want_sessions(&self, per_broker: &[u64]) {
        for (b, n) in per_broker.iter().enumerate() {
            self.with_sessions(b, |s| s.0 = *n);
        }
    }

    fn with_sessions(&self, broker: usize, change: impl FnOnce(&mut (u64, u64))) {
        if let Ok(mut all) = self.sessions.lock() {
            if all.len() <= broker {
                all.resize(broker + 1, (0, 0));
            }
            if let Some(s) = all.get_mut(broker) {
                change(s);
            }
            self.connected.store(all.iter().any(|s| s.0 > 0 && s.1 >= s.0), Relaxed);
        }
    }

    /// `[cluster] lease_ms` as the ingest set it (its default before).
    pub fn lease_ms(&self) -> i64 {
        self.lease_ms.get().copied().unwrap_or_else(|| crate::config::Cluster::default().lease_ms())
    }

    /// Sessions wanted and up, on all brokers together.
    pub fn session_counts(&self) -> (u64, u64) {
        self.broker_sessions().iter().fold((0, 0), |t, s| (t.0 + s.0, t.1 + s.1))
    }

    /// Sessions wanted and up, per broker (in `[mqtt] urls` order).
    pub fn broker_sessions(&self) -> Vec<(u64, u64)> {
        self.sessions.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Records a reconnection on which the broker had kept no session for this client id.
    pub fn session_lost(&self, now_ms: i64) {
        self.sessions_lost.fetch_add(1, Relaxed);
        self.session_trouble_ms.store(now_ms, Relaxed);
    }
}

/// Upper bounds of [`Histogram`] buckets, ms.
pub const LATENCY_BUCKETS_MS: [u64; 12] =
    [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000];

/// A latency histogram with fixed buckets (Prometheus-style, cumulative when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    pub buckets: [AtomicU64; 13],
    /// Sum of observations, ms.
    pub sum_ms: AtomicU64,
    /// Observations.
    pub count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, ms: u64) {
        let i =
            LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        self.sum_ms.fetch_add(ms, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

/// Live change notices (JSON), one per commit that changed something an operator sees.
#[derive(Debug)]
pub struct Events(pub tokio::sync::broadcast::Sender<String>);

impl Default for Events {
    fn default() -> Self {
        Events(tokio::sync::broadcast::channel(256).0)
    }
}

/// What one commit changed, as sent to live views.
#[derive(Debug, Default, serde::Serialize)]
pub struct Changes {
    /// Wall-clock time the notice was sent, Unix ms (live views measure their lag with it).
    pub sent_ms: i64,
    /// Frames accepted in the batch.
    pub accepted: u64,
    /// New cases: id, device, class, grid.
    pub cases: Vec<(i64, String, String, Option<String>)>,
    /// Incident changes: device, condition, severity, state.
    pub incidents: Vec<(String, String, String, &'static str)>,
    /// Health transitions: device, event.
    pub health: Vec<(String, &'static str)>,
    /// Beacons' new fixes: device, lat, lon.
    pub fixes: Vec<(String, f64, f64)>,
    /// SOS alerts: device.
    pub alerts: Vec<String>,
}

impl Changes {
    /// From a batch about to be committed.
    pub fn of(batch: &Batch) -> Self {
        Changes {
            sent_ms: 0,
            accepted: batch.accepted,
            cases: batch
                .cases
                .cases
                .iter()
                .map(|c| (c.id, c.eui.to_string(), c.class_code.clone(), c.place.grid_code.clone()))
                .collect(),
            incidents: batch
                .cases
                .incidents
                .iter()
                .map(|i| {
                    (
                        i.eui.to_string(),
                        i.condition.clone(),
                        i.severity.as_str().to_owned(),
                        i.state,
                    )
                })
                .collect(),
            health: batch.events.iter().map(|e| (e.eui.to_string(), e.kind.as_str())).collect(),
            fixes: batch.fixes.iter().map(|(e, f)| (e.to_string(), f.0, f.1)).collect(),
            alerts: batch.cases.alerts.iter().map(|a| a.eui.to_string()).collect(),
        }
    }

    /// Whether an operator would see a difference.
    pub fn is_visible(&self) -> bool {
        !(self.cases.is_empty()
            && self.incidents.is_empty()
            && self.health.is_empty()
            && self.fixes.is_empty()
            && self.alerts.is_empty())
    }
}

/// Delivery counters, for the status page and metrics.
#[derive(Debug, Default)]
pub struct DeliveryStatus {
    /// Entries delivered.
    pub delivered: AtomicU64,
    /// Attempts that failed and will be retried.
    pub retries: AtomicU64,
    /// Entries dead-lettered (permanent failures).
    pub dead: AtomicU64,
    /// Alerts delivered.
    pub alerts: AtomicU64,
    /// Requests being sent now.
    pub in_flight: AtomicU64,
    /// Open311 look-ups (after an uncertain attempt) that could not answer.
    pub lookups_failed: AtomicU64,
    /// Cases posted again without a look-up that answered (possible duplicates, marked).
    pub resent_unverified: AtomicU64,
    /// Due entries another instance's worker claimed first (a shared store), left to it.
    pub claimed_elsewhere: AtomicU64,
    /// Cases dead-lettered because the platform does not offer what they need, by what.
    pub unsupported: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Why the platform's catalogue (`services.json`) could not be read, while it cannot.
    pub catalogue_error: std::sync::Mutex<Option<String>>,
    /// Service codes the platform offers, once read (`None`: not read, or not an Open311
    /// platform).
    pub catalogue: std::sync::Mutex<Option<Vec<String>>>,
}

/// Live counters of the telemetry sink (the InfluxDB 2 writer), for the status and metrics.
#[derive(Debug, Default)]
pub struct SinkStatus {
    /// Points the server accepted.
    pub written: AtomicU64,
    /// Points dropped because the server refused them for good (4xx other than 429).
    pub rejected: AtomicU64,
    /// Failed write attempts (retried).
    pub failures: AtomicU64,
    /// Points waiting in the buffer at the last look.
    pub buffered: AtomicU64,
    /// Duration of the last successful write, µs.
    pub last_write_us: AtomicU64,
    /// The last write attempt failed and is being retried.
    pub failing: AtomicBool,
}
