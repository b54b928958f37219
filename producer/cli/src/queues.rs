//! `warren queues`: the depth of every step queue. Ready messages and consumers come from passive
//! declares (no management plugin needed); unacked messages from the management API, when
//! `[broker] management_url` is set. With `--tenants`, the top tenants by backlog instead,
//! estimated from what the workers report on the control stream, and which tenants are hot.

use std::time::Duration;

use crate::output::outln;
use anyhow::bail;
use clap::Args;
use serde::Serialize;
use serde_json::json;
use warren_broker::control;
use warren_broker::depth::{add_unacked, read_depths, QueueDepth};
use warren_broker::tenants::{estimate, TenantBacklog};
use warren_broker::{Broker, HotTenant, Management, Names, StepRoute};
use warren_common::{now_ms, Config};

#[derive(Debug, Args)]
pub(crate) struct QueuesArgs {
    /// Only the queues of this pipeline.
    #[arg(long)]
    pipeline: Option<String>,
    /// Also list queues with no ready messages (the table skips them by default).
    #[arg(long)]
    all: bool,
    /// Show the top tenants by backlog per pipeline (estimated from the workers' reports of
    /// the last minute) and which are hot, instead of the queues.
    #[arg(long)]
    tenants: bool,
    /// With `--tenants`: how many tenants per pipeline.
    #[arg(long, default_value_t = 10)]
    top: usize,
}

/// How far back `--tenants` reads the workers' reports (they report every 10 s).
const REPORTS_LOOK_BACK: Duration = Duration::from_secs(60);

pub(crate) async fn run(args: QueuesArgs, config: &Config, json: bool) -> anyhow::Result<()> {
    if let Some(p) = &args.pipeline {
        if !config.pipelines.iter().any(|c| &c.name == p) {
            bail!("pipeline {p:?} is not in the config");
        }
    }
    if args.tenants {
        return tenants(&args, config, json).await;
    }
    let routes: Vec<_> = StepRoute::all(config)
        .into_iter()
        .filter(|r| args.pipeline.as_ref().is_none_or(|p| p == &r.pipeline))
        .collect();
    let management = Management::from_config(&config.broker)?;
    let broker = Broker::connect(&config.broker).await?;
    let depths = read_depths(&broker, &routes).await;
    broker.close().await;
    let mut depths = depths?;
    if let Some(management) = &management {
        let prefix = Names::new(&config.broker.namespace).step_queue_prefix();
        if let Err(e) = add_unacked(management, &prefix, &mut depths).await {
            // The ready counts are still right; say why the unacked ones are missing.
            eprintln!("warren: no unacked counts: {e}");
        }
    }
    if json {
        for d in &depths {
            outln!("{}", queue_json(d));
        }
    } else {
        print!("{}", table(&depths, args.all));
    }
    let missing = depths.iter().filter(|d| d.ready.is_none()).count();
    if missing > 0 {
        eprintln!(
            "warren: {missing} step queue(s) do not exist; run `warren topology apply` (or start a worker)"
        );
    }
    Ok(())
}

/// `--tenants`: the top tenants of each pipeline by estimated backlog, hot ones marked.
async fn tenants(args: &QueuesArgs, config: &Config, json: bool) -> anyhow::Result<()> {
    let broker = Broker::connect(&config.broker).await?;
    let read = control::read_recent(&broker, REPORTS_LOOK_BACK).await;
    broker.close().await;
    let control::Recent { hot, digests, .. } = read?;
    let wanted = |pipeline: &str| args.pipeline.as_deref().is_none_or(|p| p == pipeline);
    let mut rows: Vec<TenantRow> = Vec::new();
    for backlog in estimate(&digests)
        .into_iter()
        .filter(|b| wanted(&b.pipeline))
    {
        let shown = rows
            .iter()
            .filter(|r| r.pipeline == backlog.pipeline)
            .count();
        if shown < args.top {
            rows.push(TenantRow::new(backlog, &hot));
        }
    }
    // Hot tenants with nothing reported (no worker has taken their work yet) are shown too.
    for h in hot.iter().filter(|h| wanted(&h.pipeline)) {
        if !rows
            .iter()
            .any(|r| r.pipeline == h.pipeline && r.tenant == h.tenant)
        {
            rows.push(TenantRow::new(
                TenantBacklog {
                    pipeline: h.pipeline.clone(),
                    tenant: h.tenant.clone(),
                    backlog: 0,
                    lanes: vec![],
                },
                &hot,
            ));
        }
    }
    if json {
        for row in &rows {
            outln!("{}", serde_json::to_string(row)?);
        }
    } else {
        print!("{}", tenants_table(&rows));
        if digests.is_empty() {
            eprintln!("warren: no worker reported a lane in the last minute (no work taken, or no worker running)");
        }
    }
    Ok(())
}

/// One line of `--tenants`.
#[derive(Debug, Serialize)]
struct TenantRow {
    pipeline: String,
    tenant: String,
    /// Estimated messages waiting.
    backlog: u64,
    hot: bool,
    /// Seconds the hot mark has left.
    hot_for_s: Option<u64>,
    hot_lane: Option<String>,
    lanes: Vec<String>,
}

impl TenantRow {
    fn new(b: TenantBacklog, hot: &[HotTenant]) -> Self {
        let mark = hot
            .iter()
            .find(|h| h.pipeline == b.pipeline && h.tenant == b.tenant);
        Self {
            hot: mark.is_some(),
            hot_for_s: mark.map(|h| h.until.saturating_sub(now_ms()) / 1000),
            hot_lane: mark.map(|h| h.lane.to_string()),
            pipeline: b.pipeline,
            tenant: b.tenant,
            backlog: b.backlog,
            lanes: b.lanes,
        }
    }
}

fn tenants_table(rows: &[TenantRow]) -> String {
    let mut out = format!(
        "{:<20} {:<24} {:>10} {:<16} lanes\n",
        "pipeline", "tenant", "backlog~", "hot"
    );
    for r in rows {
        let hot = match (&r.hot_lane, r.hot_for_s) {
            (Some(lane), Some(s)) => format!("{lane} ({s}s)"),
            _ => "-".to_string(),
        };
        out += &format!(
            "{:<20} {:<24} {:>10} {:<16} {}\n",
            r.pipeline,
            r.tenant,
            r.backlog,
            hot,
            r.lanes.join(",")
        );
    }
    out
}

fn queue_json(d: &QueueDepth) -> serde_json::Value {
    json!({
        "queue": d.queue,
        "pipeline": d.route.pipeline,
        "step": d.route.step,
        "priority": d.route.priority.as_str(),
        "shard": d.route.lane.shard(),
        "lane": d.route.lane.to_string(),
        "exists": d.ready.is_some(),
        "ready": d.ready,
        "unacked": d.unacked,
        "consumers": d.consumers,
    })
}

struct StepTotal<'a> {
    pipeline: &'a str,
    step: &'a str,
    ready: [u64; 3],
    unacked: Option<u64>,
    consumers: u32,
}

/// One line per queue (those with messages, or all), then the totals per step. Unacked counts
/// show as `-` when unknown (no management API).
fn table(depths: &[QueueDepth], all: bool) -> String {
    let mut out = format!(
        "{:<48} {:>8} {:>8} {:>9}\n",
        "queue", "ready", "unacked", "consumers"
    );
    let show = |n: Option<u32>| n.map_or("missing".to_string(), |n| n.to_string());
    let unacked = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    for d in depths
        .iter()
        .filter(|d| all || d.backlog() > 0 || d.ready.is_none())
    {
        out += &format!(
            "{:<48} {:>8} {:>8} {:>9}\n",
            d.queue,
            show(d.ready),
            unacked(d.unacked),
            show(d.consumers)
        );
    }
    // Per (pipeline, step), in config order (queues of a step are adjacent): ready by
    // priority, and the fewest consumers on any one queue of the step, since a worker consumes
    // all of them (0 means some queue has nobody serving it).
    let mut totals: Vec<StepTotal> = Vec::new();
    for d in depths {
        let q = &d.route;
        let consumers = d.consumers.unwrap_or(0);
        match totals.last_mut() {
            Some(t) if t.pipeline == q.pipeline && t.step == q.step => {
                t.consumers = t.consumers.min(consumers)
            }
            _ => totals.push(StepTotal {
                pipeline: &q.pipeline,
                step: &q.step,
                ready: [0; 3],
                unacked: None,
                consumers,
            }),
        }
        let t = totals.last_mut().expect("just pushed");
        t.ready[q.priority.index()] += u64::from(d.ready.unwrap_or(0));
        if let Some(n) = d.unacked {
            t.unacked = Some(t.unacked.unwrap_or(0) + n);
        }
    }
    out += &format!(
        "\n{:<20} {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
        "pipeline", "step", "ready", "high", "normal", "low", "unacked", "consumers"
    );
    for t in totals {
        let [high, normal, low] = t.ready;
        out += &format!(
            "{:<20} {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
            t.pipeline,
            t.step,
            high + normal + low,
            high,
            normal,
            low,
            unacked(t.unacked),
            t.consumers
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_broker::Lane;
    use warren_common::Priority;

    fn depth(step: &str, priority: Priority, shard: u16, ready: Option<u32>) -> QueueDepth {
        QueueDepth {
            route: StepRoute {
                pipeline: "p".into(),
                step: step.into(),
                priority,
                lane: Lane::Shard(shard),
            },
            queue: format!("ns.q.p.{step}.{priority}.{shard}"),
            ready,
            consumers: ready.map(|_| 2),
            unacked: None,
        }
    }

    #[test]
    fn table_skips_empty_queues_and_sums_per_step() {
        let depths = vec![
            depth("a", Priority::High, 0, Some(3)),
            depth("a", Priority::Normal, 1, Some(0)),
            depth("a", Priority::Low, 0, Some(4)),
            depth("b", Priority::Normal, 0, None),
        ];
        let text = table(&depths, false);
        assert!(text.contains("ns.q.p.a.high.0"), "{text}");
        assert!(!text.contains("ns.q.p.a.normal.1"), "{text}");
        assert!(
            text.contains("ns.q.p.b.normal.0"),
            "a missing queue is shown: {text}"
        );
        let a_total = text
            .lines()
            .find(|l| l.starts_with("p ") && l.contains(" a "))
            .unwrap();
        let fields: Vec<_> = a_total.split_whitespace().collect();
        assert_eq!(fields, ["p", "a", "7", "3", "0", "4", "-", "2"], "{text}");
        assert!(table(&depths, true).contains("ns.q.p.a.normal.1"));
    }

    #[test]
    fn the_tenants_table_marks_the_hot_ones() {
        let hot = vec![HotTenant {
            pipeline: "p".into(),
            tenant: "flood".into(),
            lane: Lane::Hot(1),
            until: now_ms() + 30_500,
        }];
        let backlog = |tenant: &str, n| TenantBacklog {
            pipeline: "p".into(),
            tenant: tenant.into(),
            backlog: n,
            lanes: vec!["a.normal.hot1".into()],
        };
        let rows = [
            TenantRow::new(backlog("flood", 1200), &hot),
            TenantRow::new(backlog("small", 3), &hot),
        ];
        let text = tenants_table(&rows);
        let flood: Vec<_> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(flood[..4], ["p", "flood", "1200", "hot1"], "{text}");
        let small: Vec<_> = text.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(small[..4], ["p", "small", "3", "-"], "{text}");
    }

    #[test]
    fn table_shows_unacked_counts_when_known() {
        let mut busy = depth("a", Priority::Normal, 1, Some(0));
        busy.unacked = Some(5);
        let mut idle = depth("a", Priority::Low, 0, Some(2));
        idle.unacked = Some(0);
        let text = table(&[busy, idle], false);
        let line = text.lines().find(|l| l.starts_with("ns.q.p.a.normal.1"));
        let fields: Vec<_> = line
            .expect("a queue with only unacked messages is shown")
            .split_whitespace()
            .collect();
        assert_eq!(fields, ["ns.q.p.a.normal.1", "0", "5", "2"], "{text}");
        let total = text.lines().find(|l| l.starts_with("p ")).unwrap();
        let fields: Vec<_> = total.split_whitespace().collect();
        assert_eq!(fields, ["p", "a", "2", "0", "0", "2", "5", "2"], "{text}");
    }
}
