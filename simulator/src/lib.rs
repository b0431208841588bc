//! gridsim: a simulated district of gridsense devices. Every device runs the real
//! `gridsense-firmware` logic against simulated sensors and physics and a real MQTT broker, so
//! tests, demos and load runs exercise what the hardware will run.
//!
//! - [`city`]: the synthetic district (grids GeoJSON, device inventory).
//! - [`inventory`], [`scenario`]: the input files, checked with errors that name file, line, field.
//! - [`physics`], [`model`]: the world the devices sense.
//! - [`clock`]: simulated time and its mapping to real timestamps.
//! - [`fleet`], [`link`], [`pooled`], [`mischief`]: running the devices against a broker.
// Physics converts floats to sensor units deliberately (saturating `as` casts), and indexes
// arrays whose sizes it made itself.
#![allow(clippy::cast_possible_truncation, clippy::indexing_slicing)]

pub mod city;
// The inventory format and TLS settings are shared with the gateway (gridsense-common).
pub use gridsense_common::{inventory, tls};
pub mod cli;
pub mod clock;
pub mod fidelity;
pub mod fleet;
pub mod link;
pub mod mischief;
pub mod model;
pub mod physics;
pub mod pooled;
pub mod progress;
pub mod rng;
pub mod scenario;
pub mod stats;
pub mod store;
