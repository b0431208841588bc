//! Live counters shared by every simulated device, and the run's summary.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use gridsense_protocol::HEADER_LEN;

/// Uplink message kinds by variant index, as in SPEC.md.
pub const KIND_NAMES: [&str; 11] = [
    "cover_reading",
    "drain_reading",
    "status",
    "alarm",
    "alarm_cleared",
    "backlog_batch",
    "patrol_fix",
    "checkin",
    "incident_report",
    "sos",
    "downlink_ack",
];

/// Counters updated by the devices as they run (cheap atomics, read by the progress bar).
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames handed to the broker, by uplink kind index.
    pub sent: [AtomicU64; 11],
    /// Bytes of those frames.
    pub bytes: AtomicU64,
    /// Devices currently connected (per-device transport).
    pub connected: AtomicU64,
    /// Messages sent by misbehaving senders.
    pub mischief: AtomicU64,
    /// Samples sent inside backlog batches.
    pub backlog_samples: AtomicU64,
    /// PUBACKs the pooled connections received (frames the broker has).
    pub broker_acked: AtomicU64,
}

/// Reads a postcard varint (u32) at the start of `bytes`: value and length.
fn varint(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut value = 0u32;
    for (i, b) in bytes.iter().take(5).enumerate() {
        value |= u32::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

impl Counters {
    /// Counts one frame by the message index at the start of its body.
    pub fn frame_sent(&self, frame: &[u8]) {
        let body = frame.get(HEADER_LEN..).unwrap_or_default();
        if let Some(slot) = body.first().and_then(|i| self.sent.get(usize::from(*i))) {
            slot.fetch_add(1, Relaxed);
        }
        // A backlog batch: index 5, base time, then the sample count.
        if body.first() == Some(&5)
            && let Some((_, base_len)) = varint(body.get(1..).unwrap_or_default())
            && let Some((count, _)) = varint(body.get(1 + base_len..).unwrap_or_default())
        {
            self.backlog_samples.fetch_add(u64::from(count), Relaxed);
        }
        self.bytes.fetch_add(frame.len() as u64, Relaxed);
    }

    /// Frames sent so far, all kinds.
    pub fn total_sent(&self) -> u64 {
        self.sent.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// What a whole run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Devices simulated.
    pub devices: usize,
    /// Simulated seconds covered.
    pub sim_seconds: u64,
    /// Real milliseconds taken.
    pub real_ms: u64,
    /// Frames sent, by kind name.
    pub sent: Vec<(&'static str, u64)>,
    /// Bytes sent.
    pub bytes: u64,
    /// Alarms raised and cleared.
    pub alarms_raised: u64,
    /// Alarms cleared.
    pub alarms_cleared: u64,
    /// Samples that went out in backlog batches.
    pub backlog_samples: u64,
    /// Telemetry samples dropped because a device's queue was full.
    pub telemetry_dropped: u64,
    /// Urgent messages refused because a device's urgent queue was full.
    pub urgent_refused: u64,
    /// Frames resent while awaiting a PUBACK.
    pub resends: u64,
    /// Successful MQTT connections.
    pub connects: u64,
    /// Failed or broken connections.
    pub connection_failures: u64,
    /// Downlinks received.
    pub downlinks: u64,
    /// Messages from misbehaving senders.
    pub mischief: u64,
    /// Peak resident memory of the simulator process, KiB (Linux; 0 elsewhere).
    pub peak_rss_kib: u64,
    /// Frames the broker acknowledged to the pooled transport (QoS 1 only).
    pub broker_acked: u64,
    /// Resident memory while the devices ran (just before shutdown), KiB.
    pub running_rss_kib: u64,
    /// What became of the frames the devices kept for the gateway's end-to-end confirmation.
    pub confirm: crate::fleet::ConfirmReport,
}

/// The process's peak resident set size in KiB, from `/proc/self/status` (0 if unavailable).
pub fn peak_rss_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

/// The process's current resident set size in KiB (0 if unavailable).
pub fn rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

impl Summary {
    /// Frames sent, all kinds.
    pub fn frames(&self) -> u64 {
        self.sent.iter().map(|(_, n)| n).sum()
    }

    /// The summary as the text `gridsim run` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let real_s = self.real_ms as f64 / 1000.0;
        let _ = writeln!(
            out,
            "gridsim: {} devices, {} s simulated in {:.1} s; {} frames ({:.0}/s), {} bytes",
            self.devices,
            self.sim_seconds,
            real_s,
            self.frames(),
            self.frames() as f64 / real_s.max(1e-3),
            self.bytes
        );
        for (kind, n) in self.sent.iter().filter(|(_, n)| *n > 0) {
            let _ = writeln!(out, "  {kind:<16} {n}");
        }
        let _ = writeln!(
            out,
            "alarms raised {}, cleared {}; backlog samples replayed {}; dropped telemetry {}, refused urgent {}",
            self.alarms_raised,
            self.alarms_cleared,
            self.backlog_samples,
            self.telemetry_dropped,
            self.urgent_refused
        );
        let _ = writeln!(
            out,
            "connections {}, failures {}, resends {}, downlinks {}, misbehaving messages {}",
            self.connects, self.connection_failures, self.resends, self.downlinks, self.mischief
        );
        let c = &self.confirm;
        if c.confirmed + c.given_up + c.resent > 0 || !c.held.is_empty() {
            let _ = writeln!(
                out,
                "confirmed end to end {}, resent for want of it {}, given up {}, still awaiting it {}",
                c.confirmed,
                c.resent,
                c.given_up,
                c.held.len()
            );
        }
        if self.broker_acked > 0 {
            let _ = writeln!(
                out,
                "broker acknowledged {} frames ({:.0}/s)",
                self.broker_acked,
                self.broker_acked as f64 / real_s.max(1e-3)
            );
        }
        let _ = writeln!(
            out,
            "memory while running {} KiB ({:.0} bytes per device), peak {} KiB",
            self.running_rss_kib,
            self.running_rss_kib as f64 * 1024.0 / self.devices.max(1) as f64,
            self.peak_rss_kib
        );
        out
    }
}
