//! A publish whose confirm does not come in time gives its channel up, and the next publish goes
//! out on a fresh channel (on RabbitMQ 3.10 a channel whose stream changed leader can stop
//! confirming for good; the cluster chaos test meets that for real).

use std::time::Duration;

use serde_json::json;
use warren_broker::{Lane, Outgoing, PublishError, Publisher, StepRoute};
use warren_common::{encode, Envelope, JobId, Priority, TenantId};
use warren_tests::{eventually, TestNamespace};

use crate::THREE_STEPS;

fn step_a_message() -> (String, Vec<u8>) {
    let env = Envelope::new_job(
        JobId::new(),
        TenantId::parse("acme").unwrap(),
        "chain",
        "a",
        Priority::Normal,
        json!({}),
    );
    (env.job_id.to_string(), encode(&env))
}

#[tokio::test]
async fn a_publish_past_its_confirm_patience_gives_its_channel_up() {
    let ns = TestNamespace::new(THREE_STEPS).await;
    let broker = ns.broker().await;
    let exchange = broker.names().tasks_exchange();
    let key = StepRoute::new("chain", "a", Priority::Normal, Lane::Shard(0)).routing_key();
    // No confirm comes back within zero time: every wait gives up.
    let publisher = Publisher::new(&broker)
        .await
        .unwrap()
        .confirm_patience(Duration::ZERO);

    // A quorum queue's confirm takes a disk write, so a wait of zero time gives up; unless
    // this thread was held up long enough for the confirm to arrive, so try a few times.
    let mut gave_up = false;
    for _ in 0..20 {
        let (id, body) = step_a_message();
        let sent = publisher
            .start(Outgoing::persistent(&exchange, &key, &body, &id))
            .await
            .expect("sent");
        match sent.wait().await {
            Err(PublishError::Unconfirmed { .. }) => {
                gave_up = true;
                break;
            }
            Ok(()) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(gave_up, "every confirm came in zero time");

    // The next publish opens a fresh channel (a closed one would refuse to send).
    let (id, body) = step_a_message();
    let next = publisher
        .start(Outgoing::persistent(&exchange, &key, &body, &id))
        .await;
    assert!(next.is_ok(), "the next publish: {next:?}");
    // ...and the broker stores what was sent on it.
    let stored = eventually(Duration::from_secs(30), || async {
        ns.work_queue_depths()
            .await
            .iter()
            .map(|(_, n)| *n)
            .sum::<u32>()
            >= 1
    })
    .await;
    assert!(stored, "nothing reached the step queue");
}
