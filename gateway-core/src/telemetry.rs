//! Telemetry points from accepted messages, each with its explicit sample time (the device's,
//! so a replayed point overwrites itself), for whichever sink is configured.

use gridsense_protocol::{
    CoverSample, DeviceTime, DrainSample, Eui, PositionFix, Sample, SwitchState, Uplink,
};

use crate::{batch::Point, registry::Kind};

fn ms(at: DeviceTime) -> i64 {
    i64::try_from(at.unix_secs().saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn cover(eui: Eui, kind: Kind, at: DeviceTime, s: &CoverSample, out: &mut Vec<Point>) {
    let at_ms = ms(at);
    let p = |field, value| Point {
        eui,
        kind,
        measurement: "cover",
        field,
        at_ms,
        value,
        grid: None,
        street: None,
    };
    out.push(p("tilt_ddeg", f64::from(s.tilt_ddeg)));
    match s.switch {
        SwitchState::Absent => {}
        SwitchState::Closed => out.push(p("open", 0.0)),
        SwitchState::Open => out.push(p("open", 1.0)),
    }
    if let Some(w) = s.water_mm {
        out.push(p("water_mm", f64::from(w)));
    }
}

fn drain(eui: Eui, kind: Kind, at: DeviceTime, s: &DrainSample, out: &mut Vec<Point>) {
    let at_ms = ms(at);
    let p = |field, value| Point {
        eui,
        kind,
        measurement: "drain",
        field,
        at_ms,
        value,
        grid: None,
        street: None,
    };
    out.push(p("level_mm", f64::from(s.level_mm)));
    out.push(p("rate_mm_h", f64::from(s.rate_mm_h)));
}

fn position(eui: Eui, kind: Kind, at: DeviceTime, f: &PositionFix, out: &mut Vec<Point>) {
    let at_ms = ms(at);
    let p = |field, value| Point {
        eui,
        kind,
        measurement: "position",
        field,
        at_ms,
        value,
        grid: None,
        street: None,
    };
    out.push(p("lat", f64::from(f.lat_udeg) / 1e6));
    out.push(p("lon", f64::from(f.lon_udeg) / 1e6));
    out.push(p("accuracy_m", f64::from(f.accuracy_m)));
}

/// Appends the telemetry a message carries; returns whether the message was telemetry only
/// (readings, fixes, backlog) rather than something the trace keeps as a message.
pub fn points(eui: Eui, kind: Kind, message: &Uplink, out: &mut Vec<Point>) -> bool {
    match message {
        Uplink::CoverReading { at, sample } => cover(eui, kind, *at, sample, out),
        Uplink::DrainReading { at, sample } => drain(eui, kind, *at, sample, out),
        Uplink::PatrolFix { at, fix } => position(eui, kind, *at, fix, out),
        Uplink::Backlog(b) => {
            for (at, sample) in b.timed() {
                match sample {
                    Sample::Cover(s) => cover(eui, kind, at, &s, out),
                    Sample::Drain(s) => drain(eui, kind, at, &s, out),
                    Sample::Fix(f) => position(eui, kind, at, &f, out),
                }
            }
        }
        Uplink::Status(s) => {
            let at_ms = ms(s.at);
            let p = |field, value| Point {
                eui,
                kind,
                measurement: "status",
                field,
                at_ms,
                value,
                grid: None,
                street: None,
            };
            out.push(p("battery_mv", f64::from(s.battery_mv)));
            out.push(p("rssi_dbm", f64::from(s.rssi_dbm)));
            out.push(p("temperature_c", f64::from(s.temperature_dc) / 10.0));
            out.push(p("uptime_s", f64::from(s.uptime_s)));
            return false;
        }
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use gridsense_protocol::examples;

    use super::*;

    #[test]
    fn every_sample_becomes_points_at_its_own_time() {
        let mut out = Vec::new();
        let [cover, drain, status, _, _, backlog, fix, ..] = examples::uplinks();
        assert!(points(Eui(1), Kind::Drain, &cover, &mut out));
        assert!(points(Eui(1), Kind::Drain, &drain, &mut out));
        assert!(!points(Eui(1), Kind::Drain, &status, &mut out));
        assert!(points(Eui(1), Kind::Drain, &fix, &mut out));
        let before = out.len();
        assert!(points(Eui(1), Kind::Drain, &backlog, &mut out));
        // Six drain samples, two fields each, five minutes apart.
        let batch: Vec<_> =
            out[before..].iter().filter(|p| p.field == "level_mm").map(|p| p.at_ms).collect();
        assert_eq!(batch.len(), 6);
        assert!(batch.windows(2).all(|w| w[1] - w[0] == 300_000));
        assert!(
            out.iter().any(|p| p.measurement == "cover" && p.field == "open" && p.value == 0.0)
        );
    }
}
