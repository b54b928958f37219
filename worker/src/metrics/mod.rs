//! Prometheus metrics (names and meaning: docs/metrics.md): the worker's ([`worker`]), the
//! supervisor's ([`supervisor`]), the registry scaffolding both use (here) and the HTTP endpoint
//! that serves them ([`http`]). Labels stay low-cardinality: never a tenant or a job id.

mod http;
mod supervisor;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub(crate) use http::{
    off_or, serve_metrics, MetricsAddr, OffOrError, ServeError, SUPERVISOR_DEFAULT_ADDR,
    WORKER_DEFAULT_ADDR,
};
pub(crate) use supervisor::SupervisorMetrics;
pub(crate) use worker::{InFlight, Metrics, Outcome, PublishKind};

/// One metric as docs/metrics.md lists it, written once: the registration reads it, and so does
/// the test that holds the docs to the code.
#[derive(Debug)]
pub(crate) struct Def {
    pub(crate) name: &'static str,
    pub(crate) help: &'static str,
    pub(crate) labels: &'static [&'static str],
}

/// A registry and a readiness flag: what `/metrics` and `/readyz` report for one worker or one
/// supervisor (tests run several workers in one process, so each has its own). Clones share
/// both.
#[derive(Debug, Clone)]
pub(crate) struct Exposition {
    registry: Registry,
    ready: Arc<AtomicBool>,
}

impl Exposition {
    /// An empty registry, not ready, plus the `process_*` metrics where the platform has them.
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        // Several workers in one process each register it; the first one wins.
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        Self {
            registry,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Registers `metric` and hands it back. The names are fixed in code, so a clash is a bug.
    fn register<M: Collector + Clone + 'static>(&self, metric: M) -> M {
        self.registry
            .register(Box::new(metric.clone()))
            .expect("unique metric");
        metric
    }

    pub(crate) fn counter(&self, def: &Def) -> IntCounter {
        self.register(IntCounter::with_opts(opts(def)).expect("valid metric"))
    }

    pub(crate) fn counter_vec(&self, def: &Def) -> IntCounterVec {
        self.register(IntCounterVec::new(opts(def), def.labels).expect("valid metric"))
    }

    pub(crate) fn gauge(&self, def: &Def) -> IntGauge {
        self.register(IntGauge::with_opts(opts(def)).expect("valid metric"))
    }

    pub(crate) fn gauge_vec(&self, def: &Def) -> IntGaugeVec {
        self.register(IntGaugeVec::new(opts(def), def.labels).expect("valid metric"))
    }

    pub(crate) fn histogram_vec(&self, def: &Def, buckets: Vec<f64>) -> HistogramVec {
        let opts = HistogramOpts::new(def.name, def.help).buckets(buckets);
        self.register(HistogramVec::new(opts, def.labels).expect("valid metric"))
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("text encoding never fails")
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

fn opts(def: &Def) -> Opts {
    Opts::new(def.name, def.help)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use prometheus::proto::MetricType;
    use warren_common::Priority;

    use super::*;

    /// name -> (type, labels), as docs/metrics.md's tables or a registry say it.
    type Table = BTreeMap<String, (String, Vec<String>)>;

    /// The `warren_*` rows of docs/metrics.md's tables: `| name | type | labels | meaning |`.
    fn documented() -> Table {
        let docs = include_str!("../../../docs/metrics.md");
        let mut table = Table::new();
        for line in docs.lines().filter(|l| l.starts_with("| `warren_")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_string();
            let mut labels: Vec<String> = cells[3]
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            labels.sort();
            table.insert(name, (cells[2].to_string(), labels));
        }
        table
    }

    /// What `exposition` exports (every labelled metric needs a value to show), minus the
    /// process collector's.
    fn exported(exposition: &Exposition) -> Table {
        let mut table = Table::new();
        for family in exposition.registry.gather() {
            let name = family.name().to_string();
            if name.starts_with("process_") {
                continue;
            }
            let kind = match family.get_field_type() {
                MetricType::COUNTER => "counter",
                MetricType::GAUGE => "gauge",
                MetricType::HISTOGRAM => "histogram",
                other => panic!("{name}: unexpected type {other:?}"),
            };
            let mut labels: Vec<String> = family.get_metric()[0]
                .get_label()
                .iter()
                .map(|l| l.name().to_string())
                .collect();
            labels.sort();
            table.insert(name, (kind.to_string(), labels));
        }
        table
    }

    fn names(table: &Table) -> Vec<&str> {
        table.keys().map(String::as_str).collect()
    }

    fn def_names(defs: &[&Def]) -> Vec<&'static str> {
        let mut names: Vec<_> = defs.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names
    }

    /// Both directions: every metric the code registers is in the docs with its type and
    /// labels, and every metric the docs list is registered.
    #[test]
    fn the_docs_list_exactly_the_exported_metrics() {
        let worker_metrics = Metrics::new();
        let m = &worker_metrics;
        m.execution(
            "p",
            "s",
            Priority::Normal,
            Outcome::Succeeded,
            Some(Duration::from_millis(3)),
        );
        m.queue_wait("p", "s", Priority::Normal, Duration::from_millis(1));
        m.job_finished("p", Priority::Normal, true, Duration::from_secs(1));
        let _running = m.running("p", "s");
        m.dead_letter(None, "undecodable");
        m.confirmed(PublishKind::Result, Duration::from_millis(2));
        let _held = m.cap_held("p", "s", "step");
        m.cap_wait("p", "s", "tenant");
        m.cap_acquired("p", "s", Duration::from_millis(1));
        m.moved("p", "s");
        m.hot_marked("p", "depth");
        m.set_hot_tenants(["p"], &std::collections::HashMap::new());
        let mut code = exported(m.exposition());
        assert_eq!(
            names(&code),
            def_names(worker::DEFS),
            "registered vs defined"
        );

        let supervisor_metrics = SupervisorMetrics::new();
        supervisor::tests::touch_every_metric(&supervisor_metrics);
        let supervised = exported(supervisor_metrics.exposition());
        assert_eq!(
            names(&supervised),
            def_names(supervisor::DEFS),
            "registered vs defined"
        );
        code.extend(supervised);

        let docs = documented();
        for (name, row) in &code {
            assert_eq!(docs.get(name), Some(row), "{name} in docs/metrics.md");
        }
        for name in docs.keys() {
            assert!(
                code.contains_key(name),
                "{name} is documented, not exported"
            );
        }
    }

    #[test]
    fn readiness_is_shared_by_clones() {
        let exposition = Exposition::new();
        let served = exposition.clone();
        assert!(!served.is_ready());
        exposition.set_ready(true);
        assert!(served.is_ready());
    }
}
