//! The operator API under `/api/v1` (devices, grids, incidents, statistics, live events), the
//! supervisors' `/readyz` and Prometheus `/metrics`. Errors are JSON
//! `{"error": {"code": "...", "message": "..."}}` with a stable code; a bad query parameter is a
//! 400 naming the parameter.

use std::{
    convert::Infallible,
    fmt::Write as _,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use gridsense_protocol::Eui;
use serde::{Deserialize, Serialize};

use crate::{
    http::board::Board,
    status::{LATENCY_BUCKETS_MS, SinkStatus, Status},
    store::DeviceFilter,
};

/// What the API's handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The case board (store connection, calendar, clock).
    pub board: Arc<Board>,
    /// Live counters.
    pub status: Arc<Status>,
    /// The external telemetry sink, if any.
    pub sink: Option<Arc<SinkStatus>>,
    /// The grid layer, if any.
    pub grids: Option<GridsView>,
}

/// The grid layer as the API serves it, made once at start.
#[derive(Debug, Clone)]
pub struct GridsView {
    /// The GeoJSON as loaded (`/api/v1/grids` adds live counts to it).
    pub geojson: Arc<serde_json::Value>,
    /// Its grids with their community and street (the report's rows).
    pub areas: Arc<Vec<crate::assessment::Area>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// The error body.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    /// Stable code: `bad_parameter`, `not_found`, `conflict`, `unauthorized`, `internal`.
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
}

/// An API error response.
pub fn api_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: ErrorDetail { code, message: message.into() } }))
        .into_response()
}

/// 400 naming the parameter.
pub fn bad_parameter(message: impl Into<String>) -> Response {
    api_error(StatusCode::BAD_REQUEST, "bad_parameter", message)
}

fn internal(e: impl std::fmt::Display) -> Response {
    api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

async fn blocking<T: Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&mut dyn crate::store::Operator) -> Result<T, crate::store::StoreError>
    + Send
    + 'static,
) -> Result<T, Response> {
    state.board.with_store(f).await.map_err(internal)
}

/// Query of `GET /api/v1/devices`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    /// `cover`, `drain`, `beacon`.
    pub kind: Option<String>,
    /// Grid code.
    pub grid: Option<String>,
    /// Street code.
    pub street: Option<String>,
    /// `online`, `offline`, `never_seen`, `low_battery`, `alarm`.
    pub state: Option<String>,
    /// Battery below, mV.
    pub battery_below: Option<String>,
    /// Silent for more than, e.g. `30m`, `2h`, `90s`.
    pub silent_for: Option<String>,
    /// Sort: `eui`, `kind`, `grid`, `battery`, `rssi`, `last_seen`, `state`.
    pub sort: Option<String>,
    /// `asc` or `desc`.
    pub order: Option<String>,
    /// Page from 1.
    pub page: Option<String>,
    /// Rows per page (1–5000, default 100).
    pub per_page: Option<String>,
    /// `1`: add each row's recent readings (main series) for sparklines.
    pub spark: Option<String>,
}

fn number<T: std::str::FromStr>(name: &str, v: Option<&String>) -> Result<Option<T>, String> {
    v.map(|s| s.parse::<T>().map_err(|_| format!("{name}: {s:?} is not a number"))).transpose()
}

fn one_of(name: &str, v: Option<&String>, allowed: &[&str]) -> Result<Option<String>, String> {
    match v {
        Some(s) if !allowed.contains(&s.as_str()) => {
            Err(format!("{name}: {s:?} is not one of {}", allowed.join(", ")))
        }
        other => Ok(other.cloned()),
    }
}

fn code(name: &str, v: Option<&String>) -> Result<Option<String>, String> {
    match v {
        Some(s) if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) => {
            Err(format!("{name}: {s:?} is not a code (digits)"))
        }
        other => Ok(other.cloned()),
    }
}

/// Parses the device list query; the error names the parameter.
pub fn device_filter(q: &DevicesQuery, now_ms: i64) -> Result<(DeviceFilter, bool), String> {
    let silent = q
        .silent_for
        .as_deref()
        .map(|s| {
            humantime::parse_duration(s)
                .map_err(|e| format!("silent_for: {s:?} is not a duration such as 30m ({e})"))
        })
        .transpose()?;
    let filter = DeviceFilter {
        kind: one_of("kind", q.kind.as_ref(), &["cover", "drain", "beacon"])?,
        grid: code("grid", q.grid.as_ref())?,
        street: code("street", q.street.as_ref())?,
        state: one_of(
            "state",
            q.state.as_ref(),
            &["online", "offline", "never_seen", "low_battery", "alarm"],
        )?,
        battery_below: number("battery_below", q.battery_below.as_ref())?,
        silent_before_ms: silent
            .map(|d| now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
        sort: one_of(
            "sort",
            q.sort.as_ref(),
            &["eui", "kind", "grid", "battery", "rssi", "last_seen", "state"],
        )?,
        desc: one_of("order", q.order.as_ref(), &["asc", "desc"])?.as_deref() == Some("desc"),
        page: number("page", q.page.as_ref())?.unwrap_or(1).max(1),
        per_page: match number::<u32>("per_page", q.per_page.as_ref())? {
            Some(n) if !(1..=5_000).contains(&n) => {
                return Err("per_page: between 1 and 5000".into());
            }
            Some(n) => n,
            None => 100,
        },
    };
    let spark = one_of("spark", q.spark.as_ref(), &["0", "1"])?.as_deref() == Some("1");
    Ok((filter, spark))
}

/// The main series of a kind (sparklines): measurement and field.
pub const fn main_series(kind: &str) -> (&'static str, &'static str) {
    match kind.as_bytes() {
        b"cover" => ("cover", "tilt_ddeg"),
        b"drain" => ("drain", "level_mm"),
        _ => ("status", "battery_mv"),
    }
}

async fn devices(
    State(state): State<ApiState>,
    query: Result<Query<DevicesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad_parameter(e.body_text()),
    };
    let now = state.board.now();
    let (filter, spark) = match device_filter(&q, now) {
        Ok(f) => f,
        Err(e) => return bad_parameter(e),
    };
    let result = blocking(&state, move |s| {
        let page = s.devices(&filter)?;
        let sparks = if spark {
            let list: Vec<_> = page
                .devices
                .iter()
                .filter_map(|d| {
                    let (m, f) = main_series(&d.kind);
                    Some((d.eui.parse::<Eui>().ok()?, m, f))
                })
                .collect();
            Some(s.sparklines(&list, now - 86_400_000, 24)?)
        } else {
            None
        };
        Ok((page, sparks))
    })
    .await;
    match result {
        Ok((page, sparks)) => {
            let mut body = serde_json::to_value(&page).unwrap_or_default();
            if let Some(sparks) = sparks
                && let Some(o) = body.as_object_mut()
            {
                o.insert("sparklines".into(), serde_json::to_value(sparks).unwrap_or_default());
            }
            Json(body).into_response()
        }
        Err(r) => r,
    }
}

async fn device(State(state): State<ApiState>, Path(eui): Path<String>) -> Response {
    let Ok(eui) = eui.parse::<Eui>() else {
        return bad_parameter(format!("eui: {eui:?} is not 16 hex digits"));
    };
    let since = state.board.now() - 7 * 86_400_000;
    match blocking(&state, move |s| s.device(eui, since)).await {
        Ok(Some(d)) => Json(d).into_response(),
        Ok(None) => {
            api_error(StatusCode::NOT_FOUND, "not_found", format!("device {eui} not registered"))
        }
        Err(r) => r,
    }
}

async fn map(State(state): State<ApiState>) -> Response {
    match blocking(&state, |s| s.map_devices()).await {
        Ok(d) => Json(serde_json::json!({ "devices": d })).into_response(),
        Err(r) => r,
    }
}

async fn grids(State(state): State<ApiState>) -> Response {
    let Some(layer) = state.grids.as_ref().map(|g| g.geojson.clone()) else {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no grid layer configured (geo.grids)",
        );
    };
    let counts = match blocking(&state, |s| s.grid_counts()).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut out = (*layer).clone();
    if let Some(features) = out.get_mut("features").and_then(serde_json::Value::as_array_mut) {
        for f in features {
            let code = f
                .pointer("/properties/grid_code")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_owned();
            let c = counts.get(&code).cloned().unwrap_or_default();
            if let Some(p) = f.get_mut("properties").and_then(serde_json::Value::as_object_mut) {
                p.insert("devices".into(), c.devices.into());
                p.insert("offline".into(), c.offline.into());
                p.insert("open_cases".into(), c.open_cases.into());
                p.insert("alarm".into(), c.alarm.into());
            }
        }
    }
    Json(out).into_response()
}

/// Query of `GET /api/v1/incidents`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentsQuery {
    /// `open`, `recovered`, `maintenance`, `closed` (comma-separated).
    pub state: Option<String>,
    /// Condition name.
    pub condition: Option<String>,
    /// Area code prefix.
    pub area: Option<String>,
    /// Most rows (default 200, at most 5000).
    pub limit: Option<String>,
}

async fn incidents(
    State(state): State<ApiState>,
    query: Result<Query<IncidentsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad_parameter(e.body_text()),
    };
    let states: Vec<String> =
        q.state.as_deref().map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default();
    if let Some(bad) = states
        .iter()
        .find(|s| !["open", "recovered", "maintenance", "closed"].contains(&s.as_str()))
    {
        return bad_parameter(format!(
            "state: {bad:?} is not open, recovered, maintenance or closed"
        ));
    }
    if let Some(c) = &q.condition
        && !c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        return bad_parameter(format!("condition: {c:?} is not a condition name"));
    }
    let area = match code("area", q.area.as_ref()) {
        Ok(a) => a,
        Err(e) => return bad_parameter(e),
    };
    let limit = match number::<u32>("limit", q.limit.as_ref()) {
        Ok(l) => l.unwrap_or(200).clamp(1, 5_000),
        Err(e) => return bad_parameter(e),
    };
    let condition = q.condition.clone();
    match blocking(&state, move |s| {
        s.incidents(&states, condition.as_deref(), area.as_deref(), limit)
    })
    .await
    {
        Ok(rows) => Json(rows).into_response(),
        Err(r) => r,
    }
}

/// Query of `GET /api/v1/stats`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Start, a W3C date-time or a date (local midnight); default: 30 days before `to`.
    pub from: Option<String>,
    /// End (exclusive); default now.
    pub to: Option<String>,
    /// District, street, community or grid code; default everything.
    pub area: Option<String>,
}

fn instant(name: &str, v: &str, cal: &crate::calendar::Calendar) -> Result<i64, String> {
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(v) {
        return Ok(d.timestamp_millis());
    }
    let day = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| format!("{name}: {v:?} is neither a date (2026-11-01) nor a date-time"))?;
    let local = cal.local(0).offset().to_owned();
    day.and_hms_opt(0, 0, 0)
        .and_then(|t| t.and_local_timezone(local).single())
        .map(|t| t.timestamp_millis())
        .ok_or_else(|| format!("{name}: {v:?} does not exist"))
}

/// `GET /api/v1/cluster`: the gateway instances sharing the store, the shards each holds and
/// when its next lease lapses, the shards nobody holds, and this instance's own figures.
async fn cluster(State(state): State<ApiState>) -> Response {
    let lease_ms = state.status.lease_ms();
    let view = match blocking(&state, move |s| s.cluster_view(None, lease_ms)).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let instances: Vec<serde_json::Value> = view
        .instances
        .iter()
        .map(|name| {
            let held: Vec<&crate::cluster::Lease> = view.held_by(name).collect();
            serde_json::json!({
                "instance": name,
                "shards": held.iter().map(|l| l.shard).collect::<Vec<_>>(),
                "next_expiry_ms": held.iter().map(|l| l.expires_in_ms).min(),
            })
        })
        .collect();
    let unheld: Vec<serde_json::Value> = view
        .unheld()
        .map(|l| {
            serde_json::json!({
                "shard": l.shard,
                "last_owner": l.owner,
                "lapsed_ms": l.owner.as_ref().map(|_| -l.expires_in_ms),
            })
        })
        .collect();
    let s = &state.status;
    let (wanted, up) = s.session_counts();
    let rebalances = view.rebalances();
    Json(serde_json::json!({
        "db_now_ms": view.db_now_ms,
        "shards": view.leases.len(),
        "rebalances": rebalances,
        "instances": instances,
        "unheld": unheld,
        "this_instance": {
            "instance": s.instance.get(),
            "shards_held": s.shards_held.load(Relaxed),
            "rebalances": s.rebalances.load(Relaxed),
            "batches_fenced": s.fenced.load(Relaxed),
            "sessions_wanted": wanted,
            "sessions_up": up,
            "frames_forwarded": s.frames_forwarded.load(Relaxed),
        },
    }))
    .into_response()
}

async fn stats(
    State(state): State<ApiState>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad_parameter(e.body_text()),
    };
    let now = state.board.now();
    let cal = state.board.calendar();
    let to = match q.to.as_deref().map(|v| instant("to", v, cal)).transpose() {
        Ok(t) => t.unwrap_or(now),
        Err(e) => return bad_parameter(e),
    };
    let from = match q.from.as_deref().map(|v| instant("from", v, cal)).transpose() {
        Ok(f) => f.unwrap_or(to - 30 * 86_400_000),
        Err(e) => return bad_parameter(e),
    };
    if from >= to {
        return bad_parameter("from: must be before to");
    }
    let area = match code("area", q.area.as_ref()) {
        Ok(a) => a.unwrap_or_default(),
        Err(e) => return bad_parameter(e),
    };
    match blocking(&state, move |s| s.stats(from, to, &area, now)).await {
        Ok(s) => {
            let mut body = serde_json::to_value(s).unwrap_or_default();
            if let Some(o) = body.as_object_mut() {
                o.insert("from".into(), cal.iso(from).into());
                o.insert("to".into(), cal.iso(to).into());
            }
            Json(body).into_response()
        }
        Err(r) => r,
    }
}

async fn events(
    State(state): State<ApiState>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let rx = state.status.events.0.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(json) => Some((Ok(Event::default().event("change").data(json)), rx)),
            // A slow client missed some: tell it to reload what it shows.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                Some((Ok(Event::default().event("resync").data("{}")), rx))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// How long readiness fails after another client took the gateway's session over.
const TAKEOVER_NOT_READY_MS: i64 = 60_000;

async fn readyz(State(state): State<ApiState>) -> Response {
    let mut problems = Vec::new();
    if !state.status.connected.load(Relaxed) {
        let last = state.status.last_disconnect.lock().ok().and_then(|l| l.clone());
        problems.push(match last {
            Some((reason, detail, _)) => format!("broker not connected (last: {reason}: {detail})"),
            None => "broker not connected".to_owned(),
        });
    }
    let trouble = state.status.session_trouble_ms.load(Relaxed);
    let now = crate::status::wall_clock()();
    if trouble > 0 && now.saturating_sub(trouble) < TAKEOVER_NOT_READY_MS {
        problems.push(format!(
            "broker session taken over or lost {} s ago: another client connected with this gateway's client id, or the broker lost its state; messages queued for the gateway may be gone (bind client ids to accounts: use_username_as_clientid)",
            now.saturating_sub(trouble) / 1000
        ));
    }
    if let Some(e) = state.status.store_error.lock().ok().and_then(|e| e.clone()) {
        problems.push(format!("commits failing, nothing acknowledged until they succeed: {e}"));
    } else if let Err(e) = state.board.with_store(|s| s.check_writable()).await {
        problems.push(format!("store not writable: {e}"));
    }
    if state.sink.as_ref().is_some_and(|s| s.failing.load(Relaxed)) {
        problems.push("telemetry sink failing".into());
    }
    // Warnings: worth an operator's attention, but ingestion and delivery work.
    let mut warnings = Vec::new();
    let brokers = state.status.broker_sessions();
    if brokers.len() > 1 && state.status.connected.load(Relaxed) {
        // Two brokers, one whole: devices fail over to it, so ingest goes on.
        for (i, (wanted, up)) in brokers.iter().enumerate().filter(|(_, (w, u))| u < w) {
            warnings.push(format!(
                "broker {} of {} ([mqtt] urls): {up} of {wanted} sessions up; devices fail over to the other",
                i + 1,
                brokers.len()
            ));
        }
    }
    let d = &state.status.delivery;
    if let Some(e) = d.catalogue_error.lock().ok().and_then(|e| e.clone()) {
        warnings.push(format!("the platform's services.json could not be read: {e}"));
    }
    let dead =
        state.board.with_store(|s| s.outbox(None, Some("dead"), 10_000)).await.unwrap_or_default();
    let mut unsupported: std::collections::BTreeMap<String, u64> =
        std::collections::BTreeMap::new();
    for e in &dead {
        if let Some(what) =
            e.last_error.as_deref().and_then(|t| t.strip_prefix("the platform does not offer "))
        {
            *unsupported.entry(what.to_owned()).or_default() += 1;
        }
    }
    if !unsupported.is_empty() {
        let list: Vec<String> =
            unsupported.iter().map(|(what, n)| format!("{what}: {n} dead-lettered")).collect();
        warnings.push(format!(
            "the platform does not offer what some cases need — {}; fix the platform's catalogue or cases.tables, then `gridsense cases redeliver --dead`",
            list.join("; ")
        ));
    }
    let warned = if warnings.is_empty() {
        String::new()
    } else {
        format!(" (warnings: {})", warnings.join("; "))
    };
    if problems.is_empty() {
        (StatusCode::OK, format!("ready{warned}\n")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}{warned}\n", problems.join("; ")))
            .into_response()
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let s = &state.status;
    let outbox = state.board.with_store(|st| st.outbox_counts()).await.unwrap_or_default();
    let dropped = state.board.with_store(|st| st.stat("telemetry_dropped")).await.unwrap_or(0);
    let mut out = String::new();
    metric(&mut out, "gridsense_frames_accepted_total", "counter", "Frames accepted.");
    let _ = writeln!(out, "gridsense_frames_accepted_total {}", s.frames_accepted.load(Relaxed));
    metric(&mut out, "gridsense_frames_rejected_total", "counter", "Frames rejected, by reason.");
    if let Ok(r) = s.rejects.lock() {
        for (reason, n) in r.iter() {
            let _ = writeln!(out, "gridsense_frames_rejected_total{{reason=\"{reason}\"}} {n}");
        }
    }
    metric(
        &mut out,
        "gridsense_mqtt_disconnects_total",
        "counter",
        "Broker connections lost or refused, by reason (session_taken_over: another client used this client id).",
    );
    if let Ok(d) = s.disconnects.lock() {
        for (reason, n) in d.iter() {
            let _ = writeln!(out, "gridsense_mqtt_disconnects_total{{reason=\"{reason}\"}} {n}");
        }
    }
    metric(
        &mut out,
        "gridsense_samples_future_total",
        "counter",
        "Sample times (and alarm onsets, reports) more than health.max_ahead_s ahead of the receive time, clamped to it.",
    );
    let _ = writeln!(out, "gridsense_samples_future_total {}", s.samples_future.load(Relaxed));
    metric(
        &mut out,
        "gridsense_http_connections",
        "gauge",
        "HTTP connections open now (at most http.max_connections).",
    );
    let _ = writeln!(out, "gridsense_http_connections {}", s.http_connections.load(Relaxed));
    metric(
        &mut out,
        "gridsense_mqtt_sessions_lost_total",
        "counter",
        "Reconnections on which the broker had kept no session for the gateway's client id (taken over with a clean start, or broker state lost): what was queued is gone.",
    );
    let _ = writeln!(out, "gridsense_mqtt_sessions_lost_total {}", s.sessions_lost.load(Relaxed));
    metric(
        &mut out,
        "gridsense_store_failing",
        "gauge",
        "1 while commits fail and are retried (a full disk): nothing is acknowledged meanwhile.",
    );
    let failing = s.store_error.lock().map(|e| e.is_some()).unwrap_or(false);
    let _ = writeln!(out, "gridsense_store_failing {}", u8::from(failing));
    metric(
        &mut out,
        "gridsense_store_retries_total",
        "counter",
        "Commits retried after a failure.",
    );
    let _ = writeln!(out, "gridsense_store_retries_total {}", s.store_retries.load(Relaxed));
    let accepted = s.frames_accepted.load(Relaxed);
    let rejected = s.frames_rejected.load(Relaxed);
    metric(
        &mut out,
        "gridsense_frames_in_total",
        "counter",
        "Frames received (accepted + rejected).",
    );
    let _ = writeln!(out, "gridsense_frames_in_total {}", accepted + rejected);
    metric(
        &mut out,
        "gridsense_queue_unacked",
        "gauge",
        "Messages received and not yet acknowledged.",
    );
    let _ = writeln!(out, "gridsense_queue_unacked {}", s.unacked.load(Relaxed));
    metric(
        &mut out,
        "gridsense_mqtt_publishes_received_total",
        "counter",
        "PUBLISH packets received from the broker (their difference from PUBACKs written is what the broker has in flight to the gateway).",
    );
    let _ =
        writeln!(out, "gridsense_mqtt_publishes_received_total {}", s.mqtt_received.load(Relaxed));
    metric(
        &mut out,
        "gridsense_mqtt_pubacks_sent_total",
        "counter",
        "PUBACK packets written to the broker.",
    );
    let _ = writeln!(out, "gridsense_mqtt_pubacks_sent_total {}", s.mqtt_acked.load(Relaxed));
    metric(
        &mut out,
        "gridsense_queue_capacity",
        "gauge",
        "In-flight window between the MQTT session and the pipeline.",
    );
    let _ = writeln!(out, "gridsense_queue_capacity {}", s.queue_capacity.load(Relaxed));
    metric(
        &mut out,
        "gridsense_commit_last_seconds",
        "gauge",
        "Duration of the last group commit.",
    );
    let _ = writeln!(
        out,
        "gridsense_commit_last_seconds {:.6}",
        s.last_commit_us.load(Relaxed) as f64 / 1e6
    );
    metric(&mut out, "gridsense_batches_total", "counter", "Group commits.");
    let _ = writeln!(out, "gridsense_batches_total {}", s.batches.load(Relaxed));
    metric(&mut out, "gridsense_devices", "gauge", "Registered devices by state.");
    let online = s.devices_online.load(Relaxed);
    let registered = s.devices_registered.load(Relaxed);
    let _ = writeln!(out, "gridsense_devices{{state=\"online\"}} {online}");
    let _ = writeln!(
        out,
        "gridsense_devices{{state=\"not_online\"}} {}",
        registered.saturating_sub(online)
    );
    let _ = writeln!(
        out,
        "gridsense_devices{{state=\"unassigned\"}} {}",
        s.devices_unassigned.load(Relaxed)
    );
    metric(
        &mut out,
        "gridsense_broker_connected",
        "gauge",
        "1 when every broker session this instance holds is up and subscribed.",
    );
    let _ = writeln!(out, "gridsense_broker_connected {}", u8::from(s.connected.load(Relaxed)));
    metric(
        &mut out,
        "gridsense_broker_sessions",
        "gauge",
        "Broker sessions: wanted (two per shard held, and version 1's with shard 0) and up.",
    );
    let (wanted, up) = s.session_counts();
    let _ = writeln!(out, "gridsense_broker_sessions{{state=\"wanted\"}} {wanted}");
    let _ = writeln!(out, "gridsense_broker_sessions{{state=\"up\"}} {up}");
    for (name, kind, help, value) in [
        ("gridsense_shards_held", "gauge", "Shards this instance holds.", &s.shards_held),
        (
            "gridsense_queue_overflowed",
            "gauge",
            "Messages waiting at their session for room in the pipeline's channel (as of each session's last look).",
            &s.overflowed,
        ),
        (
            "gridsense_downlinks_dropped_total",
            "counter",
            "Downlinks dropped because their session's queue was full (a configuration is sent again, a confirmation superseded, a time sync at a later status).",
            &s.downlinks_dropped,
        ),
        (
            "gridsense_cases_escalated_total",
            "counter",
            "Cases supervision escalated a level (督办): a 130 milestone or the handling deadline red, or returned too often.",
            &s.escalations,
        ),
        (
            "gridsense_shard_rebalances_total",
            "counter",
            "Shards claimed or lost by this instance (hand-overs included).",
            &s.rebalances,
        ),
        (
            "gridsense_batches_fenced_total",
            "counter",
            "Batches the store refused: a shard's lease had moved on (the instance was paused).",
            &s.fenced,
        ),
        (
            "gridsense_frames_forwarded_total",
            "counter",
            "Version 1 frames republished to their shard's topic (another instance's shard).",
            &s.frames_forwarded,
        ),
        (
            "gridsense_frames_left_for_next_owner_total",
            "counter",
            "Messages left unacknowledged for a shard's next owner (hand-over, lost lease).",
            &s.left_for_next_owner,
        ),
    ] {
        metric(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {}", value.load(Relaxed));
    }
    metric(&mut out, "gridsense_cases_filed_total", "counter", "Cases filed.");
    let _ = writeln!(out, "gridsense_cases_filed_total {}", s.cases_filed.load(Relaxed));
    metric(&mut out, "gridsense_incidents_open", "gauge", "Incidents not closed.");
    let _ = writeln!(out, "gridsense_incidents_open {}", s.incidents_open.load(Relaxed));
    metric(&mut out, "gridsense_alerts_total", "counter", "SOS alerts.");
    let _ = writeln!(out, "gridsense_alerts_total {}", s.alerts.load(Relaxed));
    metric(
        &mut out,
        "gridsense_outbox_entries",
        "gauge",
        "Outbox entries by state (pending = depth).",
    );
    for st in ["pending", "done", "dead"] {
        let _ = writeln!(
            out,
            "gridsense_outbox_entries{{state=\"{st}\"}} {}",
            outbox.get(st).copied().unwrap_or(0)
        );
    }
    metric(&mut out, "gridsense_delivery_total", "counter", "Delivery outcomes.");
    let d = &s.delivery;
    let _ = writeln!(
        out,
        "gridsense_delivery_total{{outcome=\"delivered\"}} {}",
        d.delivered.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "gridsense_delivery_total{{outcome=\"retried\"}} {}",
        d.retries.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "gridsense_delivery_total{{outcome=\"dead_letter\"}} {}",
        d.dead.load(Relaxed)
    );
    for (name, kind, help, value) in [
        (
            "gridsense_delivery_in_flight",
            "gauge",
            "Requests to the platform under way now (at most cases.concurrency per channel).",
            d.in_flight.load(Relaxed),
        ),
        (
            "gridsense_delivery_lookups_failed_total",
            "counter",
            "Open311 look-ups after an uncertain attempt that could not answer (retried).",
            d.lookups_failed.load(Relaxed),
        ),
        (
            "gridsense_delivery_resent_unverified_total",
            "counter",
            "Cases posted again although no look-up could tell whether an earlier attempt arrived (marked; possible duplicates).",
            d.resent_unverified.load(Relaxed),
        ),
        (
            "gridsense_delivery_claimed_elsewhere_total",
            "counter",
            "Due outbox entries another gateway instance's worker claimed first (a shared store): left to it.",
            d.claimed_elsewhere.load(Relaxed),
        ),
    ] {
        metric(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    metric(
        &mut out,
        "gridsense_delivery_unsupported_total",
        "counter",
        "Cases dead-lettered because the platform does not offer what they need (service code, required attribute).",
    );
    if let Ok(u) = d.unsupported.lock() {
        for (what, n) in u.iter() {
            let what = what.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "gridsense_delivery_unsupported_total{{what=\"{what}\"}} {n}");
        }
    }
    if let Ok(c) = d.catalogue.lock()
        && let Some(codes) = c.as_ref()
    {
        metric(
            &mut out,
            "gridsense_platform_services",
            "gauge",
            "Service codes the platform's services.json offers.",
        );
        let _ = writeln!(out, "gridsense_platform_services {}", codes.len());
    }
    metric(
        &mut out,
        "gridsense_case_latency_seconds",
        "histogram",
        "From the frame or timer that decided a case to the case being durable.",
    );
    let h = &s.case_latency;
    let mut cumulative = 0;
    for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
        cumulative += h.buckets.get(i).map_or(0, |b| b.load(Relaxed));
        let _ = writeln!(
            out,
            "gridsense_case_latency_seconds_bucket{{le=\"{}\"}} {cumulative}",
            *le as f64 / 1000.0
        );
    }
    let _ = writeln!(
        out,
        "gridsense_case_latency_seconds_bucket{{le=\"+Inf\"}} {}",
        h.count.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "gridsense_case_latency_seconds_sum {:.3}",
        h.sum_ms.load(Relaxed) as f64 / 1000.0
    );
    let _ = writeln!(out, "gridsense_case_latency_seconds_count {}", h.count.load(Relaxed));
    if let Some(t) = &state.sink {
        metric(
            &mut out,
            "gridsense_sink_points_total",
            "counter",
            "Telemetry points by outcome at the external sink.",
        );
        let _ = writeln!(
            out,
            "gridsense_sink_points_total{{outcome=\"written\"}} {}",
            t.written.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "gridsense_sink_points_total{{outcome=\"rejected\"}} {}",
            t.rejected.load(Relaxed)
        );
        metric(
            &mut out,
            "gridsense_sink_failures_total",
            "counter",
            "Failed telemetry writes (retried).",
        );
        let _ = writeln!(out, "gridsense_sink_failures_total {}", t.failures.load(Relaxed));
        metric(
            &mut out,
            "gridsense_sink_dropped_points_total",
            "counter",
            "Oldest telemetry points dropped because the on-disk buffer was full (never alarms or cases).",
        );
        let _ = writeln!(out, "gridsense_sink_dropped_points_total {dropped}");
        metric(
            &mut out,
            "gridsense_sink_lag_points",
            "gauge",
            "Points waiting in the on-disk buffer.",
        );
        let _ = writeln!(out, "gridsense_sink_lag_points {}", t.buffered.load(Relaxed));
        metric(
            &mut out,
            "gridsense_sink_batch_seconds",
            "gauge",
            "Duration of the last successful telemetry write.",
        );
        let _ = writeln!(
            out,
            "gridsense_sink_batch_seconds {:.6}",
            t.last_write_us.load(Relaxed) as f64 / 1e6
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

/// `GET /api/v1/reports?from=&to=&period=&by=&format=`: the assessment report (JSON by
/// default; `csv`, `html`, `table`). `by=worker` needs an operator token where tokens are
/// required: these figures set people's pay.
async fn reports(
    State(state): State<ApiState>,
    role: Option<axum::Extension<crate::http::auth::CallerRole>>,
    Query(q): Query<crate::report::ReportQuery>,
) -> Response {
    use crate::report::{Format, MakeError};
    let format = match Format::parse(q.format.as_deref().unwrap_or("json")) {
        Ok(f) => f,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_parameter", e),
    };
    let board = state.board.clone();
    let now = board.now();
    let (period, by) = match crate::report::period_of(&q, board.calendar(), now) {
        Ok(p) => p,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_parameter", e.to_string()),
    };
    if by == crate::assessment::By::Worker
        && role.is_some_and(|axum::Extension(r)| r.0 != "operator")
    {
        return api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "by=worker needs an operator token: these figures set people's pay",
        );
    }
    let areas = state.grids.as_ref().map(|g| g.areas.to_vec()).unwrap_or_default();
    let (tables, cal) = (board.shared_tables(), board.calendar().clone());
    let made = board
        .with_store(move |s| {
            match crate::report::make(&*s, &tables, &cal, areas, &period, by, now) {
                Ok(r) => Ok(Ok(r)),
                Err(MakeError::Store(e)) => Err(e),
                Err(MakeError::Bad(m)) => Ok(Err(m)),
            }
        })
        .await;
    match made {
        Ok(Ok(r)) => {
            ([(header::CONTENT_TYPE, format.content_type())], crate::report::render(&r, format))
                .into_response()
        }
        Ok(Err(m)) => api_error(StatusCode::BAD_REQUEST, "bad_parameter", m),
        Err(e) => internal(e),
    }
}

/// The routes.
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{eui}", get(device))
        .route("/api/v1/grids", get(grids))
        .route("/api/v1/map", get(map))
        .route("/api/v1/incidents", get(incidents))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/events", get(events))
        .route("/api/v1/reports", get(reports))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}
