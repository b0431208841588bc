//! Ingest on PostgreSQL: a batch is one transaction of multi-row statements (`unnest` of one
//! array per column, prepared once per connection), a round trip per table the batch touches
//! rather than per row; the rare per-case effects are single rows. The restore reads what the
//! SQLite store's does.

use std::collections::{BTreeMap, HashMap};

use gridsense_protocol::{CounterWindow, DeviceKey};
use tokio_postgres::types::ToSql;

use super::{Conn, PgStore, e, eui, i, wait};
use crate::{
    cases::{OpenIncident, Sequences, Site},
    downlink::{Pending, RequestUpdate},
    health::DeviceHealth,
    registry::Registered,
    rules::{Attributes, RuleState, Severity},
    store::{
        Batch, IngestStore, Placement, RECENT_ENTRY_HEX, RECENT_FRAME_SLOTS, RecentFrame,
        RegistryChange, StoreError, write_recent_hex,
    },
};

const COUNTERS: &str = "INSERT INTO counters (eui, highest, seen)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])
    ON CONFLICT (eui) DO UPDATE SET highest = EXCLUDED.highest, seen = EXCLUDED.seen";
const HEALTH: &str = "INSERT INTO health (eui, kind, last_seen_ms, last_counter, battery_mv,
        rssi_dbm, temperature_dc, firmware, uptime_s, frames, rejects, skipped, online, low_battery, deadline_ms)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::int[], $6::int[],
        $7::int[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bool[],
        $14::bool[], $15::bigint[])
    ON CONFLICT (eui) DO UPDATE SET kind = EXCLUDED.kind, last_seen_ms = EXCLUDED.last_seen_ms,
        last_counter = EXCLUDED.last_counter, battery_mv = EXCLUDED.battery_mv,
        rssi_dbm = EXCLUDED.rssi_dbm, temperature_dc = EXCLUDED.temperature_dc,
        firmware = EXCLUDED.firmware, uptime_s = EXCLUDED.uptime_s, frames = EXCLUDED.frames,
        rejects = EXCLUDED.rejects, skipped = EXCLUDED.skipped, online = EXCLUDED.online,
        low_battery = EXCLUDED.low_battery, deadline_ms = EXCLUDED.deadline_ms";
const RECENT: &str = "INSERT INTO recent_frames (eui, list)
    SELECT u.eui, substr(u.list, 1, $3) FROM unnest($1::bigint[], $2::text[]) AS u (eui, list)
    ON CONFLICT (eui) DO UPDATE SET list = substr(EXCLUDED.list || recent_frames.list, 1, $3)";
const EVENTS: &str = "INSERT INTO health_events (eui, at_ms, event)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[])";
const MESSAGES: &str = "INSERT INTO messages (eui, counter, received_ms, kind, body)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[])
    ON CONFLICT DO NOTHING";
const BUFFER: &str = "INSERT INTO telemetry_buffer (eui, kind, measurement, field, at_ms, value, grid_code, street_code)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[],
        $6::float8[], $7::text[], $8::text[])";
const BUFFER_TRIM: &str =
    "DELETE FROM telemetry_buffer WHERE id <= (SELECT max(id) FROM telemetry_buffer) - $1";
const TELEMETRY: &str = "INSERT INTO telemetry (eui, measurement, field, at_ms, value, grid_code)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::float8[], $6::text[])
    ON CONFLICT (eui, measurement, field, at_ms) DO UPDATE SET value = EXCLUDED.value,
        grid_code = EXCLUDED.grid_code";
const AUDIT: &str = "INSERT INTO audit (received_ms, topic, reason, eui, raw)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bytea[])";
const AUDIT_TRIM: &str = "DELETE FROM audit WHERE id <= (SELECT max(id) FROM audit) - $1";
const REJECTS: &str = "INSERT INTO reject_counts (reason, count)
    SELECT * FROM unnest($1::text[], $2::bigint[])
    ON CONFLICT (reason) DO UPDATE SET count = reject_counts.count + EXCLUDED.count";
const DOWNLINK_COUNTERS: &str = "INSERT INTO downlink_counters (eui, next)
    SELECT * FROM unnest($1::bigint[], $2::bigint[])
    ON CONFLICT (eui) DO UPDATE SET next = GREATEST(downlink_counters.next, EXCLUDED.next)";
const BATCH_TOKEN: &str = "INSERT INTO committed_batches (token) VALUES ($1)";
const STAT_ADD: &str = "INSERT INTO stats (name, value) VALUES ($1, $2)
    ON CONFLICT (name) DO UPDATE SET value = stats.value + EXCLUDED.value";

/// A batch's health rows, column by column (for `unnest`).
#[derive(Default)]
struct HealthColumns<'a> {
    eui: Vec<i64>,
    kind: Vec<&'static str>,
    last_seen: Vec<Option<i64>>,
    last_counter: Vec<Option<i64>>,
    battery: Vec<Option<i32>>,
    rssi: Vec<Option<i32>>,
    temperature: Vec<Option<i32>>,
    firmware: Vec<Option<&'a str>>,
    uptime: Vec<Option<i64>>,
    frames: Vec<i64>,
    rejects: Vec<i64>,
    skipped: Vec<i64>,
    online: Vec<bool>,
    low_battery: Vec<bool>,
    deadline: Vec<Option<i64>>,
}

impl<'a> HealthColumns<'a> {
    fn of(health: &'a BTreeMap<gridsense_protocol::Eui, DeviceHealth>) -> Self {
        let mut c = HealthColumns::default();
        for (id, h) in health {
            c.eui.push(e(*id));
            c.kind.push(h.kind.as_str());
            c.last_seen.push(h.last_seen_ms);
            c.last_counter.push(h.last_counter.map(i64::from));
            c.battery.push(h.battery_mv.map(i32::from));
            c.rssi.push(h.rssi_dbm.map(i32::from));
            c.temperature.push(h.temperature_dc.map(i32::from));
            c.firmware.push(h.firmware.as_deref());
            c.uptime.push(h.uptime_s.map(i64::from));
            c.frames.push(i(h.frames));
            c.rejects.push(i(h.rejects));
            c.skipped.push(i(h.skipped));
            c.online.push(h.online);
            c.low_battery.push(h.low_battery);
            c.deadline.push(h.deadline_ms);
        }
        c
    }
}

/// A batch's telemetry points, column by column.
#[derive(Default)]
struct PointColumns<'a> {
    eui: Vec<i64>,
    kind: Vec<&'static str>,
    measurement: Vec<&'static str>,
    field: Vec<&'static str>,
    at: Vec<i64>,
    value: Vec<f64>,
    grid: Vec<Option<&'a str>>,
    street: Vec<Option<&'a str>>,
}

/// Everything of a batch that goes in multi-row statements, column by column.
#[derive(Default)]
struct Columns<'a> {
    counter_eui: Vec<i64>,
    counter_highest: Vec<Option<i64>>,
    counter_seen: Vec<i64>,
    health: HealthColumns<'a>,
    recent_eui: Vec<i64>,
    recent_list: Vec<String>,
    event_eui: Vec<i64>,
    event_at: Vec<i64>,
    event_kind: Vec<&'static str>,
    message_eui: Vec<i64>,
    message_counter: Vec<i64>,
    message_at: Vec<i64>,
    message_kind: Vec<&'static str>,
    message_body: Vec<String>,
    telemetry: PointColumns<'a>,
    audit_at: Vec<i64>,
    audit_topic: Vec<&'a str>,
    audit_reason: Vec<&'static str>,
    audit_eui: Vec<Option<i64>>,
    audit_raw: Vec<&'a [u8]>,
    reject_reason: Vec<&'static str>,
    reject_count: Vec<i64>,
    downlink_eui: Vec<i64>,
    downlink_next: Vec<i64>,
}

impl<'a> Columns<'a> {
    /// `buffered`: every point goes to the sink's buffer; otherwise the telemetry table, where
    /// a point replayed within the batch is written once, with its last value (one statement
    /// may not update a row twice).
    fn of(batch: &'a Batch, buffered: bool) -> Self {
        let mut c = Columns { health: HealthColumns::of(&batch.health), ..Columns::default() };
        for (id, w) in &batch.counters {
            c.counter_eui.push(e(*id));
            c.counter_highest.push(w.highest().map(i64::from));
            c.counter_seen.push(w.seen_bits() as i64);
        }
        // As in SQLite: each device's new entries, newest first, in front of its list.
        let mut sorted: Vec<&RecentFrame> = batch.recent.iter().collect();
        sorted.reverse();
        sorted.sort_by_key(|r| r.eui);
        for group in sorted.chunk_by(|a, b| a.eui == b.eui) {
            let mut entries = String::new();
            for r in group {
                write_recent_hex(r, &mut entries);
            }
            if let Some(first) = group.first() {
                c.recent_eui.push(e(first.eui));
                c.recent_list.push(entries);
            }
        }
        for v in &batch.events {
            c.event_eui.push(e(v.eui));
            c.event_at.push(v.at_ms);
            c.event_kind.push(v.kind.as_str());
        }
        for m in &batch.messages {
            c.message_eui.push(e(m.eui));
            c.message_counter.push(i64::from(m.counter));
            c.message_at.push(m.received_ms);
            c.message_kind.push(m.kind);
            // The trace's form of a message: SPEC.md §11's JSON notation.
            c.message_body.push(serde_json::to_string(&m.message).unwrap_or_default());
        }
        let points: Vec<&crate::store::Point> = if buffered {
            batch.telemetry.iter().collect()
        } else {
            let mut last: HashMap<(i64, &str, &str, i64), usize> = HashMap::new();
            for (n, p) in batch.telemetry.iter().enumerate() {
                last.insert((e(p.eui), p.measurement, p.field, p.at_ms), n);
            }
            let mut rows: Vec<usize> = last.into_values().collect();
            rows.sort_unstable();
            rows.iter().filter_map(|&n| batch.telemetry.get(n)).collect()
        };
        for p in points {
            let t = &mut c.telemetry;
            t.eui.push(e(p.eui));
            t.kind.push(p.kind.as_str());
            t.measurement.push(p.measurement);
            t.field.push(p.field);
            t.at.push(p.at_ms);
            t.value.push(p.value);
            t.grid.push(p.grid.as_deref());
            t.street.push(p.street.as_deref());
        }
        for r in &batch.audit {
            c.audit_at.push(r.received_ms);
            c.audit_topic.push(&r.topic);
            c.audit_reason.push(r.reason);
            c.audit_eui.push(r.eui.map(e));
            c.audit_raw.push(&r.raw);
        }
        for (reason, n) in &batch.rejects {
            c.reject_reason.push(reason);
            c.reject_count.push(i(*n));
        }
        for (id, next) in &batch.downlink_counters {
            c.downlink_eui.push(e(*id));
            c.downlink_next.push(i64::from(*next));
        }
        c
    }
}

impl PgStore {
    /// Writes a batch in one transaction whose bulk statements are pipelined: BEGIN and every
    /// multi-row statement go out together and their answers come back together — one round
    /// trip instead of one per table (a round trip costs a scheduling of three processes,
    /// milliseconds on a loaded machine). The rare per-row writes (cases, requests, fixes)
    /// follow, then COMMIT. A failure anywhere rolls the transaction back.
    fn commit_in(&self, c: &mut Conn, batch: &Batch, token: i64) -> Result<(), StoreError> {
        let s = |c: &mut Conn, sql| c.statement(sql);
        let (counters, health, recent, events, messages) =
            (s(c, COUNTERS)?, s(c, HEALTH)?, s(c, RECENT)?, s(c, EVENTS)?, s(c, MESSAGES)?);
        let (buffer, buffer_trim, telemetry, audit, audit_trim) =
            (s(c, BUFFER)?, s(c, BUFFER_TRIM)?, s(c, TELEMETRY)?, s(c, AUDIT)?, s(c, AUDIT_TRIM)?);
        let (rejects, downlink_counters, stat_add, batch_token) =
            (s(c, REJECTS)?, s(c, DOWNLINK_COUNTERS)?, s(c, STAT_ADD)?, s(c, BATCH_TOKEN)?);
        // The fence's statement and its columns: shards, epochs.
        let fence = match &batch.fence {
            Some(f) => Some((
                s(c, super::leases::FENCE)?,
                f.held.iter().map(|(s, _)| i32::from(*s)).collect::<Vec<i32>>(),
                f.held.iter().map(|(_, e)| *e).collect::<Vec<i64>>(),
            )),
            None => None,
        };
        let cols = Columns::of(batch, self.buffer_max.is_some());
        let keep = i32::try_from(RECENT_FRAME_SLOTS * RECENT_ENTRY_HEX).unwrap_or(i32::MAX);
        let (audit_max, buffer_max) = (i(self.audit_max), self.buffer_max.map(i));
        let accepted = i(batch.accepted);
        let result = (|| -> Result<(), StoreError> {
            type Pending<'a> =
                std::pin::Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + 'a>>;
            let client: &tokio_postgres::Client = c;
            let mut bulk: Vec<Pending<'_>> =
                vec![Box::pin(async { client.batch_execute("BEGIN").await.map(|()| 0) })];
            macro_rules! run {
                ($stmt:expr, vec![$($p:expr),* $(,)?]) => {{
                    let params: Vec<&(dyn ToSql + Sync)> = vec![$($p),*];
                    let stmt = &$stmt;
                    bulk.push(Box::pin(async move { client.execute(stmt, &params).await }));
                }};
            }
            let h = &cols.health;
            if !cols.counter_eui.is_empty() {
                run!(counters, vec![&cols.counter_eui, &cols.counter_highest, &cols.counter_seen]);
            }
            if !h.eui.is_empty() {
                run!(
                    health,
                    vec![
                        &h.eui,
                        &h.kind,
                        &h.last_seen,
                        &h.last_counter,
                        &h.battery,
                        &h.rssi,
                        &h.temperature,
                        &h.firmware,
                        &h.uptime,
                        &h.frames,
                        &h.rejects,
                        &h.skipped,
                        &h.online,
                        &h.low_battery,
                        &h.deadline,
                    ]
                );
            }
            if !cols.recent_eui.is_empty() {
                run!(recent, vec![&cols.recent_eui, &cols.recent_list, &keep]);
            }
            if !cols.event_eui.is_empty() {
                run!(events, vec![&cols.event_eui, &cols.event_at, &cols.event_kind]);
            }
            if !cols.message_eui.is_empty() {
                run!(
                    messages,
                    vec![
                        &cols.message_eui,
                        &cols.message_counter,
                        &cols.message_at,
                        &cols.message_kind,
                        &cols.message_body,
                    ]
                );
            }
            let t = &cols.telemetry;
            if !t.eui.is_empty() {
                match &buffer_max {
                    Some(max) => {
                        run!(
                            buffer,
                            vec![
                                &t.eui,
                                &t.kind,
                                &t.measurement,
                                &t.field,
                                &t.at,
                                &t.value,
                                &t.grid,
                                &t.street,
                            ]
                        );
                        // Full: the oldest points go (rows leave from the head only).
                        run!(buffer_trim, vec![max]);
                    }
                    None => run!(
                        telemetry,
                        vec![&t.eui, &t.measurement, &t.field, &t.at, &t.value, &t.grid,]
                    ),
                }
            }
            if !cols.audit_at.is_empty() {
                run!(
                    audit,
                    vec![
                        &cols.audit_at,
                        &cols.audit_topic,
                        &cols.audit_reason,
                        &cols.audit_eui,
                        &cols.audit_raw,
                    ]
                );
                run!(audit_trim, vec![&audit_max]);
            }
            if !cols.reject_reason.is_empty() {
                run!(rejects, vec![&cols.reject_reason, &cols.reject_count]);
            }
            if !cols.downlink_eui.is_empty() {
                run!(downlink_counters, vec![&cols.downlink_eui, &cols.downlink_next]);
            }
            if batch.accepted > 0 {
                run!(stat_add, vec![&"accepted", &accepted]);
            }
            run!(batch_token, vec![&token]);
            // Last in the pipeline, still before COMMIT: the shards' leases at the batch's
            // epochs, locked until the transaction ends (a claim waits for it; a claim that
            // came first leaves fewer rows, and the batch is refused and rolled back).
            if let (Some(f), Some((stmt, shards, epochs))) = (&batch.fence, &fence) {
                run!(*stmt, vec![&f.instance, shards, epochs]);
            }
            let counts = wait(futures::future::try_join_all(bulk))?;
            if let Some(f) = &batch.fence {
                let held = counts.last().copied().unwrap_or(0);
                let wanted = f.held.len() as u64;
                if held != wanted {
                    return Err(StoreError::Fenced {
                        instance: f.instance.clone(),
                        lost: wanted - held.min(wanted),
                    });
                }
            }
            if buffer_max.is_some() && !t.eui.is_empty() {
                // The trim's count: the position of its statement among the answers.
                let trim_at = 1
                    + usize::from(!cols.counter_eui.is_empty())
                    + usize::from(!h.eui.is_empty())
                    + usize::from(!cols.recent_eui.is_empty())
                    + usize::from(!cols.event_eui.is_empty())
                    + usize::from(!cols.message_eui.is_empty())
                    + 1;
                let dropped = counts.get(trim_at).copied().unwrap_or(0);
                if dropped > 0 {
                    wait(client.execute(&stat_add, &[&"telemetry_dropped", &(dropped as i64)]))?;
                }
            }
            for update in &batch.request_updates {
                match update {
                    RequestUpdate::Sent { id, counter, at_ms, attempts } => wait(client.execute(
                        "UPDATE requests SET counter = $2, sent_ms = $3, attempts = $4 WHERE id = $1",
                        &[id, &i64::from(*counter), at_ms, &i64::from(*attempts)],
                    ))?,
                    RequestUpdate::Done { id, at_ms, outcome } => wait(client.execute(
                        "UPDATE requests SET done_ms = $2, outcome = $3 WHERE id = $1",
                        &[id, at_ms, outcome],
                    ))?,
                };
            }
            super::simple::write_case_effects(client, &batch.rule_states, &batch.cases)?;
            for (id, (lat, lon, at, grid)) in &batch.fixes {
                wait(client.execute(
                    "INSERT INTO beacon_fix (eui, lat, lon, at_ms, grid_code) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (eui) DO UPDATE SET lat = EXCLUDED.lat, lon = EXCLUDED.lon,
                        at_ms = EXCLUDED.at_ms, grid_code = EXCLUDED.grid_code
                     WHERE EXCLUDED.at_ms >= beacon_fix.at_ms",
                    &[&e(*id), lat, lon, at, grid],
                ))?;
            }
            let n = self.commits.get().wrapping_add(1);
            self.commits.set(n);
            if n.is_multiple_of(1_000) {
                // Kept an hour: far longer than any retry of a batch waits.
                wait(client.execute(
                    "DELETE FROM committed_batches WHERE committed_at < now() - interval '1 hour'",
                    &[],
                ))?;
            }
            // COMMIT of a transaction that failed answers ROLLBACK, not an error: every
            // statement's answer was checked above.
            wait(client.batch_execute("COMMIT"))?;
            Ok(())
        })();
        if result.is_err() && !c.is_closed() {
            // Best effort: a dead connection is made again on the next call anyway.
            let _ = wait(c.batch_execute("ROLLBACK"));
        }
        result
    }

    /// Active devices' sites (`after`: only those changed after that registry position).
    fn sites(
        &self,
        after: Option<i64>,
        f: &mut dyn FnMut(gridsense_protocol::Eui, Site, Attributes),
    ) -> Result<(), StoreError> {
        let base = "SELECT eui, kind, lat, lon, component_code, minor_class, warn_mm, alarm_mm, well_depth_mm
                    FROM devices WHERE status = 'active'";
        let (sql, a);
        let params: &[&(dyn ToSql + Sync)] = match after {
            None => {
                sql = base.to_owned();
                &[]
            }
            Some(after) => {
                sql = format!(
                    "{base} AND eui IN (SELECT DISTINCT eui FROM registry_log WHERE id > $1)"
                );
                a = after;
                &[&a]
            }
        };
        self.each_row(&sql, params, &mut |r| {
            let kind: String = r.get(1);
            let kind = crate::store::kind_named(&kind, "devices")?;
            let level = |n: usize| r.get::<_, Option<i32>>(n).map(f64::from);
            let site = Site {
                kind,
                lat: r.get(2),
                lon: r.get(3),
                object_code: r.get(4),
                minor_class: r.get(5),
            };
            let attrs =
                Attributes { warn_mm: level(6), alarm_mm: level(7), well_depth_mm: level(8) };
            f(eui(r.get(0)), site, attrs);
            Ok(())
        })
    }
}

impl IngestStore for PgStore {
    fn registry(&self) -> Result<Vec<Registered>, StoreError> {
        let mut out = Vec::new();
        self.each_row(
            "SELECT eui, kind, key FROM devices WHERE status = 'active'",
            &[],
            &mut |r| {
                let id = eui(r.get(0));
                let kind: String = r.get(1);
                let kind = crate::store::kind_named(&kind, "devices")?;
                let key = self.keys.open_key(id, r.get(2))?;
                out.push(Registered { eui: id, kind, key: DeviceKey::from_bytes(key) });
                Ok(())
            },
        )?;
        Ok(out)
    }

    fn open_requests(
        &self,
        after: i64,
    ) -> Result<Vec<(gridsense_protocol::Eui, Pending)>, StoreError> {
        let rows = self.with(|c| {
            Ok(wait(c.query(
                "SELECT id, eui, kind, settings, counter, sent_ms, attempts FROM requests
                 WHERE done_ms IS NULL AND id > $1 ORDER BY id",
                &[&after],
            ))?)
        })?;
        rows.iter()
            .map(|r| {
                let kind: String = r.get(2);
                let settings: String = r.get(3);
                let request = crate::store::request_from(&kind, &settings)?;
                let counter = r.get::<_, Option<i64>>(4).and_then(|v| u32::try_from(v).ok());
                let attempts = u32::try_from(r.get::<_, i64>(6)).unwrap_or(u32::MAX);
                Ok((
                    eui(r.get(1)),
                    Pending { id: r.get(0), request, counter, sent_ms: r.get(5), attempts },
                ))
            })
            .collect()
    }

    fn downlink_counters(&self) -> Result<Vec<(gridsense_protocol::Eui, u32)>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query("SELECT eui, next FROM downlink_counters", &[]))?
                .iter()
                .map(|r| (eui(r.get(0)), u32::try_from(r.get::<_, i64>(1)).unwrap_or(u32::MAX)))
                .collect())
        })
    }

    fn registry_position(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_one("SELECT COALESCE(max(id), 0) FROM registry_log", &[]))?.get(0))
        })
    }

    fn fix_shards(&self, configured: u16) -> Result<u16, StoreError> {
        let stored: Vec<u8> = self.with(|c| {
            wait(c.execute(
                "INSERT INTO store_meta (name, value) VALUES ('shards', $1) ON CONFLICT (name) DO NOTHING",
                &[&configured.to_be_bytes().to_vec()],
            ))?;
            Ok(wait(c.query_one("SELECT value FROM store_meta WHERE name = 'shards'", &[]))?.get(0))
        })?;
        let shards = super::super::shards_agree(&stored, configured)?;
        // A lease row per shard of the store's number, free until claimed.
        self.with(|c| {
            wait(c.execute(
                "INSERT INTO shard_leases (shard) SELECT generate_series(0, $1 - 1)
                 ON CONFLICT (shard) DO NOTHING",
                &[&i32::from(shards)],
            ))?;
            Ok(())
        })?;
        Ok(shards)
    }

    fn wake_on_registry_changes(
        &self,
        wake: std::sync::Weak<tokio::sync::Notify>,
    ) -> Result<bool, StoreError> {
        self.listen_registry(wake).map(|()| true)
    }

    fn registry_changes(&self, after: i64) -> Result<(i64, Vec<RegistryChange>), StoreError> {
        let position = self.registry_position()?;
        if position <= after {
            return Ok((after, Vec::new()));
        }
        let rows = self.with(|c| {
            Ok(wait(c.query(
                "SELECT eui, status, key FROM devices
                 WHERE eui IN (SELECT DISTINCT eui FROM registry_log WHERE id > $1 AND id <= $2)",
                &[&after, &position],
            ))?)
        })?;
        let mut sites = HashMap::new();
        self.sites(Some(after), &mut |id, site, attrs| {
            sites.insert(id, (site, attrs));
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id = eui(r.get(0));
            let active = r.get::<_, &str>(1) == "active";
            // A key that does not open is an error, not a retirement.
            let key = if active { Some(self.keys.open_key(id, r.get(2))?) } else { None };
            out.push(match (key, sites.get(&id)) {
                (Some(key), Some((site, attrs))) => RegistryChange {
                    eui: id,
                    active: Some((DeviceKey::from_bytes(key), site.clone(), *attrs)),
                },
                _ => RegistryChange { eui: id, active: None },
            });
        }
        Ok((position, out))
    }

    fn locations(&self) -> Result<Vec<(gridsense_protocol::Eui, f64, f64)>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query("SELECT eui, lat, lon FROM devices WHERE status = 'active'", &[]))?
                .iter()
                .map(|r| (eui(r.get(0)), r.get(1), r.get(2)))
                .collect())
        })
    }

    fn counters(&self) -> Result<Vec<(gridsense_protocol::Eui, CounterWindow)>, StoreError> {
        let mut out = Vec::new();
        self.each_row("SELECT eui, highest, seen FROM counters", &[], &mut |r| {
            let highest: Option<i64> = r.get(1);
            out.push((
                eui(r.get(0)),
                CounterWindow::from_parts(
                    highest.and_then(|h| u32::try_from(h).ok()),
                    r.get::<_, i64>(2) as u64,
                ),
            ));
            Ok(())
        })?;
        Ok(out)
    }

    fn each_health(
        &self,
        f: &mut dyn FnMut(gridsense_protocol::Eui, DeviceHealth),
    ) -> Result<(), StoreError> {
        let sql = "SELECT eui, kind, last_seen_ms, last_counter, battery_mv, rssi_dbm, temperature_dc,
                       firmware, uptime_s, frames, rejects, skipped, online, low_battery, deadline_ms
                   FROM health";
        self.each_row(sql, &[], &mut |r| {
            let kind: String = r.get(1);
            let kind = crate::store::kind_named(&kind, "health")?;
            let small = |n: usize| r.get::<_, Option<i32>>(n);
            f(
                eui(r.get(0)),
                DeviceHealth {
                    kind,
                    last_seen_ms: r.get(2),
                    last_counter: r.get::<_, Option<i64>>(3).and_then(|v| u32::try_from(v).ok()),
                    battery_mv: small(4).and_then(|v| u16::try_from(v).ok()),
                    rssi_dbm: small(5).and_then(|v| i16::try_from(v).ok()),
                    temperature_dc: small(6).and_then(|v| i16::try_from(v).ok()),
                    firmware: r.get(7),
                    uptime_s: r.get::<_, Option<i64>>(8).and_then(|v| u32::try_from(v).ok()),
                    frames: r.get::<_, i64>(9) as u64,
                    rejects: r.get::<_, i64>(10) as u64,
                    skipped: r.get::<_, i64>(11) as u64,
                    online: r.get(12),
                    low_battery: r.get(13),
                    deadline_ms: r.get(14),
                },
            );
            Ok(())
        })
    }

    /// A batch is applied once: its token is written in its transaction, and a retry after a
    /// failure first asks whether that token landed (a COMMIT cut off may have succeeded).
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let retry = self.unconfirmed.take();
        let token = match retry {
            Some(t) => t,
            None => {
                let mut raw = [0u8; 8];
                getrandom::fill(&mut raw).map_err(|e| StoreError::Postgres {
                    what: format!("no randomness for a batch token: {e}"),
                    transient: false,
                })?;
                i64::from_le_bytes(raw)
            }
        };
        let result = self.with(|c| {
            if retry.is_some() {
                let landed = wait(
                    c.query_opt("SELECT 1 FROM committed_batches WHERE token = $1", &[&token]),
                )?;
                if landed.is_some() {
                    tracing::info!(
                        "the batch whose commit was cut off had landed: not applied again"
                    );
                    return Ok(());
                }
            }
            self.commit_in(c, batch, token)
        });
        if result.is_err() {
            self.unconfirmed.set(Some(token));
        }
        result
    }

    /// Drops the day partitions that end at or before `before_ms` (retention rounds up to
    /// whole UTC days), deletes older samples from the default partition, and makes the days
    /// up to two after `now_ms` (the migration's `gridsense_telemetry_days`).
    fn prune_telemetry(&mut self, before_ms: i64, now_ms: i64) -> Result<u64, StoreError> {
        self.with(|c| {
            let removed: i64 = wait(
                c.query_one("SELECT gridsense_telemetry_days($1, $2)", &[&now_ms, &before_ms]),
            )?
            .get(0);
            Ok(u64::try_from(removed).unwrap_or(0))
        })
    }

    fn each_site(
        &self,
        f: &mut dyn FnMut(gridsense_protocol::Eui, Site, Attributes),
    ) -> Result<(), StoreError> {
        self.sites(None, f)
    }

    fn rule_states(&self) -> Result<Vec<(gridsense_protocol::Eui, String, RuleState)>, StoreError> {
        let mut out = Vec::new();
        self.each_rule_state(&mut |id, rule, state| out.push((id, rule.to_owned(), state)))?;
        Ok(out)
    }

    fn each_rule_state(
        &self,
        f: &mut dyn FnMut(gridsense_protocol::Eui, &str, RuleState),
    ) -> Result<(), StoreError> {
        self.each_row("SELECT eui, rule, state FROM rule_state", &[], &mut |r| {
            let rule: &str = r.get(1);
            let state = serde_json::from_str(r.get(2)).map_err(|e| StoreError::BadRow {
                table: "rule_state",
                what: format!("{rule}: {e}"),
            })?;
            f(eui(r.get(0)), rule, state);
            Ok(())
        })
    }

    fn sequences(&self) -> Result<Sequences, StoreError> {
        self.with(|c| {
            let r = wait(c.query_one(
                "SELECT (SELECT COALESCE(max(id), 0) FROM incidents),
                        (SELECT COALESCE(max(id), 0) FROM cases),
                        (SELECT COALESCE(max(cluster_id), 0) FROM incidents),
                        (SELECT COALESCE(max(id), 0) FROM alerts)",
                &[],
            ))?;
            Ok(Sequences { incident: r.get(0), case: r.get(1), cluster: r.get(2), alert: r.get(3) })
        })
    }

    fn open_incidents(&self) -> Result<crate::cases::OpenIncidents, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT eui, condition, id, severity, state, onset_ms, detected_ms, case_id, cluster_id, grid_code
                 FROM incidents WHERE state != 'closed'",
                &[],
            ))?
            .iter()
            .map(|r| {
                let state: &str = r.get(4);
                (
                    (eui(r.get(0)), r.get::<_, String>(1)),
                    OpenIncident {
                        id: r.get(2),
                        severity: Severity::parse(r.get(3)).unwrap_or_default(),
                        onset_ms: r.get(5),
                        detected_ms: r.get(6),
                        case_id: r.get(7),
                        recovered: state == "recovered",
                        maintenance: state == "maintenance",
                        cluster_id: r.get(8),
                        grid_code: r.get(9),
                    },
                )
            })
            .collect())
        })
    }

    fn finished_cases(&self, after: i64) -> Result<Vec<(i64, i64)>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT id, case_id FROM case_events WHERE id > $1 AND to_state IN ('closed', 'voided') ORDER BY id",
                &[&after],
            ))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
    }

    fn last_case_event(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_one("SELECT COALESCE(max(id), 0) FROM case_events", &[]))?.get(0))
        })
    }

    fn write_placements(
        &mut self,
        placements: &mut dyn Iterator<Item = Placement<'_>>,
    ) -> Result<(), StoreError> {
        let rows: Vec<Placement<'_>> = placements.collect();
        let fingerprint = crate::store::placements_fingerprint(&rows);
        let stored = self.with(|c| {
            Ok(wait(c.query_opt("SELECT value FROM store_meta WHERE name = 'placements'", &[]))?
                .map(|r| r.get::<_, Vec<u8>>(0)))
        })?;
        if stored.as_ref() == Some(&fingerprint) {
            return Ok(());
        }
        let (mut a, mut g, mut cm, mut st, mut d) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, grid, community, street, distance) in rows {
            a.push(e(id));
            g.push(grid.to_owned());
            cm.push(community.to_owned());
            st.push(street.to_owned());
            d.push(distance);
        }
        // A restart finds most placements as they were: only changed rows are written, and
        // rows of devices no longer placed removed (a full rewrite of a million rows took
        // 7 s here).
        self.with(|c| {
            let tx = wait(c.transaction())?;
            for chunk in 0..a.len().div_ceil(10_000) {
                let r = chunk * 10_000..((chunk + 1) * 10_000).min(a.len());
                wait(tx.execute(
                    "INSERT INTO placements (eui, grid_code, community_code, street_code, distance_m)
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::float8[])
                     ON CONFLICT (eui) DO UPDATE SET grid_code = EXCLUDED.grid_code,
                        community_code = EXCLUDED.community_code, street_code = EXCLUDED.street_code,
                        distance_m = EXCLUDED.distance_m
                     WHERE (placements.grid_code, placements.community_code, placements.street_code,
                            placements.distance_m)
                        IS DISTINCT FROM (EXCLUDED.grid_code, EXCLUDED.community_code,
                            EXCLUDED.street_code, EXCLUDED.distance_m)",
                    &[
                        &a.get(r.clone()),
                        &g.get(r.clone()),
                        &cm.get(r.clone()),
                        &st.get(r.clone()),
                        &d.get(r),
                    ],
                ))?;
            }
            wait(tx.execute(
                "DELETE FROM placements p WHERE NOT EXISTS
                    (SELECT 1 FROM unnest($1::bigint[]) AS u (eui) WHERE u.eui = p.eui)",
                &[&a],
            ))?;
            wait(tx.execute(
                "INSERT INTO store_meta (name, value) VALUES ('placements', $1)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&fingerprint],
            ))?;
            wait(tx.commit())?;
            Ok(())
        })
    }
}
