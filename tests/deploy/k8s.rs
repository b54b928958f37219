//! The Kubernetes worker: its config (the `warren-config` ConfigMap) loads, and its Deployment
//! keeps the metrics contract of docs/metrics.md (port, probes, drain, secrets, PodMonitor).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;
use warren_common::config::QueueType;
use warren_common::{Config, StepKind};

use crate::files::{k8s, read, rel, repo, str_at, str_list, yaml_docs};
use crate::kustomize::{find, generator_files, kustomize_objects, Object};
use crate::metrics_doc::{documented_path, documented_ports};

/// `warren-worker run --shutdown-grace` default (worker/src/cli.rs): how long a SIGTERMed worker
/// lets running steps finish.
const WORKER_SHUTDOWN_GRACE_SECS: u64 = 30;

/// The worker config carried by the ConfigMap `warren-config` (a generator over warren.toml).
pub(crate) fn k8s_config_text() -> (PathBuf, String) {
    let kustomization = &yaml_docs(&k8s().join("kustomization.yaml")).unwrap()[0];
    let generator = kustomization
        .pointer("/configMapGenerator")
        .and_then(Value::as_array)
        .and_then(|g| {
            g.iter()
                .find(|e| str_at(e, "/name") == Some("warren-config"))
        })
        .expect("deploy/k8s/kustomization.yaml: no configMapGenerator `warren-config`");
    let files = generator_files(generator);
    let (_, path) = files
        .iter()
        .find(|(key, _)| key == "warren.toml")
        .expect("deploy/k8s/kustomization.yaml: configMapGenerator `warren-config` has no key `warren.toml`");
    let path = k8s().join(path);
    let text = read(&path);
    (path, text)
}

/// Parses like the worker does, but with an empty environment: WARREN_NAMESPACE or
/// WARREN_AMQP_URL of whoever runs the tests must not change what is checked.
pub(crate) fn parse_config(origin: &Path, text: &str) -> Config {
    let no_env: HashMap<String, String> = HashMap::new();
    Config::parse(text, &rel(origin), Path::new("/etc/warren"), &no_env)
        .unwrap_or_else(|e| panic!("the worker config does not load: {e}"))
}

fn container(deployment: &Object) -> &Value {
    let containers = deployment
        .value
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{}: no containers", deployment.at()));
    assert_eq!(
        containers.len(),
        1,
        "{}: expected one container (the worker)",
        deployment.at()
    );
    &containers[0]
}

/// The container's full command line (`command` then `args`).
pub(crate) fn command_line(deployment: &Object) -> Vec<String> {
    let c = container(deployment);
    let mut line = str_list(c, "/command");
    line.extend(str_list(c, "/args"));
    line
}

pub(crate) fn flag<'a>(line: &'a [String], name: &str) -> Option<&'a str> {
    line.iter()
        .position(|a| a == name)
        .and_then(|i| line.get(i + 1))
        .map(String::as_str)
        .or_else(|| {
            line.iter()
                .find_map(|a| a.strip_prefix(&format!("{name}=")))
        })
}

#[test]
fn configmap_config_loads_with_quorum_queues_and_command_paths_in_the_image() {
    let (path, text) = k8s_config_text();
    let config = parse_config(&path, &text);
    let at = rel(&path);
    assert_eq!(config.broker.namespace, "warren", "{at}: namespace");
    assert_eq!(
        config.broker.queue_type,
        QueueType::Quorum,
        "{at}: queue_type must be quorum on a RabbitMQ cluster"
    );
    assert!(
        config.pipelines.iter().any(|p| p.name == "reports"),
        "{at}: no pipeline `reports`"
    );

    // The image has examples/ at /app/examples (deploy/docker/Dockerfile); a step's script must
    // be there, or every attempt fails at run time.
    let dockerfile = read(&repo().join("deploy/docker/Dockerfile"));
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim() == "COPY examples/ /app/examples/"),
        "deploy/docker/Dockerfile: does not copy examples/ to /app/examples/"
    );
    for pipeline in &config.pipelines {
        for step in &pipeline.steps {
            let StepKind::Command(argv) = &step.kind else {
                panic!(
                    "{at}: step {}/{} is a Rust handler, which warren-worker does not have",
                    pipeline.name, step.name
                );
            };
            for arg in argv.iter().filter(|a| a.starts_with('/')) {
                let in_repo = arg
                    .strip_prefix("/app/examples/")
                    .map(|p| repo().join("examples").join(p))
                    .unwrap_or_else(|| {
                        panic!(
                            "{at}: step {}/{}: `{arg}` is not under /app/examples/",
                            pipeline.name, step.name
                        )
                    });
                assert!(
                    in_repo.is_file(),
                    "{at}: step {}/{}: `{arg}` is not in the image ({} missing)",
                    pipeline.name,
                    step.name,
                    rel(&in_repo)
                );
            }
        }
    }
}

#[test]
fn worker_deployment_matches_the_metrics_contract() {
    let objects = kustomize_objects(&k8s());
    let (worker_port, supervisor_port, supervised_base) = documented_ports();
    let (healthz, readyz) = (
        documented_path("(liveness)"),
        documented_path("(readiness)"),
    );
    assert_eq!(
        (worker_port, healthz.as_str(), readyz.as_str()),
        (9477, "/healthz", "/readyz"),
        "docs/metrics.md changed: update deploy/ and this test"
    );

    let deployments: Vec<&Object> = objects
        .iter()
        .filter(|o| o.kind() == "Deployment")
        .collect();
    assert!(!deployments.is_empty(), "deploy/k8s: no Deployment");
    let dockerfile = read(&repo().join("deploy/docker/Dockerfile"));
    for d in deployments {
        let at = d.at();
        let c = container(d);
        let line = command_line(d);
        assert_eq!(
            line.first().map(String::as_str),
            Some("warren-worker"),
            "{at}: command must start with warren-worker"
        );
        assert_eq!(
            line.get(1).map(String::as_str),
            Some("run"),
            "{at}: `warren-worker run`"
        );
        assert!(
            dockerfile.contains("/out/warren-worker"),
            "deploy/docker/Dockerfile: does not install warren-worker"
        );

        // Metrics reachable from outside the pod, on the documented port, named for the PodMonitor.
        assert_eq!(
            flag(&line, "--metrics-addr"),
            Some(format!("0.0.0.0:{worker_port}").as_str()),
            "{at}: --metrics-addr"
        );
        let ports = c
            .pointer("/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        assert!(
            ports.iter().any(|p| str_at(p, "/name") == Some("metrics")
                && p.pointer("/containerPort") == Some(&Value::from(worker_port))),
            "{at}: no container port `metrics` = {worker_port}"
        );
        for (probe, path) in [("livenessProbe", &healthz), ("readinessProbe", &readyz)] {
            let get = c
                .pointer(&format!("/{probe}/httpGet"))
                .unwrap_or_else(|| panic!("{at}: no {probe}.httpGet"));
            assert_eq!(
                str_at(get, "/path"),
                Some(path.as_str()),
                "{at}: {probe} path"
            );
            let port = get.pointer("/port");
            assert!(
                port == Some(&Value::from("metrics")) || port == Some(&Value::from(worker_port)),
                "{at}: {probe} port must be `metrics`"
            );
        }

        for key in [
            "requests/cpu",
            "requests/memory",
            "limits/cpu",
            "limits/memory",
        ] {
            assert!(
                str_at(c, &format!("/resources/{key}")).is_some(),
                "{at}: no resources.{}",
                key.replace('/', ".")
            );
        }

        // Kubernetes must wait out the worker's drain before it sends SIGKILL.
        let grace = flag(&line, "--shutdown-grace")
            .map(|g| humantime_secs(g, &at))
            .unwrap_or(WORKER_SHUTDOWN_GRACE_SECS);
        let termination = d
            .value
            .pointer("/spec/template/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_u64);
        assert!(termination.is_some_and(|t| t > grace), "{at}: terminationGracePeriodSeconds ({termination:?}) must be above the worker's shutdown grace ({grace}s)");

        // KEDA owns the replica count; a `replicas` here would reset it on every apply.
        assert!(
            d.value.pointer("/spec/replicas").is_none(),
            "{at}: remove spec.replicas (KEDA scales it)"
        );

        // The AMQP URL from the Secret, under the variable the worker reads.
        let env = c
            .pointer("/env")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let amqp = env
            .iter()
            .find(|e| str_at(e, "/name") == Some(warren_common::env::ENV_WARREN_AMQP_URL))
            .unwrap_or_else(|| panic!("{at}: no env WARREN_AMQP_URL"));
        let (secret, key) = (
            str_at(amqp, "/valueFrom/secretKeyRef/name").unwrap_or(""),
            str_at(amqp, "/valueFrom/secretKeyRef/key").unwrap_or(""),
        );
        assert_eq!(
            (secret, key),
            ("warren-amqp", "url"),
            "{at}: WARREN_AMQP_URL must come from secret warren-amqp key url"
        );
        let url = str_at(&find(&objects, "Secret", secret).value, "/stringData/url").unwrap_or("");
        assert!(
            url.starts_with("amqp://") || url.starts_with("amqps://"),
            "deploy/k8s: secret warren-amqp `url` must be an AMQP URL"
        );

        // --config names the warren.toml of the warren-config ConfigMap, mounted where it says.
        let config = flag(&line, "--config").unwrap_or_else(|| panic!("{at}: no --config"));
        let (dir, file) = config
            .rsplit_once('/')
            .unwrap_or_else(|| panic!("{at}: --config must be absolute"));
        assert_eq!(file, "warren.toml", "{at}: --config file");
        let mounts = c
            .pointer("/volumeMounts")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mount = mounts
            .iter()
            .find(|m| str_at(m, "/mountPath") == Some(dir))
            .unwrap_or_else(|| panic!("{at}: nothing mounted at {dir}"));
        let volume_name = str_at(mount, "/name").unwrap_or("");
        let volumes = d
            .value
            .pointer("/spec/template/spec/volumes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let volume = volumes
            .iter()
            .find(|v| str_at(v, "/name") == Some(volume_name))
            .unwrap_or_else(|| panic!("{at}: no volume {volume_name}"));
        assert_eq!(
            str_at(volume, "/configMap/name"),
            Some("warren-config"),
            "{at}: {dir} must be the warren-config ConfigMap"
        );

        // The pod runs as the image's non-root user.
        let uid = d
            .value
            .pointer("/spec/template/spec/securityContext/runAsUser")
            .and_then(Value::as_u64);
        assert!(
            uid.is_some_and(|u| u != 0 && dockerfile.contains(&format!("USER {u}"))),
            "{at}: runAsUser ({uid:?}) must be the Dockerfile's non-root USER"
        );

        // The PodMonitor selects these pods and scrapes the documented path on port `metrics`.
        let labels = d
            .value
            .pointer("/spec/template/metadata/labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let monitored = objects
            .iter()
            .filter(|o| o.kind() == "PodMonitor")
            .any(|m| {
                let selects = m
                    .value
                    .pointer("/spec/selector/matchLabels")
                    .and_then(Value::as_object)
                    .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
                let endpoints = m
                    .value
                    .pointer("/spec/podMetricsEndpoints")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                selects
                    && endpoints.iter().any(|e| {
                        str_at(e, "/port") == Some("metrics")
                            && str_at(e, "/path") == Some("/metrics")
                    })
            });
        assert!(
            monitored,
            "{at}: no PodMonitor selects its pods with port `metrics`, path `/metrics`"
        );
    }

    // The local Prometheus scrapes the documented ports every 5 s.
    let path = repo().join("deploy/prometheus/prometheus.yml");
    let prom = &yaml_docs(&path).unwrap()[0];
    assert_eq!(
        str_at(prom, "/global/scrape_interval"),
        Some("5s"),
        "{}: scrape_interval",
        rel(&path)
    );
    let targets: BTreeSet<String> = prom
        .pointer("/scrape_configs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|job| {
            job.pointer("/static_configs")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|sc| str_list(&sc, "/targets"))
        .collect();
    let wanted = [worker_port, supervisor_port]
        .into_iter()
        .chain(supervised_base..supervised_base + 10);
    for port in wanted {
        assert!(
            targets.contains(&format!("127.0.0.1:{port}")),
            "{}: no target 127.0.0.1:{port}",
            rel(&path)
        );
    }
}

fn humantime_secs(text: &str, at: &str) -> u64 {
    let re = Regex::new(r"^(\d+)(s|m)$").unwrap();
    let c = re.captures(text).unwrap_or_else(|| {
        panic!("{at}: cannot read --shutdown-grace `{text}` (use e.g. 30s or 1m)")
    });
    let n: u64 = c[1].parse().unwrap();
    if &c[2] == "m" {
        n * 60
    } else {
        n
    }
}
