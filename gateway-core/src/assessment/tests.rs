use super::*;
use crate::{
    calendar::{CalendarConfig, Limit},
    cases::CaseTables,
};

const HOUR: i64 = 3_600_000;

fn d(s: &str) -> NaiveDate {
    parse_date("test", s).expect("date")
}

fn cal() -> Calendar {
    Calendar::new(&CalendarConfig::default()).expect("calendar")
}

/// Unix ms of a local time `YYYY-MM-DDTHH:MM` at +08:00.
fn at(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&format!("{s}:00+08:00")).expect("time").timestamp_millis()
}

#[test]
fn half_months_split_at_the_fifteenth_and_end_with_the_month() {
    let p = Period::containing(PeriodKind::HalfMonth, d("2026-02-15"));
    assert_eq!((p.from, p.to), (d("2026-02-01"), d("2026-02-15")));
    let p = Period::containing(PeriodKind::HalfMonth, d("2026-02-16"));
    assert_eq!((p.from, p.to), (d("2026-02-16"), d("2026-02-28")));
    let p = Period::containing(PeriodKind::HalfMonth, d("2028-02-20"));
    assert_eq!(p.to, d("2028-02-29"), "leap year");
    let p = Period::containing(PeriodKind::HalfMonth, d("2026-12-31"));
    assert_eq!((p.from, p.to), (d("2026-12-16"), d("2026-12-31")));
    // The previous half-month crosses months and years.
    let prev = Period::containing(PeriodKind::HalfMonth, d("2027-01-03")).previous();
    assert_eq!((prev.from, prev.to), (d("2026-12-16"), d("2026-12-31")));
    let prev = Period::containing(PeriodKind::HalfMonth, d("2026-03-20")).previous();
    assert_eq!((prev.from, prev.to), (d("2026-03-01"), d("2026-03-15")));
    // The default report: the last complete half-month.
    let last = Period::last_complete(PeriodKind::HalfMonth, d("2026-12-07"));
    assert_eq!((last.from, last.to), (d("2026-11-16"), d("2026-11-30")));
    let last = Period::last_complete(PeriodKind::HalfMonth, d("2026-12-16"));
    assert_eq!((last.from, last.to), (d("2026-12-01"), d("2026-12-15")));
}

#[test]
fn a_period_runs_from_midnight_to_midnight_at_plus_eight_with_to_inclusive() {
    let offset = cal().offset();
    let p = Period::range(d("2026-12-01"), d("2026-12-15")).expect("range");
    assert_eq!(p.kind, PeriodKind::HalfMonth, "a range that is a half-month reads as one");
    assert_eq!(p.start_ms(offset), at("2026-12-01T00:00"));
    assert_eq!(p.end_ms(offset), at("2026-12-16T00:00"), "through 24:00 of the 15th");
    // 2026-11-30T16:00Z is already December 1st in Dalian.
    assert_eq!(
        p.start_ms(offset),
        chrono::DateTime::parse_from_rfc3339("2026-11-30T16:00:00Z")
            .expect("utc")
            .timestamp_millis()
    );
    let r = Period::range(d("2026-12-03"), d("2026-12-09")).expect("range");
    assert_eq!((r.kind, r.days()), (PeriodKind::Range, 7));
    let prev = r.previous();
    assert_eq!((prev.from, prev.to), (d("2026-11-26"), d("2026-12-02")));
    assert!(Period::range(d("2026-12-09"), d("2026-12-03")).is_err());
    let w = Period::containing(PeriodKind::Week, d("2026-12-09"));
    assert_eq!((w.from, w.to), (d("2026-12-07"), d("2026-12-13")), "Monday to Sunday");
    let m = Period::containing(PeriodKind::Month, d("2026-02-09"));
    assert_eq!(
        (m.from, m.to, m.previous().from),
        (d("2026-02-01"), d("2026-02-28"), d("2026-01-01"))
    );
    assert!(
        parse_date("--from", "2026-13-01").expect_err("month 13").to_string().contains("--from")
    );
    assert!(By::parse("city").is_err() && PeriodKind::parse("fortnight").is_err());
}

fn area(grid: &str, community: &str, street: &str) -> Area {
    Area {
        grid_code: grid.into(),
        grid_name: format!("网格{grid}"),
        community_code: community.into(),
        community_name: format!("社区{community}"),
        street_code: street.into(),
        street_name: format!("街道{street}"),
    }
}

fn entities() -> Entities {
    Entities {
        areas: vec![
            area("210202001001001", "210202001001", "210202001"),
            area("210202001001002", "210202001001", "210202001"),
            area("210202002001001", "210202002001", "210202002"),
            area("210202003001001", "210202003001", "210202003"),
        ],
        departments: vec![("PS".into(), "排水".into()), ("RQ".into(), "燃气".into())],
        workers: vec![Worker {
            id: "W1".into(),
            name: "张三".into(),
            grid_code: "210202001001001".into(),
            beacon: "00000000000000b1".into(),
            valid_from: "2026-12-01".into(),
            valid_to: String::new(),
        }],
    }
}

/// A case detected at `detected`, with a 4 h handling limit from each dispatch.
fn case(id: i64, grid: &str, detected: i64) -> CaseFact {
    let community = grid.get(..12).map(str::to_owned);
    let street = grid.get(..9).map(str::to_owned);
    CaseFact {
        id,
        class_code: "E0404".into(),
        source: "IoT".into(),
        eui: format!("{id:016x}"),
        object: format!("obj{id}"),
        grid_code: Some(grid.into()),
        community_code: community,
        street_code: street,
        department: Some("PS".into()),
        level: Level::Community,
        first_level: Level::Community,
        detected_ms: detected,
        deploy_due_ms: detected + 24 * HOUR,
        feedback_due_ms: detected + 72 * HOUR,
        handling_due_ms: detected + 4 * HOUR,
        handling_limit: "4h".into(),
        filed_ms: None,
        first_dispatched_ms: None,
        dispatched_ms: None,
        handled_ms: None,
        feedback_ms: None,
        closed_ms: None,
        state: CaseState::Collected,
        returns: 0,
        reworks: 0,
    }
}

/// The case taken through its lifecycle: filed at +1 h, dispatched at +2 h, handled `repair`
/// hours after detection, feedback and closed 1 h after that.
fn closed(mut c: CaseFact, repair_h: i64) -> CaseFact {
    let t = c.detected_ms;
    c.filed_ms = Some(t + HOUR);
    c.first_dispatched_ms = Some(t + 2 * HOUR);
    c.dispatched_ms = Some(t + 2 * HOUR);
    c.handling_due_ms = t + 6 * HOUR;
    c.handled_ms = Some(t + repair_h * HOUR);
    c.feedback_ms = Some(t + (repair_h + 1) * HOUR);
    c.closed_ms = Some(t + (repair_h + 1) * HOUR);
    c.state = CaseState::Closed;
    c
}

/// The report of 1–15 December 2026 by `by`, made at `now` on the default calendar.
fn december(by: By, ents: &Entities, inputs: &Inputs, tables: &CaseTables, now: i64) -> Report {
    let cal = cal();
    let period = Period::range(d("2026-12-01"), d("2026-12-15")).expect("period");
    report(by, &period, ents, inputs, &ctx(&cal, tables, now))
}

fn ctx<'a>(cal: &'a Calendar, tables: &'a CaseTables, now: i64) -> Context<'a> {
    Context {
        calendar: cal,
        milestones: &tables.milestones,
        weights: &tables.assessment,
        now_ms: now,
    }
}

#[test]
fn figures_count_each_case_once_judged_at_the_period_end() {
    let tables = CaseTables::default();
    let t0 = at("2026-12-02T09:00");
    let g1 = "210202001001001";
    let g2 = "210202002001001";
    let mut late = closed(case(3, g1, t0), 10); // handled 10 h after: past its 6 h due
    late.reworks = 1;
    let mut open = case(4, g2, t0);
    open.filed_ms = Some(t0 + HOUR);
    open.first_dispatched_ms = Some(t0 + 30 * HOUR); // after the 1-day milestone
    open.dispatched_ms = open.first_dispatched_ms;
    open.handling_due_ms = t0 + 34 * HOUR;
    open.state = CaseState::Dispatched;
    // Closed only after the period: counted as not closed.
    let mut after = closed(case(5, g2, at("2026-12-15T20:00")), 2);
    after.closed_ms = Some(at("2026-12-16T08:00"));
    // In the previous half-month: not in this report's rows.
    let before = closed(case(6, g1, at("2026-11-20T09:00")), 2);
    let inputs = Inputs {
        cases: vec![closed(case(1, g1, t0), 3), closed(case(2, g1, t0), 5), late, open, after],
        previous: vec![before],
        devices: vec![
            DeviceFact { grid_code: Some(g1.into()), online: true, low_battery: false },
            DeviceFact { grid_code: Some(g1.into()), online: false, low_battery: true },
        ],
        checkins: vec![],
    };
    let r = december(By::Grid, &entities(), &inputs, &tables, at("2027-01-05T00:00"));
    assert_eq!(r.as_of, "2026-12-15T23:59:59+08:00");
    assert_eq!(r.rows.len(), 4, "every grid has a row, zeros included");
    let row = |code: &str| r.rows.iter().find(|x| x.code == code).expect("row").clone();
    let a = row(g1);
    assert_eq!((a.sensor, a.filed, a.dispatched, a.dispatched_1d), (3, 3, 3, 3));
    assert_eq!((a.handled, a.due, a.handled_on_time), (3, 3, 2));
    assert_eq!((a.closed, a.closed_on_time, a.reworked), (3, 2, 1));
    assert_eq!(a.closure_rate, Some(1.0));
    assert_eq!(a.on_time_closure_rate, Some(0.6667));
    assert_eq!(a.rework_rate, Some(0.3333));
    assert_eq!(a.repair_mean_h, Some(6.0));
    assert_eq!(a.repair_p90_h, Some(10.0));
    assert_eq!((a.devices, a.low_battery, a.online_ratio), (2, 1, Some(0.5)));
    // 60 × 2/3 + 20 × 2/3 + 10 + 10 − 20 × 1/3 = 66.67
    assert_eq!(a.score, Some(66.67));
    assert_eq!(a.previous_score, Some(100.0), "the previous half-month's case");
    assert_eq!(a.score_change, Some(-33.33));
    let b = row(g2);
    assert_eq!((b.filed, b.dispatched, b.dispatched_1d, b.closed), (2, 2, 1, 0));
    assert_eq!(b.overdue, 1, "case 4 was not handled within 4 h of its dispatch");
    let empty = row("210202003001001");
    assert_eq!((empty.filed, empty.score, empty.rank), (0, None, None));
    assert_eq!(r.totals.sensor, 5);
    assert_eq!(r.totals.filed, 5);
    assert_eq!(r.totals.closed, 3);
}

#[test]
fn ties_share_a_rank_and_rows_without_cases_come_last_unranked() {
    let tables = CaseTables::default();
    let t0 = at("2026-12-03T10:00");
    let inputs = Inputs {
        cases: vec![
            closed(case(1, "210202001001001", t0), 3),
            closed(case(2, "210202002001001", t0), 3),
            closed(case(3, "210202003001001", t0), 9),
        ],
        ..Inputs::default()
    };
    let r = december(By::Grid, &entities(), &inputs, &tables, t0 + 400 * HOUR);
    let ranks: Vec<_> = r.rows.iter().map(|x| (x.code.as_str(), x.rank)).collect();
    assert_eq!(
        ranks,
        [
            ("210202001001001", Some(1)),
            ("210202002001001", Some(1)),
            ("210202003001001", Some(3)),
            ("210202001001002", None),
        ]
    );
    // Streets add their grids up.
    let r = december(By::Street, &entities(), &inputs, &tables, t0 + 400 * HOUR);
    assert_eq!(r.rows.len(), 3);
    assert_eq!(r.rows.iter().map(|x| x.filed).sum::<u64>(), 3);
}

#[test]
fn weights_come_from_the_tables_and_bad_weights_are_named() {
    let mut tables = CaseTables::default();
    let t0 = at("2026-12-03T10:00");
    let inputs =
        Inputs { cases: vec![closed(case(1, "210202001001001", t0), 9)], ..Inputs::default() };
    tables.assessment = Weights {
        closed_on_time: 0.0,
        handled_on_time: 0.0,
        dispatched_1d: 50.0,
        feedback_3d: 50.0,
        rework: 0.0,
    };
    let r = december(By::Grid, &entities(), &inputs, &tables, t0 + 400 * HOUR);
    assert_eq!(
        r.rows.first().and_then(|x| x.score),
        Some(100.0),
        "late handling weighs nothing now"
    );
    let toml = "[assessment]\nclosed_on_time = \"lots\"\n";
    let e = toml::from_str::<CaseTables>(toml).expect_err("a string weight");
    assert!(
        e.to_string().contains("closed_on_time") || e.to_string().contains("invalid type"),
        "{e}"
    );
    tables.assessment.rework = f64::NAN;
    assert!(tables.validate().expect_err("NaN").to_string().contains("assessment.rework"));
}

#[test]
fn within_the_limit_follows_the_working_calendar() {
    // A 4-working-hour limit dispatched Friday 16:00 runs to Monday 11:00 (16:00–17:30 is
    // 1.5 h, then 08:30–11:00 is 2.5 h more): handled Monday 10:45 is on time, 67 h later.
    let cal = cal();
    let tables = CaseTables::default();
    let dispatched = at("2026-12-04T16:00");
    let due = cal.deadline(dispatched, Limit::WorkingHours(4));
    assert_eq!(cal.iso(due), "2026-12-07T11:00:00+08:00");
    let mut c = closed(case(1, "210202001001001", dispatched - HOUR), 1);
    c.first_dispatched_ms = Some(dispatched);
    c.dispatched_ms = Some(dispatched);
    c.handling_due_ms = due;
    c.handled_ms = Some(at("2026-12-07T10:45"));
    c.closed_ms = Some(at("2026-12-07T12:00"));
    c.feedback_ms = c.closed_ms;
    let inputs = Inputs { cases: vec![c.clone()], ..Inputs::default() };
    let r = december(By::Grid, &entities(), &inputs, &tables, at("2026-12-20T00:00"));
    assert_eq!(r.totals.handled_on_time, 1);
    c.handled_ms = Some(at("2026-12-07T11:30"));
    let inputs = Inputs { cases: vec![c], ..Inputs::default() };
    let r = december(By::Grid, &entities(), &inputs, &tables, at("2026-12-20T00:00"));
    assert_eq!(r.totals.handled_on_time, 0);
}

#[test]
fn the_red_list_holds_open_cases_past_a_deadline_at_the_report_time() {
    let tables = CaseTables::default();
    let t0 = at("2026-12-14T09:00");
    let mut stale = case(7, "210202001001001", t0);
    stale.filed_ms = Some(t0 + HOUR);
    stale.state = CaseState::Filed;
    stale.deploy_due_ms = cal().deadline(t0, Limit::WorkingDays(1));
    stale.handling_due_ms = t0 + 4 * HOUR;
    let inputs = Inputs {
        cases: vec![stale, closed(case(8, "210202001001001", t0), 2)],
        ..Inputs::default()
    };
    // Mid-period (now = the 14th, 12:00): handling due at 13:00 — nothing red yet.
    let r = december(By::Department, &entities(), &inputs, &tables, at("2026-12-14T12:00"));
    assert!(r.red_list.is_empty());
    assert_eq!(r.as_of, "2026-12-14T12:00:00+08:00", "a running period is judged now");
    let r = december(By::Department, &entities(), &inputs, &tables, at("2026-12-30T00:00"));
    assert_eq!((r.red_list.len(), r.red_total), (1, 1));
    let red = r.red_list.first().expect("one");
    assert_eq!((red.id, red.red.clone()), (7, vec!["deploy", "handling"]));
    assert!(red.overdue_h > 30.0, "{}", red.overdue_h);
    let ps = r.rows.iter().find(|x| x.code == "PS").expect("PS");
    assert_eq!((ps.overdue, ps.filed), (1, 2));
    assert_eq!(r.rows.iter().find(|x| x.code == "RQ").map(|x| x.filed), Some(0));
}

#[test]
fn workers_are_assessed_on_their_reports_checkins_and_coverage() {
    let tables = CaseTables::default();
    let mut report_case = closed(case(9, "210202001001001", at("2026-12-02T10:00")), 2);
    report_case.source = crate::cases::SOURCE_WORKER.into();
    report_case.eui = "00000000000000b1".into();
    let checkin = |s: &str, grid: &str| CheckIn {
        eui: "00000000000000b1".into(),
        at_ms: at(s),
        grid_code: Some(grid.into()),
    };
    let inputs = Inputs {
        cases: vec![report_case],
        checkins: vec![
            checkin("2026-12-02T09:00", "210202001001001"),
            checkin("2026-12-02T15:00", "210202001001001"),
            checkin("2026-12-03T09:00", "210202002001001"),
            checkin("2026-12-04T09:00", "210202001001001"),
        ],
        ..Inputs::default()
    };
    let r = december(By::Worker, &entities(), &inputs, &tables, at("2026-12-31T00:00"));
    let w = r.rows.first().expect("W1");
    assert_eq!((w.code.as_str(), w.worker_reports, w.closed, w.checkins), ("W1", 1, 1, 4));
    // Days with a check-in in the own grid: the 2nd and the 4th of 15.
    assert_eq!(w.coverage, Some(0.1333));
}

#[test]
fn a_beacon_handed_over_credits_each_report_to_the_worker_who_carried_it_that_day() {
    let tables = CaseTables::default();
    let mut ents = entities();
    ents.workers[0].valid_to = "2026-12-07".into();
    ents.workers.push(Worker {
        id: "W2".into(),
        name: "李四".into(),
        grid_code: "210202001001001".into(),
        beacon: "00000000000000b1".into(),
        valid_from: "2026-12-08".into(),
        valid_to: String::new(),
    });
    let report_on = |id: i64, day: &str| {
        let mut c = closed(case(id, "210202001001001", at(&format!("{day}T10:00"))), 2);
        c.source = crate::cases::SOURCE_WORKER.into();
        c.eui = "00000000000000b1".into();
        c
    };
    let inputs = Inputs {
        cases: vec![
            report_on(1, "2026-12-03"),
            report_on(2, "2026-12-10"),
            report_on(3, "2026-12-11"),
        ],
        ..Inputs::default()
    };
    let r = december(By::Worker, &ents, &inputs, &tables, at("2026-12-31T00:00"));
    let reports: Vec<_> = r.rows.iter().map(|w| (w.code.as_str(), w.worker_reports)).collect();
    assert_eq!(reports, [("W1", 1), ("W2", 2)], "tied at 100, in code order");
}

#[test]
fn the_red_list_names_the_longest_overdue_and_counts_them_all() {
    let tables = CaseTables::default();
    let stale = |id: i64| {
        let mut c = case(id, "210202001001001", at("2026-12-02T09:00") + id * 60_000);
        c.filed_ms = Some(c.detected_ms);
        c.state = CaseState::Filed;
        c
    };
    let n = RED_LIST_MAX as i64 + 1;
    let inputs = Inputs { cases: (1..=n).map(stale).collect(), ..Inputs::default() };
    let r = december(By::Grid, &entities(), &inputs, &tables, at("2026-12-31T00:00"));
    assert_eq!(
        (r.red_list.len(), r.red_total, r.totals.overdue),
        (RED_LIST_MAX, n as u64, n as u64)
    );
    assert_eq!(
        r.red_list.first().map(|c| c.id),
        Some(1),
        "the earliest detected is the longest overdue"
    );
    assert!(r.red_list.iter().all(|c| c.id != n), "the least overdue one is left out");
}
