//! SQLite storage, the embedded default: registry, counter windows, health and its events,
//! accepted messages, telemetry, and the bounded audit log of rejected frames. WAL journal;
//! `synchronous=NORMAL` survives a crash or `kill -9` of the gateway, `FULL` a power cut.
//!
//! Writes come in batches ([`Batch`]), one transaction each (group commit): the ingest shell
//! acknowledges a batch's MQTT messages only after [`Store::commit`] returns. Schema changes are
//! numbered migrations run at open (`PRAGMA user_version`). The interface is narrow so that a
//! PostgreSQL backend can implement the same for multi-instance deployments.

mod cases;
mod ops;

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
use rusqlite::{Connection, OptionalExtension, params};

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
        let mut store = Store { conn, audit_max, buffer_max: None };
        store.migrate()?;
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

    /// Adds or updates devices from an inventory; idempotent. Retired devices stay retired.
    pub fn import(
        &mut self,
        devices: &[InventoryDevice],
        now_ms: i64,
    ) -> Result<ImportReport, StoreError> {
        let tx = self.conn.transaction()?;
        let mut report = ImportReport::default();
        {
            let mut find = tx.prepare(
                "SELECT kind, key, mqtt_password, lat, lon, component_code, minor_class, grid_code,
                        well_depth_mm, warn_mm, alarm_mm FROM devices WHERE eui = ?1",
            )?;
            let mut upsert = tx.prepare(
                "INSERT INTO devices (eui, eui_hex, kind, key, mqtt_password, lat, lon, component_code,
                    minor_class, grid_code, well_depth_mm, warn_mm, alarm_mm, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (eui) DO UPDATE SET kind = ?3, key = ?4, mqtt_password = ?5, lat = ?6,
                    lon = ?7, component_code = ?8, minor_class = ?9, grid_code = ?10,
                    well_depth_mm = ?11, warn_mm = ?12, alarm_mm = ?13, updated_ms = ?14",
            )?;
            type Row = (
                String,
                Vec<u8>,
                String,
                f64,
                f64,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<u16>,
                Option<u16>,
                Option<u16>,
            );
            for d in devices {
                let r = &d.record;
                let kind = kind_of(r.kind).as_str().to_owned();
                let key = d.key.expose_bytes().to_vec();
                let wanted: Row = (
                    kind.clone(),
                    key.clone(),
                    r.mqtt_password.clone(),
                    r.lat,
                    r.lon,
                    r.component_code.clone(),
                    r.minor_class.clone(),
                    r.grid_code.clone(),
                    r.well_depth_mm,
                    r.warn_mm,
                    r.alarm_mm,
                );
                let existing: Option<Row> = find
                    .query_row(params![d.eui.0 as i64], |row| {
                        Ok((
                            row.get(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                            row.get(4)?,
                            row.get(5)?,
                            row.get(6)?,
                            row.get(7)?,
                            row.get(8)?,
                            row.get(9)?,
                            row.get(10)?,
                        ))
                    })
                    .optional()?;
                match existing {
                    Some(row) if row == wanted => {
                        report.unchanged += 1;
                        continue;
                    }
                    Some(_) => report.updated += 1,
                    None => report.added += 1,
                }
                upsert.execute(params![
                    d.eui.0 as i64,
                    r.eui,
                    kind,
                    key,
                    r.mqtt_password,
                    r.lat,
                    r.lon,
                    r.component_code,
                    r.minor_class,
                    r.grid_code,
                    r.well_depth_mm,
                    r.warn_mm,
                    r.alarm_mm,
                    now_ms
                ])?;
            }
        }
        tx.commit()?;
        Ok(report)
    }

    /// Active devices with their keys.
    pub fn registry(&self) -> Result<Vec<Registered>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT eui, kind, key FROM devices WHERE status = 'active'")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, Vec<u8>>(2)?))
        })?;
        rows.map(|row| {
            let (eui, kind, key) = row?;
            let kind = Kind::parse(&kind).ok_or_else(|| StoreError::BadRow {
                table: "devices",
                what: format!("kind {kind:?}"),
            })?;
            let key: [u8; 16] = key
                .try_into()
                .map_err(|_| StoreError::BadRow { table: "devices", what: "key length".into() })?;
            Ok(Registered { eui: Eui(eui as u64), kind, key: DeviceKey::from_bytes(key) })
        })
        .collect()
    }

    /// Records an operator's request for a device; the running gateway picks it up.
    pub fn add_request(
        &mut self,
        eui: Eui,
        request: &Request,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let (kind, settings) = match request {
            Request::Configure(settings) => {
                ("configure", serde_json::to_string(settings).unwrap_or_default())
            }
            Request::StatusRequest => ("status_request", "[]".to_owned()),
        };
        self.conn.execute(
            "INSERT INTO requests (eui, kind, settings, requested_ms) VALUES (?1, ?2, ?3, ?4)",
            params![eui.0 as i64, kind, settings, now_ms],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Requests not finished, with ids above `after`, oldest first.
    pub fn open_requests(&self, after: i64) -> Result<Vec<(Eui, Pending)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, eui, kind, settings, counter, sent_ms, attempts FROM requests
             WHERE done_ms IS NULL AND id > ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![after], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<u32>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, u32>(6)?,
            ))
        })?;
        rows.map(|row| {
            let (id, eui, kind, settings, counter, sent_ms, attempts) = row?;
            let request = match kind.as_str() {
                "configure" => {
                    Request::Configure(serde_json::from_str(&settings).map_err(|e| {
                        StoreError::BadRow { table: "requests", what: e.to_string() }
                    })?)
                }
                "status_request" => Request::StatusRequest,
                other => {
                    return Err(StoreError::BadRow {
                        table: "requests",
                        what: format!("kind {other:?}"),
                    });
                }
            };
            Ok((Eui(eui as u64), Pending { id, request, counter, sent_ms, attempts }))
        })
        .collect()
    }

    /// A request's outcome once finished (`applied`, `unsupported`, `invalid_value`, `sent`,
    /// `no_answer`), or `None` while open.
    pub fn request_outcome(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT outcome FROM requests WHERE id = ?1", params![id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?
            .flatten())
    }

    /// Persisted next downlink counters.
    pub fn downlink_counters(&self) -> Result<Vec<(Eui, u32)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT eui, next FROM downlink_counters")?;
        Ok(stmt
            .query_map([], |r| Ok((Eui(r.get::<_, i64>(0)? as u64), r.get(1)?)))?
            .collect::<Result<_, _>>()?)
    }

    /// Messages of one kind stored for a device (or all devices).
    pub fn message_count(&self, kind: &str) -> Result<u64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM messages WHERE kind = ?1",
            params![kind],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Retires an active device: it is no longer accepted. Returns whether it was active.
    pub fn retire(&mut self, eui: Eui, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE devices SET status = 'retired', updated_ms = ?2 WHERE eui = ?1 AND status = 'active'",
            params![eui.0 as i64, now_ms],
        )?;
        Ok(n == 1)
    }

    /// Gives an active device a new key; its counters are kept (a device re-keyed in the field
    /// continues its frame counter). Returns whether it was active.
    pub fn rekey(&mut self, eui: Eui, key: &DeviceKey, now_ms: i64) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE devices SET key = ?2, updated_ms = ?3 WHERE eui = ?1 AND status = 'active'",
            params![eui.0 as i64, key.expose_bytes().to_vec(), now_ms],
        )?;
        // Counters are per key (SPEC §4): the new key starts a new counter space.
        if n == 1 {
            tx.execute("DELETE FROM counters WHERE eui = ?1", [eui.0 as i64])?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    /// Adds an API token (its SHA-256 hash; the token itself is never stored). Returns false
    /// when the name is taken.
    pub fn add_token(
        &mut self,
        name: &str,
        role: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO api_tokens (name, role, hash, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, role, hash, now_ms],
        )?;
        Ok(n == 1)
    }

    /// The role of a live token, by hash.
    pub fn token_role(&self, hash: &str) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, role FROM api_tokens WHERE hash = ?1 AND revoked_ms IS NULL",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Tokens: name, role, created, revoked.
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, role, created_ms, revoked_ms FROM api_tokens ORDER BY name")?;
        Ok(stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?)
    }

    /// Revokes a token by name. Returns whether a live one was revoked.
    pub fn revoke_token(&mut self, name: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE api_tokens SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
            params![name, now_ms],
        )?;
        Ok(n == 1)
    }

    /// The last registry change's position (to watch from).
    pub fn registry_position(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM registry_log", [], |r| r.get(0))?)
    }

    /// Devices changed after position `after`, as they are now: active ones with their key,
    /// site and rule attributes; others (retired, replaced) without. Returns the new position.
    pub fn registry_changes(&self, after: i64) -> Result<(i64, Vec<RegistryChange>), StoreError> {
        let position = self.registry_position()?;
        if position <= after {
            return Ok((after, Vec::new()));
        }
        let mut stmt = self.conn.prepare(
            "SELECT d.eui, d.status, d.key FROM devices d
             WHERE d.eui IN (SELECT DISTINCT eui FROM registry_log WHERE id > ?1)",
        )?;
        let rows: Vec<(i64, String, Vec<u8>)> = stmt
            .query_map([after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let sites: std::collections::HashMap<Eui, (crate::cases::Site, crate::rules::Attributes)> =
            self.changed_sites(after)?.into_iter().map(|(e, s, a)| (e, (s, a))).collect();
        let mut out = Vec::with_capacity(rows.len());
        for (eui, status, key) in rows {
            let eui = Eui(eui as u64);
            let active = status == "active";
            let key: Option<[u8; 16]> = key.try_into().ok();
            match (active, key, sites.get(&eui)) {
                (true, Some(key), Some((site, attrs))) => out.push(RegistryChange {
                    eui,
                    active: Some((DeviceKey::from_bytes(key), site.clone(), *attrs)),
                }),
                _ => out.push(RegistryChange { eui, active: None }),
            }
        }
        Ok((position, out))
    }

    /// Moves a device to a new location. Returns whether it exists.
    pub fn relocate(
        &mut self,
        eui: Eui,
        lat: f64,
        lon: f64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE devices SET lat = ?2, lon = ?3, updated_ms = ?4 WHERE eui = ?1",
            params![eui.0 as i64, lat, lon, now_ms],
        )?;
        Ok(n == 1)
    }

    /// Replaces an active device by a new one on the same object (same location, component
    /// code, class, grid and levels), with its own EUI, key and password; the old one is
    /// retired and points to the new. Returns whether the old device was active.
    pub fn replace(
        &mut self,
        old: Eui,
        new: Eui,
        key: &DeviceKey,
        mqtt_password: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let copied = tx.execute(
            "INSERT INTO devices (eui, eui_hex, kind, key, mqtt_password, lat, lon, component_code,
                minor_class, grid_code, well_depth_mm, warn_mm, alarm_mm, status, updated_ms)
             SELECT ?2, ?3, kind, ?4, ?5, lat, lon, component_code, minor_class, grid_code,
                well_depth_mm, warn_mm, alarm_mm, 'active', ?6
             FROM devices WHERE eui = ?1 AND status = 'active'",
            params![
                old.0 as i64,
                new.0 as i64,
                new.to_string(),
                key.expose_bytes().to_vec(),
                mqtt_password,
                now_ms
            ],
        )?;
        if copied == 1 {
            tx.execute(
                "UPDATE devices SET status = 'replaced', replaced_by = ?2, updated_ms = ?3 WHERE eui = ?1",
                params![old.0 as i64, new.0 as i64, now_ms],
            )?;
        }
        tx.commit()?;
        Ok(copied == 1)
    }

    /// A device's lifecycle status (`active`, `retired`, `replaced`), if registered.
    pub fn device_status(&self, eui: Eui) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT status FROM devices WHERE eui = ?1", params![eui.0 as i64], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// MQTT user names (EUIs) and passwords of active devices, for the broker's files.
    pub fn credentials(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT eui_hex, mqtt_password FROM devices WHERE status = 'active' ORDER BY eui",
        )?;
        Ok(stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?)
    }

    /// Positions of active devices, for placing them in grids.
    pub fn locations(&self) -> Result<Vec<(Eui, f64, f64)>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT eui, lat, lon FROM devices WHERE status = 'active'")?;
        Ok(stmt
            .query_map([], |r| Ok((Eui(r.get::<_, i64>(0)? as u64), r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?)
    }

    /// Persisted counter windows.
    pub fn counters(&self) -> Result<Vec<(Eui, CounterWindow)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT eui, highest, seen FROM counters")?;
        let rows = stmt.query_map([], |row| {
            let highest: Option<i64> = row.get(1)?;
            Ok((
                Eui(row.get::<_, i64>(0)? as u64),
                CounterWindow::from_parts(
                    highest.and_then(|h| u32::try_from(h).ok()),
                    row.get::<_, i64>(2)? as u64,
                ),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Persisted health rows.
    pub fn health(&self) -> Result<Vec<(Eui, DeviceHealth)>, StoreError> {
        let mut out = Vec::new();
        self.each_health(|eui, h| out.push((eui, h)))?;
        Ok(out)
    }

    /// [`Store::health`] one at a time, for loading a million without holding them all.
    pub fn each_health(&self, mut f: impl FnMut(Eui, DeviceHealth)) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT eui, kind, last_seen_ms, last_counter, battery_mv, rssi_dbm, temperature_dc, firmware,
                    uptime_s, frames, rejects, skipped, online, low_battery, deadline_ms FROM health",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let health = DeviceHealth {
                kind: kind_column(row, 1, "health")?,
                last_seen_ms: row.get(2)?,
                last_counter: row.get(3)?,
                battery_mv: row.get(4)?,
                rssi_dbm: row.get(5)?,
                temperature_dc: row.get(6)?,
                firmware: row.get(7)?,
                uptime_s: row.get(8)?,
                frames: row.get::<_, i64>(9)? as u64,
                rejects: row.get::<_, i64>(10)? as u64,
                skipped: row.get::<_, i64>(11)? as u64,
                online: row.get(12)?,
                low_battery: row.get(13)?,
                deadline_ms: row.get(14)?,
            };
            f(Eui(row.get::<_, i64>(0)? as u64), health);
        }
        Ok(())
    }

    /// Writes a batch in one transaction.
    pub fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut counters = tx.prepare_cached(
                "INSERT INTO counters (eui, highest, seen) VALUES (?1, ?2, ?3)
                 ON CONFLICT (eui) DO UPDATE SET highest = ?2, seen = ?3",
            )?;
            for (eui, w) in &batch.counters {
                counters.execute(params![eui.0 as i64, w.highest(), w.seen_bits() as i64])?;
            }
            let mut health = tx.prepare_cached(
                "INSERT INTO health (eui, kind, last_seen_ms, last_counter, battery_mv, rssi_dbm,
                    temperature_dc, firmware, uptime_s, frames, rejects, skipped, online, low_battery, deadline_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT (eui) DO UPDATE SET kind = ?2, last_seen_ms = ?3, last_counter = ?4,
                    battery_mv = ?5, rssi_dbm = ?6, temperature_dc = ?7, firmware = ?8, uptime_s = ?9,
                    frames = ?10, rejects = ?11, skipped = ?12, online = ?13, low_battery = ?14,
                    deadline_ms = ?15",
            )?;
            for (eui, h) in &batch.health {
                health.execute(params![
                    eui.0 as i64,
                    h.kind.as_str(),
                    h.last_seen_ms,
                    h.last_counter,
                    h.battery_mv,
                    h.rssi_dbm,
                    h.temperature_dc,
                    h.firmware,
                    h.uptime_s,
                    i(h.frames),
                    i(h.rejects),
                    i(h.skipped),
                    h.online,
                    h.low_battery,
                    h.deadline_ms
                ])?;
            }
            // Each device's new recent telemetry frames, newest first, go in front of its
            // stored list, which keeps the newest RECENT_FRAME_SLOTS. Sorted by device (newest
            // first within one, the sort being stable) into one reused buffer.
            let mut recent: Vec<&RecentFrame> = batch.recent.iter().collect();
            recent.reverse();
            recent.sort_by_key(|r| r.eui);
            let mut lists = tx.prepare_cached(
                "INSERT INTO recent_frames (eui, list) VALUES (?1, substr(?2, 1, ?3))
                 ON CONFLICT (eui) DO UPDATE SET list = substr(?2 || list, 1, ?3)",
            )?;
            let keep = i64::try_from(RECENT_FRAME_SLOTS * RECENT_ENTRY_HEX).unwrap_or(i64::MAX);
            let mut entries = String::new();
            for group in recent.chunk_by(|a, b| a.eui == b.eui) {
                entries.clear();
                for r in group {
                    write_recent_hex(r, &mut entries);
                }
                if let Some(first) = group.first() {
                    lists.execute(params![first.eui.0 as i64, entries, keep])?;
                }
            }
            let mut events = tx.prepare_cached(
                "INSERT INTO health_events (eui, at_ms, event) VALUES (?1, ?2, ?3)",
            )?;
            for e in &batch.events {
                events.execute(params![e.eui.0 as i64, e.at_ms, e.kind.as_str()])?;
            }
            let mut messages = tx.prepare_cached(
                "INSERT OR IGNORE INTO messages (eui, counter, received_ms, kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for m in &batch.messages {
                messages.execute(params![
                    m.eui.0 as i64,
                    m.counter,
                    m.received_ms,
                    m.kind,
                    // The trace's form of a message: SPEC.md §11's JSON notation.
                    serde_json::to_string(&m.message).unwrap_or_default()
                ])?;
            }
            if let Some(max) = self.buffer_max {
                let mut buffer = tx.prepare_cached(
                    "INSERT INTO telemetry_buffer (eui, kind, measurement, field, at_ms, value, grid_code, street_code)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for p in &batch.telemetry {
                    let kind = p.kind.as_str();
                    buffer.execute(params![
                        p.eui.0 as i64,
                        kind,
                        p.measurement,
                        p.field,
                        p.at_ms,
                        p.value,
                        p.grid.as_deref(),
                        p.street.as_deref()
                    ])?;
                }
                if !batch.telemetry.is_empty() {
                    // Full: the oldest points go, counted. Rows leave only from the head, so
                    // the id range is the count.
                    let dropped = tx.execute(
                        "DELETE FROM telemetry_buffer WHERE id <= (SELECT MAX(id) FROM telemetry_buffer) - ?1",
                        params![i(max)],
                    )?;
                    if dropped > 0 {
                        tx.execute(
                            "INSERT INTO stats (name, value) VALUES ('telemetry_dropped', ?1)
                             ON CONFLICT (name) DO UPDATE SET value = value + ?1",
                            params![dropped as i64],
                        )?;
                    }
                }
            } else {
                // Explicit sample times: a replayed point overwrites itself.
                let mut telemetry = tx.prepare_cached(
                    "INSERT INTO telemetry (eui, measurement, field, at_ms, value, grid_code)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (eui, measurement, field, at_ms) DO UPDATE SET value = ?5, grid_code = ?6",
                )?;
                for p in &batch.telemetry {
                    telemetry.execute(params![
                        p.eui.0 as i64,
                        p.measurement,
                        p.field,
                        p.at_ms,
                        p.value,
                        p.grid.as_deref()
                    ])?;
                }
            }
            let mut audit = tx.prepare_cached(
                "INSERT INTO audit (received_ms, topic, reason, eui, raw) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for a in &batch.audit {
                audit.execute(params![
                    a.received_ms,
                    a.topic,
                    a.reason,
                    a.eui.map(|e| e.0 as i64),
                    a.raw
                ])?;
            }
            if !batch.audit.is_empty() {
                tx.execute(
                    "DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?1",
                    params![i(self.audit_max)],
                )?;
            }
            let mut rejects = tx.prepare_cached(
                "INSERT INTO reject_counts (reason, count) VALUES (?1, ?2)
                 ON CONFLICT (reason) DO UPDATE SET count = count + ?2",
            )?;
            for (reason, n) in &batch.rejects {
                rejects.execute(params![reason, i(*n)])?;
            }
            let mut counters = tx.prepare_cached(
                "INSERT INTO downlink_counters (eui, next) VALUES (?1, ?2)
                 ON CONFLICT (eui) DO UPDATE SET next = MAX(next, ?2)",
            )?;
            for (eui, next) in &batch.downlink_counters {
                counters.execute(params![eui.0 as i64, next])?;
            }
            for update in &batch.request_updates {
                match update {
                    RequestUpdate::Sent { id, counter, at_ms, attempts } => tx.execute(
                        "UPDATE requests SET counter = ?2, sent_ms = ?3, attempts = ?4 WHERE id = ?1",
                        params![id, counter, at_ms, attempts],
                    )?,
                    RequestUpdate::Done { id, at_ms, outcome } => tx.execute(
                        "UPDATE requests SET done_ms = ?2, outcome = ?3 WHERE id = ?1",
                        params![id, at_ms, outcome],
                    )?,
                };
            }
            cases::write(&tx, &batch.rule_states, &batch.cases)?;
            ops::write(&tx, &batch.fixes)?;
            if batch.accepted > 0 {
                tx.execute(
                    "INSERT INTO stats (name, value) VALUES ('accepted', ?1)
                     ON CONFLICT (name) DO UPDATE SET value = value + ?1",
                    params![i(batch.accepted)],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Totals since the store was made.
    pub fn totals(&self) -> Result<Totals, StoreError> {
        let accepted: Option<i64> = self
            .conn
            .query_row("SELECT value FROM stats WHERE name = 'accepted'", [], |r| r.get(0))
            .optional()?;
        let mut stmt = self.conn.prepare("SELECT reason, count FROM reject_counts")?;
        let rejects = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        Ok(Totals { accepted: accepted.unwrap_or(0) as u64, rejects })
    }

    /// Telemetry rows, all or of one measurement and field.
    pub fn telemetry_count(
        &self,
        measurement_field: Option<(&str, &str)>,
    ) -> Result<u64, StoreError> {
        let n: i64 = match measurement_field {
            None => self.conn.query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get(0))?,
            Some((m, f)) => self.conn.query_row(
                "SELECT COUNT(*) FROM telemetry WHERE measurement = ?1 AND field = ?2",
                params![m, f],
                |r| r.get(0),
            )?,
        };
        Ok(n as u64)
    }

    /// The oldest `limit` buffered points.
    pub fn buffer_read(&self, limit: usize) -> Result<Vec<BufferedPoint>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, eui, kind, measurement, field, at_ms, value, grid_code, street_code
             FROM telemetry_buffer ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![i(limit as u64)], |r| {
            Ok(BufferedPoint {
                id: r.get(0)?,
                eui: Eui(r.get::<_, i64>(1)? as u64),
                kind: r.get(2)?,
                measurement: r.get(3)?,
                field: r.get(4)?,
                at_ms: r.get(5)?,
                value: r.get(6)?,
                grid: r.get(7)?,
                street: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes buffered points up to and including `id` (delivered, or undeliverable).
    pub fn buffer_delete_through(&mut self, id: i64) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM telemetry_buffer WHERE id <= ?1", params![id])?;
        Ok(())
    }

    /// Points waiting in the buffer.
    pub fn buffer_len(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM telemetry_buffer", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// A counter from the stats table (`accepted`, `telemetry_dropped`, …).
    pub fn stat(&self, name: &str) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT value FROM stats WHERE name = ?1", params![name], |r| r.get(0))
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Rows in the audit log.
    pub fn audit_len(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Deletes embedded-store telemetry older than `before_ms`; returns how many rows went.
    pub fn prune_telemetry(&mut self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(self.conn.execute("DELETE FROM telemetry WHERE at_ms < ?1", params![before_ms])? as u64)
    }

    /// Health events of one device, oldest first: (at_ms, event).
    pub fn events_of(&self, eui: Eui) -> Result<Vec<(i64, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT at_ms, event FROM health_events WHERE eui = ?1 ORDER BY id")?;
        Ok(stmt
            .query_map(params![eui.0 as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?)
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
                params![new.0 as i64],
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
        assert_eq!(store.prune_telemetry(3_000).unwrap(), 2);
        assert_eq!(store.telemetry_count(None).unwrap(), 2);
    }
}
