//! Which tenant dominates a lane: a pure window over the tenants of a lane's last deliveries,
//! tested without a broker or a clock. A worker keeps one per lane it serves; when one tenant
//! holds at least `share` of a full enough window, it becomes a candidate for a hot mark, and the
//! effects side (`fairness/mod.rs`) checks the lane's depth before marking it.

use std::collections::{HashMap, VecDeque};

/// Deliveries a window remembers.
pub(crate) const WINDOW: usize = 200;
/// Deliveries a window must have seen before it names anyone: a lane that just woke up has too
/// few to tell a flood from chance.
pub(crate) const MIN_SEEN: usize = 50;
/// Shortest time between two depth checks of one lane, so a flood costs one probe a second.
pub(crate) const PROBE_EVERY_MS: u64 = 1_000;

/// The tenants of one lane's last [`WINDOW`] deliveries.
#[derive(Debug, Default)]
pub(crate) struct LaneWatch {
    recent: VecDeque<String>,
    counts: HashMap<String, usize>,
    last_probe_ms: Option<u64>,
    /// Deliveries since the last [`LaneWatch::take_fresh`]: whether the lane is worth a digest.
    fresh: usize,
}

impl LaneWatch {
    /// Counts one delivery of `tenant` at `now_ms`, and names the tenant when it holds at least
    /// `share` of the window and the lane was not probed in the last [`PROBE_EVERY_MS`].
    pub(crate) fn observe(&mut self, tenant: &str, share: f64, now_ms: u64) -> Option<&str> {
        if self.recent.len() == WINDOW {
            if let Some(old) = self.recent.pop_front() {
                if let Some(n) = self.counts.get_mut(&old) {
                    *n -= 1;
                    if *n == 0 {
                        self.counts.remove(&old);
                    }
                }
            }
        }
        self.recent.push_back(tenant.to_string());
        self.fresh += 1;
        let count = match self.counts.get_mut(tenant) {
            Some(count) => count,
            None => self.counts.entry(tenant.to_string()).or_default(),
        };
        *count += 1;
        let dominant =
            self.recent.len() >= MIN_SEEN && *count as f64 >= share * self.recent.len() as f64;
        let due = self
            .last_probe_ms
            .is_none_or(|last| now_ms.saturating_sub(last) >= PROBE_EVERY_MS);
        if dominant && due {
            self.last_probe_ms = Some(now_ms);
            return self.recent.back().map(String::as_str);
        }
        None
    }

    /// Deliveries since the last call.
    pub(crate) fn take_fresh(&mut self) -> usize {
        std::mem::take(&mut self.fresh)
    }

    /// Deliveries in the window.
    pub(crate) fn seen(&self) -> usize {
        self.recent.len()
    }

    /// The tenants of the window with their deliveries, most first.
    pub(crate) fn top(&self, n: usize) -> Vec<(String, usize)> {
        let mut all: Vec<_> = self.counts.iter().map(|(t, c)| (t.clone(), *c)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// The tenants with at least `hot_depth` of `tenants` (a fan-out's parts, one entry per part):
/// a flood in one go, as a producer's bulk submit of that many is. Sorted, for a stable order.
pub(crate) fn bulk_floods<'a>(
    tenants: impl IntoIterator<Item = &'a str>,
    hot_depth: u32,
) -> Vec<&'a str> {
    let mut counts: HashMap<&str, u32> = HashMap::new();
    for tenant in tenants {
        *counts.entry(tenant).or_default() += 1;
    }
    let mut floods: Vec<&str> = counts
        .into_iter()
        .filter(|&(_, n)| n >= hot_depth)
        .map(|(tenant, _)| tenant)
        .collect();
    floods.sort_unstable();
    floods
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_fan_out_floods_with_the_tenants_it_gives_hot_depth_parts_or_more() {
        let parts = ["a"; 500].into_iter().chain(["b"; 499]).chain(["c"; 900]);
        assert_eq!(bulk_floods(parts, 500), vec!["a", "c"]);
        assert!(bulk_floods(["a"; 10], 500).is_empty());
    }

    #[test]
    fn a_flood_is_named_once_a_second_and_fair_traffic_never() {
        let mut watch = LaneWatch::default();
        let mut named = Vec::new();
        // 40 small tenants in turn: each holds 2.5% of the window.
        for i in 0..1_000u64 {
            if let Some(t) = watch.observe(&format!("t{}", i % 40), 0.1, i) {
                named.push(t.to_string());
            }
        }
        assert!(named.is_empty(), "{named:?}");
        // One tenant sends every other delivery: named as soon as the window has enough, then
        // again only after PROBE_EVERY_MS.
        let mut at = Vec::new();
        for i in 0..2_000u64 {
            let tenant = if i % 2 == 0 {
                "flood".to_string()
            } else {
                format!("t{}", i % 40)
            };
            if let Some(t) = watch.observe(&tenant, 0.1, 10_000 + i) {
                assert_eq!(t, "flood");
                at.push(i);
            }
        }
        // Its 20th delivery gives it 10% of the (already full) window.
        assert_eq!(at.first(), Some(&38));
        assert!(
            at.windows(2).all(|w| w[1] - w[0] >= PROBE_EVERY_MS),
            "{at:?}"
        );
        assert_eq!(watch.top(1), vec![("flood".to_string(), WINDOW / 2)]);
        assert_eq!((watch.take_fresh(), watch.take_fresh()), (3_000, 0));
        assert_eq!(watch.seen(), WINDOW);
    }

    #[test]
    fn a_young_window_names_nobody() {
        let mut watch = LaneWatch::default();
        for i in 0..(MIN_SEEN as u64 - 1) {
            assert_eq!(watch.observe("only", 0.1, i * 10_000), None);
        }
        assert_eq!(watch.observe("only", 0.1, u64::MAX / 2), Some("only"));
    }

    proptest! {
        #[test]
        fn counts_match_the_window(tenants in proptest::collection::vec(0u8..8, 0..600)) {
            let mut watch = LaneWatch::default();
            for t in &tenants {
                watch.observe(&t.to_string(), 1.0, 0);
            }
            let window = &tenants[tenants.len().saturating_sub(WINDOW)..];
            let total: usize = watch.top(usize::MAX).iter().map(|(_, c)| c).sum();
            prop_assert_eq!(total, window.len());
            for (tenant, count) in watch.top(usize::MAX) {
                let expected = window.iter().filter(|t| t.to_string() == tenant).count();
                prop_assert_eq!(count, expected);
            }
        }
    }
}
