//! What the gateway and the simulator share, without either depending on the other:
//!
//! - [`inventory`]: the device inventory format (`devices.json`, written by `gridsim city`,
//!   imported by `gridsense provision import`), checked with errors that name file, line and
//!   field;
//! - [`tls`]: TLS client settings for MQTT links — the broker's certificate is verified
//!   against a CA file, never skipped.

pub mod inventory;
pub mod tls;
