//! A stand-in governance platform for delivery tests: an Open311 GeoReport v2 endpoint
//! (`POST /requests.json` with an api key, `GET /requests.json` searching by `service_code`,
//! `start_date` and `end_date` against each request's `requested_datetime` on the platform's
//! own clock, `GET /tokens/{t}.json`, `GET /services.json` and service definitions) and a
//! webhook receiver that checks signatures. Faults on demand: answer 503, or take the request
//! and answer too late (the caller times out not knowing it arrived); no search at all; a
//! clock off by some seconds; a catalogue without some services.

#![allow(dead_code, clippy::unwrap_used, clippy::indexing_slicing)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};

/// What the platform does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Answer 503 without taking the request.
    Unavailable,
    /// Take the request, then answer only after this long.
    Slow(Duration),
}

/// One stored Open311 request.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: String,
    pub form: HashMap<String, String>,
    pub status: String,
    /// On the platform's clock, Unix ms.
    pub requested_ms: i64,
}

/// One webhook delivery.
#[derive(Debug, Clone)]
pub struct Hook {
    pub idempotency_key: String,
    pub body: serde_json::Value,
    pub received: std::time::Instant,
}

/// How `GET /requests.json` without `service_request_id` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Searches.
    Normal,
    /// A platform without search: 404 with an Open311 error.
    Unsupported,
}

/// One service of the catalogue: code, and the attribute definitions (code, required) when it
/// has metadata.
#[derive(Debug, Clone)]
pub struct Service {
    pub code: String,
    pub attributes: Option<Vec<(String, bool)>>,
}

#[derive(Debug)]
pub struct Inner {
    pub fault: Fault,
    /// Faults for the next N POSTs, then `fault` again.
    pub next: Vec<Fault>,
    pub requests: Vec<Stored>,
    pub posts: u32,
    pub hooks: Vec<Hook>,
    pub bad_signatures: u32,
    pub tokens: bool,
    pub search: Search,
    /// The platform's clock minus ours, ms (negative: behind).
    pub skew_ms: i64,
    /// `services.json`; `None`: 404.
    pub services: Option<Vec<Service>>,
    /// Searches answered.
    pub searches: u32,
    /// POSTs being answered now, and the most at once.
    pub posting: u32,
    pub most_posting: u32,
}

/// A running stand-in platform.
#[derive(Clone)]
pub struct Platform {
    pub addr: SocketAddr,
    pub inner: Arc<Mutex<Inner>>,
}

pub const API_KEY: &str = "test-key";
pub const SECRET: &str = "test-secret";

impl Platform {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            fault: Fault::None,
            next: Vec::new(),
            requests: Vec::new(),
            posts: 0,
            hooks: Vec::new(),
            bad_signatures: 0,
            tokens: false,
            search: Search::Normal,
            skew_ms: 0,
            services: None,
            searches: 0,
            posting: 0,
            most_posting: 0,
        }));
        let app = Router::new()
            .route("/open311/requests.json", post(create).get(list))
            .route("/open311/tokens/{token}", get(token))
            .route("/open311/services.json", get(services))
            .route("/open311/services/{code}", get(definition))
            .route("/hook", post(hook))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Platform { addr, inner }
    }

    pub fn open311_url(&self) -> String {
        format!("http://{}/open311", self.addr)
    }

    pub fn hook_url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        self.inner.lock().unwrap().fault = fault;
    }

    pub fn then(&self, faults: &[Fault]) {
        self.inner.lock().unwrap().next = faults.to_vec();
    }

    pub fn requests(&self) -> Vec<Stored> {
        self.inner.lock().unwrap().requests.clone()
    }

    pub fn hooks(&self) -> Vec<Hook> {
        self.inner.lock().unwrap().hooks.clone()
    }

    pub fn close(&self, id: &str) {
        for r in &mut self.inner.lock().unwrap().requests {
            if r.id == id {
                r.status = "closed".into();
            }
        }
    }
}

fn next_fault(inner: &mut Inner) -> Fault {
    inner.posts += 1;
    if inner.next.is_empty() { inner.fault } else { inner.next.remove(0) }
}

async fn create(State(inner): State<Arc<Mutex<Inner>>>, body: Bytes) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let (fault, answer) = {
        let mut s = inner.lock().unwrap();
        let fault = next_fault(&mut s);
        if fault == Fault::Unavailable {
            return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
        }
        if form.get("api_key").map(String::as_str) != Some(API_KEY) {
            return (StatusCode::FORBIDDEN, r#"[{"code":403,"description":"Invalid api_key"}]"#)
                .into_response();
        }
        if !form.contains_key("service_code") {
            return (
                StatusCode::BAD_REQUEST,
                r#"[{"code":400,"description":"service_code missing"}]"#,
            )
                .into_response();
        }
        let id = format!("R{}", s.requests.len() + 1);
        let requested_ms = now_ms() + s.skew_ms;
        s.requests.push(Stored { id: id.clone(), form, status: "open".into(), requested_ms });
        s.posting += 1;
        s.most_posting = s.most_posting.max(s.posting);
        let answer = if s.tokens {
            format!(r#"[{{"token":"T-{id}"}}]"#)
        } else {
            format!(r#"[{{"service_request_id":"{id}","service_notice":"","account_id":null}}]"#)
        };
        (fault, answer)
    };
    if let Fault::Slow(d) = fault {
        tokio::time::sleep(d).await;
    }
    inner.lock().unwrap().posting -= 1;
    ([("content-type", "application/json")], answer).into_response()
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
    )
    .unwrap()
}

fn open311_error(status: StatusCode, description: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!([{ "code": status.as_u16(), "description": description }])),
    )
        .into_response()
}

/// A W3C date-time (RFC 3339) to Unix ms.
fn w3c_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|d| d.timestamp_millis())
}

async fn services(State(inner): State<Arc<Mutex<Inner>>>) -> Response {
    let s = inner.lock().unwrap();
    let Some(list) = &s.services else {
        return open311_error(StatusCode::NOT_FOUND, "no service list here");
    };
    let list: Vec<serde_json::Value> = list
        .iter()
        .map(|svc| {
            serde_json::json!({
                "service_code": svc.code,
                "service_name": svc.code,
                "metadata": svc.attributes.is_some(),
                "type": "realtime",
            })
        })
        .collect();
    axum::Json(list).into_response()
}

async fn definition(State(inner): State<Arc<Mutex<Inner>>>, Path(code): Path<String>) -> Response {
    let code = code.trim_end_matches(".json");
    let s = inner.lock().unwrap();
    let found = s.services.iter().flatten().find(|svc| svc.code == code);
    let Some(svc) = found else {
        return open311_error(StatusCode::NOT_FOUND, "no such service");
    };
    let attributes: Vec<serde_json::Value> = svc
        .attributes
        .iter()
        .flatten()
        .map(|(c, required)| serde_json::json!({ "code": c, "required": required, "variable": true, "datatype": "string" }))
        .collect();
    axum::Json(serde_json::json!({ "service_code": code, "attributes": attributes }))
        .into_response()
}

async fn list(
    State(inner): State<Arc<Mutex<Inner>>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut s = inner.lock().unwrap();
    let ids: Option<Vec<&str>> = q.get("service_request_id").map(|v| v.split(',').collect());
    if ids.is_none() {
        s.searches += 1;
        if s.search == Search::Unsupported {
            return open311_error(StatusCode::NOT_FOUND, "searching requests is not supported");
        }
    }
    // The standard's window: start_date and end_date on requested_datetime (default: the last
    // 90 days on the platform's clock).
    let platform_now = now_ms() + s.skew_ms;
    let end = q.get("end_date").and_then(|d| w3c_ms(d)).unwrap_or(platform_now);
    let start = q.get("start_date").and_then(|d| w3c_ms(d)).unwrap_or(end - 90 * 86_400_000);
    let list: Vec<serde_json::Value> = s
        .requests
        .iter()
        .filter(|r| ids.as_ref().is_none_or(|ids| ids.contains(&r.id.as_str())))
        .filter(|r| ids.is_some() || (start..=end).contains(&r.requested_ms))
        .filter(|r| q.get("service_code").is_none_or(|c| r.form.get("service_code") == Some(c)))
        .map(|r| {
            serde_json::json!({
                "service_request_id": r.id,
                "status": r.status,
                "service_code": r.form.get("service_code"),
                "description": r.form.get("description"),
            })
        })
        .collect();
    axum::Json(list).into_response()
}

async fn token(Path(token): Path<String>) -> Response {
    let id = token.trim_end_matches(".json").trim_start_matches("T-").to_owned();
    axum::Json(serde_json::json!([{ "token": token, "service_request_id": id }])).into_response()
}

async fn hook(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let fault = {
        let mut s = inner.lock().unwrap();
        let fault = next_fault(&mut s);
        if fault == Fault::Unavailable {
            return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
        }
        let signed = gridsense_gateway::platform::verify_signature(
            SECRET,
            &header("x-gridsense-signature"),
            &body,
            i64::try_from(now).unwrap(),
            300,
        );
        if signed.is_err() {
            s.bad_signatures += 1;
            return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
        }
        s.hooks.push(Hook {
            idempotency_key: header("idempotency-key"),
            body: serde_json::from_slice(&body).unwrap_or_default(),
            received: std::time::Instant::now(),
        });
        fault
    };
    if let Fault::Slow(d) = fault {
        tokio::time::sleep(d).await;
    }
    let n = inner.lock().unwrap().hooks.len();
    axum::Json(serde_json::json!({ "id": format!("W{n}") })).into_response()
}
