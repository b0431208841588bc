//! The load report: Mosquitto, the real `gridsense run` process and the simulator's pooled load
//! at rising offered rates, with a bare subscriber on the same broker as the ceiling, and
//! "cover removed" alarms from other devices during each step for alarm → case latency — once
//! per run (SQLite; PostgreSQL; SQLite with telemetry to VictoriaMetrics), each with its own
//! broker, store and registry. Writes `report.md` (a table per run), `load.svg` (the ratios,
//! a line per run) and `report.json` (`steps` for SQLite, `steps_postgres`,
//! `steps_sqlite_victoria`) under OUT.
//!
//! `scripts/bench` builds and runs it; by hand:
//! `cargo build --release -p gridsense-gateway --bins --examples && target/release/examples/load_report [--rates 10000,20000,...] [--seconds 15] [--out bench] [--million N] [--runs sqlite,postgres,sqlite-victoria]`
//!
//! Each step runs its own slice of drains (1 frame/s each at speed 2, boots spread over a
//! second) for a warm-up and a measuring window, then waits until the gateway has stored every
//! frame published (or says how many are missing). The gateway is a separate process, so its
//! CPU (utime + stime from /proc) and memory (VmRSS, VmHWM) are its own. With `--million N`
//! the gateway is then restarted on a registry of N devices and every one of them reports once.
//! Prints numbers; asserts nothing.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use gridsense_gateway::{app, config::Config, store::CaseFilter};
use gridsense_protocol::topic::{Lane, UPLINK_FILTER, all_shards_filter};
use gridsense_simulator::{
    city::{self, Counts},
    fleet::{self, Plan, RunOptions},
    inventory::{self, Kind},
    scenario,
};
use gridsense_tests::{Mosquitto, alarms, free_port};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Alarms per second during each step's window.
const ALARM_RATE: f64 = 40.0;
/// Warm-up before each window, s.
const WARMUP_S: u64 = 4;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Step {
    offered: u64,
    /// Load and alarm frames the broker acknowledged (PUBACK): only these count as published.
    published: u64,
    /// Handed to the MQTT client and no PUBACK seen for them: not counted as published, so
    /// never counted as lost.
    #[serde(default)]
    unsent: u64,
    /// Gateway durable ÷ bare subscriber, in the window.
    #[serde(default)]
    durable_ratio: f64,
    /// Gateway CPU per frame ÷ broker CPU per frame, in the window:
    /// (gateway_cpu_pct ÷ accepted_per_s) ÷ (broker_cpu_pct ÷ bare_per_s).
    #[serde(default)]
    cpu_ratio: f64,
    bare_per_s: f64,
    accepted_per_s: f64,
    stored: u64,
    lost: i64,
    catch_up_s: f64,
    gateway_cpu_pct: f64,
    broker_cpu_pct: f64,
    /// PostgreSQL's processes together (`--store postgres`).
    #[serde(default)]
    db_cpu_pct: f64,
    /// VictoriaMetrics, the telemetry sink (`--telemetry victoria`).
    #[serde(default)]
    sink_cpu_pct: f64,
    gateway_rss_mib: f64,
    alarms: usize,
    cases: usize,
    latency_p50_ms: i64,
    latency_p99_ms: i64,
    latency_max_ms: i64,
    decided_p99_ms: i64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Million {
    devices: usize,
    rss_registered_mib: f64,
    rss_reported_mib: f64,
    hwm_mib: f64,
    reported: u64,
    /// Restarted on that store (every device's health, counters and rule states restored):
    /// seconds until ready, and memory then.
    #[serde(default)]
    restart_s: f64,
    #[serde(default)]
    rss_restarted_mib: f64,
}

/// One run of every step: a store, and where telemetry goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    /// `sqlite` or `postgres` (a durable PostgreSQL started here, fsync on).
    store: String,
    /// Telemetry to the InfluxDB 2 write API of a VictoriaMetrics started here (as in
    /// production) instead of the store's own table.
    victoria: bool,
}

impl Run {
    fn parse(name: &str) -> Result<Self> {
        let (store, victoria) = match name.strip_suffix("-victoria") {
            Some(store) => (store, true),
            None => (name, false),
        };
        if store != "sqlite" && store != "postgres" {
            bail!("run {name:?}: sqlite, postgres, sqlite-victoria or postgres-victoria");
        }
        Ok(Run { store: store.to_owned(), victoria })
    }

    fn name(&self) -> String {
        if self.victoria { format!("{}-victoria", self.store) } else { self.store.clone() }
    }

    /// Its steps' key in `report.json`: `steps` for SQLite with the store's own telemetry
    /// (the first report's shape), `steps_postgres`, `steps_sqlite_victoria`, ….
    fn key(&self) -> String {
        match self.name().as_str() {
            "sqlite" => "steps".to_owned(),
            other => format!("steps_{}", other.replace('-', "_")),
        }
    }

    fn title(&self) -> String {
        let store = if self.store == "postgres" {
            "PostgreSQL store (Debian's server on this machine, fsync on)"
        } else {
            "SQLite store"
        };
        let telemetry = if self.victoria {
            "telemetry to VictoriaMetrics (its InfluxDB 2 write API, through the store's buffer)"
        } else {
            "telemetry in the store's own table"
        };
        format!("{store}, {telemetry}")
    }
}

struct Args {
    rates: Vec<u64>,
    seconds: u64,
    out: PathBuf,
    million: usize,
    /// Redraw the report and plot from an earlier run's `report.json` instead of running.
    from_json: Option<PathBuf>,
    /// The runs, in order (`--runs`; `--store` names one; `--telemetry victoria` sends each
    /// run's telemetry to VictoriaMetrics).
    runs: Vec<Run>,
    /// Gateway instances sharing the PostgreSQL store (1 unless every run is PostgreSQL's).
    instances: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        rates: vec![10_000, 20_000, 30_000, 40_000, 50_000, 60_000],
        seconds: 15,
        out: PathBuf::from("bench"),
        million: 0,
        from_json: None,
        runs: ["sqlite", "postgres", "sqlite-victoria"]
            .into_iter()
            .map(Run::parse)
            .collect::<Result<_>>()?,
        instances: 1,
    };
    let mut victoria = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rates" => {
                args.rates = value
                    .split(',')
                    .map(|r| r.trim().parse().with_context(|| format!("--rates: {r:?}")))
                    .collect::<Result<_>>()?;
            }
            "--seconds" => args.seconds = value.parse().context("--seconds")?,
            "--out" => args.out = PathBuf::from(value),
            "--million" => args.million = value.parse().context("--million")?,
            "--from-json" => args.from_json = Some(PathBuf::from(value)),
            "--runs" => {
                args.runs =
                    value.split(',').map(|r| Run::parse(r.trim())).collect::<Result<_>>()?;
            }
            "--store" if value == "sqlite" || value == "postgres" => {
                args.runs = vec![Run::parse(&value)?];
            }
            "--store" => bail!("--store {value:?}: sqlite or postgres"),
            "--telemetry" if value == "store" || value == "victoria" => {
                victoria = value == "victoria";
            }
            "--telemetry" => bail!("--telemetry {value:?}: store or victoria"),
            "--instances" => args.instances = value.parse().context("--instances")?,
            other => bail!(
                "unknown option {other} (--rates, --seconds, --out, --million, --from-json, --runs, --store, --instances, --telemetry)"
            ),
        }
    }
    if victoria {
        for r in &mut args.runs {
            r.victoria = true;
        }
        args.runs.dedup();
    }
    if args.instances != 1 && args.runs.iter().any(|r| r.store != "postgres") {
        bail!(
            "--instances {}: several instances share a PostgreSQL store (--store postgres)",
            args.instances
        );
    }
    Ok(args)
}

/// utime + stime of a process, seconds.
fn cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the state field.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/PID/status` memory line, MiB.
fn mem_mib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Where a process's resident memory is, MiB: the main heap, other anonymous memory (thread
/// arenas, large allocations, stacks) and file-backed pages (the binary, libraries).
fn mem_split(pid: u32) -> String {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return String::new();
    };
    let (mut heap, mut anon, mut file, mut current) = (0.0, 0.0, 0.0, 0u8);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Rss:"), Some(kib)) => {
                let mib = kib.parse::<f64>().unwrap_or(0.0) / 1024.0;
                match current {
                    0 => heap += mib,
                    1 => anon += mib,
                    _ => file += mib,
                }
            }
            (Some(range), _) if range.contains('-') && !range.ends_with(':') => {
                let path = line.split_whitespace().nth(5);
                current = match path {
                    Some("[heap]") => 0,
                    None => 1,
                    Some(p) if p.starts_with('[') => 1,
                    Some(_) => 2,
                };
            }
            _ => {}
        }
    }
    format!("heap {heap:.0}, other anonymous {anon:.0}, file-backed {file:.0} MiB")
}

fn percentile(v: &[i64], q: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

/// The real gateway binary beside this example (`target/release/gridsense`).
fn gateway_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("gridsense"))
        .context("locating the gridsense binary")?;
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p gridsense-gateway --bins`",
            bin.display()
        );
    }
    Ok(bin)
}

/// Whether `GET /readyz` answers 200.
fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

struct Gateway {
    child: Child,
    /// The gateway's store, opened once here (read while it writes).
    store: Box<dyn gridsense_gateway::store::Backend>,
}

impl Gateway {
    fn start(
        dir: &Path,
        broker: std::net::SocketAddr,
        grids: &Path,
        store_url: &str,
        instance: &str,
        victoria: Option<&str>,
    ) -> Result<Self> {
        let http = free_port()?;
        let db = dir.join("gridsense.db");
        let mut text = format!(
            "[mqtt]\nurl = \"mqtt://{broker}\"\nclient_id = \"gridsense-bench\"\n\n[store]\npath = \"{}\"\nurl = \"{store_url}\"\n\n\
             [geo]\ngrids = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\nauth = \"off\"\n\n[cluster]\ninstance_id = \"{instance}\"\n",
            db.display(),
            grids.display()
        );
        if let Some(url) = victoria {
            let _ = write!(text, "\n[telemetry]\nsink = \"influxdb\"\nurl = \"{url}\"\n");
        }
        let path = dir.join(format!("gateway-{instance}.toml"));
        std::fs::write(&path, &text)?;
        // Registered (migrated) before the gateway starts: no schema change races it.
        let store = app::open_store(&gridsense_gateway::config::load(Some(&path), &[])?)?;
        let log = std::fs::File::create(dir.join(format!("gateway-{instance}.log")))?;
        let child = Command::new(gateway_binary()?)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting gridsense run")?;
        let gateway = Gateway { child, store };
        gateway.wait_ready(http)?;
        Ok(gateway)
    }

    fn wait_ready(&self, http: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if ready(http) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the gateway was not ready within 300 s")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn accepted(&self) -> Result<u64> {
        Ok(self.store.totals()?.accepted)
    }

    fn stop(mut self) -> Result<()> {
        Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        self.child.wait()?;
        Ok(())
    }
}

/// The gateway instances sharing the store (one unless `--instances`).
struct Gateways(Vec<Gateway>);

impl Gateways {
    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Gateway::pid).collect()
    }

    fn accepted(&self) -> Result<u64> {
        self.0.first().context("no gateway")?.accepted()
    }

    fn store(&self) -> Result<&dyn gridsense_gateway::store::Backend> {
        Ok(&*self.0.first().context("no gateway")?.store)
    }

    /// Waits until every instance holds its even share of the shards.
    fn balanced(&self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let view = self.store()?.cluster_view(None, 5_000)?;
            let mut shares = std::collections::BTreeMap::<String, usize>::new();
            for l in view.leases.iter().filter(|l| l.expires_in_ms > 0) {
                if let Some(o) = &l.owner {
                    *shares.entry(o.clone()).or_default() += 1;
                }
            }
            let even = view.leases.len() / self.0.len();
            if shares.len() == self.0.len()
                && shares.values().all(|n| *n >= even)
                && shares.values().sum::<usize>() == view.leases.len()
            {
                return Ok(format!("{shares:?}"));
            }
            if Instant::now() > deadline {
                bail!("instances not balanced within 120 s: {shares:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(self) -> Result<()> {
        for g in self.0 {
            g.stop()?;
        }
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A subscriber that only counts what it receives (QoS 1, acknowledged at once).
fn bare_subscriber(broker: std::net::SocketAddr) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let mut options = MqttOptions::new("bare", broker.ip().to_string(), broker.port());
    options.set_inflight(1_000);
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 1_000);
    let seen = count.clone();
    tokio::spawn(async move {
        // Version 1's topic and both lanes of every shard (the load publishes on its shards').
        let lanes = [Lane::Up, Lane::Urgent].map(|l| all_shards_filter(l).as_str().to_owned());
        for filter in [UPLINK_FILTER.to_owned(), lanes[0].clone(), lanes[1].clone()] {
            let _ = client.subscribe(filter, QoS::AtLeastOnce).await;
        }
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(_)) = event {
                seen.fetch_add(1, Relaxed);
            }
        }
    });
    count
}

async fn wait_stored(
    accepted: impl Fn() -> Result<u64>,
    expected: u64,
    limit: Duration,
) -> Result<(u64, f64)> {
    let started = Instant::now();
    loop {
        let stored = accepted()?;
        if stored >= expected || started.elapsed() > limit {
            return Ok((stored, started.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[allow(clippy::too_many_lines)]
#[allow(clippy::too_many_arguments)]
async fn step(
    offered: u64,
    plan: Plan,
    covers: &[inventory::Device],
    (broker, gateway, bare): (&Mosquitto, &Gateways, &AtomicU64),
    seconds: u64,
    db_pids: &dyn Fn() -> Vec<u32>,
    sink_pid: Option<u32>,
) -> Result<Step> {
    let gw_cpu = || gateway.pids().into_iter().map(cpu_s).sum::<f64>();
    let db_cpu = || db_pids().into_iter().map(cpu_s).sum::<f64>();
    let sink_cpu = || sink_pid.map_or(0.0, cpu_s);
    // A frame counts as published only once the broker acknowledged it.
    let alarms_acked = Arc::new(AtomicU64::new(0));
    let alarms_client = {
        let mut options = MqttOptions::new(
            format!("alarms-{offered}"),
            broker.addr().ip().to_string(),
            broker.addr().port(),
        );
        options.set_inflight(1_000);
        let (client, mut eventloop) = AsyncClient::new(options, 1_000);
        let acked = alarms_acked.clone();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = event {
                    acked.fetch_add(1, Relaxed);
                }
            }
        });
        client
    };
    let base = gateway.accepted()?;
    let options = RunOptions::pooled(
        broker.addr(),
        scenario::load("load")?,
        2.0,
        Duration::from_secs(WARMUP_S + seconds),
    );
    let (_keep, sim_stop) = tokio::sync::watch::channel(false);
    let sim = tokio::spawn(async move { fleet::run(plan, &options, sim_stop).await });
    tokio::time::sleep(Duration::from_secs(WARMUP_S)).await;

    let (t0, bare0, acc0) = (Instant::now(), bare.load(Relaxed), gateway.accepted()?);
    let (gw0, br0, db0, sink0) = (gw_cpu(), cpu_s(broker.pid()), db_cpu(), sink_cpu());
    let window_end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let sent = alarms::publish_paced(
        &alarms_client,
        covers,
        (ALARM_RATE, gridsense_protocol::topic::DEFAULT_SHARDS),
        Some(window_end),
    )
    .await?;
    tokio::time::sleep_until(window_end).await;
    let window = t0.elapsed().as_secs_f64();
    let (bare1, acc1) = (bare.load(Relaxed), gateway.accepted()?);
    let (gw1, br1, db1, sink1) = (gw_cpu(), cpu_s(broker.pid()), db_cpu(), sink_cpu());
    let rss = gateway.pids().into_iter().map(|p| mem_mib(p, "VmRSS:")).sum::<f64>();

    let summary = sim.await??;
    // Let the last alarms' PUBACKs come in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handed = summary.frames() + sent.len() as u64;
    let published = summary.broker_acked + alarms_acked.load(Relaxed);
    let (stored_total, catch_up) =
        wait_stored(|| gateway.accepted(), base + published, Duration::from_secs(120)).await?;
    let stored = stored_total - base;

    // Alarm → case on the board (committed, then delivered by the local platform adapter).
    let store = gateway.store()?;
    let filter = CaseFilter { limit: 1_000_000, ..CaseFilter::default() };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut latencies, mut decided) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        latencies.clear();
        decided.clear();
        for c in store.cases(&filter)? {
            if let (Some(t), Some(d)) = (sent.get(&c.device_id), c.delivered_ms) {
                latencies.push(d - t);
                decided.push(c.detected_ms - t);
            }
        }
        if latencies.len() >= sent.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort_unstable();
    decided.sort_unstable();
    let _ = alarms_client.disconnect().await;
    let (bare_per_s, accepted_per_s) =
        ((bare1 - bare0) as f64 / window, (acc1 - acc0) as f64 / window);
    let (gateway_cpu_pct, broker_cpu_pct) =
        (100.0 * (gw1 - gw0) / window, 100.0 * (br1 - br0) / window);
    Ok(Step {
        offered,
        published,
        unsent: handed.saturating_sub(published),
        durable_ratio: accepted_per_s / bare_per_s.max(1.0),
        cpu_ratio: (gateway_cpu_pct / accepted_per_s.max(1.0))
            / (broker_cpu_pct / bare_per_s.max(1.0)).max(f64::MIN_POSITIVE),
        bare_per_s,
        accepted_per_s,
        stored,
        // Counts, not sets: a frame stored whose PUBACK never came back offsets one lost.
        lost: (published as i64 - stored as i64).max(0),
        catch_up_s: catch_up,
        gateway_cpu_pct,
        broker_cpu_pct,
        db_cpu_pct: 100.0 * (db1 - db0).max(0.0) / window,
        sink_cpu_pct: 100.0 * (sink1 - sink0).max(0.0) / window,
        gateway_rss_mib: rss,
        alarms: sent.len(),
        cases: latencies.len(),
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
        latency_max_ms: percentile(&latencies, 1.0),
        decided_p99_ms: percentile(&decided, 0.99),
    })
}

/// The gateway restarted on a registry of `n` devices; each then reports once.
async fn million(n: usize, broker: &Mosquitto, store_url: &str) -> Result<Million> {
    let dir = tempfile::tempdir()?;
    let city_dir = dir.path().join("city");
    city::generate(11, Counts { covers: 0, drains: n, beacons: 0 }).write(&city_dir)?;
    let devices = inventory::load(&city_dir.join("devices.json"))?;
    let mut config = Config::default();
    config.store.path = dir.path().join("gridsense.db");
    config.store.url = store_url.to_owned();
    let started = Instant::now();
    app::open_store(&config)?.import(&devices, 0)?;
    println!("million: {n} devices imported in {:.1} s", started.elapsed().as_secs_f64());
    drop(devices);
    let grids = city_dir.join("grids.geojson");
    let start = || Gateway::start(dir.path(), broker.addr(), &grids, store_url, "gw1", None);
    let gateway = start()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let registered = mem_mib(gateway.pid(), "VmRSS:");
    println!(
        "million: {n} devices registered, gateway RSS {registered:.0} MiB ({})",
        mem_split(gateway.pid())
    );
    // Every device reports once: readings every 60 s, boots spread over those 60 s.
    let mut scenario = scenario::load("load")?;
    scenario.device_config.report_interval_s = Some(60);
    let plan = fleet::plan(&city_dir, &scenario)?;
    let options = RunOptions::pooled(broker.addr(), scenario, 1.0, Duration::from_secs(62));
    let (_keep, stop) = tokio::sync::watch::channel(false);
    let summary = fleet::run(plan, &options, stop).await?;
    let (stored, _) =
        wait_stored(|| gateway.accepted(), summary.frames(), Duration::from_secs(300)).await?;
    let reported = mem_mib(gateway.pid(), "VmRSS:");
    let hwm = mem_mib(gateway.pid(), "VmHWM:");
    println!(
        "million: {stored} frames stored, gateway RSS {reported:.0} MiB (peak {hwm:.0} MiB; {})",
        mem_split(gateway.pid())
    );
    gateway.stop()?;
    let started = Instant::now();
    let gateway = start()?;
    let restart_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = mem_mib(gateway.pid(), "VmRSS:");
    println!(
        "million: restarted on that store, ready in {restart_s:.1} s, gateway RSS {restarted:.0} MiB ({})",
        mem_split(gateway.pid())
    );
    gateway.stop()?;
    Ok(Million {
        devices: n,
        rss_registered_mib: registered,
        rss_reported_mib: reported,
        hwm_mib: hwm,
        reported: stored,
        restart_s,
        rss_restarted_mib: restarted,
    })
}

/// The headline figures of every run, one panel each: durable ÷ bare, alarm → case p99 (log
/// scale), gateway CPU per frame ÷ the broker's; the goals as dashed lines.
fn svg(runs: &[(Run, Vec<Step>)]) -> String {
    const W: f64 = 360.0;
    const H: f64 = 240.0;
    const M: f64 = 48.0;
    const COLOURS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];
    let all = || runs.iter().flat_map(|(_, steps)| steps.iter());
    let x_max = all().map(|s| s.offered).max().unwrap_or(1) as f64 * 1.05;
    let mut offered: Vec<u64> = all().map(|s| s.offered).collect();
    offered.sort_unstable();
    offered.dedup();
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        3.0 * (W + M) + M,
        H + 2.0 * M
    );
    // (name, colour, points (offered, value)).
    type Series = (String, &'static str, Vec<(u64, f64)>);
    // Title, y range, goal line, series.
    type Panel<'a> = (&'a str, f64, Option<(f64, &'a str)>, Vec<Series>);
    let series = |f: &dyn Fn(&Step) -> f64| -> Vec<Series> {
        runs.iter()
            .enumerate()
            .map(|(i, (run, steps))| {
                let colour = COLOURS.get(i % COLOURS.len()).copied().unwrap_or("#333");
                (run.name(), colour, steps.iter().map(|s| (s.offered, f(s))).collect())
            })
            .collect()
    };
    let panels: [Panel<'_>; 3] = [
        (
            "gateway durable ÷ bare subscriber",
            all().map(|s| s.durable_ratio).fold(1.0, f64::max) * 1.1,
            Some((0.9, "floor 0.9")),
            series(&|s| s.durable_ratio),
        ),
        (
            "alarm → case on the board p99, ms (log scale)",
            // Log scale: decades from 1 ms to above the slowest p99.
            10f64.powf(all().map(|s| s.latency_p99_ms as f64).fold(100.0, f64::max).log10().ceil()),
            Some((50.0, "goal 50 ms")),
            series(&|s| s.latency_p99_ms as f64),
        ),
        (
            "gateway CPU per frame ÷ the broker's",
            all().map(|s| s.cpu_ratio).fold(1.0, f64::max) * 1.1,
            Some((0.8, "floor 0.8")),
            series(&|s| s.cpu_ratio),
        ),
    ];
    for (i, (title, y_max, goal, series)) in panels.iter().enumerate() {
        let log = i == 1;
        let x0 = M + i as f64 * (W + M);
        let px = |x: f64| x0 + x / x_max * W;
        let py = |y: f64| {
            if log { M + H - y.max(1.0).log10() / y_max.log10() * H } else { M + H - y / y_max * H }
        };
        let _ = writeln!(
            out,
            "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">{title}</text>\n<rect x=\"{x0}\" y=\"{M}\" width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#333\"/>",
            M - 24.0
        );
        // x: the offered rates themselves; y: quarters, or decades on the log scale.
        for o in &offered {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}k</text>",
                px(*o as f64),
                M + H + 14.0,
                o / 1_000
            );
        }
        let ticks: Vec<f64> = if log {
            (0..=y_max.log10().round() as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=4).map(|k| y_max * f64::from(k) / 4.0).collect()
        };
        for yv in ticks {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><line x1=\"{x0}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
                x0 - 4.0,
                py(yv) + 4.0,
                if yv < 10.0 { format!("{yv:.2}") } else { format!("{yv:.0}") },
                x0 + W,
                py(yv),
                py(yv)
            );
        }
        if let Some((g, label)) = goal {
            let _ = writeln!(
                out,
                "<line x1=\"{x0}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#d62728\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#d62728\" text-anchor=\"end\">{label}</text>",
                x0 + W,
                py(*g),
                py(*g),
                x0 + W - 4.0,
                py(*g) - 4.0
            );
        }
        for (j, (name, colour, values)) in series.iter().enumerate() {
            let points: Vec<String> =
                values.iter().map(|(o, v)| format!("{:.1},{:.1}", px(*o as f64), py(*v))).collect();
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
                points.join(" ")
            );
            for p in &points {
                let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                let _ =
                    writeln!(out, "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{colour}\"/>");
            }
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{name}</text>",
                x0 + 8.0,
                M + 14.0 + 14.0 * j as f64
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">offered frames/s</text>",
            x0 + W / 2.0,
            M + H + 30.0
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One run's table.
fn step_table(md: &mut String, steps: &[Step]) {
    let _ = writeln!(
        md,
        "| offered/s | **durable ÷ bare** | **gateway CPU/frame ÷ broker's** | **alarm → case p99 ms** | bare subscriber/s | gateway durable/s | published (PUBACK) | no PUBACK | stored | lost | catch-up s | gateway CPU % | broker CPU % | database CPU % | telemetry sink CPU % | gateway RSS MiB | alarms → cases | p50 ms | max ms | decided p99 ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in steps {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} → {} | {} | {} | {} |",
            s.offered,
            s.durable_ratio,
            s.cpu_ratio,
            s.latency_p99_ms,
            s.bare_per_s,
            s.accepted_per_s,
            s.published,
            s.unsent,
            s.stored,
            s.lost,
            s.catch_up_s,
            s.gateway_cpu_pct,
            s.broker_cpu_pct,
            s.db_cpu_pct,
            s.sink_cpu_pct,
            s.gateway_rss_mib,
            s.alarms,
            s.cases,
            s.latency_p50_ms,
            s.latency_max_ms,
            s.decided_p99_ms
        );
    }
}

fn report(
    runs: &[(Run, Vec<Step>)],
    million: Option<&Million>,
    (seconds, command, written): (u64, &str, &str),
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Load report\n");
    let _ = writeln!(
        md,
        "Written by `{command}` on {} (UTC). Machine: {} cores, Mosquitto {}, the gateway as a separate `gridsense run` process (local platform), the load from the simulator's pooled transport (QoS 1), a bare QoS 1 subscriber on the same broker, all on this machine; each run with its own broker, store and registry. Each step: {WARMUP_S} s warm-up, {seconds} s measured, {ALARM_RATE:.0} \"cover removed\" alarms/s from other devices during the window.\n",
        written,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        mosquitto_version(),
    );
    let _ = writeln!(md, "![load plot](load.svg)\n");
    for (run, steps) in runs {
        let _ = writeln!(md, "## {} (`{}`)\n", run.title(), run.key());
        step_table(&mut md, steps);
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "\nThe ratios come first: absolute rates differ up to ~2.5× between machines of this class from one session to the next, ratios measured in one run do not. \"gateway durable/s\" counts frames committed to the store (and then acknowledged) during the window; a frame counts as published only once the broker acknowledged it (PUBACK), and \"no PUBACK\" are those handed to the MQTT client whose PUBACK was not seen (never sent, or its PUBACK still on the way when the load stopped); \"lost\" is published minus stored once the gateway has caught up (\"catch-up s\" after the load stopped) — counts, not sets: a frame stored whose PUBACK never came back would offset one lost. \"gateway CPU/frame ÷ broker's\" is (gateway CPU % ÷ durable/s) ÷ (broker CPU % ÷ bare/s). CPU % is of one core (200 % = both). Latency is publish → the case committed and delivered to the board; \"decided\" is publish → the rule fired in the batch being built."
    );
    if let Some(m) = million {
        let _ = writeln!(
            md,
            "\n## Memory at {} registered devices\n\nGateway RSS after start: {:.0} MiB; after every device had reported (each sampled every 60 s for 62 s: {} frames stored): {:.0} MiB (peak {:.0} MiB); restarted on that store (every device's health, counters and rule states restored): ready in {:.1} s, {:.0} MiB.",
            m.devices,
            m.rss_registered_mib,
            m.reported,
            m.rss_reported_mib,
            m.hwm_mib,
            m.restart_s,
            m.rss_restarted_mib
        );
    }
    md
}

fn chrono_like_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn mosquitto_version() -> String {
    Command::new("/usr/sbin/mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().and_then(|l| l.split_whitespace().nth(2)).map(str::to_owned)
        })
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(json) = &args.from_json {
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
        let mut runs = Vec::new();
        for run in ["sqlite", "postgres", "sqlite-victoria", "postgres-victoria"] {
            let run = Run::parse(run)?;
            if let Some(v) = saved.get(run.key()) {
                let mut steps: Vec<Step> = serde_json::from_value(v.clone())?;
                for s in &mut steps {
                    // Reports written before the ratios were kept: derived from what they have.
                    if s.durable_ratio == 0.0 {
                        s.durable_ratio = s.accepted_per_s / s.bare_per_s.max(1.0);
                        s.cpu_ratio = (s.gateway_cpu_pct / s.accepted_per_s.max(1.0))
                            / (s.broker_cpu_pct / s.bare_per_s.max(1.0)).max(f64::MIN_POSITIVE);
                    }
                }
                runs.push((run, steps));
            }
        }
        let million: Option<Million> = saved
            .get("million")
            .filter(|m| !m.is_null())
            .map(|m| serde_json::from_value(m.clone()))
            .transpose()?;
        let text = |k: &str| saved.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
        let seconds = saved.get("seconds").and_then(serde_json::Value::as_u64).unwrap_or(0);
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(args.out.join("load.svg"), svg(&runs))?;
        let md = report(&runs, million.as_ref(), (seconds, &text("command"), &text("written")));
        std::fs::write(args.out.join("report.md"), md)?;
        println!("redrawn from {}", json.display());
        return Ok(());
    }
    let mut runs = Vec::new();
    for run in &args.runs {
        println!("run {}: {}", run.name(), run.title());
        let steps = run_steps(&args, run).await?;
        runs.push((run.clone(), steps));
    }
    let million = if args.million > 0 {
        // On PostgreSQL only when every run was.
        let (_pg, url) = store_for(args.runs.iter().all(|r| r.store == "postgres"))?;
        let broker = Mosquitto::start()?;
        Some(million(args.million, &broker, &url).await?)
    } else {
        None
    };

    std::fs::create_dir_all(&args.out)?;
    let command =
        format!("scripts/bench {}", std::env::args().skip(1).collect::<Vec<_>>().join(" "));
    let written = chrono_like_now();
    std::fs::write(args.out.join("load.svg"), svg(&runs))?;
    std::fs::write(
        args.out.join("report.md"),
        report(&runs, million.as_ref(), (args.seconds, command.trim(), &written)),
    )?;
    let mut json = serde_json::json!({
        "million": million,
        "command": command.trim(),
        "seconds": args.seconds,
        "written": written,
        "runs": runs.iter().map(|(r, _)| serde_json::json!({"key": r.key(), "name": r.name(), "title": r.title()})).collect::<Vec<_>>(),
    });
    if let Some(object) = json.as_object_mut() {
        for (run, steps) in &runs {
            object.insert(run.key(), serde_json::to_value(steps)?);
        }
    }
    std::fs::write(args.out.join("report.json"), serde_json::to_string_pretty(&json)?)?;
    println!("report written to {}", args.out.join("report.md").display());
    Ok(())
}

/// A durable PostgreSQL (fsync on, as in production; its processes' CPU is measured) and its
/// URL when `postgres`; else none and the empty URL (SQLite).
fn store_for(postgres: bool) -> Result<(Option<gridsense_tests::postgres::Postgres>, String)> {
    if !postgres {
        return Ok((None, String::new()));
    }
    let pg = gridsense_tests::postgres::Postgres::start_durable()?;
    let url = pg.database(None)?;
    Ok((Some(pg), url))
}

/// Every step of one run: its own broker, store (and VictoriaMetrics), registry and gateway
/// instances.
#[allow(clippy::too_many_lines)]
async fn run_steps(args: &Args, run: &Run) -> Result<Vec<Step>> {
    let broker = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    // One registry: covers for the alarms, and a slice of drains per step (1 frame/s each at
    // speed 2). Pooled devices start their counters afresh, so no slice runs twice.
    let alarms_per_step = (ALARM_RATE * args.seconds as f64).ceil() as usize;
    let slices: Vec<usize> = args.rates.iter().map(|r| (*r as usize).div_ceil(2)).collect();
    let covers = alarms_per_step * args.rates.len();
    let city_dir = dir.path().join("city");
    city::generate(5, Counts { covers, drains: slices.iter().sum(), beacons: 0 })
        .write(&city_dir)?;
    let devices = inventory::load(&city_dir.join("devices.json"))?;
    let (pg, store_url) = store_for(run.store == "postgres")?;
    let db_pids =
        || pg.as_ref().map(gridsense_tests::postgres::Postgres::server_pids).unwrap_or_default();
    // Telemetry to VictoriaMetrics' InfluxDB 2 write API, as in production; its CPU is
    // measured apart.
    let victoria =
        if run.victoria { Some(gridsense_tests::VictoriaMetrics::start()?) } else { None };
    let victoria_url = victoria.as_ref().map(gridsense_tests::VictoriaMetrics::url);
    let sink_pid = victoria.as_ref().map(gridsense_tests::VictoriaMetrics::pid);
    let mut config = Config::default();
    config.store.path = dir.path().join("gridsense.db");
    config.store.url = store_url.clone();
    app::open_store(&config)?.import(&devices, 0)?;
    let cover_devices: Vec<inventory::Device> =
        devices.iter().filter(|d| d.record.kind == Kind::Cover).cloned().collect();
    let mut plan = fleet::plan(&city_dir, &scenario::load("load")?)?;
    plan.devices.retain(|d| d.record.record.kind == Kind::Drain);
    let instances = if run.store == "postgres" { args.instances } else { 1 };
    let mut list = Vec::new();
    for i in 1..=instances {
        let grids = city_dir.join("grids.geojson");
        list.push(Gateway::start(
            dir.path(),
            broker.addr(),
            &grids,
            &store_url,
            &format!("gw{i}"),
            victoria_url.as_deref(),
        )?);
    }
    let gateway = Gateways(list);
    if instances > 1 {
        println!("{instances} instances, shards held: {}", gateway.balanced()?);
    }
    let bare = bare_subscriber(broker.addr());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut steps = Vec::new();
    let mut drains = plan.devices.into_iter();
    for (i, (rate, slice)) in args.rates.iter().zip(&slices).enumerate() {
        let step_plan = Plan {
            devices: drains.by_ref().take(*slice).collect(),
            actors: Vec::new(),
            env: plan.env.clone(),
        };
        let covers = cover_devices.get(i * alarms_per_step..).unwrap_or_default();
        let s = step(
            *rate,
            step_plan,
            covers,
            (&broker, &gateway, &bare),
            args.seconds,
            &db_pids,
            sink_pid,
        )
        .await?;
        println!(
            "offered {:>6}/s: durable ÷ bare {:.2}, gateway CPU/frame ÷ broker's {:.2}; bare {:>6.0}/s, gateway {:>6.0}/s durable; published (PUBACK) {}, no PUBACK {}, lost {}, catch-up {:.1} s, gateway CPU {:.0} %, broker CPU {:.0} %, database CPU {:.0} %, sink CPU {:.0} %, RSS {:.0} MiB, alarm → case p50 {} / p99 {} / max {} ms (decided p99 {} ms; {} of {})",
            s.offered,
            s.durable_ratio,
            s.cpu_ratio,
            s.bare_per_s,
            s.accepted_per_s,
            s.published,
            s.unsent,
            s.lost,
            s.catch_up_s,
            s.gateway_cpu_pct,
            s.broker_cpu_pct,
            s.db_cpu_pct,
            s.sink_cpu_pct,
            s.gateway_rss_mib,
            s.latency_p50_ms,
            s.latency_p99_ms,
            s.latency_max_ms,
            s.decided_p99_ms,
            s.cases,
            s.alarms
        );
        steps.push(s);
    }
    gateway.stop()?;
    Ok(steps)
}
