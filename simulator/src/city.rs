//! `gridsim city`: a synthetic district around Zhongshan District, Dalian (38.91 N, 121.65 E,
//! code 210202): 9 streets, communities, 239 responsibility grids as polygons, and a device
//! inventory placed in them. Deterministic per seed.
//!
//! Layout: the district's bounding box is cut into a 3 × 3 arrangement of streets with
//! jittered boundaries; each street into community strips, each strip into grids. Every grid is
//! a simple, counter-clockwise polygon (a rectangle whose edges are shared exactly with its
//! neighbours, so grids tile the district without gaps or overlaps).

use std::{fs, path::Path};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{
    inventory::{DeviceRecord, Kind},
    rng::Rng,
};

/// District code of Zhongshan District, Dalian.
pub const DISTRICT_CODE: &str = "210202";
/// District name.
pub const DISTRICT_NAME: &str = "中山区";
/// Responsibility grids in the district.
pub const GRID_COUNT: usize = 239;
/// The district's bounding box: south, west, north, east (WGS84 degrees).
pub const BOUNDS: [f64; 4] = [38.890, 121.615, 38.930, 121.690];

const STREET_NAMES: [&str; 9] = [
    "海军广场街道",
    "人民路街道",
    "青泥洼桥街道",
    "昆明街道",
    "葵英街道",
    "桃源街道",
    "老虎滩街道",
    "桂林街道",
    "华乐街道",
];

/// How many devices of each kind to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Manhole covers.
    pub covers: usize,
    /// Drainage sensors.
    pub drains: usize,
    /// Patrol beacons (one per grid by default).
    pub beacons: usize,
}

impl Default for Counts {
    fn default() -> Self {
        Counts { covers: 2_000, drains: 300, beacons: GRID_COUNT }
    }
}

/// One responsibility grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// 15 digits: district 6 + street 3 + community 3 + sequence 3.
    pub grid_code: String,
    /// Display name.
    pub grid_name: String,
    /// 12 digits.
    pub community_code: String,
    /// Display name.
    pub community_name: String,
    /// 9 digits.
    pub street_code: String,
    /// Display name.
    pub street_name: String,
    /// South, west, north, east.
    pub bbox: [f64; 4],
}

impl Grid {
    /// Whether the point lies inside (south/west edges inclusive).
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        let [s, w, n, e] = self.bbox;
        lat >= s && lat < n && lon >= w && lon < e
    }

    /// The grid's centre.
    pub fn centre(&self) -> (f64, f64) {
        let [s, w, n, e] = self.bbox;
        ((s + n) / 2.0, (w + e) / 2.0)
    }

    /// A uniformly random point inside, kept off the edges.
    pub fn random_point(&self, rng: &mut Rng) -> (f64, f64) {
        let [s, w, n, e] = self.bbox;
        let margin = 0.05;
        let lat = s + (n - s) * rng.range(margin, 1.0 - margin);
        let lon = w + (e - w) * rng.range(margin, 1.0 - margin);
        (lat, lon)
    }

    fn area(&self) -> f64 {
        let [s, w, n, e] = self.bbox;
        (n - s) * (e - w)
    }
}

/// A generated district.
#[derive(Debug, Clone)]
pub struct City {
    /// The seed it came from.
    pub seed: u64,
    /// All responsibility grids.
    pub grids: Vec<Grid>,
    /// The device inventory.
    pub devices: Vec<DeviceRecord>,
}

/// Splits `[lo, hi)` into `n` parts of jittered widths; returns the `n + 1` cut points.
fn cuts(rng: &mut Rng, lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let weights: Vec<f64> = (0..n).map(|_| rng.range(0.7, 1.3)).collect();
    let total: f64 = weights.iter().sum();
    let mut out = Vec::with_capacity(n + 1);
    let mut at = lo;
    out.push(lo);
    for w in &weights {
        at += (hi - lo) * w / total;
        out.push(at);
    }
    if let Some(last) = out.last_mut() {
        *last = hi;
    }
    out
}

/// Splits `total` into `parts` near-equal counts, larger ones first.
fn shares(total: usize, parts: usize) -> Vec<usize> {
    (0..parts).map(|i| total / parts + usize::from(i < total % parts)).collect()
}

fn grids(seed: u64) -> Vec<Grid> {
    let mut rng = Rng::derive(seed, 1, 0);
    let [s, w, n, e] = BOUNDS;
    let rows = cuts(&mut rng, s, n, 3);
    let cols = cuts(&mut rng, w, e, 3);
    let mut out = Vec::with_capacity(GRID_COUNT);
    for (street_idx, street_grids) in shares(GRID_COUNT, 9).into_iter().enumerate() {
        let (r, c) = (street_idx / 3, street_idx % 3);
        let (ss, sn) = (rows[r], rows[r + 1]);
        let (sw, se) = (cols[c], cols[c + 1]);
        let street_code = format!("{DISTRICT_CODE}{:03}", street_idx + 1);
        let street_name = STREET_NAMES[street_idx].to_owned();
        let communities = 5 + rng.below(2) as usize;
        let strips = cuts(&mut rng, sw, se, communities);
        for (ci, in_community) in shares(street_grids, communities).into_iter().enumerate() {
            let community_code = format!("{street_code}{:03}", ci + 1);
            let community_name =
                format!("{}第{}社区", street_name.trim_end_matches("街道"), ci + 1);
            let bands = cuts(&mut rng, ss, sn, in_community);
            for g in 0..in_community {
                out.push(Grid {
                    grid_code: format!("{community_code}{:03}", g + 1),
                    grid_name: format!("{community_name}第{}网格", g + 1),
                    community_code: community_code.clone(),
                    community_name: community_name.clone(),
                    street_code: street_code.clone(),
                    street_name: street_name.clone(),
                    bbox: [bands[g], strips[ci], bands[g + 1], strips[ci + 1]],
                });
            }
        }
    }
    out
}

fn pick_grid<'a>(grids: &'a [Grid], rng: &mut Rng) -> &'a Grid {
    let total: f64 = grids.iter().map(Grid::area).sum();
    let mut x = rng.range(0.0, total);
    for g in grids {
        x -= g.area();
        if x < 0.0 {
            return g;
        }
    }
    &grids[grids.len() - 1]
}

const COVER_CLASSES: [(&str, f64); 7] = [
    ("0101", 0.20),
    ("0102", 0.25),
    ("0103", 0.25),
    ("0105", 0.10),
    ("0107", 0.10),
    ("0111", 0.05),
    ("0106", 0.05),
];

fn cover_class(rng: &mut Rng) -> &'static str {
    let mut x = rng.unit();
    for (class, p) in COVER_CLASSES {
        x -= p;
        if x < 0.0 {
            return class;
        }
    }
    "0114"
}

fn password(rng: &mut Rng) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    (0..20).map(|_| char::from(ALPHABET[rng.below(ALPHABET.len() as u64) as usize])).collect()
}

fn base_record(kind: Kind, eui: u64, rng: &mut Rng, (lat, lon): (f64, f64)) -> DeviceRecord {
    DeviceRecord {
        eui: format!("{eui:016x}"),
        kind,
        key: hex::encode(rng.bytes::<16>()),
        mqtt_password: password(rng),
        lat: (lat * 1e6).round() / 1e6,
        lon: (lon * 1e6).round() / 1e6,
        component_code: None,
        minor_class: None,
        baseline_mg: None,
        has_switch: None,
        has_water_probe: None,
        well_depth_mm: None,
        warn_mm: None,
        alarm_mm: None,
        catchment: None,
        grid_code: None,
        brokers: None,
    }
}

/// EUI of the `index`-th device of a kind: district code, kind byte, serial.
pub fn eui_for(kind: Kind, index: usize) -> u64 {
    let kind_byte: u64 = match kind {
        Kind::Cover => 1,
        Kind::Drain => 2,
        Kind::Beacon => 3,
    };
    0x2102_0200_0000_0000 | (kind_byte << 32) | (index as u64 + 1)
}

/// Generates the district for a seed.
pub fn generate(seed: u64, counts: Counts) -> City {
    let grids = grids(seed);
    let mut devices = Vec::with_capacity(counts.covers + counts.drains + counts.beacons);
    for i in 0..counts.covers {
        let mut rng = Rng::derive(seed, 2, i as u64);
        let at = pick_grid(&grids, &mut rng).random_point(&mut rng);
        let mut r = base_record(Kind::Cover, eui_for(Kind::Cover, i), &mut rng, at);
        let class = cover_class(&mut rng);
        // Installed a little off level: up to 4° in a random direction.
        let tilt = rng.range(0.0, 4.0).to_radians();
        let dir = rng.range(0.0, std::f64::consts::TAU);
        r.baseline_mg = Some([
            (1000.0 * tilt.sin() * dir.cos()).round() as i16,
            (1000.0 * tilt.sin() * dir.sin()).round() as i16,
            (1000.0 * tilt.cos()).round() as i16,
        ]);
        r.component_code = Some(format!("{DISTRICT_CODE}01{}{:06}", &class[2..], i + 1));
        r.minor_class = Some(class.to_owned());
        r.has_switch = Some(rng.chance(0.4));
        r.has_water_probe = Some(class == "0103" && rng.chance(0.5));
        devices.push(r);
    }
    for i in 0..counts.drains {
        let mut rng = Rng::derive(seed, 3, i as u64);
        let at = pick_grid(&grids, &mut rng).random_point(&mut rng);
        let mut r = base_record(Kind::Drain, eui_for(Kind::Drain, i), &mut rng, at);
        let depth = (rng.range(3_000.0, 7_000.0) / 10.0).round() as u16 * 10;
        let alarm = depth - 500;
        r.well_depth_mm = Some(depth);
        r.alarm_mm = Some(alarm);
        r.warn_mm = Some((f64::from(alarm) * 0.6).round() as u16);
        r.catchment = Some((rng.range(0.6, 1.6) * 100.0).round() / 100.0);
        devices.push(r);
    }
    for i in 0..counts.beacons {
        let mut rng = Rng::derive(seed, 4, i as u64);
        let grid = &grids[i % grids.len()];
        let at = grid.random_point(&mut rng);
        let mut r = base_record(Kind::Beacon, eui_for(Kind::Beacon, i), &mut rng, at);
        r.grid_code = Some(grid.grid_code.clone());
        devices.push(r);
    }
    City { seed, grids, devices }
}

fn ring(bbox: [f64; 4]) -> Value {
    let [s, w, n, e] = bbox;
    let p = |lon: f64, lat: f64| json!([(lon * 1e6).round() / 1e6, (lat * 1e6).round() / 1e6]);
    // Counter-clockwise (RFC 7946), closed.
    json!([[p(w, s), p(e, s), p(e, n), p(w, n), p(w, s)]])
}

impl City {
    /// The grid layer as a GeoJSON FeatureCollection.
    pub fn grids_geojson(&self) -> Value {
        let features: Vec<Value> = self
            .grids
            .iter()
            .map(|g| {
                json!({
                    "type": "Feature",
                    "properties": {
                        "grid_code": g.grid_code,
                        "grid_name": g.grid_name,
                        "community_code": g.community_code,
                        "community_name": g.community_name,
                        "street_code": g.street_code,
                        "street_name": g.street_name,
                        "district_code": DISTRICT_CODE,
                        "district_name": DISTRICT_NAME,
                    },
                    "geometry": { "type": "Polygon", "coordinates": ring(g.bbox) },
                })
            })
            .collect();
        json!({ "type": "FeatureCollection", "name": "responsibility_grids", "features": features })
    }

    /// The grid a point lies in.
    pub fn grid_at(&self, lat: f64, lon: f64) -> Option<&Grid> {
        self.grids.iter().find(|g| g.contains(lat, lon))
    }

    /// The grid workers: one per patrol beacon, on the beacon's grid (what `gridsense
    /// provision import` reads from `workers.json`).
    pub fn workers(&self) -> Vec<Value> {
        const SURNAMES: [&str; 12] =
            ["王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴", "徐", "孙"];
        const GIVEN: [&str; 10] = ["伟", "芳", "娜", "敏", "静", "磊", "洋", "艳", "勇", "军"];
        self.devices
            .iter()
            .filter(|d| d.kind == Kind::Beacon)
            .enumerate()
            .map(|(i, d)| {
                let name = format!(
                    "{}{}",
                    SURNAMES.get(i % SURNAMES.len()).unwrap_or(&"王"),
                    GIVEN.get((i / SURNAMES.len()) % GIVEN.len()).unwrap_or(&"伟")
                );
                json!({
                    "id": format!("W{:04}", i + 1),
                    "name": name,
                    "grid_code": d.grid_code.clone().unwrap_or_default(),
                    "beacon": d.eui,
                })
            })
            .collect()
    }

    /// Writes `grids.geojson`, `devices.json`, `workers.json` and `city.json` (seed and
    /// counts) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, value: &dyn erased::Json| -> Result<()> {
            let path = dir.join(name);
            fs::write(&path, value.to_pretty()?)
                .with_context(|| format!("writing {}", path.display()))
        };
        write("grids.geojson", &self.grids_geojson())?;
        write("devices.json", &self.devices)?;
        write("workers.json", &self.workers())?;
        let count = |k: Kind| self.devices.iter().filter(|d| d.kind == k).count();
        let meta = json!({
            "seed": self.seed,
            "district_code": DISTRICT_CODE,
            "district_name": DISTRICT_NAME,
            "grids": self.grids.len(),
            "covers": count(Kind::Cover),
            "drains": count(Kind::Drain),
            "beacons": count(Kind::Beacon),
        });
        write("city.json", &meta)
    }
}

/// Pretty JSON for the two kinds of value written.
mod erased {
    pub trait Json {
        fn to_pretty(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_pretty(&self) -> serde_json::Result<String> {
            serde_json::to_string_pretty(self)
        }
    }
}

/// Loads the grids back from a `gridsim city` folder's `grids.geojson` (bounding boxes only; the
/// gateway's geo layer reads the full geometry).
pub fn load_grids(dir: &Path) -> Result<Vec<Grid>> {
    let path = dir.join("grids.geojson");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let features = value["features"]
        .as_array()
        .with_context(|| format!("{}: no `features` array", path.display()))?;
    features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let prop = |k: &str| -> Result<String> {
                f["properties"][k].as_str().map(str::to_owned).with_context(|| {
                    format!("{}: feature [{i}]: property `{k}` missing", path.display())
                })
            };
            let ring = f["geometry"]["coordinates"][0]
                .as_array()
                .with_context(|| format!("{}: feature [{i}]: no polygon ring", path.display()))?;
            let (mut s, mut w, mut n, mut e) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
            for p in ring {
                let (Some(lon), Some(lat)) = (p[0].as_f64(), p[1].as_f64()) else {
                    anyhow::bail!("{}: feature [{i}]: bad coordinate {p}", path.display());
                };
                (s, w, n, e) = (s.min(lat), w.min(lon), n.max(lat), e.max(lon));
            }
            Ok(Grid {
                grid_code: prop("grid_code")?,
                grid_name: prop("grid_name")?,
                community_code: prop("community_code")?,
                community_name: prop("community_name")?,
                street_code: prop("street_code")?,
                street_name: prop("street_name")?,
                bbox: [s, w, n, e],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_district_has_9_streets_and_239_grids_with_well_formed_codes() {
        let city = generate(42, Counts::default());
        assert_eq!(city.grids.len(), GRID_COUNT);
        let streets: std::collections::BTreeSet<_> =
            city.grids.iter().map(|g| &g.street_code).collect();
        assert_eq!(streets.len(), 9);
        for g in &city.grids {
            assert_eq!(g.grid_code.len(), 15);
            assert!(g.grid_code.starts_with(&g.community_code));
            assert_eq!(g.community_code.len(), 12);
            assert!(g.community_code.starts_with(&g.street_code));
            assert_eq!(g.street_code.len(), 9);
            assert!(g.street_code.starts_with(DISTRICT_CODE));
            let [s, w, n, e] = g.bbox;
            assert!(s < n && w < e, "{g:?}");
        }
        let codes: std::collections::BTreeSet<_> =
            city.grids.iter().map(|g| &g.grid_code).collect();
        assert_eq!(codes.len(), GRID_COUNT);
    }

    #[test]
    fn grids_tile_the_district_without_gaps_or_overlaps() {
        let city = generate(7, Counts::default());
        let mut rng = Rng::new(1);
        let [s, w, n, e] = BOUNDS;
        for _ in 0..5_000 {
            let (lat, lon) = (rng.range(s, n), rng.range(w, e));
            let hits = city.grids.iter().filter(|g| g.contains(lat, lon)).count();
            assert_eq!(hits, 1, "{lat},{lon}");
        }
        let area: f64 = city.grids.iter().map(Grid::area).sum();
        assert!((area - (n - s) * (e - w)).abs() < 1e-9);
    }

    #[test]
    fn devices_are_deterministic_placed_in_grids_and_valid() {
        let a = generate(3, Counts::default());
        let b = generate(3, Counts::default());
        assert_eq!(a.devices, b.devices);
        assert_ne!(a.devices, generate(4, Counts::default()).devices);
        assert_eq!(a.devices.len(), 2_000 + 300 + 239);
        let text = serde_json::to_string(&a.devices).unwrap();
        let parsed = crate::inventory::parse("devices.json", &text).unwrap();
        assert_eq!(parsed.len(), a.devices.len());
        for d in &a.devices {
            let grid = a.grid_at(d.lat, d.lon).expect("inside a grid");
            if d.kind == Kind::Beacon {
                assert_eq!(d.grid_code.as_deref(), Some(grid.grid_code.as_str()));
            }
        }
        // One beacon per grid.
        let beacon_grids: std::collections::BTreeSet<_> =
            a.devices.iter().filter_map(|d| d.grid_code.as_ref()).collect();
        assert_eq!(beacon_grids.len(), GRID_COUNT);
    }

    #[test]
    fn written_grids_load_back() {
        let dir = std::env::temp_dir().join(format!("gridsim-city-{}", std::process::id()));
        let city = generate(5, Counts { covers: 10, drains: 5, beacons: 3 });
        city.write(&dir).unwrap();
        let grids = load_grids(&dir).unwrap();
        assert_eq!(grids.len(), GRID_COUNT);
        assert_eq!(grids[0].grid_code, city.grids[0].grid_code);
        let _ = fs::remove_dir_all(&dir);
    }
}
