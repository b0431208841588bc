//! `gridsense cases …`, `gridsense maintenance …` and `gridsense devices list|show`: the case
//! board, maintenance windows and device health from a terminal (an SSH session in the
//! management centre), on the local store or through a running gateway's API (`--api URL`).

// The tables render `serde_json::Value`s; indexing one yields `Null` for what is missing and
// never panics.
#![allow(clippy::indexing_slicing)]

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::{
    app,
    calendar::Calendar,
    cases::CaseState,
    config::Config,
    http::board::{RequestsQuery, filter_of, timers},
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
        /// A running gateway's base URL (e.g. http://127.0.0.1:8080) instead of the store.
        #[arg(long)]
        api: Option<String>,
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
        /// With `--to dispatched`: the department it goes to (default: the one responsible);
        /// with `--to returned`: the department it is re-routed to (default: the tables'
        /// fallback, the district's city-management bureau).
        #[arg(long)]
        department: Option<String>,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Supervision (督办) now: escalate every open case whose 130 milestone or handling
    /// deadline is red, or that was returned too often, one level (a running gateway does it
    /// every `cases.supervise_s`).
    Supervise {
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Put a dead-lettered delivery back in the queue (after fixing what made the platform
    /// refuse it): outbox entry ID (`gridsense cases show` lists a case's entries), or every
    /// dead entry with `--dead`. A running gateway sends it within a second; a case that may
    /// have reached the platform is looked for before it is posted again.
    Redeliver {
        /// Outbox entry id.
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        id: Option<i64>,
        /// Every dead-lettered entry.
        #[arg(long)]
        dead: bool,
        /// Who asks (recorded in each case's trace).
        #[arg(long, default_value = "cli")]
        actor: String,
        /// Configuration file naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the built-in rules, case tables or departments (with levels, escalation and
    /// the report's weights: the tables' governance sections) as TOML, to start a file from.
    Defaults {
        /// `rules`, `tables` or `departments`.
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
pub async fn cases(
    cmd: CasesCommand,
    load: impl Fn(Option<&std::path::Path>) -> Result<Config>,
) -> Result<String> {
    match cmd {
        CasesCommand::List { state, class, area, limit, api, config } => {
            let q = RequestsQuery {
                state,
                service_code: class,
                area,
                limit: Some(limit),
                ..RequestsQuery::default()
            };
            let filter = filter_of(&q, Calendar::default().offset())
                .map_err(|e| anyhow::anyhow!("--{e}"))?;
            let (list, cal) = match api {
                Some(base) => {
                    let mut params = vec![format!("limit={limit}")];
                    for (k, v) in
                        [("state", &q.state), ("service_code", &q.service_code), ("area", &q.area)]
                    {
                        if let Some(v) = v {
                            params.push(format!("{k}={v}"));
                        }
                    }
                    let list = fetch(&base, &format!("/api/v1/cases?{}", params.join("&"))).await?;
                    (list, Calendar::default())
                }
                None => {
                    let config = load(config.as_deref())?;
                    let (tables, cal) = calendar(&config)?;
                    let now = app::wall_clock()();
                    let rows: Vec<_> = app::open_store(&config)?
                        .cases(&filter)?
                        .into_iter()
                        .map(|c| crate::http::board::CaseSummary {
                            timers: timers(&c, &tables, &cal, now),
                            case: c,
                        })
                        .collect();
                    (serde_json::to_value(rows)?, cal)
                }
            };
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
            for c in list.as_array().into_iter().flatten() {
                let colour = |i: usize| c["timers"][i]["colour"].as_str().unwrap_or("").to_owned();
                let text = |k: &str| c[k].as_str().unwrap_or("-").to_owned();
                let _ = writeln!(
                    out,
                    "{:>6}  {:<6} {:<10} {:<7} {:<16} {:<15} {:<25} {:<7} {:<8} {:<8}",
                    c["id"],
                    text("class_code"),
                    text("state"),
                    text("urgency"),
                    text("device_id"),
                    text("grid_code"),
                    c["detected_ms"].as_i64().map_or("-".into(), |t| cal.iso(t)),
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
            out.push_str("delivery:\n");
            for e in store.outbox(Some(id), None, 100)?.into_iter().rev() {
                let _ = writeln!(
                    out,
                    "  entry {:<5} {:<9} {:<7} attempts {}{}",
                    e.id,
                    e.op,
                    e.state,
                    e.attempts,
                    e.last_error.map(|t| format!("  last error: {t}")).unwrap_or_default()
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
        CasesCommand::Move { id, to, actor, note, department, config } => {
            let config = load(config.as_deref())?;
            let (tables, cal) = calendar(&config)?;
            let Some(to) = CaseState::parse(&to) else {
                bail!("--to {to:?} is not a lifecycle state")
            };
            if actor.trim().is_empty() {
                bail!("--actor must name who moves the case");
            }
            if let Some(d) = &department {
                if !tables.departments.list.contains_key(d) {
                    bail!("--department {d:?} is not in the tables' departments");
                }
                if !matches!(to, CaseState::Dispatched | CaseState::Returned) {
                    bail!("--department goes with --to dispatched or --to returned");
                }
            }
            let who = format!("operator:{}", actor.trim());
            let mut store = app::open_store(&config)?;
            let now = app::wall_clock()();
            if to == CaseState::Dispatched
                && let Some(d) = &department
                && !store.route(id, d, &who, &note, now)?
            {
                bail!("no case {id}");
            }
            let moved = store.transition(id, to, &who, &note, now, &cal)?;
            let s = match moved {
                Ok(s) => s,
                Err(e) => bail!("{e}"),
            };
            if to == CaseState::Returned {
                let d = department.as_deref().unwrap_or(&tables.departments.fallback);
                store.route(id, d, &who, "returned: not ours", now)?;
                return Ok(format!(
                    "gridsense cases move: case {id} is now {s}, re-routed to {d}\n"
                ));
            }
            Ok(format!("gridsense cases move: case {id} is now {s}\n"))
        }
        CasesCommand::Supervise { config } => {
            let config = load(config.as_deref())?;
            let (tables, cal) = calendar(&config)?;
            let done = app::open_store(&config)?.supervise(&tables, &cal, app::wall_clock()())?;
            let mut out = format!("gridsense cases supervise: {} escalated\n", done.len());
            for e in done {
                let _ = writeln!(
                    out,
                    "  case {:<6} {} → {}  ({})",
                    e.case_id,
                    e.from,
                    e.to,
                    e.causes.join(", ")
                );
            }
            Ok(out)
        }
        CasesCommand::Redeliver { id, dead, actor, config } => {
            let config = load(config.as_deref())?;
            let mut store = app::open_store(&config)?;
            let who = format!("operator:{}", actor.trim());
            let requeued = store.outbox_retry(id.filter(|_| !dead), &who, app::wall_clock()())?;
            match (id, requeued.len()) {
                (Some(id), 0) if !dead => match store.outbox_state(id)? {
                    Some(state) => bail!("outbox entry {id} is {state}, not dead-lettered"),
                    None => bail!("no outbox entry {id}"),
                },
                (_, n) => Ok(format!(
                    "gridsense cases redeliver: {n} entr{} back in the queue{}\n",
                    if n == 1 { "y" } else { "ies" },
                    if n == 0 {
                        String::new()
                    } else {
                        format!(
                            " ({})",
                            requeued.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
                        )
                    }
                )),
            }
        }
        CasesCommand::Defaults { what } => match what.as_str() {
            "rules" => Ok(toml::to_string(&crate::rules::RulesConfig::default())?),
            "tables" => Ok(toml::to_string(&crate::cases::CaseTables::default())?),
            "departments" => {
                Ok(toml::to_string(&crate::cases::CaseTables::default().governance())?)
            }
            other => bail!("{other:?}: choose rules, tables or departments"),
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

/// `gridsense report`: from the store (with the configuration's grid layer and tables) or
/// through a running gateway's API.
pub async fn report(
    q: crate::report::ReportQuery,
    api: Option<&str>,
    load: impl FnOnce() -> Result<Config>,
) -> Result<String> {
    use crate::report::{Format, MakeError};
    let format = Format::parse(q.format.as_deref().unwrap_or("table"))
        .map_err(|e| anyhow::anyhow!("--{e}"))?;
    if let Some(base) = api {
        let mut params = Vec::new();
        for (k, v) in [
            ("from", &q.from),
            ("to", &q.to),
            ("period", &q.period),
            ("by", &q.by),
            ("format", &q.format),
        ] {
            if let Some(v) = v {
                params.push(format!("{k}={v}"));
            }
        }
        let url = format!("{}/api/v1/reports?{}", base.trim_end_matches('/'), params.join("&"));
        let mut request = reqwest::Client::new().get(&url);
        if let Ok(token) = std::env::var("GRIDSENSE_TOKEN") {
            request = request.bearer_auth(token);
        }
        let resp = request.send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let text = resp.text().await.with_context(|| format!("GET {url}"))?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {text}");
        }
        return Ok(text);
    }
    let config = load()?;
    let (tables, cal) = calendar(&config)?;
    let now = app::wall_clock()();
    let (period, by) = crate::report::period_of(&q, &cal, now).map_err(|e| match e {
        MakeError::Bad(m) => anyhow::anyhow!("--{m}"),
        other => anyhow::anyhow!(other),
    })?;
    let areas = app::grid_layer(&config)?
        .map(|layer| layer.cells().iter().map(crate::assessment::Area::of).collect())
        .unwrap_or_default();
    let store = app::open_store(&config)?;
    let r = crate::report::make(&*store, &tables, &cal, areas, &period, by, now)?;
    Ok(crate::report::render(&r, format))
}

async fn fetch(base: &str, path: &str) -> Result<serde_json::Value> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut request = reqwest::Client::new().get(&url);
    if let Ok(token) = std::env::var("GRIDSENSE_TOKEN") {
        request = request.bearer_auth(token);
    }
    let resp = request.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body: serde_json::Value =
        resp.json().await.with_context(|| format!("GET {url}: not JSON"))?;
    if !status.is_success() {
        bail!(
            "GET {url}: {status}: {}",
            body["error"]["message"].as_str().unwrap_or("(no message)")
        );
    }
    Ok(body)
}

fn ago(now: i64, at: Option<i64>) -> String {
    match at {
        None => "never".into(),
        Some(t) => {
            let s = (now - t).max(0) / 1000;
            match s {
                0..60 => format!("{s} s ago"),
                60..3_600 => format!("{} min ago", s / 60),
                3_600..86_400 => format!("{} h ago", s / 3_600),
                _ => format!("{} d ago", s / 86_400),
            }
        }
    }
}

fn state_word(d: &serde_json::Value) -> &'static str {
    if d["alarm"] == true {
        "ALARM"
    } else if d["health"] == "offline" {
        "offline"
    } else if d["low_battery"] == true {
        "low battery"
    } else if d["health"] == "never_seen" {
        "never seen"
    } else {
        "online"
    }
}

/// `gridsense devices list`: the same rows as `GET /api/v1/devices`, as a table.
pub async fn devices_list(
    q: &crate::http::api::DevicesQuery,
    api: Option<&str>,
    load: impl FnOnce() -> Result<Config>,
) -> Result<String> {
    let now = app::wall_clock()();
    let page = match api {
        Some(base) => {
            let mut params = Vec::new();
            for (k, v) in [
                ("kind", &q.kind),
                ("grid", &q.grid),
                ("street", &q.street),
                ("state", &q.state),
                ("battery_below", &q.battery_below),
                ("silent_for", &q.silent_for),
                ("sort", &q.sort),
                ("order", &q.order),
                ("per_page", &q.per_page),
            ] {
                if let Some(v) = v {
                    params.push(format!("{k}={v}"));
                }
            }
            fetch(base, &format!("/api/v1/devices?{}", params.join("&"))).await?
        }
        None => {
            let config = load()?;
            let (filter, _) =
                crate::http::api::device_filter(q, now).map_err(|e| anyhow::anyhow!("--{e}"))?;
            serde_json::to_value(app::open_store(&config)?.devices(&filter)?)?
        }
    };
    let mut out = format!(
        "{:<16}  {:<6}  {:<15}  {:<11}  {:>7}  {:>5}  {}\n",
        "device", "kind", "grid", "state", "battery", "rssi", "last seen"
    );
    let empty = Vec::new();
    let rows = page["devices"].as_array().unwrap_or(&empty);
    for d in rows {
        let _ = writeln!(
            out,
            "{:<16}  {:<6}  {:<15}  {:<11}  {:>7}  {:>5}  {}",
            d["eui"].as_str().unwrap_or(""),
            d["kind"].as_str().unwrap_or(""),
            d["grid_code"].as_str().unwrap_or("-"),
            state_word(d),
            d["battery_mv"].as_i64().map_or("-".into(), |b| format!("{b} mV")),
            d["rssi_dbm"].as_i64().map_or("-".into(), |r| r.to_string()),
            ago(now, d["last_seen_ms"].as_i64())
        );
    }
    let _ = writeln!(out, "{} of {} devices", rows.len(), page["total"].as_u64().unwrap_or(0));
    Ok(out)
}

/// `gridsense devices show`: health, frames with verdicts, incidents.
pub async fn device_show(
    eui: gridsense_protocol::Eui,
    api: Option<&str>,
    load: impl FnOnce() -> Result<Config>,
) -> Result<String> {
    let now = app::wall_clock()();
    let d = match api {
        Some(base) => fetch(base, &format!("/api/v1/devices/{eui}")).await?,
        None => {
            let config = load()?;
            let Some(d) = app::open_store(&config)?.device(eui, now - 7 * 86_400_000)? else {
                bail!("{eui} is not registered");
            };
            serde_json::to_value(d)?
        }
    };
    let mut out = format!(
        "{} {}  {}  grid {}  object {}\nbattery {}  rssi {}  firmware {}  last seen {}  frames {} accepted, {} rejected\n",
        d["kind"].as_str().unwrap_or(""),
        d["eui"].as_str().unwrap_or(""),
        state_word(&d),
        d["grid_code"].as_str().unwrap_or("-"),
        d["object_code"].as_str().unwrap_or("-"),
        d["battery_mv"].as_i64().map_or("-".into(), |b| format!("{b} mV")),
        d["rssi_dbm"].as_i64().map_or("-".into(), |r| format!("{r} dBm")),
        d["firmware"].as_str().unwrap_or("-"),
        ago(now, d["last_seen_ms"].as_i64()),
        d["frames"],
        d["rejects"],
    );
    out.push_str("last frames:\n");
    for f in d["frames"].as_array().into_iter().flatten().take(15) {
        let _ = writeln!(
            out,
            "  {:<12} {:<9} {}",
            ago(now, f["received_ms"].as_i64()),
            f["verdict"].as_str().unwrap_or(""),
            f["detail"].as_str().unwrap_or("")
        );
    }
    out.push_str("health:\n");
    for e in d["health_events"].as_array().into_iter().flatten().take(10) {
        let _ = writeln!(out, "  {:<12} {}", ago(now, e[0].as_i64()), e[1].as_str().unwrap_or(""));
    }
    out.push_str("incidents:\n");
    for i in d["incidents"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  #{} {} {} {}{}",
            i[0],
            i[1].as_str().unwrap_or(""),
            i[2].as_str().unwrap_or(""),
            i[3].as_str().unwrap_or(""),
            i[4].as_i64().map(|c| format!(" case {c}")).unwrap_or_default()
        );
    }
    Ok(out)
}
