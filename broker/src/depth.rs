//! Queue depth through passive declares: works on any broker, no management plugin needed.
//!
//! A passive declare answers with two numbers: the messages *ready* for delivery and the
//! *consumers* attached. Messages delivered but not yet acked (a worker's prefetch, the steps it
//! is running) are in neither; only the management API (`messages_unacknowledged`) has them:
//! [`add_unacked`] fills them in when `[broker] management_url` is set.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::connection::{Broker, ReopenedChannel};
use crate::error::BrokerError;
use crate::management::Management;
use crate::route::StepRoute;

/// Ready (not yet delivered) messages in `queue`, or `None` when the queue does not exist.
pub async fn ready_messages(broker: &Broker, queue: &str) -> Result<Option<u32>, BrokerError> {
    let mut probe = Probe::new(broker);
    let found = probe.read(queue).await;
    probe.close().await;
    Ok(found?.map(|c| c.ready))
}

/// What a passive declare says about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Messages ready for delivery.
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// Passive declares on one channel, which stays open from one read to the next (a missing
/// queue's declare closes it; the next read opens another).
#[derive(Debug)]
pub struct Probe<'a> {
    channel: ReopenedChannel<'a>,
}

impl<'a> Probe<'a> {
    pub fn new(broker: &'a Broker) -> Self {
        Self {
            channel: ReopenedChannel::new(broker),
        }
    }

    /// The counts of `queue`, or `None` if it does not exist.
    pub async fn read(&mut self, queue: &str) -> Result<Option<Counts>, BrokerError> {
        let result = self
            .channel
            .get()
            .await?
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match result {
            Ok(q) => Ok(Some(Counts {
                ready: q.message_count(),
                consumers: q.consumer_count(),
            })),
            // The broker closed the channel with 404; the next read opens another.
            Err(e)
                if crate::error::server_reply(&e)
                    .is_some_and(|(_, text)| text.contains("NOT_FOUND")) =>
            {
                Ok(None)
            }
            Err(e) => Err(BrokerError::amqp(format!("read depth of {queue}"))(e)),
        }
    }

    /// Closes the channel, if one is open.
    pub async fn close(self) {
        self.channel.close().await;
    }
}

/// What a passive declare said about one step queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub route: StepRoute,
    /// The queue's name.
    pub queue: String,
    /// Ready messages; `None` when the queue does not exist (topology not applied).
    pub ready: Option<u32>,
    /// Consumers attached; `None` when the queue does not exist.
    pub consumers: Option<u32>,
    /// Delivered but not yet acked; `None` unless read from the management API.
    pub unacked: Option<u64>,
}

impl QueueDepth {
    /// The work waiting in the queue or in a consumer's hands: ready plus unacked (as far as
    /// it is known).
    pub fn backlog(&self) -> u64 {
        u64::from(self.ready.unwrap_or(0)) + self.unacked.unwrap_or(0)
    }
}

/// Reads the depth of each route's queue through one [`Probe`]. A missing queue is reported,
/// not an error.
pub async fn read_depths(
    broker: &Broker,
    routes: &[StepRoute],
) -> Result<Vec<QueueDepth>, BrokerError> {
    let mut probe = Probe::new(broker);
    let mut depths = Vec::with_capacity(routes.len());
    for route in routes {
        let queue = route.queue(broker.names());
        let found = match probe.read(&queue).await {
            Ok(found) => found,
            Err(e) => {
                probe.close().await;
                return Err(e);
            }
        };
        depths.push(QueueDepth {
            route: route.clone(),
            queue,
            ready: found.map(|c| c.ready),
            consumers: found.map(|c| c.consumers),
            unacked: None,
        });
    }
    probe.close().await;
    Ok(depths)
}

/// Fills in the unacked count of every queue that exists, from the management API. A queue
/// the API does not list yet (just declared) counts 0.
pub async fn add_unacked(
    management: &Management,
    namespace_prefix: &str,
    depths: &mut [QueueDepth],
) -> Result<(), BrokerError> {
    let unacked = management.unacked(namespace_prefix).await?;
    for d in depths.iter_mut().filter(|d| d.ready.is_some()) {
        d.unacked = Some(unacked.get(&d.queue).copied().unwrap_or(0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Lane;
    use warren_common::Priority;

    #[test]
    fn backlog_is_ready_plus_what_is_known_unacked() {
        let route = StepRoute {
            pipeline: "p".into(),
            step: "a".into(),
            priority: Priority::Normal,
            lane: Lane::Shard(0),
        };
        let depth = |ready, unacked| QueueDepth {
            route: route.clone(),
            queue: "ns.q.p.a.normal.0".into(),
            ready,
            consumers: ready.map(|_| 1),
            unacked,
        };
        assert_eq!(depth(Some(7), None).backlog(), 7);
        assert_eq!(depth(Some(7), Some(5)).backlog(), 12);
        assert_eq!(depth(None, None).backlog(), 0);
    }
}
