//! SQLite storage, the embedded default: registry, counter windows, health and its events,
//! accepted messages, telemetry, and the bounded audit log of rejected frames. WAL journal;
//! `synchronous=NORMAL` survives a crash or `kill -9` of the gateway, `FULL` a power cut.
//!
//! Writes come in batches ([`Batch`]), one transaction each (group commit): the ingest shell
//! acknowledges a batch's MQTT messages only after [`Store::commit`] returns. Schema changes are
//! numbered migrations run at open (`PRAGMA user_version`). The interface is narrow so that a
//! PostgreSQL backend can implement the same for multi-instance deployments.

mod board;
mod case_lookup;
mod cases;
pub mod governance;
mod ingest;
pub mod keys;
mod leases;
mod maintenance;
pub mod migrate;
mod ops;
mod outbox;
pub mod postgres;
mod queries;
mod registry;
mod telemetry;
mod tokens;
pub mod turns;

pub use board::CaseBoard;
pub use case_lookup::CaseLookup;
pub use governance::{Escalated, Governance};
pub use ingest::IngestStore;
pub use leases::Leases;
pub use maintenance::Maintenance;
pub use outbox::{OUTBOX_CLAIM_MS, Outbox};
pub use queries::Queries;
pub use registry::Registry;
pub use telemetry::TelemetryBuffer;
pub use tokens::Tokens;

use std::{collections::BTreeMap, path::Path};

pub use cases::{
    AlertView, CallbackOutcome, CaseFilter, CaseView, ClusterMember, OutboxEntry, OutboxView,
    TraceEntry, TransitionError,
};
pub use ops::{
    DeviceDetail, DeviceFilter, DevicePage, DeviceRow, Fix, FrameVerdict, GridCounts, IncidentView,
    MapDevice, Placement, Stats,
};

use gridsense_common::inventory::Device as InventoryDevice;
use gridsense_protocol::{CounterWindow, DeviceKey, Eui};
use rusqlite::{Connection, OptionalExtension};

pub use gridsense_core::batch::{
    AuditRecord, Batch, MessageRecord, Point, RECENT_FRAME_SLOTS, RecentFrame, RegistryChange,
};

use crate::{
    config::Synchronous,
    downlink::{Pending, Request, RequestUpdate},
    health::DeviceHealth,
    registry::{ImportReport, Kind, Registered},
};

/// The registry's kind of an inventory record's kind.
pub fn kind_of(k: gridsense_common::inventory::Kind) -> Kind {
    use gridsense_common::inventory::Kind as K;
    match k {
        K::Cover => Kind::Cover,
        K::Drain => Kind::Drain,
        K::Beacon => Kind::Beacon,
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The folder for the database could not be made.
    #[error("store: {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The database is newer than this gateway.
    #[error("store: schema version {found} is newer than this gateway's {supported}")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest this code knows.
        supported: i64,
    },
    /// PostgreSQL said no, or could not be reached.
    #[error("store (PostgreSQL): {what}")]
    Postgres {
        /// What failed, with the server's message.
        what: String,
        /// Whether it may pass by itself (the server gone or restarting).
        transient: bool,
    },
    /// A batch decided under shard leases this instance no longer holds (another claimed
    /// them): refused, nothing of it written.
    #[error(
        "{instance} no longer holds {lost} of the shards this batch was decided under: refused, nothing written"
    )]
    Fenced {
        /// The instance.
        instance: String,
        /// Shards it lost.
        lost: u64,
    },
    /// The store was made for another number of shards than `[cluster] shards` says.
    #[error(
        "the store was made with {stored} shards and [cluster] shards is {configured}: a store's shards are fixed when it is made (a device's shard, and so its topic, would change); set cluster.shards = {stored}"
    )]
    Shards {
        /// What the store holds.
        stored: u16,
        /// What the configuration says.
        configured: u16,
    },
    /// Another process holds the store (a running gateway, a migration).
    #[error("store {path} is in use: a gateway (or a migration) holds {lock}; stop it first")]
    Busy {
        /// The store.
        path: String,
        /// Its lock file.
        lock: String,
    },
    /// A migration between stores cannot go on.
    #[error("store migrate: {0}")]
    Migrate(String),
    /// The key file that seals device secrets cannot be used.
    #[error("store.key_file {path}: {what}")]
    KeyFile {
        /// The key file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The store's device secrets were sealed with another key.
    #[error(
        "store.key_file {path} is not the key this store's device secrets were sealed with (restore the original key file or point store.key_file at it)"
    )]
    WrongKey {
        /// The key file tried.
        path: String,
    },
    /// A blocking store task did not finish (panicked or cancelled).
    #[error("store task: {0}")]
    Task(String),
    /// A row does not decode.
    #[error("store: bad row in {table}: {what}")]
    BadRow {
        /// The table.
        table: &'static str,
        /// What is wrong.
        what: String,
    },
}

impl StoreError {
    /// Whether a failed operation may succeed later unchanged: SQLite's disk (or quota) full,
    /// a write failed at the I/O layer, the database locked past the busy wait; PostgreSQL
    /// gone, restarting, out of disk or a serialization failure.
    pub fn is_transient(&self) -> bool {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked, DiskFull, SystemIoFailure};
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                matches!(f.code, DiskFull | SystemIoFailure | DatabaseBusy | DatabaseLocked)
            }
            StoreError::Postgres { transient, .. } => *transient,
            _ => false,
        }
    }
}

/// Schema migrations, in order; index + 1 is the version they bring the file to.
const MIGRATIONS: &[&str] = &[
    // 1: registry, counters, health, events, messages, telemetry, audit, reject counts.
    "CREATE TABLE devices (
        eui INTEGER PRIMARY KEY,
        eui_hex TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        key BLOB NOT NULL,
        mqtt_password TEXT NOT NULL,
        lat REAL NOT NULL,
        lon REAL NOT NULL,
        component_code TEXT,
        minor_class TEXT,
        grid_code TEXT,
        well_depth_mm INTEGER,
        warn_mm INTEGER,
        alarm_mm INTEGER,
        status TEXT NOT NULL DEFAULT 'active',
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE counters (eui INTEGER PRIMARY KEY, highest INTEGER, seen INTEGER NOT NULL);
    CREATE TABLE health (
        eui INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        last_seen_ms INTEGER,
        last_counter INTEGER,
        battery_mv INTEGER,
        rssi_dbm INTEGER,
        temperature_dc INTEGER,
        firmware TEXT,
        uptime_s INTEGER,
        frames INTEGER NOT NULL,
        rejects INTEGER NOT NULL,
        skipped INTEGER NOT NULL,
        online INTEGER NOT NULL,
        low_battery INTEGER NOT NULL,
        deadline_ms INTEGER
    );
    CREATE TABLE health_events (id INTEGER PRIMARY KEY, eui INTEGER NOT NULL, at_ms INTEGER NOT NULL, event TEXT NOT NULL);
    CREATE INDEX health_events_eui ON health_events (eui, at_ms);
    CREATE TABLE messages (
        eui INTEGER NOT NULL,
        counter INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (eui, counter)
    ) WITHOUT ROWID;
    CREATE TABLE telemetry (
        eui INTEGER NOT NULL,
        measurement TEXT NOT NULL,
        field TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (eui, measurement, field, at_ms)
    ) WITHOUT ROWID;
    CREATE INDEX telemetry_time ON telemetry (at_ms);
    CREATE TABLE audit (id INTEGER PRIMARY KEY, received_ms INTEGER NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, eui INTEGER, raw BLOB NOT NULL);
    CREATE TABLE reject_counts (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
    CREATE TABLE stats (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    // 2: the on-disk buffer in front of an external telemetry sink.
    "CREATE TABLE telemetry_buffer (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        eui INTEGER NOT NULL,
        kind TEXT NOT NULL,
        measurement TEXT NOT NULL,
        field TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        value REAL NOT NULL
    );",
    // 3: device lifecycle: which device replaced a retired one.
    "ALTER TABLE devices ADD COLUMN replaced_by INTEGER;",
    // 4: downlinks: counters per device, operators' requests and their fate.
    "CREATE TABLE downlink_counters (eui INTEGER PRIMARY KEY, next INTEGER NOT NULL);
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        eui INTEGER NOT NULL,
        kind TEXT NOT NULL,
        settings TEXT NOT NULL,
        requested_ms INTEGER NOT NULL,
        counter INTEGER,
        sent_ms INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        done_ms INTEGER,
        outcome TEXT
    );",
    // 5: grid tags on telemetry.
    "ALTER TABLE telemetry ADD COLUMN grid_code TEXT;
    ALTER TABLE telemetry_buffer ADD COLUMN grid_code TEXT;
    ALTER TABLE telemetry_buffer ADD COLUMN street_code TEXT;",
    // 6: rules, incidents, cases and their trace, the delivery outbox, alerts, patrols,
    // maintenance windows.
    cases::MIGRATION,
    // 7: operators' views: placements, beacons' last fixes, indexes for per-device pages.
    ops::MIGRATION,
    // 8: a log of registry changes, so a running gateway picks them up (keys, retirements,
    // new and moved devices).
    "CREATE TABLE registry_log (id INTEGER PRIMARY KEY, eui INTEGER NOT NULL);
    CREATE TRIGGER devices_logged_insert AFTER INSERT ON devices BEGIN INSERT INTO registry_log (eui) VALUES (NEW.eui); END;
    CREATE TRIGGER devices_logged_update AFTER UPDATE ON devices BEGIN INSERT INTO registry_log (eui) VALUES (NEW.eui); END;",
    // 9: operators' API tokens, stored as SHA-256 hashes.
    "CREATE TABLE api_tokens (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created_ms INTEGER NOT NULL, revoked_ms INTEGER
    );",
    // 10: signatures of the platform callbacks taken, so a replay within the signature's
    // validity is refused (kept a little longer than that validity, then pruned).
    "CREATE TABLE callback_signatures (signature TEXT PRIMARY KEY, seen_ms INTEGER NOT NULL);",
    // 11: the last telemetry frames of each device (readings, fixes, backlogs, whose values
    // are telemetry and are not kept as messages), newest first: [`RECENT_FRAME_SLOTS`]
    // entries of [`RECENT_ENTRY_HEX`] hex digits. A table of its own: in the health row, which
    // every accepted frame rewrites, the longer row cost 10 % of the throughput.
    "CREATE TABLE recent_frames (eui INTEGER PRIMARY KEY, list TEXT NOT NULL);",
    // 12: facts about the store itself: the check value of the key that seals device secrets
    // (`keys`); the secrets of older stores are sealed at open.
    "CREATE TABLE store_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);",
    // 13: departments, handling levels, supervision, the report's milestones; grid workers.
    cases::governance_migration!("INTEGER"),
];

/// Hex digits per entry: counter (8), arrival in Unix ms (12), message kind (2), samples (2).
pub const RECENT_ENTRY_HEX: usize = 24;

/// The kinds an entry names, by their index in the uplink message enum.
const RECENT_KINDS: [&str; 11] = [
    "cover_reading",
    "drain_reading",
    "status",
    "alarm",
    "alarm_cleared",
    "backlog_batch",
    "patrol_fix",
    "checkin",
    "incident_report",
    "sos",
    "downlink_ack",
];

/// Appends a recent frame's entry (its hex digits) to `out`.
fn write_recent_hex(r: &RecentFrame, out: &mut String) {
    use std::fmt::Write as _;
    let kind = RECENT_KINDS.iter().position(|k| *k == r.kind).unwrap_or(0xff);
    let ms = u64::try_from(r.received_ms).unwrap_or(0) & 0xffff_ffff_ffff;
    let _ = write!(out, "{:08x}{ms:012x}{kind:02x}{:02x}", r.counter, r.samples.min(0xff));
}

/// The entries of a stored list of recent frames, newest first (what does not parse is left
/// out).
pub fn parse_recent_list(eui: Eui, text: &str) -> Vec<RecentFrame> {
    let field = |t: &str, range: std::ops::Range<usize>| {
        t.get(range).and_then(|h| u64::from_str_radix(h, 16).ok())
    };
    text.as_bytes()
        .chunks(RECENT_ENTRY_HEX)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .filter_map(|t| {
            Some(RecentFrame {
                eui,
                counter: u32::try_from(field(t, 0..8)?).ok()?,
                received_ms: i64::try_from(field(t, 8..20)?).ok()?,
                kind: RECENT_KINDS.get(usize::try_from(field(t, 20..22)?).ok()?)?,
                samples: u16::try_from(field(t, 22..24)?).ok()?,
            })
        })
        .collect()
}

/// A telemetry point waiting in the buffer for the external sink.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferedPoint {
    /// Buffer position.
    pub id: i64,
    /// Device.
    pub eui: Eui,
    /// Kind name.
    pub kind: String,
    /// Measurement.
    pub measurement: String,
    /// Field.
    pub field: String,
    /// Sample time, Unix ms.
    pub at_ms: i64,
    /// Value.
    pub value: f64,
    /// Grid code tag.
    pub grid: Option<String>,
    /// Street code tag.
    pub street: Option<String>,
}

/// An API token as listed: name, role, created, revoked (Unix ms).
pub type TokenRow = (String, String, i64, Option<i64>);

/// Totals kept in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Frames accepted since the store was made.
    pub accepted: u64,
    /// Rejects by reason.
    pub rejects: BTreeMap<String, u64>,
}

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    audit_max: u64,
    /// `Some(bound)`: telemetry goes to the buffer for an external sink, at most `bound` points.
    buffer_max: Option<u64>,
    /// Seals and opens device secrets.
    keys: keys::KeyRing,
    /// This process's writers of the file take turns ([`turns`]).
    turns: std::sync::Arc<turns::WriteTurns>,
}

/// SQLite's busy handler: another connection holds the write lock. Retried every
/// millisecond for up to five seconds. (`busy_timeout` backs off to 100 ms sleeps: a delivery
/// worker or an operator's request waiting for the ingest task's commit to end would then
/// wake up to 100 ms after it did, and an alarm's case would wait as long to reach the board.)
fn wait_for_lock(attempt: i32) -> bool {
    if attempt >= 5_000 {
        return false;
    }
    std::thread::sleep(std::time::Duration::from_millis(1));
    true
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The background checkpoint thread of [`Store::checkpoint_in_background`]; dropping it stops
/// the thread.
#[derive(Debug)]
pub struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A device kind stored by name in column `i` of a row of `table`.
pub(crate) fn kind_column(
    row: &rusqlite::Row<'_>,
    i: usize,
    table: &'static str,
) -> Result<Kind, StoreError> {
    let name = row.get_ref(i)?.as_str().map_err(rusqlite::Error::from)?;
    kind_named(name, table)
}

/// An operator's request as both stores keep it: its kind and its settings (JSON).
pub(crate) fn request_columns(request: &Request) -> (&'static str, String) {
    match request {
        Request::Configure(settings) => {
            ("configure", serde_json::to_string(settings).unwrap_or_default())
        }
        Request::StatusRequest => ("status_request", "[]".to_owned()),
    }
}

/// The request stored as `kind` and `settings` ([`request_columns`]).
pub(crate) fn request_from(kind: &str, settings: &str) -> Result<Request, StoreError> {
    let bad = |what: String| StoreError::BadRow { table: "requests", what };
    match kind {
        "configure" => {
            Ok(Request::Configure(serde_json::from_str(settings).map_err(|e| bad(e.to_string()))?))
        }
        "status_request" => Ok(Request::StatusRequest),
        other => Err(bad(format!("kind {other:?}"))),
    }
}

/// A device kind stored by `name` in `table` (either store).
pub(crate) fn kind_named(name: &str, table: &'static str) -> Result<Kind, StoreError> {
    Kind::parse(name).ok_or_else(|| StoreError::BadRow { table, what: format!("kind {name:?}") })
}

/// The store holds every device's frame key and MQTT password: its file is created readable by
/// its owner only (0600), and an existing one (with its `-wal` and `-shm`, which SQLite creates
/// with the database's mode) is tightened to that.
fn private_files(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let io = |p: &Path, source| StoreError::Io { path: p.display().to_string(), source };
        if !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| io(path, e))?;
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = std::path::PathBuf::from(name);
            if let Ok(meta) = std::fs::metadata(&file)
                && meta.permissions().mode() & 0o077 != 0
            {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| io(&file, e))?;
            }
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating) the database at `path` and brings its schema up to date. The file is
    /// private to its owner (`private_files`).
    pub fn open(path: &Path, synchronous: Synchronous, audit_max: u64) -> Result<Self, StoreError> {
        Self::open_keyed(path, synchronous, audit_max, &keys::default_key_file(path))
    }

    /// [`Store::open`] with device secrets sealed by the key in `key_file` (created when
    /// absent).
    pub fn open_keyed(
        path: &Path,
        synchronous: Synchronous,
        audit_max: u64,
        key_file: &Path,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| StoreError::Io { path: dir.display().to_string(), source })?;
        }
        private_files(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match synchronous {
                Synchronous::Normal => "NORMAL",
                Synchronous::Full => "FULL",
            },
        )?;
        conn.busy_handler(Some(wait_for_lock))?;
        // Statement journals (upserts inside a batch) in memory, not in temporary files; a page
        // cache large enough that a batch's dirty pages are not spilled before its commit.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", -16_384)?;
        let keys = keys::KeyRing::load_or_create(key_file)?;
        let turns = turns::WriteTurns::of(path);
        let mut store = Store { conn, audit_max, buffer_max: None, keys, turns };
        store.migrate()?;
        store.seal_secrets()?;
        Ok(store)
    }

    /// Moves WAL checkpoints off this connection's commits onto a thread of their own (with
    /// its own connection), run every `every`: an automatic checkpoint inside a commit copies
    /// and fsyncs up to a thousand pages while the batch's acknowledgements (and any alarm in
    /// it) wait. The thread ends when the returned handle is dropped.
    pub fn checkpoint_in_background(
        &mut self,
        every: std::time::Duration,
    ) -> Result<Checkpointer, StoreError> {
        let path = self.conn.path().unwrap_or_default().to_owned();
        let conn = Connection::open(&path)?;
        conn.busy_handler(Some(wait_for_lock))?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    // PASSIVE never waits for the writer or readers; what it could not copy is
                    // copied next time. A failure (a full disk) is logged, not fatal: the WAL
                    // keeps the data.
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!("WAL checkpoint: {e}");
                    }
                }
            })
            .map_err(|source| StoreError::Io { path, source })?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread) })
    }

    /// Sends telemetry to the buffer of an external sink (holding at most `max_points`)
    /// instead of the embedded telemetry table.
    pub fn buffer_telemetry(&mut self, max_points: u64) {
        self.buffer_max = Some(max_points);
    }

    /// The schema version of the file.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Checks that the key file is this store's (its check value opens) and seals what an
    /// older store kept in the clear, in one transaction.
    fn seal_secrets(&mut self) -> Result<(), StoreError> {
        // Immediate: two connections opening an older store at once do not both seal it.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let check: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM store_meta WHERE name = 'key_check'", [], |r| r.get(0))
            .optional()?;
        match check {
            Some(c) if !self.keys.opens_check(&c) => {
                return Err(StoreError::WrongKey { path: self.keys.path().display().to_string() });
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO store_meta (name, value) VALUES ('key_check', ?1)",
                    [self.keys.check_value()?],
                )?;
            }
        }
        let clear: Vec<(i64, Vec<u8>, String)> = tx
            .prepare(
                "SELECT eui, key, mqtt_password FROM devices
                 WHERE length(key) = 16 OR mqtt_password NOT LIKE 'sealed1:%'",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (eui_i, key, password) in clear {
            let eui = Eui(eui_i as u64);
            let key = match <[u8; 16]>::try_from(key.as_slice()) {
                Ok(k) => self.keys.seal_key(eui, &k)?,
                Err(_) => key,
            };
            let password = if keys::KeyRing::is_sealed_password(&password) {
                password
            } else {
                self.keys.seal_password(eui, &password)?
            };
            // The update trigger logs each row; a running gateway re-reads the same key.
            tx.execute(
                "UPDATE devices SET key = ?2, mqtt_password = ?3 WHERE eui = ?1",
                rusqlite::params![eui_i, key, password],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let current = self.schema_version()?;
        let supported = MIGRATIONS.len() as i64;
        if current > supported {
            return Err(StoreError::TooNew { found: current, supported });
        }
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", n as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A drain level point for tests.
    pub(super) fn level(eui: u64, at_ms: i64, value: f64) -> Point {
        Point {
            eui: Eui(eui),
            kind: Kind::Drain,
            measurement: "drain",
            field: "level_mm",
            at_ms,
            value,
            grid: None,
            street: None,
        }
    }

    fn inventory() -> Vec<InventoryDevice> {
        let city = gridsense_simulator::city::generate(
            1,
            gridsense_simulator::city::Counts { covers: 3, drains: 2, beacons: 1 },
        );
        let text = serde_json::to_string(&city.devices).unwrap();
        gridsense_simulator::inventory::parse("devices.json", &text).unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn the_store_and_its_journal_files_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let mut store = Store::open(&path, Synchronous::Normal, 10).unwrap();
        store.import(&inventory(), 1).unwrap();
        let wal = dir.path().join("g.db-wal");
        let shm = dir.path().join("g.db-shm");
        for p in [&path, &wal, &shm] {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
        drop(store);
        // A store made world-readable (by an older gateway) is tightened on open.
        for p in [&path, &wal, &shm] {
            if p.exists() {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        let _store = Store::open(&path, Synchronous::Normal, 10).unwrap();
        for p in [&path, &wal, &shm] {
            if p.exists() {
                assert_eq!(mode(p), 0o600, "{}", p.display());
            }
        }
    }

    #[test]
    fn a_device_keeps_its_newest_sixteen_telemetry_frames() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("g.db"), Synchronous::Normal, 10).unwrap();
        let devices = inventory();
        store.import(&devices, 1).unwrap();
        let eui = devices[0].eui;
        let health = DeviceHealth::new(Kind::Cover);
        for batch_no in 0..3u32 {
            let mut batch = Batch::default();
            batch.health.insert(eui, health.clone());
            for i in 0..8u32 {
                let n = batch_no * 8 + i;
                batch.recent.push(RecentFrame {
                    eui,
                    counter: n,
                    received_ms: 1_796_000_000_000 + i64::from(n),
                    kind: if n % 2 == 0 { "cover_reading" } else { "backlog_batch" },
                    samples: if n % 2 == 0 { 1 } else { 24 },
                });
            }
            store.commit(&batch).unwrap();
        }
        let text: String = store
            .conn
            .query_row("SELECT list FROM recent_frames WHERE eui = ?1", [eui.0 as i64], |r| {
                r.get(0)
            })
            .unwrap();
        let list = parse_recent_list(eui, &text);
        let counters: Vec<u32> = list.iter().map(|r| r.counter).collect();
        assert_eq!(counters, (8..24).rev().collect::<Vec<_>>(), "the newest 16, newest first");
        assert_eq!((list[0].kind, list[0].samples), ("backlog_batch", 24));
        assert_eq!(list[0].received_ms, 1_796_000_000_023);
        assert!(parse_recent_list(eui, "zz").is_empty(), "junk is left out");
    }

    #[test]
    fn a_new_key_forgets_the_counter_window_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("g.db"), Synchronous::Normal, 10).unwrap();
        let devices = inventory();
        store.import(&devices, 1).unwrap();
        let eui = devices[0].eui;
        let mut window = CounterWindow::new();
        window.accept(u32::MAX);
        let mut batch = Batch::default();
        batch.counters.insert(eui, window);
        store.commit(&batch).unwrap();
        assert!(store.counters().unwrap().iter().any(|(e, _)| *e == eui));
        assert!(store.rekey(eui, &DeviceKey::from_bytes([9; 16]), 2).unwrap());
        assert!(!store.counters().unwrap().iter().any(|(e, _)| *e == eui), "a fresh counter space");
    }

    #[test]
    fn import_is_idempotent_and_reports_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("g.db"), Synchronous::Normal, 10).unwrap();
        let mut devices = inventory();
        assert_eq!(
            store.import(&devices, 1).unwrap(),
            ImportReport { added: 6, updated: 0, unchanged: 0 }
        );
        assert_eq!(
            store.import(&devices, 2).unwrap(),
            ImportReport { added: 0, updated: 0, unchanged: 6 }
        );
        devices[0].record.lat += 0.001;
        assert_eq!(
            store.import(&devices, 3).unwrap(),
            ImportReport { added: 0, updated: 1, unchanged: 5 }
        );
        let registry = store.registry().unwrap();
        assert_eq!(registry.len(), 6);
        assert!(registry.iter().any(|r| r.eui == devices[0].eui && r.key == devices[0].key));
    }

    #[test]
    fn a_batch_survives_reopening_and_replayed_points_overwrite_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let mut batch = Batch::default();
        let mut w = CounterWindow::new();
        w.accept(41);
        batch.counters.insert(Eui(9), w);
        let point = level(9, 1_000, 5.0);
        batch.telemetry.push(point.clone());
        batch.telemetry.push(Point { value: 6.0, ..point });
        batch.accepted = 1;
        *batch.rejects.entry("bad_tag").or_default() += 2;
        {
            let mut store = Store::open(&path, Synchronous::Full, 10).unwrap();
            store.commit(&batch).unwrap();
            store.commit(&batch).unwrap();
        }
        let store = Store::open(&path, Synchronous::Normal, 10).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(store.counters().unwrap(), vec![(Eui(9), w)]);
        assert_eq!(store.telemetry_count(None).unwrap(), 1);
        let totals = store.totals().unwrap();
        assert_eq!((totals.accepted, totals.rejects["bad_tag"]), (2, 4));
    }

    #[test]
    fn the_audit_log_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("g.db"), Synchronous::Normal, 5).unwrap();
        for n in 0..4 {
            let mut batch = Batch::default();
            for k in 0..3 {
                batch.audit.push(AuditRecord {
                    received_ms: n * 10 + k,
                    topic: "gridsense/x/up".into(),
                    reason: "bad_topic",
                    eui: None,
                    raw: vec![1, 2, 3],
                });
            }
            store.commit(&batch).unwrap();
        }
        assert_eq!(store.audit_len().unwrap(), 5);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&path, Synchronous::Normal, 5),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}

#[cfg(test)]
mod buffer_tests {
    use super::*;

    #[test]
    fn the_buffer_keeps_the_newest_points_and_counts_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("g.db"), Synchronous::Normal, 10).unwrap();
        store.buffer_telemetry(5);
        for n in 0..4 {
            let mut batch = Batch::default();
            for k in 0..3 {
                let mut p = tests::level(1, n * 10 + k, 1.0);
                p.grid = Some("210202001001001".into());
                p.street = Some("210202001".into());
                batch.telemetry.push(p);
            }
            store.commit(&batch).unwrap();
        }
        assert_eq!(store.buffer_len().unwrap(), 5);
        assert_eq!(store.stat("telemetry_dropped").unwrap(), 7);
        let oldest = store.buffer_read(2).unwrap();
        assert_eq!(oldest.iter().map(|p| p.at_ms).collect::<Vec<_>>(), [21, 22]);
        assert_eq!(oldest[0].grid.as_deref(), Some("210202001001001"));
        store.buffer_delete_through(oldest[1].id).unwrap();
        assert_eq!(store.buffer_len().unwrap(), 3);
        assert_eq!(store.telemetry_count(None).unwrap(), 0);
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use super::*;

    #[test]
    fn retire_move_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("g.db"), Synchronous::Normal, 10).unwrap();
        let city = gridsense_simulator::city::generate(
            2,
            gridsense_simulator::city::Counts { covers: 2, drains: 0, beacons: 0 },
        );
        let devices = gridsense_simulator::inventory::parse(
            "d.json",
            &serde_json::to_string(&city.devices).unwrap(),
        )
        .unwrap();
        store.import(&devices, 0).unwrap();
        let (a, b) = (devices[0].eui, devices[1].eui);
        assert!(store.relocate(a, 38.9, 121.6, 1).unwrap());
        assert!(!store.relocate(Eui(1), 0.0, 0.0, 1).unwrap());
        let new = Eui(0x2102_0201_ffff_0001);
        let key = DeviceKey::from_bytes([9; 16]);
        assert!(store.replace(a, new, &key, "new-password-1", 2).unwrap());
        assert!(
            !store.replace(a, Eui(5), &key, "x", 3).unwrap(),
            "a replaced device cannot be replaced again"
        );
        assert!(store.retire(b, 4).unwrap());
        assert!(!store.retire(b, 5).unwrap());
        let active: Vec<Eui> = store.registry().unwrap().into_iter().map(|r| r.eui).collect();
        assert_eq!(active, vec![new]);
        assert_eq!(store.device_status(a).unwrap().as_deref(), Some("replaced"));
        assert_eq!(store.device_status(b).unwrap().as_deref(), Some("retired"));
        // The replacement watches the same object.
        let code: Option<String> = store
            .conn
            .query_row(
                "SELECT component_code FROM devices WHERE eui = ?1",
                rusqlite::params![new.0 as i64],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(code, devices[0].record.component_code);
        // Re-importing the city does not bring retired devices back.
        store.import(&devices, 6).unwrap();
        assert_eq!(store.registry().unwrap().len(), 1);
    }
}

#[cfg(test)]
mod retention_tests {
    use super::*;

    #[test]
    fn telemetry_past_its_retention_is_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("g.db"), Synchronous::Normal, 10).unwrap();
        let mut batch = Batch::default();
        for at_ms in [1_000, 2_000, 3_000, 4_000] {
            batch.telemetry.push(tests::level(1, at_ms, 1.0));
        }
        store.commit(&batch).unwrap();
        assert_eq!(store.prune_telemetry(3_000, 4_000).unwrap(), 2);
        assert_eq!(store.telemetry_count(None).unwrap(), 2);
    }
}

/// Every consumer's interface, for code that holds the whole store (start-up, tools, tests).
pub mod prelude {
    pub use super::{
        CaseBoard, CaseLookup, IngestStore, Maintenance, Outbox, Queries, Registry,
        TelemetryBuffer, Tokens,
    };
}

/// A fingerprint of a set of placements, whatever their order: a start whose placements match
/// the stored one writes nothing (rewriting a million rows took 3 s on SQLite, 7 s on
/// PostgreSQL, at every start). Two 64-bit sums of per-row hashes and the count.
/// The shards a store recorded (2 bytes, big-endian).
pub(crate) fn decode_shards(stored: &[u8]) -> Result<u16, StoreError> {
    <[u8; 2]>::try_from(stored).map(u16::from_be_bytes).map_err(|_| StoreError::BadRow {
        table: "store_meta",
        what: format!("shards: {} bytes, not 2", stored.len()),
    })
}

/// Compares the shards a store recorded (2 bytes, big-endian) with the configured number.
pub(crate) fn shards_agree(stored: &[u8], configured: u16) -> Result<u16, StoreError> {
    let stored = decode_shards(stored)?;
    if stored == configured { Ok(stored) } else { Err(StoreError::Shards { stored, configured }) }
}

pub(crate) fn placements_fingerprint(rows: &[Placement<'_>]) -> Vec<u8> {
    use std::hash::{Hash, Hasher};
    let (mut sum, mut mix) = (0u64, 0u64);
    for (eui, grid, community, street, distance) in rows {
        let mut h = std::hash::DefaultHasher::new();
        (eui.0, grid, community, street, distance.map(f64::to_bits)).hash(&mut h);
        let v = h.finish();
        sum = sum.wrapping_add(v);
        mix = mix.wrapping_add(v.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15);
    }
    let mut out = sum.to_le_bytes().to_vec();
    out.extend_from_slice(&mix.to_le_bytes());
    out.extend_from_slice(&(rows.len() as u64).to_le_bytes());
    out
}

/// Opens the store `[store]` names: PostgreSQL when `url` is set, else the SQLite file at
/// `path`; `buffer_max`: telemetry goes to the external sink's buffer (at most that many
/// points). `ingest`: this is the running gateway's ingest connection — on SQLite it holds
/// the store's lock (a second gateway, or a migration, on the same file is refused) and runs
/// the WAL checkpoints on a thread of its own, both for as long as the returned guard lives.
pub fn open(
    c: &crate::config::Store,
    buffer_max: Option<u64>,
    ingest: bool,
) -> Result<(Box<dyn Backend>, Option<IngestGuard>), StoreError> {
    if !c.url.is_empty() {
        let ca = (!c.ca_file.as_os_str().is_empty()).then_some(c.ca_file.as_path());
        let mut s = postgres::PgStore::open_tls(&c.url, &c.key_file(), c.audit_max, ca)?;
        if let Some(max) = buffer_max {
            s.buffer_telemetry(max);
        }
        return Ok((Box::new(s), None));
    }
    let lock = if ingest { Some(migrate::hold(&c.path)?) } else { None };
    let mut s = Store::open_keyed(&c.path, c.synchronous, c.audit_max, &c.key_file())?;
    if let Some(max) = buffer_max {
        s.buffer_telemetry(max);
    }
    let guard = match lock {
        Some(lock) => Some(IngestGuard {
            _checkpointer: s.checkpoint_in_background(std::time::Duration::from_millis(500))?,
            _lock: lock,
        }),
        None => None,
    };
    Ok((Box::new(s), guard))
}

/// What the ingest connection of a SQLite store holds while it runs: the store's lock and the
/// checkpoint thread.
#[derive(Debug)]
pub struct IngestGuard {
    _checkpointer: Checkpointer,
    _lock: std::fs::File,
}

/// Where `[store]` points, for messages (a URL without its password, or the file).
pub fn target(c: &crate::config::Store) -> String {
    if c.url.is_empty() { c.path.display().to_string() } else { postgres::redacted(&c.url) }
}

/// What the HTTP side (API, dashboard, board, Open311, auth) needs: operators' views and case
/// moves, and the tokens that let them in.
pub trait Operator: CaseBoard + Queries + Tokens + Leases + Governance + Send {}
impl<T: CaseBoard + Queries + Tokens + Leases + Governance + Send> Operator for T {}

/// A store that serves every consumer: what a backend opens.
pub trait Backend: IngestStore + Outbox + TelemetryBuffer + Registry + Operator + Leases {}
impl<T: IngestStore + Outbox + TelemetryBuffer + Registry + Operator + Leases> Backend for T {}
