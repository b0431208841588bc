//! The gateway's core: everything that decides, as plain code that takes `now` and inputs and
//! returns outputs (sans-IO). No socket, no clock, no database, no async runtime — Cargo keeps
//! it so: this crate depends on none of them. The gateway (`gridsense-gateway`) is the shell
//! around it: MQTT, SQLite, HTTP, delivery.
//!
//! - [`pipeline`]: one frame's path, top to bottom — [`intake`] (decode → key → tag → counter
//!   window) → [`health`] → [`telemetry`] points → [`downlink`]s due → [`rules`] → [`cases`];
//!   and the timers (offline deadlines, rule holds). Its output is a [`batch::Batch`]: what
//!   one group commit writes.
//! - [`registry`]: device kinds and dense device numbers; [`geo`]: the grid layer;
//!   [`calendar`]: working time, the 130 milestones' clock.
//! - [`cases::governance`]: departments, handling levels and escalation; [`assessment`]: the
//!   half-monthly report's periods and figures.

pub mod assessment;
pub mod batch;
pub mod calendar;
pub mod cases;
pub mod cluster;
pub mod downlink;
pub mod geo;
pub mod health;
pub mod intake;
pub mod pipeline;
pub mod registry;
pub mod rules;
pub mod telemetry;
