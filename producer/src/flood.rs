//! A producer's own view of a flood: how many jobs of each tenant it submitted lately. A bulk
//! submit of `hot_depth` jobs of one tenant, or that many within [`WINDOW_MS`], marks the tenant
//! hot before the first of them is published, so the flood never enters the shard it shares
//! with others (moving it there afterwards would cost a publish and an ack per job). Pure: the
//! time comes in as an argument.

use std::collections::HashMap;

use warren_broker::HotReason;

/// The window a producer counts a tenant's submits in.
pub(crate) const WINDOW_MS: u64 = 10_000;

/// Jobs submitted per (pipeline, tenant) in the current window.
#[derive(Debug, Default)]
pub(crate) struct Floods {
    window_start_ms: u64,
    counts: HashMap<(String, String), u64>,
}

impl Floods {
    /// Counts `n` jobs of `tenant` in `pipeline` submitted together at `now_ms`, and says why
    /// they make a flood, if they do: `n` alone reaching `hot_depth` is a bulk flood, the window's
    /// count reaching it a rate flood.
    pub(crate) fn count(
        &mut self,
        pipeline: &str,
        tenant: &str,
        n: u64,
        now_ms: u64,
        hot_depth: u32,
    ) -> Option<HotReason> {
        if now_ms.saturating_sub(self.window_start_ms) >= WINDOW_MS {
            self.counts.clear();
            self.window_start_ms = now_ms;
        }
        let count = self
            .counts
            .entry((pipeline.to_string(), tenant.to_string()))
            .or_default();
        *count += n;
        let depth = u64::from(hot_depth);
        if n >= depth {
            Some(HotReason::Bulk)
        } else if *count >= depth {
            Some(HotReason::Rate)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bulk_submit_or_a_steady_stream_of_one_tenant_is_a_flood() {
        let mut floods = Floods::default();
        assert_eq!(floods.count("p", "big", 500, 0, 500), Some(HotReason::Bulk));
        assert_eq!(floods.count("p", "small", 499, 0, 500), None);
        // One at a time, the 500th within the window is the flood.
        let mut f = Floods::default();
        let reasons: Vec<_> = (0..500)
            .map(|i| f.count("p", "t", 1, i * 10, 500))
            .collect();
        assert!(reasons[..499].iter().all(Option::is_none));
        assert_eq!(reasons[499], Some(HotReason::Rate));
        // Other tenants and pipelines count apart; a new window starts from zero.
        assert_eq!(f.count("q", "t", 1, 5_000, 500), None);
        assert_eq!(f.count("p", "t", 1, WINDOW_MS + 10, 500), None);
    }

    proptest! {
        #[test]
        fn under_the_depth_in_a_window_is_never_a_flood(
            batches in proptest::collection::vec(1u64..50, 1..40),
            depth in 100u32..2_000,
        ) {
            let mut floods = Floods::default();
            let mut total = 0;
            for n in batches {
                total += n;
                let reason = floods.count("p", "t", n, 1, depth);
                prop_assert_eq!(reason.is_some(), total >= u64::from(depth));
            }
        }
    }
}
