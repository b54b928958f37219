//! `warren-worker supervise`: keeps pools of local worker processes sized to their backlog.
//!
//! A pool is a pipeline, or one step of it. Every `interval` the supervisor reads the backlog of
//! the pool's step queues ([`depths`]) and sizes the pool to
//! `clamp(ceil(backlog / target_backlog), min, max)`: up at once, down only once the wanted
//! count has stayed lower for `scale_down_after` ([`policy`], pure). Scaling down sends SIGTERM,
//! so the worker drains (finishes its steps, returns its prefetch) and nothing is lost. Workers
//! are this same executable ([`pool`]), so a custom worker binary built on [`crate::cli::main`]
//! supervises its own handlers. What it is asked to do: [`options`].

mod depths;
mod options;
mod policy;
mod pool;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use warren_broker::{Management, StepRoute};
use warren_common::Config;

use self::depths::Depths;
use self::pool::{Pool, Slots};
use crate::metrics::{serve_metrics, SupervisorMetrics};
use crate::shutdown::Signals;

use self::options::PoolSpec;
pub(crate) use self::options::{Options, SupervisorError, WorkerMetricsBase};
pub(crate) use self::policy::Policy;

/// Supervises until SIGTERM/SIGINT, then drains every worker and returns. Fails before starting
/// anything if the options do not fit the config or the metrics address cannot be served.
pub(crate) async fn run(
    config: Config,
    options: Options,
    mut signals: Signals,
) -> Result<(), SupervisorError> {
    let specs = options::check(&config, &options)?;
    let metrics = Arc::new(SupervisorMetrics::new());
    serve_metrics(options.metrics_addr, metrics.exposition()).await?;
    let management =
        Management::from_config(&config.broker).map_err(SupervisorError::Management)?;
    let queues: Vec<StepRoute> = StepRoute::all(&config)
        .into_iter()
        .filter(|q| specs.iter().any(|s| serves(s, q)))
        .collect();
    let p = options.policy;
    let pools: Vec<Pool> = specs
        .into_iter()
        .map(|spec| {
            let mine = (0..queues.len())
                .filter(|i| serves(&spec, &queues[*i]))
                .collect();
            Pool::new(spec, mine, &p)
        })
        .collect();
    for pool in &pools {
        metrics.pool_added(pool.name());
    }
    info!(
        pools = %pools.iter().map(Pool::name).collect::<Vec<_>>().join(","),
        min = p.min, max = p.max, target_backlog = p.target_backlog,
        interval = ?options.interval, scale_down_after = ?p.scale_down_after,
        "Supervising."
    );
    let mut sup = Supervisor {
        depths: Depths::new(queues, management),
        options,
        metrics,
        pools,
        slots: Slots::default(),
    };
    let mut ticks = tokio::time::interval(sup.options.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => sup.tick(&config).await,
            _ = signals.recv() => break,
        }
    }
    sup.shutdown(&mut signals).await;
    sup.depths.close().await;
    Ok(())
}

fn serves(spec: &PoolSpec, q: &StepRoute) -> bool {
    q.pipeline == spec.pipeline && spec.step.as_ref().is_none_or(|s| s == &q.step)
}

struct Supervisor {
    options: Options,
    metrics: Arc<SupervisorMetrics>,
    depths: Depths,
    pools: Vec<Pool>,
    slots: Slots,
}

impl Supervisor {
    /// Reads the queues, then for each pool collects the dead and scales.
    async fn tick(&mut self, config: &Config) {
        // A broker that stops answering must not stop the restarts of dead workers.
        let patience = self.options.interval.max(Duration::from_secs(5));
        let depths = self.depths.read(config, patience).await;
        if let Some(depths) = &depths {
            self.metrics.depths_read(depths);
        }
        let now = Instant::now();
        for pool in &mut self.pools {
            pool.reap(
                now,
                self.options.shutdown_grace,
                &mut self.slots,
                &self.metrics,
            );
            let backlog = depths.as_deref().map(|d| pool.backlog(d));
            pool.scale(backlog, now, &self.options, &mut self.slots, &self.metrics);
        }
    }

    /// Drains every worker and waits for all of them; a second signal stops them at once.
    async fn shutdown(&mut self, signals: &mut Signals) {
        let total: usize = self.pools.iter().map(Pool::alive).sum();
        info!(
            workers = total,
            "Shutdown requested; draining every worker (a second signal stops them at once)."
        );
        let now = Instant::now();
        for pool in &mut self.pools {
            pool.drain_all(now);
        }
        let mut hurried = false;
        loop {
            for pool in &mut self.pools {
                pool.reap(
                    Instant::now(),
                    self.options.shutdown_grace,
                    &mut self.slots,
                    &self.metrics,
                );
                self.metrics.running(pool.name(), 0);
            }
            if self.pools.iter().all(|p| p.alive() == 0) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = signals.recv(), if !hurried => {
                    hurried = true;
                    warn!("Second signal: stopping the workers now; unfinished steps return to their queues.");
                    self.pools.iter().for_each(Pool::stop_now);
                }
            }
        }
        info!("Every worker has exited.");
    }
}
