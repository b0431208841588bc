//! Delivery workers: send the outbox to the configured platform adapter and the SOS alerts to
//! the alert channel, with exponential backoff and jitter; keep the platform's case id.
//!
//! Exactly one platform case per incident, whatever fails:
//! - the case and its outbox entry were committed with the frame, so nothing is lost;
//! - an attempt is recorded *before* the request goes out, so after a crash the worker knows
//!   an entry may already have reached the platform: the webhook carries the same
//!   `Idempotency-Key` every time, and the open311 adapter first looks for the request by the
//!   key it embeds in the description before posting again;
//! - 5xx, 429, timeouts and connection errors retry (backoff doubling from `retry_min_ms` to
//!   `retry_max_ms`, equal jitter); other 4xx are permanent: the entry goes to the dead-letter
//!   state with the platform's error and a counter, and an operator decides.
//!
//! Retry classification is separate from the backoff policy (as in Vector's `retries.rs`).

pub mod influx;
pub mod open311;

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::{
    cases::wgs84_to_gcj02,
    config::{CasesSettings, Platform},
    platform::sign,
    status::{Clock, DeliveryStatus},
    store::{AlertView, CaseView, Outbox, OutboxEntry, StoreError},
};

/// How an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Try again later (5xx, 429, timeout, connection).
    #[error("retry: {0}")]
    Retry(String),
    /// Will not succeed by retrying (4xx, a malformed answer).
    #[error("permanent: {0}")]
    Permanent(String),
    /// The platform does not offer what the case needs (its service code, a required
    /// attribute): dead-lettered before it is sent, and reported.
    #[error("the platform does not offer {0}")]
    Unsupported(String),
}

/// Classifies an HTTP status.
pub fn classify(status: u16, body: &str) -> Result<(), DeliveryError> {
    let text = || format!("HTTP {status}: {}", body.chars().take(300).collect::<String>());
    match status {
        200..=299 => Ok(()),
        408 | 425 | 429 | 500..=599 => Err(DeliveryError::Retry(text())),
        _ => Err(DeliveryError::Permanent(text())),
    }
}

fn transport(e: &reqwest::Error) -> DeliveryError {
    DeliveryError::Retry(format!("request failed: {e}"))
}

/// The backoff before attempt `attempts + 1`: `min · 2^attempts` capped at `max`, with equal
/// jitter (half fixed, half random) from `random` in `0..1`.
pub fn backoff_ms(attempts: u32, min_ms: u64, max_ms: u64, random: f64) -> u64 {
    let base = min_ms.saturating_mul(1u64 << attempts.min(30)).min(max_ms);
    let half = base / 2;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let jitter = (half as f64 * random.clamp(0.0, 1.0)) as u64;
    half + jitter
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    #[allow(clippy::cast_precision_loss)]
    let r = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
    r
}

/// The case as we send it to a webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CasePayload {
    /// `create`, `update` or `recovered`.
    pub op: String,
    /// Idempotency key of the case (device + condition + onset).
    pub case_key: String,
    /// Our case id.
    pub case_id: i64,
    /// The platform's case id, once known.
    pub platform_id: Option<String>,
    /// Class code (`C0102`).
    pub service_code: String,
    /// Class name.
    pub service_name: String,
    /// Filing condition.
    pub title: String,
    /// Description with evidence.
    pub description: String,
    /// Device EUI.
    pub device_id: String,
    /// Component object code.
    pub object_code: Option<String>,
    /// Latitude in `crs`.
    pub lat: f64,
    /// Longitude in `crs`.
    pub long: f64,
    /// `WGS84` or `GCJ02`.
    pub crs: String,
    /// Address.
    pub address_string: String,
    /// Codes.
    pub unit_grid_code: Option<String>,
    /// Responsibility grid.
    pub grid_code: Option<String>,
    /// Community.
    pub community_code: Option<String>,
    /// Street.
    pub street_code: Option<String>,
    /// District.
    pub district_code: Option<String>,
    /// `IoT`.
    pub source: String,
    /// `urgent`, `high`, `normal`.
    pub urgency: String,
    /// ISO 8601 +08:00.
    pub onset: String,
    /// ISO 8601 +08:00.
    pub detected: String,
    /// Detected, Unix ms (for the Open311 look-up's search window; not sent).
    #[serde(skip)]
    pub detected_ms: i64,
    /// Handling deadline, ISO 8601.
    pub handling_due: String,
    /// Handling limit (`6h`, `4wh`).
    pub handling_limit: String,
    /// 130: deployed by.
    pub deploy_due: String,
    /// 130: feedback by.
    pub feedback_due: String,
}

/// Builds the payload of an outbox entry for a case.
pub fn payload(
    entry_op: &str,
    c: &CaseView,
    gcj02: bool,
    iso: &dyn Fn(i64) -> String,
) -> CasePayload {
    let (lat, long, crs) = if gcj02 {
        let (a, b) = wgs84_to_gcj02(c.lat, c.lon);
        (a, b, "GCJ02")
    } else {
        (c.lat, c.lon, "WGS84")
    };
    CasePayload {
        op: entry_op.to_owned(),
        case_key: c.idempotency_key.clone(),
        case_id: c.id,
        platform_id: c.platform_id.clone(),
        service_code: c.class_code.clone(),
        service_name: c.class_name.clone(),
        title: c.title.clone(),
        description: c.description.clone(),
        device_id: c.device_id.clone(),
        object_code: c.object_code.clone(),
        lat,
        long,
        crs: crs.into(),
        address_string: c.address.clone(),
        unit_grid_code: c.unit_grid_code.clone(),
        grid_code: c.grid_code.clone(),
        community_code: c.community_code.clone(),
        street_code: c.street_code.clone(),
        district_code: c.district_code.clone(),
        source: c.source.clone(),
        urgency: c.urgency.clone(),
        onset: iso(c.onset_ms),
        detected: iso(c.detected_ms),
        detected_ms: c.detected_ms,
        handling_due: iso(c.handling_due_ms),
        handling_limit: c.handling_limit.clone(),
        deploy_due: iso(c.deploy_due_ms),
        feedback_due: iso(c.feedback_due_ms),
    }
}

/// A platform adapter.
#[derive(Debug, Clone)]
pub enum Adapter {
    /// The built-in board: the case is already on it; its id is the board's request id.
    Local,
    /// Open311 GeoReport v2.
    Open311(open311::Client),
    /// Signed JSON webhook.
    Webhook {
        /// HTTP client.
        http: reqwest::Client,
        /// URL.
        url: String,
        /// HMAC key.
        secret: String,
    },
}

impl Adapter {
    /// From the configuration.
    pub fn from_config(c: &CasesSettings) -> Result<Self, reqwest::Error> {
        let http =
            reqwest::Client::builder().timeout(Duration::from_millis(c.timeout_ms)).build()?;
        Ok(match c.platform {
            Platform::Local => Adapter::Local,
            Platform::Open311 => Adapter::Open311(open311::Client::new(
                http,
                c.url.trim_end_matches('/').to_owned(),
                c.api_key.clone(),
                c.jurisdiction_id.clone(),
            )),
            Platform::Webhook => {
                Adapter::Webhook { http, url: c.url.clone(), secret: c.secret.clone() }
            }
        })
    }

    /// The platform's name as stored with the case.
    pub const fn name(&self) -> &'static str {
        match self {
            Adapter::Local => "local",
            Adapter::Open311(_) => "open311",
            Adapter::Webhook { .. } => "webhook",
        }
    }

    /// Sends one entry at `now_ms`; returns the platform's case id when it gave one. `notes`
    /// collects what the case's trace should say about the attempt.
    pub async fn deliver(
        &self,
        entry: &OutboxEntry,
        p: &CasePayload,
        now_ms: i64,
        notes: &mut Vec<String>,
    ) -> Result<Option<String>, DeliveryError> {
        let now_s = now_ms / 1000;
        match self {
            Adapter::Local => Ok(Some(p.case_id.to_string())),
            Adapter::Open311(client) => client.deliver(entry, p, now_ms, notes).await,
            Adapter::Webhook { http, url, secret } => {
                let body =
                    serde_json::to_vec(p).map_err(|e| DeliveryError::Permanent(e.to_string()))?;
                // One key per outbox entry: a retried or re-sent entry is the same request.
                let key = format!("{}:{}:{}", p.case_key, p.op, entry.id);
                let resp = http
                    .post(url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", key)
                    .header("x-gridsense-signature", sign(secret, now_s, &body))
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| transport(&e))?;
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                classify(status, &text)?;
                #[derive(Deserialize)]
                struct Answer {
                    #[serde(default)]
                    id: Option<serde_json::Value>,
                }
                let id =
                    serde_json::from_str::<Answer>(&text).ok().and_then(|a| a.id).map(
                        |v| match v {
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        },
                    );
                Ok(id.or_else(|| p.platform_id.clone()))
            }
        }
    }
}

/// Settings of a delivery worker.
#[derive(Debug, Clone)]
pub struct Worker {
    /// The adapter.
    pub adapter: Adapter,
    /// Coordinates in GCJ-02.
    pub gcj02: bool,
    /// Retry policy.
    pub retry_min_ms: u64,
    /// Retry policy.
    pub retry_max_ms: u64,
    /// Where SOS alerts go (empty: recorded and logged only).
    pub alert_url: String,
    /// Key alerts are signed with.
    pub alert_secret: String,
    /// The working calendar, for ISO times.
    pub calendar: crate::calendar::Calendar,
    /// Most entries sent at once (`cases.concurrency`): one hanging request does not hold the
    /// others back.
    pub concurrency: usize,
}

/// A worker's store connection, shared by its concurrent deliveries (each call is short and
/// runs on a blocking thread; the requests themselves run without it).
type Shared = Arc<std::sync::Mutex<Box<dyn Outbox>>>;

async fn with_store<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&mut dyn Outbox) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = store.lock().map_err(|_| StoreError::Task("store lock poisoned".into()))?;
        f(&mut **s)
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

/// Entries looked at per round.
const DUE_PER_ROUND: u32 = 64;

/// Runs the delivery of one channel (`case` or `alert`) until shutdown. `wake` is notified
/// after every commit that queued something.
///
/// Up to `worker.concurrency` entries are in flight at once, each for a different subject (a
/// case or an alert): entries of one subject go out one at a time, in the order they were
/// queued (a case's creation before its updates), while a request that hangs until
/// `cases.timeout_ms` holds back only its own subject.
pub async fn run(
    worker: Arc<Worker>,
    channel: &'static str,
    store: Box<dyn Outbox>,
    clock: Clock,
    wake: Arc<Notify>,
    status: Arc<DeliveryStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let store: Shared = Arc::new(std::sync::Mutex::new(store));
    let mut in_flight: tokio::task::JoinSet<(i64, Result<(), StoreError>)> =
        tokio::task::JoinSet::new();
    let mut busy = std::collections::HashSet::new();
    loop {
        if *shutdown.borrow() {
            // Requests under way finish (bounded by the request timeout) and are recorded.
            while let Some(done) = in_flight.join_next().await {
                if let Ok((_, r)) = done {
                    r?;
                }
            }
            return Ok(());
        }
        let mut started = 0;
        if in_flight.len() < worker.concurrency.max(1) {
            let now = clock();
            let due =
                with_store(&store, move |s| s.outbox_due(channel, now, DUE_PER_ROUND)).await?;
            for entry in due {
                if in_flight.len() >= worker.concurrency.max(1) {
                    break;
                }
                // One at a time per subject, in queue order: a later entry of a busy
                // subject waits for the earlier one.
                if !busy.insert(entry.subject) {
                    continue;
                }
                let (worker, store, clock, status) =
                    (worker.clone(), store.clone(), clock.clone(), status.clone());
                started += 1;
                in_flight.spawn(async move {
                    status.in_flight.fetch_add(1, Relaxed);
                    let r = deliver_one(&worker, &store, &entry, &clock, &status).await;
                    status.in_flight.fetch_sub(1, Relaxed);
                    (entry.subject, r)
                });
            }
        }
        // Sleep until a request finishes, the next retry is due (bounded, in case the clock is
        // simulated), a commit wakes us, or shutdown. While requests are in flight and nothing
        // new could start, what is due belongs to a busy subject: wait for a request instead.
        let wait = if in_flight.is_empty() || started > 0 {
            let next = with_store(&store, move |s| s.outbox_next_due(channel)).await?;
            next.map_or(1_000, |n| n.saturating_sub(clock()).clamp(0, 1_000))
        } else {
            1_000
        };
        let wait = Duration::from_millis(u64::try_from(wait).unwrap_or(0));
        tokio::select! {
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                let (subject, r) = done.map_err(|e| StoreError::Task(e.to_string()))?;
                busy.remove(&subject);
                r?;
            }
            () = wake.notified() => {}
            () = tokio::time::sleep(wait), if in_flight.is_empty() || started > 0 => {}
            () = tokio::time::sleep(Duration::from_secs(1)), if !(in_flight.is_empty() || started > 0) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn deliver_one(
    worker: &Worker,
    store: &Shared,
    entry: &OutboxEntry,
    clock: &Clock,
    status: &DeliveryStatus,
) -> Result<(), StoreError> {
    // Record the attempt before sending (see the module docs), and read what to send. The
    // local board is this store: "sending" there is the one UPDATE that records it done, which
    // cannot half-happen, so it needs no attempt record (one write transaction instead of two,
    // each waiting for the ingest commit in progress).
    let record = !(matches!(worker.adapter, Adapter::Local) && entry.channel == "case");
    let e = entry.clone();
    let begun = clock();
    let loaded = with_store(store, move |store| {
        // Claimed by another gateway instance's worker (a shared store): its to send.
        if record && !store.outbox_begin(&e, begun)? {
            return Ok(None);
        }
        Ok(Some(match e.channel.as_str() {
            "case" => (store.case(e.subject)?, None),
            _ => (None, store.alert(e.subject)?),
        }))
    })
    .await?;
    let Some(loaded) = loaded else {
        status.claimed_elsewhere.fetch_add(1, Relaxed);
        return Ok(());
    };
    let now = clock();
    let mut notes = Vec::new();
    let result = match loaded {
        (Some(case), _) => {
            let iso = |ms| worker.calendar.iso(ms);
            let p = payload(&entry.op, &case, worker.gcj02, &iso);
            worker
                .adapter
                .deliver(entry, &p, now, &mut notes)
                .await
                .map(|id| (worker.adapter.name(), id))
        }
        (None, Some(alert)) => {
            deliver_alert(worker, &alert, now / 1000).await.map(|()| ("alert", None))
        }
        (None, None) => {
            Err(DeliveryError::Permanent(format!("{} {} not found", entry.channel, entry.subject)))
        }
    };
    let now = clock();
    if !notes.is_empty() {
        status.resent_unverified.fetch_add(1, Relaxed);
        let (subject, actor) = (entry.subject, format!("delivery:{}", worker.adapter.name()));
        with_store(store, move |s| {
            notes.iter().try_for_each(|n| s.case_note(subject, &actor, n, now))
        })
        .await?;
    }
    let e = entry.clone();
    match result {
        Ok((platform, id)) => {
            if e.channel == "alert" {
                status.alerts.fetch_add(1, Relaxed);
            }
            status.delivered.fetch_add(1, Relaxed);
            with_store(store, move |s| s.outbox_done(&e, platform, id.as_deref(), now)).await
        }
        Err(err) => {
            let next = match &err {
                DeliveryError::Retry(why) => {
                    status.retries.fetch_add(1, Relaxed);
                    if why.starts_with("look-up") {
                        status.lookups_failed.fetch_add(1, Relaxed);
                    }
                    let wait = backoff_ms(
                        e.attempts,
                        worker.retry_min_ms,
                        worker.retry_max_ms,
                        random_unit(),
                    );
                    Some(now.saturating_add(i64::try_from(wait).unwrap_or(i64::MAX)))
                }
                DeliveryError::Permanent(_) | DeliveryError::Unsupported(_) => {
                    status.dead.fetch_add(1, Relaxed);
                    if let DeliveryError::Unsupported(what) = &err
                        && let Ok(mut u) = status.unsupported.lock()
                    {
                        *u.entry(what.clone()).or_default() += 1;
                    }
                    tracing::error!(entry = e.id, channel = %e.channel, subject = e.subject, "delivery given up (dead letter; `gridsense cases redeliver {}` after fixing): {err}", e.id);
                    None
                }
            };
            tracing::warn!(entry = e.id, attempts = e.attempts + 1, "delivery failed: {err}");
            let text = err.to_string();
            with_store(store, move |s| s.outbox_failed(&e, &text, next, now)).await
        }
    }
}

/// Reads an Open311 platform's catalogue at start and every `every`, keeping what the status
/// says about it current (readiness, metrics).
pub async fn watch_catalogue(
    client: open311::Client,
    every: Duration,
    status: Arc<DeliveryStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    loop {
        match client.refresh_catalogue().await {
            Ok(c) => {
                tracing::info!(services = c.services.len(), "platform catalogue read");
                if let Ok(mut e) = status.catalogue_error.lock() {
                    *e = None;
                }
                if let Ok(mut codes) = status.catalogue.lock() {
                    *codes = Some(c.services.keys().cloned().collect());
                }
            }
            Err(e) => {
                tracing::warn!("platform catalogue (services.json) not read: {e}");
                if let Ok(mut slot) = status.catalogue_error.lock() {
                    *slot = Some(e.to_string());
                }
            }
        }
        // A catalogue that could not be read is tried again sooner.
        let failing = status.catalogue_error.lock().map(|e| e.is_some()).unwrap_or(false);
        let wait = if failing { every.min(Duration::from_secs(60)) } else { every };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// The SOS alert as posted to the alert channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertPayload {
    /// Always `sos`.
    pub kind: String,
    /// Alert id.
    pub alert_id: i64,
    /// Beacon.
    pub device_id: String,
    /// Pressed at, Unix ms.
    pub at_ms: i64,
    /// Arrived at the gateway, Unix ms.
    pub received_ms: i64,
    /// WGS84.
    pub lat: Option<f64>,
    /// WGS84.
    pub lon: Option<f64>,
    /// Grid.
    pub grid_code: Option<String>,
}

async fn deliver_alert(worker: &Worker, a: &AlertView, now_s: i64) -> Result<(), DeliveryError> {
    tracing::warn!(device = %a.device_id, grid = ?a.grid_code, lat = ?a.lat, lon = ?a.lon, "SOS from a grid worker");
    if worker.alert_url.is_empty() {
        return Ok(());
    }
    let body = serde_json::to_vec(&AlertPayload {
        kind: "sos".into(),
        alert_id: a.id,
        device_id: a.device_id.clone(),
        at_ms: a.at_ms,
        received_ms: a.received_ms,
        lat: a.lat,
        lon: a.lon,
        grid_code: a.grid_code.clone(),
    })
    .map_err(|e| DeliveryError::Permanent(e.to_string()))?;
    let http = match &worker.adapter {
        Adapter::Open311(c) => c.http().clone(),
        Adapter::Webhook { http, .. } => http.clone(),
        Adapter::Local => reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| DeliveryError::Permanent(e.to_string()))?,
    };
    let resp = http
        .post(&worker.alert_url)
        .header("content-type", "application/json")
        .header("idempotency-key", format!("sos:{}:{}", a.device_id, a.id))
        .header("x-gridsense-signature", sign(&worker.alert_secret, now_s, &body))
        .body(body)
        .send()
        .await
        .map_err(|e| transport(&e))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    classify(status, &text)
}

/// What the platform says about one case: a resolved id and/or a state reached.
type PlatformUpdate = (i64, Option<String>, Option<(crate::cases::CaseState, String)>);

/// Asks an Open311 platform for the status of our open cases every `every`, resolves tokens
/// to ids, and records closures (the platform is authoritative for its cases).
pub async fn poll_open311(
    client: open311::Client,
    mut store: Box<dyn Outbox>,
    clock: Clock,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StoreError> {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        let (s, open) = tokio::task::spawn_blocking(move || {
            let r = store.platform_open("open311");
            (store, r)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?;
        store = s;
        let mut ids = Vec::new();
        let mut updates: Vec<PlatformUpdate> = Vec::new();
        for (case, pid) in open? {
            match pid.strip_prefix("token:") {
                Some(token) => {
                    if let Some(id) = client.resolve(token).await {
                        updates.push((case, Some(id), None));
                    }
                }
                None => ids.push((case, pid)),
            }
        }
        for chunk in ids.chunks(50) {
            let list: Vec<String> = chunk.iter().map(|(_, p)| p.clone()).collect();
            match client.statuses(&list).await {
                Ok(found) => {
                    for r in found {
                        let pid = match &r.service_request_id {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        if r.status == "closed"
                            && let Some((case, _)) = chunk.iter().find(|(_, p)| *p == pid)
                        {
                            let note =
                                r.status_notes.unwrap_or_else(|| "closed on the platform".into());
                            updates.push((
                                *case,
                                None,
                                Some((crate::cases::CaseState::Closed, note)),
                            ));
                        }
                    }
                }
                Err(e) => tracing::warn!("open311 status poll: {e}"),
            }
        }
        if updates.is_empty() {
            continue;
        }
        let now = clock();
        let (s, r) = tokio::task::spawn_blocking(move || {
            let r = updates.iter().try_for_each(|(case, id, state)| {
                if let Some(id) = id {
                    store.set_platform_id(*case, id)?;
                }
                if let Some((to, note)) = state {
                    store.platform_state(*case, *to, note, now)?;
                }
                Ok::<(), StoreError>(())
            });
            (store, r)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?;
        store = s;
        r?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_the_case_in_wgs84_or_gcj02_as_asked() {
        let c = CaseView::example(1_795_658_400_000);
        let cal = crate::calendar::Calendar::default();
        let iso = |ms| cal.iso(ms);
        let p = payload("create", &c, false, &iso);
        assert_eq!((p.crs.as_str(), p.lat, p.long), ("WGS84", c.lat, c.lon));
        assert_eq!(p.onset, "2026-11-26T10:00:00+08:00");
        assert_eq!(p.handling_due, "2026-11-26T12:00:00+08:00");
        assert_eq!(
            (p.service_code.as_str(), p.case_key.as_str()),
            ("C0102", c.idempotency_key.as_str())
        );
        let g = payload("create", &c, true, &iso);
        assert_eq!(g.crs, "GCJ02");
        assert_eq!((g.lat, g.long), wgs84_to_gcj02(c.lat, c.lon));
        assert!((g.lat - c.lat).abs() > 1e-4 || (g.long - c.lon).abs() > 1e-4);
    }

    #[test]
    fn statuses_are_classified_as_retry_or_permanent() {
        assert!(classify(201, "").is_ok());
        for s in [500, 502, 503, 504, 429, 408] {
            assert!(matches!(classify(s, "x"), Err(DeliveryError::Retry(_))), "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert!(matches!(classify(s, "x"), Err(DeliveryError::Permanent(_))), "{s}");
        }
    }

    #[test]
    fn backoff_doubles_with_equal_jitter_up_to_the_cap() {
        assert_eq!(backoff_ms(0, 500, 60_000, 0.0), 250);
        assert_eq!(backoff_ms(0, 500, 60_000, 1.0), 500);
        assert_eq!(backoff_ms(3, 500, 60_000, 0.0), 2_000);
        assert_eq!(backoff_ms(20, 500, 60_000, 1.0), 60_000);
        assert_eq!(backoff_ms(u32::MAX, 500, 60_000, 0.5), 45_000);
    }
}
