//! The gridsense gateway: ingests device frames from MQTT, authenticates and de-duplicates
//! them, and turns what they report into device health, telemetry and cases. This crate is the
//! shell (MQTT, the store, HTTP, delivery); everything that decides is in `gridsense-core`,
//! re-exported here under the module names below.
//!
//! Core (pure, `now` passed in): [`pipeline`] (intake check → counter → health → telemetry →
//! messages, into a [`batch::Batch`]), [`health`], [`rules`], [`cases`] (incidents, codes,
//! deadlines, the 130 milestones on the [`calendar`], the lifecycle, departments, levels and
//! escalation), [`assessment`] (the report's periods and figures), [`downlink`], [`geo`],
//! [`telemetry`], [`registry`].
//!
//! Shell, one folder per edge; a module imports only from the core, [`config`], [`status`],
//! [`platform`], [`store`], [`report`] and its own folder — never from another edge's folder, nor from one
//! above it ([`app`], [`cli`]); `tests/layout.rs` checks it:
//! - [`ingest`]: the MQTT 5 session ([`ingest::session`]), the batching/ack/retry policy
//!   ([`ingest::batcher`], pure), the pipeline task and the acker.
//! - [`store`]: the durable state behind one trait per consumer (SQLite, PostgreSQL).
//! - [`report`]: the assessment report gathered from the store and rendered (table, CSV, JSON,
//!   HTML), for the CLI and the API alike.
//! - [`delivery`]: the outbox workers and platform adapters ([`delivery::open311`], webhook) and
//!   the InfluxDB 2 writer ([`delivery::influx`]).
//! - [`http`]: the HTTP/1 server (header timeout, connection cap), [`http::api`],
//!   [`http::board`] (Open311 and the operators' lifecycle), [`http::auth`], [`http::tls`],
//!   the dashboard page.
//! - [`broker`]: URLs, the embedded broker, [`broker::provision`] (Mosquitto files).
//! - [`status`]: the clock, the status and metrics hub (the telemetry sink's too).
//! - [`platform`]: what the platform protocols fix, for their clients and servers alike (the
//!   webhook signature, Open311's search span).
//! - [`app`]: starting and stopping it all; [`cli`]: the commands (cases, demo, walkthrough).

// The core's modules, under the names the gateway has always had.
pub use gridsense_core::{
    assessment, batch, calendar, cases, cluster, downlink, geo, health, intake, pipeline, registry,
    rules, telemetry,
};

pub mod app;
pub mod broker;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod http;
pub mod ingest;
pub mod platform;
pub mod report;
pub mod status;
pub mod store;
