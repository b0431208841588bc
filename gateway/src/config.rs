//! Gateway configuration: TOML with a default for every setting, overridable from the
//! environment as `GRIDSENSE_<SECTION>_<KEY>` (e.g. `GRIDSENSE_MQTT_URL`). Unknown keys, unknown
//! `GRIDSENSE_…` variables and bad values are rejected at start-up with the key named.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The broker connection.
    pub mqtt: Mqtt,
    /// The embedded broker, used when `mqtt.url` is empty.
    pub broker: EmbeddedBroker,
    /// Local storage.
    pub store: Store,
    /// Device health.
    pub health: Health,
    /// Where telemetry goes.
    pub telemetry: Telemetry,
    /// The HTTP API.
    pub http: Http,
    /// Downlinks to devices.
    pub downlink: DownlinkSettings,
    /// The grid layer.
    pub geo: Geo,
    /// Rules, cases and their delivery.
    pub cases: CasesSettings,
    /// How devices are partitioned between gateway instances.
    pub cluster: Cluster,
}

/// How devices are partitioned between gateway instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// Shards the devices are partitioned into by EUI (1 … 256; SPEC.md §2): fixed when the
    /// store is made — a store made with another number is refused.
    pub shards: u16,
    /// This instance's name among the gateway instances sharing a PostgreSQL store: stable
    /// across restarts (a restarted instance takes its own leases back at once, under new
    /// epochs), unique among running ones. Empty: the host name and the process id.
    pub instance_id: String,
    /// How long a shard's lease lasts after its last renewal, ms: an instance that died is
    /// replaced this long after its last renewal at most.
    pub lease_ms: u64,
    /// How often leases are renewed (and free ones claimed), ms.
    pub renew_ms: u64,
}

impl Cluster {
    /// `lease_ms` as the store's interval arithmetic takes it.
    pub fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease_ms).unwrap_or(i64::MAX)
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            shards: gridsense_protocol::topic::DEFAULT_SHARDS,
            instance_id: String::new(),
            lease_ms: 5_000,
            renew_ms: 1_000,
        }
    }
}

/// The account (and so, with `use_username_as_clientid`, the session) of one shard's lane:
/// `GATEWAY-SS-up` or `GATEWAY-SS-urgent` (`gridsense provision broker` writes them; each
/// instance connects as the shards it owns).
pub fn shard_session_user(
    gateway_user: &str,
    shard: u8,
    lane: gridsense_protocol::topic::Lane,
) -> String {
    format!("{gateway_user}-{shard:02x}-{}", lane.as_str())
}

impl Cluster {
    /// `instance_id`, or the host name and the process id when it is empty.
    pub fn instance(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "gateway".into());
        format!("{host}-{}", std::process::id())
    }
}

/// Where cases go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// The built-in case board (SQLite), served as Open311 GeoReport v2.
    Local,
    /// A real Open311 GeoReport v2 endpoint (`POST /requests.json`).
    Open311,
    /// JSON webhook with an idempotency key and an HMAC-SHA256 signature.
    Webhook,
}

/// Rules, incidents, cases and delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CasesSettings {
    /// Alarm rules (TOML; `gridsense cases defaults rules` prints the built-in ones); empty:
    /// built in.
    pub rules: String,
    /// Class codes, conditions, 130 milestones and working calendar (TOML; `gridsense cases
    /// defaults tables`); empty: built in.
    pub tables: String,
    /// Incidents of one condition in one grid within this many seconds are linked.
    pub link_window_s: u64,
    /// Where cases are delivered.
    pub platform: Platform,
    /// The platform's base URL (open311: the endpoint before `/requests.json`; webhook: the
    /// URL posted to).
    pub url: String,
    /// Open311 `api_key`.
    pub api_key: String,
    /// Open311 `jurisdiction_id` (empty: none).
    pub jurisdiction_id: String,
    /// Webhook HMAC-SHA256 key (also verifies status callbacks).
    pub secret: String,
    /// Coordinates sent to the platform: "wgs84" or "gcj02".
    pub coordinates: String,
    /// Request timeout, ms.
    pub timeout_ms: u64,
    /// First retry delay after a 5xx or a timeout, ms; doubles (with jitter) to `retry_max_ms`.
    pub retry_min_ms: u64,
    /// Longest retry delay, ms.
    pub retry_max_ms: u64,
    /// How often the open311 adapter asks the platform for status changes, s.
    pub poll_status_s: u64,
    /// Most deliveries in flight at once (each for a different case; one case's entries go
    /// in order), so one hanging request does not hold back every later case.
    pub concurrency: usize,
    /// How often the open311 adapter rereads the platform's `services.json`, s (also at
    /// start; a case whose service code it does not list is dead-lettered with that reason).
    pub services_refresh_s: u64,
    /// URL the SOS alerts are posted to (JSON, signed like the webhook); empty: alerts are
    /// only recorded and logged.
    pub alert_url: String,
    /// How often supervision (督办) looks for cases to escalate, s (0: never; `gridsense
    /// cases supervise` does it once).
    pub supervise_s: u64,
}

impl Default for CasesSettings {
    fn default() -> Self {
        CasesSettings {
            rules: String::new(),
            tables: String::new(),
            link_window_s: 1_800,
            platform: Platform::Local,
            url: String::new(),
            api_key: String::new(),
            jurisdiction_id: String::new(),
            secret: String::new(),
            coordinates: "wgs84".into(),
            timeout_ms: 10_000,
            retry_min_ms: 500,
            retry_max_ms: 60_000,
            poll_status_s: 60,
            concurrency: 4,
            services_refresh_s: 3_600,
            alert_url: String::new(),
            supervise_s: 60,
        }
    }
}

/// The grid layer (responsibility grids as GeoJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Geo {
    /// GeoJSON of the responsibility grids (`gridsim city` writes `grids.geojson`); empty: none.
    pub grids: String,
    /// A point outside every grid goes to the nearest within this many metres, else none.
    pub tolerance_m: f64,
    /// Digits of a grid code (15, or 14 in some cities).
    pub grid_code_digits: usize,
    /// GeoJSON of the unit grids (单元网格, ~10,000 m² cells with 15-digit codes nested in
    /// community and street codes, same properties as `grids`); empty: cases carry no unit grid.
    pub unit_grids: String,
}

impl Default for Geo {
    fn default() -> Self {
        Geo {
            grids: String::new(),
            tolerance_m: 50.0,
            grid_code_digits: 15,
            unit_grids: String::new(),
        }
    }
}

/// Downlink policy (time sync, configuration, status requests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownlinkSettings {
    /// Clock error that triggers a time sync, s.
    pub time_drift_s: u64,
    /// Fewest seconds between two time syncs of one device.
    pub sync_every_s: u64,
    /// Re-send an unacknowledged configuration after this long, s.
    pub ack_timeout_s: u64,
    /// Give up on a configuration after this many sends.
    pub max_attempts: u32,
    /// How often the gateway looks for new operator requests in the store, ms.
    pub poll_ms: u64,
    /// A device's frames on its `…/up` lane stored since its last cumulative confirmation
    /// (`UplinkWindow`, SPEC §7.2) that make the next one due.
    pub confirm_every_frames: u16,
    /// Seconds since a device's last cumulative confirmation after which its next stored
    /// frame makes one due. Devices resend what no window held after 60 s: keep it below.
    pub confirm_every_s: u64,
}

impl Default for DownlinkSettings {
    fn default() -> Self {
        DownlinkSettings {
            time_drift_s: 30,
            sync_every_s: 3_600,
            ack_timeout_s: 600,
            max_attempts: 5,
            poll_ms: 1_000,
            confirm_every_frames: 8,
            confirm_every_s: 30,
        }
    }
}

impl DownlinkSettings {
    /// The pure core's policy.
    pub fn policy(&self) -> crate::downlink::DownlinkConfig {
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        crate::downlink::DownlinkConfig {
            time_drift_ms: ms(self.time_drift_s),
            sync_every_ms: ms(self.sync_every_s),
            ack_timeout_ms: ms(self.ack_timeout_s),
            max_attempts: self.max_attempts,
            confirm_every_frames: self.confirm_every_frames,
            confirm_every_ms: ms(self.confirm_every_s),
            ..crate::downlink::DownlinkConfig::default()
        }
    }
}

/// The HTTP API, dashboard and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// `HOST:PORT` to listen on, e.g. `127.0.0.1:8080`; empty: no HTTP server.
    pub listen: String,
    /// `"tokens"`: every API call needs `Authorization: Bearer TOKEN` (`gridsense tokens add`;
    /// `read` tokens may read, `operator` tokens may also move cases); `"off"`: no
    /// credentials (only sensible on loopback; `gridsense demo` uses it).
    pub auth: String,
    /// Serve the Open311 read endpoints without credentials (public case boards).
    pub open311_public: bool,
    /// The Open311 `jurisdiction_id` the board serves; a request naming another is refused
    /// with an Open311 error. Empty: the board names none (only an empty or absent
    /// `jurisdiction_id` is served).
    pub jurisdiction_id: String,
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// Longest a request may take, ms.
    pub timeout_ms: u64,
    /// Longest a client may take to send a request's headers, ms — also how long a
    /// kept-alive connection may sit idle; then it is closed (slow or silent clients).
    pub header_timeout_ms: u64,
    /// Most connections open at once (event streams included); more wait in the listen queue.
    pub max_connections: usize,
    /// PEM certificate chain: with `tls_key`, the API is served over HTTPS only.
    pub tls_cert: String,
    /// PEM private key of `tls_cert`.
    pub tls_key: String,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: String::new(),
            auth: "tokens".into(),
            open311_public: false,
            jurisdiction_id: String::new(),
            body_limit: 64 * 1024,
            timeout_ms: 10_000,
            header_timeout_ms: 10_000,
            max_connections: 512,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

/// Telemetry sink: SQLite (the embedded default) or the InfluxDB 2 write API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sink {
    /// Telemetry in the configured store (SQLite, or PostgreSQL with `store.url`), kept
    /// `store.telemetry_retention_days`. The old name `sqlite` is accepted.
    #[serde(alias = "sqlite")]
    Store,
    /// Telemetry to InfluxDB 2 (or anything serving `/api/v2/write`), through an on-disk buffer.
    Influxdb,
}

/// Telemetry settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// The sink.
    pub sink: Sink,
    /// InfluxDB base URL, `http://HOST:PORT`.
    pub url: String,
    /// Organisation.
    pub org: String,
    /// Bucket.
    pub bucket: String,
    /// API token (empty: none).
    pub token: String,
    /// Most points per write request.
    pub batch_max: usize,
    /// How often an idle sink looks for new points, ms.
    pub flush_ms: u64,
    /// Request timeout, ms.
    pub timeout_ms: u64,
    /// First retry delay after a 429, 5xx or connection error, ms; doubles to `retry_max_ms`.
    pub retry_min_ms: u64,
    /// Longest retry delay, ms.
    pub retry_max_ms: u64,
    /// Most points the on-disk buffer holds while the server is down; beyond it the oldest
    /// points are dropped and counted.
    pub buffer_max_points: u64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            sink: Sink::Store,
            url: "http://127.0.0.1:8086".into(),
            org: "gridsense".into(),
            bucket: "gridsense".into(),
            token: String::new(),
            batch_max: 5_000,
            flush_ms: 100,
            timeout_ms: 10_000,
            retry_min_ms: 200,
            retry_max_ms: 30_000,
            buffer_max_points: 10_000_000,
        }
    }
}

/// Broker connection (rumqttc, MQTT 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    /// `mqtt://HOST:PORT`, or `mqtts://HOST:PORT` for TLS (then `ca_file` is required); empty
    /// (and no `urls`) starts the embedded broker.
    pub url: String,
    /// Two independent brokers instead of `url`: every shard's sessions are held on both, and
    /// devices fail over between them. Both `mqtt://` or both `mqtts://`.
    pub urls: Vec<String>,
    /// PEM file of the CA(s) the broker's certificate must chain to (`mqtts://` only). The
    /// certificate must name the URL's host.
    pub ca_file: String,
    /// Client id; the session is persistent under it.
    pub client_id: String,
    /// User name (empty: none).
    pub username: String,
    /// Password.
    pub password: String,
    /// Keep-alive, seconds.
    pub keep_alive_s: u64,
    /// Most un-acked QoS 1 messages held at once (in-flight credits), announced to the broker
    /// as the session's Receive Maximum: the broker holds back the rest.
    pub inflight: u16,
    /// Maximum Packet Size announced to the broker, bytes: it must not send this session
    /// anything larger (MQTT 5 §3.1.2.11.4; it drops such a message for this client), so no
    /// message can stall the session. Keep it above the broker's own limit on what devices
    /// may publish (`message_size_limit` in deploy/mosquitto.conf: 4096).
    pub max_packet_bytes: u32,
    /// First reconnect delay, ms; doubles to `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, ms.
    pub reconnect_max_ms: u64,
}

impl Mqtt {
    /// The brokers: `urls` when given, else `url` alone, else none (the embedded broker).
    pub fn brokers(&self) -> Vec<&str> {
        if !self.urls.is_empty() {
            self.urls.iter().map(String::as_str).collect()
        } else if !self.url.is_empty() {
            vec![self.url.as_str()]
        } else {
            Vec::new()
        }
    }
}

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            url: String::new(),
            urls: Vec::new(),
            ca_file: String::new(),
            client_id: "gridsense-gateway".into(),
            username: String::new(),
            password: String::new(),
            keep_alive_s: 30,
            inflight: 1_000,
            max_packet_bytes: 65_536,
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
        }
    }
}

/// The embedded broker (rumqttd): loopback only. Ports 0 pick free ones.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBroker {
    /// Port for devices (MQTT 5); 0 picks a free one.
    pub device_port: u16,
    /// Port for MQTT 3.1.1 clients (the gateway itself); 0 picks a free one.
    pub client_port: u16,
}

/// How hard SQLite works to keep a commit across a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Survives a crash or `kill -9` of the gateway (WAL + synchronous=NORMAL).
    Normal,
    /// Also survives a power cut (synchronous=FULL), at some throughput cost.
    Full,
}

/// Local storage (SQLite).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Store {
    /// Database file (SQLite, the zero-install default).
    pub path: PathBuf,
    /// A PostgreSQL URL, `postgres://user[:password]@host[:port][,host2[:port]]/db[?…]`
    /// (multi-host with `target_session_attrs=read-write` follows a promoted standby). Set, it
    /// wins over `path` and nothing is written to SQLite.
    pub url: String,
    /// The CA that signed the PostgreSQL server's certificate (PEM): set, the connection is
    /// TLS and the certificate and host name are verified (libpq's `verify-full`).
    pub ca_file: PathBuf,
    /// Durability of a commit.
    pub synchronous: Synchronous,
    /// Most frames committed in one transaction.
    pub batch_max: usize,
    /// Longest a frame waits for its batch to fill, ms.
    pub batch_max_ms: u64,
    /// Rejected frames kept in the audit log (oldest go first).
    pub audit_max: u64,
    /// Telemetry kept in the embedded store, days.
    pub telemetry_retention_days: u32,
    /// The key that seals device keys and MQTT passwords in the store (32 bytes, hex; created,
    /// mode 0600, on first start). Empty: `PATH.key` beside the database. Keep it apart from
    /// database dumps and backups of the store.
    pub key_file: PathBuf,
}

impl Store {
    /// The key file in use: `key_file`, or `PATH.key` beside the database.
    pub fn key_file(&self) -> PathBuf {
        if self.key_file.as_os_str().is_empty() {
            default_key_file(&self.path)
        } else {
            self.key_file.clone()
        }
    }
}

impl Default for Store {
    fn default() -> Self {
        Store {
            path: PathBuf::from("gridsense-data/gridsense.db"),
            synchronous: Synchronous::Normal,
            batch_max: 1_000,
            batch_max_ms: 20,
            audit_max: 10_000,
            telemetry_retention_days: 30,
            key_file: PathBuf::new(),
            url: String::new(),
            ca_file: PathBuf::new(),
        }
    }
}

/// Device health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// A device is offline after this many expected intervals without a verified frame.
    pub offline_factor: f64,
    /// Expected longest silence of a cover, s (its routine reading interval).
    pub cover_interval_s: u64,
    /// Expected longest silence of a drain, s (its heartbeat).
    pub drain_interval_s: u64,
    /// Expected longest silence of a beacon, s (its heartbeat).
    pub beacon_interval_s: u64,
    /// Battery below this is low, mV.
    pub low_battery_mv: u16,
    /// A sample time (or alarm onset) more than this many seconds ahead of the gateway's
    /// receive time is clamped to the receive time and counted
    /// (`gridsense_samples_future_total`): a device clock running ahead cannot date readings,
    /// cases or deadlines in the future.
    pub max_ahead_s: u64,
    /// Frames a device may send per minute; beyond it the rest are refused unchecked and the
    /// device is flagged as flooding (0: no limit).
    pub max_frames_per_minute: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            offline_factor: 2.5,
            cover_interval_s: 3_600,
            drain_interval_s: 3_600,
            beacon_interval_s: 3_600,
            low_battery_mv: crate::health::DEFAULT_LOW_BATTERY_MV,
            max_ahead_s: 120,
            max_frames_per_minute: 300,
        }
    }
}

impl Health {
    /// The pure core's health policy.
    pub fn policy(&self) -> crate::health::HealthConfig {
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        crate::health::HealthConfig {
            offline_factor: self.offline_factor,
            interval_ms: [
                ms(self.cover_interval_s),
                ms(self.drain_interval_s),
                ms(self.beacon_interval_s),
            ],
            low_battery_mv: self.low_battery_mv,
            max_ahead_ms: ms(self.max_ahead_s),
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML or a value in it is wrong.
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        /// The file, or `environment`.
        file: String,
        /// The offending key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

const ENV_PREFIX: &str = "GRIDSENSE_";

/// Loads `file` (or only defaults when `None`), applies the environment, validates.
pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
    load_over(toml::Table::new(), file, env)
}

/// As [`load`], over `base`: settings of a command's own defaults (`gridsense demo`'s), which
/// the file overrides key by key, and the environment the file. Precedence, lowest first: the
/// built-in defaults, `base`, the file, `GRIDSENSE_*`.
pub fn load_over(
    base: toml::Table,
    file: Option<&Path>,
    env: &[(String, String)],
) -> Result<Config, ConfigError> {
    let name = file.map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { file: name.clone(), source })?,
        None => String::new(),
    };
    let from_file: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        file: name.clone(),
        key: "(document)".into(),
        message: e.message().to_owned(),
    })?;
    let mut table = base;
    for (section, value) in from_file {
        match (table.get_mut(&section), value) {
            (Some(toml::Value::Table(under)), toml::Value::Table(over)) => under.extend(over),
            (_, value) => {
                table.insert(section, value);
            }
        }
    }
    apply_env(&mut table, env)?;
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigError::Invalid {
                file: name.clone(),
                key: e.path().to_string(),
                message: e.inner().message().to_owned(),
            }
        })?;
    config.validate().map_err(|(key, message)| ConfigError::Invalid {
        file: name,
        key: key.into(),
        message,
    })?;
    Ok(config)
}

/// Merges `GRIDSENSE_<SECTION>_<KEY>` variables into the table. Values parse as TOML when they
/// can (numbers, booleans) and as strings otherwise.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Invalid {
        file: "environment".into(),
        key: "(defaults)".into(),
        message: e.to_string(),
    })?;
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
        let found = defaults.iter().find_map(|(section, keys)| {
            let keys = keys.as_table()?;
            let key_part = rest.strip_prefix(&section.to_ascii_uppercase())?.strip_prefix('_')?;
            keys.keys()
                .find(|k| k.to_ascii_uppercase() == key_part)
                .map(|k| (section.clone(), k.clone()))
        });
        let Some((section, key)) = found else {
            return Err(ConfigError::Invalid {
                file: "environment".into(),
                key: var.clone(),
                message: "no such setting".into(),
            });
        };
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        // A string setting keeps the text even if it looks like a number.
        let parsed = match defaults.get(&section).and_then(|s| s.get(&key)) {
            Some(toml::Value::String(_)) => toml::Value::String(value.clone()),
            _ => parsed,
        };
        let entry = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(section_table) = entry.as_table_mut() {
            section_table.insert(key, parsed);
        }
    }
    Ok(())
}

impl Config {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.mqtt.url.is_empty() {
            parse_url(&self.mqtt.url).map_err(|e| ("mqtt.url", e.to_string()))?;
        }
        if !self.mqtt.urls.is_empty() && !self.mqtt.url.is_empty() {
            return Err(("mqtt.urls", "give either url or urls, not both".into()));
        }
        if self.mqtt.urls.len() > 2 {
            return Err(("mqtt.urls", "at most two brokers".into()));
        }
        for u in &self.mqtt.urls {
            parse_url(u).map_err(|e| ("mqtt.urls", e.to_string()))?;
        }
        let tls: Vec<bool> = self.mqtt.brokers().iter().map(|u| is_tls(u)).collect();
        if tls.iter().any(|t| Some(t) != tls.first()) {
            return Err(("mqtt.urls", "both brokers mqtt:// or both mqtts://".into()));
        }
        let any_tls = tls.first().copied().unwrap_or(false);
        match (any_tls, self.mqtt.ca_file.is_empty()) {
            (true, true) => {
                return Err((
                    "mqtt.ca_file",
                    "mqtts:// needs the CA that signed the broker's certificate".into(),
                ));
            }
            (false, false) => {
                return Err(("mqtt.ca_file", "is for TLS: use an mqtts:// url".into()));
            }
            _ => {}
        }
        if self.http.tls_cert.is_empty() != self.http.tls_key.is_empty() {
            return Err(("http.tls_key", "tls_cert and tls_key go together".into()));
        }
        if self.mqtt.client_id.is_empty() {
            return Err(("mqtt.client_id", "must not be empty".into()));
        }
        if self.cluster.shards == 0 || self.cluster.shards > gridsense_protocol::topic::MAX_SHARDS {
            return Err(("cluster.shards", "must be between 1 and 256".into()));
        }
        if self.cluster.renew_ms == 0
            || self.cluster.renew_ms.saturating_mul(2) > self.cluster.lease_ms
        {
            return Err((
                "cluster.renew_ms",
                "must be > 0 and at most half of cluster.lease_ms (a lease must survive a missed renewal)"
                    .into(),
            ));
        }
        if self.cluster.instance_id.len() > 64
            || self.cluster.instance_id.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(("cluster.instance_id", "at most 64 characters, no spaces".into()));
        }
        if self.mqtt.inflight == 0 {
            return Err(("mqtt.inflight", "must be at least 1".into()));
        }
        // Room for the largest frame, its topic and the packet's headers and properties; at
        // most MQTT's own limit (a four-byte remaining length).
        if !(1_024..=268_435_455).contains(&self.mqtt.max_packet_bytes) {
            return Err(("mqtt.max_packet_bytes", "must be between 1024 and 268435455".into()));
        }
        if self.mqtt.reconnect_min_ms == 0
            || self.mqtt.reconnect_min_ms > self.mqtt.reconnect_max_ms
        {
            return Err(("mqtt.reconnect_min_ms", "must be > 0 and ≤ reconnect_max_ms".into()));
        }
        if self.store.batch_max == 0 || self.store.batch_max > 100_000 {
            return Err(("store.batch_max", "must be between 1 and 100000".into()));
        }
        if self.store.audit_max == 0 {
            return Err(("store.audit_max", "must be at least 1".into()));
        }
        if !(self.geo.tolerance_m >= 0.0 && self.geo.tolerance_m <= 10_000.0) {
            return Err(("geo.tolerance_m", "must be between 0 and 10000".into()));
        }
        if !(12..=20).contains(&self.geo.grid_code_digits) {
            return Err(("geo.grid_code_digits", "must be between 12 and 20".into()));
        }
        if !matches!(self.http.auth.as_str(), "tokens" | "off") {
            return Err(("http.auth", format!("{:?}: \"tokens\" or \"off\"", self.http.auth)));
        }
        if self.http.body_limit == 0 || self.http.timeout_ms == 0 {
            return Err(("http.body_limit", "body_limit and timeout_ms must be > 0".into()));
        }
        if self.http.header_timeout_ms == 0 {
            return Err(("http.header_timeout_ms", "must be > 0".into()));
        }
        if !(1..=1_000_000).contains(&self.http.max_connections) {
            return Err(("http.max_connections", "must be between 1 and 1000000".into()));
        }
        let c = &self.cases;
        if !matches!(c.coordinates.as_str(), "wgs84" | "gcj02") {
            return Err((
                "cases.coordinates",
                format!("{:?}: \"wgs84\" or \"gcj02\"", c.coordinates),
            ));
        }
        if c.platform != Platform::Local {
            let url = reqwest::Url::parse(&c.url)
                .map_err(|e| ("cases.url", format!("{:?}: {e}", c.url)))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(("cases.url", format!("{:?} is not http(s)", c.url)));
            }
        }
        if c.platform == Platform::Webhook && c.secret.is_empty() {
            return Err((
                "cases.secret",
                "the webhook platform needs a secret to sign with".into(),
            ));
        }
        if c.timeout_ms == 0 || c.retry_min_ms == 0 || c.retry_min_ms > c.retry_max_ms {
            return Err((
                "cases.retry_min_ms",
                "timeout_ms > 0 and 0 < retry_min_ms ≤ retry_max_ms".into(),
            ));
        }
        if !(1..=64).contains(&c.concurrency) {
            return Err(("cases.concurrency", "must be between 1 and 64".into()));
        }
        if c.services_refresh_s == 0 {
            return Err(("cases.services_refresh_s", "must be at least 1".into()));
        }
        if self.downlink.max_attempts == 0 || self.downlink.poll_ms == 0 {
            return Err(("downlink.max_attempts", "max_attempts and poll_ms must be > 0".into()));
        }
        // Devices keep 16 frames and resend after 60 s (firmware `confirm`): a window must
        // come before either runs out.
        if !(1..=8).contains(&self.downlink.confirm_every_frames) {
            return Err((
                "downlink.confirm_every_frames",
                "must be 1 … 8: devices hold 16 unconfirmed frames".into(),
            ));
        }
        if !(1..=50).contains(&self.downlink.confirm_every_s) {
            return Err((
                "downlink.confirm_every_s",
                "must be 1 … 50: devices resend what no window held after 60 s".into(),
            ));
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            return Err((
                "http.listen",
                format!("{:?} is not HOST:PORT (an IP address and a port)", self.http.listen),
            ));
        }
        let t = &self.telemetry;
        if t.sink == Sink::Influxdb {
            let url = reqwest::Url::parse(&t.url)
                .map_err(|e| ("telemetry.url", format!("{:?}: {e}", t.url)))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(("telemetry.url", format!("{:?} is not http(s)://HOST:PORT", t.url)));
            }
            if t.bucket.is_empty() {
                return Err(("telemetry.bucket", "must not be empty".into()));
            }
        }
        if t.batch_max == 0 || t.timeout_ms == 0 || t.buffer_max_points == 0 {
            return Err((
                "telemetry.batch_max",
                "batch_max, timeout_ms and buffer_max_points must be > 0".into(),
            ));
        }
        if t.retry_min_ms == 0 || t.retry_min_ms > t.retry_max_ms {
            return Err(("telemetry.retry_min_ms", "must be > 0 and ≤ retry_max_ms".into()));
        }
        if !(self.health.offline_factor >= 1.0 && self.health.offline_factor <= 100.0) {
            return Err(("health.offline_factor", "must be between 1 and 100".into()));
        }
        for (key, v) in [
            ("health.cover_interval_s", self.health.cover_interval_s),
            ("health.drain_interval_s", self.health.drain_interval_s),
            ("health.beacon_interval_s", self.health.beacon_interval_s),
        ] {
            if v == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gridsense.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_are_valid_and_a_file_overrides_them() {
        assert_eq!(load(None, &[]).unwrap(), Config::default());
        let (_d, path) = write("[store]\nbatch_max = 50\nsynchronous = \"full\"\n");
        let config = load(Some(&path), &[]).unwrap();
        assert_eq!(config.store.batch_max, 50);
        assert_eq!(config.store.synchronous, Synchronous::Full);
        assert_eq!(config.mqtt, Mqtt::default());
    }

    #[test]
    fn the_example_file_documents_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gridsense.example.toml");
        assert_eq!(load(Some(&path), &[]).unwrap(), Config::default());
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let (_d, path) = write("[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n");
        let env = vec![
            ("GRIDSENSE_MQTT_URL".to_owned(), "mqtt://127.0.0.1:2".to_owned()),
            ("GRIDSENSE_HEALTH_OFFLINE_FACTOR".to_owned(), "3.5".to_owned()),
            ("GRIDSENSE_MQTT_PASSWORD".to_owned(), "12345".to_owned()),
            ("GRIDSENSE_STORE_URL".to_owned(), "postgres://g@127.0.0.1:5/g".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ];
        let config = load(Some(&path), &env).unwrap();
        assert_eq!(config.mqtt.url, "mqtt://127.0.0.1:2");
        assert_eq!(config.mqtt.password, "12345");
        assert_eq!(config.store.url, "postgres://g@127.0.0.1:5/g");
        assert!((config.health.offline_factor - 3.5).abs() < 1e-9);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let (_d, path) = write("[store]\nbatch_maximum = 5\n");
        let err = load(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("batch_maximum"), "{err}");
        let (_d, path) = write("[store]\nbatch_max = \"many\"\n");
        let err = load(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("store.batch_max"), "{err}");
        let (_d, path) = write("[health]\noffline_factor = 0.5\n");
        let err = load(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("health.offline_factor"), "{err}");
        let err = load(None, &[("GRIDSENSE_MQTT_URI".into(), "x".into())]).unwrap_err().to_string();
        assert!(err.contains("GRIDSENSE_MQTT_URI") && err.contains("no such setting"), "{err}");
        let err = load(None, &[("GRIDSENSE_MQTT_URL".into(), "http://x".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("mqtt.url"), "{err}");
        let env = [
            ("GRIDSENSE_TELEMETRY_SINK".to_owned(), "influxdb".to_owned()),
            ("GRIDSENSE_TELEMETRY_URL".to_owned(), "localhost".to_owned()),
        ];
        let err = load(None, &env).unwrap_err().to_string();
        assert!(err.contains("telemetry.url"), "{err}");
        let (_d, path) = write("[store\n");
        assert!(load(Some(&path), &[]).is_err());
    }

    #[test]
    fn two_brokers_are_named_by_urls_and_checked() {
        let (_d, path) = write("[mqtt]\nurls = [\"mqtt://127.0.0.1:1\", \"mqtt://127.0.0.1:2\"]\n");
        let c = load(Some(&path), &[]).unwrap();
        assert_eq!(c.mqtt.brokers(), ["mqtt://127.0.0.1:1", "mqtt://127.0.0.1:2"]);
        for (text, says) in [
            ("url = \"mqtt://127.0.0.1:1\"\nurls = [\"mqtt://127.0.0.1:2\"]", "not both"),
            ("urls = [\"mqtt://a:1\", \"mqtt://b:1\", \"mqtt://c:1\"]", "at most two"),
            ("urls = [\"mqtt://127.0.0.1:1\", \"mqtts://127.0.0.1:2\"]", "both brokers"),
            ("urls = [\"http://127.0.0.1:1\"]", "mqtt.urls"),
        ] {
            let (_d, path) = write(&format!("[mqtt]\n{text}\n"));
            let err = load(Some(&path), &[]).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("mqtt.urls"), "{text}: {err}");
        }
        assert!(Config::default().mqtt.brokers().is_empty(), "none: the embedded broker");
    }
}

/// A broker URL that is not `mqtt://HOST:PORT`.
#[derive(Debug, thiserror::Error)]
#[error("{url:?} is not mqtt://HOST:PORT ({why})")]
pub struct UrlError {
    url: String,
    why: String,
}

/// `mqtt://HOST:PORT` to a socket address.
pub fn parse_url(url: &str) -> Result<SocketAddr, UrlError> {
    let bad = |why: &str| UrlError { url: url.to_owned(), why: why.to_owned() };
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("mqtts://"))
        .ok_or_else(|| bad("scheme must be mqtt:// or mqtts://"))?;
    if rest.contains('/') || rest.contains('@') || !rest.contains(':') {
        return Err(bad("expected HOST:PORT after the scheme"));
    }
    rest.to_socket_addrs().map_err(|e| bad(&e.to_string()))?.next().ok_or_else(|| bad("no address"))
}

/// Whether a broker URL asks for TLS.
pub fn is_tls(url: &str) -> bool {
    url.starts_with("mqtts://")
}

/// The key file used when `store.key_file` is empty: beside the database (`PATH.key`).
pub fn default_key_file(store_path: &Path) -> PathBuf {
    let mut name = store_path.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}
