//! The exchanges and queues a config implies, computed as plain data ([`Topology::plan`]) and
//! then declared, idempotently, on the broker. Declaring the same config twice is a no-op; a
//! queue that exists with other arguments is a [`TopologyError::Conflict`] naming it.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::ExchangeKind;
use warren_common::config::Config;
use warren_common::Priority;

use crate::connection::Broker;
use crate::error::{server_reply, BrokerError, TopologyError};
use crate::names::Names;

/// How long the results stream keeps events.
pub const RESULTS_MAX_AGE: &str = "7D";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub name: String,
    /// `direct` or `topic`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    /// `x-*` arguments, all strings.
    pub arguments: Vec<(&'static str, String)>,
    /// (exchange, routing key) pairs.
    pub bindings: Vec<(String, String)>,
}

/// Everything one namespace needs on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
}

impl Topology {
    /// Pure: config in, names and arguments out.
    pub fn plan(config: &Config) -> Self {
        let names = Names::new(&config.broker.namespace);
        let tasks = names.tasks_exchange();
        let events = names.events_exchange();
        let queue_type = config.broker.queue_type.as_str().to_string();
        let mut queues = Vec::new();
        for pipeline in &config.pipelines {
            for step in &pipeline.steps {
                for priority in Priority::ALL {
                    for shard in 0..pipeline.shards {
                        queues.push(QueueSpec {
                            name: names.step_queue(&pipeline.name, &step.name, priority, shard),
                            arguments: vec![("x-queue-type", queue_type.clone())],
                            bindings: vec![(
                                tasks.clone(),
                                Names::step_key(&pipeline.name, &step.name, priority, shard),
                            )],
                        });
                    }
                }
            }
        }
        queues.push(QueueSpec {
            name: names.dlq(),
            arguments: vec![("x-queue-type", queue_type)],
            bindings: vec![],
        });
        queues.push(QueueSpec {
            name: names.results_stream(),
            arguments: vec![
                ("x-queue-type", "stream".to_string()),
                ("x-max-age", RESULTS_MAX_AGE.to_string()),
            ],
            bindings: vec![(events.clone(), "result.#".to_string())],
        });
        Self {
            exchanges: vec![
                ExchangeSpec {
                    name: tasks,
                    kind: "direct",
                },
                ExchangeSpec {
                    name: events,
                    kind: "topic",
                },
            ],
            queues,
        }
    }

    /// Declares every exchange, queue and binding. Safe to run any number of times.
    pub async fn declare(&self, broker: &Broker) -> Result<(), TopologyError> {
        let mut channel = broker.channel().await?;
        for exchange in &self.exchanges {
            let kind = match exchange.kind {
                "topic" => ExchangeKind::Topic,
                _ => ExchangeKind::Direct,
            };
            let result = channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Err(e) = result {
                return Err(conflict_or("exchange", &exchange.name, e));
            }
        }
        for queue in &self.queues {
            if !channel.status().connected() {
                channel = broker.channel().await?;
            }
            let result = channel
                .queue_declare(
                    queue.name.as_str().into(),
                    QueueDeclareOptions::durable(),
                    arguments(&queue.arguments),
                )
                .await;
            if let Err(e) = result {
                return Err(conflict_or("queue", &queue.name, e));
            }
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
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    /// Deletes every queue and exchange of the plan, messages included. Missing ones are fine.
    pub async fn delete(&self, broker: &Broker) -> Result<(), BrokerError> {
        let mut channel = broker.channel().await?;
        for queue in &self.queues {
            if !channel.status().connected() {
                channel = broker.channel().await?;
            }
            // Deleting a missing queue is a no-op in RabbitMQ 3.x.
            channel
                .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(BrokerError::amqp(format!("delete queue {}", queue.name)))?;
        }
        for exchange in &self.exchanges {
            channel
                .exchange_delete(
                    exchange.name.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await
                .map_err(BrokerError::amqp(format!(
                    "delete exchange {}",
                    exchange.name
                )))?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    /// The step queues only (not the dead-letter queue or the results stream).
    pub fn step_queues(&self) -> impl Iterator<Item = &QueueSpec> {
        self.queues.iter().filter(|q| q.name.contains(".q."))
    }
}

fn arguments(args: &[(&'static str, String)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in args {
        table.insert(
            ShortString::from(*key),
            AMQPValue::LongString(LongString::from(value.as_str())),
        );
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
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    #[test]
    fn plan_has_a_queue_per_step_priority_and_shard() {
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
        let config = Config::parse(toml, "t", Path::new("."), &HashMap::new()).unwrap();
        let plan = Topology::plan(&config);
        assert_eq!(plan.step_queues().count(), 2 * 3 * 2);
        let q = plan
            .queues
            .iter()
            .find(|q| q.name == "ns.q.p.b.low.1")
            .unwrap();
        assert_eq!(
            q.bindings,
            vec![("ns.tasks".to_string(), "p.b.low.1".to_string())]
        );
        assert_eq!(q.arguments, vec![("x-queue-type", "quorum".to_string())]);
        assert!(plan.queues.iter().any(|q| q.name == "ns.dlq"));
        assert!(plan.queues.iter().any(|q| q.name == "ns.results"));
        assert_eq!(plan, Topology::plan(&config), "planning is deterministic");
    }
}
