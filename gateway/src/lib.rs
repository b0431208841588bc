//! The gridsense gateway: ingests device frames from MQTT, authenticates and de-duplicates
//! them, and turns what they report into device health, telemetry and cases. This crate is the
//! shell (MQTT, SQLite, HTTP, delivery); everything that decides is in `gridsense-core`,
//! re-exported here under the module names below.
//!
//! - [`pipeline`] (core, `now` passed in): intake check → counter → health → telemetry →
//!   messages, into a [`batch::Batch`]; [`health`] with durable offline deadlines;
//!   [`telemetry`] points.
//! - [`ingest`]: the MQTT 5 session (rumqttc `v5`, [`ingest::session`]: Maximum Packet Size,
//!   Receive Maximum, reconnect policy, disconnect reasons), group commit into [`store`]
//!   (SQLite), acks after commit; [`sink`]: the InfluxDB 2 writer draining the store's on-disk
//!   telemetry buffer.
//! - [`geo`]: the grid layer (GeoJSON, R-tree, point-in-polygon, nearest within a tolerance).
//! - [`rules`] (pure): alarm rules on observations and timers, persisted state;
//!   [`cases`] (pure): incidents, cases with codes, deadlines and the 130 milestones on the
//!   [`calendar`], maintenance windows, the lifecycle; [`delivery`]: the outbox workers and
//!   platform adapters ([`open311_client`], webhook); [`board`]: Open311 read endpoints and the
//!   operator lifecycle API; [`api`]: devices, grids, incidents, statistics, live events,
//!   `/readyz`, `/metrics`; [`http`]: the dashboard page and the HTTP/1 server (header
//!   timeout, connection cap); [`auth`]: tokens; [`cli_cases`]: the same from a terminal.
//! - [`app`], [`demo`], [`cli`]: starting it all; [`broker`]: URLs and the embedded broker.
//! - [`walkthrough`]: the wire protocol as the gateway sees it (`gridsense frame walkthrough`).

// The core's modules, under the names the gateway has always had.
pub use gridsense_core::{
    batch, calendar, cases, downlink, geo, health, intake, pipeline, registry, rules, telemetry,
};

pub mod api;
pub mod app;
pub mod auth;
pub mod board;
pub mod broker;
pub mod cli;
pub mod cli_cases;
pub mod config;
pub mod delivery;
#[cfg(feature = "demo")]
pub mod demo;
pub mod http;
pub mod ingest;
pub mod open311_client;
pub mod provision;
pub mod sink;
pub mod status;
pub mod store;
pub mod tls;
pub mod walkthrough;
