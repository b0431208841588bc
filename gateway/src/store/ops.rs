//! The store's part for operators: where each device was placed, beacons' last fixes, and
//! the queries behind the device list, a device's page, the grid layer's counts and the
//! statistics for a period and an area.

use std::collections::BTreeMap;

use gridsense_protocol::Eui;
use rusqlite::{Transaction, params};
use serde::Serialize;

use super::{Store, StoreError};

pub(super) const MIGRATION: &str = "
CREATE TABLE placements (
    eui INTEGER PRIMARY KEY, grid_code TEXT, community_code TEXT, street_code TEXT, distance_m REAL
);
CREATE INDEX placements_grid ON placements (grid_code);
CREATE INDEX placements_street ON placements (street_code);
CREATE TABLE beacon_fix (eui INTEGER PRIMARY KEY, lat REAL NOT NULL, lon REAL NOT NULL, at_ms INTEGER NOT NULL, grid_code TEXT);
CREATE INDEX incidents_eui ON incidents (eui, state);
CREATE INDEX audit_eui ON audit (eui, id);
CREATE INDEX messages_eui_time ON messages (eui, received_ms);";

/// Where a device was placed: grid, community, street, metres outside the grid (snapped).
pub type Placement<'a> = (Eui, &'a str, &'a str, &'a str, Option<f64>);

/// A beacon's last fix: latitude, longitude, time, grid.
pub type Fix = (f64, f64, i64, Option<String>);

/// Writes beacons' last fixes in the batch's transaction.
pub(super) fn write(tx: &Transaction<'_>, fixes: &BTreeMap<Eui, Fix>) -> Result<(), StoreError> {
    if fixes.is_empty() {
        return Ok(());
    }
    let mut put = tx.prepare_cached(
        "INSERT INTO beacon_fix (eui, lat, lon, at_ms, grid_code) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (eui) DO UPDATE SET lat = ?2, lon = ?3, at_ms = ?4, grid_code = ?5 WHERE ?4 >= at_ms",
    )?;
    for (eui, (lat, lon, at, grid)) in fixes {
        put.execute(params![eui.0 as i64, lat, lon, at, grid])?;
    }
    Ok(())
}

/// Filters of the device list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceFilter {
    /// `cover`, `drain`, `beacon`.
    pub kind: Option<String>,
    /// Grid code (exact).
    pub grid: Option<String>,
    /// Street code (exact).
    pub street: Option<String>,
    /// `online`, `offline`, `low_battery`, `alarm`, `never_seen`.
    pub state: Option<String>,
    /// Battery below, mV.
    pub battery_below: Option<u32>,
    /// Silent (no frame) since before this time, Unix ms.
    pub silent_before_ms: Option<i64>,
    /// Sort column: `eui`, `kind`, `grid`, `battery`, `rssi`, `last_seen`, `state`.
    pub sort: Option<String>,
    /// Descending.
    pub desc: bool,
    /// Page, from 1.
    pub page: u32,
    /// Rows per page.
    pub per_page: u32,
}

/// A device row of the list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRow {
    /// EUI.
    pub eui: String,
    /// Kind.
    pub kind: String,
    /// Registered position (WGS84).
    pub lat: f64,
    /// Registered position.
    pub lon: f64,
    /// Component object code.
    pub object_code: Option<String>,
    /// Grid placed in.
    pub grid_code: Option<String>,
    /// Street.
    pub street_code: Option<String>,
    /// `online`, `offline`, `never_seen`.
    pub health: String,
    /// Below the low-battery level.
    pub low_battery: bool,
    /// Open incidents of major severity or above.
    pub alarm: bool,
    /// Battery, mV.
    pub battery_mv: Option<i64>,
    /// Signal, dBm.
    pub rssi_dbm: Option<i64>,
    /// Last verified frame, Unix ms.
    pub last_seen_ms: Option<i64>,
    /// Frames accepted.
    pub frames: i64,
    /// Frames rejected.
    pub rejects: i64,
    /// Firmware.
    pub firmware: Option<String>,
    /// A beacon's last fix: lat, lon, time.
    pub fix: Option<(f64, f64, i64)>,
}

/// A page of devices.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevicePage {
    /// Rows matching the filter.
    pub total: u64,
    /// Page number.
    pub page: u32,
    /// Rows per page.
    pub per_page: u32,
    /// The rows.
    pub devices: Vec<DeviceRow>,
}

pub(super) const DEVICE_SELECT: &str = "SELECT d.eui, d.kind, d.lat, d.lon, d.component_code, p.grid_code, p.street_code,
    h.online, h.low_battery, h.battery_mv, h.rssi_dbm, h.last_seen_ms, h.frames, h.rejects, h.firmware,
    EXISTS (SELECT 1 FROM incidents i WHERE i.eui = d.eui AND i.state IN ('open', 'recovered') AND i.severity IN ('major', 'critical')) AS alarm,
    f.lat, f.lon, f.at_ms
    FROM devices d
    LEFT JOIN placements p ON p.eui = d.eui
    LEFT JOIN health h ON h.eui = d.eui
    LEFT JOIN beacon_fix f ON f.eui = d.eui
    WHERE d.status = 'active'";

pub(super) fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
    let online: Option<bool> = r.get(7)?;
    let fix = match (
        r.get::<_, Option<f64>>(16)?,
        r.get::<_, Option<f64>>(17)?,
        r.get::<_, Option<i64>>(18)?,
    ) {
        (Some(a), Some(b), Some(t)) => Some((a, b, t)),
        _ => None,
    };
    Ok(DeviceRow {
        eui: Eui(r.get::<_, i64>(0)? as u64).to_string(),
        kind: r.get(1)?,
        lat: r.get(2)?,
        lon: r.get(3)?,
        object_code: r.get(4)?,
        grid_code: r.get(5)?,
        street_code: r.get(6)?,
        health: match online {
            None => "never_seen",
            Some(true) => "online",
            Some(false) => "offline",
        }
        .into(),
        low_battery: r.get::<_, Option<bool>>(8)?.unwrap_or(false),
        battery_mv: r.get(9)?,
        rssi_dbm: r.get(10)?,
        last_seen_ms: r.get(11)?,
        frames: r.get::<_, Option<i64>>(12)?.unwrap_or(0),
        rejects: r.get::<_, Option<i64>>(13)?.unwrap_or(0),
        firmware: r.get(14)?,
        alarm: r.get(15)?,
        fix,
    })
}

/// A device's page: its row, recent telemetry, health transitions, last frames with verdicts,
/// and its incidents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceDetail {
    /// The row.
    #[serde(flatten)]
    pub device: DeviceRow,
    /// Recent telemetry: series `measurement_field` → (time, value), oldest first.
    pub telemetry: BTreeMap<String, Vec<(i64, f64)>>,
    /// Health transitions, newest first: (time, event).
    pub health_events: Vec<(i64, String)>,
    /// Last frames, newest first.
    pub frames: Vec<FrameVerdict>,
    /// Incidents, newest first: (id, condition, severity, state, case).
    pub incidents: Vec<(i64, String, String, String, Option<i64>)>,
}

/// A frame and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameVerdict {
    /// Arrival, Unix ms.
    pub received_ms: i64,
    /// `accepted` or `rejected`.
    pub verdict: &'static str,
    /// Message kind (accepted) or the reject reason.
    pub detail: String,
    /// Frame counter (from the header of a rejected frame, where it has one).
    pub counter: Option<i64>,
}

/// An incident row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IncidentView {
    /// Id.
    pub id: i64,
    /// Device.
    pub device_id: String,
    /// Condition.
    pub condition: String,
    /// Severity.
    pub severity: String,
    /// `open`, `recovered`, `maintenance`, `closed`.
    pub state: String,
    /// Onset, Unix ms.
    pub onset_ms: i64,
    /// Detected, Unix ms.
    pub detected_ms: i64,
    /// Last change, Unix ms.
    pub updated_ms: i64,
    /// Cluster.
    pub cluster_id: Option<i64>,
    /// Grid.
    pub grid_code: Option<String>,
    /// Case.
    pub case_id: Option<i64>,
}

/// A device on the map (serialised as an array to keep 20,000 of them small): EUI, kind,
/// lat, lon, health, alarm, low battery, fix lat, fix lon.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapDevice(
    pub String,
    pub String,
    pub f64,
    pub f64,
    pub &'static str,
    pub bool,
    pub bool,
    pub Option<f64>,
    pub Option<f64>,
);

/// Counts of one grid for the map.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GridCounts {
    /// Devices placed in it.
    pub devices: u64,
    /// Of those, offline.
    pub offline: u64,
    /// Open cases in it.
    pub open_cases: u64,
    /// Devices in alarm.
    pub alarm: u64,
}

/// Statistics for a period and an area.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Cases collected (detected) in the period.
    pub collected: u64,
    /// Cases filed in the period.
    pub filed: u64,
    /// Cases dispatched in the period.
    pub dispatched: u64,
    /// Cases handled in the period.
    pub handled: u64,
    /// Cases closed in the period.
    pub closed: u64,
    /// Of the cases collected in the period, the share closed (or voided) by now.
    pub closure_rate: Option<f64>,
    /// 130: of the collected cases whose deploy milestone has passed or that were dispatched,
    /// the share dispatched in time.
    pub deploy_compliance: Option<f64>,
    /// 130: the same for the feedback milestone.
    pub feedback_compliance: Option<f64>,
    /// Of the dispatched cases whose handling deadline passed or that were handled, the share
    /// handled in time.
    pub handling_compliance: Option<f64>,
    /// Devices online / devices seen at least once, in the area.
    pub online_ratio: Option<f64>,
    /// Devices in the area.
    pub devices: u64,
    /// Devices online.
    pub online: u64,
    /// Grids in the area with at least one check-in in the period, of all its grids with a
    /// placed device or a check-in.
    pub patrol: Vec<(String, u64)>,
}

/// A device page's last frames, newest first and 30 at most: its accepted messages, the
/// entries of its list of recent telemetry frames, and its rejected frames (each
/// `(received_ms, reason, raw)`, whose header's counter is shown where the frame is long
/// enough to have one). Both stores read the rows; this puts them together.
pub(super) fn last_frames(
    eui: Eui,
    mut frames: Vec<FrameVerdict>,
    recent_list: &str,
    rejected: impl IntoIterator<Item = (i64, String, Vec<u8>)>,
) -> Vec<FrameVerdict> {
    for r in super::parse_recent_list(eui, recent_list) {
        frames.push(FrameVerdict {
            received_ms: r.received_ms,
            verdict: "accepted",
            detail: if r.samples == 1 {
                r.kind.to_owned()
            } else {
                format!("{} ({} samples)", r.kind, r.samples)
            },
            counter: Some(i64::from(r.counter)),
        });
    }
    for (received_ms, reason, raw) in rejected {
        frames.push(FrameVerdict {
            received_ms,
            verdict: "rejected",
            detail: reason,
            counter: raw
                .get(9..13)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(|b| i64::from(u32::from_be_bytes(b))),
        });
    }
    frames.sort_by_key(|f| std::cmp::Reverse(f.received_ms));
    frames.truncate(30);
    frames
}

pub(super) fn ratio(num: u64, den: u64) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)]
    (den > 0).then(|| (num as f64 / den as f64 * 1000.0).round() / 1000.0)
}

impl Store {}
