//! The local case board over HTTP:
//! - Open311 GeoReport v2 read endpoints under `/open311/v2` (`services`, `services/{code}`,
//!   `requests` with `service_request_id`, `service_code`, `start_date`, `end_date` and
//!   `status` filters, `requests/{id}`), in JSON and XML; errors as the standard's array of
//!   `{code, description}`. A request's `service_code` is its class code; besides the standard
//!   fields each carries `device_id`, `object_code` and our grid codes, urgency and lifecycle
//!   state as extensions;
//! - the operator API under `/api/v1/cases`: lists with filters, one case with its step timers
//!   (130 milestones and handling deadline, green/yellow/red) and full trace, and lifecycle
//!   moves (`POST /api/v1/cases/{id}/transition`);
//! - `POST /api/v1/platform/callback`: status callbacks from a webhook platform, HMAC-signed.

use std::sync::{Arc, Mutex};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};

use crate::{
    calendar::Calendar,
    cases::{CaseState, CaseTables},
    status::Clock,
    store::{CaseFilter, CaseView, Operator, TraceEntry},
};

/// What the board's handlers share.
pub struct Board {
    store: Mutex<Box<dyn Operator>>,
    calendar: Calendar,
    tables: Arc<CaseTables>,
    clock: Clock,
    /// Key that signs webhook status callbacks (empty: callbacks refused).
    secret: String,
    /// The Open311 jurisdiction this board serves (`http.jurisdiction_id`; empty: none named).
    jurisdiction: String,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").finish_non_exhaustive()
    }
}

impl Board {
    /// A board on its own store connection.
    pub fn new(
        store: Box<dyn Operator>,
        tables: Arc<CaseTables>,
        clock: Clock,
        secret: String,
    ) -> Result<Self, crate::calendar::CalendarError> {
        Ok(Board {
            store: Mutex::new(store),
            calendar: Calendar::new(&tables.calendar)?,
            tables,
            clock,
            secret,
            jurisdiction: String::new(),
        })
    }

    /// Serves the Open311 jurisdiction `id` (requests naming another are refused).
    #[must_use]
    pub fn with_jurisdiction(mut self, id: String) -> Self {
        self.jurisdiction = id;
        self
    }

    /// Runs `f` on the board's store connection on a blocking thread.
    pub async fn with_store<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut dyn Operator) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let board = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = board.store.lock().map_err(|_| "store lock poisoned".to_owned())?;
            f(&mut **store).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The current time (the gateway's clock).
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// The working calendar.
    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// The case tables.
    pub fn tables(&self) -> &CaseTables {
        &self.tables
    }

    /// The case tables, shared (for work on a blocking thread).
    pub fn shared_tables(&self) -> Arc<CaseTables> {
        self.tables.clone()
    }
}

/// An error answer: Open311's array of `{code, description}` (also our API's shape).
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    /// HTTP status code (as Open311 puts it in `code`).
    pub code: u16,
    /// What was wrong.
    pub description: String,
}

fn error(status: StatusCode, description: impl Into<String>, xml: bool) -> Response {
    let e = ApiError { code: status.as_u16(), description: description.into() };
    if xml {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><errors><error><code>{}</code><description>{}</description></error></errors>",
            e.code,
            escape(&e.description)
        );
        (status, [(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
    } else {
        (status, Json(vec![e])).into_response()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An `/api/v1` error: `{"error": {"code", "message"}}` with the code for the status.
fn api(status: StatusCode, message: impl Into<String>) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_parameter",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "bad_parameter",
        StatusCode::UNPROCESSABLE_ENTITY => "bad_parameter",
        _ => "internal",
    };
    crate::http::api::api_error(status, code, message)
}

/// Splits `requests.json` into (`requests`, xml?).
fn format_of(name: &str) -> Option<(&str, bool)> {
    name.strip_suffix(".json")
        .map(|n| (n, false))
        .or_else(|| name.strip_suffix(".xml").map(|n| (n, true)))
}

/// An Open311 service.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    /// Class code.
    pub service_code: String,
    /// Name.
    pub service_name: String,
    /// Description.
    pub description: String,
    /// No attribute metadata.
    pub metadata: bool,
    /// `realtime`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Keywords.
    pub keywords: String,
    /// 部件 component or 事件 event.
    pub group: &'static str,
}

fn services(tables: &CaseTables) -> Vec<Service> {
    tables
        .classes
        .iter()
        .map(|(code, c)| Service {
            service_code: code.clone(),
            service_name: c.name.clone(),
            description: format!("{} (handling limit {})", c.name, c.limit),
            metadata: false,
            kind: "realtime",
            keywords: code.clone(),
            group: if code.starts_with('C') { "部件 component" } else { "事件 event" },
        })
        .collect()
}

fn services_xml(list: &[Service]) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><services>");
    for s in list {
        out.push_str(&format!(
            "<service><service_code>{}</service_code><service_name>{}</service_name><description>{}</description><metadata>false</metadata><type>realtime</type><keywords>{}</keywords><group>{}</group></service>",
            escape(&s.service_code), escape(&s.service_name), escape(&s.description), escape(&s.keywords), escape(s.group)
        ));
    }
    out.push_str("</services>");
    out
}

async fn get_services(State(board): State<Arc<Board>>, Path(name): Path<String>) -> Response {
    let Some(("services", xml)) = format_of(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no such resource {name}"), false);
    };
    let list = services(&board.tables);
    if xml {
        ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], services_xml(&list)).into_response()
    } else {
        Json(list).into_response()
    }
}

async fn get_service(State(board): State<Arc<Board>>, Path(name): Path<String>) -> Response {
    let Some((code, xml)) = format_of(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no such resource {name}"), false);
    };
    if !board.tables.classes.contains_key(code) {
        return error(StatusCode::NOT_FOUND, format!("service_code {code} not found"), xml);
    }
    // No attribute metadata: the definition has no attributes.
    if xml {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><service_definition><service_code>{}</service_code><attributes></attributes></service_definition>",
            escape(code)
        );
        ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
    } else {
        Json(serde_json::json!({ "service_code": code, "attributes": [] })).into_response()
    }
}

/// A case as an Open311 service request, with our extensions.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceRequest {
    /// Id.
    pub service_request_id: String,
    /// `open` or `closed`.
    pub status: &'static str,
    /// The lifecycle state in words.
    pub status_notes: String,
    /// Class name.
    pub service_name: String,
    /// Class code.
    pub service_code: String,
    /// Description.
    pub description: String,
    /// Who handles it (the grid).
    pub agency_responsible: String,
    /// Notice.
    pub service_notice: String,
    /// Detected, ISO 8601.
    pub requested_datetime: String,
    /// Last change.
    pub updated_datetime: String,
    /// Handling deadline.
    pub expected_datetime: String,
    /// Address.
    pub address: String,
    /// Address id (the unit grid code, where known).
    pub address_id: String,
    /// Postal code (not used).
    pub zipcode: String,
    /// Latitude, WGS84.
    pub lat: f64,
    /// Longitude, WGS84.
    pub long: f64,
    /// No media.
    pub media_url: String,
    /// Extension: device EUI.
    pub device_id: String,
    /// Extension: component object code.
    pub object_code: String,
    /// Extension: coordinate system.
    pub crs: String,
    /// Extension: responsibility grid.
    pub grid_code: String,
    /// Extension: community.
    pub community_code: String,
    /// Extension: street.
    pub street_code: String,
    /// Extension: urgency.
    pub urgency: String,
    /// Extension: lifecycle state.
    pub state: String,
    /// Extension: source.
    pub source: String,
}

fn request_of(c: &CaseView, cal: &Calendar) -> ServiceRequest {
    let state = CaseState::parse(&c.state).unwrap_or(CaseState::Collected);
    ServiceRequest {
        service_request_id: c.id.to_string(),
        status: state.open311_status(),
        status_notes: format!("{state}"),
        service_name: c.class_name.clone(),
        service_code: c.class_code.clone(),
        description: c.description.clone(),
        agency_responsible: c.grid_code.clone().unwrap_or_default(),
        service_notice: format!("handling limit {}", c.handling_limit),
        requested_datetime: cal.iso(c.detected_ms),
        updated_datetime: cal.iso(c.updated_ms),
        expected_datetime: cal.iso(c.handling_due_ms),
        address: c.address.clone(),
        address_id: c.unit_grid_code.clone().unwrap_or_default(),
        zipcode: String::new(),
        lat: c.lat,
        long: c.lon,
        media_url: String::new(),
        device_id: c.device_id.clone(),
        object_code: c.object_code.clone().unwrap_or_default(),
        crs: c.crs.clone(),
        grid_code: c.grid_code.clone().unwrap_or_default(),
        community_code: c.community_code.clone().unwrap_or_default(),
        street_code: c.street_code.clone().unwrap_or_default(),
        urgency: c.urgency.clone(),
        state: c.state.clone(),
        source: c.source.clone(),
    }
}

/// The XML of a request list: the same fields as the JSON, from the same serialisation.
fn requests_xml(list: &[ServiceRequest]) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><service_requests>");
    for r in list {
        out.push_str("<request>");
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(r) {
            for (k, v) in fields {
                let text = match v {
                    serde_json::Value::String(t) => t,
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                };
                out.push_str(&format!("<{k}>{}</{k}>", escape(&text)));
            }
        }
        out.push_str("</request>");
    }
    out.push_str("</service_requests>");
    out
}

/// Query of `GET /open311/v2/requests.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RequestsQuery {
    /// Comma-separated ids.
    pub service_request_id: Option<String>,
    /// Comma-separated class codes.
    pub service_code: Option<String>,
    /// W3C date-time.
    pub start_date: Option<String>,
    /// W3C date-time.
    pub end_date: Option<String>,
    /// `open`, `closed`, or both comma-separated.
    pub status: Option<String>,
    /// Ours: lifecycle states, comma-separated.
    pub state: Option<String>,
    /// Ours: an area code prefix (district, street, community or grid).
    pub area: Option<String>,
    /// Ours: most results (default and maximum 1000).
    pub limit: Option<u32>,
    /// Open311 jurisdiction (accepted, one jurisdiction here).
    pub jurisdiction_id: Option<String>,
}

fn split(v: Option<&String>) -> impl Iterator<Item = &str> {
    v.into_iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty())
}

/// A W3C date-time (the profile of ISO 8601 in the W3C's NOTE-datetime, which Open311 cites):
/// `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, or a date with `Thh:mm`, `Thh:mm:ss` or `Thh:mm:ss.s…` and
/// a zone (`Z` or `±hh:mm`; a time without one is read at the board's `offset`). A form without
/// a time denotes its whole year, month or day at `offset`: as a start its first instant, as an
/// end (`end`) its last millisecond. Unix ms.
pub fn parse_w3c(s: &str, end: bool, offset: chrono::FixedOffset) -> Result<i64, String> {
    use chrono::{NaiveDate, NaiveTime, TimeZone};
    let bad =
        || format!("{s:?} is not a W3C date-time such as 2026-12-01T10:45+08:00 or 2026-12-01");
    let at = |date: NaiveDate, time: NaiveTime, zone: chrono::FixedOffset| {
        zone.from_local_datetime(&date.and_time(time)).single().map(|d| d.timestamp_millis())
    };
    if let Some((date, time)) = s.split_once('T') {
        let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|_| bad())?;
        let (clock, zone) = if let Some(c) =
            time.strip_suffix('Z').or_else(|| time.strip_suffix('z'))
        {
            (c, chrono::FixedOffset::east_opt(0).ok_or_else(bad)?)
        } else if let Some(i) = time.rfind(['+', '-']) {
            let (c, z) = time.split_at(i);
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (h, m) = z.get(1..).and_then(|hm| hm.split_once(':')).ok_or_else(bad)?;
            let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h.to_string().len() > 2 || !(0..24).contains(&h) || !(0..60).contains(&m) {
                return Err(bad());
            }
            (c, chrono::FixedOffset::east_opt(sign * (h * 3_600 + m * 60)).ok_or_else(bad)?)
        } else {
            (time, offset)
        };
        let time = ["%H:%M", "%H:%M:%S", "%H:%M:%S%.f"]
            .iter()
            .find_map(|f| NaiveTime::parse_from_str(clock, f).ok())
            .ok_or_else(bad)?;
        return at(date, time, zone).ok_or_else(bad);
    }
    let parts: Vec<&str> = s.split('-').collect();
    let number = |p: &str, len: usize| -> Result<u32, String> {
        if p.len() == len && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let year = i32::try_from(number(parts.first().ok_or_else(bad)?, 4)?).map_err(|_| bad())?;
    let (first, next) = match parts.as_slice() {
        [_] => (NaiveDate::from_ymd_opt(year, 1, 1), NaiveDate::from_ymd_opt(year + 1, 1, 1)),
        [_, m] => {
            let m = number(m, 2)?;
            let next = if m == 12 { (year + 1, 1) } else { (year, m + 1) };
            (NaiveDate::from_ymd_opt(year, m, 1), NaiveDate::from_ymd_opt(next.0, next.1, 1))
        }
        [_, m, d] => {
            let day = NaiveDate::from_ymd_opt(year, number(m, 2)?, number(d, 2)?);
            (day, day.and_then(|d| d.succ_opt()))
        }
        _ => (None, None),
    };
    let (Some(first), Some(next)) = (first, next) else { return Err(bad()) };
    let day = if end { next } else { first };
    let ms = at(day, NaiveTime::MIN, offset).ok_or_else(bad)?;
    Ok(if end { ms - 1 } else { ms })
}

/// The span Open311 allows a request search (and its default: the last 90 days).
pub const OPEN311_SPAN_MS: i64 = crate::platform::GEOREPORT_SPAN_MS;

/// An Open311 search: `service_request_id` overrides every other parameter (GeoReport v2);
/// otherwise the filters, over `start_date`..`end_date` — by default the 90 days up to `now`,
/// and never more than 90 days.
pub fn open311_filter(
    q: &RequestsQuery,
    now_ms: i64,
    offset: chrono::FixedOffset,
) -> Result<CaseFilter, String> {
    let mut f =
        CaseFilter { limit: q.limit.unwrap_or(1_000).clamp(1, 1_000), ..CaseFilter::default() };
    for id in split(q.service_request_id.as_ref()) {
        f.ids.push(
            id.parse().map_err(|_| format!("service_request_id: {id:?} is not a request id"))?,
        );
    }
    if !f.ids.is_empty() {
        return Ok(f);
    }
    let mut f = filter_of(q, offset)?;
    let (start, end) = match (f.start_ms, f.end_ms) {
        (None, None) => (now_ms - OPEN311_SPAN_MS, now_ms),
        (Some(s), None) => (s, now_ms.min(s.saturating_add(OPEN311_SPAN_MS))),
        (None, Some(e)) => (e.saturating_sub(OPEN311_SPAN_MS), e),
        (Some(s), Some(e)) => (s, e),
    };
    if end < start {
        return Err("end_date: before start_date".into());
    }
    if end - start > OPEN311_SPAN_MS {
        return Err("start_date, end_date: a search may not span more than 90 days".into());
    }
    (f.start_ms, f.end_ms) = (Some(start), Some(end));
    Ok(f)
}

/// Parses the query into a filter; the error names the parameter. Dates are W3C date-times
/// ([`parse_w3c`]) read at `offset` where they carry no zone.
pub fn filter_of(q: &RequestsQuery, offset: chrono::FixedOffset) -> Result<CaseFilter, String> {
    let mut f =
        CaseFilter { limit: q.limit.unwrap_or(1_000).clamp(1, 1_000), ..CaseFilter::default() };
    for id in split(q.service_request_id.as_ref()) {
        f.ids.push(
            id.parse().map_err(|_| format!("service_request_id: {id:?} is not a request id"))?,
        );
    }
    for code in split(q.service_code.as_ref()) {
        if !crate::cases::is_class_code(code) {
            return Err(format!("service_code: {code:?} is not a class code such as C0102"));
        }
        f.class_codes.push(code.to_owned());
    }
    let date = |name: &str, v: &Option<String>, end: bool| -> Result<Option<i64>, String> {
        v.as_deref()
            .map(|s| parse_w3c(s, end, offset).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    f.start_ms = date("start_date", &q.start_date, false)?;
    f.end_ms = date("end_date", &q.end_date, true)?;
    let mut states = Vec::new();
    for s in split(q.status.as_ref()) {
        match s {
            "open" => states.extend(CaseState::ALL.into_iter().filter(|c| !c.is_final())),
            "closed" => states.extend(CaseState::ALL.into_iter().filter(|c| c.is_final())),
            other => return Err(format!("status: {other:?} is not open or closed")),
        }
    }
    for s in split(q.state.as_ref()) {
        states.push(
            CaseState::parse(s).ok_or_else(|| format!("state: {s:?} is not a lifecycle state"))?,
        );
    }
    states.sort_by_key(|s| s.as_str());
    states.dedup();
    f.states = states;
    if let Some(a) = &q.area {
        if a.is_empty() || !a.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("area: {a:?} is not an area code (digits)"));
        }
        f.area = Some(a.clone());
    }
    Ok(f)
}

async fn get_requests(
    State(board): State<Arc<Board>>,
    Path(name): Path<String>,
    query: Result<Query<RequestsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(("requests", xml)) = format_of(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no such resource {name}"), false);
    };
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text(), xml),
    };
    let f = match open311_filter(&q, (board.clock)(), board.calendar.offset()) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e, xml),
    };
    match board.with_store(move |s| s.cases(&f)).await {
        Ok(cases) => {
            let list: Vec<_> = cases.iter().map(|c| request_of(c, &board.calendar)).collect();
            if xml {
                ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], requests_xml(&list))
                    .into_response()
            } else {
                Json(list).into_response()
            }
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e, xml),
    }
}

async fn get_request(State(board): State<Arc<Board>>, Path(name): Path<String>) -> Response {
    let Some((id, xml)) = format_of(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no such resource {name}"), false);
    };
    let Ok(id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("service_request_id: {id:?} is not a request id"),
            xml,
        );
    };
    match board.with_store(move |s| s.case(id)).await {
        Ok(Some(c)) => {
            let list = vec![request_of(&c, &board.calendar)];
            if xml {
                ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], requests_xml(&list))
                    .into_response()
            } else {
                Json(list).into_response()
            }
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("service_request_id {id} not found"), xml),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e, xml),
    }
}

pub use crate::cases::lifecycle::Timer;

/// A case's step timers at `now` ([`crate::cases::lifecycle::timers`]).
pub fn timers(c: &CaseView, tables: &CaseTables, cal: &Calendar, now: i64) -> Vec<Timer> {
    crate::cases::lifecycle::timers(&c.clocks(), &tables.milestones, cal, now)
}

/// A case with its timers, for lists.
#[derive(Debug, Clone, Serialize)]
pub struct CaseSummary {
    /// The case.
    #[serde(flatten)]
    pub case: CaseView,
    /// Step timers.
    pub timers: Vec<Timer>,
}

/// A case with its timers, cluster and trace.
#[derive(Debug, Clone, Serialize)]
pub struct CaseDetail {
    /// The case.
    #[serde(flatten)]
    pub case: CaseView,
    /// Step timers.
    pub timers: Vec<Timer>,
    /// Related incidents (same grid, condition and window): id, device, condition, severity,
    /// state, case.
    pub related: Vec<crate::store::ClusterMember>,
    /// Frames → evidence → incident → case → states.
    pub trace: Vec<TraceEntry>,
}

async fn list_cases(
    State(board): State<Arc<Board>>,
    query: Result<Query<RequestsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return api(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let f = match filter_of(&q, board.calendar.offset()) {
        Ok(f) => f,
        Err(e) => return api(StatusCode::BAD_REQUEST, e),
    };
    let now = (board.clock)();
    match board.with_store(move |s| s.cases(&f)).await {
        Ok(cases) => Json(
            cases
                .into_iter()
                .map(|c| CaseSummary {
                    timers: timers(&c, &board.tables, &board.calendar, now),
                    case: c,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => api(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn get_case(State(board): State<Arc<Board>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return api(StatusCode::BAD_REQUEST, format!("id: {id:?} is not a case id"));
    };
    let now = (board.clock)();
    let found = board
        .with_store(move |s| {
            let Some(case) = s.case(id)? else { return Ok(None) };
            let cluster = match case.incident_id {
                Some(incident) => s.incident_cluster(incident)?,
                None => None,
            };
            let related = match cluster {
                Some(c) => s.cluster(c)?,
                None => Vec::new(),
            };
            Ok(Some((case, related, s.trace(id)?)))
        })
        .await;
    match found {
        Ok(Some((case, related, trace))) => Json(CaseDetail {
            timers: timers(&case, &board.tables, &board.calendar, now),
            case,
            related,
            trace,
        })
        .into_response(),
        Ok(None) => api(StatusCode::NOT_FOUND, format!("case {id} not found")),
        Err(e) => api(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Body of `POST /api/v1/cases/{id}/transition`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionBody {
    /// The state to move to.
    pub to: String,
    /// Who (operator name). With tokens the trace names the token instead, and this only
    /// when it differs ("token wall-screen for zhang"); without tokens it is required.
    #[serde(default)]
    pub actor: String,
    /// Why.
    #[serde(default)]
    pub note: String,
}

/// Who the trace records for a request: the authenticated token, with the name the body
/// gives when it differs; without tokens, the name the body gives (`None` when it gives none).
fn actor_of(caller: Option<&crate::http::auth::Caller>, claimed: &str) -> Option<String> {
    let claimed = claimed.trim();
    match caller {
        Some(crate::http::auth::Caller(token)) if claimed.is_empty() || claimed == token => {
            Some(format!("operator:{token}"))
        }
        Some(crate::http::auth::Caller(token)) => Some(format!("operator:{token} for {claimed}")),
        None if claimed.is_empty() => None,
        None => Some(format!("operator:{claimed}")),
    }
}

async fn move_case(
    State(board): State<Arc<Board>>,
    Path(id): Path<String>,
    caller: Option<axum::Extension<crate::http::auth::Caller>>,
    body: Result<Json<TransitionBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return api(StatusCode::BAD_REQUEST, format!("id: {id:?} is not a case id"));
    };
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return api(e.status(), e.body_text()),
    };
    let Some(to) = CaseState::parse(&body.to) else {
        return api(StatusCode::BAD_REQUEST, format!("to: {:?} is not a lifecycle state", body.to));
    };
    let Some(actor) = actor_of(caller.as_deref(), &body.actor) else {
        return api(StatusCode::BAD_REQUEST, "actor: who moves the case must be named");
    };
    apply_transition(&board, id, to, actor, body.note).await
}

async fn apply_transition(
    board: &Arc<Board>,
    id: i64,
    to: CaseState,
    actor: String,
    note: String,
) -> Response {
    let now = (board.clock)();
    let cal = board.calendar.clone();
    let r = board.with_store(move |s| s.transition(id, to, &actor, &note, now, &cal)).await;
    match r {
        Ok(Ok(state)) => {
            Json(serde_json::json!({ "id": id, "state": state.as_str() })).into_response()
        }
        Ok(Err(crate::store::TransitionError::NotFound(_))) => {
            api(StatusCode::NOT_FOUND, format!("case {id} not found"))
        }
        Ok(Err(e)) => api(StatusCode::CONFLICT, e.to_string()),
        Err(e) => api(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// A platform's status callback (webhook platforms).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Callback {
    /// Our case id (from the payload we sent).
    pub case_id: i64,
    /// The lifecycle state the platform reached.
    pub state: String,
    /// The platform's note.
    #[serde(default)]
    pub note: String,
}

/// Seconds a callback's signature timestamp may differ from now.
pub const CALLBACK_TOLERANCE_S: i64 = 300;

async fn callback(
    State(board): State<Arc<Board>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        // Too large (413) and the like, in the API's error envelope.
        Err(e) => return api(e.status(), e.body_text()),
    };
    if board.secret.is_empty() {
        return api(StatusCode::NOT_FOUND, "callbacks are not configured (cases.secret)");
    }
    let Some(sig) = headers.get("x-gridsense-signature").and_then(|v| v.to_str().ok()) else {
        return api(StatusCode::UNAUTHORIZED, "x-gridsense-signature header missing");
    };
    let now_s = (board.clock)() / 1000;
    if let Err(why) =
        crate::platform::verify_signature(&board.secret, sig, &body, now_s, CALLBACK_TOLERANCE_S)
    {
        return api(StatusCode::UNAUTHORIZED, format!("signature: {why}"));
    }
    let cb: Callback = match serde_json::from_slice(&body) {
        Ok(cb) => cb,
        Err(e) => return api(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let Some(to) = CaseState::parse(&cb.state) else {
        return api(
            StatusCode::BAD_REQUEST,
            format!("state: {:?} is not a lifecycle state", cb.state),
        );
    };
    let now = (board.clock)();
    let cal = board.calendar.clone();
    let signature = sig.trim().to_owned();
    let (case_id, note) = (cb.case_id, cb.note);
    let r = board
        .with_store(move |s| {
            // Remembered a little longer than a signature is valid on either side of now.
            s.platform_callback(
                &signature,
                3 * CALLBACK_TOLERANCE_S * 1000,
                case_id,
                to,
                &note,
                now,
                &cal,
            )
        })
        .await;
    use crate::store::CallbackOutcome as O;
    match r {
        Ok(Ok(O::Moved | O::Unchanged)) => {
            Json(serde_json::json!({ "id": case_id, "state": to.as_str() })).into_response()
        }
        Ok(Ok(O::Replayed)) => api(
            StatusCode::CONFLICT,
            "this signed callback was taken before (a replay): sign each callback afresh",
        ),
        Ok(Err(crate::store::TransitionError::NotFound(_))) => {
            api(StatusCode::NOT_FOUND, format!("case {case_id} not found"))
        }
        Ok(Err(e)) => api(StatusCode::CONFLICT, e.to_string()),
        Err(e) => api(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Query of `GET /api/v1/outbox`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxQuery {
    /// `pending`, `done` or `dead`.
    pub state: Option<String>,
    /// One case's entries.
    pub case: Option<i64>,
    /// Most rows (default 100, at most 1000).
    pub limit: Option<u32>,
}

async fn list_outbox(
    State(board): State<Arc<Board>>,
    query: Result<Query<OutboxQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return api(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if let Some(s) = q.state.as_deref()
        && !matches!(s, "pending" | "done" | "dead")
    {
        return api(StatusCode::BAD_REQUEST, format!("state: {s:?} is not pending, done or dead"));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
    match board.with_store(move |s| s.outbox(q.case, q.state.as_deref(), limit)).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => api(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /api/v1/outbox/{id}/retry` (operators): a dead-lettered entry back in the queue.
async fn retry_outbox(
    State(board): State<Arc<Board>>,
    Path(id): Path<String>,
    caller: Option<axum::Extension<crate::http::auth::Caller>>,
) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return api(StatusCode::BAD_REQUEST, format!("id: {id:?} is not an outbox entry id"));
    };
    let actor = actor_of(caller.as_deref(), "").unwrap_or_else(|| "operator:api".into());
    let now = (board.clock)();
    let found = board
        .with_store(move |s| {
            let requeued = s.outbox_retry(Some(id), &actor, now)?;
            let exists = s.outbox_state(id)?.is_some();
            Ok((requeued, exists))
        })
        .await;
    match found {
        Ok((requeued, _)) if !requeued.is_empty() => {
            Json(serde_json::json!({ "id": id, "state": "pending" })).into_response()
        }
        Ok((_, true)) => {
            api(StatusCode::CONFLICT, format!("outbox entry {id} is not dead-lettered"))
        }
        Ok((_, false)) => api(StatusCode::NOT_FOUND, format!("outbox entry {id} not found")),
        Err(e) => api(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Query of `GET /api/v1/patrols`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PatrolQuery {
    /// Local date `YYYY-MM-DD` (default: today).
    pub day: Option<String>,
}

/// Patrol coverage of one grid on one day.
#[derive(Debug, Clone, Serialize)]
pub struct Coverage {
    /// Grid (none: check-ins outside every grid).
    pub grid_code: Option<String>,
    /// Check-ins.
    pub checkins: u64,
    /// Distinct workers (beacons).
    pub workers: u64,
}

async fn patrols(
    State(board): State<Arc<Board>>,
    query: Result<Query<PatrolQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return api(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let day = match q.day {
        Some(d) => match chrono::NaiveDate::parse_from_str(&d, "%Y-%m-%d") {
            Ok(_) => d,
            Err(e) => {
                return api(StatusCode::BAD_REQUEST, format!("day: {d:?} is not YYYY-MM-DD ({e})"));
            }
        },
        None => board.calendar.local((board.clock)()).format("%Y-%m-%d").to_string(),
    };
    match board.with_store(move |s| s.patrol_coverage(&day)).await {
        Ok(rows) => Json(
            rows.into_iter()
                .map(|(grid_code, checkins, workers)| Coverage { grid_code, checkins, workers })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => api(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Open311's error for anything under `/open311/v2` that is not one of its resources.
async fn open311_not_found(uri: axum::http::Uri) -> Response {
    let path = uri.path();
    error(StatusCode::NOT_FOUND, format!("no such resource {path}"), path.ends_with(".xml"))
}

/// Open311's error for a method the resource does not take (everything here is read-only).
async fn open311_method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {path}: this board's Open311 endpoints are read-only (GET)"
        ),
        path.ends_with(".xml"),
    );
    r.headers_mut().insert(header::ALLOW, axum::http::HeaderValue::from_static("GET, HEAD"));
    r
}

/// Refuses a `jurisdiction_id` this board does not serve (an empty one is the same as none).
async fn jurisdiction(
    State(board): State<Arc<Board>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let asked = req.uri().query().and_then(|q| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .ok()?
            .into_iter()
            .find_map(|(k, v)| (k == "jurisdiction_id").then_some(v))
    });
    if let Some(asked) = asked.filter(|a| !a.is_empty() && *a != board.jurisdiction) {
        let serves = if board.jurisdiction.is_empty() {
            "this board names no jurisdiction: leave jurisdiction_id out".to_owned()
        } else {
            format!("this board serves jurisdiction_id {:?}", board.jurisdiction)
        };
        return error(
            StatusCode::NOT_FOUND,
            format!("jurisdiction_id {asked:?} is not served here ({serves})"),
            req.uri().path().ends_with(".xml"),
        );
    }
    next.run(req).await
}

/// The Open311 GeoReport v2 read endpoints, under `/open311/v2`.
fn open311_routes(board: Arc<Board>) -> Router<Arc<Board>> {
    Router::new()
        .route("/{name}", get(get_services_or_requests))
        .route("/services/{name}", get(get_service))
        .route("/requests/{name}", get(get_request))
        .fallback(open311_not_found)
        .method_not_allowed_fallback(open311_method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(board, jurisdiction))
}

/// The board's routes.
pub fn routes(board: Arc<Board>) -> Router {
    Router::new()
        .nest("/open311/v2", open311_routes(board.clone()))
        .route("/api/v1/cases", get(list_cases))
        .route("/api/v1/cases/{id}", get(get_case))
        .route("/api/v1/cases/{id}/transition", post(move_case))
        .route("/api/v1/platform/callback", post(callback))
        .route("/api/v1/outbox", get(list_outbox))
        .route("/api/v1/outbox/{id}/retry", post(retry_outbox))
        .route("/api/v1/patrols", get(patrols))
        .with_state(board)
}

async fn get_services_or_requests(
    state: State<Arc<Board>>,
    Path(name): Path<String>,
    query: Result<Query<RequestsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if name.starts_with("services") {
        get_services(state, Path(name)).await
    } else {
        get_requests(state, Path(name), query).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::{Colour, Limit};

    fn case(detected_ms: i64, limit: &str, due: i64, deploy: i64, feedback: i64) -> CaseView {
        let mut c = CaseView::example(detected_ms);
        c.handling_limit = limit.into();
        c.handling_due_ms = due;
        c.deploy_due_ms = deploy;
        c.feedback_due_ms = feedback;
        c
    }

    /// The step timers in virtual time: a sewage cover (2 h) detected Thursday 10:00 +08:00;
    /// 130 deploy by Friday 10:00, feedback by Tuesday 10:00 (working days).
    #[test]
    fn step_timers_turn_yellow_at_80_percent_and_red_past_the_limit() {
        let tables = CaseTables::default();
        let cal = Calendar::new(&tables.calendar).unwrap();
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-26T10:00:00+08:00")
            .unwrap()
            .timestamp_millis();
        let c = case(
            t0,
            "2h",
            cal.deadline(t0, Limit::Hours(2)),
            cal.deadline(t0, tables.milestones.deploy),
            cal.deadline(t0, tables.milestones.feedback),
        );
        let colours = |now: i64| -> Vec<(&'static str, Colour)> {
            timers(&c, &tables, &cal, now).into_iter().map(|t| (t.step, t.colour)).collect()
        };
        let min = 60_000;
        assert_eq!(
            colours(t0 + 90 * min),
            [("deploy", Colour::Green), ("feedback", Colour::Green), ("handling", Colour::Green)]
        );
        assert_eq!(colours(t0 + 100 * min)[2], ("handling", Colour::Yellow));
        assert_eq!(colours(t0 + 121 * min)[2], ("handling", Colour::Red));
        // Deploy is one working day, measured in working time: Thursday 10:00–12:00 and
        // 13:30–17:30 plus Friday 08:30–10:00 is 7.5 h, so 80% falls at Friday's opening; at
        // 09:30 it is 87% (yellow), past 10:00 red.
        let friday_0930 = chrono::DateTime::parse_from_rfc3339("2026-11-27T09:30:00+08:00")
            .unwrap()
            .timestamp_millis();
        let friday_1001 = friday_0930 + 31 * min;
        assert_eq!(colours(friday_0930)[0], ("deploy", Colour::Yellow));
        assert_eq!(colours(friday_1001)[0], ("deploy", Colour::Red));
        // Done steps freeze their colour at completion.
        let mut done = c.clone();
        done.dispatched_ms = Some(t0 + 30 * min);
        done.handled_ms = Some(t0 + 60 * min);
        let t = timers(&done, &tables, &cal, friday_1001);
        assert_eq!((t[0].colour, t[2].colour), (Colour::Green, Colour::Green));
        assert!(t[0].done.is_some());
    }

    fn plus8() -> chrono::FixedOffset {
        chrono::FixedOffset::east_opt(8 * 3_600).unwrap()
    }

    fn ms(rfc3339: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
    }

    #[test]
    fn every_w3c_date_time_form_is_read() {
        let p = |s: &str, end: bool| parse_w3c(s, end, plus8());
        assert_eq!(p("2026-12-01T10:45+08:00", false), Ok(ms("2026-12-01T10:45:00+08:00")));
        assert_eq!(p("2026-12-01T02:45Z", false), Ok(ms("2026-12-01T10:45:00+08:00")));
        assert_eq!(p("2026-12-01T10:45:30+08:00", false), Ok(ms("2026-12-01T10:45:30+08:00")));
        assert_eq!(
            p("2026-12-01T10:45:30.25-05:00", false),
            Ok(ms("2026-12-01T10:45:30.25-05:00"))
        );
        assert_eq!(
            p("2026-12-01T10:45", false),
            Ok(ms("2026-12-01T10:45:00+08:00")),
            "no zone: +08:00"
        );
        // Dates denote their whole period: a start its first instant, an end its last.
        assert_eq!(p("2026-12-01", false), Ok(ms("2026-12-01T00:00:00+08:00")));
        assert_eq!(p("2026-12-01", true), Ok(ms("2026-12-02T00:00:00+08:00") - 1));
        assert_eq!(p("2026-12", false), Ok(ms("2026-12-01T00:00:00+08:00")));
        assert_eq!(p("2026-12", true), Ok(ms("2027-01-01T00:00:00+08:00") - 1));
        assert_eq!(p("2026", true), Ok(ms("2027-01-01T00:00:00+08:00") - 1));
        for bad in
            ["2026-13-01", "2026-1-01", "26", "2026-12-01T25:00Z", "2026-12-01T10:45+8", "now", ""]
        {
            assert!(p(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_open311_search_spans_the_last_90_days_and_ids_override_everything() {
        let now = ms("2026-12-01T12:00:00+08:00");
        let f = open311_filter(&RequestsQuery::default(), now, plus8()).unwrap();
        assert_eq!((f.start_ms, f.end_ms), (Some(now - OPEN311_SPAN_MS), Some(now)));
        let q = RequestsQuery {
            service_request_id: Some("7".into()),
            status: Some("closed".into()),
            start_date: Some("garbage".into()),
            ..RequestsQuery::default()
        };
        let f = open311_filter(&q, now, plus8()).unwrap();
        assert_eq!(f.ids, [7]);
        assert!(f.states.is_empty() && f.start_ms.is_none() && f.end_ms.is_none());
        let too_long = RequestsQuery {
            start_date: Some("2026-01-01".into()),
            end_date: Some("2026-12-01".into()),
            ..RequestsQuery::default()
        };
        assert!(open311_filter(&too_long, now, plus8()).unwrap_err().contains("90 days"));
    }

    #[test]
    fn bad_query_parameters_name_the_parameter() {
        let q = |f: fn(&mut RequestsQuery)| {
            let mut q = RequestsQuery::default();
            f(&mut q);
            filter_of(&q, plus8()).unwrap_err()
        };
        assert!(q(|q| q.service_request_id = Some("1,x".into())).starts_with("service_request_id"));
        assert!(q(|q| q.service_code = Some("C01".into())).starts_with("service_code"));
        assert!(q(|q| q.start_date = Some("2026-13-01".into())).starts_with("start_date"));
        assert!(q(|q| q.end_date = Some("now".into())).starts_with("end_date"));
        assert!(q(|q| q.status = Some("pending".into())).starts_with("status"));
        assert!(q(|q| q.state = Some("done".into())).starts_with("state"));
        assert!(q(|q| q.area = Some("21a".into())).starts_with("area"));
        let ok = filter_of(
            &RequestsQuery {
                status: Some("open".into()),
                service_code: Some("C0102,E0406".into()),
                start_date: Some("2026-11-26T00:00:00+08:00".into()),
                ..RequestsQuery::default()
            },
            plus8(),
        )
        .unwrap();
        assert_eq!(ok.class_codes.len(), 2);
        assert_eq!(ok.states.len(), 8, "every state but closed and voided");
    }
}
