//! The assessment report (通报) as people get it: gathered from the store, the grid layer and
//! the tables (the figures are the core's, [`crate::assessment`]), rendered as a terminal
//! table, CSV, JSON or a printable HTML page (Chinese, inline SVG charts, A4). The CLI
//! (`gridsense report`) and the API (`GET /api/v1/reports`) both come through [`make`].

use std::fmt::Write as _;

use crate::{
    assessment::{self, Area, By, Context, Entities, Inputs, Period, PeriodKind, Report, Row},
    calendar::Calendar,
    cases::CaseTables,
    store::{Governance, StoreError},
};

/// What a report asks for (the CLI's flags, the API's query).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    /// First day, `YYYY-MM-DD` (with `to`).
    pub from: Option<String>,
    /// Last day, inclusive (with `from`).
    pub to: Option<String>,
    /// Without `from`/`to`: the last complete `half-month` (default), `week` or `month`.
    pub period: Option<String>,
    /// `street` (default), `community`, `grid`, `department`, `worker`.
    pub by: Option<String>,
    /// `json` (the API's default), `csv`, `html`, `table` (the CLI's default).
    pub format: Option<String>,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned text.
    Table,
    /// Comma-separated, one row per entity, then totals.
    Csv,
    /// The report as JSON.
    Json,
    /// A printable page.
    Html,
}

impl Format {
    /// From its name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "html" => Ok(Format::Html),
            "xlsx" => Err("format xlsx is not built yet: use csv (opens in Excel) or html".into()),
            other => Err(format!("format {other:?}: choose table, csv, json or html")),
        }
    }

    /// The HTTP content type.
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::Table => "text/plain; charset=utf-8",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Json => "application/json",
            Format::Html => "text/html; charset=utf-8",
        }
    }
}

/// A report that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum MakeError {
    /// The question is wrong.
    #[error("{0}")]
    Bad(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The period and breakdown a query names, at `now_ms`.
pub fn period_of(
    q: &ReportQuery,
    calendar: &Calendar,
    now_ms: i64,
) -> Result<(Period, By), MakeError> {
    let bad = |e: assessment::ReportError| MakeError::Bad(e.to_string());
    let by = By::parse(q.by.as_deref().unwrap_or("street")).map_err(bad)?;
    let period = match (&q.from, &q.to) {
        (Some(f), Some(t)) => Period::range(
            assessment::parse_date("from", f).map_err(bad)?,
            assessment::parse_date("to", t).map_err(bad)?,
        )
        .map_err(bad)?,
        (None, None) => {
            let kind =
                PeriodKind::parse(q.period.as_deref().unwrap_or("half-month")).map_err(bad)?;
            let today = calendar.local(now_ms).date_naive();
            Period::last_complete(kind, today)
        }
        _ => return Err(MakeError::Bad("give both from and to, or neither".into())),
    };
    Ok((period, by))
}

/// Makes the report of `period` by `by` from the store.
pub fn make(
    store: &dyn Governance,
    tables: &CaseTables,
    calendar: &Calendar,
    areas: Vec<Area>,
    period: &Period,
    by: By,
    now_ms: i64,
) -> Result<Report, MakeError> {
    let offset = calendar.offset();
    let previous = period.previous();
    let inputs = Inputs {
        cases: store.report_cases(period.start_ms(offset), period.end_ms(offset))?,
        previous: store.report_cases(previous.start_ms(offset), previous.end_ms(offset))?,
        devices: store.report_devices()?,
        checkins: store.report_checkins(period.start_ms(offset), period.end_ms(offset))?,
    };
    // Without a grid layer where the report is made, the areas devices were placed in.
    let areas = if areas.is_empty() { store.report_areas()? } else { areas };
    let entities = Entities {
        areas,
        departments: tables
            .departments
            .list
            .iter()
            .map(|(code, d)| (code.clone(), d.name.clone()))
            .collect(),
        workers: store.workers()?,
    };
    let ctx =
        Context { calendar, milestones: &tables.milestones, weights: &tables.assessment, now_ms };
    Ok(assessment::report(by, period, &entities, &inputs, &ctx))
}

/// Renders a report.
pub fn render(r: &Report, format: Format) -> String {
    match format {
        Format::Table => table(r),
        Format::Csv => csv(r),
        Format::Json => serde_json::to_string_pretty(r).unwrap_or_default(),
        Format::Html => html(r),
    }
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

fn num(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.2}"))
}

fn opt<T: ToString>(x: Option<T>) -> String {
    x.map_or("-".into(), |v| v.to_string())
}

/// The columns of the CSV and HTML tables: header (Chinese / English) and cell.
type Column = (&'static str, &'static str, fn(&Row) -> String);

const COLUMNS: [Column; 24] = [
    ("排名", "rank", |r| opt(r.rank)),
    ("代码", "code", |r| r.code.clone()),
    ("名称", "name", |r| r.name.clone()),
    ("感知发现", "sensor", |r| r.sensor.to_string()),
    ("网格员上报", "worker_reports", |r| r.worker_reports.to_string()),
    ("立案", "filed", |r| r.filed.to_string()),
    ("1日内派遣", "dispatched_1d", |r| r.dispatched_1d.to_string()),
    ("3日内反馈", "feedback_3d", |r| r.feedback_3d.to_string()),
    ("处置", "handled", |r| r.handled.to_string()),
    ("按期处置率", "on_time_handling_rate", |r| pct(r.on_time_handling_rate)),
    ("退回", "returned", |r| r.returned.to_string()),
    ("返工率", "rework_rate", |r| pct(r.rework_rate)),
    ("结案", "closed", |r| r.closed.to_string()),
    ("结案率", "closure_rate", |r| pct(r.closure_rate)),
    ("按期结案率", "on_time_closure_rate", |r| pct(r.on_time_closure_rate)),
    ("首级办结率", "first_level_rate", |r| pct(r.first_level_rate)),
    ("督办", "escalated", |r| r.escalated.to_string()),
    ("超期", "overdue", |r| r.overdue.to_string()),
    ("平均修复(h)", "repair_mean_h", |r| num(r.repair_mean_h)),
    ("P90修复(h)", "repair_p90_h", |r| num(r.repair_p90_h)),
    ("重复部件", "repeat_objects", |r| r.repeat_objects.to_string()),
    ("在线率", "online_ratio", |r| pct(r.online_ratio)),
    ("巡查签到", "checkins", |r| r.checkins.to_string()),
    ("得分", "score", |r| num(r.score)),
];

fn title(r: &Report) -> String {
    format!(
        "通报 assessment {} — {} by {} ({}), as of {}",
        r.period.from,
        r.period.to,
        r.by.as_str(),
        r.by.zh(),
        r.as_of
    )
}

fn table(r: &Report) -> String {
    let mut out = title(r);
    out.push('\n');
    let _ = writeln!(
        out,
        "{:>4}  {:<16} {:<14} {:>6} {:>6} {:>6} {:>8} {:>7} {:>8} {:>5} {:>5} {:>7} {:>6} {:>6}",
        "rank",
        "code",
        "name",
        "found",
        "filed",
        "closed",
        "closure",
        "on-time",
        "rework",
        "esc.",
        "over",
        "score",
        "prev",
        "Δ"
    );
    for row in r.rows.iter().chain(std::iter::once(&r.totals)) {
        let _ = writeln!(
            out,
            "{:>4}  {:<16} {:<14} {:>6} {:>6} {:>6} {:>8} {:>7} {:>8} {:>5} {:>5} {:>7} {:>6} {:>6}",
            opt(row.rank),
            row.code,
            row.name.chars().take(14).collect::<String>(),
            row.sensor + row.worker_reports,
            row.filed,
            row.closed,
            pct(row.closure_rate),
            pct(row.on_time_handling_rate),
            pct(row.rework_rate),
            row.escalated,
            row.overdue,
            num(row.score),
            num(row.previous_score),
            num(row.score_change)
        );
    }
    let _ = writeln!(
        out,
        "red list (overdue): {} case(s){}",
        r.red_total,
        if r.red_total > 20 { ", the 20 longest overdue:" } else { "" }
    );
    for c in r.red_list.iter().take(20) {
        let _ = writeln!(
            out,
            "  case {:<6} {:<6} {:<5} {:<9} {:<16} {:<10} red: {} ({} h over)",
            c.id,
            c.class_code,
            c.department.as_deref().unwrap_or("-"),
            c.level.as_str(),
            c.grid_code.as_deref().unwrap_or("-"),
            c.state.as_str(),
            c.red.join(","),
            c.overdue_h
        );
    }
    out
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.into() }
}

fn csv(r: &Report) -> String {
    let mut out: String = COLUMNS.iter().map(|(_, en, _)| *en).collect::<Vec<_>>().join(",");
    out.push('\n');
    for row in r.rows.iter().chain(std::iter::once(&r.totals)) {
        let cells: Vec<String> = COLUMNS.iter().map(|(_, _, f)| csv_cell(&f(row))).collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A horizontal bar chart (inline SVG) of one rate per row.
fn bars(rows: &[Row], label: &str, value: fn(&Row) -> Option<f64>, max: f64) -> String {
    let shown: Vec<&Row> = rows.iter().take(30).collect();
    let h = 18 * shown.len() + 24;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"680\" height=\"{h}\" role=\"img\" aria-label=\"{}\">",
        esc(label)
    );
    let _ = write!(svg, "<text x=\"0\" y=\"14\" font-size=\"13\">{}</text>", esc(label));
    for (i, row) in shown.iter().enumerate() {
        let y = 24 + i * 18;
        let v = value(row).unwrap_or(0.0).max(0.0);
        let w = if max > 0.0 { (v / max * 440.0).min(440.0) } else { 0.0 };
        let name: String = row.name.chars().take(12).collect();
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{ty}\" font-size=\"11\">{}</text><rect x=\"170\" y=\"{y}\" width=\"{w:.1}\" height=\"13\" fill=\"#2b6cb0\"/><text x=\"{tx:.1}\" y=\"{ty}\" font-size=\"11\">{}</text>",
            esc(if name.is_empty() { &row.code } else { &name }),
            value(row).map_or("-".into(), |v| format!("{v:.2}")),
            ty = y + 11,
            tx = 175.0 + w,
        );
    }
    svg.push_str("</svg>");
    svg
}

fn html(r: &Report) -> String {
    let mut out =
        String::from("<!doctype html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\"><title>");
    out.push_str(&esc(&title(r)));
    out.push_str(
        "</title><style>
@page { size: A4 landscape; margin: 12mm; }
body { font-family: 'WenQuanYi Zen Hei', 'Noto Sans CJK SC', sans-serif; font-size: 11px; color: #111; }
h1 { font-size: 18px; margin: 0 0 4px; } h2 { font-size: 14px; margin: 14px 0 4px; }
table { border-collapse: collapse; width: 100%; page-break-inside: auto; }
th, td { border: 1px solid #999; padding: 2px 4px; text-align: right; white-space: nowrap; }
th { background: #e8eef6; } td.t { text-align: left; }
tr { page-break-inside: avoid; } tr.total td { font-weight: bold; background: #f4f4f4; }
.red td { color: #b00020; } .charts { display: flex; flex-wrap: wrap; gap: 12px; }
</style></head><body>",
    );
    let _ = write!(
        out,
        "<h1>网格化管理考核通报（按{}）</h1><p>统计周期 {} 至 {}（含），数据截至 {}；对比上期 {} 至 {}。</p>",
        r.by.zh(),
        esc(&r.period.from),
        esc(&r.period.to),
        esc(&r.as_of),
        esc(&r.previous.from),
        esc(&r.previous.to)
    );
    let t = &r.totals;
    let _ = write!(
        out,
        "<p>本期受理 {} 件（感知发现 {}，网格员上报 {}），立案 {}，处置 {}，结案 {}，结案率 {}，按期结案率 {}，首级办结率 {}，督办 {}，超期 {}。</p>",
        t.sensor + t.worker_reports,
        t.sensor,
        t.worker_reports,
        t.filed,
        t.handled,
        t.closed,
        pct(t.closure_rate),
        pct(t.on_time_closure_rate),
        pct(t.first_level_rate),
        t.escalated,
        t.overdue
    );
    out.push_str("<div class=\"charts\">");
    out.push_str(&bars(&r.rows, "综合得分 score", |x| x.score, 100.0));
    out.push_str(&bars(&r.rows, "结案率 closure rate", |x| x.closure_rate, 1.0));
    out.push_str("</div><h2>排名 ranking</h2><table><thead><tr>");
    for (zh, _, _) in COLUMNS {
        let _ = write!(out, "<th>{zh}</th>");
    }
    out.push_str("<th>上期得分</th><th>变化</th></tr></thead><tbody>");
    for (row, total) in r.rows.iter().map(|x| (x, false)).chain(std::iter::once((t, true))) {
        out.push_str(if total { "<tr class=\"total\">" } else { "<tr>" });
        for (i, (_, _, f)) in COLUMNS.iter().enumerate() {
            let class = if i == 2 || i == 1 { " class=\"t\"" } else { "" };
            let _ = write!(out, "<td{class}>{}</td>", esc(&f(row)));
        }
        let _ = write!(
            out,
            "<td>{}</td><td>{}</td></tr>",
            num(row.previous_score),
            num(row.score_change)
        );
    }
    out.push_str("</tbody></table>");
    let _ = write!(
        out,
        "<h2>超期案件红榜 overdue ({}{})</h2>",
        r.red_total,
        if r.red_total > r.red_list.len() as u64 {
            format!("，列出超期最久的 {} 件", r.red_list.len())
        } else {
            String::new()
        }
    );
    out.push_str(
        "<table><thead><tr><th>案件</th><th>类别</th><th>责任部门</th><th>层级</th><th>网格</th><th>状态</th><th>超时环节</th><th>超期(h)</th></tr></thead><tbody>",
    );
    for c in &r.red_list {
        let _ = write!(
            out,
            "<tr class=\"red\"><td>{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td><td>{}</td></tr>",
            c.id,
            esc(&c.class_code),
            esc(c.department.as_deref().unwrap_or("-")),
            c.level.zh(),
            esc(c.grid_code.as_deref().unwrap_or("-")),
            c.state.as_str(),
            c.red.join("、"),
            c.overdue_h
        );
    }
    out.push_str("</tbody></table></body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it_and_every_row_has_every_column() {
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        let report = Report {
            period: assessment::ShownPeriod {
                from: "2026-12-01".into(),
                to: "2026-12-15".into(),
                kind: PeriodKind::HalfMonth,
            },
            previous: assessment::ShownPeriod {
                from: "2026-11-16".into(),
                to: "2026-11-30".into(),
                kind: PeriodKind::HalfMonth,
            },
            by: By::Street,
            as_of: "2026-12-15T23:59:59+08:00".into(),
            rows: vec![Row {
                code: "210202001".into(),
                name: "桃源街道, 北".into(),
                ..Row::default()
            }],
            totals: Row { code: "total".into(), name: "合计".into(), ..Row::default() },
            red_list: vec![],
            red_total: 0,
        };
        let text = csv(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("\"桃源街道, 北\""), "{text}");
        let page = html(&report);
        assert!(page.contains("<svg") && page.contains("网格化管理考核通报"));
        assert!(Format::parse("pdf").is_err() && Format::parse("xlsx").is_err());
    }
}
