//! What ingest needs: the batch commit, the restore of the core at start-up, and what it polls (operators' requests, registry changes, finished cases, retention).

use gridsense_protocol::Eui;
use rusqlite::params;

use super::{ops::*, *};
use crate::{
    cases::{OpenIncident, Sequences, Site},
    rules::{Attributes, RuleState, Severity},
};

/// What ingest needs: the batch commit, the restore of the core at start-up, and what it polls (operators' requests, registry changes, finished cases, retention).
pub trait IngestStore: Maintenance + Send {
    /// Active devices with their keys.
    fn registry(&self) -> Result<Vec<Registered>, StoreError>;

    /// Requests not finished, with ids above `after`, oldest first.
    fn open_requests(&self, after: i64) -> Result<Vec<(Eui, Pending)>, StoreError>;

    /// Persisted next downlink counters.
    fn downlink_counters(&self) -> Result<Vec<(Eui, u32)>, StoreError>;

    /// The last registry change's position (to watch from).
    fn registry_position(&self) -> Result<i64, StoreError>;

    /// Devices changed after position `after`, as they are now: active ones with their key,
    /// site and rule attributes; others (retired, replaced) without. Returns the new position.
    fn registry_changes(&self, after: i64) -> Result<(i64, Vec<RegistryChange>), StoreError>;

    /// Wakes `wake` when the registry changes, where the backend can tell across processes
    /// (PostgreSQL: `LISTEN`); the reader still reads the change feed by position, and still
    /// polls: a wake is only a cue to look sooner. False when the backend cannot (SQLite).
    fn wake_on_registry_changes(
        &self,
        wake: std::sync::Weak<tokio::sync::Notify>,
    ) -> Result<bool, StoreError> {
        let _ = wake;
        Ok(false)
    }

    /// Positions of active devices, for placing them in grids.
    fn locations(&self) -> Result<Vec<(Eui, f64, f64)>, StoreError>;

    /// Persisted counter windows.
    fn counters(&self) -> Result<Vec<(Eui, CounterWindow)>, StoreError>;

    /// [`Store::health`] one at a time, for loading a million without holding them all.
    fn each_health(&self, f: &mut dyn FnMut(Eui, DeviceHealth)) -> Result<(), StoreError>;

    /// Writes a batch in one transaction.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;

    /// Removes stored telemetry older than `before_ms` at `now_ms`; returns how many rows
    /// went. SQLite deletes the rows; PostgreSQL drops whole day partitions (retention rounds
    /// up to a day) and makes the coming days' partitions.
    fn prune_telemetry(&mut self, before_ms: i64, now_ms: i64) -> Result<u64, StoreError>;

    /// Registered devices as the rules and cases see them (site, kind and rule attributes),
    /// one at a time, for loading a million without holding them all.
    fn each_site(&self, f: &mut dyn FnMut(Eui, Site, Attributes)) -> Result<(), StoreError>;

    /// Persisted rule states.
    fn rule_states(&self) -> Result<Vec<(Eui, String, RuleState)>, StoreError>;

    /// [`Store::rule_states`] one at a time; the first row that does not parse is the error.
    fn each_rule_state(&self, f: &mut dyn FnMut(Eui, &str, RuleState)) -> Result<(), StoreError>;

    /// The highest ids used, to continue from.
    fn sequences(&self) -> Result<Sequences, StoreError>;

    /// Incidents not closed, for the core after a restart.
    fn open_incidents(&self) -> Result<crate::cases::OpenIncidents, StoreError>;

    /// Lifecycle entries that finished a case (closed or voided) after entry `after`: (entry,
    /// case). The ingest task polls this to release the cases' incidents.
    fn finished_cases(&self, after: i64) -> Result<Vec<(i64, i64)>, StoreError>;

    /// The last lifecycle entry id (to poll from).
    fn last_case_event(&self) -> Result<i64, StoreError>;

    /// Records where each device was placed (replacing earlier placements).
    fn write_placements(
        &mut self,
        placements: &mut dyn Iterator<Item = Placement<'_>>,
    ) -> Result<(), StoreError>;

    /// The store's number of shards: `configured`, recorded when the store has none yet;
    /// [`StoreError::Shards`] when it was made with another (a device's shard would change).
    fn fix_shards(&self, configured: u16) -> Result<u16, StoreError>;
}

impl IngestStore for Store {
    fn registry(&self) -> Result<Vec<Registered>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT eui, kind, key FROM devices WHERE status = 'active'")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, Vec<u8>>(2)?))
        })?;
        rows.map(|row| {
            let (eui, kind, key) = row?;
            let kind = kind_named(&kind, "devices")?;
            let eui = Eui(eui as u64);
            let key = self.keys.open_key(eui, &key)?;
            Ok(Registered { eui, kind, key: DeviceKey::from_bytes(key) })
        })
        .collect()
    }

    fn open_requests(&self, after: i64) -> Result<Vec<(Eui, Pending)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, eui, kind, settings, counter, sent_ms, attempts FROM requests
             WHERE done_ms IS NULL AND id > ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![after], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<u32>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, u32>(6)?,
            ))
        })?;
        rows.map(|row| {
            let (id, eui, kind, settings, counter, sent_ms, attempts) = row?;
            let request = request_from(&kind, &settings)?;
            Ok((Eui(eui as u64), Pending { id, request, counter, sent_ms, attempts }))
        })
        .collect()
    }

    fn downlink_counters(&self) -> Result<Vec<(Eui, u32)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT eui, next FROM downlink_counters")?;
        Ok(stmt
            .query_map([], |r| Ok((Eui(r.get::<_, i64>(0)? as u64), r.get(1)?)))?
            .collect::<Result<_, _>>()?)
    }

    fn registry_position(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM registry_log", [], |r| r.get(0))?)
    }

    fn registry_changes(&self, after: i64) -> Result<(i64, Vec<RegistryChange>), StoreError> {
        let position = self.registry_position()?;
        if position <= after {
            return Ok((after, Vec::new()));
        }
        let mut stmt = self.conn.prepare(
            "SELECT d.eui, d.status, d.key FROM devices d
             WHERE d.eui IN (SELECT DISTINCT eui FROM registry_log WHERE id > ?1)",
        )?;
        let rows: Vec<(i64, String, Vec<u8>)> = stmt
            .query_map([after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let sites: std::collections::HashMap<Eui, (Site, Attributes)> =
            self.changed_sites(after)?.into_iter().map(|(e, s, a)| (e, (s, a))).collect();
        let mut out = Vec::with_capacity(rows.len());
        for (eui, status, key) in rows {
            let eui = Eui(eui as u64);
            let active = status == "active";
            // A key that does not open is an error, not a retirement.
            let key = if active { Some(self.keys.open_key(eui, &key)?) } else { None };
            match (active, key, sites.get(&eui)) {
                (true, Some(key), Some((site, attrs))) => out.push(RegistryChange {
                    eui,
                    active: Some((DeviceKey::from_bytes(key), site.clone(), *attrs)),
                }),
                _ => out.push(RegistryChange { eui, active: None }),
            }
        }
        Ok((position, out))
    }

    fn locations(&self) -> Result<Vec<(Eui, f64, f64)>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT eui, lat, lon FROM devices WHERE status = 'active'")?;
        Ok(stmt
            .query_map([], |r| Ok((Eui(r.get::<_, i64>(0)? as u64), r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?)
    }

    fn counters(&self) -> Result<Vec<(Eui, CounterWindow)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT eui, highest, seen FROM counters")?;
        let rows = stmt.query_map([], |row| {
            let highest: Option<i64> = row.get(1)?;
            Ok((
                Eui(row.get::<_, i64>(0)? as u64),
                CounterWindow::from_parts(
                    highest.and_then(|h| u32::try_from(h).ok()),
                    row.get::<_, i64>(2)? as u64,
                ),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn each_health(&self, f: &mut dyn FnMut(Eui, DeviceHealth)) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT eui, kind, last_seen_ms, last_counter, battery_mv, rssi_dbm, temperature_dc, firmware,
                    uptime_s, frames, rejects, skipped, online, low_battery, deadline_ms FROM health",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let health = DeviceHealth {
                kind: kind_column(row, 1, "health")?,
                last_seen_ms: row.get(2)?,
                last_counter: row.get(3)?,
                battery_mv: row.get(4)?,
                rssi_dbm: row.get(5)?,
                temperature_dc: row.get(6)?,
                firmware: row.get(7)?,
                uptime_s: row.get(8)?,
                frames: row.get::<_, i64>(9)? as u64,
                rejects: row.get::<_, i64>(10)? as u64,
                skipped: row.get::<_, i64>(11)? as u64,
                online: row.get(12)?,
                low_battery: row.get(13)?,
                deadline_ms: row.get(14)?,
            };
            f(Eui(row.get::<_, i64>(0)? as u64), health);
        }
        Ok(())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let _turn = self.turns.wait();
        let tx = self.conn.transaction()?;
        {
            let mut counters = tx.prepare_cached(
                "INSERT INTO counters (eui, highest, seen) VALUES (?1, ?2, ?3)
                 ON CONFLICT (eui) DO UPDATE SET highest = ?2, seen = ?3",
            )?;
            for (eui, w) in &batch.counters {
                counters.execute(params![eui.0 as i64, w.highest(), w.seen_bits() as i64])?;
            }
            let mut health = tx.prepare_cached(
                "INSERT INTO health (eui, kind, last_seen_ms, last_counter, battery_mv, rssi_dbm,
                    temperature_dc, firmware, uptime_s, frames, rejects, skipped, online, low_battery, deadline_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT (eui) DO UPDATE SET kind = ?2, last_seen_ms = ?3, last_counter = ?4,
                    battery_mv = ?5, rssi_dbm = ?6, temperature_dc = ?7, firmware = ?8, uptime_s = ?9,
                    frames = ?10, rejects = ?11, skipped = ?12, online = ?13, low_battery = ?14,
                    deadline_ms = ?15",
            )?;
            for (eui, h) in &batch.health {
                health.execute(params![
                    eui.0 as i64,
                    h.kind.as_str(),
                    h.last_seen_ms,
                    h.last_counter,
                    h.battery_mv,
                    h.rssi_dbm,
                    h.temperature_dc,
                    h.firmware,
                    h.uptime_s,
                    i(h.frames),
                    i(h.rejects),
                    i(h.skipped),
                    h.online,
                    h.low_battery,
                    h.deadline_ms
                ])?;
            }
            // Each device's new recent telemetry frames, newest first, go in front of its
            // stored list, which keeps the newest RECENT_FRAME_SLOTS. Sorted by device (newest
            // first within one, the sort being stable) into one reused buffer.
            let mut recent: Vec<&RecentFrame> = batch.recent.iter().collect();
            recent.reverse();
            recent.sort_by_key(|r| r.eui);
            let mut lists = tx.prepare_cached(
                "INSERT INTO recent_frames (eui, list) VALUES (?1, substr(?2, 1, ?3))
                 ON CONFLICT (eui) DO UPDATE SET list = substr(?2 || list, 1, ?3)",
            )?;
            let keep = i64::try_from(RECENT_FRAME_SLOTS * RECENT_ENTRY_HEX).unwrap_or(i64::MAX);
            let mut entries = String::new();
            for group in recent.chunk_by(|a, b| a.eui == b.eui) {
                entries.clear();
                for r in group {
                    write_recent_hex(r, &mut entries);
                }
                if let Some(first) = group.first() {
                    lists.execute(params![first.eui.0 as i64, entries, keep])?;
                }
            }
            let mut events = tx.prepare_cached(
                "INSERT INTO health_events (eui, at_ms, event) VALUES (?1, ?2, ?3)",
            )?;
            for e in &batch.events {
                events.execute(params![e.eui.0 as i64, e.at_ms, e.kind.as_str()])?;
            }
            let mut messages = tx.prepare_cached(
                "INSERT OR IGNORE INTO messages (eui, counter, received_ms, kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for m in &batch.messages {
                messages.execute(params![
                    m.eui.0 as i64,
                    m.counter,
                    m.received_ms,
                    m.kind,
                    // The trace's form of a message: SPEC.md §11's JSON notation.
                    serde_json::to_string(&m.message).unwrap_or_default()
                ])?;
            }
            if let Some(max) = self.buffer_max {
                let mut buffer = tx.prepare_cached(
                    "INSERT INTO telemetry_buffer (eui, kind, measurement, field, at_ms, value, grid_code, street_code)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for p in &batch.telemetry {
                    let kind = p.kind.as_str();
                    buffer.execute(params![
                        p.eui.0 as i64,
                        kind,
                        p.measurement,
                        p.field,
                        p.at_ms,
                        p.value,
                        p.grid.as_deref(),
                        p.street.as_deref()
                    ])?;
                }
                if !batch.telemetry.is_empty() {
                    // Full: the oldest points go, counted. Rows leave only from the head, so
                    // the id range is the count.
                    let dropped = tx.execute(
                        "DELETE FROM telemetry_buffer WHERE id <= (SELECT MAX(id) FROM telemetry_buffer) - ?1",
                        params![i(max)],
                    )?;
                    if dropped > 0 {
                        tx.execute(
                            "INSERT INTO stats (name, value) VALUES ('telemetry_dropped', ?1)
                             ON CONFLICT (name) DO UPDATE SET value = value + ?1",
                            params![dropped as i64],
                        )?;
                    }
                }
            } else {
                // Explicit sample times: a replayed point overwrites itself.
                let mut telemetry = tx.prepare_cached(
                    "INSERT INTO telemetry (eui, measurement, field, at_ms, value, grid_code)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (eui, measurement, field, at_ms) DO UPDATE SET value = ?5, grid_code = ?6",
                )?;
                for p in &batch.telemetry {
                    telemetry.execute(params![
                        p.eui.0 as i64,
                        p.measurement,
                        p.field,
                        p.at_ms,
                        p.value,
                        p.grid.as_deref()
                    ])?;
                }
            }
            let mut audit = tx.prepare_cached(
                "INSERT INTO audit (received_ms, topic, reason, eui, raw) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for a in &batch.audit {
                audit.execute(params![
                    a.received_ms,
                    a.topic,
                    a.reason,
                    a.eui.map(|e| e.0 as i64),
                    a.raw
                ])?;
            }
            if !batch.audit.is_empty() {
                tx.execute(
                    "DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?1",
                    params![i(self.audit_max)],
                )?;
            }
            let mut rejects = tx.prepare_cached(
                "INSERT INTO reject_counts (reason, count) VALUES (?1, ?2)
                 ON CONFLICT (reason) DO UPDATE SET count = count + ?2",
            )?;
            for (reason, n) in &batch.rejects {
                rejects.execute(params![reason, i(*n)])?;
            }
            let mut counters = tx.prepare_cached(
                "INSERT INTO downlink_counters (eui, next) VALUES (?1, ?2)
                 ON CONFLICT (eui) DO UPDATE SET next = MAX(next, ?2)",
            )?;
            for (eui, next) in &batch.downlink_counters {
                counters.execute(params![eui.0 as i64, next])?;
            }
            for update in &batch.request_updates {
                match update {
                    RequestUpdate::Sent { id, counter, at_ms, attempts } => tx.execute(
                        "UPDATE requests SET counter = ?2, sent_ms = ?3, attempts = ?4 WHERE id = ?1",
                        params![id, counter, at_ms, attempts],
                    )?,
                    RequestUpdate::Done { id, at_ms, outcome } => tx.execute(
                        "UPDATE requests SET done_ms = ?2, outcome = ?3 WHERE id = ?1",
                        params![id, at_ms, outcome],
                    )?,
                };
            }
            cases::write(&tx, &batch.rule_states, &batch.cases)?;
            write(&tx, &batch.fixes)?;
            if batch.accepted > 0 {
                tx.execute(
                    "INSERT INTO stats (name, value) VALUES ('accepted', ?1)
                     ON CONFLICT (name) DO UPDATE SET value = value + ?1",
                    params![i(batch.accepted)],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn prune_telemetry(&mut self, before_ms: i64, _now_ms: i64) -> Result<u64, StoreError> {
        Ok(self.conn.execute("DELETE FROM telemetry WHERE at_ms < ?1", params![before_ms])? as u64)
    }

    fn each_site(&self, f: &mut dyn FnMut(Eui, Site, Attributes)) -> Result<(), StoreError> {
        self.sites_where("", i64::MAX, f)
    }

    fn rule_states(&self) -> Result<Vec<(Eui, String, RuleState)>, StoreError> {
        let mut out = Vec::new();
        self.each_rule_state(&mut |eui, rule, state| out.push((eui, rule.to_owned(), state)))?;
        Ok(out)
    }

    fn each_rule_state(&self, f: &mut dyn FnMut(Eui, &str, RuleState)) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare("SELECT eui, rule, state FROM rule_state")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let rule = r.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
            let json = r.get_ref(2)?.as_str().map_err(rusqlite::Error::from)?;
            let state = serde_json::from_str(json).map_err(|e| StoreError::BadRow {
                table: "rule_state",
                what: format!("{rule}: {e}"),
            })?;
            f(Eui(r.get::<_, i64>(0)? as u64), rule, state);
        }
        Ok(())
    }

    fn sequences(&self) -> Result<Sequences, StoreError> {
        let max = |table: &str, col: &str| -> Result<i64, StoreError> {
            Ok(self.conn.query_row(
                &format!("SELECT COALESCE(MAX({col}), 0) FROM {table}"),
                [],
                |r| r.get(0),
            )?)
        };
        Ok(Sequences {
            incident: max("incidents", "id")?,
            case: max("cases", "id")?,
            cluster: max("incidents", "cluster_id")?,
            alert: max("alerts", "id")?,
        })
    }

    fn open_incidents(&self) -> Result<crate::cases::OpenIncidents, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT eui, condition, id, severity, state, onset_ms, detected_ms, case_id, cluster_id, grid_code
             FROM incidents WHERE state != 'closed'",
        )?;
        let rows = stmt.query_map([], |r| {
            let severity: String = r.get(3)?;
            let state: String = r.get(4)?;
            Ok((
                (Eui(r.get::<_, i64>(0)? as u64), r.get::<_, String>(1)?),
                OpenIncident {
                    id: r.get(2)?,
                    severity: Severity::parse(&severity).unwrap_or_default(),
                    onset_ms: r.get(5)?,
                    detected_ms: r.get(6)?,
                    case_id: r.get(7)?,
                    recovered: state == "recovered",
                    maintenance: state == "maintenance",
                    cluster_id: r.get(8)?,
                    grid_code: r.get(9)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn finished_cases(&self, after: i64) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, case_id FROM case_events WHERE id > ?1 AND to_state IN ('closed', 'voided') ORDER BY id",
        )?;
        Ok(stmt.query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?)
    }

    fn last_case_event(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT COALESCE(MAX(id), 0) FROM case_events", [], |r| r.get(0))?)
    }

    fn write_placements(
        &mut self,
        placements: &mut dyn Iterator<Item = Placement<'_>>,
    ) -> Result<(), StoreError> {
        let rows: Vec<Placement<'_>> = placements.collect();
        let fingerprint = placements_fingerprint(&rows);
        let tx = self.conn.transaction()?;
        let stored: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM store_meta WHERE name = 'placements'", [], |r| r.get(0))
            .optional()?;
        if stored.as_ref() == Some(&fingerprint) {
            return Ok(());
        }
        tx.execute("DELETE FROM placements", [])?;
        {
            let mut put = tx.prepare(
                "INSERT INTO placements (eui, grid_code, community_code, street_code, distance_m) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (eui, grid, community, street, distance) in rows {
                put.execute(params![eui.0 as i64, grid, community, street, distance])?;
            }
        }
        tx.execute(
            "INSERT INTO store_meta (name, value) VALUES ('placements', ?1)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [fingerprint],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn fix_shards(&self, configured: u16) -> Result<u16, StoreError> {
        self.conn.execute(
            "INSERT INTO store_meta (name, value) VALUES ('shards', ?1) ON CONFLICT (name) DO NOTHING",
            [configured.to_be_bytes().to_vec()],
        )?;
        let stored: Vec<u8> =
            self.conn.query_row("SELECT value FROM store_meta WHERE name = 'shards'", [], |r| {
                r.get(0)
            })?;
        shards_agree(&stored, configured)
    }
}
