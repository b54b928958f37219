//! S3c collider: S3 with the small tenant B chosen so that its hash shard is the flooding tenant
//! A's own. On plain hash shards B's jobs queue behind the whole flood; hot-tenant isolation is
//! to take A's flood out of the shard (a hot lane) so B moves on. Run twice in one invocation:
//! pipeline `collide_off` (`hot_lanes = 0`, today's shards, for information) and `collide` (the
//! default hot lanes, the target row).

use std::time::{Duration, Instant};

use warren_common::Priority;

use super::report::{Row, Target};
use super::scenarios::{jobs, quantile_ms, small_batch, span, tenant_near_in};
use super::warren_side::Watcher;
use super::Bench;

/// The flooding tenant (B is found next to it).
const FLOODER: &str = "collider-a";

/// What one pass measured.
struct Collision {
    /// B's batch latencies on the idle system and right after A's flood was submitted.
    idle: Vec<Duration>,
    busy: Vec<Duration>,
    /// From the start of A's `submit_many` to its last result.
    drained: Duration,
}

pub(super) async fn s3c(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let off = collide(b, "collide_off").await?;
    let on = collide(b, "collide").await?;
    let p95 = |c: &Collision| (quantile_ms(&c.busy, 0.95), quantile_ms(&c.idle, 0.95));
    let (busy, idle) = p95(&off);
    rows.push(Row::new(
        "S3c",
        "same-shard p95 under flood vs idle, hot_lanes = 0",
        "ms",
        busy,
        Some(idle),
        Target::Info,
    ));
    let (busy, idle) = p95(&on);
    rows.push(Row::new(
        "S3c",
        "same-shard p95 under flood vs idle",
        "ms",
        busy,
        Some(idle),
        Target::RatioAtMost(5.0),
    ));
    rows.push(Row::new(
        "S3c",
        "flood drained in, hot_lanes = 0",
        "s",
        off.drained.as_secs_f64(),
        None,
        Target::Info,
    ));
    rows.push(Row::new(
        "S3c",
        "flood drained in vs hot_lanes = 0",
        "s",
        on.drained.as_secs_f64(),
        Some(off.drained.as_secs_f64()),
        Target::Info,
    ));
    Ok(())
}

/// One pass on `pipeline`: B's batch idle, then A's flood in one `submit_many`, then B's batch
/// again at once, then the flood's drain.
async fn collide(b: &Bench, pipeline: &str) -> anyhow::Result<Collision> {
    let label = format!("S3c {pipeline}");
    let neighbour = tenant_near_in(
        b,
        pipeline,
        "collider-b",
        b.lane_in(pipeline, FLOODER),
        true,
    );
    let mut watcher = Watcher::start(&b.client).await?;
    b.start_worker(
        pipeline,
        &b.queue(pipeline, "work", Priority::Normal, FLOODER),
    )
    .await?;
    // Not counted: the first jobs after a worker starts wait on one-off work (S3's warm-up).
    let warm_up = format!("{label} warm-up");
    small_batch(
        b,
        &mut watcher,
        pipeline,
        &neighbour,
        Priority::Normal,
        &warm_up,
    )
    .await?;
    let idle_label = format!("{label} idle, tenant B");
    let idle = small_batch(
        b,
        &mut watcher,
        pipeline,
        &neighbour,
        Priority::Normal,
        &idle_label,
    )
    .await?;

    let (flood, flood_ids) = jobs(
        pipeline,
        FLOODER,
        Priority::Normal,
        b.args.flood,
        b.args.work_ms,
    );
    let bar = b.spinner(&format!("{label} tenant A submit"));
    let flood_started = Instant::now();
    b.client.submit_many(flood).await?;
    bar.finish();
    let busy_label = format!("{label} in flood, tenant B");
    let busy = small_batch(
        b,
        &mut watcher,
        pipeline,
        &neighbour,
        Priority::Normal,
        &busy_label,
    )
    .await?;
    let bar = b.bar(flood_ids.len(), &format!("{label} tenant A drain"));
    let flood_done = watcher.wait_all(&flood_ids, b.args.patience, &bar).await?;
    bar.finish();
    b.stop_worker().await?;
    Ok(Collision {
        idle,
        busy,
        drained: span(flood_started, &flood_done),
    })
}
