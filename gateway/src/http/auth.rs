//! Operators' authentication for the HTTP API: bearer tokens (`gridsense tokens add`), stored
//! only as SHA-256 hashes, with two roles — `read` (every GET) and `operator` (also moving
//! cases). Public without a token: the dashboard page itself, `/healthz`, `/readyz`, the
//! platform callback (it carries its own HMAC signature), and the Open311 read endpoints when
//! `http.open311_public` is set. Tokens come in the `Authorization` header (the scheme
//! `Bearer` in any case, as RFC 7235 has it); only the event stream also takes one as
//! `access_token` in its query, since browsers cannot set headers on an `EventSource` — a token
//! in any other URL would end up in logs and browser histories, so it is refused there. The
//! authenticated token's name is handed to the handlers ([`Caller`]): the trace records who
//! moved a case by the token, not by what a request body claims. Also here: the request time
//! limit.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    http::{Method, StatusCode, header},
    middleware::Next,
    response::Response,
};
use sha2::{Digest, Sha256};

use super::{api::api_error, board::Board};

/// Roles a token can have.
pub const ROLES: [&str; 2] = ["read", "operator"];

/// The SHA-256 of a token, as stored.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token (`gst_` + 32 bytes of hex).
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("gst_{}", hex::encode(bytes)))
}

/// What the middleware needs.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Tokens required.
    pub required: bool,
    /// Open311 readable without a token.
    pub open311_public: bool,
    /// Where tokens are looked up.
    pub board: Arc<Board>,
    /// Request time limit.
    pub timeout: Duration,
}

fn public(guard: &Guard, path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/api/v1/platform/callback")
        || (guard.open311_public && path.starts_with("/open311/"))
}

/// The one path that takes a token in its query.
pub const EVENTS_PATH: &str = "/api/v1/events";

/// Who made an authenticated request: the token's name (`gridsense tokens add --name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

/// The role of an authenticated request's token (`read` or `operator`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerRole(pub String);

/// The token a request presents: a bearer token in `Authorization`, or on the event stream an
/// `access_token` query parameter. `Err` when a token is in a URL where it must not be.
fn presented(req: &Request) -> Result<Option<String>, &'static str> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let mut parts = v.trim().splitn(2, ' ');
        let scheme = parts.next().unwrap_or("");
        let token = parts.next().map(str::trim).filter(|t| !t.is_empty());
        return Ok(token.filter(|_| scheme.eq_ignore_ascii_case("bearer")).map(str::to_owned));
    }
    let in_query = req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| kv.strip_prefix("access_token=").map(str::to_owned))
    });
    match in_query {
        Some(_) if req.uri().path() != EVENTS_PATH => Err(
            "access_token in a URL is only taken by the event stream: send `Authorization: Bearer TOKEN`",
        ),
        other => Ok(other),
    }
}

/// Checks the token (where one is needed) and bounds the request's time.
pub async fn check(State(guard): State<Guard>, mut req: Request, next: Next) -> Response {
    if guard.required && !public(&guard, req.uri().path()) {
        let token = match presented(&req) {
            Ok(Some(token)) => token,
            Ok(None) => {
                return api_error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a bearer token is required (gridsense tokens add)",
                );
            }
            Err(why) => return api_error(StatusCode::BAD_REQUEST, "bad_parameter", why),
        };
        let h = hash(&token);
        let found = match guard.board.with_store(move |s| s.token_role(&h)).await {
            Ok(found) => found,
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
        };
        let Some((name, role)) = found else {
            return api_error(StatusCode::UNAUTHORIZED, "unauthorized", "unknown or revoked token");
        };
        if req.method() != Method::GET && req.method() != Method::HEAD && role != "operator" {
            return api_error(StatusCode::FORBIDDEN, "forbidden", "this needs an operator token");
        }
        req.extensions_mut().insert(Caller(name));
        req.extensions_mut().insert(CallerRole(role));
    }
    match tokio::time::timeout(guard.timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            api_error(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, authorization: Option<&str>) -> Request {
        let mut b = axum::http::Request::builder().uri(uri);
        if let Some(a) = authorization {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(axum::body::Body::empty()).unwrap_or_default()
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_query_tokens_only_reach_the_event_stream() {
        for a in ["Bearer gst_1", "bearer gst_1", "BEARER  gst_1 "] {
            assert_eq!(
                presented(&request("/api/v1/cases", Some(a))),
                Ok(Some("gst_1".into())),
                "{a}"
            );
        }
        assert_eq!(presented(&request("/api/v1/cases", Some("Basic abc"))), Ok(None));
        assert_eq!(presented(&request("/api/v1/cases", None)), Ok(None));
        assert_eq!(
            presented(&request("/api/v1/events?access_token=gst_2", None)),
            Ok(Some("gst_2".into()))
        );
        assert!(
            presented(&request("/api/v1/cases/1/transition?access_token=gst_2", None)).is_err()
        );
        assert!(presented(&request("/api/v1/devices?x=1&access_token=gst_2", None)).is_err());
    }
}
