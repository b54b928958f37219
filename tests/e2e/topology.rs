//! Declaring is idempotent, a conflicting broker state is reported by name, and a pipeline
//! declares only the priorities it names.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use warren_broker::depth::ready_messages;
use warren_broker::{Topology, TopologyError};
use warren_common::{Config, JobStatus, Priority};
use warren_producer::{Job, SubmitError};
use warren_tests::TestNamespace;

use crate::THREE_STEPS;

#[tokio::test]
async fn apply_twice_is_fine_and_a_conflict_names_the_queue() {
    // Given a namespace whose topology is declared (quorum queues)
    let ns = TestNamespace::new(THREE_STEPS).await;
    let broker = ns.broker().await;

    // When the same config is applied again, then nothing changes
    Topology::plan(&ns.config).declare(&broker).await.unwrap();

    // When the config now asks for classic queues in the same namespace
    let text = std::fs::read_to_string(&ns.config_path).unwrap().replacen(
        "[broker]\n",
        "[broker]\nqueue_type = \"classic\"\n",
        1,
    );
    let classic = Config::parse(&text, "classic.toml", Path::new("."), &HashMap::new()).unwrap();
    let err = Topology::plan(&classic).declare(&broker).await.unwrap_err();

    // Then the error names the queue and says what to do, not just a raw AMQP code
    let TopologyError::Conflict { kind, name, detail } = &err else {
        panic!("expected a conflict, got {err}");
    };
    assert_eq!(*kind, "queue");
    assert_eq!(name, &format!("{}.q.chain.a.high.0", ns.name));
    assert!(detail.contains("inequivalent arg"), "{detail}");
    assert!(err.to_string().contains("delete it"), "{err}");
}

#[tokio::test]
async fn a_pipeline_declares_only_its_priorities_and_refuses_the_others() {
    // Given the 3-step pipeline with `priorities = ["normal"]`
    let only_normal =
        THREE_STEPS.replacen("shards = 4\n", "shards = 4\npriorities = [\"normal\"]\n", 1);
    let ns = TestNamespace::new(&only_normal).await;
    let all = Config::parse(THREE_STEPS, "all.toml", Path::new("."), &HashMap::new()).unwrap();

    // Then a third of the step queues are planned and declared: normal's, not high's
    let plan = Topology::plan(&ns.config);
    assert_eq!(
        plan.step_queues().count() * 3,
        Topology::plan(&all).step_queues().count()
    );
    assert!(plan
        .step_queues()
        .all(|q| q.route.as_ref().unwrap().priority == Priority::Normal));
    let broker = ns.broker().await;
    let queue = |p: &str| format!("{}.q.chain.a.{p}.0", ns.name);
    assert_eq!(
        ready_messages(&broker, &queue("normal")).await.unwrap(),
        Some(0)
    );
    assert_eq!(ready_messages(&broker, &queue("high")).await.unwrap(), None);
    broker.close().await;

    // When a worker serves it and a normal job is submitted, then it runs through
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let id = client
        .submit(Job::new("chain", "acme", json!({"n": 1})))
        .await
        .unwrap();
    let result = client.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");

    // When a high job is submitted, then it is refused, with the pipeline and its priorities
    let err = client
        .submit(Job::new("chain", "acme", json!({})).priority(Priority::High))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::PriorityNotDeclared { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "pipeline \"chain\" has no high priority: it declares priorities = [\"normal\"]"
    );
    client.close().await;
}
