//! The small interfaces on PostgreSQL: tokens, maintenance windows, the telemetry buffer.

use super::{PgStore, eui, i, wait};
use crate::{
    cases::MaintenanceWindow,
    store::{BufferedPoint, Maintenance, StoreError, TelemetryBuffer, TokenRow, Tokens},
};

impl Tokens for PgStore {
    fn add_token(
        &mut self,
        name: &str,
        role: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = wait(c.execute(
                "INSERT INTO api_tokens (name, role, hash, created_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&name, &role, &hash, &now_ms],
            ))?;
            Ok(n == 1)
        })
    }

    fn token_role(&self, hash: &str) -> Result<Option<(String, String)>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_opt(
                "SELECT name, role FROM api_tokens WHERE hash = $1 AND revoked_ms IS NULL",
                &[&hash],
            ))?
            .map(|r| (r.get(0), r.get(1))))
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT name, role, created_ms, revoked_ms FROM api_tokens ORDER BY name",
                &[],
            ))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
        })
    }

    fn revoke_token(&mut self, name: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = wait(c.execute(
                "UPDATE api_tokens SET revoked_ms = $2 WHERE name = $1 AND revoked_ms IS NULL",
                &[&name, &now_ms],
            ))?;
            Ok(n == 1)
        })
    }
}

impl Maintenance for PgStore {
    fn add_window(
        &mut self,
        scope: &str,
        from_ms: i64,
        until_ms: i64,
        note: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        self.with(|c| {
            Ok(wait(c.query_one(
                "INSERT INTO maintenance (scope, from_ms, until_ms, note, created_ms)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[&scope, &from_ms, &until_ms, &note, &now_ms],
            ))?
            .get(0))
        })
    }

    fn windows(&self, now_ms: i64) -> Result<Vec<MaintenanceWindow>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT id, scope, from_ms, until_ms, note FROM maintenance WHERE until_ms > $1 ORDER BY id",
                &[&now_ms],
            ))?
            .iter()
            .map(|r| MaintenanceWindow {
                id: r.get(0),
                scope: r.get(1),
                from_ms: r.get(2),
                until_ms: r.get(3),
                note: r.get(4),
            })
            .collect())
        })
    }
}

impl TelemetryBuffer for PgStore {
    fn buffer_read(&self, limit: usize) -> Result<Vec<BufferedPoint>, StoreError> {
        self.with(|c| {
            Ok(wait(c.query(
                "SELECT id, eui, kind, measurement, field, at_ms, value, grid_code, street_code
                 FROM telemetry_buffer ORDER BY id LIMIT $1",
                &[&i(limit as u64)],
            ))?
            .iter()
            .map(|r| BufferedPoint {
                id: r.get(0),
                eui: eui(r.get(1)),
                kind: r.get(2),
                measurement: r.get(3),
                field: r.get(4),
                at_ms: r.get(5),
                value: r.get(6),
                grid: r.get(7),
                street: r.get(8),
            })
            .collect())
        })
    }

    fn buffer_delete_through(&mut self, id: i64) -> Result<(), StoreError> {
        self.with(|c| {
            wait(c.execute("DELETE FROM telemetry_buffer WHERE id <= $1", &[&id]))?;
            Ok(())
        })
    }

    fn buffer_len(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            let n: i64 = wait(c.query_one("SELECT count(*) FROM telemetry_buffer", &[]))?.get(0);
            Ok(n as u64)
        })
    }
}

/// Writes a batch's rule states and case effects in its transaction (rare rows: one statement
/// each, prepared by the server's plan cache for the connection).
pub(super) fn write_case_effects(
    tx: &tokio_postgres::Client,
    rule_states: &[(gridsense_protocol::Eui, String, Option<crate::rules::RuleState>)],
    fx: &crate::cases::Effects,
) -> Result<(), StoreError> {
    use crate::{cases::CaseState, rules::Severity};

    use super::e;
    // Rule states change with most frames (hold timers, levels): two multi-row statements,
    // the batch's last state of each (device, rule) written.
    let mut last: std::collections::HashMap<(i64, &str), usize> = std::collections::HashMap::new();
    for (n, (id, rule, _)) in rule_states.iter().enumerate() {
        last.insert((e(*id), rule.as_str()), n);
    }
    let mut rows: Vec<usize> = last.into_values().collect();
    rows.sort_unstable();
    let (mut put_eui, mut put_rule, mut put_state) = (Vec::new(), Vec::new(), Vec::new());
    let (mut del_eui, mut del_rule) = (Vec::new(), Vec::new());
    for (id, rule, state) in rows.iter().filter_map(|&n| rule_states.get(n)) {
        match state {
            Some(state) => {
                put_eui.push(e(*id));
                put_rule.push(rule.as_str());
                put_state.push(serde_json::to_string(state).unwrap_or_default());
            }
            None => {
                del_eui.push(e(*id));
                del_rule.push(rule.as_str());
            }
        }
    }
    if !put_eui.is_empty() {
        wait(tx.execute(
            "INSERT INTO rule_state (eui, rule, state)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])
             ON CONFLICT (eui, rule) DO UPDATE SET state = EXCLUDED.state",
            &[&put_eui, &put_rule, &put_state],
        ))?;
    }
    if !del_eui.is_empty() {
        wait(tx.execute(
            "DELETE FROM rule_state WHERE (eui, rule) IN (SELECT * FROM unnest($1::bigint[], $2::text[]))",
            &[&del_eui, &del_rule],
        ))?;
    }
    if fx.is_empty() {
        return Ok(());
    }
    let insert = crate::store::cases::case_insert('$');
    for c in &fx.cases {
        wait(tx.execute(
            insert.as_str(),
            &[
                &c.id,
                &c.incident_id,
                &c.key,
                &e(c.eui),
                &c.class_code,
                &c.class_name,
                &c.title,
                &c.object_code,
                &c.lat,
                &c.lon,
                &c.place.address,
                &c.place.unit_grid_code,
                &c.place.grid_code,
                &c.place.community_code,
                &c.place.street_code,
                &c.place.district_code,
                &c.description,
                &c.urgency,
                &c.onset_ms,
                &c.detected_ms,
                &c.limit.to_string(),
                &c.handling_due_ms,
                &c.deploy_due_ms,
                &c.feedback_due_ms,
                &c.source,
                &c.department,
                &c.level.as_str(),
            ],
        ))?;
    }
    for n in &fx.incidents {
        wait(tx.execute(
            "INSERT INTO incidents (id, eui, condition, severity, state, onset_ms, detected_ms,
                updated_ms, cluster_id, grid_code, case_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET eui = EXCLUDED.eui, condition = EXCLUDED.condition,
                severity = EXCLUDED.severity, state = EXCLUDED.state, onset_ms = EXCLUDED.onset_ms,
                detected_ms = EXCLUDED.detected_ms, updated_ms = EXCLUDED.updated_ms,
                cluster_id = EXCLUDED.cluster_id, grid_code = EXCLUDED.grid_code,
                case_id = EXCLUDED.case_id",
            &[
                &n.id,
                &e(n.eui),
                &n.condition,
                &n.severity.as_str(),
                &n.state,
                &n.onset_ms,
                &n.detected_ms,
                &n.updated_ms,
                &n.cluster_id,
                &n.grid_code,
                &n.case_id,
            ],
        ))?;
    }
    for v in &fx.evidence {
        wait(tx.execute(
            "INSERT INTO incident_evidence (incident_id, at_ms, change, severity, frame, evidence)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &v.incident_id,
                &v.at_ms,
                &v.change,
                &v.severity.map(Severity::as_str),
                &v.frame.map(i64::from),
                &serde_json::to_string(&v.evidence).unwrap_or_default(),
            ],
        ))?;
    }
    for (case_id, urgency) in &fx.urgency {
        wait(tx.execute("UPDATE cases SET urgency = $2 WHERE id = $1", &[case_id, urgency]))?;
    }
    for v in &fx.events {
        wait(tx.execute(
            "INSERT INTO case_events (case_id, at_ms, from_state, to_state, actor, note)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &v.case_id,
                &v.at_ms,
                &v.from.map(CaseState::as_str),
                &v.to.map(CaseState::as_str),
                &v.actor,
                &v.note,
            ],
        ))?;
    }
    for o in &fx.outbox {
        wait(tx.execute(
            "INSERT INTO outbox (channel, subject, op, created_ms, next_ms) VALUES ($1, $2, $3, $4, $4)",
            &[&o.channel, &o.subject, &o.op, &o.at_ms],
        ))?;
    }
    for a in &fx.alerts {
        wait(tx.execute(
            "INSERT INTO alerts (id, eui, at_ms, received_ms, lat, lon, grid_code)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &a.id,
                &e(a.eui),
                &a.at_ms,
                &a.received_ms,
                &a.position.map(|p| p.0),
                &a.position.map(|p| p.1),
                &a.grid_code,
            ],
        ))?;
    }
    for p in &fx.patrols {
        wait(tx.execute(
            "INSERT INTO patrols (eui, at_ms, day, checkpoint, grid_code) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING",
            &[&e(p.eui), &p.at_ms, &p.day, &i64::from(p.checkpoint), &p.grid_code],
        ))?;
    }
    Ok(())
}
