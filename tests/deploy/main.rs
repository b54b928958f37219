//! The deployment files under `deploy/` checked against the code and the documented contracts:
//! the Kubernetes config loads, KEDA's queue regex covers exactly the pipeline's step queues, the
//! worker's port and probes are the ones in docs/metrics.md, and the dashboards query only
//! documented metrics. Offline and fast: no broker, no docker, no kubectl.
//!
//! `cargo test -p warren-tests --test deploy`

mod dashboards;
mod files;
mod k8s;
mod keda;
mod kustomize;
mod metrics_doc;
mod promql;
