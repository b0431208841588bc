//! The gridsense gateway: ingests device frames from MQTT, authenticates and de-duplicates
//! them, and turns what they report into device health, telemetry and cases.
//!
//! So far it holds the pure uplink check ([`intake`]) and the protocol walk-through that
//! `gridsense demo` runs ([`demo`]); the ingest shell, storage and cases grow around them.

pub mod broker;
pub mod cli;
pub mod config;
pub mod demo;
pub mod health;
pub mod intake;
pub mod pipeline;
pub mod registry;
pub mod store;
pub mod telemetry;
