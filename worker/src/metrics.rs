//! The worker's Prometheus metrics (names and meaning: docs/metrics.md) and the small HTTP
//! server that exposes them with the health probes. Labels stay low-cardinality: never a
//! tenant or a job id.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpListener;

/// Where `warren-worker run` serves metrics unless told otherwise: loopback only, so nothing
/// is exposed to the network by default.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

/// Every metric name the worker exports (docs/metrics.md documents each; a test keeps the two
/// in step).
pub const NAMES: &[&str] = &[
    "warren_step_executions_total",
    "warren_step_duration_seconds",
    "warren_step_queue_wait_seconds",
    "warren_job_duration_seconds",
    "warren_steps_in_flight",
    "warren_dead_letters_total",
    "warren_publish_confirm_seconds",
    "warren_reconnects_total",
    "warren_worker_connected",
];

/// `--metrics-addr`: an address to listen on, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    On(SocketAddr),
}

impl FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::On)
            .map_err(|_| format!("{s:?} is not HOST:PORT (e.g. 127.0.0.1:9477) or `off`"))
    }
}

/// What happened to one attempt, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Retried,
    Failed,
    DeadLettered,
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Which publish a confirm latency belongs to.
#[derive(Debug, Clone, Copy)]
pub enum PublishKind {
    NextStep,
    Retry,
    Result,
    DeadLetter,
}

impl PublishKind {
    fn as_str(self) -> &'static str {
        match self {
            PublishKind::NextStep => "next_step",
            PublishKind::Retry => "retry",
            PublishKind::Result => "result",
            PublishKind::DeadLetter => "dead_letter",
        }
    }
}

/// One worker's metrics, in a registry of its own (tests run several workers in one process).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    executions: IntCounterVec,
    step_duration: HistogramVec,
    queue_wait: HistogramVec,
    job_duration: HistogramVec,
    in_flight: IntGaugeVec,
    dead_letters: IntCounterVec,
    confirm: HistogramVec,
    reconnects: IntCounter,
    connected: IntGauge,
    ready: AtomicBool,
}

/// Buckets from 1 ms to about 17 minutes: steps range from no-ops to long imports.
fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.5, 16).expect("valid buckets")
}

/// Registers `metric` and hands it back. The names are fixed in code, so a clash is a bug.
pub(crate) fn register<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

/// The `process_*` metrics (memory, CPU, open files), where the platform has them. Several
/// workers in one process would each register it; the first one wins.
pub(crate) fn register_process_metrics(registry: &Registry) {
    #[cfg(target_os = "linux")]
    {
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
    }
    #[cfg(not(target_os = "linux"))]
    let _ = registry;
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(&registry, c)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            register(
                &registry,
                HistogramVec::new(opts, labels).expect("valid metric"),
            )
        };
        let executions = counter(
            "warren_step_executions_total",
            "Step attempts finished, by outcome.",
            &["pipeline", "step", "priority", "outcome"],
        );
        let step_duration = histogram(
            "warren_step_duration_seconds",
            "How long a step attempt ran.",
            &["pipeline", "step", "outcome"],
            duration_buckets(),
        );
        let queue_wait = histogram(
            "warren_step_queue_wait_seconds",
            "From the publish of a step message to the start of its attempt.",
            &["pipeline", "step", "priority"],
            duration_buckets(),
        );
        let job_duration = histogram(
            "warren_job_duration_seconds",
            "From submit to the job's result, observed at the last or the failing step.",
            &["pipeline", "priority", "outcome"],
            duration_buckets(),
        );
        let in_flight = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("warren_steps_in_flight", "Step attempts running now."),
                &["pipeline", "step"],
            )
            .expect("valid metric"),
        );
        let dead_letters = counter(
            "warren_dead_letters_total",
            "Messages sent to the dead-letter queue, by reason.",
            &["pipeline", "reason"],
        );
        let confirm = histogram(
            "warren_publish_confirm_seconds",
            "From publish to the broker's confirm.",
            &["kind"],
            prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
        );
        let reconnects = register(
            &registry,
            IntCounter::new(
                "warren_reconnects_total",
                "Sessions started again after a lost connection.",
            )
            .expect("valid metric"),
        );
        let connected = register(
            &registry,
            IntGauge::new(
                "warren_worker_connected",
                "1 while connected and consuming, else 0.",
            )
            .expect("valid metric"),
        );
        register_process_metrics(&registry);
        Self {
            registry,
            executions,
            step_duration,
            queue_wait,
            job_duration,
            in_flight,
            dead_letters,
            confirm,
            reconnects,
            connected,
            ready: AtomicBool::new(false),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    pub fn execution(
        &self,
        pipeline: &str,
        step: &str,
        priority: &str,
        outcome: Outcome,
        took: Option<Duration>,
    ) {
        self.executions
            .with_label_values(&[pipeline, step, priority, outcome.as_str()])
            .inc();
        if let Some(took) = took {
            self.step_duration
                .with_label_values(&[pipeline, step, outcome.as_str()])
                .observe(took.as_secs_f64());
        }
    }

    pub fn queue_wait(&self, pipeline: &str, step: &str, priority: &str, waited: Duration) {
        self.queue_wait
            .with_label_values(&[pipeline, step, priority])
            .observe(waited.as_secs_f64());
    }

    pub fn job_finished(&self, pipeline: &str, priority: &str, succeeded: bool, took: Duration) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.job_duration
            .with_label_values(&[pipeline, priority, outcome])
            .observe(took.as_secs_f64());
    }

    /// Counts the attempt as running until the guard drops (also when it is cancelled).
    pub fn running(&self, pipeline: &str, step: &str) -> InFlight {
        let gauge = self.in_flight.with_label_values(&[pipeline, step]);
        gauge.inc();
        InFlight(gauge)
    }

    pub fn dead_letter(&self, pipeline: Option<&str>, reason: &str) {
        self.dead_letters
            .with_label_values(&[pipeline.unwrap_or("unknown"), reason])
            .inc();
    }

    pub fn confirmed(&self, kind: PublishKind, took: Duration) {
        self.confirm
            .with_label_values(&[kind.as_str()])
            .observe(took.as_secs_f64());
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Connected and consuming (ready), or not.
    pub fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
        self.ready.store(up, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Something an HTTP endpoint can report: the metrics text and readiness.
pub trait Exposed: Send + Sync + 'static {
    fn render(&self) -> String;
    fn is_ready(&self) -> bool;
}

impl Exposed for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
    fn is_ready(&self) -> bool {
        Metrics::is_ready(self)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, source: Arc<dyn Exposed>) {
    let metrics = Arc::clone(&source);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = source.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not connected\n")
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "The metrics server stopped.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_parses_or_is_off() {
        assert_eq!("off".parse::<MetricsAddr>(), Ok(MetricsAddr::Off));
        assert_eq!(
            DEFAULT_METRICS_ADDR.parse::<MetricsAddr>(),
            Ok(MetricsAddr::On("127.0.0.1:9477".parse().unwrap()))
        );
        assert!("localhost".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn every_name_is_exported_and_documented() {
        let m = Metrics::new();
        // Labelled metrics show up once they have a value.
        m.execution(
            "p",
            "s",
            "normal",
            Outcome::Succeeded,
            Some(Duration::from_millis(3)),
        );
        m.queue_wait("p", "s", "normal", Duration::from_millis(1));
        m.job_finished("p", "normal", true, Duration::from_secs(1));
        let _running = m.running("p", "s");
        m.dead_letter(None, "undecodable");
        m.confirmed(PublishKind::Result, Duration::from_millis(2));
        let text = m.render();
        let docs = include_str!("../../docs/metrics.md");
        for name in NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} not exported"
            );
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} not in docs/metrics.md"
            );
        }
        assert!(text.contains(
            "warren_step_executions_total{outcome=\"succeeded\",pipeline=\"p\",priority=\"normal\",step=\"s\"} 1"
        ), "{text}");
        assert!(text.contains("warren_steps_in_flight{pipeline=\"p\",step=\"s\"} 1"));
        assert!(text
            .contains("warren_dead_letters_total{pipeline=\"unknown\",reason=\"undecodable\"} 1"));
    }
}
