//! The registry on PostgreSQL: imports in a few round trips (the existing rows read at once,
//! the changed ones written with one multi-row statement per chunk), device secrets sealed.

use std::collections::HashMap;

use gridsense_common::inventory::Device as InventoryDevice;
use gridsense_protocol::{DeviceKey, Eui};

use super::{PgStore, e, eui, wait};
use crate::{
    downlink::Request,
    registry::ImportReport,
    store::{Registry, StoreError, kind_of},
};

/// Rows per multi-row statement.
const CHUNK: usize = 5_000;

/// What an import compares: kind, key, password, place, codes and levels.
type Wanted = (
    String,
    [u8; 16],
    String,
    f64,
    f64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<i32>,
    Option<i32>,
);

fn wanted(d: &InventoryDevice) -> Wanted {
    let r = &d.record;
    (
        kind_of(r.kind).as_str().to_owned(),
        *d.key.expose_bytes(),
        r.mqtt_password.clone(),
        r.lat,
        r.lon,
        r.component_code.clone(),
        r.minor_class.clone(),
        r.grid_code.clone(),
        r.well_depth_mm.map(i32::from),
        r.warn_mm.map(i32::from),
        r.alarm_mm.map(i32::from),
    )
}

impl Registry for PgStore {
    fn import(
        &mut self,
        devices: &[InventoryDevice],
        now_ms: i64,
    ) -> Result<ImportReport, StoreError> {
        let mut report = ImportReport::default();
        let keys = &self.keys;
        self.with(|c| {
            let tx = wait(c.transaction())?;
            for chunk in devices.chunks(CHUNK) {
                let euis: Vec<i64> = chunk.iter().map(|d| e(d.eui)).collect();
                let rows = wait(tx.query(
                    "SELECT eui, kind, key, mqtt_password, lat, lon, component_code, minor_class,
                            grid_code, well_depth_mm, warn_mm, alarm_mm
                     FROM devices WHERE eui = ANY($1)",
                    &[&euis],
                ))?;
                let mut existing: HashMap<i64, Wanted> = HashMap::with_capacity(rows.len());
                for r in rows {
                    let id: i64 = r.get(0);
                    let key: Vec<u8> = r.get(2);
                    let password: String = r.get(3);
                    existing.insert(
                        id,
                        (
                            r.get(1),
                            keys.open_key(eui(id), &key)?,
                            keys.open_password(eui(id), &password)?,
                            r.get(4),
                            r.get(5),
                            r.get(6),
                            r.get(7),
                            r.get(8),
                            r.get(9),
                            r.get(10),
                            r.get(11),
                        ),
                    );
                }
                let mut cols = Columns::default();
                for d in chunk {
                    let w = wanted(d);
                    match existing.get(&e(d.eui)) {
                        Some(row) if *row == w => {
                            report.unchanged += 1;
                            continue;
                        }
                        Some(_) => report.updated += 1,
                        None => report.added += 1,
                    }
                    cols.push(keys, d, w)?;
                }
                if cols.eui.is_empty() {
                    continue;
                }
                wait(tx.execute(
                    "INSERT INTO devices (eui, eui_hex, kind, key, mqtt_password, lat, lon,
                        component_code, minor_class, grid_code, well_depth_mm, warn_mm, alarm_mm, updated_ms)
                     SELECT u.*, $14 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bytea[],
                        $5::text[], $6::float8[], $7::float8[], $8::text[], $9::text[], $10::text[],
                        $11::int[], $12::int[], $13::int[]) AS u
                     ON CONFLICT (eui) DO UPDATE SET kind = EXCLUDED.kind, key = EXCLUDED.key,
                        mqtt_password = EXCLUDED.mqtt_password, lat = EXCLUDED.lat, lon = EXCLUDED.lon,
                        component_code = EXCLUDED.component_code, minor_class = EXCLUDED.minor_class,
                        grid_code = EXCLUDED.grid_code, well_depth_mm = EXCLUDED.well_depth_mm,
                        warn_mm = EXCLUDED.warn_mm, alarm_mm = EXCLUDED.alarm_mm,
                        updated_ms = EXCLUDED.updated_ms",
                    &[
                        &cols.eui,
                        &cols.hex,
                        &cols.kind,
                        &cols.key,
                        &cols.password,
                        &cols.lat,
                        &cols.lon,
                        &cols.component,
                        &cols.minor,
                        &cols.grid,
                        &cols.depth,
                        &cols.warn,
                        &cols.alarm,
                        &now_ms,
                    ],
                ))?;
            }
            wait(tx.commit())?;
            Ok(())
        })?;
        Ok(report)
    }

    fn add_request(&mut self, eui: Eui, request: &Request, now_ms: i64) -> Result<i64, StoreError> {
        let (kind, settings) = crate::store::request_columns(request);
        self.with(|c| {
            Ok(wait(c.query_one(
                "INSERT INTO requests (eui, kind, settings, requested_ms) VALUES ($1, $2, $3, $4)
                 RETURNING id",
                &[&e(eui), &kind, &settings, &now_ms],
            ))?
            .get(0))
        })
    }

    fn request_outcome(&self, id: i64) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_opt("SELECT outcome FROM requests WHERE id = $1", &[&id]))?
                .and_then(|r| r.get::<_, Option<String>>(0)))
        })
    }

    fn retire(&mut self, eui: Eui, now_ms: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(wait(c.execute(
                "UPDATE devices SET status = 'retired', updated_ms = $2 WHERE eui = $1 AND status = 'active'",
                &[&e(eui), &now_ms],
            ))? == 1)
        })
    }

    fn rekey(&mut self, eui: Eui, key: &DeviceKey, now_ms: i64) -> Result<bool, StoreError> {
        let sealed = self.keys.seal_key(eui, key.expose_bytes())?;
        self.with(|c| {
            let tx = wait(c.transaction())?;
            let n = wait(tx.execute(
                "UPDATE devices SET key = $2, updated_ms = $3 WHERE eui = $1 AND status = 'active'",
                &[&e(eui), &sealed, &now_ms],
            ))?;
            // Counters are per key (SPEC §4): the new key starts a new counter space.
            if n == 1 {
                wait(tx.execute("DELETE FROM counters WHERE eui = $1", &[&e(eui)]))?;
            }
            wait(tx.commit())?;
            Ok(n == 1)
        })
    }

    fn relocate(&mut self, eui: Eui, lat: f64, lon: f64, now_ms: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(wait(c.execute(
                "UPDATE devices SET lat = $2, lon = $3, updated_ms = $4 WHERE eui = $1",
                &[&e(eui), &lat, &lon, &now_ms],
            ))? == 1)
        })
    }

    fn replace(
        &mut self,
        old: Eui,
        new: Eui,
        key: &DeviceKey,
        mqtt_password: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let sealed_key = self.keys.seal_key(new, key.expose_bytes())?;
        let sealed_password = self.keys.seal_password(new, mqtt_password)?;
        self.with(|c| {
            let tx = wait(c.transaction())?;
            let copied = wait(tx.execute(
                "INSERT INTO devices (eui, eui_hex, kind, key, mqtt_password, lat, lon, component_code,
                    minor_class, grid_code, well_depth_mm, warn_mm, alarm_mm, status, updated_ms)
                 SELECT $2, $3, kind, $4, $5, lat, lon, component_code, minor_class, grid_code,
                    well_depth_mm, warn_mm, alarm_mm, 'active', $6
                 FROM devices WHERE eui = $1 AND status = 'active'",
                &[&e(old), &e(new), &new.to_string(), &sealed_key, &sealed_password, &now_ms],
            ))?;
            if copied == 1 {
                wait(tx.execute(
                    "UPDATE devices SET status = 'replaced', replaced_by = $2, updated_ms = $3 WHERE eui = $1",
                    &[&e(old), &e(new), &now_ms],
                ))?;
            }
            wait(tx.commit())?;
            Ok(copied == 1)
        })
    }

    fn device_status(&self, eui: Eui) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_opt("SELECT status FROM devices WHERE eui = $1", &[&e(eui)]))?
                .map(|r| r.get(0)))
        })
    }

    fn credentials(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self.with(|c| {
            Ok(wait(c.query(
                "SELECT eui, eui_hex, mqtt_password FROM devices WHERE status = 'active' ORDER BY eui",
                &[],
            ))?)
        })?;
        rows.iter()
            .map(|r| Ok((r.get(1), self.keys.open_password(eui(r.get(0)), r.get(2))?)))
            .collect()
    }
}

/// An import chunk's changed rows, column by column (for `unnest`).
#[derive(Default)]
struct Columns {
    eui: Vec<i64>,
    hex: Vec<String>,
    kind: Vec<String>,
    key: Vec<Vec<u8>>,
    password: Vec<String>,
    lat: Vec<f64>,
    lon: Vec<f64>,
    component: Vec<Option<String>>,
    minor: Vec<Option<String>>,
    grid: Vec<Option<String>>,
    depth: Vec<Option<i32>>,
    warn: Vec<Option<i32>>,
    alarm: Vec<Option<i32>>,
}

impl Columns {
    fn push(
        &mut self,
        keys: &crate::store::keys::KeyRing,
        d: &InventoryDevice,
        w: Wanted,
    ) -> Result<(), StoreError> {
        let (kind, key, password, lat, lon, component, minor, grid, depth, warn, alarm) = w;
        self.eui.push(e(d.eui));
        self.hex.push(d.record.eui.clone());
        self.kind.push(kind);
        self.key.push(keys.seal_key(d.eui, &key)?);
        self.password.push(keys.seal_password(d.eui, &password)?);
        self.lat.push(lat);
        self.lon.push(lon);
        self.component.push(component);
        self.minor.push(minor);
        self.grid.push(grid);
        self.depth.push(depth);
        self.warn.push(warn);
        self.alarm.push(alarm);
        Ok(())
    }
}
