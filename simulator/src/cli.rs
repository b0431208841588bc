//! Command line of `gridsim`.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{city, fleet, scenario};

/// gridsim: a simulated district of gridsense devices running the real firmware.
#[derive(Debug, Parser)]
#[command(name = "gridsim", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a synthetic district (grids.geojson, devices.json) around Zhongshan, Dalian.
    City {
        /// Seed: the same seed gives the same district.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Manhole covers.
        #[arg(long, default_value_t = 2_000)]
        covers: usize,
        /// Drainage sensors.
        #[arg(long, default_value_t = 300)]
        drains: usize,
        /// Patrol beacons (one per grid by default).
        #[arg(long, default_value_t = city::GRID_COUNT)]
        beacons: usize,
        /// The broker every device is provisioned with (`brokers` in devices.json); twice for
        /// two: a device tries them in this order.
        #[arg(long, num_args = 1)]
        broker: Vec<String>,
    },
    /// Run the district's devices against a broker.
    Run(RunArgs),
    /// Print the memory each pooled simulated device takes.
    Sizes,
}

/// How devices connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// One MQTT connection per device, through the firmware's own client.
    PerDevice,
    /// A few rumqttc connections publishing for many devices (load generation).
    Pooled,
    /// One connection per device through its own embassy-net TCP/IP stack over a simulated
    /// radio link (latency, loss, outages), bridged to the broker. For a few dozen devices.
    Fidelity,
}

/// `gridsim run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Broker, `mqtt://HOST:PORT`, or `mqtts://HOST:PORT` for TLS (with `--ca-file`). Give it
    /// twice for two brokers: devices start on the first and fail over to the other when a
    /// connection attempt fails. None: the `brokers` the devices carry in devices.json.
    #[arg(long, num_args = 1)]
    pub broker: Vec<String>,
    /// PEM file of the CA(s) the broker's certificate must chain to (`mqtts://` only).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// A `gridsim city` output folder.
    #[arg(long)]
    pub city: PathBuf,
    /// A shipped scenario name or a scenario file.
    #[arg(long, default_value = "showcase")]
    pub scenario: String,
    /// Simulated seconds per real second (default: the scenario's).
    #[arg(long)]
    pub speed: Option<f64>,
    /// Wall-clock length, like `30s` or `5m` (default: the scenario's; none: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How devices connect.
    #[arg(long, value_enum, default_value_t = TransportArg::PerDevice)]
    pub transport: TransportArg,
    /// Connections for the pooled transport.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Publish with QoS 0 in the pooled transport (default QoS 1).
    #[arg(long)]
    pub qos0: bool,
    /// Fidelity transport: one-way radio latency, ms.
    #[arg(long, default_value_t = 60)]
    pub latency_ms: u64,
    /// Fidelity transport: share of radio packets lost (0..1).
    #[arg(long, default_value_t = 0.01)]
    pub loss: f64,
    /// Simulate only the first N devices.
    #[arg(long)]
    pub devices: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The `--broker` and `--ca-file` arguments: the address, and TLS when the scheme is
/// `mqtts://` (the certificate must name the URL's host).
pub fn broker_tls(
    url: &str,
    ca_file: Option<&Path>,
) -> Result<(SocketAddr, Option<crate::tls::Tls>)> {
    let addr = broker_addr(url)?;
    if !url.starts_with("mqtts://") {
        if ca_file.is_some() {
            bail!("--ca-file is for TLS: use an mqtts:// broker URL");
        }
        return Ok((addr, None));
    }
    let Some(ca) = ca_file else {
        bail!("--broker {url:?}: TLS needs --ca-file, the CA that signed the broker's certificate");
    };
    Ok((addr, Some(crate::tls::Tls::new(ca, crate::tls::url_host(url))?)))
}

/// `mqtt://HOST:PORT`, `mqtts://HOST:PORT` (or `HOST:PORT`) to a socket address.
pub fn broker_addr(url: &str) -> Result<SocketAddr> {
    let rest = url.strip_prefix("mqtt://").or_else(|| url.strip_prefix("mqtts://")).unwrap_or(url);
    if rest.contains('/') || rest.contains('@') {
        bail!("--broker {url:?}: expected mqtt://HOST:PORT");
    }
    rest.to_socket_addrs()
        .with_context(|| format!("--broker {url:?}: expected mqtt://HOST:PORT"))?
        .next()
        .with_context(|| format!("--broker {url:?}: no address"))
}

/// The brokers the district's devices are provisioned with (`brokers` in devices.json): one
/// fleet runs against one pair, so every device must carry the same.
fn provisioned_brokers(city: &Path) -> Result<Vec<String>> {
    let devices = crate::inventory::load(&city.join("devices.json"))?;
    let mut first: Option<(&str, &Vec<String>)> = None;
    for d in &devices {
        let Some(brokers) = &d.record.brokers else {
            bail!(
                "no --broker, and device {} has no brokers in devices.json: give --broker, or write them with gridsim city --broker",
                d.record.eui
            );
        };
        match first {
            None => first = Some((&d.record.eui, brokers)),
            Some((eui, b)) if b != brokers => bail!(
                "no --broker, and devices.json gives {eui} {b:?} but {} {brokers:?}: one run uses one pair, give --broker",
                d.record.eui
            ),
            Some(_) => {}
        }
    }
    first.map(|(_, b)| b.clone()).context("no --broker, and devices.json lists no device")
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::City { seed, out, covers, drains, beacons, broker } => {
            let mut city = city::generate(seed, city::Counts { covers, drains, beacons });
            if !broker.is_empty() {
                crate::inventory::check_brokers(&broker)
                    .map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
                for d in &mut city.devices {
                    d.brokers = Some(broker.clone());
                }
            }
            city.write(&out)?;
            println!(
                "gridsim city: {} grids, {} devices written to {}",
                city.grids.len(),
                city.devices.len(),
                out.display()
            );
            Ok(())
        }
        Command::Sizes => {
            for (kind, bytes) in crate::pooled::slot_sizes() {
                println!("{kind} {bytes}");
            }
            for (part, bytes) in crate::pooled::component_sizes() {
                println!("  {part} {bytes}");
            }
            Ok(())
        }
        Command::Run(mut args) => {
            if args.broker.is_empty() {
                args.broker = provisioned_brokers(&args.city)?;
            }
            if args.broker.len() > 2 {
                bail!("--broker: at most two brokers");
            }
            let first = args.broker.first().context("--broker")?;
            let (broker, tls) = broker_tls(first, args.ca_file.as_deref())?;
            let failover = args
                .broker
                .iter()
                .skip(1)
                .map(|u| broker_tls(u, args.ca_file.as_deref()).map(|(a, _)| a))
                .collect::<Result<Vec<_>>>()?;
            let scenario = scenario::load(&args.scenario)?;
            let plan = fleet::plan(&args.city, &scenario)?;
            let options = fleet::RunOptions {
                broker,
                failover,
                tls,
                speed: args.speed.unwrap_or(scenario.speed),
                duration: args.duration.or(scenario.duration.map(|s| s.0)),
                transport: match args.transport {
                    TransportArg::PerDevice => fleet::Transport::PerDevice,
                    TransportArg::Pooled => {
                        fleet::Transport::Pooled { connections: args.connections, qos1: !args.qos0 }
                    }
                    TransportArg::Fidelity => {
                        if !(0.0..1.0).contains(&args.loss) {
                            bail!("--loss {} must be at least 0 and below 1", args.loss);
                        }
                        fleet::Transport::Fidelity(crate::fidelity::RadioConfig {
                            latency_ms: args.latency_ms,
                            jitter_ms: args.latency_ms / 2,
                            loss: args.loss,
                        })
                    }
                },
                limit: args.devices,
                progress: !args.quiet,
                clock: None,
                scenario,
            };
            let (stop_tx, stop) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = stop_tx.send(true);
                }
            });
            let summary = fleet::run(plan, &options, stop).await?;
            print!("{}", summary.render());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_brokers_gridsim_city_writes_are_the_ones_gridsim_run_uses_without_broker() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let city = |broker: &[&str]| Command::City {
            seed: 3,
            out: dir.path().to_owned(),
            covers: 3,
            drains: 2,
            beacons: 0,
            broker: broker.iter().map(|b| (*b).to_owned()).collect(),
        };
        let go = |c| async { run(Cli { command: c }).await };
        go(city(&[])).await.unwrap_or_else(|e| panic!("{e}"));
        let none = provisioned_brokers(dir.path()).map(|_| ()).unwrap_err().to_string();
        assert!(none.contains("has no brokers") && none.contains("--broker"), "{none}");
        let pair = ["mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1884"];
        go(city(&pair)).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(provisioned_brokers(dir.path()).ok(), Some(pair.map(String::from).to_vec()));
        let bad = go(city(&["mqtt://127.0.0.1:1883", "mqtts://127.0.0.1:8883"])).await;
        assert!(bad.is_err_and(|e| e.to_string().contains("both TLS")));
        // Devices provisioned differently cannot share one run.
        let path = dir.path().join("devices.json");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let text = text.replacen("127.0.0.1:1884", "127.0.0.1:1885", 1);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let mixed = provisioned_brokers(dir.path()).map(|_| ()).unwrap_err().to_string();
        assert!(mixed.contains("one run uses one pair"), "{mixed}");
    }
}
