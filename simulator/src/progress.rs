//! The progress bar of `gridsim run` (stderr).

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};

use crate::{clock::SimClock, stats::Counters};

/// A bar for a run of `duration` (a spinner when open ended).
pub fn bar(duration: Option<Duration>) -> ProgressBar {
    let bar = match duration {
        Some(d) => ProgressBar::new(d.as_millis().try_into().unwrap_or(u64::MAX)),
        None => ProgressBar::new_spinner(),
    };
    let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Refreshes the bar from the counters.
pub fn update(
    bar: &ProgressBar,
    clock: &SimClock,
    counters: &Counters,
    started: tokio::time::Instant,
) {
    let sent = counters.total_sent();
    let real = started.elapsed().as_secs_f64().max(1e-3);
    bar.set_position(started.elapsed().as_millis().try_into().unwrap_or(u64::MAX));
    bar.set_message(format!(
        "sim +{}s | {} frames ({:.0}/s) | alarms {} | connections {}",
        clock.sim_ms() / 1000,
        sent,
        sent as f64 / real,
        counters.sent[3].load(Relaxed),
        counters.connected.load(Relaxed)
    ));
}
