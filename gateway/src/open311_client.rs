//! The Open311 GeoReport v2 adapter: `POST /requests.json` (form-encoded, `api_key`,
//! `attribute[...]`), asynchronous tokens (`GET /tokens/{token}.json`), the standard's error
//! arrays, and status polling (`GET /requests.json?service_request_id=…`).
//!
//! GeoReport v2 has no idempotency key and no update call. So that a re-sent request never
//! makes a second case, the description ends with `[gridsense:KEY]` and the key is also sent as
//! `attribute[idempotency_key]`; before re-posting an entry that may have reached the platform
//! (an attempt was recorded), the adapter lists the platform's requests of that service code
//! since the case's detection and adopts the one carrying the key. Updates (escalation,
//! recovery) stay on our side of the trace: the standard cannot carry them.

use serde::Deserialize;

use crate::{
    delivery::{CasePayload, DeliveryError, classify},
    store::OutboxEntry,
};

/// An Open311 endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: String,
    jurisdiction_id: String,
}

/// One element of an Open311 answer to `POST /requests.json` or `GET /tokens/…`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Created {
    /// The request id, when known.
    #[serde(default)]
    pub service_request_id: Option<serde_json::Value>,
    /// The token, when the id is assigned later.
    #[serde(default)]
    pub token: Option<serde_json::Value>,
}

/// One request in `GET /requests.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Listed {
    /// Id.
    pub service_request_id: serde_json::Value,
    /// `open` or `closed`.
    #[serde(default)]
    pub status: String,
    /// Notes.
    #[serde(default)]
    pub status_notes: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// Last update.
    #[serde(default)]
    pub updated_datetime: Option<String>,
}

/// An Open311 error element.
#[derive(Debug, Clone, Deserialize)]
struct Open311Error {
    #[serde(default)]
    code: serde_json::Value,
    #[serde(default)]
    description: String,
}

fn id_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The marker that identifies our request in the platform's description.
pub fn marker(key: &str) -> String {
    format!("[gridsense:{key}]")
}

fn errors(status: u16, body: &str) -> DeliveryError {
    let described = serde_json::from_str::<Vec<Open311Error>>(body).ok().map(|errs| {
        errs.iter()
            .map(|e| format!("{} {}", id_text(&e.code), e.description))
            .collect::<Vec<_>>()
            .join("; ")
    });
    match classify(status, body) {
        Err(DeliveryError::Permanent(_)) => DeliveryError::Permanent(format!(
            "HTTP {status}: {}",
            described.unwrap_or_else(|| body.chars().take(300).collect())
        )),
        Err(e) => e,
        Ok(()) => DeliveryError::Permanent(format!("HTTP {status}: unexpected answer {body:.300}")),
    }
}

impl Client {
    /// A client for `base` (the URL before `/requests.json`).
    pub fn new(
        http: reqwest::Client,
        base: String,
        api_key: String,
        jurisdiction_id: String,
    ) -> Self {
        Client { http, base, api_key, jurisdiction_id }
    }

    /// The HTTP client (shared with the alert channel).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn jurisdiction(&self) -> Vec<(&'static str, String)> {
        if self.jurisdiction_id.is_empty() {
            Vec::new()
        } else {
            vec![("jurisdiction_id", self.jurisdiction_id.clone())]
        }
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<String, DeliveryError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .query(&self.jurisdiction())
            .send()
            .await
            .map_err(|e| DeliveryError::Retry(format!("request failed: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        if (200..300).contains(&status) { Ok(text) } else { Err(errors(status, &text)) }
    }

    /// Delivers one outbox entry; returns the platform's id (or `token:T` while it has none).
    pub async fn deliver(
        &self,
        entry: &OutboxEntry,
        p: &CasePayload,
    ) -> Result<Option<String>, DeliveryError> {
        if p.op != "create" {
            // No update call in GeoReport v2: recorded on our side only.
            return Ok(p.platform_id.clone());
        }
        if entry.attempts > 0
            && let Some(id) = self.find(p).await?
        {
            tracing::info!(case = p.case_id, id, "found the case already on the platform");
            return Ok(Some(id));
        }
        let mut form: Vec<(String, String)> = vec![
            ("api_key".into(), self.api_key.clone()),
            ("service_code".into(), p.service_code.clone()),
            ("lat".into(), format!("{:.6}", p.lat)),
            ("long".into(), format!("{:.6}", p.long)),
            ("address_string".into(), p.address_string.clone()),
            ("description".into(), format!("{} {}", p.description, marker(&p.case_key))),
            ("device_id".into(), p.device_id.clone()),
        ];
        let attributes = [
            ("idempotency_key", Some(p.case_key.clone())),
            ("object_code", p.object_code.clone()),
            ("crs", Some(p.crs.clone())),
            ("unit_grid_code", p.unit_grid_code.clone()),
            ("grid_code", p.grid_code.clone()),
            ("community_code", p.community_code.clone()),
            ("street_code", p.street_code.clone()),
            ("district_code", p.district_code.clone()),
            ("source", Some(p.source.clone())),
            ("urgency", Some(p.urgency.clone())),
            ("onset", Some(p.onset.clone())),
            ("detected", Some(p.detected.clone())),
            ("handling_due", Some(p.handling_due.clone())),
            ("deploy_due", Some(p.deploy_due.clone())),
            ("feedback_due", Some(p.feedback_due.clone())),
        ];
        for (k, v) in attributes {
            if let Some(v) = v {
                form.push((format!("attribute[{k}]"), v));
            }
        }
        for (k, v) in self.jurisdiction() {
            form.push((k.into(), v));
        }
        let resp = self
            .http
            .post(format!("{}/requests.json", self.base))
            .form(&form)
            .send()
            .await
            .map_err(|e| DeliveryError::Retry(format!("request failed: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            return Err(errors(status, &text));
        }
        let created: Vec<Created> = serde_json::from_str(&text).map_err(|e| {
            DeliveryError::Permanent(format!("unexpected answer ({e}): {text:.300}"))
        })?;
        let first = created.first().ok_or_else(|| {
            DeliveryError::Permanent("empty answer to POST /requests.json".into())
        })?;
        if let Some(id) = &first.service_request_id {
            return Ok(Some(id_text(id)));
        }
        let Some(token) = &first.token else {
            return Err(DeliveryError::Permanent(format!("no id and no token in {text:.300}")));
        };
        let token = id_text(token);
        // Asynchronous: try once to turn the token into an id; the poller finishes it.
        Ok(Some(self.resolve(&token).await.unwrap_or_else(|| format!("token:{token}"))))
    }

    /// The id for a token, once the platform has assigned one.
    pub async fn resolve(&self, token: &str) -> Option<String> {
        let text = self.get(&format!("/tokens/{token}.json"), &[]).await.ok()?;
        let found: Vec<Created> = serde_json::from_str(&text).ok()?;
        found.first()?.service_request_id.as_ref().map(id_text)
    }

    /// Looks for our request (by its marker) among the platform's requests of its service code.
    async fn find(&self, p: &CasePayload) -> Result<Option<String>, DeliveryError> {
        let text = self
            .get(
                "/requests.json",
                &[("service_code", p.service_code.clone()), ("start_date", p.detected.clone())],
            )
            .await?;
        let listed: Vec<Listed> = serde_json::from_str(&text).unwrap_or_default();
        let mark = marker(&p.case_key);
        Ok(listed
            .iter()
            .find(|r| r.description.as_deref().is_some_and(|d| d.contains(&mark)))
            .map(|r| id_text(&r.service_request_id)))
    }

    /// Current status of the given requests.
    pub async fn statuses(&self, ids: &[String]) -> Result<Vec<Listed>, DeliveryError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let text = self.get("/requests.json", &[("service_request_id", ids.join(","))]).await?;
        serde_json::from_str(&text)
            .map_err(|e| DeliveryError::Permanent(format!("unexpected answer ({e}): {text:.300}")))
    }
}
