//! How long a delivery whose tenant is at its `tenant_max_in_flight` waits before it comes back:
//! a pure schedule, growing with the waits it has had, so a tenant far over its cap costs a
//! few moves a second, not a hot loop.

use std::time::Duration;

use warren_broker::tokens::CAP_WAIT_DELAYS_MS;

/// Header counting a message's waits so far (a string, like the dead-letter headers).
pub(crate) const WAITS_HEADER: &str = "x-warren-cap-waits";

/// Waits of a draining tenant's job that stay at the shortest (40 x 250 ms = 10 s).
const DRAINING_SHORT_WAITS: u32 = 40;

/// One wait in a wait lane.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Wait {
    /// Waits counted once this one is done (the header's next value).
    pub(crate) waits: u32,
    /// The delay queue it goes through.
    pub(crate) nominal: Duration,
    /// Its own TTL: `nominal` with ±10% jitter, so waiters spread out.
    pub(crate) delay: Duration,
}

/// The wait after `waits_so_far` earlier ones; `jitter` in `[0, 1)`. While `draining` (the
/// worker has deliveries of the tenant parked, so its tokens are busy and will want more work
/// soon), the first [`DRAINING_SHORT_WAITS`] waits stay at the shortest: a long wait would
/// leave the tokens idle at the end of the backlog. Past them the schedule grows as usual, so
/// a huge backlog costs a few moves a second per job, not four.
pub(crate) fn next_wait(waits_so_far: u32, draining: bool, jitter: f64) -> Wait {
    let step = if draining && waits_so_far < DRAINING_SHORT_WAITS {
        0
    } else {
        (waits_so_far as usize).min(CAP_WAIT_DELAYS_MS.len() - 1)
    };
    let nominal = Duration::from_millis(CAP_WAIT_DELAYS_MS[step]);
    Wait {
        waits: waits_so_far.saturating_add(1),
        nominal,
        delay: nominal.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_then_stay_at_the_longest() {
        let nominal = |n| next_wait(n, false, 0.5).nominal.as_millis() as u64;
        assert_eq!(
            (0..6).map(nominal).collect::<Vec<_>>(),
            [250, 1_000, 4_000, 4_000, 4_000, 4_000]
        );
        assert_eq!(next_wait(0, false, 0.0).waits, 1);
        assert_eq!(next_wait(u32::MAX, false, 0.0).waits, u32::MAX);
    }

    #[test]
    fn a_draining_tenant_waits_short_for_a_while() {
        let nominal = |n| next_wait(n, true, 0.5).nominal.as_millis() as u64;
        assert_eq!(
            [0, 1, 39, 40, 41].map(nominal),
            [250, 250, 250, 4_000, 4_000]
        );
        assert_eq!(next_wait(7, true, 0.0).waits, 8, "the count still grows");
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for j in [0.0, 0.3, 0.999, 1.0, 7.0] {
            let w = next_wait(1, false, j);
            assert!(
                w.delay >= Duration::from_millis(900) && w.delay <= Duration::from_millis(1_100)
            );
        }
    }
}
