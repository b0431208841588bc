//! The operators' read-only views: devices, incidents, map, grids, statistics and totals.

use std::collections::BTreeMap;

use gridsense_protocol::Eui;
use rusqlite::{OptionalExtension, params, types::Value};

use super::{ops::*, *};

/// The operators' read-only views: devices, incidents, map, grids, statistics and totals.
pub trait Queries {
    /// Messages of one kind stored for a device (or all devices).
    fn message_count(&self, kind: &str) -> Result<u64, StoreError>;

    /// Persisted health rows.
    fn health(&self) -> Result<Vec<(Eui, DeviceHealth)>, StoreError>;

    /// Totals since the store was made.
    fn totals(&self) -> Result<Totals, StoreError>;

    /// Telemetry rows, all or of one measurement and field.
    fn telemetry_count(&self, measurement_field: Option<(&str, &str)>) -> Result<u64, StoreError>;

    /// A counter from the stats table (`accepted`, `telemetry_dropped`, …).
    fn stat(&self, name: &str) -> Result<u64, StoreError>;

    /// Rows in the audit log.
    fn audit_len(&self) -> Result<u64, StoreError>;

    /// Health events of one device, oldest first: (at_ms, event).
    fn events_of(&self, eui: Eui) -> Result<Vec<(i64, String)>, StoreError>;

    /// Outbox entries by state (`pending`, `done`, `dead`).
    fn outbox_counts(&self) -> Result<BTreeMap<String, u64>, StoreError>;

    /// Incidents by state.
    fn incident_counts(&self) -> Result<BTreeMap<String, u64>, StoreError>;

    /// A page of devices.
    fn devices(&self, f: &DeviceFilter) -> Result<DevicePage, StoreError>;

    /// One device's page.
    fn device(&self, eui: Eui, since_ms: i64) -> Result<Option<DeviceDetail>, StoreError>;

    /// Recent values of each listed device's main series (for sparklines), oldest first.
    fn sparklines(
        &self,
        devices: &[(Eui, &'static str, &'static str)],
        since_ms: i64,
        points: u32,
    ) -> Result<BTreeMap<String, Vec<f64>>, StoreError>;

    /// Incidents, newest first: filtered by state, condition and area code prefix.
    fn incidents(
        &self,
        states: &[String],
        condition: Option<&str>,
        area: Option<&str>,
        limit: u32,
    ) -> Result<Vec<IncidentView>, StoreError>;

    /// Checks the store accepts a write (for readiness), without changing anything.
    fn check_writable(&mut self) -> Result<(), StoreError>;

    /// Every active device for the map, compact: EUI, kind, position, health (`on`, `off`,
    /// `new`), in alarm, low battery, and a beacon's last fix.
    fn map_devices(&self) -> Result<Vec<MapDevice>, StoreError>;

    /// Per-grid counts for the map.
    fn grid_counts(&self) -> Result<BTreeMap<String, GridCounts>, StoreError>;

    /// Statistics for cases detected in `[from, to)` and devices in the area (a code prefix;
    /// empty: everything).
    fn stats(&self, from_ms: i64, to_ms: i64, area: &str, now_ms: i64)
    -> Result<Stats, StoreError>;
}

impl Queries for Store {
    fn message_count(&self, kind: &str) -> Result<u64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM messages WHERE kind = ?1",
            params![kind],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    fn health(&self) -> Result<Vec<(Eui, DeviceHealth)>, StoreError> {
        let mut out = Vec::new();
        self.each_health(&mut |eui, h| out.push((eui, h)))?;
        Ok(out)
    }

    fn totals(&self) -> Result<Totals, StoreError> {
        let accepted: Option<i64> = self
            .conn
            .query_row("SELECT value FROM stats WHERE name = 'accepted'", [], |r| r.get(0))
            .optional()?;
        let mut stmt = self.conn.prepare("SELECT reason, count FROM reject_counts")?;
        let rejects = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?;
        Ok(Totals { accepted: accepted.unwrap_or(0) as u64, rejects })
    }

    fn telemetry_count(&self, measurement_field: Option<(&str, &str)>) -> Result<u64, StoreError> {
        let n: i64 = match measurement_field {
            None => self.conn.query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get(0))?,
            Some((m, f)) => self.conn.query_row(
                "SELECT COUNT(*) FROM telemetry WHERE measurement = ?1 AND field = ?2",
                params![m, f],
                |r| r.get(0),
            )?,
        };
        Ok(n as u64)
    }

    fn stat(&self, name: &str) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT value FROM stats WHERE name = ?1", params![name], |r| r.get(0))
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    fn audit_len(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get::<_, i64>(0))? as u64)
    }

    fn events_of(&self, eui: Eui) -> Result<Vec<(i64, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT at_ms, event FROM health_events WHERE eui = ?1 ORDER BY id")?;
        Ok(stmt
            .query_map(params![eui.0 as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?)
    }

    fn outbox_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT state, COUNT(*) FROM outbox GROUP BY state")?;
        Ok(stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?)
    }

    fn incident_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT state, COUNT(*) FROM incidents GROUP BY state")?;
        Ok(stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<_, _>>()?)
    }

    fn devices(&self, f: &DeviceFilter) -> Result<DevicePage, StoreError> {
        let mut cond = String::new();
        let mut args: Vec<Value> = Vec::new();
        let mut add = |sql: &str, v: Value| {
            cond.push_str(sql);
            args.push(v);
        };
        if let Some(k) = &f.kind {
            add(" AND d.kind = ?", k.clone().into());
        }
        if let Some(g) = &f.grid {
            add(" AND p.grid_code = ?", g.clone().into());
        }
        if let Some(s) = &f.street {
            add(" AND p.street_code = ?", s.clone().into());
        }
        if let Some(b) = f.battery_below {
            add(" AND h.battery_mv < ?", i64::from(b).into());
        }
        if let Some(t) = f.silent_before_ms {
            add(" AND (h.last_seen_ms IS NULL OR h.last_seen_ms < ?)", t.into());
        }
        match f.state.as_deref() {
            Some("online") => cond.push_str(" AND h.online = 1"),
            Some("offline") => cond.push_str(" AND h.online = 0"),
            Some("never_seen") => cond.push_str(" AND h.eui IS NULL"),
            Some("low_battery") => cond.push_str(" AND h.low_battery = 1"),
            Some("alarm") => cond.push_str(" AND alarm"),
            _ => {}
        }
        let total: i64 = self.conn.query_row(
            &format!("SELECT COUNT(*) FROM ({DEVICE_SELECT}{cond})"),
            rusqlite::params_from_iter(args.clone()),
            |r| r.get(0),
        )?;
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
        let sql = format!("{DEVICE_SELECT}{cond} ORDER BY {order} {dir}, d.eui LIMIT ? OFFSET ?");
        args.push(i64::from(per_page).into());
        args.push(offset.into());
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let devices = stmt
            .query_map(rusqlite::params_from_iter(args), device_row)?
            .collect::<Result<_, _>>()?;
        Ok(DevicePage { total: total as u64, page: f.page.max(1), per_page, devices })
    }

    fn device(&self, eui: Eui, since_ms: i64) -> Result<Option<DeviceDetail>, StoreError> {
        let e = eui.0 as i64;
        let Some(device) = self
            .conn
            .query_row(&format!("{DEVICE_SELECT} AND d.eui = ?1"), [e], device_row)
            .optional()?
        else {
            return Ok(None);
        };
        let mut telemetry: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT measurement, field, at_ms, value FROM telemetry WHERE eui = ?1 AND at_ms >= ?2 ORDER BY at_ms DESC LIMIT 2000",
        )?;
        let rows = stmt.query_map(params![e, since_ms], |r| {
            Ok((
                format!("{}_{}", r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                r.get(2)?,
                r.get(3)?,
            ))
        })?;
        for row in rows {
            let (series, at, v) = row?;
            telemetry.entry(series).or_default().push((at, v));
        }
        for points in telemetry.values_mut() {
            points.reverse();
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT at_ms, event FROM health_events WHERE eui = ?1 ORDER BY id DESC LIMIT 50",
        )?;
        let health_events =
            stmt.query_map([e], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let mut frames: Vec<FrameVerdict> = Vec::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT received_ms, kind, counter FROM messages WHERE eui = ?1 ORDER BY received_ms DESC LIMIT 30",
        )?;
        for row in stmt.query_map([e], |r| {
            Ok(FrameVerdict {
                received_ms: r.get(0)?,
                verdict: "accepted",
                detail: r.get(1)?,
                counter: r.get(2)?,
            })
        })? {
            frames.push(row?);
        }
        // Readings, fixes and backlogs: the device's list of recent telemetry frames.
        let recent: Option<String> = self
            .conn
            .query_row("SELECT list FROM recent_frames WHERE eui = ?1", [e], |r| r.get(0))
            .optional()?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT received_ms, reason, raw FROM audit WHERE eui = ?1 ORDER BY id DESC LIMIT 30",
        )?;
        let rejected: Vec<(i64, String, Vec<u8>)> = stmt
            .query_map([e], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let frames = last_frames(eui, frames, recent.as_deref().unwrap_or(""), rejected);
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, condition, severity, state, case_id FROM incidents WHERE eui = ?1 ORDER BY id DESC LIMIT 20",
        )?;
        let incidents = stmt
            .query_map([e], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
            .collect::<Result<_, _>>()?;
        Ok(Some(DeviceDetail { device, telemetry, health_events, frames, incidents }))
    }

    fn sparklines(
        &self,
        devices: &[(Eui, &'static str, &'static str)],
        since_ms: i64,
        points: u32,
    ) -> Result<BTreeMap<String, Vec<f64>>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT value FROM telemetry WHERE eui = ?1 AND measurement = ?2 AND field = ?3 AND at_ms >= ?4
             ORDER BY at_ms DESC LIMIT ?5",
        )?;
        let mut out = BTreeMap::new();
        for (eui, m, f) in devices {
            let mut v: Vec<f64> = stmt
                .query_map(params![eui.0 as i64, m, f, since_ms, points], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            v.reverse();
            out.insert(eui.to_string(), v);
        }
        Ok(out)
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
             FROM incidents WHERE 1 = 1",
        );
        let mut args: Vec<Value> = Vec::new();
        if !states.is_empty() {
            sql.push_str(&format!(" AND state IN ({})", vec!["?"; states.len()].join(", ")));
            args.extend(states.iter().map(|s| Value::from(s.clone())));
        }
        if let Some(c) = condition {
            sql.push_str(" AND condition = ?");
            args.push(c.to_owned().into());
        }
        if let Some(a) = area {
            sql.push_str(" AND substr(COALESCE(grid_code, ''), 1, ?) = ?");
            args.push(i64::try_from(a.len()).unwrap_or(0).into());
            args.push(a.to_owned().into());
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?");
        args.push(i64::from(limit).into());
        let mut stmt = self.conn.prepare(&sql)?;
        Ok(stmt
            .query_map(rusqlite::params_from_iter(args), |r| {
                Ok(IncidentView {
                    id: r.get(0)?,
                    device_id: Eui(r.get::<_, i64>(1)? as u64).to_string(),
                    condition: r.get(2)?,
                    severity: r.get(3)?,
                    state: r.get(4)?,
                    onset_ms: r.get(5)?,
                    detected_ms: r.get(6)?,
                    updated_ms: r.get(7)?,
                    cluster_id: r.get(8)?,
                    grid_code: r.get(9)?,
                    case_id: r.get(10)?,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    fn check_writable(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("INSERT INTO stats (name, value) VALUES ('ready_probe', 0) ON CONFLICT (name) DO NOTHING", [])?;
        tx.rollback()?;
        Ok(())
    }

    fn map_devices(&self) -> Result<Vec<MapDevice>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT d.eui, d.kind, d.lat, d.lon, h.online, h.low_battery,
                EXISTS (SELECT 1 FROM incidents i WHERE i.eui = d.eui AND i.state IN ('open', 'recovered') AND i.severity IN ('major', 'critical')),
                f.lat, f.lon
             FROM devices d LEFT JOIN health h ON h.eui = d.eui LEFT JOIN beacon_fix f ON f.eui = d.eui
             WHERE d.status = 'active'",
        )?;
        Ok(stmt
            .query_map([], |r| {
                let online: Option<bool> = r.get(4)?;
                Ok(MapDevice(
                    Eui(r.get::<_, i64>(0)? as u64).to_string(),
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    match online {
                        None => "new",
                        Some(true) => "on",
                        Some(false) => "off",
                    },
                    r.get(6)?,
                    r.get::<_, Option<bool>>(5)?.unwrap_or(false),
                    r.get(7)?,
                    r.get(8)?,
                ))
            })?
            .collect::<Result<_, _>>()?)
    }

    fn grid_counts(&self) -> Result<BTreeMap<String, GridCounts>, StoreError> {
        let mut out: BTreeMap<String, GridCounts> = BTreeMap::new();
        let mut stmt = self.conn.prepare(
            "SELECT p.grid_code, COUNT(*), SUM(CASE WHEN h.online = 0 THEN 1 ELSE 0 END),
                SUM(EXISTS (SELECT 1 FROM incidents i WHERE i.eui = d.eui AND i.state IN ('open', 'recovered') AND i.severity IN ('major', 'critical')))
             FROM devices d JOIN placements p ON p.eui = d.eui LEFT JOIN health h ON h.eui = d.eui
             WHERE d.status = 'active' AND p.grid_code IS NOT NULL GROUP BY p.grid_code",
        )?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })? {
            let (grid, devices, offline, alarm) = row?;
            let c = out.entry(grid).or_default();
            c.devices = devices as u64;
            c.offline = offline.unwrap_or(0) as u64;
            c.alarm = alarm.unwrap_or(0) as u64;
        }
        let mut stmt = self.conn.prepare(
            "SELECT grid_code, COUNT(*) FROM cases WHERE state NOT IN ('closed', 'voided') AND grid_code IS NOT NULL GROUP BY grid_code",
        )?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (grid, n) = row?;
            out.entry(grid).or_default().open_cases = n as u64;
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
        let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<u64, StoreError> {
            Ok(self.conn.query_row(sql, p, |r| r.get::<_, i64>(0))? as u64)
        };
        let in_area = "substr(COALESCE(c.grid_code, ''), 1, length(?3)) = ?3";
        let step = |to: &str| -> Result<u64, StoreError> {
            count(
                &format!(
                    "SELECT COUNT(DISTINCT e.case_id) FROM case_events e JOIN cases c ON c.id = e.case_id
                     WHERE e.to_state = '{to}' AND e.at_ms >= ?1 AND e.at_ms < ?2 AND {in_area}"
                ),
                &[&from_ms, &to_ms, &area],
            )
        };
        let collected = count(
            &format!(
                "SELECT COUNT(*) FROM cases c WHERE c.detected_ms >= ?1 AND c.detected_ms < ?2 AND {in_area}"
            ),
            &[&from_ms, &to_ms, &area],
        )?;
        let closed_of_collected = count(
            &format!(
                "SELECT COUNT(*) FROM cases c WHERE c.detected_ms >= ?1 AND c.detected_ms < ?2 AND {in_area}
                 AND c.state IN ('closed', 'voided')"
            ),
            &[&from_ms, &to_ms, &area],
        )?;
        // Compliance: cases whose milestone passed or that reached the step.
        let compliance = |done: &str, due: &str| -> Result<Option<f64>, StoreError> {
            let base = format!(
                "FROM cases c WHERE c.detected_ms >= ?1 AND c.detected_ms < ?2 AND {in_area}
                 AND ({done} IS NOT NULL OR {due} < ?4)"
            );
            let all =
                count(&format!("SELECT COUNT(*) {base}"), &[&from_ms, &to_ms, &area, &now_ms])?;
            let ok = count(
                &format!("SELECT COUNT(*) {base} AND {done} IS NOT NULL AND {done} <= {due}"),
                &[&from_ms, &to_ms, &area, &now_ms],
            )?;
            Ok(ratio(ok, all))
        };
        let handling = {
            let base = format!(
                "FROM cases c WHERE c.detected_ms >= ?1 AND c.detected_ms < ?2 AND {in_area}
                 AND c.dispatched_ms IS NOT NULL AND (c.handled_ms IS NOT NULL OR c.handling_due_ms < ?4)"
            );
            let all =
                count(&format!("SELECT COUNT(*) {base}"), &[&from_ms, &to_ms, &area, &now_ms])?;
            let ok = count(
                &format!(
                    "SELECT COUNT(*) {base} AND c.handled_ms IS NOT NULL AND c.handled_ms <= c.handling_due_ms"
                ),
                &[&from_ms, &to_ms, &area, &now_ms],
            )?;
            ratio(ok, all)
        };
        let (devices, online): (i64, i64) = self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN h.online = 1 THEN 1 ELSE 0 END), 0)
             FROM devices d LEFT JOIN placements p ON p.eui = d.eui LEFT JOIN health h ON h.eui = d.eui
             WHERE d.status = 'active' AND substr(COALESCE(p.grid_code, ''), 1, length(?1)) = ?1",
            [area],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let seen: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM devices d LEFT JOIN placements p ON p.eui = d.eui JOIN health h ON h.eui = d.eui
             WHERE d.status = 'active' AND substr(COALESCE(p.grid_code, ''), 1, length(?1)) = ?1",
            [area],
            |r| r.get(0),
        )?;
        let mut stmt = self.conn.prepare(
            "SELECT grid_code, COUNT(*) FROM patrols WHERE at_ms >= ?1 AND at_ms < ?2 AND grid_code IS NOT NULL
             AND substr(grid_code, 1, length(?3)) = ?3 GROUP BY grid_code ORDER BY grid_code",
        )?;
        let patrol = stmt
            .query_map(params![from_ms, to_ms, area], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<_, _>>()?;
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
            online_ratio: ratio(online as u64, seen as u64),
            devices: devices as u64,
            online: online as u64,
            patrol,
        })
    }
}
