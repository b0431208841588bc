//! Prints the ```` ```vector ```` blocks of `SPEC.md`: one frame of every message kind in both
//! directions, plus frames that must be rejected. `tests/spec_vectors.rs` checks SPEC.md against
//! the code, so regenerate and paste these only for a deliberate wire-format change.
//!
//! `cargo run -q -p gridsense-protocol --example vectors`

// Slices fixed, known-length frames the example itself just sealed.
#![allow(clippy::indexing_slicing)]

use gridsense_protocol::{DeviceKey, Eui, FrameBuf, Message, examples, seal};

const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// The frame as hex, fields separated: MHDR, EUI, counter, body, tag (too short a frame: as is).
fn grouped(frame: &[u8]) -> String {
    let n = frame.len();
    if n < 22 {
        return hex::encode(frame);
    }
    let parts = [&frame[..1], &frame[1..9], &frame[9..13], &frame[13..n - 8], &frame[n - 8..]];
    parts.iter().map(hex::encode).collect::<Vec<_>>().join(" ")
}

fn block(name: &str, eui: Eui, counter: u32, frame: &FrameBuf, last: &str) {
    let direction = if frame[0] & 0x0f == 0 { "up" } else { "down" };
    println!("```vector");
    println!("name: {name}");
    println!("direction: {direction}");
    println!("key: {}", hex::encode(KEY));
    println!("eui: {eui}");
    println!("counter: {counter}");
    println!("frame: {}", grouped(frame));
    println!("{last}");
    println!("```\n");
}

fn vector<M: Message>(eui: Eui, counter: u32, msg: &M) -> Result<FrameBuf, serde_json::Error> {
    let frame = seal(eui, counter, msg, &DeviceKey::from_bytes(KEY));
    block(
        msg.kind_name(),
        eui,
        counter,
        &frame,
        &format!("message: {}", serde_json::to_string(msg)?),
    );
    Ok(frame)
}

fn main() -> Result<(), serde_json::Error> {
    let cover = Eui(0x3205_0801_0100_0001);
    let drain = Eui(0x2102_0200_0000_0031);
    let beacon = Eui(0x2102_0200_b000_0007);
    let [
        cover_reading,
        drain_reading,
        status,
        alarm,
        cleared,
        backlog,
        fix,
        checkin,
        report,
        sos,
        ack,
    ] = examples::uplinks();
    let first = vector(cover, 1, &cover_reading)?;
    vector(drain, 1_029, &drain_reading)?;
    vector(cover, 2, &status)?;
    vector(cover, 3, &alarm)?;
    vector(cover, 4, &cleared)?;
    vector(drain, 1_030, &backlog)?;
    vector(beacon, 77, &fix)?;
    vector(beacon, 78, &checkin)?;
    vector(beacon, 79, &report)?;
    vector(beacon, 80, &sos)?;
    vector(drain, 1_031, &ack)?;
    for (counter, msg) in (3..).zip(examples::downlinks()) {
        vector(drain, counter, &msg)?;
    }

    // Frames every receiver must reject, with the reason code.
    let mut tampered = first.clone();
    tampered[14] ^= 0x01;
    block("rejected_tampered_body", cover, 1, &tampered, "error: bad_tag");
    let mut v2 = first.clone();
    v2[0] = 0x20;
    block("rejected_version_2", cover, 1, &v2, "error: unsupported_version");
    let short = FrameBuf::from_slice(&first[..first.len() - 9]).unwrap_or_default();
    block("rejected_truncated", cover, 1, &short, "error: truncated");
    Ok(())
}
