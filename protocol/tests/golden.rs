//! Golden bytes assembled by hand from SPEC.md's rules (not from the encoder), so the encoder,
//! the decoder and the document are checked against a third, independent source.

// Test code: a panic is how a failure is reported.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use gridsense_protocol::{
    CoverSample, DeviceKey, DeviceTime, Downlink, DrainSample, Eui, PositionFix, Setting, Sos,
    SwitchState, Uplink, frame::compute_tag, open, seal,
};

const KEY: DeviceKey = DeviceKey::from_bytes([0x2b; 16]);

/// MHDR ‖ EUI ‖ FCnt ‖ body ‖ tag, built from its parts.
fn assemble(mhdr: u8, eui: [u8; 8], counter: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut frame = vec![mhdr];
    frame.extend_from_slice(&eui);
    frame.extend_from_slice(&counter);
    frame.extend_from_slice(body);
    let tag = compute_tag(&KEY, &frame);
    frame.extend_from_slice(&tag);
    frame
}

fn golden<M>(msg: M, eui: u64, counter: u32, expected: &[u8])
where
    M: gridsense_protocol::Message + PartialEq + std::fmt::Debug,
{
    let sealed = seal(Eui(eui), counter, &msg, &KEY);
    assert_eq!(sealed.as_slice(), expected, "encoder disagrees for {msg:?}");
    let (_, back) = open::<M>(expected, &KEY).expect("golden frame opens");
    assert_eq!(back, msg);
}

#[test]
fn cover_reading_with_switch_and_water() {
    let msg = Uplink::CoverReading {
        at: DeviceTime(300),
        sample: CoverSample { tilt_ddeg: 1800, switch: SwitchState::Open, water_mm: Some(128) },
    };
    // index 0; at 300 = ac 02; tilt 1800 = 88 0e; Open = 02; Some = 01, 128 = 80 01.
    let body = [0x00, 0xac, 0x02, 0x88, 0x0e, 0x02, 0x01, 0x80, 0x01];
    let eui = [0x70, 0xb3, 0xd5, 0x00, 0x00, 0x00, 0x00, 0x01];
    golden(msg, 0x70b3_d500_0000_0001, 258, &assemble(0x10, eui, [0, 0, 1, 2], &body));
}

#[test]
fn drain_reading_with_a_falling_level_is_zigzag() {
    let msg = Uplink::DrainReading {
        at: DeviceTime(0),
        sample: DrainSample { level_mm: 7000, rate_mm_h: -1 },
    };
    // index 1; at 0; 7000 = d8 36; -1 zigzags to 1.
    let body = [0x01, 0x00, 0xd8, 0x36, 0x01];
    golden(msg, 1, 0, &assemble(0x10, [0, 0, 0, 0, 0, 0, 0, 1], [0; 4], &body));
}

#[test]
fn sos_with_a_fix_south_west_of_the_origin() {
    let fix = PositionFix { lat_udeg: -1, lon_udeg: -64, accuracy_m: 0 };
    let msg = Uplink::Sos(Sos { at: DeviceTime(127), fix: Some(fix) });
    // index 9; at 127 = 7f; Some; -1 → 01; -64 → 7f; 0.
    let body = [0x09, 0x7f, 0x01, 0x01, 0x7f, 0x00];
    golden(msg, u64::MAX, u32::MAX, &assemble(0x10, [0xff; 8], [0xff; 4], &body));
}

#[test]
fn config_downlink() {
    let settings =
        heapless::Vec::from_slice(&[Setting::TiltThresholdDdeg(100), Setting::TiltHoldMs(2000)])
            .expect("two settings fit");
    let msg = Downlink::Config { settings };
    // index 0; 2 settings; [2, 100 = 64]; [3, 2000 = d0 0f].
    let body = [0x00, 0x02, 0x02, 0x64, 0x03, 0xd0, 0x0f];
    golden(msg, 0x0102, 7, &assemble(0x11, [0, 0, 0, 0, 0, 0, 1, 2], [0, 0, 0, 7], &body));
}

#[test]
fn status_request_is_the_shortest_frame() {
    let frame = assemble(0x11, [0; 8], [0; 4], &[0x03]);
    assert_eq!(frame.len(), gridsense_protocol::MIN_FRAME_LEN);
    golden(Downlink::StatusRequest, 0, 0, &frame);
}
