//! The operators' read-only views on PostgreSQL.

use std::collections::BTreeMap;

use gridsense_protocol::Eui;
use tokio_postgres::{Row, types::ToSql};

use super::{PgStore, e, eui, wait};
use crate::{
    health::DeviceHealth,
    store::{
        DeviceDetail, DeviceFilter, DevicePage, DeviceRow, FrameVerdict, GridCounts, IncidentView,
        IngestStore, MapDevice, Queries, Stats, StoreError, Totals,
        ops::{DEVICE_SELECT, last_frames, ratio},
    },
};

fn device_row(r: &Row) -> DeviceRow {
    let online: Option<bool> = r.get(7);
    let fix = match (r.get::<_, Option<f64>>(16), r.get::<_, Option<f64>>(17), r.get(18)) {
        (Some(a), Some(b), Some(t)) => Some((a, b, t)),
        _ => None,
    };
    DeviceRow {
        eui: eui(r.get(0)).to_string(),
        kind: r.get(1),
        lat: r.get(2),
        lon: r.get(3),
        object_code: r.get(4),
        grid_code: r.get(5),
        street_code: r.get(6),
        health: match online {
            None => "never_seen",
            Some(true) => "online",
            Some(false) => "offline",
        }
        .into(),
        low_battery: r.get::<_, Option<bool>>(8).unwrap_or(false),
        battery_mv: r.get::<_, Option<i32>>(9).map(i64::from),
        rssi_dbm: r.get::<_, Option<i32>>(10).map(i64::from),
        last_seen_ms: r.get(11),
        frames: r.get::<_, Option<i64>>(12).unwrap_or(0),
        rejects: r.get::<_, Option<i64>>(13).unwrap_or(0),
        firmware: r.get(14),
        alarm: r.get(15),
        fix,
    }
}

type Args = Vec<Box<dyn ToSql + Sync + Send>>;

/// Appends `text` with its `$` replaced by the next parameter's number.
fn arg(sql: &mut String, args: &mut Args, text: &str, v: Box<dyn ToSql + Sync + Send>) {
    args.push(v);
    sql.push_str(&text.replace('$', &format!("${}", args.len())));
}

fn refs(args: &Args) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect()
}

impl PgStore {
    fn count(&self, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        self.with(|c| Ok(wait(c.query_one(sql, p))?.get::<_, i64>(0) as u64))
    }

    fn counts_by(&self, sql: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(sql, &[]))?
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect())
        })
    }
}

impl Queries for PgStore {
    fn message_count(&self, kind: &str) -> Result<u64, StoreError> {
        self.count("SELECT count(*) FROM messages WHERE kind = $1", &[&kind])
    }

    fn health(&self) -> Result<Vec<(Eui, DeviceHealth)>, StoreError> {
        let mut out = Vec::new();
        self.each_health(&mut |id, h| out.push((id, h)))?;
        Ok(out)
    }

    fn totals(&self) -> Result<Totals, StoreError> {
        let accepted = self.stat("accepted")?;
        let rejects = self.counts_by("SELECT reason, count FROM reject_counts")?;
        Ok(Totals { accepted, rejects })
    }

    fn telemetry_count(&self, measurement_field: Option<(&str, &str)>) -> Result<u64, StoreError> {
        match measurement_field {
            None => self.count("SELECT count(*) FROM telemetry", &[]),
            Some((m, f)) => self.count(
                "SELECT count(*) FROM telemetry WHERE measurement = $1 AND field = $2",
                &[&m, &f],
            ),
        }
    }

    fn stat(&self, name: &str) -> Result<u64, StoreError> {
        self.count("SELECT COALESCE(max(value), 0) FROM stats WHERE name = $1", &[&name])
    }

    fn audit_len(&self) -> Result<u64, StoreError> {
        self.count("SELECT count(*) FROM audit", &[])
    }

    fn events_of(&self, id: Eui) -> Result<Vec<(i64, String)>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT at_ms, event FROM health_events WHERE eui = $1 ORDER BY id",
                &[&e(id)],
            ))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
    }

    fn outbox_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.counts_by("SELECT state, count(*) FROM outbox GROUP BY state")
    }

    fn incident_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.counts_by("SELECT state, count(*) FROM incidents GROUP BY state")
    }

    fn devices(&self, f: &DeviceFilter) -> Result<DevicePage, StoreError> {
        let (mut cond, mut args) = (String::new(), Args::new());
        if let Some(k) = &f.kind {
            arg(&mut cond, &mut args, " AND d.kind = $", Box::new(k.clone()));
        }
        if let Some(g) = &f.grid {
            arg(&mut cond, &mut args, " AND p.grid_code = $", Box::new(g.clone()));
        }
        if let Some(s) = &f.street {
            arg(&mut cond, &mut args, " AND p.street_code = $", Box::new(s.clone()));
        }
        if let Some(b) = f.battery_below {
            arg(&mut cond, &mut args, " AND h.battery_mv < $", Box::new(i64::from(b)));
        }
        if let Some(t) = f.silent_before_ms {
            arg(
                &mut cond,
                &mut args,
                " AND (h.last_seen_ms IS NULL OR h.last_seen_ms < $::bigint)",
                Box::new(t),
            );
        }
        match f.state.as_deref() {
            Some("online") => cond.push_str(" AND h.online"),
            Some("offline") => cond.push_str(" AND NOT h.online"),
            Some("never_seen") => cond.push_str(" AND h.eui IS NULL"),
            Some("low_battery") => cond.push_str(" AND h.low_battery"),
            Some("alarm") => cond.push_str(
                " AND EXISTS (SELECT 1 FROM incidents i WHERE i.eui = d.eui AND i.state IN ('open', 'recovered') AND i.severity IN ('major', 'critical'))",
            ),
            _ => {}
        }
        let total = self
            .count(&format!("SELECT count(*) FROM ({DEVICE_SELECT}{cond}) AS t"), &refs(&args))?;
        let order = match f.sort.as_deref() {
            Some("kind") => "d.kind",
            Some("grid") => "p.grid_code",
            Some("battery") => "h.battery_mv",
            Some("rssi") => "h.rssi_dbm",
            Some("last_seen") => "h.last_seen_ms",
            Some("state") => "alarm DESC, h.online",
            _ => "d.eui",
        };
        let dir = if f.desc { "DESC" } else { "ASC" };
        let per_page = f.per_page.clamp(1, 5_000);
        let offset = i64::from(f.page.max(1) - 1) * i64::from(per_page);
        let mut sql = format!("{DEVICE_SELECT}{cond} ORDER BY {order} {dir}, d.eui");
        arg(&mut sql, &mut args, " LIMIT $", Box::new(i64::from(per_page)));
        arg(&mut sql, &mut args, " OFFSET $", Box::new(offset));
        let devices =
            self.with(|c| Ok(wait(c.query(&sql, &refs(&args)))?.iter().map(device_row).collect()))?;
        Ok(DevicePage { total, page: f.page.max(1), per_page, devices })
    }

    fn device(&self, id: Eui, since_ms: i64) -> Result<Option<DeviceDetail>, StoreError> {
        let d = e(id);
        let rows = self.with(|c| {
            let Some(device) =
                wait(c.query_opt(&format!("{DEVICE_SELECT} AND d.eui = $1"), &[&d]))?
            else {
                return Ok(None);
            };
            let telemetry = wait(c.query(
                "SELECT measurement, field, at_ms, value FROM telemetry WHERE eui = $1 AND at_ms >= $2
                 ORDER BY at_ms DESC LIMIT 2000",
                &[&d, &since_ms],
            ))?;
            let events = wait(c.query(
                "SELECT at_ms, event FROM health_events WHERE eui = $1 ORDER BY id DESC LIMIT 50",
                &[&d],
            ))?;
            let messages = wait(c.query(
                "SELECT received_ms, kind, counter FROM messages WHERE eui = $1
                 ORDER BY received_ms DESC LIMIT 30",
                &[&d],
            ))?;
            let recent = wait(c.query_opt("SELECT list FROM recent_frames WHERE eui = $1", &[&d]))?;
            let audit = wait(c.query(
                "SELECT received_ms, reason, raw FROM audit WHERE eui = $1 ORDER BY id DESC LIMIT 30",
                &[&d],
            ))?;
            let incidents = wait(c.query(
                "SELECT id, condition, severity, state, case_id FROM incidents WHERE eui = $1
                 ORDER BY id DESC LIMIT 20",
                &[&d],
            ))?;
            Ok(Some((device, telemetry, events, messages, recent, audit, incidents)))
        })?;
        let Some((device, telemetry_rows, events, messages, recent, audit, incidents)) = rows
        else {
            return Ok(None);
        };
        let mut telemetry: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
        for r in telemetry_rows {
            let series = format!("{}_{}", r.get::<_, &str>(0), r.get::<_, &str>(1));
            telemetry.entry(series).or_default().push((r.get(2), r.get(3)));
        }
        for points in telemetry.values_mut() {
            points.reverse();
        }
        let accepted: Vec<FrameVerdict> = messages
            .iter()
            .map(|r| FrameVerdict {
                received_ms: r.get(0),
                verdict: "accepted",
                detail: r.get(1),
                counter: r.get(2),
            })
            .collect();
        // Readings, fixes and backlogs: the device's list of recent telemetry frames.
        let list = recent.map(|r| r.get::<_, String>(0)).unwrap_or_default();
        let rejected = audit.iter().map(|r| (r.get(0), r.get(1), r.get(2)));
        let frames = last_frames(id, accepted, &list, rejected);
        Ok(Some(DeviceDetail {
            device: device_row(&device),
            telemetry,
            health_events: events.iter().map(|r| (r.get(0), r.get(1))).collect(),
            frames,
            incidents: incidents
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect(),
        }))
    }

    fn sparklines(
        &self,
        devices: &[(Eui, &'static str, &'static str)],
        since_ms: i64,
        points: u32,
    ) -> Result<BTreeMap<String, Vec<f64>>, StoreError> {
        self.with(|c| {
            let stmt = c.statement(
                "SELECT value FROM telemetry WHERE eui = $1 AND measurement = $2 AND field = $3
                 AND at_ms >= $4 ORDER BY at_ms DESC LIMIT $5",
            )?;
            let mut out = BTreeMap::new();
            for (id, m, f) in devices {
                let mut v: Vec<f64> =
                    wait(c.query(&stmt, &[&e(*id), m, f, &since_ms, &i64::from(points)]))?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                v.reverse();
                out.insert(id.to_string(), v);
            }
            Ok(out)
        })
    }

    fn incidents(
        &self,
        states: &[String],
        condition: Option<&str>,
        area: Option<&str>,
        limit: u32,
    ) -> Result<Vec<IncidentView>, StoreError> {
        let mut sql = String::from(
            "SELECT id, eui, condition, severity, state, onset_ms, detected_ms, updated_ms, cluster_id, grid_code, case_id
             FROM incidents WHERE true",
        );
        let mut args = Args::new();
        if !states.is_empty() {
            arg(&mut sql, &mut args, " AND state = ANY($::text[])", Box::new(states.to_vec()));
        }
        if let Some(c) = condition {
            arg(&mut sql, &mut args, " AND condition = $", Box::new(c.to_owned()));
        }
        if let Some(a) = area {
            arg(
                &mut sql,
                &mut args,
                " AND starts_with(COALESCE(grid_code, ''), $::text)",
                Box::new(a.to_owned()),
            );
        }
        arg(&mut sql, &mut args, " ORDER BY id DESC LIMIT $", Box::new(i64::from(limit)));
        self.with(|c| {
            Ok(wait(c.query(&sql, &refs(&args)))?
                .iter()
                .map(|r| IncidentView {
                    id: r.get(0),
                    device_id: eui(r.get(1)).to_string(),
                    condition: r.get(2),
                    severity: r.get(3),
                    state: r.get(4),
                    onset_ms: r.get(5),
                    detected_ms: r.get(6),
                    updated_ms: r.get(7),
                    cluster_id: r.get(8),
                    grid_code: r.get(9),
                    case_id: r.get(10),
                })
                .collect())
        })
    }

    fn check_writable(&mut self) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = wait(c.transaction())?;
            wait(tx.execute(
                "INSERT INTO stats (name, value) VALUES ('ready_probe', 0) ON CONFLICT (name) DO NOTHING",
                &[],
            ))?;
            wait(tx.rollback())?;
            Ok(())
        })
    }

    fn map_devices(&self) -> Result<Vec<MapDevice>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT d.eui, d.kind, d.lat, d.lon, h.online, h.low_battery,
                    EXISTS (SELECT 1 FROM incidents i WHERE i.eui = d.eui AND i.state IN ('open', 'recovered') AND i.severity IN ('major', 'critical')),
                    f.lat, f.lon
                 FROM devices d LEFT JOIN health h ON h.eui = d.eui LEFT JOIN beacon_fix f ON f.eui = d.eui
                 WHERE d.status = 'active'",
                &[],
            ))?
            .iter()
            .map(|r| {
                let online: Option<bool> = r.get(4);
                MapDevice(
                    eui(r.get(0)).to_string(),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    match online {
                        None => "new",
                        Some(true) => "on",
                        Some(false) => "off",
                    },
                    r.get(6),
                    r.get::<_, Option<bool>>(5).unwrap_or(false),
                    r.get(7),
                    r.get(8),
                )
            })
            .collect())
        })
    }

    fn grid_counts(&self) -> Result<BTreeMap<String, GridCounts>, StoreError> {
        let (devices, cases) = self.with(|c| {
            let devices = wait(c.query(
                "SELECT p.grid_code, count(*), count(*) FILTER (WHERE NOT h.online),
                    count(*) FILTER (WHERE EXISTS (SELECT 1 FROM incidents i WHERE i.eui = d.eui
                        AND i.state IN ('open', 'recovered') AND i.severity IN ('major', 'critical')))
                 FROM devices d JOIN placements p ON p.eui = d.eui LEFT JOIN health h ON h.eui = d.eui
                 WHERE d.status = 'active' AND p.grid_code IS NOT NULL GROUP BY p.grid_code",
                &[],
            ))?;
            let cases = wait(c.query(
                "SELECT grid_code, count(*) FROM cases WHERE state NOT IN ('closed', 'voided')
                 AND grid_code IS NOT NULL GROUP BY grid_code",
                &[],
            ))?;
            Ok((devices, cases))
        })?;
        let mut out: BTreeMap<String, GridCounts> = BTreeMap::new();
        for r in devices {
            let c = out.entry(r.get(0)).or_default();
            c.devices = r.get::<_, i64>(1) as u64;
            c.offline = r.get::<_, i64>(2) as u64;
            c.alarm = r.get::<_, i64>(3) as u64;
        }
        for r in cases {
            out.entry(r.get(0)).or_default().open_cases = r.get::<_, i64>(1) as u64;
        }
        Ok(out)
    }

    fn stats(
        &self,
        from_ms: i64,
        to_ms: i64,
        area: &str,
        now_ms: i64,
    ) -> Result<Stats, StoreError> {
        let in_area = "starts_with(COALESCE(c.grid_code, ''), $3::text)";
        let three: [&(dyn ToSql + Sync); 3] = [&from_ms, &to_ms, &area];
        let four: [&(dyn ToSql + Sync); 4] = [&from_ms, &to_ms, &area, &now_ms];
        let step = |to: &str| -> Result<u64, StoreError> {
            self.count(
                &format!(
                    "SELECT count(DISTINCT e.case_id) FROM case_events e JOIN cases c ON c.id = e.case_id
                     WHERE e.to_state = '{to}' AND e.at_ms >= $1 AND e.at_ms < $2 AND {in_area}"
                ),
                &three,
            )
        };
        let in_period =
            format!("FROM cases c WHERE c.detected_ms >= $1 AND c.detected_ms < $2 AND {in_area}");
        let collected = self.count(&format!("SELECT count(*) {in_period}"), &three)?;
        let closed_of_collected = self.count(
            &format!("SELECT count(*) {in_period} AND c.state IN ('closed', 'voided')"),
            &three,
        )?;
        // Compliance: cases whose milestone passed or that reached the step.
        let compliance = |done: &str, due: &str| -> Result<Option<f64>, StoreError> {
            let base = format!("{in_period} AND ({done} IS NOT NULL OR {due} < $4)");
            let all = self.count(&format!("SELECT count(*) {base}"), &four)?;
            let ok = self.count(
                &format!("SELECT count(*) {base} AND {done} IS NOT NULL AND {done} <= {due}"),
                &four,
            )?;
            Ok(ratio(ok, all))
        };
        let handling = {
            let base = format!(
                "{in_period} AND c.dispatched_ms IS NOT NULL AND (c.handled_ms IS NOT NULL OR c.handling_due_ms < $4)"
            );
            let all = self.count(&format!("SELECT count(*) {base}"), &four)?;
            let ok = self.count(
                &format!(
                    "SELECT count(*) {base} AND c.handled_ms IS NOT NULL AND c.handled_ms <= c.handling_due_ms"
                ),
                &four,
            )?;
            ratio(ok, all)
        };
        let (devices, online, seen, patrol) = self.with(|c| {
            let r = wait(c.query_one(
                "SELECT count(*), count(*) FILTER (WHERE h.online), count(h.eui)
                 FROM devices d LEFT JOIN placements p ON p.eui = d.eui LEFT JOIN health h ON h.eui = d.eui
                 WHERE d.status = 'active' AND starts_with(COALESCE(p.grid_code, ''), $1::text)",
                &[&area],
            ))?;
            let patrol = wait(c.query(
                "SELECT grid_code, count(*) FROM patrols WHERE at_ms >= $1 AND at_ms < $2
                 AND grid_code IS NOT NULL AND starts_with(grid_code, $3::text)
                 GROUP BY grid_code ORDER BY grid_code",
                &three,
            ))?;
            Ok((
                r.get::<_, i64>(0) as u64,
                r.get::<_, i64>(1) as u64,
                r.get::<_, i64>(2) as u64,
                patrol.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)).collect(),
            ))
        })?;
        Ok(Stats {
            collected,
            filed: step("filed")?,
            dispatched: step("dispatched")?,
            handled: step("handled")?,
            closed: step("closed")?,
            closure_rate: ratio(closed_of_collected, collected),
            deploy_compliance: compliance("c.dispatched_ms", "c.deploy_due_ms")?,
            feedback_compliance: compliance(
                "COALESCE(c.feedback_ms, c.closed_ms)",
                "c.feedback_due_ms",
            )?,
            handling_compliance: handling,
            online_ratio: ratio(online, seen),
            devices,
            online,
            patrol,
        })
    }
}
