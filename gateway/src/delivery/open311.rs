//! The Open311 GeoReport v2 adapter: `POST /requests.json` (form-encoded, `api_key`,
//! `attribute[...]`), asynchronous tokens (`GET /tokens/{token}.json`), the standard's error
//! arrays, and status polling (`GET /requests.json?service_request_id=…`).
//!
//! GeoReport v2 has no idempotency key and no update call. So that a re-sent request never
//! makes a second case, the description ends with `[gridsense:KEY]` and the key is also sent as
//! `attribute[idempotency_key]`; before re-posting an entry that may have reached the platform
//! (an attempt was recorded), the adapter lists the platform's requests of that service code
//! from an hour before the case's detection to an hour after now (a platform clock that is
//! behind stores the request "earlier"; the marker makes the match exact) and adopts the one
//! carrying the key. Updates (escalation, recovery) stay on our side of the trace: the
//! standard cannot carry them.
//!
//! A look-up that cannot answer never decides the case's fate: a transient failure (5xx, a
//! timeout) is retried like a failed POST, up to [`LOOKUP_TRIES`] times for one entry; a
//! platform whose search refuses the query (a 4xx: it has no search, or not by these
//! parameters), or that keeps failing, gets the request again with the same marker — a
//! possible duplicate that the marker identifies, instead of a lost case ([`Lookup`]).
//!
//! The platform's catalogue (`GET /services.json`, and `GET /services/{code}.json` for
//! services with metadata) is read at start and every `cases.services_refresh_s`: a case whose
//! service code the platform does not offer, or that lacks an attribute the service requires,
//! is dead-lettered with that reason before it is posted; attributes a service with metadata
//! does not define are not sent.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use serde::Deserialize;

use crate::{
    delivery::{CasePayload, DeliveryError, classify},
    platform::GEOREPORT_SPAN_MS,
    store::OutboxEntry,
};

/// Look-ups of one entry that may fail transiently before it is re-sent without one.
pub const LOOKUP_TRIES: u32 = 3;

/// An hour, ms: the search window's margin on both sides.
const SEARCH_MARGIN_MS: i64 = 3_600_000;

/// An Open311 endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: String,
    jurisdiction_id: String,
    /// Failed look-ups per outbox entry (in this process).
    lookups_failed: Arc<Mutex<HashMap<i64, u32>>>,
    /// The platform's catalogue, once read.
    catalogue: Arc<Mutex<Option<Catalogue>>>,
}

/// What a look-up for an earlier attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The request is on the platform: adopt its id.
    Found(String),
    /// The platform's search answered and our marker is not among its results: post.
    NotFound,
    /// The search could not answer: why, and whether that may pass (a 5xx or a timeout) or
    /// not (the platform refuses the search itself).
    Failed { why: String, transient: bool },
}

/// The platform's services, as `services.json` (and each definition) lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalogue {
    /// Service code → its attribute definition (`None`: no metadata; any attribute goes).
    pub services: BTreeMap<String, Option<Definition>>,
}

/// A service definition's attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Definition {
    /// Every attribute code it defines.
    pub codes: BTreeSet<String>,
    /// The ones it requires.
    pub required: BTreeSet<String>,
}

/// Why the platform cannot take a case as we would send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// No such service code on the platform.
    ServiceCode(String),
    /// The service requires an attribute we do not send.
    RequiredAttribute {
        /// Service code.
        service: String,
        /// Attribute code.
        attribute: String,
    },
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsupported::ServiceCode(c) => {
                write!(f, "service_code {c} (the platform's services.json does not list it)")
            }
            Unsupported::RequiredAttribute { service, attribute } => write!(
                f,
                "service {service} requires attribute {attribute}, which gridsense does not send"
            ),
        }
    }
}

impl Catalogue {
    /// Checks a case's service code and attributes against the catalogue; `Ok` with the
    /// attributes to send (those the service defines, or all when it has no metadata).
    pub fn check<'a>(
        &self,
        service_code: &str,
        attributes: &'a [(&'static str, String)],
    ) -> Result<Vec<&'a (&'static str, String)>, Unsupported> {
        let Some(definition) = self.services.get(service_code) else {
            return Err(Unsupported::ServiceCode(service_code.to_owned()));
        };
        let Some(definition) = definition else { return Ok(attributes.iter().collect()) };
        if let Some(missing) =
            definition.required.iter().find(|r| !attributes.iter().any(|(k, _)| k == *r))
        {
            return Err(Unsupported::RequiredAttribute {
                service: service_code.to_owned(),
                attribute: missing.clone(),
            });
        }
        Ok(attributes.iter().filter(|(k, _)| definition.codes.contains(*k)).collect())
    }
}

/// One element of `services.json`.
#[derive(Debug, Clone, Deserialize)]
struct ServiceListed {
    service_code: serde_json::Value,
    #[serde(default)]
    metadata: serde_json::Value,
}

/// `services/{code}.json`.
#[derive(Debug, Clone, Deserialize)]
struct ServiceDefinition {
    #[serde(default)]
    attributes: Vec<AttributeDefinition>,
}

#[derive(Debug, Clone, Deserialize)]
struct AttributeDefinition {
    code: serde_json::Value,
    #[serde(default)]
    required: serde_json::Value,
}

/// Open311 writes booleans as `true` or as the strings `"true"`/`"false"`.
fn truthy(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::String(s) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
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
        Client {
            http,
            base,
            api_key,
            jurisdiction_id,
            lookups_failed: Arc::default(),
            catalogue: Arc::default(),
        }
    }

    /// The catalogue last read, if any.
    pub fn catalogue(&self) -> Option<Catalogue> {
        self.catalogue.lock().ok().and_then(|c| c.clone())
    }

    /// Reads the platform's catalogue (`services.json`, then the definition of each service
    /// with metadata) and keeps it for the checks before each POST.
    pub async fn refresh_catalogue(&self) -> Result<Catalogue, DeliveryError> {
        let text = self.get("/services.json", &[]).await?;
        let listed: Vec<ServiceListed> = serde_json::from_str(&text).map_err(|e| {
            DeliveryError::Permanent(format!(
                "services.json is not a service list ({e}): {text:.300}"
            ))
        })?;
        let mut catalogue = Catalogue::default();
        for service in listed {
            let code = id_text(&service.service_code);
            let definition = if truthy(&service.metadata) {
                let text = self.get(&format!("/services/{code}.json"), &[]).await?;
                let d: ServiceDefinition = serde_json::from_str(&text).map_err(|e| {
                    DeliveryError::Permanent(format!(
                        "services/{code}.json is not a service definition ({e}): {text:.300}"
                    ))
                })?;
                let mut definition = Definition::default();
                for a in d.attributes {
                    let c = id_text(&a.code);
                    if truthy(&a.required) {
                        definition.required.insert(c.clone());
                    }
                    definition.codes.insert(c);
                }
                Some(definition)
            } else {
                None
            };
            catalogue.services.insert(code, definition);
        }
        if let Ok(mut c) = self.catalogue.lock() {
            *c = Some(catalogue.clone());
        }
        Ok(catalogue)
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
    /// `now_ms` bounds the look-up's search window; `notes` collects what the case's trace
    /// should say about this attempt (a re-send without a look-up).
    pub async fn deliver(
        &self,
        entry: &OutboxEntry,
        p: &CasePayload,
        now_ms: i64,
        notes: &mut Vec<String>,
    ) -> Result<Option<String>, DeliveryError> {
        if p.op != "create" {
            // No update call in GeoReport v2: recorded on our side only.
            return Ok(p.platform_id.clone());
        }
        let attributes = attributes(p);
        let catalogue = self.catalogue();
        let sent: Vec<&(&'static str, String)> = match &catalogue {
            Some(c) => c
                .check(&p.service_code, &attributes)
                .map_err(|u| DeliveryError::Unsupported(u.to_string()))?,
            None => attributes.iter().collect(),
        };
        if entry.attempts > 0 {
            match self.find(p, now_ms).await {
                Lookup::Found(id) => {
                    tracing::info!(case = p.case_id, id, "found the case already on the platform");
                    self.forget(entry.id);
                    return Ok(Some(id));
                }
                Lookup::NotFound => {}
                Lookup::Failed { why, transient } => {
                    let failed = self.failed_lookup(entry.id);
                    if transient && failed < LOOKUP_TRIES {
                        return Err(DeliveryError::Retry(format!(
                            "look-up for an earlier attempt failed ({failed} of {LOOKUP_TRIES}): {why}"
                        )));
                    }
                    tracing::warn!(
                        case = p.case_id,
                        "look-up failed ({why}); posting again with the marker {}",
                        marker(&p.case_key)
                    );
                    notes.push(format!(
                        "re-sent without a look-up ({why}): if an earlier attempt arrived, the platform holds two requests carrying {}",
                        marker(&p.case_key)
                    ));
                }
            }
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
        for (k, v) in sent {
            form.push((format!("attribute[{k}]"), v.clone()));
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
        self.forget(entry.id);
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

    fn failed_lookup(&self, entry: i64) -> u32 {
        self.lookups_failed.lock().map_or(LOOKUP_TRIES, |mut m| {
            let n = m.entry(entry).or_default();
            *n += 1;
            *n
        })
    }

    fn forget(&self, entry: i64) {
        if let Ok(mut m) = self.lookups_failed.lock() {
            m.remove(&entry);
        }
    }

    /// The id for a token, once the platform has assigned one.
    pub async fn resolve(&self, token: &str) -> Option<String> {
        let text = self.get(&format!("/tokens/{token}.json"), &[]).await.ok()?;
        let found: Vec<Created> = serde_json::from_str(&text).ok()?;
        found.first()?.service_request_id.as_ref().map(id_text)
    }

    /// Looks for our request (by its marker) among the platform's requests of its service
    /// code, from an hour before the case's detection to an hour after `now_ms` (at most the
    /// 90 days GeoReport v2 allows).
    async fn find(&self, p: &CasePayload, now_ms: i64) -> Lookup {
        let end = now_ms.saturating_add(SEARCH_MARGIN_MS);
        let start = p.detected_ms.saturating_sub(SEARCH_MARGIN_MS).max(end - GEOREPORT_SPAN_MS);
        let w3c = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default()
        };
        let query = [
            ("service_code", p.service_code.clone()),
            ("start_date", w3c(start)),
            ("end_date", w3c(end)),
        ];
        let text = match self.get("/requests.json", &query).await {
            Ok(text) => text,
            Err(DeliveryError::Retry(why)) => return Lookup::Failed { why, transient: true },
            Err(e) => return Lookup::Failed { why: e.to_string(), transient: false },
        };
        let Ok(listed) = serde_json::from_str::<Vec<Listed>>(&text) else {
            return Lookup::Failed {
                why: format!("the search answer is not a request list: {text:.200}"),
                transient: false,
            };
        };
        let mark = marker(&p.case_key);
        listed
            .iter()
            .find(|r| r.description.as_deref().is_some_and(|d| d.contains(&mark)))
            .map_or(Lookup::NotFound, |r| Lookup::Found(id_text(&r.service_request_id)))
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

/// The attributes a case carries (before the catalogue filters them).
fn attributes(p: &CasePayload) -> Vec<(&'static str, String)> {
    [
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
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(codes: &[&str], required: &[&str]) -> Option<Definition> {
        Some(Definition {
            codes: codes.iter().map(|c| (*c).to_owned()).collect(),
            required: required.iter().map(|c| (*c).to_owned()).collect(),
        })
    }

    #[test]
    fn the_catalogue_refuses_unknown_codes_and_missing_required_attributes() {
        let catalogue = Catalogue {
            services: BTreeMap::from([
                ("C0102".to_owned(), None),
                ("E0404".to_owned(), definition(&["grid_code", "urgency"], &["urgency"])),
                ("E0406".to_owned(), definition(&["photo"], &["photo"])),
            ]),
        };
        let attrs = vec![
            ("grid_code", "g".to_owned()),
            ("urgency", "high".to_owned()),
            ("onset", "t".to_owned()),
        ];
        assert_eq!(catalogue.check("C0102", &attrs).unwrap().len(), 3, "no metadata: all sent");
        let sent: Vec<_> =
            catalogue.check("E0404", &attrs).unwrap().iter().map(|(k, _)| *k).collect();
        assert_eq!(sent, ["grid_code", "urgency"], "only the defined attributes");
        assert_eq!(
            catalogue.check("E0406", &attrs).unwrap_err(),
            Unsupported::RequiredAttribute { service: "E0406".into(), attribute: "photo".into() }
        );
        let e = catalogue.check("C0199", &attrs).unwrap_err();
        assert_eq!(e, Unsupported::ServiceCode("C0199".into()));
        assert!(e.to_string().contains("C0199"));
    }
}
