//! Which member of `[broker] urls` a process dials, and in which order: a random member first
//! (or the first listed), then whichever last worked, moving on to the next member in turn when
//! one refuses or its connection is lost. Every [`Broker`](crate::Broker) of the process with the
//! same members shares one [`Members`], so a worker that reconnects after losing its node tries
//! the next node first, not the dead one again. Dialling itself is `dial.rs`'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use warren_common::config::{BrokerConfig, ConnectOrder};

/// The members of one cluster, and the one to try first.
#[derive(Debug)]
pub(crate) struct Members {
    urls: Vec<String>,
    preferred: AtomicUsize,
}

type Registry = Mutex<HashMap<(Vec<String>, ConnectOrder), Arc<Members>>>;

impl Members {
    /// The process's one `Members` for these URLs, made on first use: where it starts is drawn
    /// once per process, so the processes of a cluster spread over its nodes.
    pub(crate) fn shared(config: &BrokerConfig) -> Arc<Self> {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        let registry = REGISTRY.get_or_init(Registry::default);
        let mut registry = registry.lock().unwrap_or_else(|e| e.into_inner());
        let key = (config.urls.clone(), config.connect_order);
        Arc::clone(registry.entry(key).or_insert_with(|| {
            let first = match config.connect_order {
                ConnectOrder::Random => rand::random_range(0..config.urls.len().max(1)),
                ConnectOrder::Listed => 0,
            };
            Arc::new(Self::new(config.urls.clone(), first))
        }))
    }

    fn new(urls: Vec<String>, first: usize) -> Self {
        Self {
            preferred: AtomicUsize::new(first % urls.len().max(1)),
            urls,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.urls.len()
    }

    pub(crate) fn url(&self, member: usize) -> &str {
        &self.urls[member]
    }

    /// The member tried first now: the one connected to, while that lasts.
    pub(crate) fn current(&self) -> &str {
        self.url(self.preferred.load(Ordering::Relaxed))
    }

    /// Every member once, the preferred one first, then the others in list order from there.
    pub(crate) fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let first = self.preferred.load(Ordering::Relaxed);
        (0..self.len()).map(move |i| (first + i) % self.len())
    }

    /// `member` took a connection: try it first from now on.
    pub(crate) fn connected(&self, member: usize) {
        self.preferred.store(member, Ordering::Relaxed);
    }

    /// A connection to `member` was lost: the next dial starts at the member after it, unless
    /// another connection has moved on already.
    pub(crate) fn lost(&self, member: usize) {
        let next = (member + 1) % self.len();
        let _ = self
            .preferred
            .compare_exchange(member, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize, first: usize) -> Members {
        Members::new((0..n).map(|i| format!("amqp://node{i}")).collect(), first)
    }

    #[test]
    fn one_url_is_the_only_choice() {
        let m = members(1, 0);
        assert_eq!(m.order().collect::<Vec<_>>(), [0]);
        m.lost(0);
        assert_eq!(m.order().collect::<Vec<_>>(), [0]);
        assert_eq!(m.current(), "amqp://node0");
    }

    #[test]
    fn every_member_is_tried_once_from_the_preferred_one() {
        let m = members(3, 1);
        assert_eq!(m.order().collect::<Vec<_>>(), [1, 2, 0]);
        // A dial that got through to the last one tried makes it the first from then on
        m.connected(0);
        assert_eq!(m.order().collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn a_lost_member_is_tried_last() {
        let m = members(3, 2);
        m.lost(2);
        assert_eq!(m.order().collect::<Vec<_>>(), [0, 1, 2]);
        // A second connection to the same node that is lost later moves nothing on again
        m.lost(2);
        assert_eq!(m.current(), "amqp://node0");
    }

    #[test]
    fn the_first_member_is_random_unless_listed() {
        let urls: Vec<String> = (0..3).map(|i| format!("amqp://spread{i}")).collect();
        let config = |order| BrokerConfig {
            urls: urls.clone(),
            connect_order: order,
            ..BrokerConfig::default()
        };
        let listed = Members::shared(&config(ConnectOrder::Listed));
        assert_eq!(listed.current(), "amqp://spread0");
        // The same process gets the same instance back, so what it learnt is kept
        listed.connected(2);
        assert_eq!(
            Members::shared(&config(ConnectOrder::Listed)).current(),
            "amqp://spread2"
        );
        // A random start is a member, and every member follows it once
        let random = Members::shared(&config(ConnectOrder::Random));
        let mut order: Vec<_> = random.order().collect();
        order.sort();
        assert_eq!(order, [0, 1, 2]);
    }
}
