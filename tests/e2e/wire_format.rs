//! A job built by hand, as docs/wire-format.md shows a producer in another language doing it:
//! a MessagePack map, plain AMQP, no warren code on the path.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use warren_common::JobStatus;
use warren_tests::TestNamespace;

#[tokio::test]
async fn hand_built_msgpack_job_runs() {
    // Given a pipeline with 8 shards: tenant "acme" is on shard 7 (the doc's worked example)
    let ns = TestNamespace::new(
        r#"
[[pipelines]]
name = "thumbnails"
shards = 8
[[pipelines.steps]]
name = "fetch"
handler = "work"
[[pipelines.steps]]
name = "resize"
handler = "work"
"#,
    )
    .await;
    let _w = ns.spawn_worker(&[]);

    // When a job is built as a plain MessagePack map and published with raw AMQP
    let job_id = uuid::Uuid::now_v7().to_string();
    let now = warren_common::now_ms();
    let map = rmpv::Value::Map(vec![
        ("v".into(), 1.into()),
        ("job_id".into(), job_id.as_str().into()),
        ("tenant".into(), "acme".into()),
        ("pipeline".into(), "thumbnails".into()),
        ("step".into(), "fetch".into()),
        ("priority".into(), "normal".into()),
        ("attempt".into(), 1.into()),
        (
            "input".into(),
            rmpv::Value::Map(vec![("url".into(), "https://x/y.png".into())]),
        ),
        ("submitted_at".into(), now.into()),
        ("published_at".into(), now.into()),
        ("sent_by".into(), "a producer from elsewhere".into()),
    ]);
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &map).unwrap();
    let conn = Connection::connect(ns.config.broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = channel
        .basic_publish(
            format!("{}.tasks", ns.name).into(),
            "thumbnails.fetch.normal.7".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            BasicProperties::default()
                .with_content_type("application/msgpack".into())
                .with_delivery_mode(2)
                .with_message_id(job_id.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        confirm,
        lapin::Confirmation::Ack(None),
        "routable and stored"
    );

    // Then the worker runs both steps, and the result event can be read as a plain map too
    let client = ns.client().await;
    let result = client
        .wait(job_id.parse().unwrap(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(result.output["url"], json!("https://x/y.png"));
    assert_eq!(result.output["trail"], json!(["fetch", "resize"]));
    let raw: rmpv::Value = rmp_serde::from_slice(&warren_common::encode_result(&result)).unwrap();
    assert!(raw
        .as_map()
        .unwrap()
        .iter()
        .any(|(k, v)| k.as_str() == Some("status") && v.as_str() == Some("succeeded")));
    conn.close(200, "done".into()).await.unwrap();
}
