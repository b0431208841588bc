//! Command-line interface of the `gridsense` binary.

pub mod cases;
pub mod cluster;
#[cfg(feature = "demo")]
pub mod demo;
pub mod walkthrough;

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use gridsense_protocol::{DeviceKey, Direction, Downlink, Eui, RawFrame, Uplink};
use tokio::sync::watch;

use crate::{app, config};

/// gridsense: the sensor side of a city's grid-governance platform.
#[derive(Debug, Parser)]
#[command(name = "gridsense", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    #[cfg(feature = "demo")]
    /// Everything with nothing installed: embedded broker, gateway with SQLite, and a simulated
    /// district running a scenario.
    Demo {
        /// Devices in the simulated district.
        #[arg(long, default_value_t = 500)]
        devices: usize,
        /// Scenario: a shipped name or a file.
        #[arg(long, default_value = "showcase")]
        scenario: String,
        /// Simulated seconds per real second (default: the scenario's).
        #[arg(long)]
        speed: Option<f64>,
        /// How long, like `30s` or `5m` (default: until Ctrl-C).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Data folder (generated district; the SQLite store unless store.path is set by
        /// --config or GRIDSENSE_STORE_PATH — given here, it wins) [default: gridsense-data].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Where to serve the API and the dashboard, loopback only (http.listen)
        /// [default: 127.0.0.1:8080].
        #[arg(long)]
        http: Option<String>,
        /// Configuration file over the demo's defaults; GRIDSENSE_… variables override it, and
        /// the flags given here override those.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the gateway.
    Run {
        /// Configuration file (TOML); every setting has a default and a GRIDSENSE_… variable.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage the device registry.
    #[command(subcommand)]
    Provision(ProvisionCommand),
    /// Send devices configuration or status requests (the running gateway delivers them).
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Inspect frames.
    #[command(subcommand)]
    Frame(FrameCommand),
    /// API tokens for operators (stored hashed; shown once when made).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The case board: list, show (with trace), move through the lifecycle; built-in tables.
    #[command(subcommand)]
    Cases(cases::CasesCommand),
    /// Maintenance windows: alarms of devices under repair are recorded, not filed.
    #[command(subcommand)]
    Maintenance(cases::MaintenanceCommand),
    /// The store itself: move a pilot's SQLite store to PostgreSQL.
    #[command(subcommand)]
    Store(StoreCommand),
    /// The gateway instances sharing a store, and who holds which shard.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The assessment report (通报): figures per street, community, grid, department or grid
    /// worker for a period (default: the last complete half-month, +08:00).
    Report(ReportArgs),
}

/// `gridsense report …`
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// First day, YYYY-MM-DD (with --to).
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// Last day, inclusive (through 24:00 of it), YYYY-MM-DD.
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// Without --from/--to: the last complete half-month, week or month.
    #[arg(long, default_value = "half-month")]
    pub period: String,
    /// street, community, grid, department or worker.
    #[arg(long, default_value = "street")]
    pub by: String,
    /// table, csv, json or html.
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Write it to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A running gateway's base URL instead of the store (a token in GRIDSENSE_TOKEN).
    #[arg(long)]
    pub api: Option<String>,
    /// Configuration file naming the store, the grid layer and the tables.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `gridsense cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Prints the shards' leases: each live instance with its shards, and those nobody holds.
    Status {
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Instances seen within this many ms count as live (default: the configuration's
        /// `[cluster] lease_ms`).
        #[arg(long)]
        lease_ms: Option<i64>,
    },
}

impl ReportArgs {
    fn clone_query(&self) -> crate::report::ReportQuery {
        crate::report::ReportQuery {
            from: self.from.clone(),
            to: self.to.clone(),
            period: Some(self.period.clone()),
            by: Some(self.by.clone()),
            format: Some(self.format.clone()),
        }
    }
}

/// `gridsense store …`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Creates or upgrades the configured store's schema (run it as the database's owner; the
    /// gateway's runtime role then needs no DDL rights) and prints its version.
    Upgrade {
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Copies every row of a SQLite store into an empty PostgreSQL database and verifies the
    /// row counts (refused while a gateway runs on the source). Then set `store.url` and
    /// `store.key_file` (the source's key) and start the gateway on the target.
    Migrate {
        /// The source: `sqlite:PATH`.
        #[arg(long)]
        from: String,
        /// The target: `postgres://user[:password]@host[:port]/db`.
        #[arg(long)]
        to: String,
        /// The key file of the source's device secrets [default: PATH.key].
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

/// `gridsense tokens …`
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Make a token; it is printed once and stored only as a hash.
    Add {
        /// A name for it (who or what uses it).
        #[arg(long)]
        name: String,
        /// `read` (every GET) or `operator` (also moves cases).
        #[arg(long, default_value = "read")]
        role: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Tokens by name and role (never the tokens).
    List {
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Revoke a token.
    Revoke {
        /// Its name.
        name: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `gridsense devices …`
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Change a device's settings: sent at its next frame, retried until acknowledged.
    Configure {
        /// The device EUI.
        eui: String,
        /// A setting, `name=value` (e.g. `report_interval_s=120`); repeat for several.
        #[arg(long = "set", required = true)]
        settings: Vec<String>,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List devices with their health, from the store or a running gateway's API.
    List {
        /// `cover`, `drain`, `beacon`.
        #[arg(long)]
        kind: Option<String>,
        /// Grid code.
        #[arg(long)]
        grid: Option<String>,
        /// Street code.
        #[arg(long)]
        street: Option<String>,
        /// `online`, `offline`, `never_seen`, `low_battery`, `alarm`.
        #[arg(long)]
        state: Option<String>,
        /// Battery below, mV.
        #[arg(long)]
        battery_below: Option<String>,
        /// Silent for more than, e.g. `30m`.
        #[arg(long)]
        silent_for: Option<String>,
        /// Sort: eui, kind, grid, battery, rssi, last_seen, state.
        #[arg(long)]
        sort: Option<String>,
        /// Rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// A running gateway's base URL (e.g. http://127.0.0.1:8080) instead of the store.
        #[arg(long)]
        api: Option<String>,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// One device: health, last frames with verdicts, incidents.
    Show {
        /// The device EUI.
        eui: String,
        /// A running gateway's base URL instead of the store.
        #[arg(long)]
        api: Option<String>,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ask a device for a status now (sent at its next frame).
    StatusRequest {
        /// The device EUI.
        eui: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `gridsense provision …`
#[derive(Debug, Subcommand)]
pub enum ProvisionCommand {
    /// Import (or re-import) a `gridsim city` folder's devices.json; reports what changed.
    Import {
        /// The folder.
        #[arg(long)]
        city: PathBuf,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Retire a device: its frames are no longer accepted.
    Retire {
        /// The device EUI.
        eui: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Give a device a new frame key. Counters are per key, so the device's counter window
    /// is reset: a device whose counter was exhausted or lost comes back with its new key.
    /// A running gateway applies it within `downlink.poll_ms`.
    Rekey {
        /// The device EUI.
        eui: String,
        /// The new key, 32 hex digits (or set GRIDSENSE_NEW_KEY); without it one is generated
        /// and printed once, to be loaded into the device.
        #[arg(long, env = "GRIDSENSE_NEW_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Record that a device moved.
    Move {
        /// The device EUI.
        eui: String,
        /// New WGS84 latitude.
        #[arg(long)]
        lat: f64,
        /// New WGS84 longitude.
        #[arg(long)]
        lon: f64,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Replace a device by a new one on the same object (same location, codes and levels).
    Replace {
        /// The EUI of the device taken out.
        eui: String,
        /// The new device's EUI.
        #[arg(long)]
        with: String,
        /// The new device's key, 32 hex digits (or set GRIDSENSE_NEW_KEY).
        #[arg(long, env = "GRIDSENSE_NEW_KEY", hide_env_values = true)]
        key: String,
        /// The new device's MQTT password.
        #[arg(long, env = "GRIDSENSE_NEW_PASSWORD", hide_env_values = true)]
        password: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a Mosquitto password file and ACL file for the registry (and a gateway account).
    Broker {
        /// Output folder (passwd, acl, gateway.credentials).
        #[arg(long)]
        out: PathBuf,
        /// The gateway's MQTT user name.
        #[arg(long, default_value = "gridsense-gateway")]
        gateway_user: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `gridsense frame …`
#[derive(Debug, Subcommand)]
pub enum FrameCommand {
    /// Walk through the wire protocol: genuine and hostile frames and the gateway's verdicts.
    Walkthrough,
    /// Decode a frame given in hex; with --key, verify its tag and decode its body.
    Decode {
        /// The frame as hex digits (spaces allowed).
        frame: String,
        /// The device key as 32 hex digits (or set GRIDSENSE_KEY).
        #[arg(long, env = "GRIDSENSE_KEY", hide_env_values = true)]
        key: Option<String>,
    },
}

/// Reads and checks a `workers.json` (an array of grid workers), naming the first bad entry.
fn load_workers(path: &std::path::Path) -> Result<Vec<crate::assessment::Worker>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let workers: Vec<crate::assessment::Worker> = serde_path_to_error::deserialize(de)
        .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?;
    for w in &workers {
        w.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(workers)
}

fn load_config(path: Option<&std::path::Path>) -> Result<config::Config> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    Ok(config::load(path, &env)?)
}

/// A channel that turns true on Ctrl-C (SIGINT) or SIGTERM, as a service manager stops a
/// server.
fn stop_signal() -> (Arc<watch::Sender<bool>>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let tx = Arc::new(tx);
    let signalled = tx.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
                        _ = term.recv() => tracing::info!("terminated: stopping"),
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        signalled.send_replace(true);
    });
    (tx, rx)
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo { devices, scenario, speed, duration, data, http, config } => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            let options =
                demo::DemoOptions { devices, scenario, speed, duration, data, http, config, env };
            let report = demo::run(options, stop_signal().1).await?;
            print!("{}", report.render());
            Ok(())
        }
        Command::Run { config } => {
            let config = load_config(config.as_deref())?;
            let (stop, stopped) = stop_signal();
            let gateway = app::start(&config, app::wall_clock(), stopped)?;
            if let Some(devices) = gateway.device_listener {
                eprintln!(
                    "gridsense: embedded broker: devices on {devices} (MQTT 5, client id = user name = EUI), tools on {} (MQTT 3.1.1)",
                    gateway.broker
                );
            }
            eprintln!(
                "gridsense: ingesting from {} into {}",
                gateway.broker,
                config.store.path.display()
            );
            gateway.join(&stop, std::time::Duration::from_secs(10)).await?;
            eprintln!("gridsense: stopped: every batch committed and acknowledged");
            Ok(())
        }
        Command::Provision(ProvisionCommand::Import { city, config }) => {
            let config = load_config(config.as_deref())?;
            let devices = gridsense_common::inventory::load(&city.join("devices.json"))?;
            let mut store = app::open_store(&config)?;
            let report = store.import(&devices, app::wall_clock()())?;
            println!(
                "gridsense provision import: {report} ({} in {})",
                devices.len(),
                config.store.path.display()
            );
            let workers = city.join("workers.json");
            if workers.exists() {
                let n = store.put_workers(&load_workers(&workers)?)?;
                println!("gridsense provision import: {n} grid workers");
            }
            Ok(())
        }
        Command::Provision(ProvisionCommand::Retire { eui, config }) => {
            let eui: Eui = eui.parse().context("EUI")?;
            let mut store = app::open_store(&load_config(config.as_deref())?)?;
            if !store.retire(eui, app::wall_clock()())? {
                bail!("{eui} is not an active device");
            }
            println!(
                "gridsense provision retire: {eui} retired (a running gateway applies it within downlink.poll_ms)"
            );
            Ok(())
        }
        Command::Provision(ProvisionCommand::Rekey { eui, key, config }) => {
            let eui: Eui = eui.parse().context("EUI")?;
            let (key, generated) = match key {
                Some(hex) => (DeviceKey::from_hex(&hex).context("--key")?, false),
                None => {
                    let mut bytes = [0u8; 16];
                    getrandom::fill(&mut bytes)
                        .map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
                    (DeviceKey::from_bytes(bytes), true)
                }
            };
            let mut store = app::open_store(&load_config(config.as_deref())?)?;
            if !store.rekey(eui, &key, app::wall_clock()())? {
                bail!("{eui} is not an active device");
            }
            println!(
                "gridsense provision rekey: {eui} has a new key and a new counter space: its first frame under the new key may use any counter (SPEC §4); frames under the old key are refused"
            );
            if generated {
                // Shown once, for loading into the device; the registry never prints it again.
                println!("new key (load it into the device): {}", hex::encode(key.expose_bytes()));
            }
            Ok(())
        }
        Command::Provision(ProvisionCommand::Move { eui, lat, lon, config }) => {
            let eui: Eui = eui.parse().context("EUI")?;
            if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                bail!("--lat {lat} --lon {lon} is not a WGS84 position");
            }
            let mut store = app::open_store(&load_config(config.as_deref())?)?;
            if !store.relocate(eui, lat, lon, app::wall_clock()())? {
                bail!("{eui} is not registered");
            }
            println!("gridsense provision move: {eui} now at {lat}, {lon}");
            Ok(())
        }
        Command::Provision(ProvisionCommand::Replace { eui, with, key, password, config }) => {
            let old: Eui = eui.parse().context("EUI")?;
            let new: Eui = with.parse().context("--with")?;
            let key = DeviceKey::from_hex(&key).context("--key")?;
            if password.len() < 8 {
                bail!("--password must be at least 8 characters");
            }
            let mut store = app::open_store(&load_config(config.as_deref())?)?;
            if store.device_status(new)?.is_some() {
                bail!("{new} is already registered");
            }
            if !store.replace(old, new, &key, &password, app::wall_clock()())? {
                bail!("{old} is not an active device");
            }
            println!(
                "gridsense provision replace: {new} replaces {old} on the same object                  (rerun `provision broker` and reload Mosquitto; a running gateway applies it within downlink.poll_ms)"
            );
            Ok(())
        }
        Command::Provision(ProvisionCommand::Broker { out, gateway_user, config }) => {
            let config = load_config(config.as_deref())?;
            let store = app::open_store(&config)?;
            let shards = store.fix_shards(config.cluster.shards)?;
            let files = crate::broker::provision::write_broker_files(
                &out,
                &gateway_user,
                shards,
                &store.credentials()?,
            )
            .with_context(|| format!("writing {}", out.display()))?;
            let dir = out.display();
            println!(
                "gridsense provision broker: {n} device accounts, `{gateway_user}` and its \
                 {sessions} shard-session accounts written to {dir}/passwd and {dir}/acl \
                 (gateway password in {dir}/gateway.credentials). In \
                 mosquitto.conf: password_file {dir}/passwd, acl_file {dir}/acl, allow_anonymous \
                 false, use_username_as_clientid true (deploy/mosquitto.conf); reload with: kill \
                 -HUP $(pidof mosquitto)",
                n = files.devices,
                sessions = u32::from(shards) * 2 + 1,
            );
            Ok(())
        }
        Command::Devices(DevicesCommand::Configure { eui, settings, config }) => {
            let eui: Eui = eui.parse().context("EUI")?;
            let settings = settings
                .iter()
                .map(|s| crate::downlink::parse_setting(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("--set {e}"))?;
            if settings.len() > gridsense_protocol::MAX_SETTINGS {
                bail!("at most {} settings in one request", gridsense_protocol::MAX_SETTINGS);
            }
            let mut store = app::open_store(&load_config(config.as_deref())?)?;
            if store.device_status(eui)?.as_deref() != Some("active") {
                bail!("{eui} is not an active device");
            }
            let id = store.add_request(
                eui,
                &crate::downlink::Request::Configure(settings),
                app::wall_clock()(),
            )?;
            println!(
                "gridsense devices configure: request {id} queued for {eui}; sent at its next frame"
            );
            Ok(())
        }
        Command::Devices(DevicesCommand::List {
            kind,
            grid,
            street,
            state,
            battery_below,
            silent_for,
            sort,
            limit,
            api,
            config,
        }) => {
            let q = crate::http::api::DevicesQuery {
                kind,
                grid,
                street,
                state,
                battery_below,
                silent_for,
                order: sort.as_ref().map(|_| "asc".to_owned()),
                sort,
                per_page: Some(limit.to_string()),
                ..Default::default()
            };
            print!(
                "{}",
                cases::devices_list(&q, api.as_deref(), || load_config(config.as_deref())).await?
            );
            Ok(())
        }
        Command::Devices(DevicesCommand::Show { eui, api, config }) => {
            let eui: Eui = eui.parse().context("EUI")?;
            print!(
                "{}",
                cases::device_show(eui, api.as_deref(), || load_config(config.as_deref())).await?
            );
            Ok(())
        }
        Command::Devices(DevicesCommand::StatusRequest { eui, config }) => {
            let eui: Eui = eui.parse().context("EUI")?;
            let mut store = app::open_store(&load_config(config.as_deref())?)?;
            if store.device_status(eui)?.as_deref() != Some("active") {
                bail!("{eui} is not an active device");
            }
            let id = store.add_request(
                eui,
                &crate::downlink::Request::StatusRequest,
                app::wall_clock()(),
            )?;
            println!("gridsense devices status-request: request {id} queued for {eui}");
            Ok(())
        }
        Command::Tokens(TokensCommand::Add { name, role, config }) => {
            if !crate::http::auth::ROLES.contains(&role.as_str()) {
                bail!("--role {role:?}: read or operator");
            }
            if name.trim().is_empty() {
                bail!("--name must say who uses the token");
            }
            let token =
                crate::http::auth::generate().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let mut store = app::open_store(&load_config(config.as_deref())?)?;
            if !store.add_token(
                name.trim(),
                &role,
                &crate::http::auth::hash(&token),
                app::wall_clock()(),
            )? {
                bail!("a token named {name:?} exists (revoke it first)");
            }
            println!(
                "gridsense tokens add: {role} token {:?} (shown once; only its hash is stored):\n{token}",
                name.trim()
            );
            Ok(())
        }
        Command::Cluster(ClusterCommand::Status { config, lease_ms }) => {
            let config = load_config(config.as_deref())?;
            let store = app::open_store(&config)?;
            let target = crate::store::target(&config.store);
            if config.store.url.is_empty() {
                println!(
                    "cluster: {} shards on {target}: a SQLite store is served by one gateway, which holds every shard (it holds {target}.lock while it runs); several instances share a PostgreSQL store (store.url)",
                    store.fix_shards(config.cluster.shards)?
                );
                return Ok(());
            }
            let lease_ms = lease_ms.unwrap_or_else(|| config.cluster.lease_ms());
            let view = store.cluster_view(None, lease_ms)?;
            print!("{}", cluster::render(&view, &target, crate::status::wall_clock()()));
            Ok(())
        }
        Command::Store(StoreCommand::Upgrade { config }) => {
            let config = load_config(config.as_deref())?;
            let s = &config.store;
            let version = if s.url.is_empty() {
                crate::store::Store::open_keyed(&s.path, s.synchronous, s.audit_max, &s.key_file())?
                    .schema_version()?
            } else {
                crate::store::postgres::PgStore::open(&s.url, &s.key_file(), s.audit_max)?
                    .schema_version()?
            };
            println!(
                "gridsense store upgrade: {} at schema version {version}",
                crate::store::target(s)
            );
            Ok(())
        }
        Command::Store(StoreCommand::Migrate { from, to, key_file }) => {
            let Some(path) = from.strip_prefix("sqlite:") else {
                bail!("--from {from:?}: give the source as sqlite:PATH");
            };
            if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
                bail!("--to: give the target as postgres://user@host:port/db");
            }
            let path = PathBuf::from(path);
            let key = key_file.unwrap_or_else(|| crate::store::keys::default_key_file(&path));
            let started = std::time::Instant::now();
            let copied = crate::store::migrate::sqlite_to_postgres(&path, &to, &key)?;
            let rows: u64 = copied.iter().map(|c| c.target).sum();
            for c in &copied {
                println!("{:<20} {:>10} → {:>10}", c.table, c.source, c.target);
            }
            println!(
                "gridsense store migrate: {rows} rows in {} tables copied to {} and verified in {:.1} s; \
                 start the gateway with store.url set and store.key_file = {:?}",
                copied.len(),
                crate::store::postgres::redacted(&to),
                started.elapsed().as_secs_f64(),
                key.display().to_string()
            );
            Ok(())
        }
        Command::Tokens(TokensCommand::List { config }) => {
            let store = app::open_store(&load_config(config.as_deref())?)?;
            for (name, role, created, revoked) in store.tokens()? {
                println!(
                    "{name:<24} {role:<9} created {created}{}",
                    revoked.map(|r| format!(", revoked {r}")).unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Tokens(TokensCommand::Revoke { name, config }) => {
            let mut store = app::open_store(&load_config(config.as_deref())?)?;
            if !store.revoke_token(&name, app::wall_clock()())? {
                bail!("no live token named {name:?}");
            }
            println!("gridsense tokens revoke: {name:?} no longer works");
            Ok(())
        }
        Command::Cases(cmd) => {
            print!("{}", cases::cases(cmd, load_config).await?);
            Ok(())
        }
        Command::Report(args) => {
            let text = cases::report(args.clone_query(), args.api.as_deref(), || {
                load_config(args.config.as_deref())
            })
            .await?;
            match &args.out {
                Some(path) => {
                    std::fs::write(path, &text).with_context(|| path.display().to_string())?;
                    eprintln!("gridsense report: written to {}", path.display());
                }
                None => print!("{text}"),
            }
            Ok(())
        }
        Command::Maintenance(cmd) => {
            print!("{}", cases::maintenance(cmd, load_config)?);
            Ok(())
        }
        Command::Frame(FrameCommand::Walkthrough) => {
            print!("{}", walkthrough::render(&walkthrough::run()));
            Ok(())
        }
        Command::Frame(FrameCommand::Decode { frame, key }) => {
            print!("{}", decode_frame(&frame, key.as_deref())?);
            Ok(())
        }
    }
}

/// Decodes a hex frame into a readable description.
pub fn decode_frame(frame_hex: &str, key_hex: Option<&str>) -> Result<String> {
    let digits: String = frame_hex.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = hex::decode(&digits).context("the frame is not hex digits")?;
    let raw = RawFrame::parse(&bytes).context("the frame's envelope is invalid")?;
    let header = raw.header();
    let mut out = format!(
        "direction: {}\neui: {}\ncounter: {}\nbody: {} bytes\n",
        header.direction.as_str(),
        header.eui,
        header.counter,
        raw.body().len()
    );
    let Some(key_hex) = key_hex else {
        out.push_str("tag: not checked (no --key)\n");
        return Ok(out);
    };
    let key = DeviceKey::from_hex(key_hex).context("--key")?;
    let verified = match raw.verify(&key) {
        Ok(v) => v,
        Err(e) => bail!("{e}"),
    };
    out.push_str("tag: ok\n");
    let message = match header.direction {
        Direction::Uplink => format!("{:#?}", verified.decode::<Uplink>()?),
        Direction::Downlink => format!("{:#?}", verified.decode::<Downlink>()?),
    };
    out.push_str("message: ");
    out.push_str(&message);
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use gridsense_protocol::{Eui, examples, seal};

    use super::*;

    #[test]
    fn decodes_and_verifies_a_frame() {
        let key = DeviceKey::from_bytes([0xab; 16]);
        let frame = seal(Eui(0x42), 9, &examples::downlinks()[1], &key);
        let text = decode_frame(&hex::encode(&frame), Some(&"ab".repeat(16))).expect("decodes");
        assert!(text.contains("direction: down"), "{text}");
        assert!(text.contains("eui: 0000000000000042"), "{text}");
        assert!(text.contains("TimeSync"), "{text}");
        let err = decode_frame(&hex::encode(&frame), Some(&"cd".repeat(16))).expect_err("bad key");
        assert!(err.to_string().contains("tag does not verify"), "{err}");
        let unchecked = decode_frame(&hex::encode(&frame), None).expect("header only");
        assert!(unchecked.contains("not checked"), "{unchecked}");
        let err = decode_frame("zz", None).expect_err("not hex");
        assert!(err.to_string().contains("not hex"), "{err}");
    }
}
