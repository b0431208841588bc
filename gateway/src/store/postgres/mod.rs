//! The PostgreSQL store (`[store] url = "postgres://user@host:port/db"`): the same interfaces
//! as the SQLite store, for deployments whose state must live on a replicated database.
//!
//! Driver: tokio-postgres. The store interfaces are synchronous (their consumers call them
//! from blocking threads, as SQLite needs), so each [`PgStore`] is one connection whose
//! protocol task runs on a thread of its own (a current-thread tokio runtime doing the socket
//! I/O), and its calls wait on the client's futures with a plain executor: that works from any
//! thread, async or not, and needs no pool — every consumer owns its connection, as with
//! SQLite. A connection the server closed is made again on the next call.
//!
//! Multi-host URLs with `target_session_attrs=read-write` (a promoted standby is followed)
//! and `connect_timeout` are tokio-postgres's own; a statement timeout is set per connection.
//! Schema: numbered migrations in `schema_version`, a newer schema refused.

mod board;
mod governance;
mod ingest;
mod leases;
mod queries;
mod registry;
mod simple;

use std::{cell::RefCell, future::Future, path::Path, sync::Weak, time::Duration};

use tokio_postgres::{Client, NoTls, config::SslMode};

use super::{StoreError, keys::KeyRing};

/// Migrations, in order; index + 1 is the version they bring the database to.
const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    // 2: the tokens of committed batches, so a commit whose outcome was unknown (the
    // connection cut while COMMIT was under way) is not applied twice when it is retried.
    "CREATE TABLE committed_batches (token BIGINT PRIMARY KEY, committed_at TIMESTAMPTZ NOT NULL DEFAULT now());
     CREATE INDEX committed_batches_at ON committed_batches (committed_at);",
    // 3: telemetry partitioned by day; retention drops days.
    include_str!("telemetry_days.sql"),
    // 4: shard leases (owner, epoch, expiry on the database's clock) and the instances seen.
    "CREATE TABLE shard_leases (shard INT PRIMARY KEY, owner TEXT, epoch BIGINT NOT NULL DEFAULT 0,
        expires_at TIMESTAMPTZ NOT NULL DEFAULT 'epoch');
     CREATE TABLE cluster_instances (instance TEXT PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now(), seen_at TIMESTAMPTZ NOT NULL);",
    // 5: departments, handling levels, supervision, the report's milestones; grid workers.
    crate::store::cases::governance_migration!("BIGINT"),
];

/// How long a connection attempt may take unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one statement may run.
const STATEMENT_TIMEOUT_MS: u64 = 30_000;

/// A URL with its password left out, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// A tokio-postgres error in words: the server's message and code, or what failed on the way.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({}: {})", db.message(), db.severity(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres { what: describe(&e), transient: is_transient(&e) }
    }
}

/// Whether an error may pass by itself (the server gone or restarting, a serialization
/// failure, a full disk): the batch is retried, nothing acknowledged meanwhile.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        None => true,
        Some(c) => {
            c == &SqlState::T_R_SERIALIZATION_FAILURE
                || c == &SqlState::T_R_DEADLOCK_DETECTED
                || c == &SqlState::ADMIN_SHUTDOWN
                || c == &SqlState::CRASH_SHUTDOWN
                || c == &SqlState::CANNOT_CONNECT_NOW
                || c == &SqlState::DISK_FULL
                || c == &SqlState::QUERY_CANCELED
                || c.code().starts_with("08")
        }
    }
}

/// One live connection: the client and the thread that runs its protocol (detached: it ends
/// when the client is dropped and the server's side closes).
pub(crate) struct Conn {
    client: Client,
    _driver: std::thread::JoinHandle<()>,
    /// Statements prepared on this connection, by their text.
    statements: std::collections::HashMap<&'static str, tokio_postgres::Statement>,
}

impl Conn {
    /// `sql` prepared once per connection.
    pub(crate) fn statement(
        &mut self,
        sql: &'static str,
    ) -> Result<tokio_postgres::Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = wait(self.client.prepare(sql))?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// The PostgreSQL store: one connection.
pub struct PgStore {
    conn: RefCell<Option<Conn>>,
    config: tokio_postgres::Config,
    security: Security,
    target: String,
    pub(crate) keys: KeyRing,
    pub(crate) audit_max: u64,
    pub(crate) buffer_max: Option<u64>,
    /// The token of the last batch whose commit failed: the next commit is its retry (ingest
    /// retries the same batch until it is durable), and the token tells whether it landed.
    pub(crate) unconfirmed: std::cell::Cell<Option<i64>>,
    /// Commits since the table of tokens was last pruned.
    pub(crate) commits: std::cell::Cell<u32>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("target", &self.target).finish_non_exhaustive()
    }
}

/// Waits for a future of the client (no runtime needed: the protocol runs elsewhere).
pub(crate) fn wait<T>(f: impl Future<Output = T>) -> T {
    futures::executor::block_on(f)
}

/// How a connection is secured: TLS verifying the server's certificate chain against a CA and
/// its name against the host dialled (libpq's `verify-full`), or plain (loopback, a socket).
#[derive(Clone)]
pub(crate) enum Security {
    Plain,
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

/// What a listening connection does with each notification.
type OnNotice = Box<dyn Fn() + Send>;

/// Runs a connection's protocol to its end; with `on_notice`, also reads its asynchronous
/// messages and calls it for every notification (`LISTEN`).
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    on_notice: Option<OnNotice>,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(on_notice) = on_notice else { return connection.await };
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => on_notice(),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
    }
}

fn connect(
    config: &tokio_postgres::Config,
    target: &str,
    security: &Security,
) -> Result<Conn, StoreError> {
    connect_listening(config, target, security, None)
}

fn connect_listening(
    config: &tokio_postgres::Config,
    target: &str,
    security: &Security,
    on_notice: Option<OnNotice>,
) -> Result<Conn, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let config = config.clone();
    let security = security.clone();
    let driver = std::thread::Builder::new()
        .name("postgres".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                // Each arm runs its connection to the end (the client's drop ends it).
                let ended = match security {
                    Security::Plain => match config.connect(NoTls).await {
                        Ok((client, connection)) => {
                            let _ = tx.send(Ok(client));
                            drive(connection, on_notice).await
                        }
                        Err(e) => Err(e),
                    },
                    Security::Tls(tls) => match config.connect(tls).await {
                        Ok((client, connection)) => {
                            let _ = tx.send(Ok(client));
                            drive(connection, on_notice).await
                        }
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = ended {
                    // Before the client was sent, the opener hears why; after, it is logged.
                    if tx.send(Err(describe(&e))).is_ok() {
                        return;
                    }
                    tracing::warn!("PostgreSQL connection: {}", describe(&e));
                }
            });
        })
        .map_err(|e| StoreError::Postgres { what: format!("thread: {e}"), transient: false })?;
    let client = rx
        .recv()
        .map_err(|_| StoreError::Postgres {
            what: format!("connecting to {target}: the driver thread ended"),
            transient: true,
        })?
        .map_err(|what| StoreError::Postgres {
            what: format!("cannot connect to {target}: {what}"),
            transient: true,
        })?;
    wait(client.batch_execute(&format!("SET statement_timeout = {STATEMENT_TIMEOUT_MS}")))?;
    Ok(Conn { client, _driver: driver, statements: std::collections::HashMap::new() })
}

/// The channel the registry's trigger notifies.
pub(crate) const REGISTRY_CHANNEL: &str = "gridsense_registry";

/// The listening loop of [`PgStore::listen_registry`].
fn listen(
    config: &tokio_postgres::Config,
    target: &str,
    security: &Security,
    wake: &Weak<tokio::sync::Notify>,
) {
    const FIRST: Duration = Duration::from_millis(250);
    const LONGEST: Duration = Duration::from_secs(10);
    let notify = |w: &Weak<tokio::sync::Notify>| {
        if let Some(n) = w.upgrade() {
            n.notify_one();
        }
    };
    let mut backoff = FIRST;
    let mut failing = false;
    while wake.strong_count() > 0 {
        let w = wake.clone();
        let listening =
            connect_listening(config, target, security, Some(Box::new(move || notify(&w))))
                .and_then(|c| {
                    wait(c.batch_execute(&format!("LISTEN {REGISTRY_CHANNEL}")))?;
                    Ok(c)
                });
        match listening {
            Ok(conn) => {
                if failing {
                    tracing::info!("listening for registry changes again");
                }
                (backoff, failing) = (FIRST, false);
                // Whatever changed while no one listened is read now.
                notify(wake);
                while !conn.is_closed() && wake.strong_count() > 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("listening for registry changes: {e}; polling meanwhile");
                }
                failing = true;
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(LONGEST);
    }
}

impl PgStore {
    /// Connects to `url` (plain: TLS needs a CA, [`PgStore::open_tls`]), brings the schema up
    /// to date and checks the key that seals device secrets (`key_file`, created when absent).
    pub fn open(url: &str, key_file: &Path, audit_max: u64) -> Result<Self, StoreError> {
        Self::open_tls(url, key_file, audit_max, None)
    }

    /// [`PgStore::open`], over TLS when `ca_file` is given (or the URL says `sslmode=require`,
    /// which then needs it): the server's certificate must chain to that CA and name the host
    /// dialled (libpq's `verify-full`); with a CA the connection is never plain.
    pub fn open_tls(
        url: &str,
        key_file: &Path,
        audit_max: u64,
        ca_file: Option<&Path>,
    ) -> Result<Self, StoreError> {
        let target = redacted(url);
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| StoreError::Postgres {
            what: format!("store.url {target}: {e}"),
            transient: false,
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let security = match ca_file {
            Some(ca) => {
                let tls = gridsense_common::tls::client_config(ca).map_err(|e| {
                    StoreError::Postgres { what: format!("store.ca_file: {e}"), transient: false }
                })?;
                config.ssl_mode(SslMode::Require);
                Security::Tls(tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone()))
            }
            None if config.get_ssl_mode() == SslMode::Require => {
                return Err(StoreError::Postgres {
                    what: format!(
                        "store.url {target}: sslmode=require needs store.ca_file, the CA that signed the server's certificate (it is verified, and its name against the host)"
                    ),
                    transient: false,
                });
            }
            None => {
                // Without a CA nothing is verified: no TLS attempt at all (`prefer` would
                // accept any certificate).
                config.ssl_mode(SslMode::Disable);
                Security::Plain
            }
        };
        config.application_name("gridsense");
        let keys = KeyRing::load_or_create(key_file)?;
        let conn = connect(&config, &target, &security)?;
        let store = PgStore {
            conn: RefCell::new(Some(conn)),
            config,
            security,
            target,
            keys,
            audit_max,
            buffer_max: None,
            unconfirmed: std::cell::Cell::new(None),
            commits: std::cell::Cell::new(0),
        };
        store.migrate()?;
        store.check_key()?;
        Ok(store)
    }

    /// Wakes `wake` whenever the registry changes: `LISTEN gridsense_registry` on a connection
    /// of its own, on a thread of its own, made again (with a backoff) when the server closes
    /// it, and `wake` woken once after every (re)connection — a notice sent while it was away
    /// is lost, which is why the reader keeps its position in the change table and only
    /// takes the notice as a cue to look. Ends once `wake` is dropped.
    pub fn listen_registry(&self, wake: Weak<tokio::sync::Notify>) -> Result<(), StoreError> {
        let (config, target, security) =
            (self.config.clone(), self.target.clone(), self.security.clone());
        std::thread::Builder::new()
            .name("postgres-listen".into())
            .spawn(move || listen(&config, &target, &security, &wake))
            .map(drop)
            .map_err(|e| StoreError::Postgres { what: format!("thread: {e}"), transient: false })
    }

    /// Sends telemetry to the buffer of an external sink (at most `max_points`).
    pub fn buffer_telemetry(&mut self, max_points: u64) {
        self.buffer_max = Some(max_points);
    }

    /// Runs `f` with the connection, made again first if the server closed it.
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = None;
            *slot = Some(connect(&self.config, &self.target, &self.security)?);
        }
        let conn = slot.as_mut().ok_or_else(|| StoreError::Postgres {
            what: "no connection".into(),
            transient: true,
        })?;
        f(conn)
    }

    /// Runs `sql` and hands each row to `f`, fetched through a portal 10,000 rows at a time:
    /// a restore of a million devices never holds all their rows at once.
    pub(crate) fn each_row(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        f: &mut dyn FnMut(&tokio_postgres::Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = wait(c.transaction())?;
            let stmt = wait(tx.prepare(sql))?;
            let portal = wait(tx.bind(&stmt, params))?;
            loop {
                let rows = wait(tx.query_portal(&portal, 10_000))?;
                if rows.is_empty() {
                    break;
                }
                for r in &rows {
                    f(r)?;
                }
            }
            wait(tx.commit())?;
            Ok(())
        })
    }

    /// The schema version of the database (0: empty).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            // Asked before anything is created: a runtime role without DDL rights opens a
            // migrated database.
            let exists: bool =
                wait(c.query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[]))?.get(0);
            if !exists {
                return Ok(0);
            }
            let row = wait(c.query_opt("SELECT max(version) FROM schema_version", &[]))?;
            Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0))
        })
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let supported = MIGRATIONS.len() as i64;
        let current = self.schema_version()?;
        if current > supported {
            return Err(StoreError::TooNew { found: current, supported });
        }
        if current == supported {
            return Ok(());
        }
        self.with(|c| {
            wait(c.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)",
            ))?;
            for (n, sql) in
                MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0))
            {
                let tx = wait(c.transaction())?;
                // One migrator at a time; a second one waits, then finds the work done.
                wait(tx.batch_execute("LOCK TABLE schema_version IN EXCLUSIVE MODE"))?;
                let now = wait(
                    tx.query_one("SELECT COALESCE(max(version), 0) FROM schema_version", &[]),
                )?
                .get::<_, i64>(0);
                if now > n as i64 {
                    continue;
                }
                wait(tx.batch_execute(sql))?;
                wait(tx.execute(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    &[&(n as i64 + 1)],
                ))?;
                wait(tx.commit())?;
            }
            Ok(())
        })
    }

    fn check_key(&self) -> Result<(), StoreError> {
        let path = self.keys.path().display().to_string();
        self.with(|c| {
            let found = wait(c.query_opt("SELECT value FROM store_meta WHERE name = 'key_check'", &[]))?;
            if let Some(row) = found {
                return Ok(row.get::<_, Vec<u8>>(0));
            }
            let check = self.keys.check_value()?;
            wait(c.execute(
                "INSERT INTO store_meta (name, value) VALUES ('key_check', $1) ON CONFLICT (name) DO NOTHING",
                &[&check],
            ))?;
            let stored: Vec<u8> =
                wait(c.query_one("SELECT value FROM store_meta WHERE name = 'key_check'", &[]))?
                    .get(0);
            Ok(stored)
        })
        .and_then(|stored| {
            if self.keys.opens_check(&stored) { Ok(()) } else { Err(StoreError::WrongKey { path }) }
        })
    }
}

// A u64 and an EUI as stored: the same forms as in SQLite.
use super::{cases::eui_i as e, i};

/// An EUI from its stored form.
pub(crate) fn eui(v: i64) -> gridsense_protocol::Eui {
    gridsense_protocol::Eui(v as u64)
}
