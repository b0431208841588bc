//! Moving a pilot to production: every row of a SQLite store copied into an empty PostgreSQL
//! store (`gridsense store migrate --from sqlite:PATH --to postgres://…`), table by table in
//! chunks of multi-row statements, in one transaction, then the row counts compared. Device
//! secrets are copied sealed: the target uses the source's key file. The identity sequences
//! are moved past the copied ids, so the target carries on where the source stopped.
//! Refused while a gateway holds the source ([`hold`]) or when the target has devices.

use std::{fs::File, path::Path};

use rusqlite::{OptionalExtension, types::ValueRef};
use tokio_postgres::types::ToSql;

use super::{Store, StoreError, postgres::PgStore, postgres::wait};
use crate::config::Synchronous;

/// The tables copied, in this order (every table of the store but the registry's change log,
/// which the target's trigger writes itself, and the key's check value, which the target
/// keeps for the same key). Of `store_meta`, the shards the source was made with go along.
pub const TABLES: [&str; 27] = [
    "devices",
    "counters",
    "health",
    "health_events",
    "messages",
    "telemetry",
    "audit",
    "reject_counts",
    "stats",
    "telemetry_buffer",
    "downlink_counters",
    "requests",
    "rule_state",
    "incidents",
    "incident_evidence",
    "cases",
    "case_events",
    "outbox",
    "alerts",
    "patrols",
    "maintenance",
    "placements",
    "beacon_fix",
    "api_tokens",
    "callback_signatures",
    "recent_frames",
    "workers",
];

/// Rows per statement.
const CHUNK: usize = 5_000;

/// The lock file a running gateway holds on its SQLite store (`PATH.lock`).
pub fn lock_path(store: &Path) -> std::path::PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    std::path::PathBuf::from(name)
}

/// Takes the store's lock for as long as the returned file lives; refused while another
/// process (a running gateway, a migration) holds it.
pub fn hold(store: &Path) -> Result<File, StoreError> {
    let path = lock_path(store);
    let io = |source| StoreError::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Busy {
            path: store.display().to_string(),
            lock: path.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// One table's rows in the source and, after the copy, in the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// The table.
    pub table: &'static str,
    /// Rows in the source.
    pub source: u64,
    /// Rows in the target.
    pub target: u64,
}

/// A column's values for `unnest`, by the target's type.
enum Column {
    Big(Vec<Option<i64>>),
    Int(Vec<Option<i32>>),
    Float(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
    Bytes(Vec<Option<Vec<u8>>>),
    Bool(Vec<Option<bool>>),
}

impl Column {
    fn of(pg_type: &str) -> Result<Self, StoreError> {
        Ok(match pg_type {
            "bigint" => Column::Big(Vec::new()),
            "integer" => Column::Int(Vec::new()),
            "double precision" => Column::Float(Vec::new()),
            "text" => Column::Text(Vec::new()),
            "bytea" => Column::Bytes(Vec::new()),
            "boolean" => Column::Bool(Vec::new()),
            other => {
                return Err(StoreError::Migrate(format!("no copy for the column type {other}")));
            }
        })
    }

    const fn cast(&self) -> &'static str {
        match self {
            Column::Big(_) => "bigint[]",
            Column::Int(_) => "int[]",
            Column::Float(_) => "float8[]",
            Column::Text(_) => "text[]",
            Column::Bytes(_) => "bytea[]",
            Column::Bool(_) => "bool[]",
        }
    }

    fn push(&mut self, v: ValueRef<'_>, table: &str, column: &str) -> Result<(), StoreError> {
        let bad = || {
            StoreError::Migrate(format!(
                "{table}.{column}: a {:?} value does not fit",
                v.data_type()
            ))
        };
        match (self, v) {
            (Column::Big(c), ValueRef::Null) => c.push(None),
            (Column::Int(c), ValueRef::Null) => c.push(None),
            (Column::Float(c), ValueRef::Null) => c.push(None),
            (Column::Text(c), ValueRef::Null) => c.push(None),
            (Column::Bytes(c), ValueRef::Null) => c.push(None),
            (Column::Bool(c), ValueRef::Null) => c.push(None),
            (Column::Big(c), ValueRef::Integer(i)) => c.push(Some(i)),
            (Column::Int(c), ValueRef::Integer(i)) => {
                c.push(Some(i32::try_from(i).map_err(|_| bad())?))
            }
            (Column::Float(c), ValueRef::Real(f)) => c.push(Some(f)),
            #[allow(clippy::cast_precision_loss)]
            (Column::Float(c), ValueRef::Integer(i)) => c.push(Some(i as f64)),
            (Column::Text(c), ValueRef::Text(t)) => {
                c.push(Some(String::from_utf8(t.to_vec()).map_err(|_| bad())?));
            }
            (Column::Bytes(c), ValueRef::Blob(b)) => c.push(Some(b.to_vec())),
            (Column::Bool(c), ValueRef::Integer(i)) => c.push(Some(i != 0)),
            _ => return Err(bad()),
        }
        Ok(())
    }

    fn clear(&mut self) {
        match self {
            Column::Big(c) => c.clear(),
            Column::Int(c) => c.clear(),
            Column::Float(c) => c.clear(),
            Column::Text(c) => c.clear(),
            Column::Bytes(c) => c.clear(),
            Column::Bool(c) => c.clear(),
        }
    }

    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Column::Big(c) => c,
            Column::Int(c) => c,
            Column::Float(c) => c,
            Column::Text(c) => c,
            Column::Bytes(c) => c,
            Column::Bool(c) => c,
        }
    }
}

/// Copies the SQLite store at `from` (its secrets sealed with `key_file`) into the empty
/// PostgreSQL store at `to`, and returns every table's row counts, verified equal.
pub fn sqlite_to_postgres(
    from: &Path,
    to: &str,
    key_file: &Path,
) -> Result<Vec<Copied>, StoreError> {
    if !from.exists() {
        return Err(StoreError::Migrate(format!("no store at {}", from.display())));
    }
    let _held = hold(from)?;
    // Opening brings the source to the current schema and checks its key.
    let source = Store::open_keyed(from, Synchronous::Normal, u64::MAX, key_file)?;
    let target = PgStore::open(to, key_file, u64::MAX)?;
    let mut out = Vec::with_capacity(TABLES.len());
    target.with(|c| {
        let devices: i64 = wait(c.query_one("SELECT count(*) FROM devices", &[]))?.get(0);
        if devices > 0 {
            return Err(StoreError::Migrate(format!(
                "the target already has {devices} devices: migrate into an empty database"
            )));
        }
        let tx = wait(c.transaction())?;
        for table in TABLES {
            let columns = wait(tx.query(
                "SELECT column_name::text, data_type::text, is_identity::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                &[&table],
            ))?;
            let names: Vec<String> = columns.iter().map(|r| r.get(0)).collect();
            let mut cols: Vec<Column> =
                columns.iter().map(|r| Column::of(r.get(1))).collect::<Result<_, _>>()?;
            let list = names.join(", ");
            let unnest: Vec<String> =
                cols.iter().enumerate().map(|(n, c)| format!("${}::{}", n + 1, c.cast())).collect();
            let insert =
                format!("INSERT INTO {table} ({list}) SELECT * FROM unnest({})", unnest.join(", "));
            let mut stmt = source.conn.prepare(&format!("SELECT {list} FROM {table}"))?;
            let mut rows = stmt.query([])?;
            let (mut pending, mut copied) = (0usize, 0u64);
            let flush = |cols: &mut Vec<Column>| -> Result<(), StoreError> {
                let params: Vec<&(dyn ToSql + Sync)> = cols.iter().map(Column::param).collect();
                wait(tx.execute(&insert, &params))?;
                cols.iter_mut().for_each(Column::clear);
                Ok(())
            };
            while let Some(row) = rows.next()? {
                for (n, (col, name)) in cols.iter_mut().zip(&names).enumerate() {
                    col.push(row.get_ref(n)?, table, name)?;
                }
                pending += 1;
                copied += 1;
                if pending == CHUNK {
                    flush(&mut cols)?;
                    pending = 0;
                }
            }
            if pending > 0 {
                flush(&mut cols)?;
            }
            // Identity columns carry on after the copied ids (an `id` that is not one, such as
            // a worker's, has no sequence to move).
            let identity = columns
                .iter()
                .any(|r| r.get::<_, String>(0) == "id" && r.get::<_, String>(2) == "YES");
            if identity {
                wait(tx.execute(
                    &format!(
                        "SELECT setval(s, m) FROM (SELECT pg_get_serial_sequence('{table}', 'id') AS s,
                            (SELECT max(id) FROM {table}) AS m) q WHERE s IS NOT NULL AND m IS NOT NULL"
                    ),
                    &[],
                ))?;
            }
            let target_rows: i64 =
                wait(tx.query_one(&format!("SELECT count(*) FROM {table}"), &[]))?.get(0);
            out.push(Copied { table, source: copied, target: target_rows as u64 });
        }
        if let Some(bad) = out.iter().find(|c| c.source != c.target) {
            return Err(StoreError::Migrate(format!(
                "{}: {} rows in the source, {} in the target: nothing committed",
                bad.table, bad.source, bad.target
            )));
        }
        // The shards the source was made with (its devices' topics name them) go along.
        let shards: Option<Vec<u8>> = source
            .conn
            .query_row("SELECT value FROM store_meta WHERE name = 'shards'", [], |r| r.get(0))
            .optional()?;
        if let Some(shards) = shards {
            wait(tx.execute(
                "INSERT INTO store_meta (name, value) VALUES ('shards', $1)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&shards],
            ))?;
        }
        wait(tx.commit())?;
        Ok(())
    })?;
    Ok(out)
}
