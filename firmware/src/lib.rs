//! # gridsense device firmware logic (`no_std`)
//!
//! The logic of the three device kinds, shared by the real boards and the host simulator:
//! what to sample and when, when a reading becomes an alarm, what waits to be sent and in which
//! order, frame counters that survive power loss, and downlink handling. It is pure: every
//! function takes `now` and inputs and returns what to do, so it is tested in virtual time.
//! There is no executor, time driver or HAL here; a board (or the simulator) adds thin glue.
//!
//! - [`device::Device`]: the sans-IO core (`handle_*` in, `poll_*` out).
//! - [`cover`], [`drain`], [`beacon`]: the sensing policies, behind [`sensing::Sensing`].
//! - [`outbox`]: store-and-forward queues, sealed only at send time.
//! - [`counter`]: the frame counter with a persisted reservation.
//! - [`backoff`]: jittered exponential reconnect backoff.
//! - [`session`]: the MQTT 5 session (rust-mqtt) over any `embedded_io_async` transport.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod backoff;
pub mod beacon;
mod config;
pub mod confirm;
pub mod counter;
pub mod cover;
pub mod device;
pub mod drain;
pub mod outbox;
pub mod sensing;
pub mod session;
mod time;

pub use config::{Config, DeviceKind, supports};
pub use device::{Device, DeviceStats, DownlinkError, Health, Identity, TransmitError};
pub use time::{Instant, WallClock};
