//! The test harness: real services on free loopback ports, started per test and stopped when
//! dropped, and an independent subscriber that decodes what devices publish with
//! `gridsense-protocol` alone.
//!
//! - [`Mosquitto`]: Debian's `/usr/sbin/mosquitto` with a config written per test
//!   (`scripts/test` installs the package).
//! - [`EmbeddedBroker`]: rumqttd in-process, the gateway's zero-install default: an MQTT 5
//!   listener for devices (the firmware's client speaks MQTT 5) and a 3.1.1 listener for rumqttc.
//! - [`Subscriber`]: records every uplink frame.

pub mod broker;
pub mod fixtures;
pub mod subscriber;

pub use broker::{EmbeddedBroker, Mosquitto, free_port};
pub use subscriber::{Received, Subscriber};
