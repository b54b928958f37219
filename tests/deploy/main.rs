//! The deployment files under `deploy/` checked against the code and the documented contracts:
//! the Kubernetes config loads, KEDA's queue regex covers exactly the pipeline's step queues, the
//! worker's port and probes are the ones in docs/metrics.md, and the dashboards query only
//! documented metrics. Offline and fast: no broker, no docker, no kubectl.
//!
//! `cargo test -p warren-tests --test deploy`

mod promql;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;
use warren_broker::{Names, Topology};
use warren_common::config::QueueType;
use warren_common::{Config, StepKind};

/// `warren-worker run --shutdown-grace` default (worker/src/cli.rs): how long a SIGTERMed worker
/// lets running steps finish.
const WORKER_SHUTDOWN_GRACE_SECS: u64 = 30;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `path` relative to the repository, for messages.
fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", rel(path)))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", rel(&d))) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every document of a YAML file (`---`-separated), as JSON values; empty documents dropped.
fn yaml_docs(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).map_err(|e| format!("{}: {e}", rel(path)))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn json_doc(path: &Path) -> Result<Value, String> {
    serde_json::from_str(&read(path)).map_err(|e| format!("{}: {e}", rel(path)))
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

fn str_list(value: &Value, pointer: &str) -> Vec<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A Kubernetes object from a kustomization, with the file it came from.
#[derive(Debug)]
struct Object {
    file: PathBuf,
    value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        str_at(&self.value, "/kind").unwrap_or("")
    }
    fn name(&self) -> &str {
        str_at(&self.value, "/metadata/name").unwrap_or("")
    }
    fn at(&self) -> String {
        format!("{} ({} {})", rel(&self.file), self.kind(), self.name())
    }
}

/// A kustomization's objects: its resource files, and those of the kustomizations it includes.
fn kustomize_objects(dir: &Path) -> Vec<Object> {
    let kustomization = &yaml_docs(&dir.join("kustomization.yaml")).unwrap()[0];
    let mut objects = Vec::new();
    for resource in str_list(kustomization, "/resources") {
        let path = dir.join(&resource);
        if path.is_dir() {
            objects.extend(kustomize_objects(&path));
        } else {
            for value in yaml_docs(&path).unwrap() {
                objects.push(Object {
                    file: path.clone(),
                    value,
                });
            }
        }
    }
    objects
}

fn k8s() -> PathBuf {
    repo().join("deploy/k8s")
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Object {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("deploy/k8s: no {kind} named `{name}`"))
}

/// The files a `configMapGenerator`/`secretGenerator` entry reads: `files` (`key=path` or
/// `path`) and `envs`.
fn generator_files(entry: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for file in str_list(entry, "/files") {
        let (key, path) = match file.split_once('=') {
            Some((k, p)) => (k.to_string(), p.to_string()),
            None => (
                Path::new(&file)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                file.clone(),
            ),
        };
        out.push((key, path));
    }
    for env in str_list(entry, "/envs") {
        out.push((String::new(), env));
    }
    out
}

/// The worker config carried by the ConfigMap `warren-config` (a generator over warren.toml).
fn k8s_config_text() -> (PathBuf, String) {
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
fn parse_config(origin: &Path, text: &str) -> Config {
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
fn command_line(deployment: &Object) -> Vec<String> {
    let c = container(deployment);
    let mut line = str_list(c, "/command");
    line.extend(str_list(c, "/args"));
    line
}

fn flag<'a>(line: &'a [String], name: &str) -> Option<&'a str> {
    line.iter()
        .position(|a| a == name)
        .and_then(|i| line.get(i + 1))
        .map(String::as_str)
        .or_else(|| {
            line.iter()
                .find_map(|a| a.strip_prefix(&format!("{name}=")))
        })
}

// ---------------------------------------------------------------------------------------------
// docs/metrics.md

#[derive(Debug)]
struct Metric {
    kind: String,
    labels: BTreeSet<String>,
}

fn metrics_doc() -> String {
    read(&repo().join("docs/metrics.md"))
}

/// The metric tables of docs/metrics.md: name -> type and labels. A row may name several
/// metrics (the `process_*` one does).
fn documented_metrics() -> BTreeMap<String, Metric> {
    let name_re = Regex::new(r"`([a-z_:][a-z0-9_:]*)`").unwrap();
    let mut metrics = BTreeMap::new();
    for line in metrics_doc().lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| name | type | labels | meaning |` splits into 6 cells, the outer two empty.
        if cells.len() < 6 || !cells[1].starts_with('`') {
            continue;
        }
        let labels: BTreeSet<String> = cells[3]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        for name in name_re.captures_iter(cells[1]) {
            metrics.insert(
                name[1].to_string(),
                Metric {
                    kind: cells[2].to_string(),
                    labels: labels.clone(),
                },
            );
        }
    }
    assert!(
        metrics.contains_key("warren_step_executions_total")
            && metrics.contains_key("process_resident_memory_bytes"),
        "docs/metrics.md: could not read the metric tables (found {:?})",
        metrics.keys().collect::<Vec<_>>()
    );
    metrics
}

/// Labels any series has besides its own: the scrape target's, and the PodMonitor's.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "endpoint",
];

/// Checks one selector (metric name, and the labels it matches on) against the docs.
fn check_selector(sel: &promql::Selector, docs: &BTreeMap<String, Metric>) -> Result<(), String> {
    let (base, is_bucket) = match ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| sel.metric.strip_suffix(s).map(|b| (b, *s == "_bucket")))
    {
        // A histogram's series; `_total` counters ending in `_count` are not a thing here.
        Some((base, bucket)) if docs.get(base).is_some_and(|m| m.kind == "histogram") => {
            (base, bucket)
        }
        _ => (sel.metric.as_str(), false),
    };
    let metric = docs
        .get(base)
        .ok_or_else(|| format!("metric `{}` is not in docs/metrics.md", sel.metric))?;
    for label in &sel.labels {
        let known = metric.labels.contains(label)
            || TARGET_LABELS.contains(&label.as_str())
            || (is_bucket && label == "le");
        if !known {
            return Err(format!(
                "`{}` has no label `{label}` (docs/metrics.md lists: {})",
                sel.metric,
                metric.labels.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(())
}

/// The port of `--metrics-addr` defaults in docs/metrics.md: (worker, supervisor, first
/// supervised worker).
fn documented_ports() -> (u16, u16, u16) {
    let doc = metrics_doc();
    let addr = Regex::new(r"`--metrics-addr`\s+\(default\s+`127\.0\.0\.1:(\d+)`").unwrap();
    let ports: Vec<u16> = addr
        .captures_iter(&doc)
        .map(|c| c[1].parse().unwrap())
        .collect();
    let base = Regex::new(r"listen on\s+`127\.0\.0\.1:(\d+)`").unwrap();
    let base: u16 = base
        .captures(&doc)
        .expect("docs/metrics.md: no supervised worker port")[1]
        .parse()
        .unwrap();
    assert_eq!(
        ports.len(),
        2,
        "docs/metrics.md: expected the worker's and the supervisor's default --metrics-addr"
    );
    (ports[0], ports[1], base)
}

/// The path of docs/metrics.md's endpoint row whose meaning mentions `what`.
fn documented_path(what: &str) -> String {
    let doc = metrics_doc();
    let line = doc
        .lines()
        .find(|l| l.starts_with("| `/") && l.contains(what))
        .unwrap_or_else(|| panic!("docs/metrics.md: no endpoint row for {what}"));
    line.split('`').nth(1).unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut problems = Vec::new();
    let (mut yaml, mut json) = (0, 0);
    for path in files_under(&repo().join("deploy")) {
        if is_yaml(&path) {
            yaml += 1;
            match yaml_docs(&path) {
                Ok(docs) if docs.is_empty() => problems.push(format!("{}: empty", rel(&path))),
                Ok(docs) => {
                    // Kubernetes objects (and kustomizations) say what they are.
                    if path.starts_with(k8s()) {
                        for doc in docs {
                            if str_at(&doc, "/apiVersion").is_none()
                                || str_at(&doc, "/kind").is_none()
                            {
                                problems.push(format!(
                                    "{}: a document without apiVersion/kind",
                                    rel(&path)
                                ));
                            }
                        }
                    }
                }
                Err(e) => problems.push(e),
            }
        } else if path.extension().and_then(|e| e.to_str()) == Some("json") {
            json += 1;
            if let Err(e) = json_doc(&path) {
                problems.push(e);
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        yaml >= 10 && json >= 2,
        "deploy/: found only {yaml} YAML and {json} JSON files"
    );
}

#[test]
fn kustomizations_list_files_that_exist_and_every_manifest_is_listed() {
    let mut problems = Vec::new();
    let kustomizations: Vec<PathBuf> = files_under(&repo().join("deploy"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect();
    assert!(!kustomizations.is_empty(), "deploy/: no kustomization.yaml");
    for path in &kustomizations {
        let dir = path.parent().unwrap();
        let k = &yaml_docs(path).unwrap()[0];
        let mut listed = BTreeSet::new();
        for resource in str_list(k, "/resources") {
            let target = dir.join(&resource);
            if target.is_dir() {
                if !target.join("kustomization.yaml").is_file() {
                    problems.push(format!(
                        "{}: resource `{resource}` is a folder without kustomization.yaml",
                        rel(path)
                    ));
                }
            } else if !target.is_file() {
                problems.push(format!(
                    "{}: resource `{resource}` does not exist",
                    rel(path)
                ));
            }
            listed.insert(target);
        }
        for section in ["/configMapGenerator", "/secretGenerator"] {
            for entry in k
                .pointer(section)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for (_, file) in generator_files(entry) {
                    let target = dir.join(&file);
                    // kustomize only reads generator files inside the kustomization's folder.
                    if file.starts_with("..") || file.starts_with('/') {
                        problems.push(format!(
                            "{}: generator file `{file}` is outside the kustomization",
                            rel(path)
                        ));
                    } else if !target.is_file() {
                        problems.push(format!(
                            "{}: generator file `{file}` does not exist",
                            rel(path)
                        ));
                    }
                    listed.insert(target);
                }
            }
        }
        for patch in k
            .pointer("/patches")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(file) = str_at(patch, "/path") {
                if !dir.join(file).is_file() {
                    problems.push(format!("{}: patch `{file}` does not exist", rel(path)));
                }
                listed.insert(dir.join(file));
            }
        }
        // A manifest next to the kustomization that it forgets would silently not be deployed.
        for file in std::fs::read_dir(dir).unwrap() {
            let file = file.unwrap().path();
            let is_manifest = is_yaml(&file) && file != *path;
            if is_manifest && !listed.contains(&file) {
                problems.push(format!("{}: `{}` is not listed", rel(path), rel(&file)));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
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
        // shard.
        let expected: BTreeSet<String> = topology
            .step_queues()
            .filter(|q| q.route.as_ref().is_some_and(|r| r.pipeline == p.name))
            .map(|q| q.name.clone())
            .collect();
        assert_eq!(expected.len(), p.steps.len() * 3 * usize::from(p.shards));

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

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard
        .pointer("/panels")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push(panel);
        out.extend(
            panel
                .pointer("/panels")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        );
    }
    out
}

/// Grafana's own variables a query may use.
const GRAFANA_BUILTINS: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

/// Problems of one dashboard, each naming the file and the panel.
fn dashboard_problems(
    path: &Path,
    dashboard: &Value,
    docs: &BTreeMap<String, Metric>,
) -> Vec<String> {
    let at = rel(path);
    let mut problems = Vec::new();
    let schema = dashboard.pointer("/schemaVersion").and_then(Value::as_u64);
    if schema.is_none_or(|v| v < 36) {
        problems.push(format!("{at}: schemaVersion must be 36 or more"));
    }
    for key in ["/uid", "/title"] {
        if str_at(dashboard, key).is_none_or(str::is_empty) {
            problems.push(format!("{at}: no {}", &key[1..]));
        }
    }

    let variables: Vec<&Value> = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let var_names: BTreeSet<&str> = variables
        .iter()
        .filter_map(|v| str_at(v, "/name"))
        .collect();
    let datasource_var = variables.iter().find(|v| {
        str_at(v, "/type") == Some("datasource") && str_at(v, "/query") == Some("prometheus")
    });
    let Some(ds_name) = datasource_var.and_then(|v| str_at(v, "/name")) else {
        problems.push(format!("{at}: no Prometheus datasource variable"));
        return problems;
    };
    // Datasource references must go through the variable, so the dashboard works on any Grafana.
    let ds_ok = |v: Option<&Value>| match v {
        None => true,
        Some(ds) => str_at(ds, "/uid")
            .is_some_and(|uid| uid == format!("${{{ds_name}}}") || uid == format!("${ds_name}")),
    };
    let known_var = |name: &str| var_names.contains(name) || GRAFANA_BUILTINS.contains(&name);

    // Variables' own queries: `label_values(<selector>, <label>)`.
    let label_values =
        Regex::new(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$").unwrap();
    for var in variables
        .iter()
        .filter(|v| str_at(v, "/type") == Some("query"))
    {
        let name = str_at(var, "/name").unwrap_or("?");
        if !ds_ok(var.pointer("/datasource")) {
            problems.push(format!("{at}: variable `{name}` does not use ${ds_name}"));
        }
        let query = str_at(var, "/query/query")
            .or_else(|| str_at(var, "/query"))
            .unwrap_or("");
        let Some(c) = label_values.captures(query) else {
            problems.push(format!(
                "{at}: variable `{name}`: expected label_values(metric, label), got `{query}`"
            ));
            continue;
        };
        match promql::selectors(&c[1]) {
            Ok(sels) if sels.len() == 1 => {
                if let Err(e) = check_selector(&sels[0], docs) {
                    problems.push(format!("{at}: variable `{name}`: {e}"));
                } else if let Some(m) = docs.get(&sels[0].metric) {
                    if !m.labels.contains(&c[2]) {
                        problems.push(format!(
                            "{at}: variable `{name}`: `{}` has no label `{}`",
                            sels[0].metric, &c[2]
                        ));
                    }
                }
            }
            Ok(_) => problems.push(format!(
                "{at}: variable `{name}`: label_values needs one selector"
            )),
            Err(e) => problems.push(format!("{at}: variable `{name}`: {e}")),
        }
        for v in promql::variables(query) {
            if !known_var(&v) || v == name {
                problems.push(format!(
                    "{at}: variable `{name}` uses `${v}`, which is not defined before it"
                ));
            }
        }
    }

    let mut ids = BTreeSet::new();
    for panel in panels(dashboard) {
        let title = str_at(panel, "/title").unwrap_or("?");
        let Some(id) = panel.pointer("/id").and_then(Value::as_u64) else {
            problems.push(format!("{at}: panel `{title}` has no id"));
            continue;
        };
        if !ids.insert(id) {
            problems.push(format!("{at}: panel id {id} (`{title}`) is used twice"));
        }
        if str_at(panel, "/type") == Some("row") {
            continue;
        }
        let here = format!("{at}: panel {id} `{title}`");
        if !ds_ok(panel.pointer("/datasource")) {
            problems.push(format!("{here}: datasource is not ${ds_name}"));
        }
        let targets = panel
            .pointer("/targets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{here}: no query"));
        }
        for target in &targets {
            if !ds_ok(target.pointer("/datasource")) {
                problems.push(format!("{here}: a query's datasource is not ${ds_name}"));
            }
            let expr = str_at(target, "/expr").unwrap_or("");
            match promql::selectors(expr) {
                Ok(sels) if sels.is_empty() => {
                    problems.push(format!("{here}: query `{expr}` uses no metric"))
                }
                Ok(sels) => {
                    for sel in sels {
                        if let Err(e) = check_selector(&sel, docs) {
                            problems.push(format!("{here}: {e}"));
                        }
                    }
                }
                Err(e) => problems.push(format!("{here}: {e}")),
            }
            for v in promql::variables(expr) {
                if !known_var(&v) {
                    problems.push(format!(
                        "{here}: `${v}` is not a variable of this dashboard"
                    ));
                }
            }
        }
    }
    problems
}

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = repo().join("deploy/grafana/dashboards");
    let found: Vec<(PathBuf, Value)> = files_under(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v = json_doc(&p).unwrap();
            (p, v)
        })
        .collect();
    let names: BTreeSet<String> = found
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for wanted in ["warren-overview.json", "warren-pipeline.json"] {
        assert!(
            names.contains(wanted),
            "deploy/grafana/dashboards: no {wanted}"
        );
    }
    found
}

#[test]
fn dashboards_query_only_documented_metrics_and_labels() {
    let docs = documented_metrics();
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (path, dashboard) in dashboards() {
        problems.extend(dashboard_problems(&path, &dashboard, &docs));
        if !uids.insert(str_at(&dashboard, "/uid").unwrap_or("").to_string()) {
            problems.push(format!("{}: uid used by another dashboard", rel(&path)));
        }
        for panel in panels(&dashboard) {
            for target in panel
                .pointer("/targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for sel in
                    promql::selectors(str_at(target, "/expr").unwrap_or("")).unwrap_or_default()
                {
                    used.insert(sel.metric);
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The overview shows what the issue asks for: each of these is on some panel.
    for metric in [
        "warren_job_duration_seconds_count",
        "warren_step_executions_total",
        "warren_step_duration_seconds_bucket",
        "warren_step_queue_wait_seconds_bucket",
        "warren_queue_messages",
        "warren_dead_letters_total",
        "warren_supervisor_workers_desired",
        "warren_supervisor_workers_running",
        "warren_publish_confirm_seconds_bucket",
        "warren_steps_in_flight",
        "warren_reconnects_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(
            used.contains(metric),
            "deploy/grafana/dashboards: no panel shows {metric}"
        );
    }
}

#[test]
fn pipeline_dashboard_has_pipeline_step_and_shard_variables() {
    let (path, dashboard) = dashboards()
        .into_iter()
        .find(|(p, _)| p.ends_with("warren-pipeline.json"))
        .unwrap();
    let names: BTreeSet<&str> = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| str_at(v, "/type") == Some("query"))
        .filter_map(|v| str_at(v, "/name"))
        .collect();
    for var in ["pipeline", "step", "shard"] {
        assert!(
            names.contains(var),
            "{}: no query variable `{var}`",
            rel(&path)
        );
    }
}

#[test]
fn dashboards_configmap_carries_every_dashboard() {
    let dir = repo().join("deploy/grafana");
    let k = &yaml_docs(&dir.join("kustomization.yaml")).unwrap()[0];
    let generator = k
        .pointer("/configMapGenerator/0")
        .expect("deploy/grafana/kustomization.yaml: no configMapGenerator");
    assert_eq!(
        str_at(generator, "/options/labels/grafana_dashboard"),
        Some("1"),
        "deploy/grafana/kustomization.yaml: label grafana_dashboard: \"1\""
    );
    let listed: BTreeSet<PathBuf> = generator_files(generator)
        .into_iter()
        .map(|(_, f)| dir.join(f))
        .collect();
    let present: BTreeSet<PathBuf> = dashboards().into_iter().map(|(p, _)| p).collect();
    assert_eq!(listed, present, "deploy/grafana/kustomization.yaml: the generator must list exactly deploy/grafana/dashboards/*.json");
    let k8s_resources = str_list(
        &yaml_docs(&k8s().join("kustomization.yaml")).unwrap()[0],
        "/resources",
    );
    assert!(
        k8s_resources.iter().any(|r| r == "../grafana"),
        "deploy/k8s/kustomization.yaml: does not include ../grafana"
    );
}

// The checks above must be able to fail: fed broken input, they complain, naming the problem.
#[test]
fn dashboard_check_catches_undocumented_metrics_labels_and_duplicate_ids() {
    let docs = documented_metrics();
    let ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let board = |exprs: &[&str], ids: &[u64]| {
        serde_json::json!({
            "uid": "x", "title": "x", "schemaVersion": 39,
            "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
            "panels": exprs.iter().zip(ids).map(|(e, id)| serde_json::json!({
                "id": id, "type": "timeseries", "title": "t", "datasource": ds,
                "targets": [{"refId": "A", "datasource": ds, "expr": e}]
            })).collect::<Vec<_>>()
        })
    };
    let path = repo().join("deploy/grafana/dashboards/test.json");
    let check = |b: &Value| dashboard_problems(&path, b, &docs).join("\n");

    assert_eq!(
        check(&board(
            &["sum(rate(warren_step_executions_total[5m]))"],
            &[1]
        )),
        ""
    );
    assert!(check(&board(&["rate(warren_jobs_total[5m])"], &[1]))
        .contains("`warren_jobs_total` is not in docs/metrics.md"));
    assert!(
        check(&board(&["warren_step_executions_total_bucket"], &[1]))
            .contains("not in docs/metrics.md")
    );
    assert!(check(&board(
        &[r#"warren_step_executions_total{shard="1"}"#],
        &[1]
    ))
    .contains("no label `shard`"));
    assert!(check(&board(
        &[r#"warren_step_duration_seconds_sum{le="1"}"#],
        &[1]
    ))
    .contains("no label `le`"));
    assert!(
        check(&board(&[r#"warren_queue_messages{shard=~"$shard"}"#], &[1]))
            .contains("`$shard` is not a variable")
    );
    assert!(check(&board(
        &["warren_steps_in_flight", "warren_steps_in_flight"],
        &[3, 3]
    ))
    .contains("panel id 3"));
    let mut no_ds = board(&["warren_steps_in_flight"], &[1]);
    no_ds["templating"]["list"] = serde_json::json!([]);
    assert!(check(&no_ds).contains("no Prometheus datasource variable"));
    let mut old = board(&["warren_steps_in_flight"], &[1]);
    old["schemaVersion"] = Value::from(27);
    assert!(check(&old).contains("schemaVersion"));
}
