//! Prints `NAME FRAME_BYTES JSON_BYTES` for one message of every kind: the sealed frame against
//! the same content as a typical JSON payload (device id and counter included).
//!
//! `cargo run -q --release -p gridsense-protocol --example sizes`

use gridsense_protocol::{DeviceKey, Eui, Message, examples, seal};
use serde::Serialize;

/// What a JSON-over-MQTT device would typically publish for the same reading.
#[derive(Serialize)]
struct JsonPayload<'a, M> {
    device: String,
    counter: u32,
    message: &'a M,
}

fn report<M: Message>(msg: &M) -> Result<(), serde_json::Error> {
    let eui = Eui(0x3205_0801_0100_0001);
    let counter = 48_213;
    let key = DeviceKey::from_bytes([0x2b; 16]);
    let frame = seal(eui, counter, msg, &key);
    let json = serde_json::to_vec(&JsonPayload { device: eui.to_string(), counter, message: msg })?;
    println!("{} {} {}", msg.kind_name(), frame.len(), json.len());
    Ok(())
}

fn main() -> Result<(), serde_json::Error> {
    for msg in examples::uplinks() {
        report(&msg)?;
    }
    for msg in examples::downlinks() {
        report(&msg)?;
    }
    Ok(())
}
