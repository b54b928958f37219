//! What `warren-worker supervise` is asked to do: its options, the pools they make of a config,
//! and why they cannot run (checked before anything starts).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use warren_broker::BrokerError;
use warren_common::telemetry::LogFormat;
use warren_common::Config;

use super::policy::Policy;
use crate::metrics::{off_or, MetricsAddr, OffOrError, ServeError};

#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Passed on to the workers as `--config` (else they find the config as we did).
    pub(crate) config_path: Option<PathBuf>,
    /// Pools for these pipelines (all when empty)...
    pub(crate) pipelines: Vec<String>,
    /// ...or for these steps of them, one pool each.
    pub(crate) steps: Vec<String>,
    pub(crate) policy: Policy,
    pub(crate) interval: Duration,
    /// Where the supervisor serves its own metrics.
    pub(crate) metrics_addr: MetricsAddr,
    pub(crate) worker_metrics: WorkerMetricsBase,
    pub(crate) shutdown_grace: Duration,
    pub(crate) log_format: LogFormat,
    /// The worker executable: this one.
    pub(crate) exe: PathBuf,
}

/// `--worker-metrics-base`: the first port of the workers' metrics (slot 0), or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkerMetricsBase {
    Off,
    /// Port 0 gives every worker any free port.
    Port(u16),
}

impl FromStr for WorkerMetricsBase {
    type Err = OffOrError;
    fn from_str(s: &str) -> Result<Self, OffOrError> {
        Ok(off_or(s, "a port number")?.map_or(Self::Off, Self::Port))
    }
}

impl WorkerMetricsBase {
    /// The `--metrics-addr` of the worker in `slot`.
    pub(crate) fn addr(self, slot: usize) -> String {
        match self {
            Self::Off => "off".into(),
            Self::Port(0) => "127.0.0.1:0".into(),
            Self::Port(base) => match u16::try_from(usize::from(base) + slot) {
                Ok(port) => format!("127.0.0.1:{port}"),
                Err(_) => "127.0.0.1:0".into(),
            },
        }
    }
}

/// What one pool runs: `run --pipeline P [--step S]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolSpec {
    /// `pipeline` or `pipeline/step`: the `pool` label.
    pub(crate) name: String,
    pub(crate) pipeline: String,
    pub(crate) step: Option<String>,
}

/// Why the asked-for pools do not fit the config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlanError {
    #[error("pipeline {0:?} is not in the config")]
    UnknownPipeline(String),
    #[error("no supervised pipeline has a step {0:?}")]
    UnknownStep(String),
    #[error("nothing to supervise: the config has no pipeline")]
    Nothing,
}

/// The pools for the given pipelines and steps.
pub(crate) fn plan_pools(
    config: &Config,
    pipelines: &[String],
    steps: &[String],
) -> Result<Vec<PoolSpec>, PlanError> {
    if let Some(p) = pipelines.iter().find(|p| config.pipeline(p).is_none()) {
        return Err(PlanError::UnknownPipeline(p.clone()));
    }
    let chosen: Vec<_> = config
        .pipelines
        .iter()
        .filter(|p| pipelines.is_empty() || pipelines.contains(&p.name))
        .collect();
    if let Some(s) = steps
        .iter()
        .find(|s| !chosen.iter().any(|p| p.step(s).is_some()))
    {
        return Err(PlanError::UnknownStep(s.clone()));
    }
    let mut pools = Vec::new();
    for p in chosen {
        if steps.is_empty() {
            pools.push(PoolSpec {
                name: p.name.clone(),
                pipeline: p.name.clone(),
                step: None,
            });
            continue;
        }
        for s in p.steps.iter().filter(|s| steps.contains(&s.name)) {
            pools.push(PoolSpec {
                name: format!("{}/{}", p.name, s.name),
                pipeline: p.name.clone(),
                step: Some(s.name.clone()),
            });
        }
    }
    if pools.is_empty() {
        return Err(PlanError::Nothing);
    }
    Ok(pools)
}

/// Why the supervisor cannot start: every one is a usage error (exit 64).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SupervisorError {
    #[error("--min {min} --max {max}: need 0 <= min <= max and max >= 1")]
    Bounds { min: u32, max: u32 },
    #[error("--target-backlog and --interval must be above zero")]
    Zero,
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A `[broker] management_url` that cannot be used.
    #[error(transparent)]
    Management(BrokerError),
    #[error(transparent)]
    Metrics(#[from] ServeError),
}

/// The pools these options ask for, or why they cannot run.
pub(crate) fn check(config: &Config, options: &Options) -> Result<Vec<PoolSpec>, SupervisorError> {
    let Policy { min, max, .. } = options.policy;
    if max == 0 || min > max {
        return Err(SupervisorError::Bounds { min, max });
    }
    if options.policy.target_backlog == 0 || options.interval.is_zero() {
        return Err(SupervisorError::Zero);
    }
    Ok(plan_pools(config, &options.pipelines, &options.steps)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn config() -> Config {
        let toml = r#"
[broker]
namespace = "ns"
[[pipelines]]
name = "p"
shards = 1
[[pipelines.steps]]
name = "a"
handler = "h"
[[pipelines.steps]]
name = "b"
handler = "h"
[[pipelines]]
name = "q"
shards = 1
[[pipelines.steps]]
name = "a"
handler = "h"
"#;
        Config::parse(toml, "t", Path::new("."), &HashMap::new()).unwrap()
    }

    #[test]
    fn pools_per_pipeline_or_per_step() {
        let config = config();
        let names = |pools: Vec<PoolSpec>| pools.into_iter().map(|p| p.name).collect::<Vec<_>>();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(names(plan_pools(&config, &[], &[]).unwrap()), ["p", "q"]);
        assert_eq!(names(plan_pools(&config, &s(&["q"]), &[]).unwrap()), ["q"]);
        assert_eq!(
            names(plan_pools(&config, &[], &s(&["a"])).unwrap()),
            ["p/a", "q/a"]
        );
        assert_eq!(
            names(plan_pools(&config, &s(&["p"]), &s(&["b", "a"])).unwrap()),
            ["p/a", "p/b"]
        );
        let err = plan_pools(&config, &s(&["x"]), &[]).unwrap_err();
        assert_eq!(err, PlanError::UnknownPipeline("x".into()));
        assert_eq!(err.to_string(), "pipeline \"x\" is not in the config");
        let err = plan_pools(&config, &s(&["q"]), &s(&["b"])).unwrap_err();
        assert_eq!(err, PlanError::UnknownStep("b".into()));
        assert_eq!(err.to_string(), "no supervised pipeline has a step \"b\"");
    }

    #[test]
    fn options_are_checked_before_anything_starts() {
        let config = config();
        let options = |min, max, target_backlog, interval| Options {
            config_path: None,
            pipelines: vec![],
            steps: vec![],
            policy: Policy {
                min,
                max,
                target_backlog,
                activation: 1,
                scale_down_after: Duration::from_secs(30),
            },
            interval: Duration::from_secs(interval),
            metrics_addr: MetricsAddr::Off,
            worker_metrics: WorkerMetricsBase::Off,
            shutdown_grace: Duration::from_secs(30),
            log_format: LogFormat::Text,
            exe: PathBuf::from("warren-worker"),
        };
        assert_eq!(check(&config, &options(0, 2, 10, 2)).unwrap().len(), 2);
        let err = check(&config, &options(3, 2, 10, 2)).unwrap_err();
        assert!(matches!(err, SupervisorError::Bounds { min: 3, max: 2 }));
        assert_eq!(
            err.to_string(),
            "--min 3 --max 2: need 0 <= min <= max and max >= 1"
        );
        assert!(matches!(
            check(&config, &options(0, 0, 10, 2)),
            Err(SupervisorError::Bounds { .. })
        ));
        assert!(matches!(
            check(&config, &options(0, 2, 0, 2)),
            Err(SupervisorError::Zero)
        ));
        assert!(matches!(
            check(&config, &options(0, 2, 10, 0)),
            Err(SupervisorError::Zero)
        ));
        let mut unknown = options(0, 2, 10, 2);
        unknown.pipelines = vec!["x".into()];
        assert!(matches!(
            check(&config, &unknown),
            Err(SupervisorError::Plan(PlanError::UnknownPipeline(_)))
        ));
    }

    #[test]
    fn worker_metrics_ports_follow_the_slot() {
        let base: WorkerMetricsBase = "9480".parse().unwrap();
        assert_eq!(base.addr(0), "127.0.0.1:9480");
        assert_eq!(base.addr(2), "127.0.0.1:9482");
        assert_eq!("off".parse::<WorkerMetricsBase>().unwrap().addr(1), "off");
        assert_eq!(WorkerMetricsBase::Port(0).addr(3), "127.0.0.1:0");
        assert_eq!(WorkerMetricsBase::Port(65535).addr(1), "127.0.0.1:0");
        assert_eq!(
            "x".parse::<WorkerMetricsBase>().unwrap_err().to_string(),
            "\"x\" is not a port number or `off`"
        );
    }
}
