//! Reconnect backoff: exponential with jitter, pure (the caller supplies the randomness), so a
//! fleet that lost its broker does not come back in lock step.

/// Exponential backoff with "equal jitter": each delay is half the current cap plus a random
/// part of the other half, so retries spread out but never come back immediately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base_ms: u32,
    max_ms: u32,
    attempt: u32,
}

impl Backoff {
    /// Delays start around `base_ms` and double up to `max_ms`.
    pub const fn new(base_ms: u32, max_ms: u32) -> Self {
        Backoff { base_ms, max_ms, attempt: 0 }
    }

    /// The delay before the next attempt, given a uniformly random `random`.
    pub fn next_delay_ms(&mut self, random: u32) -> u32 {
        let cap = self.base_ms.checked_shl(self.attempt).unwrap_or(u32::MAX).min(self.max_ms);
        if cap < self.max_ms {
            self.attempt += 1;
        }
        let half = cap / 2;
        half + random % (cap - half + 1)
    }

    /// Attempts since the last success.
    pub const fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Call after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_within_their_jitter_band() {
        let mut b = Backoff::new(1_000, 60_000);
        let mut caps = std::vec::Vec::new();
        for _ in 0..10 {
            let lo = b.next_delay_ms(0);
            caps.push(lo);
        }
        assert_eq!(caps, [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000, 30_000]);
        let mut b = Backoff::new(1_000, 60_000);
        assert_eq!(b.next_delay_ms(u32::MAX - 1), 500 + (u32::MAX - 1) % 501);
        for r in [0, 7, 12_345, u32::MAX] {
            let mut b = Backoff::new(1_000, 60_000);
            for _ in 0..20 {
                let d = b.next_delay_ms(r);
                assert!((500..=60_000).contains(&d), "{d}");
            }
        }
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        // 1,000 devices with different random draws retry at many distinct times.
        let mut seen = std::collections::BTreeSet::new();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..1_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let mut b = Backoff::new(1_000, 60_000);
            b.next_delay_ms(0);
            b.next_delay_ms(0);
            seen.insert(b.next_delay_ms(x));
        }
        assert!(seen.len() > 500, "{}", seen.len());
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(100, 10_000);
        for _ in 0..5 {
            b.next_delay_ms(0);
        }
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay_ms(0), 50);
    }
}
