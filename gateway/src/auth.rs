//! Operators' authentication for the HTTP API: bearer tokens (`gridsense tokens add`), stored
//! only as SHA-256 hashes, with two roles — `read` (every GET) and `operator` (also moving
//! cases). Public without a token: the dashboard page itself, `/healthz`, `/readyz`, the
//! platform callback (it carries its own HMAC signature), and the Open311 read endpoints when
//! `http.open311_public` is set. The event stream takes the token as `access_token` in its
//! query, since browsers cannot set headers on an `EventSource`. Also here: the request time
//! limit.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    http::{Method, StatusCode, header},
    middleware::Next,
    response::Response,
};
use sha2::{Digest, Sha256};

use crate::{api::api_error, board::Board};

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

fn presented(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| kv.strip_prefix("access_token=").map(str::to_owned))
    })
}

/// Checks the token (where one is needed) and bounds the request's time.
pub async fn check(State(guard): State<Guard>, req: Request, next: Next) -> Response {
    if guard.required && !public(&guard, req.uri().path()) {
        let Some(token) = presented(&req) else {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a bearer token is required (gridsense tokens add)",
            );
        };
        let h = hash(&token);
        let role = match guard.board.with_store(move |s| s.token_role(&h)).await {
            Ok(role) => role,
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
        };
        let Some(role) = role else {
            return api_error(StatusCode::UNAUTHORIZED, "unauthorized", "unknown or revoked token");
        };
        if req.method() != Method::GET && req.method() != Method::HEAD && role != "operator" {
            return api_error(StatusCode::FORBIDDEN, "forbidden", "this needs an operator token");
        }
    }
    match tokio::time::timeout(guard.timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            api_error(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long")
        }
    }
}
