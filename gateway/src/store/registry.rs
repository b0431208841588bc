//! The device registry as operators change it: imports, retirements, keys, moves, replacements, credentials and downlink requests.

use gridsense_protocol::Eui;
use rusqlite::{OptionalExtension, params};

use super::*;

/// The device registry as operators change it: imports, retirements, keys, moves, replacements, credentials and downlink requests.
pub trait Registry: Send {
    /// Adds or updates devices from an inventory; idempotent. Retired devices stay retired.
    fn import(
        &mut self,
        devices: &[InventoryDevice],
        now_ms: i64,
    ) -> Result<ImportReport, StoreError>;

    /// Records an operator's request for a device; the running gateway picks it up.
    fn add_request(&mut self, eui: Eui, request: &Request, now_ms: i64) -> Result<i64, StoreError>;

    /// A request's outcome once finished (`applied`, `unsupported`, `invalid_value`, `sent`,
    /// `no_answer`), or `None` while open.
    fn request_outcome(&self, id: i64) -> Result<Option<String>, StoreError>;

    /// Retires an active device: it is no longer accepted. Returns whether it was active.
    fn retire(&mut self, eui: Eui, now_ms: i64) -> Result<bool, StoreError>;

    /// Gives an active device a new key; its counters are kept (a device re-keyed in the field
    /// continues its frame counter). Returns whether it was active.
    fn rekey(&mut self, eui: Eui, key: &DeviceKey, now_ms: i64) -> Result<bool, StoreError>;

    /// Moves a device to a new location. Returns whether it exists.
    fn relocate(&mut self, eui: Eui, lat: f64, lon: f64, now_ms: i64) -> Result<bool, StoreError>;

    /// Replaces an active device by a new one on the same object (same location, component
    /// code, class, grid and levels), with its own EUI, key and password; the old one is
    /// retired and points to the new. Returns whether the old device was active.
    fn replace(
        &mut self,
        old: Eui,
        new: Eui,
        key: &DeviceKey,
        mqtt_password: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// A device's lifecycle status (`active`, `retired`, `replaced`), if registered.
    fn device_status(&self, eui: Eui) -> Result<Option<String>, StoreError>;

    /// MQTT user names (EUIs) and passwords of active devices, for the broker's files.
    fn credentials(&self) -> Result<Vec<(String, String)>, StoreError>;
}

impl Registry for Store {
    fn import(
        &mut self,
        devices: &[InventoryDevice],
        now_ms: i64,
    ) -> Result<ImportReport, StoreError> {
        let tx = self.conn.transaction()?;
        let mut report = ImportReport::default();
        {
            let mut find = tx.prepare(
                "SELECT kind, key, mqtt_password, lat, lon, component_code, minor_class, grid_code,
                        well_depth_mm, warn_mm, alarm_mm FROM devices WHERE eui = ?1",
            )?;
            let mut upsert = tx.prepare(
                "INSERT INTO devices (eui, eui_hex, kind, key, mqtt_password, lat, lon, component_code,
                    minor_class, grid_code, well_depth_mm, warn_mm, alarm_mm, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (eui) DO UPDATE SET kind = ?3, key = ?4, mqtt_password = ?5, lat = ?6,
                    lon = ?7, component_code = ?8, minor_class = ?9, grid_code = ?10,
                    well_depth_mm = ?11, warn_mm = ?12, alarm_mm = ?13, updated_ms = ?14",
            )?;
            type Row = (
                String,
                Vec<u8>,
                String,
                f64,
                f64,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<u16>,
                Option<u16>,
                Option<u16>,
            );
            for d in devices {
                let r = &d.record;
                let kind = kind_of(r.kind).as_str().to_owned();
                let key = d.key.expose_bytes().to_vec();
                let wanted: Row = (
                    kind.clone(),
                    key.clone(),
                    r.mqtt_password.clone(),
                    r.lat,
                    r.lon,
                    r.component_code.clone(),
                    r.minor_class.clone(),
                    r.grid_code.clone(),
                    r.well_depth_mm,
                    r.warn_mm,
                    r.alarm_mm,
                );
                let existing: Option<Row> = find
                    .query_row(params![d.eui.0 as i64], |row| {
                        Ok((
                            row.get(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                            row.get(4)?,
                            row.get(5)?,
                            row.get(6)?,
                            row.get(7)?,
                            row.get(8)?,
                            row.get(9)?,
                            row.get(10)?,
                        ))
                    })
                    .optional()?;
                let existing = match existing {
                    Some(mut row) => {
                        row.1 = self.keys.open_key(d.eui, &row.1)?.to_vec();
                        row.2 = self.keys.open_password(d.eui, &row.2)?;
                        Some(row)
                    }
                    None => None,
                };
                match existing {
                    Some(row) if row == wanted => {
                        report.unchanged += 1;
                        continue;
                    }
                    Some(_) => report.updated += 1,
                    None => report.added += 1,
                }
                upsert.execute(params![
                    d.eui.0 as i64,
                    r.eui,
                    kind,
                    self.keys.seal(d.eui, "key", &key)?,
                    self.keys.seal_password(d.eui, &r.mqtt_password)?,
                    r.lat,
                    r.lon,
                    r.component_code,
                    r.minor_class,
                    r.grid_code,
                    r.well_depth_mm,
                    r.warn_mm,
                    r.alarm_mm,
                    now_ms
                ])?;
            }
        }
        tx.commit()?;
        Ok(report)
    }

    fn add_request(&mut self, eui: Eui, request: &Request, now_ms: i64) -> Result<i64, StoreError> {
        let (kind, settings) = request_columns(request);
        self.conn.execute(
            "INSERT INTO requests (eui, kind, settings, requested_ms) VALUES (?1, ?2, ?3, ?4)",
            params![eui.0 as i64, kind, settings, now_ms],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    fn request_outcome(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT outcome FROM requests WHERE id = ?1", params![id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()?
            .flatten())
    }

    fn retire(&mut self, eui: Eui, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE devices SET status = 'retired', updated_ms = ?2 WHERE eui = ?1 AND status = 'active'",
            params![eui.0 as i64, now_ms],
        )?;
        Ok(n == 1)
    }

    fn rekey(&mut self, eui: Eui, key: &DeviceKey, now_ms: i64) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE devices SET key = ?2, updated_ms = ?3 WHERE eui = ?1 AND status = 'active'",
            params![eui.0 as i64, self.keys.seal_key(eui, key.expose_bytes())?, now_ms],
        )?;
        // Counters are per key (SPEC §4): the new key starts a new counter space.
        if n == 1 {
            tx.execute("DELETE FROM counters WHERE eui = ?1", [eui.0 as i64])?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    fn relocate(&mut self, eui: Eui, lat: f64, lon: f64, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE devices SET lat = ?2, lon = ?3, updated_ms = ?4 WHERE eui = ?1",
            params![eui.0 as i64, lat, lon, now_ms],
        )?;
        Ok(n == 1)
    }

    fn replace(
        &mut self,
        old: Eui,
        new: Eui,
        key: &DeviceKey,
        mqtt_password: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let copied = tx.execute(
            "INSERT INTO devices (eui, eui_hex, kind, key, mqtt_password, lat, lon, component_code,
                minor_class, grid_code, well_depth_mm, warn_mm, alarm_mm, status, updated_ms)
             SELECT ?2, ?3, kind, ?4, ?5, lat, lon, component_code, minor_class, grid_code,
                well_depth_mm, warn_mm, alarm_mm, 'active', ?6
             FROM devices WHERE eui = ?1 AND status = 'active'",
            params![
                old.0 as i64,
                new.0 as i64,
                new.to_string(),
                self.keys.seal_key(new, key.expose_bytes())?,
                self.keys.seal_password(new, mqtt_password)?,
                now_ms
            ],
        )?;
        if copied == 1 {
            tx.execute(
                "UPDATE devices SET status = 'replaced', replaced_by = ?2, updated_ms = ?3 WHERE eui = ?1",
                params![old.0 as i64, new.0 as i64, now_ms],
            )?;
        }
        tx.commit()?;
        Ok(copied == 1)
    }

    fn device_status(&self, eui: Eui) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT status FROM devices WHERE eui = ?1", params![eui.0 as i64], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn credentials(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT eui, eui_hex, mqtt_password FROM devices WHERE status = 'active' ORDER BY eui",
        )?;
        let rows: Vec<(i64, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(eui, hex, sealed)| Ok((hex, self.keys.open_password(Eui(eui as u64), &sealed)?)))
            .collect()
    }
}
