//! How many queues a namespace needs, and whether the broker's open-files limit holds them.
//!
//! Every queue keeps files open on every node that hosts it, and RabbitMQ 3.x refuses a new
//! connection's socket a handle once its file-handle cache is full: the AMQP handshake then hangs.
//! So a namespace too big for the limit does not fail at `warren topology apply`; it makes every
//! later connection hang. This module counts the queues of a [`Topology`], estimates their
//! handles, and compares them with what the management API reports ([`NodeFiles`],
//! [`QueueInfo`]). Pure: no I/O.
//!
//! The per-queue figures were measured on RabbitMQ 3.10 by declaring 100 queues of a type and
//! reading `rabbitmqctl status` ("File Descriptors", the file-handle cache's count) and the
//! process's open files: a quorum queue takes 3 handles from the cache but opens no file; a
//! classic queue takes and opens 1 once it holds messages; a stream opens 2 files that the cache
//! does not count.

use std::collections::BTreeSet;

use crate::management::{NodeFiles, QueueInfo};
use crate::names::Names;
use crate::topology::{Arg, Topology};

/// Handles one quorum queue takes on each node that hosts a replica (RabbitMQ 3.10; 725 quorum
/// queues held 2,172 in issue 16). They are the file-handle cache's, not open files, so
/// `fd_used` leaves them out.
pub const HANDLES_PER_QUORUM_QUEUE: u64 = 3;
/// Files one stream keeps open (its segment and index), on each node with a replica.
pub const HANDLES_PER_STREAM: u64 = 2;
/// Handles one classic queue takes once it holds messages (none while empty).
pub const HANDLES_PER_CLASSIC_QUEUE: u64 = 1;
/// The share of the limit counted as usable. RabbitMQ 3.x's file-handle cache hands out the
/// limit less about 100, sockets at most 90% of that; once it is used up, a new connection's
/// socket waits for a handle forever. 90% leaves room for connections.
pub const USABLE_PERCENT: u64 = 90;
/// Where the fix is documented.
pub const DOCS: &str = "docs/deploy.md, \"Open files\"";

/// The step queues of one pipeline: `steps × priorities × (shards + hot lanes)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineQueues {
    pub pipeline: String,
    pub steps: usize,
    pub priorities: usize,
    pub shards: usize,
    pub hot_lanes: usize,
    /// Step queues of the pipeline.
    pub queues: usize,
}

/// The queues of a namespace, by role and by type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueCounts {
    /// Step queues, per pipeline in config order.
    pub pipelines: Vec<PipelineQueues>,
    /// One per distinct retry delay.
    pub delay: usize,
    /// The dead-letter queue.
    pub dead_letter: usize,
    /// The results stream.
    pub results: usize,
    /// The control stream (hot-tenant marks).
    pub control: usize,
    /// The job history stream (`[history] enabled`).
    pub history: usize,
    /// The schedulers' tick and delay queues and their ledger stream.
    pub schedules: usize,
    pub quorum: usize,
    pub classic: usize,
    pub stream: usize,
}

impl QueueCounts {
    /// Counts the queues of `plan`, a namespace's topology with names from `names`.
    pub fn of(plan: &Topology, names: &Names) -> Self {
        let mut counts = QueueCounts::default();
        for queue in &plan.queues {
            match queue.argument("x-queue-type") {
                Some(Arg::Str(t)) if t == "stream" => counts.stream += 1,
                Some(Arg::Str(t)) if t == "classic" => counts.classic += 1,
                _ => counts.quorum += 1,
            }
            if let Some(route) = &queue.route {
                let at = match counts
                    .pipelines
                    .iter()
                    .position(|p| p.pipeline == route.pipeline)
                {
                    Some(at) => at,
                    None => {
                        counts.pipelines.push(PipelineQueues {
                            pipeline: route.pipeline.clone(),
                            steps: 0,
                            priorities: 0,
                            shards: 0,
                            hot_lanes: 0,
                            queues: 0,
                        });
                        counts.pipelines.len() - 1
                    }
                };
                counts.pipelines[at].queues += 1;
            } else if queue.name == names.dlq() {
                counts.dead_letter += 1;
            } else if queue.name == names.results_stream() {
                counts.results += 1;
            } else if queue.name == names.control_stream() {
                counts.control += 1;
            } else if queue.name == names.history_stream() {
                counts.history += 1;
            } else if [
                names.sched_tick_queue(),
                names.sched_delay_queue(),
                names.sched_stream(),
            ]
            .contains(&queue.name)
            {
                counts.schedules += 1;
            } else {
                counts.delay += 1;
            }
        }
        for p in &mut counts.pipelines {
            let routes = || {
                plan.step_queues()
                    .filter_map(|q| q.route.as_ref())
                    .filter(|r| r.pipeline == p.pipeline)
            };
            p.steps = routes().map(|r| &r.step).collect::<BTreeSet<_>>().len();
            p.priorities = routes().map(|r| r.priority).collect::<BTreeSet<_>>().len();
            let lanes: BTreeSet<_> = routes().map(|r| r.lane).collect();
            p.hot_lanes = lanes.iter().filter(|l| l.is_hot()).count();
            p.shards = lanes.len() - p.hot_lanes;
        }
        counts
    }

    pub fn step_queues(&self) -> usize {
        self.pipelines.iter().map(|p| p.queues).sum()
    }

    pub fn total(&self) -> usize {
        self.quorum + self.classic + self.stream
    }

    /// The handles these queues hold on a node that hosts all of them (a quorum queue has a
    /// replica on every node of a cluster of up to its group size, so on each node, usually).
    pub fn handles(&self) -> u64 {
        self.quorum as u64 * HANDLES_PER_QUORUM_QUEUE
            + self.stream as u64 * HANDLES_PER_STREAM
            + self.classic as u64 * HANDLES_PER_CLASSIC_QUEUE
    }
}

/// What a node's open-files limit says about adding `needed` handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    pub node: NodeFiles,
    /// Handles in use, estimated: [`in_use`].
    pub in_use: u64,
    /// Handles the file-handle cache hands out: [`USABLE_PERCENT`] of the limit.
    pub usable: u64,
    /// Handles the namespace adds (those of queues that exist already are in `in_use`).
    pub needed: u64,
}

impl FileCheck {
    /// Handles left once the namespace is there; negative when it does not fit.
    pub fn left(&self) -> i64 {
        self.usable as i64 - self.in_use as i64 - self.needed as i64
    }

    /// True when the namespace would use up the node's handles: new connections would hang.
    pub fn exhausts(&self) -> bool {
        self.left() <= 0
    }
}

/// The handles `node` has in use: its open files (`fd_used`: sockets, classic queues' and
/// streams' files) plus what every quorum queue with a replica there takes from the cache, which
/// `fd_used` does not show. It over-counts a little (the node's own files, streams), which errs
/// on the side of a warning.
pub fn in_use(node: &NodeFiles, queues: &[QueueInfo]) -> u64 {
    let quorum = queues
        .iter()
        .filter(|q| q.kind == "quorum" && (q.members.is_empty() || q.members.contains(&node.node)))
        .count() as u64;
    node.used + quorum * HANDLES_PER_QUORUM_QUEUE
}

/// Checks `needed` more handles against every node, given every queue of the broker, and
/// returns the tightest one (the node with the fewest handles left), or `None` when no node
/// reported its figures.
pub fn check_files(nodes: &[NodeFiles], queues: &[QueueInfo], needed: u64) -> Option<FileCheck> {
    nodes
        .iter()
        .map(|node| FileCheck {
            node: node.clone(),
            in_use: in_use(node, queues),
            usable: node.total * USABLE_PERCENT / 100,
            needed,
        })
        .min_by_key(FileCheck::left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::two_steps_two_shards;
    use proptest::prelude::*;
    use warren_common::config::QueueType;

    fn node(total: u64, used: u64) -> NodeFiles {
        NodeFiles {
            node: format!("rabbit@n{total}"),
            total,
            used,
        }
    }

    #[test]
    fn counts_step_queues_per_pipeline_and_the_others_by_role_and_type() {
        let mut config = two_steps_two_shards();
        config.history.enabled = true;
        let names = Names::new(&config.broker.namespace);
        let plan = Topology::plan(&config);
        let counts = QueueCounts::of(&plan, &names);

        assert_eq!(counts.total(), plan.queues.len());
        assert_eq!(counts.step_queues(), plan.step_queues().count());
        let p = &counts.pipelines[0];
        let lanes = p.shards + p.hot_lanes;
        assert_eq!(p.queues, p.steps * p.priorities * lanes, "{counts:?}");
        assert_eq!(
            (p.steps, p.priorities, p.shards, p.hot_lanes),
            (2, 3, 2, 2),
            "{counts:?}"
        );
        assert_eq!(
            (
                counts.dead_letter,
                counts.results,
                counts.control,
                counts.history,
                counts.schedules
            ),
            (1, 1, 1, 1, 0)
        );
        assert_eq!(
            counts.delay,
            crate::topology::retry_delays_ms(&config).len()
        );
        assert_eq!(
            counts.stream, 3,
            "the results, control and history streams (no schedules)"
        );
        assert_eq!(counts.quorum, counts.total() - 3, "quorum by default");
        assert_eq!(
            counts.handles(),
            counts.quorum as u64 * HANDLES_PER_QUORUM_QUEUE + 3 * HANDLES_PER_STREAM
        );
    }

    #[test]
    fn classic_queues_are_counted_as_classic() {
        let mut config = two_steps_two_shards();
        config.history.enabled = true;
        config.broker.queue_type = QueueType::Classic;
        let plan = Topology::plan(&config);
        let counts = QueueCounts::of(&plan, &Names::new(&config.broker.namespace));
        assert_eq!((counts.quorum, counts.classic), (0, plan.queues.len() - 3));
    }

    #[test]
    fn the_issue_16_namespace_does_not_fit_in_1024_files_but_fits_in_20000() {
        // 725 quorum queues (10 pipelines of 3 steps, 8 shards, delay queues and a DLQ) on the
        // default soft limit of 1,024: the cache hands out 921, the queues want 2,175.
        let counts = QueueCounts {
            quorum: 725,
            stream: 1,
            ..QueueCounts::default()
        };
        let check = check_files(&[node(1024, 40)], &[], counts.handles()).unwrap();
        assert!(check.exhausts(), "{check:?}");
        assert_eq!(check.usable, 921);
        let check = check_files(&[node(20_000, 40)], &[], counts.handles()).unwrap();
        assert!(!check.exhausts(), "{check:?}");
    }

    fn queue(kind: &str, members: &[&str]) -> QueueInfo {
        QueueInfo {
            vhost: "/".into(),
            name: format!("q-{kind}"),
            kind: kind.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn quorum_queues_of_the_broker_count_as_in_use_on_the_nodes_that_host_them() {
        // Given two nodes and, besides their open files, 2 quorum queues on both, 1 on the
        // second only, and a classic queue and a stream (their files are in fd_used already)
        let (a, b) = (node(20_000, 100), node(2_000, 100));
        let queues = [
            queue("quorum", &[&a.node, &b.node]),
            queue("quorum", &[&a.node, &b.node]),
            queue("quorum", &[&b.node]),
            queue("classic", &[]),
            queue("stream", &[&a.node]),
        ];
        assert_eq!(in_use(&a, &queues), 100 + 2 * HANDLES_PER_QUORUM_QUEUE);
        assert_eq!(in_use(&b, &queues), 100 + 3 * HANDLES_PER_QUORUM_QUEUE);

        // Then the tightest node is the one reported
        let check = check_files(&[a, b], &queues, 1_000).unwrap();
        assert_eq!(check.node.total, 2_000);
        assert_eq!(check.left(), 1_800 - 109 - 1_000);
        assert_eq!(check_files(&[], &queues, 1_000), None);
    }

    proptest! {
        #[test]
        fn exhausts_exactly_when_the_handles_do_not_fit(
            total in 0u64..1_000_000,
            used in 0u64..1_000_000,
            needed in 0u64..1_000_000,
        ) {
            let check = check_files(&[node(total, used)], &[], needed).unwrap();
            prop_assert_eq!(check.exhausts(), used + needed >= total * 9 / 10);
        }
    }
}
