//! The device inventory, `devices.json`: what `gridsim city` writes and both the simulator and
//! the gateway's provisioning read. Loading checks every record and names the file, line and
//! field of the first thing wrong; nothing is used from a file that does not load whole.

use std::{fs, path::Path};

use gridsense_protocol::{DeviceKey, Eui};
use serde::{Deserialize, Serialize};

/// The kind of a device in the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Smart manhole cover.
    Cover,
    /// Drainage-level sensor.
    Drain,
    /// Patrol beacon.
    Beacon,
}

/// One device as provisioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// EUI-64 as 16 lowercase hex digits.
    pub eui: String,
    /// Device kind.
    pub kind: Kind,
    /// AES-128 frame key as 32 hex digits.
    pub key: String,
    /// The device's MQTT password (its user name is its EUI).
    pub mqtt_password: String,
    /// WGS84 latitude.
    pub lat: f64,
    /// WGS84 longitude.
    pub lon: f64,
    /// Covers: 16-digit component object code (district 6 + major 2 + minor 2 + serial 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component_code: Option<String>,
    /// Covers: 4-digit minor class, e.g. `0102` sewage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_class: Option<String>,
    /// Covers: the installed at-rest accelerometer reading (mg), the tilt baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_mg: Option<[i16; 3]>,
    /// Covers: an open/closed switch is fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_switch: Option<bool>,
    /// Covers: a water probe under the cover is fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_water_probe: Option<bool>,
    /// Drains: depth of the well from floor to cover, mm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub well_depth_mm: Option<u16>,
    /// Drains: warning (surcharge) level above the floor, mm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_mm: Option<u16>,
    /// Drains: alarm level above the floor (a margin below the cover), mm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm_mm: Option<u16>,
    /// Drains: how strongly rain in the area fills this well (1.0 typical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catchment: Option<f64>,
    /// Beacons: the responsibility grid the worker patrols (15 digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_code: Option<String>,
    /// The brokers the device is provisioned with, in the order it tries them: one or two
    /// `mqtt://HOST:PORT` (or all `mqtts://`) URLs; it fails over to the second when a
    /// connection attempt to the first fails (none: whatever the simulator is told).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<Vec<String>>,
}

/// A device record, checked and parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// The record as in the file.
    pub record: DeviceRecord,
    /// Parsed EUI.
    pub eui: Eui,
    /// Parsed key.
    pub key: DeviceKey,
}

/// Why an inventory did not load.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The JSON does not match the schema.
    #[error("{file}:{line}:{column}: field `{field}`: {message}")]
    Schema {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Path of the offending field, e.g. `[17].kind`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A record parses but a value is not acceptable.
    #[error("{file}: device [{index}] ({eui}): field `{field}`: {message}")]
    Value {
        /// The file.
        file: String,
        /// Index of the record in the array.
        index: usize,
        /// Its EUI as written.
        eui: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Reads and checks `devices.json`.
pub fn load(path: &Path) -> Result<Vec<Device>, InventoryError> {
    let file = path.display().to_string();
    let text = fs::read_to_string(path)
        .map_err(|source| InventoryError::Io { file: file.clone(), source })?;
    parse(&file, &text)
}

/// Parses and checks inventory text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Vec<Device>, InventoryError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let records: Vec<DeviceRecord> = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        InventoryError::Schema {
            file: file.to_owned(),
            line: inner.line(),
            column: inner.column(),
            field,
            message: inner.to_string(),
        }
    })?;
    let mut seen = std::collections::HashSet::new();
    records
        .into_iter()
        .enumerate()
        .map(|(index, record)| {
            let bad = |field: &'static str, message: String| InventoryError::Value {
                file: file.to_owned(),
                index,
                eui: record.eui.clone(),
                field,
                message,
            };
            if record.eui.len() != 16 || record.eui.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(bad("eui", "must be 16 lowercase hex digits".into()));
            }
            let eui: Eui = record.eui.parse().map_err(|e| bad("eui", format!("{e}")))?;
            if !seen.insert(eui) {
                return Err(bad("eui", "appears more than once".into()));
            }
            let key = DeviceKey::from_hex(&record.key).map_err(|e| bad("key", e.to_string()))?;
            if record.mqtt_password.len() < 8 {
                return Err(bad("mqtt_password", "must be at least 8 characters".into()));
            }
            if !(-90.0..=90.0).contains(&record.lat) {
                return Err(bad("lat", format!("{} is not a latitude", record.lat)));
            }
            if !(-180.0..=180.0).contains(&record.lon) {
                return Err(bad("lon", format!("{} is not a longitude", record.lon)));
            }
            check_kind_fields(&record).map_err(|(field, message)| bad(field, message))?;
            if let Some(brokers) = &record.brokers {
                check_brokers(brokers).map_err(|m| bad("brokers", m))?;
            }
            Ok(Device { record, eui, key })
        })
        .collect()
}

/// One or two `mqtt://HOST:PORT` URLs, or two `mqtts://`: never one of each (a device's TLS
/// setting is one), never the same twice.
pub fn check_brokers(brokers: &[String]) -> Result<(), String> {
    if brokers.is_empty() || brokers.len() > 2 {
        return Err(format!("one or two broker URLs, not {}", brokers.len()));
    }
    let mut schemes = Vec::new();
    for url in brokers {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("{url:?} is not mqtt://HOST:PORT or mqtts://HOST:PORT"));
        };
        if scheme != "mqtt" && scheme != "mqtts" {
            return Err(format!("{url:?}: the scheme is mqtt or mqtts"));
        }
        let port = rest.rsplit_once(':').map(|(host, port)| (host, port.parse::<u16>()));
        match port {
            Some((host, Ok(p))) if !host.is_empty() && p > 0 && !host.contains(['/', '@']) => {}
            _ => return Err(format!("{url:?} is not {scheme}://HOST:PORT")),
        }
        schemes.push(scheme);
    }
    if let [a, b] = schemes.as_slice()
        && a != b
    {
        return Err("both brokers plain (mqtt://) or both TLS (mqtts://)".into());
    }
    if let [a, b] = brokers
        && a == b
    {
        return Err(format!("{a:?} twice: two brokers are two"));
    }
    Ok(())
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

fn check_kind_fields(r: &DeviceRecord) -> Result<(), (&'static str, String)> {
    match r.kind {
        Kind::Cover => {
            if let Some(code) = &r.component_code
                && !digits(code, 16)
            {
                return Err(("component_code", format!("{code:?} is not 16 digits")));
            }
            if let Some(minor) = &r.minor_class
                && !digits(minor, 4)
            {
                return Err(("minor_class", format!("{minor:?} is not 4 digits")));
            }
            if r.baseline_mg.is_some_and(|b| b.iter().all(|v| *v == 0)) {
                return Err(("baseline_mg", "a zero vector has no direction".into()));
            }
        }
        Kind::Drain => {
            let depth = r.well_depth_mm.unwrap_or(u16::MAX);
            let warn = r.warn_mm.unwrap_or(0);
            let alarm = r.alarm_mm.unwrap_or(depth);
            if warn >= alarm || alarm > depth {
                return Err((
                    "alarm_mm",
                    format!(
                        "levels must satisfy warn_mm < alarm_mm <= well_depth_mm (got {warn}, {alarm}, {depth})"
                    ),
                ));
            }
            if r.catchment.is_some_and(|c| !(0.0..=10.0).contains(&c)) {
                return Err(("catchment", "must be between 0 and 10".into()));
            }
        }
        Kind::Beacon => {
            if let Some(code) = &r.grid_code
                && !digits(code, 15)
                && !digits(code, 14)
            {
                return Err(("grid_code", format!("{code:?} is not a 14- or 15-digit grid code")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"[
  {"eui": "2102020100000001", "kind": "cover", "key": "000102030405060708090a0b0c0d0e0f",
   "mqtt_password": "secret-pass", "lat": 38.91, "lon": 121.65,
   "component_code": "2102020102000001", "minor_class": "0102"}
]"#;

    #[test]
    fn a_good_file_loads() {
        let devices = parse("devices.json", GOOD).unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].eui, Eui(0x2102_0201_0000_0001));
    }

    #[test]
    fn schema_errors_name_file_line_and_field() {
        let bad = GOOD.replace("\"cover\"", "\"hydrant\"");
        let err = parse("devices.json", &bad).unwrap_err().to_string();
        assert!(err.starts_with("devices.json:2:"), "{err}");
        assert!(err.contains("[0].kind"), "{err}");
        let bad = GOOD.replace("\"lat\": 38.91,", "");
        let err = parse("devices.json", &bad).unwrap_err().to_string();
        assert!(err.contains("missing field `lat`"), "{err}");
        let bad = GOOD.replace("\"lat\"", "\"latitude\"");
        let err = parse("devices.json", &bad).unwrap_err().to_string();
        assert!(err.contains("unknown field `latitude`"), "{err}");
    }

    #[test]
    fn value_errors_name_the_record_and_field() {
        for (from, to, field) in [
            ("000102030405060708090a0b0c0d0e0f", "0001", "`key`"),
            ("2102020100000001", "2102020100000001ff", "`eui`"),
            ("\"lat\": 38.91", "\"lat\": 138.91", "`lat`"),
            ("2102020102000001", "21020201020001", "`component_code`"),
            ("secret-pass", "pw", "`mqtt_password`"),
        ] {
            let err = parse("d.json", &GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains("device [0]") && err.contains(field), "{err}");
        }
        for (brokers, says) in [
            (r#"[]"#, "one or two"),
            (r#"["mqtt://a:1883", "mqtt://b:1883", "mqtt://c:1883"]"#, "one or two"),
            (r#"["tcp://a:1883"]"#, "scheme"),
            (r#"["mqtt://a"]"#, "HOST:PORT"),
            (r#"["mqtt://a:0"]"#, "HOST:PORT"),
            (r#"["mqtt://a:1883", "mqtts://b:8883"]"#, "both TLS"),
            (r#"["mqtt://a:1883", "mqtt://a:1883"]"#, "twice"),
        ] {
            let text = GOOD
                .replace("\"minor_class\"", &format!("\"brokers\": {brokers}, \"minor_class\""));
            let err = parse("d.json", &text).unwrap_err().to_string();
            assert!(err.contains("`brokers`") && err.contains(says), "{brokers}: {err}");
        }
        let two = r#""brokers": ["mqtts://mqtt-a.example:8883", "mqtts://mqtt-b.example:8883"], "minor_class""#;
        let devices = parse("d.json", &GOOD.replace("\"minor_class\"", two)).unwrap();
        assert_eq!(devices[0].record.brokers.as_ref().map(Vec::len), Some(2));
        let twice = format!("[{0},{0}]", GOOD.trim().trim_start_matches('[').trim_end_matches(']'));
        let err = parse("d.json", &twice).unwrap_err().to_string();
        assert!(err.contains("device [1]") && err.contains("more than once"), "{err}");
    }
}
