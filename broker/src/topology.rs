//! The exchanges and queues a config implies, computed as plain data ([`Topology::plan`]) and
//! then declared, idempotently, on the broker. Declaring the same config twice is a no-op; a
//! queue that exists with other arguments is a [`TopologyError::Conflict`] naming it.

use std::collections::BTreeSet;
use std::future::Future;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use warren_common::config::{Config, QueueType};

use crate::connection::Broker;
use crate::error::{server_reply, BrokerError, TopologyError};
use crate::names::Names;
use crate::route::StepRoute;
use crate::spread::spread;
use crate::tokens::{TokenQueue, CAP_WAIT_DELAYS_MS};

/// How long the results stream keeps events.
pub const RESULTS_MAX_AGE: &str = "7D";

/// How long the results check queue keeps an event no worker took: an hour, far past
/// `[results] check_after`.
pub const RESULTS_CHECK_TTL_MS: i64 = 3_600_000;

/// How long the schedules' ledger keeps records. The leader writes each schedule's state again
/// at least daily, so pauses and the last fired slots outlive this.
pub const SCHED_MAX_AGE: &str = "7D";

/// Segment size of the ledger: small, so retention can drop old segments of a quiet stream
/// (RabbitMQ removes whole segments only, and the default is 500 MB).
pub const SCHED_SEGMENT_BYTES: i64 = 4 * 1024 * 1024;

/// Segment size of the history stream: retention drops whole segments, so smaller ones keep
/// the stream close to its `retention`; big enough that a busy cluster makes few files.
pub const HISTORY_SEGMENT_BYTES: i64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeType,
}

/// The exchange types warren uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    /// The tasks exchange: a routing key names one step queue.
    Direct,
    /// The events exchange: result keys, read by pattern.
    Topic,
    /// In front of a delay queue: every retry, whatever its routing key.
    Fanout,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Topic => "topic",
            ExchangeType::Fanout => "fanout",
        }
    }

    fn kind(self) -> ExchangeKind {
        match self {
            ExchangeType::Direct => ExchangeKind::Direct,
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Fanout => ExchangeKind::Fanout,
        }
    }
}

impl std::fmt::Display for ExchangeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value of one `x-*` queue argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Str(String),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    /// The route whose messages it holds, when it is a step queue.
    pub route: Option<StepRoute>,
    /// `x-*` arguments.
    pub arguments: Vec<(&'static str, Arg)>,
    /// (exchange, routing key) pairs.
    pub bindings: Vec<(String, String)>,
}

impl QueueSpec {
    /// The value of argument `key`, if the plan sets it.
    pub fn argument(&self, key: &str) -> Option<&Arg> {
        self.arguments
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// Everything one namespace needs on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
    /// The `max_in_flight` token queues, filled once by [`Topology::declare`].
    pub tokens: Vec<TokenQueue>,
}

impl Topology {
    /// Pure: config in, names and arguments out.
    pub fn plan(config: &Config) -> Self {
        let names = Names::new(&config.broker.namespace);
        let tasks = names.tasks_exchange();
        let events = names.events_exchange();
        let queue_type = config.broker.queue_type;
        let str_arg = |s: &str| Arg::Str(s.to_string());
        // Messages that leave a queue through the broker's own dead-lettering must arrive, not
        // vanish: quorum queues promise that only with this strategy (which needs
        // reject-publish overflow). Classic queues have no such option.
        let dead_letter_to = |exchange: &str, routing_key: Option<String>| {
            let mut args = vec![("x-dead-letter-exchange", str_arg(exchange))];
            if let Some(key) = routing_key {
                args.push(("x-dead-letter-routing-key", Arg::Str(key)));
            }
            args.push(("x-overflow", str_arg("reject-publish")));
            if queue_type == QueueType::Quorum {
                args.push(("x-dead-letter-strategy", str_arg("at-least-once")));
            }
            args
        };
        let mut queues = Vec::new();
        for route in StepRoute::all(config) {
            let pipeline = config
                .pipeline(&route.pipeline)
                .expect("a route of the config names one of its pipelines");
            let mut arguments = vec![
                ("x-queue-type", str_arg(queue_type.as_str())),
                // Backpressure: a full lane refuses publishes (a negative confirm) instead of
                // growing without bound.
                (
                    "x-max-length",
                    Arg::Int(i64::from(pipeline.max_queue_length)),
                ),
            ];
            // Only the broker dead-letters from a step queue (workers never reject): RabbitMQ
            // 4's quorum delivery limit. Such a message goes to the dead-letter queue instead
            // of being dropped.
            arguments.extend(dead_letter_to("", Some(names.dlq())));
            queues.push(QueueSpec {
                name: route.queue(&names),
                arguments,
                bindings: vec![(tasks.clone(), route.routing_key())],
                route: Some(route),
            });
        }
        let mut exchanges = vec![
            ExchangeSpec {
                name: tasks.clone(),
                kind: ExchangeType::Direct,
            },
            ExchangeSpec {
                name: events.clone(),
                kind: ExchangeType::Topic,
            },
        ];
        for delay_ms in retry_delays_ms(config) {
            let mut arguments = vec![("x-queue-type", str_arg(queue_type.as_str()))];
            // When a retry's TTL runs out it goes back to the tasks exchange, under the step
            // routing key it was published with.
            arguments.extend(dead_letter_to(&tasks, None));
            exchanges.push(ExchangeSpec {
                name: names.delay_exchange(delay_ms),
                kind: ExchangeType::Fanout,
            });
            queues.push(QueueSpec {
                name: names.delay_queue(delay_ms),
                route: None,
                arguments,
                bindings: vec![(names.delay_exchange(delay_ms), String::new())],
            });
        }
        queues.push(QueueSpec {
            name: names.dlq(),
            route: None,
            arguments: vec![("x-queue-type", str_arg(queue_type.as_str()))],
            bindings: vec![],
        });
        queues.push(QueueSpec {
            name: names.results_stream(),
            route: None,
            arguments: vec![
                ("x-queue-type", str_arg("stream")),
                ("x-max-age", str_arg(RESULTS_MAX_AGE)),
            ],
            bindings: vec![(events.clone(), Names::EVERY_RESULT.to_string())],
        });
        if config.checks_results() {
            queues.push(QueueSpec {
                name: names.results_check(),
                route: None,
                arguments: vec![
                    ("x-queue-type", str_arg("quorum")),
                    ("x-single-active-consumer", Arg::Bool(true)),
                    // Bounded when no worker checks (all stopped, or all with the check off).
                    ("x-message-ttl", Arg::Int(RESULTS_CHECK_TTL_MS)),
                ],
                // Workers publish their results' copies to it in batches, by name.
                bindings: vec![],
            });
        }
        queues.push(QueueSpec {
            name: names.control_stream(),
            route: None,
            arguments: vec![
                ("x-queue-type", str_arg("stream")),
                ("x-max-age", str_arg(crate::control::CONTROL_MAX_AGE)),
            ],
            bindings: vec![(events.clone(), crate::control::CONTROL_BINDING.to_string())],
        });
        let fans_out = config
            .pipelines
            .iter()
            .any(|p| p.steps.iter().any(|s| s.fan_out.is_some()));
        if fans_out {
            queues.push(QueueSpec {
                name: names.fanin_stream(),
                route: None,
                arguments: vec![
                    ("x-queue-type", str_arg("stream")),
                    ("x-max-age", str_arg(RESULTS_MAX_AGE)),
                ],
                bindings: vec![(events, crate::fanin::FANIN_BINDING.to_string())],
            });
            queues.push(QueueSpec {
                name: names.fanin_checkpoints(),
                route: None,
                arguments: vec![
                    ("x-queue-type", str_arg("stream")),
                    ("x-max-age", str_arg(RESULTS_MAX_AGE)),
                    (
                        "x-stream-max-segment-size-bytes",
                        Arg::Int(16 * 1024 * 1024),
                    ),
                    ("x-max-length-bytes", Arg::Int(256 * 1024 * 1024)),
                ],
                bindings: vec![],
            });
        }
        // Declared only when on; turning history off later leaves the stream (and its events)
        // until the namespace is deleted.
        if config.history.enabled {
            queues.push(QueueSpec {
                name: names.history_stream(),
                route: None,
                arguments: vec![
                    ("x-queue-type", str_arg("stream")),
                    ("x-max-age", Arg::Str(config.history.max_age())),
                    (
                        "x-stream-max-segment-size-bytes",
                        Arg::Int(HISTORY_SEGMENT_BYTES),
                    ),
                ],
                bindings: vec![],
            });
        }
        // The schedulers' tick circulates between the first two; declared only for a config
        // with schedules (a worker declares its topology at start, so adding one later works).
        if !config.schedules.is_empty() {
            let mut tick = vec![("x-queue-type", str_arg(queue_type.as_str()))];
            tick.push(("x-single-active-consumer", Arg::Bool(true)));
            queues.push(QueueSpec {
                name: names.sched_tick_queue(),
                route: None,
                arguments: tick,
                bindings: vec![],
            });
            let mut delay = vec![("x-queue-type", str_arg(queue_type.as_str()))];
            delay.extend(dead_letter_to("", Some(names.sched_tick_queue())));
            queues.push(QueueSpec {
                name: names.sched_delay_queue(),
                route: None,
                arguments: delay,
                bindings: vec![],
            });
            queues.push(QueueSpec {
                name: names.sched_stream(),
                route: None,
                arguments: vec![
                    ("x-queue-type", str_arg("stream")),
                    ("x-max-age", str_arg(SCHED_MAX_AGE)),
                    (
                        "x-stream-max-segment-size-bytes",
                        Arg::Int(SCHED_SEGMENT_BYTES),
                    ),
                ],
                bindings: vec![],
            });
        }
        Self {
            exchanges,
            queues,
            tokens: crate::tokens::step_caps(config),
        }
    }

    /// Declares every exchange, queue and binding. Safe to run any number of times. The
    /// declares are spread over a few channels (`spread.rs`); when some conflict, every other one
    /// is still made, and the first conflict in plan order is the error.
    pub async fn declare(&self, broker: &Broker) -> Result<(), TopologyError> {
        // Exchanges first: the queues' bindings need them.
        let exchanges: Vec<_> = self.exchanges.iter().collect();
        declare_all(broker, &exchanges, declare_exchange).await?;
        let queues: Vec<_> = self.queues.iter().collect();
        declare_all(broker, &queues, declare_queue).await?;
        for tokens in &self.tokens {
            tokens.ensure(broker).await?;
        }
        Ok(())
    }

    /// Deletes every queue and exchange of the plan, messages included. Missing ones are fine.
    pub async fn delete(&self, broker: &Broker) -> Result<(), BrokerError> {
        let mut queues = self.queues.clone();
        for tokens in &self.tokens {
            for name in [tokens.name(), tokens.marker_name()] {
                queues.push(QueueSpec {
                    name,
                    route: None,
                    arguments: vec![],
                    bindings: vec![],
                });
            }
        }
        let queues: Vec<_> = queues.iter().collect();
        let deleted = spread(broker, &queues, delete_queue).await?;
        deleted.into_iter().find(Result::is_err).transpose()?;
        let exchanges: Vec<_> = self.exchanges.iter().collect();
        let deleted = spread(broker, &exchanges, delete_exchange).await?;
        deleted.into_iter().find(Result::is_err).transpose()?;
        Ok(())
    }

    /// The step queues only (not the delay queues, the dead-letter queue or the results stream).
    pub fn step_queues(&self) -> impl Iterator<Item = &QueueSpec> {
        self.queues.iter().filter(|q| q.route.is_some())
    }

    /// Every queue that holds work or dead letters: all but the streams and the results check
    /// queue.
    pub fn work_queues(&self) -> impl Iterator<Item = &QueueSpec> {
        self.queues.iter().filter(|q| {
            q.argument("x-queue-type") != Some(&Arg::Str("stream".into()))
                && !q.name.ends_with(Names::RESULTS_CHECK_SUFFIX)
        })
    }
}

/// The distinct non-zero delays of every step, in ms: one delay queue each. Jitter varies each
/// message's TTL around these values, within one queue. They are the retry delays, and, when a
/// step has a `tenant_max_in_flight`, the waits of a job whose tenant is at its cap.
pub fn retry_delays_ms(config: &Config) -> Vec<u64> {
    let steps = || config.pipelines.iter().flat_map(|p| &p.steps);
    let mut delays: BTreeSet<u64> = steps()
        .flat_map(|s| &s.backoff)
        .map(|d| d.as_millis() as u64)
        .filter(|ms| *ms > 0)
        .collect();
    if steps().any(|s| s.tenant_max_in_flight.is_some()) {
        delays.extend(CAP_WAIT_DELAYS_MS);
    }
    delays.into_iter().collect()
}

/// Declares every one of `items` with `declare`, spread over channels. A conflict closes its
/// channel, and the declares queued behind it there fail with it: those are made again, on
/// fresh channels, until only conflicts are left; the first of them in `items` order is the
/// error.
async fn declare_all<'a, T, F, Fut>(
    broker: &Broker,
    items: &[&'a T],
    declare: F,
) -> Result<(), TopologyError>
where
    F: Fn(Channel, &'a T) -> Fut,
    Fut: Future<Output = Result<(), TopologyError>>,
{
    // The items still to declare, and their places in `items`.
    let (mut todo, mut places): (Vec<&'a T>, Vec<usize>) =
        (items.to_vec(), (0..items.len()).collect());
    let mut first_conflict: Option<(usize, TopologyError)> = None;
    while !todo.is_empty() {
        let results = spread(broker, &todo, &declare).await?;
        match next_round(places.iter().copied().zip(results).collect()) {
            Round::Done => break,
            Round::Failed(e) => return Err(e),
            Round::Again { retry, conflict } => {
                if first_conflict.as_ref().is_none_or(|(i, _)| conflict.0 < *i) {
                    first_conflict = Some(conflict);
                }
                (todo, places) = places
                    .iter()
                    .zip(&todo)
                    .filter(|(place, _)| retry.contains(place))
                    .map(|(place, item)| (*item, *place))
                    .unzip();
            }
        }
    }
    match first_conflict {
        Some((_, conflict)) => Err(conflict),
        None => Ok(()),
    }
}

/// What a round of declares leads to.
#[derive(Debug)]
enum Round {
    /// Every declare succeeded.
    Done,
    /// A failure that is no conflict, with no conflict that explains it: the error.
    Failed(TopologyError),
    /// Some conflicted (the first of them, by index): the other failures may be their
    /// channels' closing, so those indices are declared again.
    Again {
        retry: Vec<usize>,
        conflict: (usize, TopologyError),
    },
}

/// Pure: sorts one round's outcomes (item index, result), in index order.
fn next_round(outcomes: Vec<(usize, Result<(), TopologyError>)>) -> Round {
    let mut conflict = None;
    let mut retry = Vec::new();
    let mut failure = None;
    for (i, outcome) in outcomes {
        match outcome {
            Ok(()) => {}
            Err(e @ TopologyError::Conflict { .. }) => {
                conflict.get_or_insert((i, e));
            }
            Err(e) => {
                retry.push(i);
                failure.get_or_insert(e);
            }
        }
    }
    match (conflict, failure) {
        (Some(conflict), _) => Round::Again { retry, conflict },
        (None, Some(e)) => Round::Failed(e),
        (None, None) => Round::Done,
    }
}

async fn declare_exchange(channel: Channel, exchange: &ExchangeSpec) -> Result<(), TopologyError> {
    channel
        .exchange_declare(
            exchange.name.as_str().into(),
            exchange.kind.kind(),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| conflict_or("exchange", &exchange.name, e))
}

async fn declare_queue(channel: Channel, queue: &QueueSpec) -> Result<(), TopologyError> {
    channel
        .queue_declare(
            queue.name.as_str().into(),
            QueueDeclareOptions::durable(),
            arguments(&queue.arguments),
        )
        .await
        .map_err(|e| conflict_or("queue", &queue.name, e))?;
    for (exchange, key) in &queue.bindings {
        channel
            .queue_bind(
                queue.name.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!(
                "bind {} to {exchange}",
                queue.name
            )))?;
    }
    Ok(())
}

async fn delete_queue(channel: Channel, queue: &QueueSpec) -> Result<(), BrokerError> {
    // Deleting a missing queue is a no-op in RabbitMQ 3.x.
    channel
        .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
        .await
        .map(|_| ())
        .map_err(BrokerError::amqp(format!("delete queue {}", queue.name)))
}

async fn delete_exchange(channel: Channel, exchange: &ExchangeSpec) -> Result<(), BrokerError> {
    channel
        .exchange_delete(
            exchange.name.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!(
            "delete exchange {}",
            exchange.name
        )))
}

fn arguments(args: &[(&'static str, Arg)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in args {
        let value = match value {
            Arg::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Arg::Int(i) => AMQPValue::LongLongInt(*i),
            Arg::Bool(b) => AMQPValue::Boolean(*b),
        };
        table.insert(ShortString::from(*key), value);
    }
    table
}

fn conflict_or(kind: &'static str, name: &str, err: lapin::Error) -> TopologyError {
    match server_reply(&err) {
        Some((_, text)) if text.starts_with("PRECONDITION_FAILED") => TopologyError::Conflict {
            kind,
            name: name.to_string(),
            detail: text,
        },
        _ => TopologyError::Broker(BrokerError::Amqp {
            action: format!("declare {kind} {name}"),
            cause: err,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    /// Namespace `ns`, pipeline `p` with steps `a` and `b` over 2 shards.
    pub(crate) fn two_steps_two_shards() -> Config {
        let toml = r#"
[broker]
namespace = "ns"
[[pipelines]]
name = "p"
shards = 2
[[pipelines.steps]]
name = "a"
handler = "h"
[[pipelines.steps]]
name = "b"
handler = "h"
"#;
        Config::parse(toml, "t", Path::new("."), &HashMap::new()).unwrap()
    }

    fn conflict(name: &str) -> TopologyError {
        TopologyError::Conflict {
            kind: "queue",
            name: name.into(),
            detail: "PRECONDITION_FAILED".into(),
        }
    }

    fn closed() -> TopologyError {
        TopologyError::Broker(BrokerError::Connect {
            url: "u".into(),
            reason: "channel closed".into(),
        })
    }

    #[test]
    fn a_round_retries_what_failed_beside_a_conflict_and_keeps_the_first_conflict() {
        assert!(matches!(
            next_round(vec![(0, Ok(())), (1, Ok(()))]),
            Round::Done
        ));
        let round = next_round(vec![
            (0, Ok(())),
            (1, Err(closed())),
            (2, Err(conflict("b"))),
            (3, Err(conflict("c"))),
            (4, Err(closed())),
        ]);
        let Round::Again { retry, conflict } = round else {
            panic!("{round:?}");
        };
        assert_eq!(retry, [1, 4]);
        assert_eq!(conflict.0, 2);
        assert!(matches!(conflict.1, TopologyError::Conflict { name, .. } if name == "b"));
        // A failure with no conflict beside it is the error.
        let round = next_round(vec![(0, Ok(())), (5, Err(closed()))]);
        assert!(
            matches!(round, Round::Failed(TopologyError::Broker(_))),
            "{round:?}"
        );
    }

    #[test]
    fn plan_has_a_queue_per_step_priority_and_shard() {
        let config = two_steps_two_shards();
        let plan = Topology::plan(&config);
        let routes: Vec<_> = plan.step_queues().filter_map(|q| q.route.clone()).collect();
        assert_eq!(routes, StepRoute::all(&config));
        let q = plan
            .queues
            .iter()
            .find(|q| q.name == "ns.q.p.b.low.1")
            .unwrap();
        assert_eq!(
            q.bindings,
            vec![("ns.tasks".to_string(), "p.b.low.1".to_string())]
        );
        assert_eq!(
            q.argument("x-queue-type"),
            Some(&Arg::Str("quorum".to_string()))
        );
        assert_eq!(q.argument("x-max-length"), Some(&Arg::Int(100_000)));
        assert_eq!(
            q.argument("x-overflow"),
            Some(&Arg::Str("reject-publish".to_string()))
        );
        assert!(plan.queues.iter().any(|q| q.name == "ns.dlq"));
        // The default backoff (1s, 10s, 1m) gives three delay queues, each behind a fanout
        // exchange and dead-lettering back to the tasks exchange.
        for ms in [1_000, 10_000, 60_000] {
            let name = format!("ns.delay.{ms}");
            let q = plan.queues.iter().find(|q| q.name == name).unwrap();
            assert_eq!(
                q.argument("x-dead-letter-exchange"),
                Some(&Arg::Str("ns.tasks".to_string()))
            );
            assert_eq!(q.bindings, vec![(name.clone(), String::new())]);
            assert!(plan
                .exchanges
                .iter()
                .any(|e| e.name == name && e.kind == ExchangeType::Fanout));
        }
        let streams = 2 + usize::from(config.history.enabled);
        assert_eq!(plan.work_queues().count(), plan.queues.len() - streams);
        assert!(!plan.queues.iter().any(|q| q.name.starts_with("ns.sched")));
        assert!(plan.queues.iter().any(|q| q.name == "ns.results"));
        let control = plan.queues.iter().find(|q| q.name == "ns.control").unwrap();
        assert_eq!(
            control.bindings,
            vec![("ns.events".to_string(), "control.#".to_string())]
        );
        assert!(plan.queues.iter().any(|q| q.name == "ns.q.p.b.low.hot1"));
        assert_eq!(plan, Topology::plan(&config), "planning is deterministic");
    }

    #[test]
    fn the_results_check_queue_is_there_when_the_check_is_on() {
        let mut config = two_steps_two_shards();
        assert!(!Topology::plan(&config)
            .queues
            .iter()
            .any(|q| q.name == "ns.results.check"));
        config.results.check = warren_common::config::ResultsCheck::On;
        let plan = Topology::plan(&config);
        let check = plan
            .queues
            .iter()
            .find(|q| q.name == "ns.results.check")
            .unwrap();
        assert_eq!(
            check.argument("x-single-active-consumer"),
            Some(&Arg::Bool(true))
        );
        assert_eq!(
            check.argument("x-queue-type"),
            Some(&Arg::Str("quorum".into()))
        );
        assert!(check.bindings.is_empty(), "workers publish to it by name");
        assert!(!plan.work_queues().any(|q| q.name == "ns.results.check"));
    }

    #[test]
    fn the_history_stream_is_there_when_on_with_its_retention() {
        let mut config = two_steps_two_shards();
        config.history.enabled = true;
        config.history.retention = std::time::Duration::from_secs(3600);
        let plan = Topology::plan(&config);
        let history = plan.queues.iter().find(|q| q.name == "ns.history").unwrap();
        assert_eq!(
            history.argument("x-max-age"),
            Some(&Arg::Str("3600s".into()))
        );
        assert_eq!(
            history.argument("x-queue-type"),
            Some(&Arg::Str("stream".into()))
        );
        config.history.enabled = false;
        let plan = Topology::plan(&config);
        assert!(!plan.queues.iter().any(|q| q.name == "ns.history"));
    }

    #[test]
    fn a_config_with_schedules_gets_the_tick_queues_and_the_ledger() {
        let mut config = two_steps_two_shards();
        let with = Config::parse(
            "[broker]\nnamespace = \"ns\"\n[[pipelines]]\nname = \"p\"\n[[pipelines.steps]]\nname = \"a\"\nhandler = \"h\"\n\
             [[schedules]]\nname = \"s\"\npipeline = \"p\"\nevery = \"1s\"\n",
            "t",
            Path::new("."),
            &HashMap::new(),
        )
        .unwrap();
        config.schedules = with.schedules;
        let plan = Topology::plan(&config);
        let tick = plan
            .queues
            .iter()
            .find(|q| q.name == "ns.sched.tick")
            .unwrap();
        assert_eq!(
            tick.argument("x-single-active-consumer"),
            Some(&Arg::Bool(true))
        );
        let delay = plan
            .queues
            .iter()
            .find(|q| q.name == "ns.sched.delay")
            .unwrap();
        assert_eq!(
            delay.argument("x-dead-letter-routing-key"),
            Some(&Arg::Str("ns.sched.tick".into()))
        );
        assert_eq!(
            delay.argument("x-dead-letter-strategy"),
            Some(&Arg::Str("at-least-once".into()))
        );
        assert!(plan.queues.iter().any(|q| q.name == "ns.sched"));
        assert_eq!(
            plan.work_queues().count(),
            plan.queues.len() - 3 - usize::from(config.history.enabled),
            "all but the streams"
        );
    }
}
