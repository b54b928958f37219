//! KEDA's scaling triggers: each ScaledObject's queue regex covers exactly the step queues of the
//! pipeline its Deployment serves.

use std::collections::BTreeSet;

use regex::Regex;
use serde_json::Value;
use warren_broker::{Names, Topology};

use crate::files::{k8s, rel, str_at};
use crate::k8s::{command_line, flag, k8s_config_text, parse_config};
use crate::kustomize::{find, kustomize_objects, Object};

/// The queue regex of every KEDA trigger, checked on the way: (where, regex, pipeline of the
/// Deployment it scales).
fn keda_queue_regexes(objects: &[Object]) -> Vec<(String, Regex, String)> {
    let mut out = Vec::new();
    for scaled in objects.iter().filter(|o| o.kind() == "ScaledObject") {
        let at = scaled.at();
        assert_eq!(
            str_at(&scaled.value, "/apiVersion"),
            Some("keda.sh/v1alpha1"),
            "{at}: apiVersion"
        );
        let target = str_at(&scaled.value, "/spec/scaleTargetRef/name")
            .unwrap_or_else(|| panic!("{at}: no scaleTargetRef.name"));
        let deployment = find(objects, "Deployment", target);
        let line = command_line(deployment);
        let pipeline = flag(&line, "--pipeline")
            .unwrap_or_else(|| {
                panic!(
                    "{}: the worker serves no single --pipeline to scale on",
                    deployment.at()
                )
            })
            .to_string();

        assert_eq!(
            scaled.value.pointer("/spec/minReplicaCount"),
            Some(&Value::from(0)),
            "{at}: minReplicaCount must be 0 (scale to zero)"
        );
        let max = scaled
            .value
            .pointer("/spec/maxReplicaCount")
            .and_then(Value::as_u64);
        assert!(
            max.is_some_and(|m| m > 0),
            "{at}: maxReplicaCount must be set and above 0"
        );

        let triggers = scaled
            .value
            .pointer("/spec/triggers")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("{at}: no triggers"));
        for trigger in triggers {
            assert_eq!(
                str_at(trigger, "/type"),
                Some("rabbitmq"),
                "{at}: trigger type"
            );
            let meta = trigger
                .pointer("/metadata")
                .and_then(Value::as_object)
                .unwrap_or_else(|| panic!("{at}: trigger without metadata"));
            // KEDA's metadata is map[string]string: `useRegex: true` unquoted is refused.
            for (key, value) in meta {
                assert!(
                    value.is_string(),
                    "{at}: trigger metadata `{key}` must be a string, got {value}"
                );
            }
            let get = |key: &str| meta.get(key).and_then(Value::as_str);
            assert_eq!(get("useRegex"), Some("true"), "{at}: useRegex");
            assert_eq!(
                get("operation"),
                Some("sum"),
                "{at}: operation (the backlog is the sum over the queues)"
            );
            assert_eq!(
                get("protocol"),
                Some("http"),
                "{at}: protocol (regex matching needs the management API)"
            );
            assert_eq!(get("mode"), Some("QueueLength"), "{at}: mode");
            assert!(
                get("value").is_some_and(|v| v.parse::<f64>().is_ok_and(|v| v > 0.0)),
                "{at}: `value` (messages per replica) must be a number above 0"
            );
            assert!(
                get("activationValue").is_some_and(|v| v.parse::<f64>().is_ok()),
                "{at}: `activationValue` must be a number"
            );
            assert!(
                get("host").is_none(),
                "{at}: the host (with credentials) belongs in the TriggerAuthentication's secret"
            );

            // The host comes from a TriggerAuthentication reading a Secret key that exists.
            let auth_name = str_at(trigger, "/authenticationRef/name")
                .unwrap_or_else(|| panic!("{at}: no authenticationRef"));
            let auth = find(objects, "TriggerAuthentication", auth_name);
            let refs = auth
                .value
                .pointer("/spec/secretTargetRef")
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("{}: no secretTargetRef", auth.at()));
            let host = refs
                .iter()
                .find(|r| str_at(r, "/parameter") == Some("host"))
                .unwrap_or_else(|| panic!("{}: no `host` parameter", auth.at()));
            let secret = find(objects, "Secret", str_at(host, "/name").unwrap_or(""));
            let key = str_at(host, "/key").unwrap_or("");
            let url = str_at(&secret.value, &format!("/stringData/{key}"))
                .unwrap_or_else(|| panic!("{}: no key `{key}` for {}", secret.at(), auth.at()));
            assert!(
                url.starts_with("http://") || url.starts_with("https://"),
                "{}: `{key}` must be the management API URL (http), got `{url}`",
                secret.at()
            );

            let source = get("queueName").unwrap_or_else(|| panic!("{at}: no queueName"));
            let re = Regex::new(source)
                .unwrap_or_else(|e| panic!("{at}: queueName is not a regex: {e}"));
            out.push((at.clone(), re, pipeline.clone()));
        }
    }
    assert!(!out.is_empty(), "deploy/k8s: no KEDA ScaledObject");
    out
}

#[test]
fn keda_regex_matches_every_step_queue_of_its_pipeline_and_nothing_else() {
    let objects = kustomize_objects(&k8s());
    let (path, text) = k8s_config_text();
    // Another pipeline whose name starts the same way: its queues must not count.
    let neighbour = "\n[[pipelines]]\nname = \"reports-archive\"\nshards = 2\n\
                     [[pipelines.steps]]\nname = \"fetch\"\ncommand = [\"true\"]\nbackoff = [\"3s\"]\n";
    let config = parse_config(&path, &format!("{text}{neighbour}"));
    let topology = Topology::plan(&config);
    let names = Names::new(&config.broker.namespace);

    for (at, re, pipeline) in keda_queue_regexes(&objects) {
        let p = config
            .pipelines
            .iter()
            .find(|p| p.name == pipeline)
            .unwrap_or_else(|| {
                panic!(
                    "{at}: scales pipeline `{pipeline}`, which {} does not have",
                    rel(&path)
                )
            });
        // The pipeline's step queues, as the topology declares them: one per step, priority and
        // lane (the shards and the hot lanes).
        let expected: BTreeSet<String> = topology
            .step_queues()
            .filter(|q| q.route.as_ref().is_some_and(|r| r.pipeline == p.name))
            .map(|q| q.name.clone())
            .collect();
        let lanes = usize::from(p.shards) + usize::from(p.hot_lanes);
        assert_eq!(expected.len(), p.steps.len() * 3 * lanes);

        let mut problems = Vec::new();
        for queue in &topology.queues {
            let matched = re.is_match(&queue.name);
            let wanted = expected.contains(&queue.name);
            if matched && !wanted {
                problems.push(format!(
                    "matches `{}`, which is not a step queue of `{pipeline}`",
                    queue.name
                ));
            } else if wanted && !matched {
                problems.push(format!("misses step queue `{}`", queue.name));
            }
        }
        // The topology really has the other kinds of queue, or "matches nothing else" proves little.
        for other in [names.dlq(), names.results_stream()] {
            assert!(
                topology.queues.iter().any(|q| q.name == other),
                "topology has no {other}"
            );
        }
        assert!(
            topology
                .queues
                .iter()
                .any(|q| q.name.starts_with(&format!("{}.delay.", names.namespace()))),
            "topology has no delay queue"
        );
        assert!(
            problems.is_empty(),
            "{at}: queueName `{}`\n{}",
            re.as_str(),
            problems.join("\n")
        );
    }
}
