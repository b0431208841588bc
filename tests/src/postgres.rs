//! A real PostgreSQL server per test binary: Debian's server binaries (`initdb`, `postgres`,
//! `pg_ctl`), a cluster in a private folder owned by the `postgres` user (`initdb` refuses to
//! run as root), listening on a free loopback port only, its socket in that folder; never the
//! system cluster. Each test takes a database of its own (`CREATE DATABASE … TEMPLATE`).

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::broker::free_port;

/// The role the tests connect as (a superuser of the test cluster only).
pub const SUPERUSER: &str = "gridsense";
/// Its password: connections over TCP authenticate (SCRAM), so a wrong one is refused.
pub const PASSWORD: &str = "gridsense-test-password";

/// The folder of the newest installed PostgreSQL server's binaries.
pub fn bin_dir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: install Debian's postgresql package (scripts/test does)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Runs a server binary: as the `postgres` user when we are root.
fn server_command(bin: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

fn checked(what: &str, out: std::io::Result<Output>) -> Result<Output> {
    let out = out.with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A PostgreSQL cluster on a free loopback port, stopped (immediate) and removed when dropped.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    durable: bool,
    /// Extra server options (`-c name=value …`).
    extra: String,
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

impl Postgres {
    /// Starts a cluster for tests: `fsync=off` (a crash of the server machine is not what
    /// these tests are about; a commit still reaches the kernel before it returns, so a
    /// stopped or killed server keeps it).
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// Starts a cluster that keeps `fsync` on, for the crash tests and the benchmarks.
    pub fn start_durable() -> Result<Self> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Self> {
        Self::start_with_options(durable, String::new())
    }

    /// A private folder the server's user owns.
    fn private_dir() -> Result<tempfile::TempDir> {
        let dir = tempfile::Builder::new().prefix("gridsense-pg").tempdir()?;
        std::fs::write(dir.path().join("pwfile"), PASSWORD)?;
        if is_root() {
            // The server runs as `postgres`: it owns the folder (and may enter its parent).
            checked(
                "chown",
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).output(),
            )?;
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )?;
        }
        Ok(dir)
    }

    fn start_with_options(durable: bool, extra: String) -> Result<Self> {
        let bin = bin_dir()?;
        let dir = Self::private_dir()?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pwfile");
        let data_s = data.to_str().context("temp path not UTF-8")?;
        checked(
            "initdb",
            server_command(
                &bin.join("initdb"),
                &[
                    "-D",
                    data_s,
                    "-U",
                    SUPERUSER,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--pwfile",
                    pwfile.to_str().context("temp path not UTF-8")?,
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            )
            .output(),
        )?;
        let port = free_port()?;
        let mut pg = Postgres { bin, dir, data, port, durable, extra };
        pg.start_server()?;
        Ok(pg)
    }

    /// A primary (`fsync` on) and a streaming standby that it commits to synchronously
    /// (`synchronous_standby_names`, `synchronous_commit = on`): a commit returns only once
    /// the standby has flushed it, so what the primary acknowledged survives its loss. Returns
    /// once the primary reports the standby `sync`.
    pub fn start_replicated() -> Result<(Postgres, Postgres)> {
        let primary = Self::start_with_options(
            true,
            " -c wal_level=replica -c max_wal_senders=4 -c wal_keep_size=128MB -c synchronous_standby_names=standby1 -c synchronous_commit=on".into(),
        )?;
        let dir = Self::private_dir()?;
        let data = dir.path().join("data");
        let conninfo = format!(
            "host=127.0.0.1 port={} user={SUPERUSER} password={PASSWORD} application_name=standby1",
            primary.port
        );
        checked(
            "pg_basebackup",
            server_command(
                &primary.bin.join("pg_basebackup"),
                &["-D", data.to_str().context("path")?, "-d", &conninfo, "-X", "stream"],
            )
            .args(["-c", "fast", "-R", "--no-sync"])
            .output(),
        )?;
        // `-R` wrote standby.signal and a primary_conninfo; this one names the standby.
        let auto = data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!("primary_conninfo = '{conninfo}'\n"));
        std::fs::write(&auto, text)?;
        let port = free_port()?;
        let mut standby = Postgres {
            bin: primary.bin.clone(),
            dir,
            data,
            port,
            durable: true,
            extra: " -c hot_standby=on".into(),
        };
        standby.start_server()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = primary
                .psql("postgres", "SELECT sync_state FROM pg_stat_replication")
                .unwrap_or_default();
            if state == "sync" {
                return Ok((primary, standby));
            }
            if Instant::now() > deadline {
                bail!(
                    "the standby did not become synchronous in 30 s ({state:?}): {}",
                    standby.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` of the postmaster: the server dies at once, its backends after it.
    pub fn kill9(&self) -> Result<()> {
        let Some(&main) = self.server_pids().first() else { bail!("no server running") };
        checked("kill -9", Command::new("kill").args(["-9", &main.to_string()]).output())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&self.addr(), Duration::from_millis(100)).is_ok() {
            if Instant::now() > deadline {
                bail!("the server still listens 10 s after kill -9");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Promotes a standby to primary (`pg_ctl promote`), returning once it accepts writes.
    pub fn promote(&self) -> Result<()> {
        let data = self.data.to_str().context("path")?;
        checked(
            "pg_ctl promote",
            server_command(&self.bin.join("pg_ctl"), &["-D", data, "-w", "-t", "30", "promote"])
                .output(),
        )?;
        Ok(())
    }

    /// Whether the server is in recovery (a standby).
    pub fn in_recovery(&self) -> Result<bool> {
        Ok(self.psql("postgres", "SELECT pg_is_in_recovery()")? == "t")
    }

    fn start_server(&mut self) -> Result<()> {
        let fsync = if self.durable { "on" } else { "off" };
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={fsync} -c full_page_writes={fsync} -c max_connections=200 -c shared_buffers=64MB",
            self.port,
            self.dir.path().display(),
        ) + &self.extra;
        let log = self.dir.path().join("server.log");
        let (data, log) =
            (self.data.to_str().context("path")?, log.to_str().context("path")?.to_owned());
        checked(
            "pg_ctl start",
            server_command(
                &self.bin.join("pg_ctl"),
                &["-D", data, "-l", &log, "-o", &options, "-w", "-t", "30", "start"],
            )
            .output(),
        )?;
        wait_until_listening(self.addr())
    }

    /// Starts a cluster that also accepts TLS, with this certificate and key (PEM).
    pub fn start_tls(cert: &Path, key: &Path) -> Result<Self> {
        let mut pg = Self::start_with(false)?;
        pg.stop_immediate()?;
        let (c, k) = (pg.dir.path().join("server.crt"), pg.dir.path().join("server.key"));
        std::fs::copy(cert, &c)?;
        std::fs::copy(key, &k)?;
        std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        if is_root() {
            checked(
                "chown",
                Command::new("chown").args(["postgres:postgres"]).arg(&c).arg(&k).output(),
            )?;
        }
        pg.extra =
            format!(" -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}", c.display(), k.display());
        pg.start_server()?;
        Ok(pg)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The URL of database `db` as the test superuser (with its password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs SQL in database `db` with `psql` (stop on the first error).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let psql = self.bin.join("psql");
        let out = checked(
            "psql",
            Command::new(psql)
                .env("PGPASSWORD", PASSWORD)
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-d", db, "-c", sql])
                .output(),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A new, empty database (a copy of `template`, default `template1`); returns its URL.
    pub fn database(&self, template: Option<&str>) -> Result<String> {
        let n = DATABASES.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {name} TEMPLATE {}", template.unwrap_or("template1")),
        )?;
        Ok(self.url(&name))
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: no checkpoint, like a crash).
    pub fn stop_immediate(&self) -> Result<()> {
        let data = self.data.to_str().context("path")?;
        checked(
            "pg_ctl stop",
            server_command(
                &self.bin.join("pg_ctl"),
                &["-D", data, "-m", "immediate", "-w", "stop"],
            )
            .output(),
        )?;
        Ok(())
    }

    /// Starts it again on the same port after [`Postgres::stop_immediate`] (crash recovery).
    pub fn restart(&mut self) -> Result<()> {
        self.start_server()
    }

    /// The server's processes: the postmaster and its children (backends, WAL writer, …),
    /// for measuring the database's CPU.
    pub fn server_pids(&self) -> Vec<u32> {
        let Some(main) = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return Vec::new();
        };
        let mut pids = vec![main];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(main) {
                pids.push(pid);
            }
        }
        pids
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

fn wait_until_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("PostgreSQL did not start listening on {addr} within 30 s")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
    }
}
