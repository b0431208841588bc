//! The test harness: real services on free loopback ports, started per test and stopped when
//! dropped, and an independent subscriber that decodes what devices publish with
//! `gridsense-protocol` alone.
//!
//! - [`Mosquitto`]: Debian's `/usr/sbin/mosquitto` with a config written per test
//!   (`scripts/test` installs the package).
//! - The embedded broker (rumqttd) is the gateway's own: `gridsense_gateway::broker`.
//! - [`VictoriaMetrics`]: Debian's `victoria-metrics`, the InfluxDB 2 write API in tests.
//! - [`Subscriber`]: records every uplink frame.
//! - [`Chromium`]: Debian's headless `chromium`, driven over the DevTools Protocol.

pub mod alarms;
pub mod broker;
pub mod browser;
pub mod fixtures;
pub mod pki;
pub mod subscriber;
pub mod victoria;

pub use broker::{Mosquitto, free_port};
pub use browser::Chromium;
pub use pki::TestPki;
pub use subscriber::{Received, Subscriber};
pub use victoria::VictoriaMetrics;
