//! Declaring is idempotent, and a conflicting broker state is reported by name.

use std::collections::HashMap;
use std::path::Path;

use warren_broker::{Topology, TopologyError};
use warren_common::Config;
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
