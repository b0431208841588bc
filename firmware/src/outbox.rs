//! Store-and-forward: what waits to be sent, unsealed, in bounded queues sized at compile time.
//!
//! - **Urgent** messages (SOS, alarms raised and cleared, incident reports, check-ins, downlink
//!   acks) are never dropped for telemetry. An SOS goes ahead of everything else; the rest keep
//!   their order. The queue is sized so that it cannot fill in practice; if it does, the newest
//!   urgent message is refused and counted (there is nothing less important left to drop).
//! - **Status**: only the newest status is kept.
//! - **Telemetry** samples wait with their own sample times; when the queue is full the oldest
//!   sample is dropped and counted. Samples go out oldest first: one alone as a plain reading,
//!   several (after an outage) as multi-sample backlog batches.
//!
//! Nothing here is sealed: the frame counter and tag are assigned when a message is taken for
//! sending ([`Outbox::take_next`]).

use gridsense_protocol::{
    AlarmCleared, AlarmRaised, Backlog, CheckIn, DeviceTime, DownlinkAck, IncidentReport,
    MAX_BACKLOG_SAMPLES, Sample, Sos, Status, TimedSample, Uplink,
};
use heapless::{Deque, Vec};

/// A message that must not be lost for telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Urgent {
    /// Personal-safety emergency: goes first.
    Sos(Sos),
    /// An alarm condition began.
    AlarmRaised(AlarmRaised),
    /// An alarm condition ended.
    AlarmCleared(AlarmCleared),
    /// A grid worker's incident report.
    Report(IncidentReport),
    /// A patrol checkpoint check-in.
    CheckIn(CheckIn),
    /// The answer to a downlink.
    Ack(DownlinkAck),
}

impl Urgent {
    fn into_uplink(self) -> Uplink {
        match self {
            Urgent::Sos(m) => Uplink::Sos(m),
            Urgent::AlarmRaised(m) => Uplink::AlarmRaised(m),
            Urgent::AlarmCleared(m) => Uplink::AlarmCleared(m),
            Urgent::Report(m) => Uplink::IncidentReport(m),
            Urgent::CheckIn(m) => Uplink::CheckIn(m),
            Urgent::Ack(m) => Uplink::DownlinkAck(m),
        }
    }
}

/// Where the device logic puts what it wants sent.
pub trait Sink {
    /// Queue an urgent message.
    fn urgent(&mut self, msg: Urgent);
    /// Queue a telemetry sample taken at `at`.
    fn sample(&mut self, at: DeviceTime, sample: Sample);
}

/// Counts of what the outbox had to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Telemetry samples dropped (oldest first) because the queue was full.
    pub telemetry_dropped: u32,
    /// Urgent messages refused because the urgent queue was full.
    pub urgent_refused: u32,
}

/// Bounded queues of unsealed messages: `U` urgent messages, `T` telemetry samples.
#[derive(Debug, Clone)]
pub struct Outbox<const U: usize, const T: usize> {
    urgent: Deque<Urgent, U>,
    status: Option<Status>,
    telemetry: Deque<(DeviceTime, Sample), T>,
    stats: OutboxStats,
}

impl<const U: usize, const T: usize> Default for Outbox<U, T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const U: usize, const T: usize> Outbox<U, T> {
    /// An empty outbox.
    pub const fn new() -> Self {
        Outbox {
            urgent: Deque::new(),
            status: None,
            telemetry: Deque::new(),
            stats: OutboxStats { telemetry_dropped: 0, urgent_refused: 0 },
        }
    }

    /// Replaces any waiting status with a newer one.
    pub fn status(&mut self, status: Status) {
        self.status = Some(status);
    }

    /// What has been dropped or refused so far.
    pub const fn stats(&self) -> OutboxStats {
        self.stats
    }

    /// Urgent messages waiting.
    pub fn urgent_len(&self) -> usize {
        self.urgent.len()
    }

    /// Telemetry samples waiting.
    pub fn telemetry_len(&self) -> usize {
        self.telemetry.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.status.is_none() && self.telemetry.is_empty()
    }

    /// Removes and returns the next message to send: SOS and other urgent messages first, then
    /// the status, then telemetry oldest first (batched when several samples wait).
    pub fn take_next(&mut self) -> Option<Uplink> {
        if let Some(urgent) = self.urgent.pop_front() {
            return Some(urgent.into_uplink());
        }
        if let Some(status) = self.status.take() {
            return Some(Uplink::Status(status));
        }
        let (first_at, first) = self.telemetry.pop_front()?;
        if !self.next_fits_batch(first_at) {
            return Some(single(first_at, first));
        }
        let mut samples: Vec<TimedSample, MAX_BACKLOG_SAMPLES> = Vec::new();
        // Cannot fail: the vector is empty.
        let _ = samples.push(TimedSample { delta_s: 0, sample: first });
        let mut last = first_at;
        while samples.len() < MAX_BACKLOG_SAMPLES && self.next_fits_batch(last) {
            let Some((at, sample)) = self.telemetry.pop_front() else { break };
            let _ = samples.push(TimedSample { delta_s: at.secs_since(last).unwrap_or(0), sample });
            last = at;
        }
        Some(Uplink::Backlog(Backlog { base: first_at, samples }))
    }

    /// Whether the next waiting sample can follow a sample taken at `last` in one batch (batch
    /// times may not go backwards, e.g. across a clock correction).
    fn next_fits_batch(&self, last: DeviceTime) -> bool {
        self.telemetry.front().is_some_and(|(at, _)| *at >= last)
    }
}

/// One sample as its own plain reading message.
fn single(at: DeviceTime, sample: Sample) -> Uplink {
    match sample {
        Sample::Cover(sample) => Uplink::CoverReading { at, sample },
        Sample::Drain(sample) => Uplink::DrainReading { at, sample },
        Sample::Fix(fix) => Uplink::PatrolFix { at, fix },
    }
}

impl<const U: usize, const T: usize> Sink for Outbox<U, T> {
    fn urgent(&mut self, msg: Urgent) {
        let pushed = match msg {
            Urgent::Sos(_) => self.urgent.push_front(msg),
            _ => self.urgent.push_back(msg),
        };
        if pushed.is_err() {
            self.stats.urgent_refused = self.stats.urgent_refused.saturating_add(1);
        }
    }

    fn sample(&mut self, at: DeviceTime, sample: Sample) {
        if self.telemetry.is_full() {
            self.telemetry.pop_front();
            self.stats.telemetry_dropped = self.stats.telemetry_dropped.saturating_add(1);
        }
        // Cannot fail: a slot was freed above if the queue was full.
        let _ = self.telemetry.push_back((at, sample));
    }
}

#[cfg(test)]
mod tests {
    use gridsense_protocol::{AlarmKind, DrainSample, PositionFix};

    use super::*;

    fn drain(level_mm: u16) -> Sample {
        Sample::Drain(DrainSample { level_mm, rate_mm_h: 0 })
    }

    fn alarm(value: i32) -> Urgent {
        Urgent::AlarmRaised(AlarmRaised {
            kind: AlarmKind::DrainAlarm,
            value,
            since: DeviceTime(1),
        })
    }

    #[test]
    fn one_sample_goes_as_a_plain_reading() {
        let mut out: Outbox<4, 8> = Outbox::new();
        out.sample(DeviceTime(10), drain(5));
        assert_eq!(
            out.take_next(),
            Some(Uplink::DrainReading {
                at: DeviceTime(10),
                sample: DrainSample { level_mm: 5, rate_mm_h: 0 }
            })
        );
        assert!(out.is_empty());
        assert_eq!(out.take_next(), None);
    }

    #[test]
    fn backlog_goes_in_order_in_batches_with_original_times() {
        let mut out: Outbox<4, 64> = Outbox::new();
        for i in 0..50u16 {
            out.sample(DeviceTime(1_000 + 300 * u32::from(i)), drain(i));
        }
        let mut times = std::vec::Vec::new();
        let mut batches = 0;
        while let Some(msg) = out.take_next() {
            let Uplink::Backlog(b) = msg else { panic!("expected a batch, got {msg:?}") };
            batches += 1;
            for (at, sample) in b.timed() {
                assert_eq!(sample, drain(u16::try_from(times.len()).unwrap()));
                times.push(at.0);
            }
        }
        assert_eq!(batches, 3); // 24 + 24 + 2
        let expected: std::vec::Vec<u32> = (0..50).map(|i| 1_000 + 300 * i).collect();
        assert_eq!(times, expected);
    }

    #[test]
    fn full_telemetry_drops_the_oldest_and_counts() {
        let mut out: Outbox<2, 4> = Outbox::new();
        for i in 0..10u16 {
            out.sample(DeviceTime(u32::from(i)), drain(i));
        }
        assert_eq!(out.stats().telemetry_dropped, 6);
        let Some(Uplink::Backlog(b)) = out.take_next() else { panic!() };
        let kept: std::vec::Vec<_> = b.timed().map(|(at, _)| at.0).collect();
        assert_eq!(kept, [6, 7, 8, 9]);
    }

    #[test]
    fn urgent_first_sos_ahead_of_everything_and_never_dropped_for_telemetry() {
        let mut out: Outbox<4, 2> = Outbox::new();
        out.sample(DeviceTime(1), drain(1));
        out.urgent(alarm(1));
        out.status(Status {
            at: DeviceTime(3),
            battery_mv: 3_600,
            rssi_dbm: -80,
            temperature_dc: 200,
            firmware: gridsense_protocol::FirmwareVersion { major: 1, minor: 0, patch: 0 },
            uptime_s: 5,
            reset_cause: gridsense_protocol::ResetCause::PowerOn,
        });
        out.urgent(alarm(2));
        let sos = Sos {
            at: DeviceTime(4),
            fix: Some(PositionFix { lat_udeg: 1, lon_udeg: 2, accuracy_m: 3 }),
        };
        out.urgent(Urgent::Sos(sos));
        for i in 0..20 {
            out.sample(DeviceTime(10 + i), drain(7));
        }
        assert_eq!(out.take_next(), Some(Uplink::Sos(sos)));
        assert_eq!(out.take_next(), Some(alarm(1).into_uplink()));
        assert_eq!(out.take_next(), Some(alarm(2).into_uplink()));
        assert!(matches!(out.take_next(), Some(Uplink::Status(_))));
        assert!(matches!(out.take_next(), Some(Uplink::Backlog(_))));
        assert_eq!(out.stats().urgent_refused, 0);
    }

    #[test]
    fn urgent_overflow_is_refused_and_counted_not_silently_lost() {
        let mut out: Outbox<2, 2> = Outbox::new();
        out.urgent(alarm(1));
        out.urgent(alarm(2));
        out.urgent(alarm(3));
        assert_eq!(out.stats().urgent_refused, 1);
        assert_eq!(out.urgent_len(), 2);
    }

    #[test]
    fn a_clock_step_back_starts_a_new_batch() {
        let mut out: Outbox<2, 8> = Outbox::new();
        out.sample(DeviceTime(100), drain(1));
        out.sample(DeviceTime(200), drain(2));
        out.sample(DeviceTime(50), drain(3));
        out.sample(DeviceTime(60), drain(4));
        let Some(Uplink::Backlog(first)) = out.take_next() else { panic!() };
        assert_eq!(first.samples.len(), 2);
        let Some(Uplink::Backlog(second)) = out.take_next() else { panic!() };
        assert_eq!(second.base, DeviceTime(50));
    }

    #[test]
    fn fixes_and_cover_readings_become_their_own_messages() {
        let mut out: Outbox<1, 4> = Outbox::new();
        let fix = PositionFix { lat_udeg: 1, lon_udeg: 1, accuracy_m: 1 };
        out.sample(DeviceTime(1), Sample::Fix(fix));
        assert_eq!(out.take_next(), Some(Uplink::PatrolFix { at: DeviceTime(1), fix }));
    }
}
