//! Hot-tenant isolation, the worker's part: notice a tenant flooding a lane ([`watch`]), check
//! the lane is deep, mark the tenant hot on the control stream, and move its messages still
//! queued in a shard to its hot lane, so the tenants behind them move up. Routing by the marks
//! (for the next step's message and for retries) is `warren_broker::HotRouter`'s.
//!
//! A move publishes the message to the hot lane, waits for the confirm, then acks the original:
//! the same rule as a step hand-off, so a crash mid-move may duplicate a job, never lose it.

mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tracing::{debug, info, warn};
use warren_broker::depth::{Counts, Probe};
use warren_broker::tenants::{LaneDigest, DIGEST_KIND};
use warren_broker::{Broker, HotMark, HotReason, HotRouter, Lane, StepRoute};
use warren_common::config::PipelineConfig;
use warren_common::{now_ms, Config};

use self::watch::LaneWatch;
use crate::step::{ServedStep, StepSession};

/// Pause before a message whose move failed goes back to its shard, so a hot lane that refuses
/// (full) does not turn into a hot redelivery loop.
const MOVE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How often the hot-tenant gauge is brought up to date and lane digests are published.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Tenants a lane digest names.
const DIGEST_TOP: usize = 5;

/// What a session's step tasks share for fairness: the hot tenants as the control stream says,
/// and a window per lane of the tenants taken from it.
pub(crate) struct Fairness {
    pub(crate) router: HotRouter,
    watches: Mutex<HashMap<StepRoute, LaneWatch>>,
    /// Who marks, as the control stream shows it.
    by: String,
}

impl Fairness {
    pub(crate) fn start(broker: &Broker, config: &Config) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_string());
        Self {
            router: HotRouter::start(broker, config.fairness.hot_for),
            watches: Mutex::new(HashMap::new()),
            by: format!("{host}/{}", std::process::id()),
        }
    }

    /// The hot lane a message from `route` should move to, if its tenant is hot: only messages
    /// in shards move, and only the tenant field is decoded, only when the pipeline has hot
    /// tenants at all.
    pub(crate) fn diversion(
        &self,
        served: &ServedStep,
        route: &StepRoute,
        delivery: &Delivery,
    ) -> Option<StepRoute> {
        if route.lane.is_hot() || !self.router.any_in(&route.pipeline) {
            return None;
        }
        let tenant = warren_common::codec::decode_tenant(&delivery.data)?;
        let lane: Lane = self.router.lane(&served.pipeline, &tenant)?;
        Some(StepRoute {
            lane,
            ..route.clone()
        })
    }

    /// Marks hot, before a fan-out's parts are routed, each tenant it gives `hot_depth` parts
    /// or more of `pipeline`, as a producer's bulk submit does: the flood takes a hot lane from
    /// its first part, rather than entering the shard it shares with other tenants and being
    /// moved from there (a publish and an ack per part). A mark that cannot be published
    /// leaves the parts routed by shard.
    pub(crate) async fn notice_fan_out<'a>(
        session: &StepSession,
        pipeline: &PipelineConfig,
        tenants: impl IntoIterator<Item = &'a str>,
    ) {
        let (fairness, settings) = (&session.fairness, &session.config.fairness);
        if pipeline.hot_lanes == 0 {
            return;
        }
        let hot_for_ms = settings.hot_for.as_millis() as u64;
        for tenant in watch::bulk_floods(tenants, settings.hot_depth) {
            if fairness.router.fresh(&pipeline.name, tenant, hot_for_ms) {
                continue;
            }
            let (now, reason) = (now_ms(), HotReason::Bulk);
            let Some(mark) = HotMark::new(pipeline, tenant, now, hot_for_ms, reason, &fairness.by)
            else {
                continue;
            };
            match session.outbox.publish_mark(&fairness.router, &mark).await {
                Ok(()) => {
                    session
                        .metrics
                        .hot_marked(&mark.pipeline, mark.reason.as_str());
                    info!(tenant = %mark.tenant, pipeline = %mark.pipeline, lane = %Lane::Hot(mark.lane),
                        "Tenant marked hot by a fan-out: its parts take a hot lane.");
                }
                Err(error) => {
                    warn!(%error, tenant = %mark.tenant, pipeline = %mark.pipeline,
                        "Cannot publish a hot mark; the fan-out's parts go to their shards.");
                    return;
                }
            }
        }
    }

    /// Counts one delivery of `tenant` taken from `route`; when the tenant dominates the lane
    /// and is not marked for long enough already, checks the lane's depth and marks it hot.
    pub(crate) fn observe(
        session: &Arc<StepSession>,
        served: &ServedStep,
        route: &StepRoute,
        tenant: &str,
    ) {
        let fairness = &session.fairness;
        let settings = &session.config.fairness;
        if served.pipeline.hot_lanes == 0 {
            return;
        }
        let candidate = {
            let mut watches = fairness.watches.lock().expect("watches lock");
            // (no clone of the route per delivery: only the first of a lane inserts)
            if !watches.contains_key(route) {
                watches.insert(route.clone(), LaneWatch::default());
            }
            let watch = watches.get_mut(route).expect("just inserted");
            match watch.observe(tenant, settings.hot_share, now_ms()) {
                Some(tenant) => tenant.to_string(),
                None => return,
            }
        };
        let hot_for_ms = settings.hot_for.as_millis() as u64;
        if fairness
            .router
            .fresh(&route.pipeline, &candidate, hot_for_ms)
        {
            return;
        }
        let Some(mark) = HotMark::new(
            &served.pipeline,
            &candidate,
            now_ms(),
            hot_for_ms,
            HotReason::Depth,
            &fairness.by,
        ) else {
            return;
        };
        let (session, queue) = (Arc::clone(session), session.outbox.queue(route));
        let hot_depth = settings.hot_depth;
        tokio::spawn(async move {
            let depth = match warren_broker::depth::ready_messages(&session.broker, &queue).await {
                Ok(Some(depth)) => depth,
                Ok(None) => return,
                Err(error) => {
                    debug!(%error, queue = %queue, "Cannot read the depth of a lane.");
                    return;
                }
            };
            if depth < hot_depth {
                return;
            }
            match session
                .outbox
                .publish_mark(&session.fairness.router, &mark)
                .await
            {
                Ok(()) => {
                    session
                        .metrics
                        .hot_marked(&mark.pipeline, mark.reason.as_str());
                    info!(tenant = %mark.tenant, pipeline = %mark.pipeline, lane = %Lane::Hot(mark.lane),
                        queue = %queue, depth, "Tenant marked hot: its jobs take a hot lane.");
                }
                Err(error) => {
                    warn!(%error, tenant = %mark.tenant, pipeline = %mark.pipeline,
                        "Cannot publish a hot mark; the tenant stays on its shard.");
                }
            }
        });
    }

    /// Publishes a digest of every lane that had deliveries since the last time: its depth and
    /// its top tenants, for `warren queues --tenants`.
    pub(crate) async fn publish_digests(session: &StepSession) {
        let fairness = &session.fairness;
        // (lane, deliveries in its window, top tenants)
        type Fresh = (StepRoute, u32, Vec<(String, u32)>);
        let fresh: Vec<Fresh> = {
            let mut watches = fairness.watches.lock().expect("watches lock");
            watches
                .iter_mut()
                .filter_map(|(route, w)| (w.take_fresh() > 0).then_some((route, w)))
                .map(|(route, w)| {
                    let top = w.top(DIGEST_TOP);
                    let top = top.into_iter().map(|(t, n)| (t, n as u32)).collect();
                    (route.clone(), w.seen() as u32, top)
                })
                .collect()
        };
        // One channel for every lane's passive declare, not one each.
        let mut probe = Probe::new(&session.broker);
        for (route, seen, tenants) in fresh {
            let queue = session.outbox.queue(&route);
            let Ok(Some(Counts { ready: depth, .. })) = probe.read(&queue).await else {
                continue;
            };
            let digest = LaneDigest {
                v: 1,
                kind: DIGEST_KIND.to_string(),
                pipeline: route.pipeline,
                step: route.step,
                priority: route.priority,
                lane: route.lane.to_string(),
                depth,
                seen,
                tenants,
                at: now_ms(),
                by: fairness.by.clone(),
            };
            if let Err(error) = fairness
                .router
                .digest(session.outbox.publisher(), &digest)
                .await
            {
                debug!(%error, "Cannot publish a lane digest.");
            }
        }
        probe.close().await;
    }

    /// Sets the hot-tenant gauge from the current marks.
    pub(crate) fn update_gauge(&self, config: &Config, metrics: &crate::metrics::Metrics) {
        let mut counts: HashMap<String, i64> = HashMap::new();
        for hot in self.router.list() {
            *counts.entry(hot.pipeline).or_default() += 1;
        }
        metrics.set_hot_tenants(config.pipelines.iter().map(|p| p.name.as_str()), &counts);
    }
}

/// Moves `delivery` to `to` (its tenant's hot lane): publish with confirm, then ack. When the
/// publish fails the message goes back to its shard after a pause, and runs there later.
pub(crate) async fn move_delivery(session: Arc<StepSession>, to: StepRoute, delivery: Delivery) {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default();
    match session.outbox.publish_moved(&to, &delivery.data, &id).await {
        Ok(()) => {
            session.metrics.moved(&to.pipeline, &to.step);
            debug!(job_id = %id, pipeline = %to.pipeline, step = %to.step, lane = %to.lane,
                "Moved a hot tenant's message to its hot lane.");
            if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                // Redelivered to its shard and moved again: a duplicate, not a loss.
                warn!(%error, job_id = %id, "Cannot ack a moved message.");
            }
        }
        Err(error) => {
            warn!(%error, job_id = %id, lane = %to.lane, "Cannot move a message to its hot lane; it goes back to its shard.");
            tokio::time::sleep(MOVE_RETRY_PAUSE).await;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            let _ = delivery.acker.nack(requeue).await;
        }
    }
}
