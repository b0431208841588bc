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
//! - [`Link`]: a TCP link a test can hold and cut (a host that freezes, then dies).

pub mod alarms;
pub mod broker;
pub mod browser;
pub mod fixtures;
pub mod link;
pub mod pki;
pub mod postgres;
pub mod subscriber;
pub mod victoria;

pub use broker::{Mosquitto, free_port};
pub use browser::Chromium;
pub use link::Link;
pub use pki::TestPki;
pub use subscriber::{Received, Subscriber};
pub use victoria::VictoriaMetrics;

/// Prints a line of evidence (what a test measured: `chaos: …`, `edge: …`) and, when
/// `TEST_EVIDENCE` names a file, appends it there too: `cargo test` captures what passing tests
/// print, so `scripts/test` collects the lines in that file and shows them in CI's log.
pub fn evidence(line: &str) {
    println!("{line}");
    if let Some(path) = std::env::var_os("TEST_EVIDENCE") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            // One write per line: lines of tests running in parallel do not interleave.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// [`evidence`] with `format!` arguments.
#[macro_export]
macro_rules! evidence {
    ($($arg:tt)*) => {
        $crate::evidence(&format!($($arg)*))
    };
}
