//! `gridsense cases …` and `gridsense maintenance …`: the case board and maintenance windows
//! from a terminal (an SSH session in the management centre), on the local store.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::{
    app,
    board::{RequestsQuery, filter_of, timers},
    calendar::Calendar,
    cases::CaseState,
    config::Config,
};

/// `gridsense cases …`
#[derive(Debug, Subcommand)]
pub enum CasesCommand {
    /// List cases, newest first, with their step timers.
    List {
        /// Lifecycle states, comma-separated (e.g. `collected,filed`).
        #[arg(long)]
        state: Option<String>,
        /// Class codes, comma-separated (e.g. `C0102,E0404`).
        #[arg(long)]
        class: Option<String>,
        /// Area code prefix (district, street, community or grid).
        #[arg(long)]
        area: Option<String>,
        /// Most rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// One case: what it carries, its timers and its full trace.
    Show {
        /// Case id.
        id: i64,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Move a case through its lifecycle.
    Move {
        /// Case id.
        id: i64,
        /// Target state: filed, voided, dispatched, handled, feedback, verified, closed,
        /// parked, returned.
        #[arg(long)]
        to: String,
        /// Who does it.
        #[arg(long)]
        actor: String,
        /// Why.
        #[arg(long, default_value = "")]
        note: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the built-in rules or case tables as TOML, to start a file from.
    Defaults {
        /// `rules` or `tables`.
        what: String,
    },
}

/// `gridsense maintenance …`
#[derive(Debug, Subcommand)]
pub enum MaintenanceCommand {
    /// Record a maintenance window: alarms in scope are recorded, not filed as cases.
    Add {
        /// A device EUI, or an area code (district, street, community or grid).
        #[arg(long)]
        scope: String,
        /// How long from now, like `2h` or `90m`.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Who and why (e.g. the crew and the work order).
        #[arg(long)]
        note: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Windows not yet over.
    List {
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn calendar(config: &Config) -> Result<(crate::cases::CaseTables, Calendar)> {
    let (_, tables) = app::case_policy(config)?;
    let cal = Calendar::new(&tables.calendar).context("cases.tables")?;
    Ok((tables, cal))
}

/// Runs `gridsense cases …`.
pub fn cases(
    cmd: CasesCommand,
    load: impl Fn(Option<&std::path::Path>) -> Result<Config>,
) -> Result<String> {
    match cmd {
        CasesCommand::List { state, class, area, limit, config } => {
            let config = load(config.as_deref())?;
            let (tables, cal) = calendar(&config)?;
            let q = RequestsQuery {
                state,
                service_code: class,
                area,
                limit: Some(limit),
                ..RequestsQuery::default()
            };
            let filter = filter_of(&q).map_err(|e| anyhow::anyhow!("--{e}"))?;
            let store = app::open_store(&config)?;
            let now = app::wall_clock()();
            let mut out = format!(
                "{:>6}  {:<6} {:<10} {:<7} {:<16} {:<15} {:<25} {:<7} {:<8} {:<8}\n",
                "id",
                "class",
                "state",
                "urgency",
                "device",
                "grid",
                "detected",
                "deploy",
                "feedback",
                "handling"
            );
            for c in store.cases(&filter)? {
                let t = timers(&c, &tables, &cal, now);
                let colour = |i: usize| t.get(i).map_or("", |t| t.colour.as_str());
                let _ = writeln!(
                    out,
                    "{:>6}  {:<6} {:<10} {:<7} {:<16} {:<15} {:<25} {:<7} {:<8} {:<8}",
                    c.id,
                    c.class_code,
                    c.state,
                    c.urgency,
                    c.device_id,
                    c.grid_code.as_deref().unwrap_or("-"),
                    cal.iso(c.detected_ms),
                    colour(0),
                    colour(1),
                    colour(2)
                );
            }
            Ok(out)
        }
        CasesCommand::Show { id, config } => {
            let config = load(config.as_deref())?;
            let (tables, cal) = calendar(&config)?;
            let store = app::open_store(&config)?;
            let Some(c) = store.case(id)? else { bail!("no case {id}") };
            let mut out = String::new();
            let _ = writeln!(
                out,
                "case {} ({}) — {} {}",
                c.id, c.idempotency_key, c.class_code, c.class_name
            );
            let _ =
                writeln!(out, "state: {}   urgency: {}   source: {}", c.state, c.urgency, c.source);
            let _ = writeln!(
                out,
                "device: {}   object: {}",
                c.device_id,
                c.object_code.as_deref().unwrap_or("-")
            );
            let _ = writeln!(
                out,
                "place: {} ({} {:.6}, {:.6})   grid {}  community {}  street {}",
                c.address,
                c.crs,
                c.lat,
                c.lon,
                c.grid_code.as_deref().unwrap_or("-"),
                c.community_code.as_deref().unwrap_or("-"),
                c.street_code.as_deref().unwrap_or("-")
            );
            let _ = writeln!(
                out,
                "onset: {}   detected: {}",
                cal.iso(c.onset_ms),
                cal.iso(c.detected_ms)
            );
            let _ = writeln!(
                out,
                "platform: {} {}",
                c.platform.as_deref().unwrap_or("(not delivered)"),
                c.platform_id.as_deref().unwrap_or("")
            );
            let _ = writeln!(out, "description: {}", c.description);
            out.push_str("timers:\n");
            for t in timers(&c, &tables, &cal, app::wall_clock()()) {
                let _ = writeln!(
                    out,
                    "  {:<8} {:<4} due {}  used {:>5.1}%  {}{}",
                    t.step,
                    t.limit,
                    t.due,
                    t.used * 100.0,
                    t.colour.as_str(),
                    t.done.map(|d| format!("  (done {d})")).unwrap_or_default()
                );
            }
            out.push_str("trace:\n");
            for e in store.trace(id)? {
                let _ = writeln!(
                    out,
                    "  {}  {:<8} {:<24} {}",
                    cal.iso(e.at_ms),
                    e.kind,
                    e.actor,
                    e.detail
                );
            }
            Ok(out)
        }
        CasesCommand::Move { id, to, actor, note, config } => {
            let config = load(config.as_deref())?;
            let (_, cal) = calendar(&config)?;
            let Some(to) = CaseState::parse(&to) else {
                bail!("--to {to:?} is not a lifecycle state")
            };
            if actor.trim().is_empty() {
                bail!("--actor must name who moves the case");
            }
            let mut store = app::open_store(&config)?;
            let moved = store.transition(
                id,
                to,
                &format!("operator:{}", actor.trim()),
                &note,
                app::wall_clock()(),
                |limit, from| limit.parse().ok().map(|l| cal.deadline(from, l)),
            )?;
            match moved {
                Ok(s) => Ok(format!("gridsense cases move: case {id} is now {s}\n")),
                Err(e) => bail!("{e}"),
            }
        }
        CasesCommand::Defaults { what } => match what.as_str() {
            "rules" => Ok(toml::to_string(&crate::rules::RulesConfig::default())?),
            "tables" => Ok(toml::to_string(&crate::cases::CaseTables::default())?),
            other => bail!("{other:?}: choose rules or tables"),
        },
    }
}

/// Runs `gridsense maintenance …`.
pub fn maintenance(
    cmd: MaintenanceCommand,
    load: impl Fn(Option<&std::path::Path>) -> Result<Config>,
) -> Result<String> {
    match cmd {
        MaintenanceCommand::Add { scope, duration, note, config } => {
            let config = load(config.as_deref())?;
            let is_eui = scope.len() == 16 && scope.chars().all(|c| c.is_ascii_hexdigit());
            let is_area =
                !scope.is_empty() && scope.len() <= 20 && scope.chars().all(|c| c.is_ascii_digit());
            if !(is_eui || is_area) {
                bail!(
                    "--scope {scope:?} is neither a device EUI (16 hex digits) nor an area code (digits)"
                );
            }
            if note.trim().is_empty() {
                bail!("--note must say who works there and why");
            }
            let now = app::wall_clock()();
            let until = now.saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX));
            let mut store = app::open_store(&config)?;
            let id = store.add_window(&scope.to_ascii_lowercase(), now, until, note.trim(), now)?;
            let (_, cal) = calendar(&config)?;
            Ok(format!(
                "gridsense maintenance add: window {id} for {scope} until {} (a running gateway applies it within downlink.poll_ms)\n",
                cal.iso(until)
            ))
        }
        MaintenanceCommand::List { config } => {
            let config = load(config.as_deref())?;
            let (_, cal) = calendar(&config)?;
            let store = app::open_store(&config)?;
            let mut out = String::new();
            for w in store.windows(app::wall_clock()())? {
                let _ = writeln!(
                    out,
                    "{:>4}  {:<16}  {} → {}  {}",
                    w.id,
                    w.scope,
                    cal.iso(w.from_ms),
                    cal.iso(w.until_ms),
                    w.note
                );
            }
            Ok(out)
        }
    }
}
