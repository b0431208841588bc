//! The grid layer: which responsibility grid (and so which community, street and district) a
//! point lies in. Loaded from GeoJSON (`gridsim city` writes `grids.geojson`; a city's own file
//! in the same shape works), indexed with an R-tree of bounding boxes, exact point-in-polygon with
//! `geo`. A point outside every grid resolves to the nearest grid within a tolerance, else it is
//! unassigned — never silently dropped. Invalid geometry or codes are errors at load that name
//! the feature and the property.

use std::{path::Path, sync::Arc};

use geo::{Contains, Coord, Distance, Euclidean, LineString, MultiPolygon, Point, Polygon};
use rstar::{AABB, RTree, primitives::GeomWithData, primitives::Rectangle};

/// Metres per degree of latitude.
const M_PER_DEG: f64 = 111_320.0;

/// One responsibility grid with its hierarchy.
#[derive(Debug, Clone, PartialEq)]
pub struct GridCell {
    /// Grid code (15 digits by default: district 6 + street 3 + community 3 + sequence 3).
    pub grid_code: Arc<str>,
    /// Grid name.
    pub grid_name: String,
    /// Street name (empty where the layer gives none).
    pub street_name: String,
    /// Community name (empty where the layer gives none).
    pub community_name: String,
    /// The place as people write it: district, street, community and grid names (those given).
    pub address: String,
    /// Community code (12 digits).
    pub community_code: String,
    /// Street code (9 digits).
    pub street_code: Arc<str>,
    /// District code (6 digits).
    pub district_code: String,
    /// Its area (WGS84 lon/lat).
    pub shape: MultiPolygon<f64>,
}

/// Code lengths, configurable (some cities use 14-digit grid codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeLengths {
    /// Grid code digits.
    pub grid: usize,
    /// Community code digits.
    pub community: usize,
    /// Street code digits.
    pub street: usize,
    /// District code digits.
    pub district: usize,
}

impl Default for CodeLengths {
    fn default() -> Self {
        CodeLengths { grid: 15, community: 12, street: 9, district: 6 }
    }
}

/// Where a point falls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement<'a> {
    /// Inside this grid.
    Inside(&'a GridCell),
    /// Outside every grid, this one nearest within the tolerance (metres away).
    Nearest(&'a GridCell, f64),
    /// Outside every grid and farther than the tolerance from all of them.
    Unassigned,
}

impl<'a> Placement<'a> {
    /// The grid, if any.
    pub fn grid(&self) -> Option<&'a GridCell> {
        match self {
            Placement::Inside(g) | Placement::Nearest(g, _) => Some(g),
            Placement::Unassigned => None,
        }
    }
}

/// Why a grid layer did not load.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not JSON.
    #[error("{file}:{line}:{column}: not JSON: {message}")]
    Json {
        /// The file.
        file: String,
        /// Line.
        line: usize,
        /// Column.
        column: usize,
        /// What.
        message: String,
    },
    /// A feature is wrong.
    #[error("{file}: feature [{index}] ({grid}): `{field}`: {message}")]
    Feature {
        /// The file.
        file: String,
        /// Feature index.
        index: usize,
        /// Its grid code, if readable.
        grid: String,
        /// The offending property or `geometry`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The loaded, indexed grid layer.
#[derive(Debug)]
pub struct GridLayer {
    cells: Vec<GridCell>,
    index: RTree<GeomWithData<Rectangle<[f64; 2]>, usize>>,
    tolerance_m: f64,
}

fn ring(value: &serde_json::Value) -> Result<LineString<f64>, String> {
    let points = value.as_array().ok_or("a ring must be an array of positions")?;
    let mut coords = Vec::with_capacity(points.len());
    for p in points {
        let (Some(lon), Some(lat)) = (
            p.get(0).and_then(serde_json::Value::as_f64),
            p.get(1).and_then(serde_json::Value::as_f64),
        ) else {
            return Err(format!("position {p} is not [lon, lat]"));
        };
        if !(-180.0..=180.0).contains(&lon) || !(-90.0..=90.0).contains(&lat) {
            return Err(format!("position [{lon}, {lat}] is outside WGS84"));
        }
        coords.push(Coord { x: lon, y: lat });
    }
    if coords.len() < 4 {
        return Err(format!("a ring needs at least 4 positions, got {}", coords.len()));
    }
    if coords.first() != coords.last() {
        return Err("a ring must be closed (first position = last)".into());
    }
    Ok(LineString::new(coords))
}

fn polygon(rings: &serde_json::Value) -> Result<Polygon<f64>, String> {
    let rings = rings.as_array().ok_or("polygon coordinates must be an array of rings")?;
    let mut iter = rings.iter();
    let exterior = ring(iter.next().ok_or("a polygon needs an exterior ring")?)?;
    let holes = iter.map(ring).collect::<Result<Vec<_>, _>>()?;
    Ok(Polygon::new(exterior, holes))
}

fn geometry(g: &serde_json::Value) -> Result<MultiPolygon<f64>, String> {
    let coords = g.get("coordinates").ok_or("no coordinates")?;
    match g.get("type").and_then(serde_json::Value::as_str) {
        Some("Polygon") => Ok(MultiPolygon::new(vec![polygon(coords)?])),
        Some("MultiPolygon") => {
            let polys = coords.as_array().ok_or("multipolygon coordinates must be an array")?;
            Ok(MultiPolygon::new(polys.iter().map(polygon).collect::<Result<_, _>>()?))
        }
        other => Err(format!("geometry type {other:?} is not Polygon or MultiPolygon")),
    }
}

fn bounds(shape: &MultiPolygon<f64>) -> Option<([f64; 2], [f64; 2])> {
    let mut lo = [f64::MAX, f64::MAX];
    let mut hi = [f64::MIN, f64::MIN];
    for p in shape {
        for c in p.exterior().coords() {
            lo = [lo[0].min(c.x), lo[1].min(c.y)];
            hi = [hi[0].max(c.x), hi[1].max(c.y)];
        }
    }
    (lo[0] <= hi[0]).then_some((lo, hi))
}

impl GridLayer {
    /// Loads a GeoJSON FeatureCollection of grids from `path`.
    pub fn load(path: &Path, codes: CodeLengths, tolerance_m: f64) -> Result<Self, GeoError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| GeoError::Io { file: file.clone(), source })?;
        Self::parse(&file, &text, codes, tolerance_m)
    }

    /// Parses GeoJSON text; `file` names it in errors.
    pub fn parse(
        file: &str,
        text: &str,
        codes: CodeLengths,
        tolerance_m: f64,
    ) -> Result<Self, GeoError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| GeoError::Json {
            file: file.to_owned(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let features =
            value.get("features").and_then(serde_json::Value::as_array).ok_or_else(|| {
                GeoError::Feature {
                    file: file.to_owned(),
                    index: 0,
                    grid: String::new(),
                    field: "features".into(),
                    message: "not a FeatureCollection".into(),
                }
            })?;
        let mut cells = Vec::with_capacity(features.len());
        let mut seen = std::collections::HashSet::new();
        for (index, f) in features.iter().enumerate() {
            let grid = f
                .pointer("/properties/grid_code")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_owned();
            let bad = |field: &str, message: String| GeoError::Feature {
                file: file.to_owned(),
                index,
                grid: grid.clone(),
                field: field.to_owned(),
                message,
            };
            let code = |name: &str, len: usize| -> Result<String, GeoError> {
                let v =
                    f.pointer(&format!("/properties/{name}")).and_then(serde_json::Value::as_str);
                match v {
                    Some(v) if v.len() == len && v.bytes().all(|b| b.is_ascii_digit()) => {
                        Ok(v.to_owned())
                    }
                    Some(v) => Err(bad(name, format!("{v:?} is not {len} digits"))),
                    None => Err(bad(name, "missing".into())),
                }
            };
            let grid_code = code("grid_code", codes.grid)?;
            let community_code = code("community_code", codes.community)?;
            let street_code = code("street_code", codes.street)?;
            let district_code = f
                .pointer("/properties/district_code")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| street_code.chars().take(codes.district).collect());
            if !grid_code.starts_with(&community_code) || !community_code.starts_with(&street_code)
            {
                return Err(bad(
                    "grid_code",
                    "grid, community and street codes do not nest".into(),
                ));
            }
            if !seen.insert(grid_code.clone()) {
                return Err(bad("grid_code", "appears more than once".into()));
            }
            let grid_name = f
                .pointer("/properties/grid_name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_owned();
            let name = |k: &str| {
                f.pointer(&format!("/properties/{k}")).and_then(serde_json::Value::as_str)
            };
            let address: String = ["district_name", "street_name", "community_name", "grid_name"]
                .into_iter()
                .filter_map(name)
                .collect();
            let shape = f
                .get("geometry")
                .ok_or_else(|| bad("geometry", "missing".into()))
                .and_then(|g| geometry(g).map_err(|m| bad("geometry", m)))?;
            cells.push(GridCell {
                grid_code: grid_code.into(),
                grid_name,
                street_name: name("street_name").unwrap_or("").to_owned(),
                community_name: name("community_name").unwrap_or("").to_owned(),
                address,
                community_code,
                street_code: street_code.into(),
                district_code,
                shape,
            });
        }
        let entries = cells
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                bounds(&c.shape)
                    .map(|(lo, hi)| GeomWithData::new(Rectangle::from_corners(lo, hi), i))
            })
            .collect();
        Ok(GridLayer { cells, index: RTree::bulk_load(entries), tolerance_m })
    }

    /// The grids.
    pub fn cells(&self) -> &[GridCell] {
        &self.cells
    }

    /// Where a WGS84 point falls.
    pub fn locate(&self, lat: f64, lon: f64) -> Placement<'_> {
        match self.locate_index(lat, lon) {
            Some((i, None)) => self.cells.get(i).map_or(Placement::Unassigned, Placement::Inside),
            Some((i, Some(d))) => {
                self.cells.get(i).map_or(Placement::Unassigned, |c| Placement::Nearest(c, d))
            }
            None => Placement::Unassigned,
        }
    }

    /// The index in [`Self::cells`] of the grid a point falls in, with the distance in metres
    /// when it is only the nearest within the tolerance.
    pub fn locate_index(&self, lat: f64, lon: f64) -> Option<(usize, Option<f64>)> {
        if !lat.is_finite() || !lon.is_finite() {
            return None;
        }
        let point = Point::new(lon, lat);
        for entry in self.index.locate_all_at_point(&[lon, lat]) {
            if self.cells.get(entry.data).is_some_and(|cell| cell.shape.contains(&point)) {
                return Some((entry.data, None));
            }
        }
        // Outside every grid: the nearest within the tolerance (degrees scaled to metres).
        let lon_scale = lat.to_radians().cos().max(0.01);
        let tol_deg = self.tolerance_m / (M_PER_DEG * lon_scale);
        let search =
            AABB::from_corners([lon - tol_deg, lat - tol_deg], [lon + tol_deg, lat + tol_deg]);
        let scaled = |c: Coord<f64>| Coord { x: c.x * lon_scale * M_PER_DEG, y: c.y * M_PER_DEG };
        let here = Point::from(scaled(point.0));
        let mut best: Option<(usize, f64)> = None;
        for entry in self.index.locate_in_envelope_intersecting(&search) {
            let Some(cell) = self.cells.get(entry.data) else { continue };
            for poly in &cell.shape {
                let ext = LineString::new(poly.exterior().coords().map(|c| scaled(*c)).collect());
                let d = Euclidean.distance(&here, &ext);
                if d <= self.tolerance_m && best.is_none_or(|(_, b)| d < b) {
                    best = Some((entry.data, d));
                }
            }
        }
        best.map(|(i, d)| (i, Some(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> GridLayer {
        let city = gridsense_simulator::city::generate(
            3,
            gridsense_simulator::city::Counts { covers: 0, drains: 0, beacons: 0 },
        );
        let text = serde_json::to_string(&city.grids_geojson()).unwrap();
        GridLayer::parse("grids.geojson", &text, CodeLengths::default(), 50.0).unwrap()
    }

    #[test]
    fn every_generated_device_falls_in_the_grid_the_generator_put_it_in() {
        let layer = layer();
        assert_eq!(layer.cells().len(), 239);
        let city =
            gridsense_simulator::city::generate(3, gridsense_simulator::city::Counts::default());
        for d in &city.devices {
            let expected = city.grid_at(d.lat, d.lon).unwrap();
            let Placement::Inside(cell) = layer.locate(d.lat, d.lon) else {
                panic!("{} outside", d.eui)
            };
            assert_eq!(*cell.grid_code, *expected.grid_code);
            assert_eq!(&cell.grid_code[..12], cell.community_code);
            assert_eq!(cell.district_code, "210202");
        }
    }

    #[test]
    fn outside_points_snap_within_the_tolerance_or_stay_unassigned() {
        let layer = layer();
        let [s, w, _, _] = gridsense_simulator::city::BOUNDS;
        // 20 m south of the district's southern edge: the nearest grid.
        let near = layer.locate(s - 20.0 / M_PER_DEG, w + 0.001);
        let Placement::Nearest(_, d) = near else { panic!("{near:?}") };
        assert!((15.0..25.0).contains(&d), "{d}");
        assert_eq!(layer.locate(s - 0.01, w + 0.001), Placement::Unassigned);
        assert_eq!(layer.locate(f64::NAN, 1.0), Placement::Unassigned);
    }

    #[test]
    fn bad_geometry_and_codes_are_named() {
        let ok = r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"grid_code":"210202001001001","community_code":"210202001001","street_code":"210202001"},"geometry":{"type":"Polygon","coordinates":[[[121.6,38.9],[121.7,38.9],[121.7,39.0],[121.6,38.9]]]}}]}"#;
        assert!(GridLayer::parse("g", ok, CodeLengths::default(), 0.0).is_ok());
        for (from, to, field) in [
            ("210202001001001", "21020200100100", "grid_code"),
            (
                "\"community_code\":\"210202001001\"",
                "\"community_code\":\"210202009001\"",
                "grid_code",
            ),
            ("[121.6,38.9]]]", "[121.6,38.8]]]", "geometry"),
            ("\"Polygon\"", "\"Point\"", "geometry"),
            ("[121.7,39.0]", "[191.7,39.0]", "geometry"),
        ] {
            let err =
                GridLayer::parse("g.geojson", &ok.replace(from, to), CodeLengths::default(), 0.0)
                    .unwrap_err()
                    .to_string();
            assert!(err.contains("feature [0]") && err.contains(field), "{from}: {err}");
        }
        let err = GridLayer::parse("g.geojson", "{", CodeLengths::default(), 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("g.geojson:1:"), "{err}");
        let fourteen = CodeLengths { grid: 14, ..CodeLengths::default() };
        let short = ok.replace("210202001001001", "21020200100101");
        assert!(GridLayer::parse("g", &short, fourteen, 0.0).is_ok());
    }
}
