//! Delays, pure and unit-tested: how long a failed step waits before its next attempt
//! ([`retry_delay`]), and how long a client waits between reconnection tries ([`Backoff`]).
//!
//! Both add jitter, so a crowd of jobs (or workers) that failed together does not come back
//! together. Randomness comes in as an argument where it matters, so tests can pin it.

use std::time::Duration;

/// Share of a retry delay that jitter may add or remove: a nominal 10 s becomes 9-11 s.
pub const RETRY_JITTER: f64 = 0.1;

/// The nominal delay before attempt `failed_attempt + 1`: the `failed_attempt`-th entry of the
/// step's `backoff` list (1-based), the last entry repeating. An empty list means no delay.
pub fn nominal_retry_delay(schedule: &[Duration], failed_attempt: u32) -> Duration {
    let index = (failed_attempt.max(1) - 1) as usize;
    schedule
        .get(index)
        .or(schedule.last())
        .copied()
        .unwrap_or(Duration::ZERO)
}

/// [`nominal_retry_delay`] with jitter: `unit` in `[0, 1)` picks a point in
/// `nominal × [1 - RETRY_JITTER, 1 + RETRY_JITTER)`.
pub fn retry_delay(schedule: &[Duration], failed_attempt: u32, unit: f64) -> Duration {
    let nominal = nominal_retry_delay(schedule, failed_attempt);
    let factor = 1.0 - RETRY_JITTER + 2.0 * RETRY_JITTER * unit.clamp(0.0, 1.0);
    nominal.mul_f64(factor)
}

/// A reconnection schedule: exponential from `min`, doubling, capped at `max`, with "equal
/// jitter" (each wait is between half and all of the exponential value), so reconnecting
/// clients spread out but never retry in a tight loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    tries: u32,
}

/// A [`Backoff`] whose bounds make no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backoff needs 0 < min <= max, got min {min:?} and max {max:?}")]
pub struct BackoffError {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn try_new(min: Duration, max: Duration) -> Result<Self, BackoffError> {
        if min.is_zero() || min > max {
            return Err(BackoffError { min, max });
        }
        Ok(Self { min, max, tries: 0 })
    }

    /// The schedule warren's clients use to reconnect to the broker: 100 ms up to 5 s.
    pub fn reconnect() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
            tries: 0,
        }
    }

    /// The wait before the next try, given a random `unit` in `[0, 1)`.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let exp = self
            .min
            .saturating_mul(2u32.saturating_pow(self.tries.min(31)))
            .min(self.max);
        self.tries = self.tries.saturating_add(1);
        exp.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// The wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    /// Back to the shortest wait, after a success.
    pub fn reset(&mut self) {
        self.tries = 0;
    }

    /// Tries made since the last reset.
    pub fn tries(&self) -> u32 {
        self.tries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(list: &[u64]) -> Vec<Duration> {
        list.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    #[test]
    fn schedule_walks_the_list_then_repeats_the_last() {
        let s = secs(&[1, 10, 60]);
        let got: Vec<u64> = (1..=5)
            .map(|a| nominal_retry_delay(&s, a).as_secs())
            .collect();
        assert_eq!(got, vec![1, 10, 60, 60, 60]);
        assert_eq!(nominal_retry_delay(&[], 3), Duration::ZERO);
        assert_eq!(nominal_retry_delay(&s, 0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_spans_ten_percent_either_way() {
        let s = secs(&[10]);
        assert_eq!(retry_delay(&s, 1, 0.0), Duration::from_secs(9));
        assert_eq!(retry_delay(&s, 1, 0.5), Duration::from_secs(10));
        assert!(retry_delay(&s, 1, 0.999_999) < Duration::from_secs(11));
    }

    #[test]
    fn reconnect_grows_to_the_cap_and_resets() {
        let mut b = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let top: Vec<u64> = (0..6)
            .map(|_| b.next_with(1.0).as_millis() as u64)
            .collect();
        assert_eq!(top, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_with(0.0), Duration::from_millis(50));
        assert_eq!(b.tries(), 1);
    }

    #[test]
    fn bad_bounds_are_refused() {
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }

    proptest! {
        #[test]
        fn retry_delay_stays_in_bounds(
            list in proptest::collection::vec(0u64..100_000, 1..6),
            attempt in 0u32..50,
            unit in 0.0f64..1.0,
        ) {
            let s: Vec<Duration> = list.iter().map(|ms| Duration::from_millis(*ms)).collect();
            let nominal = nominal_retry_delay(&s, attempt);
            let d = retry_delay(&s, attempt, unit);
            prop_assert!(d >= nominal.mul_f64(1.0 - RETRY_JITTER));
            prop_assert!(d <= nominal.mul_f64(1.0 + RETRY_JITTER));
        }

        #[test]
        fn reconnect_waits_stay_within_min_half_and_max(
            min_ms in 1u64..1_000, extra in 0u64..10_000, tries in 0usize..80, unit in 0.0f64..1.0,
        ) {
            let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(min_ms + extra));
            let mut b = Backoff::try_new(min, max).unwrap();
            for _ in 0..tries {
                b.next_with(unit);
            }
            let d = b.next_with(unit);
            prop_assert!(d >= min / 2 && d <= max);
        }
    }
}
