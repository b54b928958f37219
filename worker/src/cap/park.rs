//! The parking lot: deliveries a worker keeps, unacked and holding no execution slot, for a
//! tenant at its `tenant_max_in_flight`, so that a tenant token coming free (this worker's own
//! attempt of that tenant ending, or a token back in the queue) finds a job at once instead of
//! one that is still in a wait lane. Pure bookkeeping, generic over what is parked; the effects
//! (basic.get, nack, the wait lane) are `cap/mod.rs`'s and the intake's.
//!
//! Bounds: per tenant at least its cap (this worker never holds more of its tokens, so that many
//! parked keep every one busy) and half the lot when that is more (a reserve for the hand-overs
//! while the rest of the backlog is in wait lanes); in all at most the step's concurrency, for
//! which the intake raises its prefetch, so parked deliveries never eat the prefetch other
//! tenants need, and a second capped tenant still finds room. A
//! delivery parked longer than `max_age` goes to a wait lane, far from `consumer_timeout`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a delivery stays parked at most before it goes to a wait lane.
pub(crate) const MAX_PARK: Duration = Duration::from_secs(30);

/// Parked deliveries of every tenant of one served step.
#[derive(Debug)]
pub(crate) struct Lot<T> {
    per_tenant: usize,
    total: usize,
    max_age: Duration,
    parked: HashMap<String, VecDeque<(Instant, T)>>,
    len: usize,
}

impl<T> Lot<T> {
    /// A lot holding at most `per_tenant` of one tenant and `total` in all.
    pub(crate) fn new(per_tenant: usize, total: usize, max_age: Duration) -> Self {
        Self {
            per_tenant,
            total,
            max_age,
            parked: HashMap::new(),
            len: 0,
        }
    }

    /// How many of `tenant`'s are parked.
    pub(crate) fn parked(&self, tenant: &str) -> usize {
        self.parked.get(tenant).map_or(0, VecDeque::len)
    }

    /// Parks `item` for `tenant`, or gives it back when either bound is reached.
    pub(crate) fn park(&mut self, tenant: &str, item: T, now: Instant) -> Result<(), T> {
        let mine = self.parked.get(tenant).map_or(0, VecDeque::len);
        if mine >= self.per_tenant || self.len >= self.total {
            return Err(item);
        }
        self.parked
            .entry(tenant.to_string())
            .or_default()
            .push_back((now, item));
        self.len += 1;
        Ok(())
    }

    /// The oldest parked delivery of `tenant`: it takes the token that came free.
    pub(crate) fn take(&mut self, tenant: &str) -> Option<T> {
        let queue = self.parked.get_mut(tenant)?;
        let (_, item) = queue.pop_front()?;
        if queue.is_empty() {
            self.parked.remove(tenant);
        }
        self.len -= 1;
        Some(item)
    }

    /// Takes out every delivery parked for `max_age` or longer at `now`.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<T> {
        let max_age = self.max_age;
        let mut out = Vec::new();
        self.parked.retain(|_, queue| {
            while queue
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= max_age)
            {
                out.extend(queue.pop_front().map(|(_, item)| item));
            }
            !queue.is_empty()
        });
        self.len -= out.len();
        out
    }

    /// Tenants with a parked delivery, longest waiting first: whose tokens to look for.
    pub(crate) fn tenants(&self) -> Vec<String> {
        let mut tenants: Vec<(Instant, &String)> = self
            .parked
            .iter()
            .filter_map(|(t, q)| q.front().map(|(at, _)| (*at, t)))
            .collect();
        tenants.sort();
        tenants.into_iter().map(|(_, t)| t.clone()).collect()
    }

    /// Takes out everything (shutdown: each goes back to its queue).
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.len = 0;
        self.parked
            .drain()
            .flat_map(|(_, q)| q.into_iter().map(|(_, item)| item))
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds_per_tenant_and_in_all() {
        let t0 = Instant::now();
        let mut lot = Lot::new(2, 3, MAX_PARK);
        assert_eq!(lot.park("a", 1, t0), Ok(()));
        assert_eq!(lot.park("a", 2, t0), Ok(()));
        assert_eq!(lot.park("a", 3, t0), Err(3), "a is at its cap");
        assert_eq!(lot.park("b", 4, t0), Ok(()));
        assert_eq!(lot.park("c", 5, t0), Err(5), "the lot is full");
        assert_eq!(lot.take("a"), Some(1), "oldest first");
        assert_eq!(lot.park("c", 5, t0), Ok(()));
        assert_eq!(lot.take("z"), None);
        assert_eq!(lot.len(), 3);
    }

    #[test]
    fn old_deliveries_leave_for_a_wait_lane() {
        let t0 = Instant::now();
        let mut lot = Lot::new(4, 8, Duration::from_secs(30));
        lot.park("a", 1, t0).unwrap();
        lot.park("b", 2, t0 + Duration::from_secs(10)).unwrap();
        lot.park("a", 3, t0 + Duration::from_secs(20)).unwrap();
        assert_eq!(lot.tenants(), ["a", "b"]);
        assert!(lot.expired(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(lot.expired(t0 + Duration::from_secs(30)), [1]);
        assert_eq!(lot.tenants(), ["b", "a"], "b now waits longest");
        let mut rest = lot.expired(t0 + Duration::from_secs(60));
        rest.sort();
        assert_eq!(rest, [2, 3]);
        assert_eq!((lot.len(), lot.tenants().len()), (0, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Park(u8),
        Take(u8),
        Expire(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4).prop_map(Op::Park),
            (0u8..4).prop_map(Op::Take),
            (0u8..40).prop_map(Op::Expire),
        ]
    }

    proptest! {
        /// Whatever happens, the bounds hold, each tenant's deliveries come out in order, and
        /// every delivery parked comes out exactly once (taken, expired or drained).
        #[test]
        fn bounds_hold_and_nothing_is_lost_or_doubled(
            per_tenant in 1usize..4,
            total in 1usize..8,
            ops in proptest::collection::vec(op(), 0..80),
        ) {
            let t0 = Instant::now();
            let mut lot = Lot::new(per_tenant, total, Duration::from_secs(30));
            let (mut parked, mut out) = (Vec::new(), Vec::new());
            for (n, op) in ops.into_iter().enumerate() {
                let now = t0 + Duration::from_secs(n as u64);
                match op {
                    Op::Park(t) => {
                        if lot.park(&t.to_string(), (t, n), now).is_ok() {
                            parked.push((t, n));
                        }
                    }
                    Op::Take(t) => {
                        if let Some(item) = lot.take(&t.to_string()) {
                            prop_assert_eq!(item.0, t);
                            prop_assert!(
                                !out.iter().any(|o: &(u8, usize)| o.0 == t && o.1 > item.1),
                                "in order"
                            );
                            out.push(item);
                        }
                    }
                    Op::Expire(back) => {
                        for item in lot.expired(now) {
                            prop_assert!(n - item.1 >= 30 || back > 100);
                            out.push(item);
                        }
                    }
                }
                prop_assert!(lot.len() <= total);
                for t in 0u8..4 {
                    let mine = parked.iter().filter(|p| p.0 == t).count()
                        - out.iter().filter(|o| o.0 == t).count();
                    prop_assert!(mine <= per_tenant);
                }
            }
            out.extend(lot.drain());
            prop_assert_eq!(lot.len(), 0);
            parked.sort();
            out.sort();
            prop_assert_eq!(parked, out);
        }
    }
}
