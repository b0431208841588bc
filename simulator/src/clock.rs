//! Simulated time and how it maps to real timestamps.
//!
//! A run covers a *horizon* of wall-clock time (`--duration`, or one hour when the run is open
//! ended). During the horizon simulated time runs `speed` times faster than real time; the
//! simulated clock is anchored so that it reaches the real wall clock exactly when the horizon
//! ends:
//!
//! ```text
//! sim_start = real_start − (speed − 1) × horizon
//! sim(t)    = sim_start + speed × (t − real_start)        while t − real_start ≤ horizon
//! sim(t)    = t                                            afterwards (real time, speed 1)
//! ```
//!
//! So sample times are never in the future of the sinks (VictoriaMetrics drops samples more than
//! two days ahead; an InfluxDB retention policy drops old ones), a 10-minute run at speed 60
//! simulates the last 10 hours up to now, and case times stay meaningful: an alarm's onset is
//! the simulated moment the cover moved, at most a horizon in the past.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gridsense_firmware::Instant;
use gridsense_protocol::DeviceTime;
use tokio::time::Instant as RealInstant;

/// The run's clock: real instants to simulated time and back.
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    real_start: RealInstant,
    /// Simulated Unix time at the start, ms.
    sim_start_unix_ms: u64,
    speed: f64,
    horizon: Duration,
    /// The gateway reads this same clock (`gridsense demo`): its time syncs are on this
    /// timeline already.
    shared: bool,
}

impl SimClock {
    /// A clock starting now.
    pub fn start(speed: f64, horizon: Duration) -> Self {
        let now_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self::with_anchor(RealInstant::now(), now_unix_ms, speed, horizon)
    }

    /// A clock with an explicit anchor (tests).
    pub fn with_anchor(
        real_start: RealInstant,
        real_start_unix_ms: u64,
        speed: f64,
        horizon: Duration,
    ) -> Self {
        let speed = speed.max(1e-3);
        let lead_ms = ((speed - 1.0).max(0.0) * horizon.as_secs_f64() * 1000.0) as u64;
        SimClock {
            real_start,
            sim_start_unix_ms: real_start_unix_ms.saturating_sub(lead_ms),
            speed,
            horizon,
            shared: false,
        }
    }

    /// The same clock, read by the gateway too: its time syncs apply as they come.
    #[must_use]
    pub fn shared_with_gateway(self) -> Self {
        SimClock { shared: true, ..self }
    }

    /// The device time to set from a gateway's time sync `gateway` received at real instant
    /// `t` when the wall clock reads `wall_unix_ms`. A gateway on this clock (shared), or a run
    /// at speed 1: the sync as it came. Otherwise the gateway is on the wall clock while
    /// devices run on the anchored, faster timeline, which is behind the wall clock until the
    /// horizon ends: setting a device to the wall clock would let it run `speed` times faster
    /// from there, ahead of every sink and of the gateway. So the sync is mapped onto this
    /// timeline — the gateway's time less how far this clock is behind the wall clock — and
    /// never past the wall clock.
    pub fn map_time_sync_at(
        &self,
        gateway: DeviceTime,
        t: RealInstant,
        wall_unix_ms: u64,
    ) -> DeviceTime {
        if self.shared || (self.speed - 1.0).abs() < 1e-9 {
            return gateway;
        }
        let sim_unix_s = self.unix_ms(self.sim_ms_at(t)) / 1000;
        let wall_s = wall_unix_ms / 1000;
        let behind = wall_s.saturating_sub(sim_unix_s);
        let mapped = gateway.unix_secs().saturating_sub(behind).min(wall_s);
        DeviceTime::from_unix_secs(mapped).unwrap_or(gateway)
    }

    /// [`SimClock::map_time_sync_at`] now.
    pub fn map_time_sync(&self, gateway: DeviceTime) -> DeviceTime {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.map_time_sync_at(gateway, RealInstant::now(), wall)
    }

    /// Simulated milliseconds since the run started, at real instant `t`.
    pub fn sim_ms_at(&self, t: RealInstant) -> u64 {
        let elapsed = t.saturating_duration_since(self.real_start);
        let fast = elapsed.min(self.horizon).as_secs_f64() * self.speed;
        let slow = elapsed.saturating_sub(self.horizon).as_secs_f64();
        ((fast + slow) * 1000.0) as u64
    }

    /// Simulated milliseconds since the start, now.
    pub fn sim_ms(&self) -> u64 {
        self.sim_ms_at(RealInstant::now())
    }

    /// The real instant at which the simulated clock reads `sim_ms` after the start.
    pub fn real_at(&self, sim_ms: u64) -> RealInstant {
        let sim_s = sim_ms as f64 / 1000.0;
        let fast_span = self.horizon.as_secs_f64() * self.speed;
        let real_s = if sim_s <= fast_span {
            sim_s / self.speed
        } else {
            self.horizon.as_secs_f64() + (sim_s - fast_span)
        };
        self.real_start + Duration::from_secs_f64(real_s.max(0.0))
    }

    /// The device instant (ms since the device booted at the run's start) now.
    pub fn device_now(&self) -> Instant {
        Instant::from_millis(self.sim_ms())
    }

    /// Simulated Unix time, ms, `sim_ms` after the start.
    pub fn unix_ms(&self, sim_ms: u64) -> u64 {
        self.sim_start_unix_ms + sim_ms
    }

    /// Device wall-clock time at the start of the run.
    pub fn start_device_time(&self) -> DeviceTime {
        DeviceTime::from_unix_secs(self.sim_start_unix_ms / 1000).unwrap_or_default()
    }

    /// The speed during the horizon.
    pub fn speed(&self) -> f64 {
        self.speed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulated_clock_meets_real_time_at_the_end_of_the_horizon() {
        let real = RealInstant::now();
        let unix = 1_800_000_000_000;
        let clock = SimClock::with_anchor(real, unix, 60.0, Duration::from_secs(600));
        // Starts 59 × 10 min = 590 min in the past.
        assert_eq!(clock.unix_ms(0), unix - 590 * 60_000);
        assert_eq!(clock.sim_ms_at(real + Duration::from_secs(1)), 60_000);
        let end = real + Duration::from_secs(600);
        assert_eq!(clock.unix_ms(clock.sim_ms_at(end)), unix + 600_000);
        // Afterwards it runs at real speed and never gets ahead of the wall clock.
        let later = end + Duration::from_secs(30);
        assert_eq!(clock.unix_ms(clock.sim_ms_at(later)), unix + 630_000);
        // real_at inverts sim_ms_at on both sides of the horizon.
        for sim_ms in [0, 1_000, 35_999_000, 36_000_000, 36_030_000] {
            let back = clock.sim_ms_at(clock.real_at(sim_ms));
            assert!(back.abs_diff(sim_ms) <= 1, "{sim_ms} -> {back}");
        }
    }

    #[test]
    fn a_time_sync_from_a_wall_clock_gateway_is_mapped_onto_the_anchored_clock() {
        let real = RealInstant::now();
        let unix: u64 = 1_800_000_000_000;
        let clock = SimClock::with_anchor(real, unix, 60.0, Duration::from_secs(600));
        // 100 s in: the simulated clock reads 90 min after its start, 490 min behind the wall.
        let t = real + Duration::from_secs(100);
        let wall = unix + 100_000;
        let sim_s = clock.unix_ms(clock.sim_ms_at(t)) / 1000;
        let gateway = DeviceTime::from_unix_secs(wall / 1000).unwrap();
        assert_eq!(
            clock.map_time_sync_at(gateway, t, wall).unix_secs(),
            sim_s,
            "an exact gateway: no change"
        );
        // A gateway 10 s ahead of true time moves the device 10 s on its own timeline.
        let ahead = DeviceTime::from_unix_secs(wall / 1000 + 10).unwrap();
        assert_eq!(clock.map_time_sync_at(ahead, t, wall).unix_secs(), sim_s + 10);
        // Never past the wall clock, however far ahead the gateway is.
        let far = DeviceTime::from_unix_secs(wall / 1000 + 1_000_000).unwrap();
        assert!(clock.map_time_sync_at(far, t, wall).unix_secs() <= wall / 1000);
        // A shared clock (the demo) and speed 1 take the sync as it comes.
        let shared = clock.shared_with_gateway();
        assert_eq!(shared.map_time_sync_at(gateway, t, wall), gateway);
        let real_speed = SimClock::with_anchor(real, unix, 1.0, Duration::from_secs(600));
        assert_eq!(real_speed.map_time_sync_at(gateway, t, wall), gateway);
    }

    #[test]
    fn speed_one_is_real_time() {
        let real = RealInstant::now();
        let clock = SimClock::with_anchor(real, 5_000_000, 1.0, Duration::from_secs(60));
        assert_eq!(clock.unix_ms(0), 5_000_000);
        assert_eq!(clock.sim_ms_at(real + Duration::from_secs(90)), 90_000);
    }
}
