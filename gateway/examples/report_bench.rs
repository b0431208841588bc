//! How long the assessment report of a year takes: `CASES` cases spread over a year in `GRIDS`
//! grids (Zhongshan: ≈ 14,000 cases, 239 grids), most taken through their lifecycle, in a
//! SQLite store; the report by street, by grid and by department, timed (the store's reads and
//! the figures, as `gridsense report` does them).
//!
//!   cargo run --release -p gridsense-gateway --example report_bench -- 14000 239
//!   cargo run --release -p gridsense-gateway --example report_bench -- 1400000 23900

// A benchmark: the generated ids and indexes are small and in range.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::indexing_slicing
)]

use std::time::Instant;

use gridsense_gateway::{
    assessment::{Area, By, Period},
    calendar::{Calendar, Limit},
    cases::{CaseRow, CaseState, CaseTables, Place, governance::Level},
    config::Synchronous,
    report,
    store::{Batch, CaseBoard, IngestStore, Store},
};
use gridsense_protocol::Eui;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let cases: i64 = args.next().map_or(Ok(14_000), |a| a.parse())?;
    let grids: usize = args.next().map_or(Ok(239), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let mut store = Store::open(&dir.path().join("r.db"), Synchronous::Normal, 3)?;
    let tables = CaseTables::default();
    let cal = Calendar::new(&tables.calendar)?;
    let areas: Vec<Area> = (0..grids)
        .map(|g| {
            let street = format!("210202{:03}", g % 9 + 1);
            let community = format!("{street}{:03}", g / 9 % 30 + 1);
            Area {
                grid_code: format!("{community}{:03}", g + 1),
                grid_name: format!("网格{}", g + 1),
                community_name: format!("社区{community}"),
                street_name: format!("街道{street}"),
                community_code: community,
                street_code: street,
            }
        })
        .collect();
    let classes = ["C0101", "C0102", "C0111", "E0404", "E0406"];
    let year_start = 1_767_196_800_000; // 2026-01-01T00:00+08:00
    let step = 365 * 86_400_000 / cases.max(1);
    let started = Instant::now();
    let mut batch = Batch::default();
    for id in 1..=cases {
        let area = &areas[(id as usize * 7919) % areas.len()];
        let detected = year_start + (id - 1) * step;
        batch.cases.cases.push(CaseRow {
            id,
            incident_id: None,
            key: format!("k{id}"),
            eui: Eui(id as u64 % 2_500 + 1),
            class_code: classes[id as usize % classes.len()].into(),
            class_name: "c".into(),
            title: "t".into(),
            object_code: Some(format!("21020201010{:05}", id % 2_500)),
            lat: 38.9,
            lon: 121.6,
            place: Place {
                grid_code: Some(area.grid_code.clone()),
                community_code: Some(area.community_code.clone()),
                street_code: Some(area.street_code.clone()),
                district_code: Some("210202".into()),
                ..Place::default()
            },
            description: "d".into(),
            urgency: "high",
            source: "IoT",
            onset_ms: detected,
            detected_ms: detected,
            limit: Limit::Hours(6),
            department: tables.departments.responsible(classes[id as usize % 5], None).into(),
            level: Level::Community,
            handling_due_ms: detected + 6 * 3_600_000,
            deploy_due_ms: cal.deadline(detected, tables.milestones.deploy),
            feedback_due_ms: cal.deadline(detected, tables.milestones.feedback),
        });
        if batch.cases.cases.len() == 5_000 {
            store.commit(&batch)?;
            batch = Batch::default();
        }
    }
    store.commit(&batch)?;
    // Cases go through their lifecycle (one transaction per move, as operators make them);
    // every tenth stays open. Past 14,000 cases only a 14,000-case sample moves, so the
    // 100× store is written in minutes: the report reads and counts every case either way.
    let hour = 3_600_000;
    let stride = (cases / 14_000).max(1);
    for id in (1..=cases).step_by(stride as usize) {
        if id % 10 == 0 {
            continue;
        }
        let t = year_start + (id - 1) * step;
        for (k, to) in [
            CaseState::Filed,
            CaseState::Dispatched,
            CaseState::Handled,
            CaseState::Feedback,
            CaseState::Verified,
            CaseState::Closed,
        ]
        .into_iter()
        .enumerate()
        {
            let at = t + (k as i64 + 1) * hour + (id % 7) * hour / 2;
            let _ = store.transition(id, to, "bench", "", at, &cal)?;
        }
    }
    println!(
        "report_bench: {cases} cases in {grids} grids written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let year = Period::range(
        gridsense_gateway::assessment::parse_date("from", "2026-01-01")?,
        gridsense_gateway::assessment::parse_date("to", "2026-12-31")?,
    )?;
    let now = year_start + 400 * 86_400_000;
    for by in [By::Street, By::Grid, By::Department] {
        let t = Instant::now();
        let r = report::make(&store, &tables, &cal, areas.clone(), &year, by, now)?;
        let html = report::render(&r, report::Format::Html);
        println!(
            "report_bench: a year by {:<10} {} rows, {} cases, closure {:.3}: {:.3} s (HTML {} KiB)",
            by.as_str(),
            r.rows.len(),
            r.totals.sensor + r.totals.worker_reports,
            r.totals.closure_rate.unwrap_or(0.0),
            t.elapsed().as_secs_f64(),
            html.len() / 1024
        );
    }
    Ok(())
}
